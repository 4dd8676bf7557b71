"""jedi_kernels.geglu: forward and backward vs the float64 reference (2x rule), strided views, poisoned outputs,
gradcheck, opcheck, torch.compile and bad inputs, on every available backend (Triton via the interpreter on CPU)."""
import pytest
import torch

import jedi_kernels as jk
import jedi_kernels.ops.geglu as geglu_mod
from jedi_kernels.reference import geglu_reference
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule

BACKENDS = ["torch"] + (["triton"] if jk.available_backends()["triton"] else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (..., 2F): SD-like token rows, odd F (37 is no multiple of any block), F=1, a 2-D and a 4-D input, one row
SHAPES = [(2, 17, 2 * 40), (3, 5, 7, 2 * 96), (1, 1, 2 * 8), (64, 2 * 160), (13, 2 * 37), (2, 3, 2 * 1)]


def _check_forward(out, h, name):
    """fp64: equal to the reference to 1e-12; other dtypes: the 2x rule against the same-dtype torch reference."""
    ref64 = geglu_reference(h.detach().double())
    assert out.shape == ref64.shape and out.dtype == h.dtype, (tuple(out.shape), out.dtype)
    assert out.is_contiguous()
    if h.dtype == torch.float64:
        assert_close_verbose(out, ref64, atol=1e-12, name=name)
    else:
        assert_flash_rule(out, geglu_reference(h.detach()), ref64, name)


def _check_backward(h, grad, backend, name):
    """dh of jk.geglu vs autograd of the float64 reference, 2x rule against autograd of the same-dtype reference."""
    x = h.detach().clone().requires_grad_(True)
    (dh,) = torch.autograd.grad(jk.geglu(x, backend=backend), x, grad)
    x64 = h.detach().double().requires_grad_(True)
    (d64,) = torch.autograd.grad(geglu_reference(x64), x64, grad.double())
    assert dh.shape == h.shape and dh.dtype == h.dtype
    if h.dtype == torch.float64:
        assert_close_verbose(dh, d64, atol=1e-12, name=name)
    else:
        xs = h.detach().clone().requires_grad_(True)
        (ds,) = torch.autograd.grad(geglu_reference(xs), xs, grad)
        assert_flash_rule(dh, ds, d64, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(backend, dtype, shape):
    h = (2 * torch.randn(shape)).to(dtype)  # std 2: gates reach the gelu's curved region and both tails
    _check_forward(jk.geglu(h, backend=backend), h, f"geglu[{backend}] {dtype} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 17, 2 * 40), (13, 2 * 37), (3, 5, 7, 2 * 96)], ids=str)
def test_backward(backend, dtype, shape):
    h = (2 * torch.randn(shape)).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2).to(dtype)
    _check_backward(h, grad, backend, f"dh[{backend}] {dtype} {shape}")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_rounded_once(dtype):
    """Half outputs are the fp32 math rounded once, to nearest even: bitwise equal to the fp32 kernel's output cast
    by torch. (The CPU interpreter's own fp32 -> bf16 cast truncates; the kernel must not depend on it.)"""
    h = (2 * torch.randn(128, 2 * 96)).to(dtype)
    out = jk.geglu(h, backend="triton")
    assert torch.equal(out, jk.geglu(h.float(), backend="triton").to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_ties_round_to_even(backend):
    """Gates >= 8 make gelu(g) == g exactly in fp32, so out = a * g is exact in fp32 and about 1 in 256 products of
    two bf16 mantissas is a tie for bf16: each must round to even, as torch's cast does."""
    a = torch.randn(2, 2048).bfloat16()
    g = (8 + 8 * torch.rand(2, 2048)).bfloat16()
    h = torch.cat([a, g], dim=-1)  # (2, 2F)
    exact = a.float() * g.float()
    assert ((exact.view(torch.int32) & 0xFFFF) == 0x8000).sum() > 4  # the input has ties
    assert torch.equal(jk.geglu(h, backend=backend), exact.bfloat16())


def _strided_views(dtype):
    F = 24
    big = (2 * torch.randn(3, 5, 2 * F + 7)).to(dtype)
    base = (2 * torch.randn(5, 3, 2 * F)).to(dtype)
    wide = (2 * torch.randn(4, 4 * F)).to(dtype)
    return {
        "column_slice": big[..., 3 : 3 + 2 * F],  # (3, 5, 2F) with row stride 2F+7: the feed-forward's fused-proj case
        "transposed_leading": base.transpose(0, 1),  # (3, 5, 2F): no single row stride, the launcher copies
        "strided_features": wide[:, ::2],  # (4, 2F) with feature stride 2: copied once
        "row_step": big[::2, 1:, 1 : 1 + 2 * F],  # (2, 4, 2F): leading dims do not flatten either
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("view", ["column_slice", "transposed_leading", "strided_features", "row_step"])
def test_strided_inputs(backend, dtype, view):
    h = _strided_views(dtype)[view]
    assert not h.is_contiguous()
    _check_forward(jk.geglu(h, backend=backend), h, f"geglu[{backend}] {view}")
    grad = torch.randn(*h.shape[:-1], h.shape[-1] // 2).to(dtype)
    _check_backward(h, grad, backend, f"dh[{backend}] {view}")


def test_column_slice_is_read_in_place():
    """A column slice of a wider tensor flattens to one row stride: the launcher must not copy it."""
    big = torch.randn(3, 5, 55)
    h = big[..., 3:51]
    assert geglu_mod.rows_view(h).data_ptr() == h.data_ptr()
    assert geglu_mod.rows_view(h).shape == (15, 48)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad(backend):
    """Autograd may hand back expanded (stride-0) or transposed gradients."""
    h = torch.randn(4, 6, 2 * 20, dtype=torch.float64)
    expanded = torch.randn(1, 6, 20, dtype=torch.float64).expand(4, 6, 20)
    _check_backward(h, expanded, backend, f"dh[{backend}] expanded grad")
    transposed = torch.randn(6, 4, 20, dtype=torch.float64).transpose(0, 1)
    _check_backward(h, transposed, backend, f"dh[{backend}] transposed grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    h = torch.randn(0, 3, 16, requires_grad=True)
    out = jk.geglu(h, backend=backend)
    assert out.shape == (0, 3, 8)
    (dh,) = torch.autograd.grad(out, h, torch.randn(0, 3, 8))
    assert dh.shape == h.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    h = torch.randn(2, 3, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: jk.geglu(x, backend=backend), (h,))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("shape", [(13, 2 * 37), (300, 2 * 300), (2, 3, 2 * 1)], ids=str)
def test_poisoned_outputs_fully_written(monkeypatch, shape):
    """The launchers allocate with torch.empty; NaN-filling it proves every output element is stored (tails of R and
    F that are no multiple of the block)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    h = 2 * torch.randn(shape)
    grad = torch.randn(*shape[:-1], shape[-1] // 2)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = geglu_mod.geglu_fwd(h)
    dh = geglu_mod.geglu_bwd(grad, h)
    monkeypatch.undo()
    _check_forward(out, h, f"poisoned geglu_fwd {shape}")
    x64 = h.double().requires_grad_(True)
    (d64,) = torch.autograd.grad(geglu_reference(x64), x64, grad.double())
    assert_close_verbose(dh, d64, atol=1e-5, name=f"poisoned geglu_bwd {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    h = torch.randn(2, 5, 2 * 24, requires_grad=True)
    torch.library.opcheck(torch.ops.jedi.geglu.default, (h, backend))
    torch.library.opcheck(torch.ops.jedi.geglu.default, (torch.randn(3, 5, 55)[..., 3:51], backend))
    g = torch.randn(2, 5, 24)
    torch.library.opcheck(torch.ops.jedi.geglu_backward.default, (g, h.detach(), backend))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph(backend):
    h = torch.randn(4, 9, 2 * 32, requires_grad=True)

    def f(x):
        return jk.geglu(x, backend=backend) * 3

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(h)
    grad = torch.randn_like(out)
    (dh,) = torch.autograd.grad(out, h, grad)
    ref = f(h)
    (dref,) = torch.autograd.grad(ref, h, grad)
    assert_close_verbose(out, ref, atol=1e-6, name=f"compiled geglu[{backend}]")
    assert_close_verbose(dh, dref, atol=1e-6, name=f"compiled dh[{backend}]")


def test_auto_on_cpu_is_torch_and_matches():
    h = torch.randn(3, 2 * 16)
    assert torch.equal(jk.geglu(h), geglu_reference(h))


@pytest.mark.parametrize(
    "h, backend, exc, match",
    [
        (torch.randn(2, 7), "auto", ValueError, r"h must have shape \(\.\.\., 2F\) with an even"),
        (torch.randn(2, 0), "auto", ValueError, r"h must have shape \(\.\.\., 2F\)"),
        (torch.tensor(1.0), "auto", ValueError, r"h must have shape \(\.\.\., 2F\)"),
        (torch.ones(2, 8, dtype=torch.int32), "auto", TypeError, "h must be float16, bfloat16, float32 or float64"),
        ([[1.0, 2.0]], "auto", TypeError, "h must be a torch.Tensor"),
        (torch.randn(2, 8), "nope", ValueError, "backend must be one of"),
    ],
    ids=["odd_last_dim", "zero_last_dim", "0-dim", "int", "list", "bad_backend"],
)
def test_bad_inputs(h, backend, exc, match):
    with pytest.raises(exc, match=match):
        jk.geglu(h, backend=backend)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 4096, 2 * 1280), (4, 1024, 2 * 2560), (4, 256, 2 * 5120)], ids=str)
def test_gpu_sd_shapes(dtype, shape):
    h = (2 * torch.randn(shape, device="cuda")).to(dtype)
    _check_forward(jk.geglu(h, backend="triton"), h, f"gpu geglu {dtype} {shape}")
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").to(dtype)
    _check_backward(h, grad, "triton", f"gpu dh {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 77, 2 * 40), (13, 2 * 37)], ids=str)
def test_gpu_all_dtypes(dtype, shape):
    """fp32 and fp64 on the GPU (libdevice erf/exp) and odd F, strided as in the fused proj."""
    big = (2 * torch.randn(*shape[:-1], shape[-1] + 6, device="cuda")).to(dtype)
    h = big[..., 2 : 2 + shape[-1]]
    _check_forward(jk.geglu(h, backend="triton"), h, f"gpu geglu {dtype} {shape}")
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").to(dtype)
    _check_backward(h, grad, "triton", f"gpu dh {dtype} {shape}")


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_graph_capture():
    h = torch.randn(4, 256, 2 * 1280, device="cuda", dtype=torch.float16)
    out = jk.geglu(h)  # auto -> triton on CUDA; also compiles the kernel outside the capture
    assert torch.equal(out, jk.geglu(h, backend="triton"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = jk.geglu(h, backend="triton")
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, jk.geglu(h, backend="triton"))
