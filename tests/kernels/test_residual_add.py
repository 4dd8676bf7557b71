"""jedi_kernels.residual_add (``x + residual + bias[c]`` in one pass): the Triton kernel bitwise equal to the same
float32 (float64) sums rounded once, in every dtype, layout and stride mix; the torch backend equal to the reference;
poisoned outputs, gradients, gradcheck, opcheck, torch.compile and bad inputs (Triton via the interpreter on CPU)."""
import pytest
import torch

import jedi_kernels as jk
import jedi_kernels.ops.residual_add as ra
from jedi_kernels.reference import residual_add_reference
from jedi_kernels.testing import assert_close_verbose, assert_equal_verbose

HAS_TRITON = jk.available_backends()["triton"]
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CL = torch.channels_last
# (N, C, H, W): a channel tail past a 64-block, 1x1 and one-row images, a pixel tail past the tile
SHAPES = [(2, 70, 5, 3), (1, 3, 1, 1), (3, 8, 1, 7), (1, 320, 9, 9), (2, 4, 37, 29)]


def _layout(t, layout):
    if layout == "nhwc":
        return t.to(memory_format=CL)
    if layout == "strided":  # a channel slice of a wider channels-last tensor (pixel stride != C)
        wide = torch.randn(t.shape[0], t.shape[1] + 5, *t.shape[2:], dtype=t.dtype).to(memory_format=CL)
        wide[:, 2:2 + t.shape[1]] = t
        return wide[:, 2:2 + t.shape[1]]
    if layout == "hw_transposed":  # (h, w) that do not flatten into one pixel stride: copied by the launcher
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def _expected(x, r, b):
    """The kernel's math: (x + r) + b in float32 (float64 for float64), rounded once to x's dtype."""
    md = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(md) + r.to(md)
    if b is not None:
        out = out + b.to(md)[None, :, None, None]
    return out.to(x.dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nhwc", "nhwc"), ("nhwc", "nchw"), ("strided", "nhwc"),
                                     ("nhwc", "hw_transposed")], ids="-".join)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_bitwise_equals_float32_sum_rounded_once(dtype, layouts, shape):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    b = torch.randn(shape[1], generator=g).to(dtype)
    x, r = _layout(x, layouts[0]), _layout(r, layouts[1])
    out = jk.residual_add(x, r, b, backend="triton")
    assert_equal_verbose(out, _expected(x, r, b), name=f"residual_add {dtype} {layouts} {shape}")
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_equal_verbose(jk.residual_add(x, r, None, backend="triton"), _expected(x, r, None), name="no bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_is_the_reference(dtype):
    x, r = (torch.randn(2, 6, 3, 4).to(dtype).to(memory_format=CL) for _ in range(2))
    b = torch.randn(6).to(dtype)
    out = jk.residual_add(x, r, b, backend="torch")
    assert torch.equal(out, residual_add_reference(x, r, b)) and out.is_contiguous(memory_format=CL)
    assert torch.equal(jk.residual_add(x, r, b), out)  # auto on CPU: torch


@needs_triton
def test_poisoned_outputs_fully_written(monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    x, r = torch.randn(3, 70, 7, 5), torch.randn(3, 70, 7, 5)
    b = torch.randn(70)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = ra.residual_add_fwd(x, r, b)
    monkeypatch.undo()
    assert_equal_verbose(out, _expected(x, r, b), name="poisoned residual_add")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients(backend, bias):
    x, r, g = (torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3))
    b = torch.randn(5, dtype=torch.float64) if bias else None
    ins = [t.clone().requires_grad_(True) for t in (x, r, b) if t is not None]
    out = jk.residual_add(*ins, *([None] if not bias else []), backend=backend)
    got = torch.autograd.grad(out, ins, g)
    ins64 = [t.clone().requires_grad_(True) for t in (x, r, b) if t is not None]
    want = torch.autograd.grad(residual_add_reference(*ins64, *([None] if not bias else [])), ins64, g)
    for gt, wt in zip(got, want):
        assert_close_verbose(gt, wt, atol=1e-12, name=f"grad[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    ins = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((1, 3, 2, 2), (1, 3, 2, 2), (3,))]
    assert torch.autograd.gradcheck(lambda *t: jk.residual_add(*t, backend=backend), ins)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, r = torch.randn(2, 5, 3, 4, requires_grad=True), torch.randn(2, 5, 3, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    op = torch.ops.jedi.residual_add.default
    torch.library.opcheck(op, (x, r, b, backend))
    torch.library.opcheck(op, (x.detach().to(memory_format=CL), r.detach(), None, backend))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph(backend):
    ins = [torch.randn(s, requires_grad=True) for s in ((2, 6, 3, 3), (2, 6, 3, 3), (6,))]

    def f(*t):
        return jk.residual_add(*t, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*ins)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, grad)
    want = torch.autograd.grad(f(*ins), ins, grad)
    assert_close_verbose(out, f(*ins), atol=1e-6, name=f"compiled residual_add[{backend}]")
    for gt, wt in zip(got, want):
        assert_close_verbose(gt, wt, atol=1e-5, name=f"compiled grads[{backend}]")


_X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((_X[0], _X[0]), {}, ValueError, r"x must have shape \(N, C, H, W\)"),
        ((_X, _X[:, :2]), {}, ValueError, r"residual must have x's shape \(2, 3, 4, 4\)"),
        ((_X, _X.double()), {}, TypeError, "residual must have x's dtype"),
        ((_X.int(), _X.int()), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
        ((_X, _X, torch.randn(4)), {}, ValueError, r"bias must have shape \(C,\) = \(3,\)"),
        ((_X, _X, torch.randn(3).double()), {}, TypeError, "bias must have x's dtype"),
        ((_X, _X, [1.0] * 3), {}, TypeError, "bias must be a torch.Tensor or None"),
        ((_X, 1.0), {}, TypeError, "x and residual must be torch.Tensors"),
        ((_X, _X), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
    ids=["3d", "shape", "dtype", "int", "bias_shape", "bias_dtype", "bias_list", "scalar", "bad_backend"],
)
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jk.residual_add(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 16, 16), (2, 70, 5, 3)], ids=str)
def test_gpu_bitwise_and_graph_capture(dtype, shape):
    """SD's shapes channels-last (a strided GEMM output as the residual, as the transformer's proj_out gives it):
    bitwise the float32 sums rounded once; auto is Triton on CUDA; captured in a CUDA graph, the replay equals it."""
    x = torch.randn(shape, device="cuda").to(dtype).to(memory_format=CL)
    N, C, H, W = shape
    r = torch.randn(N, H * W, C, device="cuda").to(dtype).view(N, H, W, C).permute(0, 3, 1, 2)
    b = torch.randn(C, device="cuda").to(dtype)
    out = jk.residual_add(x, r, b)
    assert_equal_verbose(out, _expected(x, r, b), name=f"gpu residual_add {dtype} {shape}")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = jk.residual_add(x, r, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)
