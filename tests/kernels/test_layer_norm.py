"""jedi_kernels.add_layer_norm (residual add + LayerNorm in one pass): the sum exactly as torch's add rounds it, the
norm by the 2x rule against float64, the folded biases (shift, sum_shift) by the 2x rule, gradients against the
unfused ops' autograd, strided inputs, opcheck, compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import jedi_kernels as jk
from jedi_kernels.ops import layer_norm as ln_ops
from jedi_kernels.reference import add_layer_norm_reference
from jedi_kernels.testing import assert_close_verbose, assert_equal_verbose, assert_flash_rule

BACKENDS = ["torch"] + (["triton"] if jk.available_backends()["triton"] else [])
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# the CPU interpreter's fp32 -> bf16 cast truncates where GPUs round to nearest: bf16 runs on the GPU only
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# SD's token widths (320, 640, 1280), non-powers of two, one column, a row count that is not a multiple of BLOCK_R
SHAPES = [(2, 7, 320), (3, 5, 640), (1, 3, 1280), (4, 40), (2, 3, 5, 77), (9, 1), (1, 2, 24)]


def _inputs(shape, dtype, *, offset=0.0, affine=True):
    x = (torch.randn(shape, device=DEVICE) * 2 + offset).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    C = shape[-1]
    w, b = ((torch.randn(C, device=DEVICE).to(dtype), torch.randn(C, device=DEVICE).to(dtype)) if affine
            else (None, None))
    return x, r, w, b


def _ref64(x, r, w, b, eps):
    """float64 LayerNorm of the sum as rounded in x's dtype (the unfused ops round it there too)."""
    s = x + r if r is not None else x
    return F.layer_norm(s.double(), (s.shape[-1],), w.double() if w is not None else None,
                        b.double() if b is not None else None, eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
def test_forward_sum_exact_norm_2x_rule(backend, dtype, shape, residual):
    x, r, w, b = _inputs(shape, dtype, offset=3.0)
    r = r if residual else None
    s, n = jk.add_layer_norm(x, r, w, b, 1e-5, backend=backend)
    if residual:
        assert_equal_verbose(s, x + r, name="s")
    else:
        assert s is x
    assert n.dtype == dtype and n.shape == x.shape and n.is_contiguous()
    same = F.layer_norm(x + r if residual else x, (shape[-1],), w, b, 1e-5)
    assert_flash_rule(n, same, _ref64(x, r, w, b, 1e-5), f"add_layer_norm[{backend}] {dtype} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_and_no_affine(backend):
    x, r, _, _ = _inputs((3, 9, 48), torch.float64, affine=False)
    s, n = jk.add_layer_norm(x, r, None, None, 1e-6, backend=backend)
    assert_close_verbose(n, _ref64(x, r, None, None, 1e-6), atol=1e-12, name="fp64 n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_stable(backend):
    """Rows whose mean is 1e4 times their spread: the variance comes from the centered values, not E[x^2] - E[x]^2."""
    x = torch.randn(4, 256, device=DEVICE) * 1e-2 + 100.0
    s, n = jk.add_layer_norm(x, None, None, None, 1e-8, backend=backend)
    assert_flash_rule(n, F.layer_norm(x, (256,), eps=1e-8), _ref64(x, None, None, None, 1e-8), "offset 100")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """x a column slice of a wider tensor (row stride 2C), the residual a transposed view (copied), the outputs
    contiguous."""
    C = 40
    wide = torch.randn(6, 2 * C, device=DEVICE)
    x = wide[:, :C]
    r = torch.randn(C, 6, device=DEVICE).t()
    w, b = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    s, n = jk.add_layer_norm(x, r, w, b, backend=backend)
    rs, rn = add_layer_norm_reference(x, r, w, b)
    assert s.is_contiguous() and n.is_contiguous()
    assert_close_verbose(s, rs, atol=0, name="s strided")
    assert_close_verbose(n, rn, atol=1e-5, name="n strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outputs", ["both", "n_only", "plain"])
def test_backward_matches_unfused_autograd(backend, outputs):
    """float64 gradients of x, residual, weight and bias: ours against autograd through the unfused add + LayerNorm,
    with gradients flowing into both outputs, into n only (s unused), and without a residual."""
    x, r, w, b = _inputs((3, 5, 24), torch.float64)
    residual = outputs != "plain"
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    gs, gn = torch.randn_like(x), torch.randn_like(x)

    def loss(fn, xx, rr, ww, bb):
        s, n = fn(xx, rr if residual else None, ww, bb)
        total = (n * gn).sum()
        if outputs == "both":
            total = total + (s * gs).sum()
        return total

    ours = loss(lambda *a: jk.add_layer_norm(*a, 1e-5, backend=backend), *leaves)
    ref = loss(lambda *a: add_layer_norm_reference(*a, 1e-5), *ref_leaves)
    used = leaves if residual else [leaves[0], leaves[2], leaves[3]]
    ref_used = ref_leaves if residual else [ref_leaves[0], ref_leaves[2], ref_leaves[3]]
    for name, g, rg in zip(("x", "residual", "weight", "bias") if residual else ("x", "weight", "bias"),
                           torch.autograd.grad(ours, used), torch.autograd.grad(ref, ref_used)):
        assert_close_verbose(g, rg, atol=1e-10, name=f"d{name}")


def _shifts(C, dtype, which):
    """(shift, sum_shift) for ``which`` in "shift", "sum_shift", "both": fresh (C,) vectors in ``dtype``."""
    shift = torch.randn(C, device=DEVICE).to(dtype) if which in ("shift", "both") else None
    sum_shift = torch.randn(C, device=DEVICE).to(dtype) if which in ("sum_shift", "both") else None
    return shift, sum_shift


def _d(t):
    return t.double() if t is not None else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 320), (4, 40), (2, 3, 5, 77), (9, 1)], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
@pytest.mark.parametrize("which", ["shift", "sum_shift", "both"])
def test_shifts_2x_rule(backend, dtype, shape, residual, which):
    """The folded biases: n = layer_norm(x + residual + shift), s = that sum + sum_shift, both by the 2x rule against
    float64 (the unfused ops: the shift added to the residual first, as a GEMM's bias epilogue would)."""
    x, r, w, b = _inputs(shape, dtype, offset=3.0)
    r = r if residual else None
    shift, sum_shift = _shifts(shape[-1], dtype, which)
    s, n = jk.add_layer_norm(x, r, w, b, 1e-5, shift=shift, sum_shift=sum_shift, backend=backend)
    assert s is not x and s.shape == x.shape and s.dtype == dtype and s.is_contiguous() and n.is_contiguous()
    ts, tn = add_layer_norm_reference(x, r, w, b, 1e-5, shift=shift, sum_shift=sum_shift)
    rs, rn = add_layer_norm_reference(_d(x), _d(r), _d(w), _d(b), 1e-5, shift=_d(shift), sum_shift=_d(sum_shift))
    name = f"add_layer_norm[{backend}] {which} {dtype} {shape}"
    assert_flash_rule(n, tn, rn, f"{name} n")
    assert_flash_rule(s, ts, rs, f"{name} s")
    if which == "sum_shift":  # the norm reads the sum without sum_shift: n is the plain add + LayerNorm's
        assert_equal_verbose(n, jk.add_layer_norm(x, r, w, b, 1e-5, backend=backend)[1], name=f"{name} n unshifted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifts_are_not_mixed_up_by_launch_plans(backend):
    """One input shape called without, then with each vector, then without again (an eager launch plan is keyed by
    which vectors are present): every call equals its own reference."""
    x, r, w, b = _inputs((3, 4, 48), torch.float32)
    shift, sum_shift = _shifts(48, torch.float32, "both")
    for kw in ({}, dict(shift=shift), dict(sum_shift=sum_shift), dict(shift=shift, sum_shift=sum_shift), {}):
        s, n = jk.add_layer_norm(x, r, w, b, 1e-5, backend=backend, **kw)
        rs, rn = add_layer_norm_reference(x, r, w, b, 1e-5, **kw)
        assert_close_verbose(s, rs, atol=1e-5, name=f"s {sorted(kw)}")
        assert_close_verbose(n, rn, atol=1e-5, name=f"n {sorted(kw)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
def test_shift_gradients(backend, path, residual):
    """float64 gradients of every input, shift and sum_shift included, with gradients into both outputs: ours (the
    eager autograd.Function, or the custom op under torch.compile) against autograd through the reference."""
    x, r, w, b = _inputs((3, 5, 24), torch.float64)
    shift, sum_shift = _shifts(24, torch.float64, "both")
    inputs = [x, r if residual else None, w, b, shift, sum_shift]
    gs, gn = torch.randn_like(x), torch.randn_like(x)

    def loss(fn, xx, rr, ww, bb, sh, ss):
        s, n = fn(xx, rr, ww, bb, sh, ss)
        return (n * gn).sum() + (s * gs).sum()

    def ours(xx, rr, ww, bb, sh, ss):
        return jk.add_layer_norm(xx, rr, ww, bb, 1e-5, shift=sh, sum_shift=ss, backend=backend)

    if path == "compiled":
        ours = torch.compile(ours, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    got = torch.autograd.grad(loss(ours, *leaves), [t for t in leaves if t is not None])
    want = torch.autograd.grad(
        loss(lambda xx, rr, ww, bb, sh, ss: add_layer_norm_reference(xx, rr, ww, bb, 1e-5, shift=sh, sum_shift=ss),
             *ref_leaves), [t for t in ref_leaves if t is not None])
    names = [n for n, t in zip(("x", "residual", "weight", "bias", "shift", "sum_shift"), inputs) if t is not None]
    for name, g, rg in zip(names, got, want):
        assert_close_verbose(g, rg, atol=1e-10, name=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, r, w, b = _inputs((2, 3, 16), torch.float32)
    torch.library.opcheck(torch.ops.jedi.add_layer_norm.default, (x, r, w, b, 1e-5, backend))
    torch.library.opcheck(torch.ops.jedi.add_layer_norm.default, (x, None, None, None, 1e-6, backend))
    shift = torch.randn(16, device=DEVICE)
    torch.library.opcheck(torch.ops.jedi.add_layer_norm.default, (x, r, w, b, 1e-5, backend, shift))
    torch.library.opcheck(torch.ops.jedi.add_layer_norm.default, (x, None, w, None, 1e-5, backend, shift))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x, r, w, b = _inputs((2, 3, 16), torch.float32)

    def f(x, r):
        s, n = jk.add_layer_norm(x, r, w, b, backend=backend)
        return s * 2 + n

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r)
    assert_close_verbose(out, f(x, r), atol=1e-6, name="compiled add_layer_norm")


@needs_triton
def test_row_width_limit():
    x = torch.randn(1, ln_ops.MAX_C + 1, device=DEVICE)
    with pytest.raises(ValueError, match="at most 16384"):
        jk.add_layer_norm(x, backend="triton")
    s, n = jk.add_layer_norm(x, backend="torch")  # the torch backend has no limit
    assert n.shape == x.shape


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(3, dtype=torch.int32)), TypeError, "float16, bfloat16"),
    (dict(x=torch.zeros(3, 0)), ValueError, "C > 0"),
    (dict(residual=torch.zeros(2, 5)), ValueError, "residual must have x's shape"),
    (dict(residual=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "residual must have x's dtype"),
    (dict(weight=torch.zeros(5)), ValueError, r"weight must have shape \(C,\)"),
    (dict(bias=torch.zeros(4, dtype=torch.float16)), TypeError, "bias must be a tensor of x's dtype"),
    (dict(eps=-1.0), ValueError, "eps must be a non-negative"),
    (dict(shift=torch.zeros(2, 4)), ValueError, r"shift must have shape \(C,\)"),
    (dict(sum_shift=torch.zeros(4, dtype=torch.float64)), TypeError, "sum_shift must be a tensor of x's dtype"),
    (dict(shift="0"), TypeError, "shift must be a tensor"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(x=torch.zeros(2, 4), residual=None, weight=None, bias=None, eps=1e-5, backend="torch", shift=None,
                sum_shift=None)
    args.update(kwargs)
    keywords = {k: args.pop(k) for k in ("backend", "shift", "sum_shift")}
    with pytest.raises(exc, match=match):
        jk.add_layer_norm(*args.values(), **keywords)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 4096, 320), (4, 1024, 640), (4, 256, 1280), (4, 64, 1280)], ids=str)
def test_gpu_sd_shapes(dtype, shape):
    """SD's token tensors at UNet batch 4: the sum bit for bit as torch's add, the norm by the 2x rule."""
    x, r, w, b = _inputs(shape, dtype)
    s, n = jk.add_layer_norm(x, r, w, b, backend="triton")
    assert_equal_verbose(s, x + r, name="s")
    assert_flash_rule(n, F.layer_norm(x + r, (shape[-1],), w, b), _ref64(x, r, w, b, 1e-5), f"{dtype} {shape}")
    shift, sum_shift = _shifts(shape[-1], dtype, "both")
    s, n = jk.add_layer_norm(x, r, w, b, shift=shift, sum_shift=sum_shift, backend="triton")
    ts, tn = add_layer_norm_reference(x, r, w, b, shift=shift, sum_shift=sum_shift)
    rs, rn = add_layer_norm_reference(_d(x), _d(r), _d(w), _d(b), shift=_d(shift), sum_shift=_d(sum_shift))
    assert_flash_rule(n, tn, rn, f"shifted {dtype} {shape} n")
    assert_flash_rule(s, ts, rs, f"shifted {dtype} {shape} s")
