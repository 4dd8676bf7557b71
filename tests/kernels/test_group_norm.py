"""jedi_kernels.group_norm (GroupNorm + optional SiLU, split reductions): values and grads against the float64
reference, both layouts, the split plan, multi-split merging, opcheck, compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import jedi_kernels as jk
from jedi_kernels.ops import group_norm as gn_ops
from jedi_kernels.reference import group_norm_reference
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule

BACKENDS = ["torch"] + (["triton"] if jk.available_backends()["triton"] else [])
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")

# (shape, num_groups): SD-like group widths (C/G = 20, 40), a group of one channel, odd spatial sizes, 1x1 images
SHAPES = [
    ((2, 64, 8, 8), 32),
    ((3, 20, 5, 7), 4),
    ((1, 96, 1, 1), 32),
    ((2, 1, 3, 3), 1),
    ((2, 640, 4, 4), 32),
    ((1, 1280, 2, 3), 32),
    ((1, 32, 1, 1), 32),  # one element per group: y = bias (F.group_norm refuses it; the reference does not)
    ((2, 9, 13, 11), 3),
]


def _x(shape, dtype, layout, offset=0.0):
    x = torch.randn(shape) * 2 + offset
    x = x.to(dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]  # every other column of a wider tensor: neither NCHW nor NHWC
    return x


def _affine(C, affine):
    if not affine:
        return None, None
    return torch.randn(C), torch.randn(C)


def _bf16_truncated(y32: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: what the Triton 3.6 interpreter's ``.to(tl.bfloat16)`` does (a GPU rounds to
    nearest). Under the interpreter the 2x rule measures against this, so it still checks all the math."""
    return (y32.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _same_dtype(backend, x, *args):
    """torch's answer in x's dtype (GroupNorm32: fp32 math, one rounding), as the backend rounds."""
    if backend == "triton" and x.dtype == torch.bfloat16 and jk.available_backends()["triton_interpreter"]:
        return _bf16_truncated(group_norm_reference(x.float(), *args))
    return group_norm_reference(x, *args)


def _is_layout(y, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.is_contiguous(memory_format=torch.channels_last)
    return y.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,G", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm_silu"])
def test_forward_fp64(backend, shape, G, layout, silu):
    x = _x(shape, torch.float64, layout, offset=3.0)
    w, b = _affine(shape[1], True)
    y = jk.group_norm(x, G, w, b, 1e-5, silu=silu, backend=backend)
    ref = group_norm_reference(x, G, w.double(), b.double(), 1e-5, silu)
    assert y.dtype == torch.float64 and _is_layout(y, x)
    assert_close_verbose(y, ref, atol=1e-12, name=f"group_norm[{backend}] fp64")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,G", [SHAPES[0], SHAPES[1], SHAPES[4]], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_forward_2x_rule(backend, dtype, shape, G, affine):
    x = _x(shape, dtype, "nhwc")
    w, b = _affine(shape[1], affine)
    y = jk.group_norm(x, G, w, b, 1e-6, silu=True, backend=backend)
    ref64 = group_norm_reference(x.double(), G, None if w is None else w.double(), None if b is None else b.double(),
                                 1e-6, True)
    same = _same_dtype(backend, x, G, w, b, 1e-6, True)
    assert y.dtype == dtype
    assert_flash_rule(y, same, ref64, f"group_norm[{backend}] {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_stable(backend):
    """A group whose mean is 1e4 times its spread: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance."""
    x = (torch.randn(2, 32, 16, 16) * 1e-2 + 100.0).to(memory_format=torch.channels_last)
    y = jk.group_norm(x, 8, None, None, 1e-8, backend=backend)
    ref = group_norm_reference(x.double(), 8, None, None, 1e-8)
    same = F.group_norm(x, 8, eps=1e-8)
    assert_flash_rule(y, same, ref, f"group_norm[{backend}] offset 100")


@needs_triton
def test_large_mean_is_stable_with_several_tiles_per_split(monkeypatch):
    """The same offset-100 group when each split streams several tiles (every element's running Welford mean moves
    over a few tiles before the rows merge): pretend to have one SM, so the plan puts 2 tiles in each split."""
    monkeypatch.setattr(gn_ops, "_num_sms", lambda device: 1)
    plan = gn_ops.split_plan(2, 32, 32 * 32, 1)
    assert plan["tiles_per_split"] > 1
    x = (torch.randn(2, 32, 32, 32) * 1e-2 + 100.0).to(memory_format=torch.channels_last)
    y = jk.group_norm(x, 8, None, None, 1e-8, backend="triton")
    ref = group_norm_reference(x.double(), 8, None, None, 1e-8)
    same = F.group_norm(x, 8, eps=1e-8)
    assert_flash_rule(y, same, ref, "group_norm[triton] offset 100, several tiles per split")


@needs_triton
def test_split_plan_covers_every_pixel_once():
    for N, C, HW, sms in [(4, 320, 4096, 132), (1, 32, 1, 132), (8, 2560, 64, 132), (2, 9, 143, 4), (1, 64, 1023, 132),
                          (16, 1280, 256, 108)]:
        p = gn_ops.split_plan(N, C, HW, sms)
        assert 1 <= p["split"] <= 64
        assert p["BLOCK_C"] >= min(C, 64) and p["n_cblk"] * p["BLOCK_C"] >= C
        assert (p["split"] - 1) * p["tiles_per_split"] < p["n_ptiles"] <= p["split"] * p["tiles_per_split"]
        assert p["n_ptiles"] * p["BLOCK_P"] >= HW > (p["n_ptiles"] - 1) * p["BLOCK_P"]
    # the SD case the split exists for: 64x64 latents, 320 channels, batch 4 -> well over one program per SM
    p = gn_ops.split_plan(4, 320, 4096, 132)
    assert 4 * p["n_cblk"] * p["split"] >= 132


@needs_triton
@pytest.mark.parametrize("shape", [(1, 32, 32, 32), (2, 40, 33, 31)], ids=str)
def test_many_splits_merge_exactly(monkeypatch, shape):
    """Pretend to be an H100 (132 SMs) so the interpreter runs the multi-split merge, uneven last split included."""
    monkeypatch.setattr(gn_ops, "_num_sms", lambda device: 132)
    N, C, H, W = shape
    plan = gn_ops.split_plan(N, C, H * W, 132)
    assert plan["split"] > 1
    x = _x(shape, torch.float64, "nhwc", offset=-2.0)
    w, b = _affine(C, True)
    y = jk.group_norm(x, 4, w, b, 1e-5, silu=True, backend="triton")
    ref = group_norm_reference(x, 4, w.double(), b.double(), 1e-5, True)
    assert_close_verbose(y, ref, atol=1e-12, name=f"group_norm split={plan['split']}")


@needs_triton
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_short_last_tile_after_full_tiles_of_its_split(monkeypatch, grad):
    """A split whose last tile is cut short by the image's end, after full tiles of the same split: the rows past
    the end must leave their running (mean, M2) and sums untouched (with one tile per split, as above, they only
    ever hold zeros). Pretend to have 8 SMs: 1023 pixels in 32 tiles of 32, 2 tiles per split."""
    monkeypatch.setattr(gn_ops, "_num_sms", lambda device: 8)
    shape = (2, 40, 33, 31)
    plan = gn_ops.split_plan(2, 40, 33 * 31, 8)
    assert plan["tiles_per_split"] > 1 and (33 * 31) % plan["BLOCK_P"] and plan["split"] > 1
    x = _x(shape, torch.float64, "nhwc", offset=3.0).requires_grad_(grad)
    w, b = _affine(40, True)
    w, b = w.double().requires_grad_(grad), b.double().requires_grad_(grad)
    y = jk.group_norm(x, 4, w, b, 1e-5, silu=True, backend="triton")
    ref = group_norm_reference(x, 4, w, b, 1e-5, True)
    assert_close_verbose(y, ref, atol=1e-12, name="short last tile")
    if grad:
        gy = torch.randn(shape, dtype=torch.float64)
        ours = torch.autograd.grad(y, (x, w, b), gy)
        refs = torch.autograd.grad(ref, (x, w, b), gy)
        for name, o, r in zip(("dx", "dweight", "dbias"), ours, refs):
            assert_close_verbose(o, r, atol=1e-11 * max(1.0, float(r.abs().max())), name=f"{name} short last tile")


@needs_triton
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_backward_many_splits_exact_fp64(monkeypatch, affine):
    """The Triton backward's per-channel partial sums merged across several splits (H100-sized plan), uneven tail."""
    monkeypatch.setattr(gn_ops, "_num_sms", lambda device: 132)
    shape = (2, 40, 33, 31)
    assert gn_ops.split_plan(2, 40, 33 * 31, 132)["split"] > 1
    x = _x(shape, torch.float64, "nhwc", offset=1.5).requires_grad_()
    w, b = (torch.randn(40, dtype=torch.float64, requires_grad=True) for _ in range(2)) if affine else (None, None)
    gy = torch.randn(shape, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    ours = torch.autograd.grad(jk.group_norm(x, 4, w, b, 1e-5, silu=True, backend="triton"), leaves, gy)
    ref = torch.autograd.grad(group_norm_reference(x, 4, w, b, 1e-5, True), leaves, gy)
    for name, o, r in zip(("dx", "dweight", "dbias"), ours, ref):
        assert_close_verbose(o, r, atol=1e-11 * max(1.0, float(r.abs().max())), name=f"{name} split")
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    x = _x((2, 8, 3, 4), torch.float32, "nhwc")
    g = torch.randn(2, 8, 3, 4).to(memory_format=torch.channels_last)
    w, b = torch.randn(8), torch.randn(8)
    torch.library.opcheck(torch.ops.jedi.group_norm_backward.default, (g, x, 4, w, b, 1e-5, True, backend))
    torch.library.opcheck(torch.ops.jedi.group_norm_backward.default, (g.contiguous(), x.contiguous(), 2, None, None,
                                                                       1e-6, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("silu", [False, True], ids=["norm", "norm_silu"])
def test_backward_2x_rule(backend, dtype, silu):
    shape, G = (2, 40, 5, 6), 4
    x = _x(shape, dtype, "nhwc")
    w, b = torch.randn(40), torch.randn(40)
    gy = torch.randn(shape).to(dtype)

    def grads(fn, xx, ww, bb):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (xx, ww, bb))
        fn(xx, ww, bb).backward(gy.to(xx.dtype))
        return xx.grad, ww.grad, bb.grad

    ours = grads(lambda a, c, d: jk.group_norm(a, G, c, d, 1e-5, silu=silu, backend=backend), x, w, b)
    ref = grads(lambda a, c, d: group_norm_reference(a, G, c, d, 1e-5, silu), x.double(), w.double(), b.double())
    same = grads(lambda a, c, d: group_norm_reference(a, G, c, d, 1e-5, silu), x, w, b)
    for name, o, r, s in zip(("dx", "dweight", "dbias"), ours, ref, same):
        assert o.dtype == s.dtype
        assert_flash_rule(o, s, r, f"group_norm[{backend}] {name} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = _x((2, 8, 3, 4), torch.float64, "nhwc").requires_grad_()
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: jk.group_norm(a, 4, c, d, 1e-5, silu=True, backend=backend),
                                    (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = _x((2, 8, 3, 4), torch.float32, "nhwc")
    w, b = torch.randn(8), torch.randn(8)
    torch.library.opcheck(torch.ops.jedi.group_norm.default, (x, 4, w, b, 1e-5, True, backend))
    torch.library.opcheck(torch.ops.jedi.group_norm.default, (x.contiguous(), 2, None, None, 1e-6, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x = _x((2, 8, 4, 4), torch.float32, "nhwc")
    w, b = torch.randn(8), torch.randn(8)

    def f(x):
        return jk.group_norm(x, 4, w, b, 1e-5, silu=True, backend=backend) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert_close_verbose(out, f(x), atol=1e-6, name="compiled group_norm")


def test_auto_on_cpu_is_torch():
    x = _x((1, 4, 2, 2), torch.float32, "nchw")
    assert torch.equal(jk.group_norm(x, 2), jk.group_norm(x, 2, backend="torch"))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x: jk.group_norm(x.numpy(), 4), TypeError, "x must be a torch.Tensor"),
        (lambda x: jk.group_norm(x[0], 4), ValueError, r"x must have shape \(N, C, H, W\)"),
        (lambda x: jk.group_norm(x.int(), 4), TypeError, "x must be float16"),
        (lambda x: jk.group_norm(x, 3), ValueError, "num_groups must be a positive int dividing C = 8"),
        (lambda x: jk.group_norm(x, 0), ValueError, "num_groups"),
        (lambda x: jk.group_norm(x, 4, torch.ones(7)), ValueError, r"weight must have shape \(C,\) = \(8,\)"),
        (lambda x: jk.group_norm(x, 4, None, torch.ones(8, dtype=torch.int64)), TypeError, "bias must be a float"),
        (lambda x: jk.group_norm(x, 4, eps=-1.0), ValueError, "eps must be a non-negative"),
        (lambda x: jk.group_norm(x[:0], 4), ValueError, "x must be non-empty"),
        (lambda x: jk.group_norm(x, 4, backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 8, 3, 3))


# ---- shift: group_norm(x + shift[:, :, None, None]) without the sum (a ResBlock's time embedding) -------------------
def _shift(shape, dtype=torch.float64, scale=3.0):
    """Per-(image, channel) shifts that differ across the channels of a group (so they change its variance)."""
    return torch.randn(shape[:2], dtype=torch.float64).mul(scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,G", [SHAPES[1], SHAPES[2], SHAPES[6], SHAPES[7]], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_shift_forward_fp64(backend, shape, G, layout):
    x = _x(shape, torch.float64, layout, offset=1.0)
    w, b = (t.double() for t in _affine(shape[1], True))
    sh = _shift(shape)
    y = jk.group_norm(x, G, w, b, 1e-5, silu=True, shift=sh, backend=backend)
    ref = group_norm_reference(x + sh[:, :, None, None], G, w, b, 1e-5, True)
    assert _is_layout(y, x)
    assert_close_verbose(y, ref, atol=1e-12, name=f"group_norm[{backend}] shift fp64")
    assert_close_verbose(group_norm_reference(x, G, w, b, 1e-5, True, sh), ref, atol=1e-12, name="reference shift")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_shift_2x_rule(backend, dtype):
    """Against the float64 reference; the same-dtype torch answer adds the shift in x's dtype first (what the model
    computes unfused), the fused op adds it unrounded."""
    shape, G = (2, 40, 5, 6), 4
    x = _x(shape, dtype, "nhwc")
    w, b = _affine(40, True)
    sh = _shift(shape, dtype)
    y = jk.group_norm(x, G, w, b, 1e-5, silu=True, shift=sh, backend=backend)
    ref64 = group_norm_reference(x.double(), G, w.double(), b.double(), 1e-5, True, sh.double())
    same = _same_dtype(backend, x + sh[:, :, None, None], G, w, b, 1e-5, True)
    assert y.dtype == dtype
    assert_flash_rule(y, same, ref64, f"group_norm[{backend}] shift {dtype}")


@needs_triton
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_shift_strided_rows_read_in_place(monkeypatch, grad):
    """A shift that is a column slice of a wider (N, S) tensor (as jedi.unet.TimeEmb hands every ResBlock its slice
    of one GEMM) is read through its row stride, not copied; results as for a contiguous one."""
    shape = (2, 40, 5, 7)
    x = _x(shape, torch.float64, "nhwc").requires_grad_(grad)
    wide = torch.randn(2, 100, dtype=torch.float64)
    sh = wide[:, 30:70].requires_grad_(False)
    if grad:
        wide.requires_grad_()
        sh = wide[:, 30:70]
    assert not sh.is_contiguous() and sh.stride(1) == 1
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or real(t, *a, **k))
    y = jk.group_norm(x, 4, None, None, 1e-5, silu=True, shift=sh, backend="triton")
    monkeypatch.setattr(torch.Tensor, "contiguous", real)
    assert tuple(sh.shape) not in copies
    ref = group_norm_reference(x + sh[:, :, None, None], 4, None, None, 1e-5, True)
    assert_close_verbose(y, ref, atol=1e-12, name="strided shift")
    if grad:
        gy = torch.randn(shape, dtype=torch.float64)
        ours = torch.autograd.grad(y, (x, wide), gy)
        refs = torch.autograd.grad(ref, (x, wide), gy)
        for o, r in zip(ours, refs):
            assert_close_verbose(o, r, atol=1e-11 * max(1.0, float(r.abs().max())), name="strided shift grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_in_another_dtype(backend):
    """A float32 shift on float16 activations (autocast hands the model such pairs): used in the math dtype, its
    gradient comes back in its own dtype."""
    shape = (2, 40, 5, 6)
    x = _x(shape, torch.float16, "nhwc")
    sh = _shift(shape, torch.float32).requires_grad_()
    y = jk.group_norm(x, 4, None, None, 1e-5, shift=sh, backend=backend)
    ref64 = group_norm_reference(x.double(), 4, None, None, 1e-5, False, sh.detach().double())
    same = group_norm_reference(x, 4, None, None, 1e-5, False, sh.detach())
    assert y.dtype == torch.float16
    assert_flash_rule(y, same, ref64, f"group_norm[{backend}] fp32 shift on fp16 x")
    (g,) = torch.autograd.grad(y.float().sum(), sh)
    assert g.dtype == torch.float32 and g.shape == sh.shape and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_shift_gradients_fp64(backend, affine):
    """dx, dweight, dbias and dshift against autograd through the reference (x + shift materialized)."""
    shape = (2, 40, 5, 7)
    x = _x(shape, torch.float64, "nhwc", offset=0.5).requires_grad_()
    sh = _shift(shape).requires_grad_()
    w, b = (torch.randn(40, dtype=torch.float64, requires_grad=True) for _ in range(2)) if affine else (None, None)
    gy = torch.randn(shape, dtype=torch.float64)
    leaves = [t for t in (x, w, b, sh) if t is not None]
    ours = torch.autograd.grad(jk.group_norm(x, 4, w, b, 1e-5, silu=True, shift=sh, backend=backend), leaves, gy)
    ref = torch.autograd.grad(group_norm_reference(x + sh[:, :, None, None], 4, w, b, 1e-5, True), leaves, gy)
    for o, r in zip(ours, ref):
        assert_close_verbose(o, r, atol=1e-11 * max(1.0, float(r.abs().max())), name=f"grad shift[{backend}]")
    assert ours[-1].shape == sh.shape
    # a shift that needs no gradient: only x's (and the parameters') come back
    gx = torch.autograd.grad(jk.group_norm(x, 4, w, b, 1e-5, shift=sh.detach(), backend=backend).sum(), x)[0]
    assert torch.isfinite(gx).all()


@needs_triton
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_shift_many_splits_exact_fp64(monkeypatch, grad):
    """The shift through the multi-split path (H100-sized plan, uneven last split): the partial means it moves and
    the per-channel means the backward's dshift reads are merged across splits."""
    monkeypatch.setattr(gn_ops, "_num_sms", lambda device: 132)
    shape = (2, 40, 33, 31)
    assert gn_ops.split_plan(2, 40, 33 * 31, 132)["split"] > 1
    x = _x(shape, torch.float64, "nhwc", offset=-1.0).requires_grad_(grad)
    sh = _shift(shape, scale=20.0).requires_grad_(grad)
    w, b = (torch.randn(40, dtype=torch.float64, requires_grad=grad) for _ in range(2))
    y = jk.group_norm(x, 4, w, b, 1e-5, silu=True, shift=sh, backend="triton")
    ref = group_norm_reference(x + sh[:, :, None, None], 4, w, b, 1e-5, True)
    assert_close_verbose(y, ref, atol=1e-12, name="shift, many splits")
    if grad:
        gy = torch.randn(shape, dtype=torch.float64)
        ours = torch.autograd.grad(y, (x, w, b, sh), gy)
        refs = torch.autograd.grad(ref, (x, w, b, sh), gy)
        for name, o, r in zip(("dx", "dweight", "dbias", "dshift"), ours, refs):
            assert_close_verbose(o, r, atol=1e-11 * max(1.0, float(r.abs().max())), name=f"{name} many splits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_gradcheck_and_opcheck(backend):
    x = _x((2, 8, 3, 4), torch.float64, "nhwc").requires_grad_()
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    sh = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, c, d: jk.group_norm(a, 4, c, None, 1e-5, silu=True, shift=d, backend=backend), (x, w, sh))
    x32, w32, sh32 = (t.detach().float() for t in (x, w, sh))
    torch.library.opcheck(torch.ops.jedi.group_norm.default, (x32, 4, w32, None, 1e-5, True, backend, sh32))
    g = torch.randn(2, 8, 3, 4).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.jedi.group_norm_backward.default,
                          (g, x32, 4, w32, None, 1e-5, True, backend, sh32))


@pytest.mark.parametrize(
    "shift,exc,match",
    [
        (torch.zeros(2, 7), ValueError, r"shift must have shape \(N, C\) = \(2, 8\)"),
        (torch.zeros(2, 8, 1, 1), ValueError, r"shift must have shape \(N, C\)"),
        (torch.zeros(2, 8, dtype=torch.int64), TypeError, "shift must be a float tensor"),
        ([0.0] * 16, TypeError, "shift must be a float tensor"),
    ],
    ids=["short", "4d", "int", "list"],
)
def test_shift_bad_inputs(shift, exc, match):
    with pytest.raises(exc, match=match):
        jk.group_norm(torch.randn(2, 8, 3, 3), 4, shift=shift)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 16, 16), (4, 1280, 8, 8)], ids=str)
def test_gpu_shift_sd_shapes(dtype, shape):
    """The ResBlock's second norm with its time embedding folded in: forward and all four grads, 2x rule."""
    x = _x(shape, dtype, "nhwc", offset=0.5).cuda()
    w, b = (t.cuda() for t in _affine(shape[1], True))
    sh = _shift(shape, dtype).cuda()
    gy = torch.randn(shape, device="cuda").to(dtype)

    def run(fn, xx, ww, bb, ss):
        xx, ww, bb, ss = (t.detach().clone().requires_grad_() for t in (xx, ww, bb, ss))
        y = fn(xx, ww, bb, ss)
        return (y.detach(),) + torch.autograd.grad(y, (xx, ww, bb, ss), gy.to(xx.dtype))

    ours = run(lambda a, c, d, e: jk.group_norm(a, 32, c, d, 1e-5, silu=True, shift=e, backend="triton"), x, w, b, sh)
    ref = run(lambda a, c, d, e: group_norm_reference(a + e[:, :, None, None], 32, c, d, 1e-5, True),
              x.double(), w.double(), b.double(), sh.double())
    same = run(lambda a, c, d, e: group_norm_reference(a + e[:, :, None, None], 32, c, d, 1e-5, True), x, w, b, sh)
    for name, o, r, sm in zip(("y", "dx", "dweight", "dbias", "dshift"), ours, ref, same):
        assert_flash_rule(o, sm, r, f"group_norm gpu shift {name} {shape} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 640, 32, 32), (4, 2560, 16, 16), (8, 1280, 8, 8),
                                   (4, 960, 64, 64), (1, 32, 1, 1)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_sd_shapes(dtype, shape, layout):
    x = _x(shape, dtype, layout, offset=1.0).cuda()
    w, b = (t.cuda() for t in _affine(shape[1], True))
    for silu in (False, True):
        y = jk.group_norm(x, 32, w, b, 1e-5, silu=silu, backend="triton")
        ref64 = group_norm_reference(x.double(), 32, w.double(), b.double(), 1e-5, silu)
        same = group_norm_reference(x, 32, w, b, 1e-5, silu)
        assert _is_layout(y, x)
        assert_flash_rule(y, same, ref64, f"group_norm gpu {shape} {dtype} {layout} silu={silu}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 2560, 16, 16), (8, 1280, 8, 8), (2, 64, 33, 31)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_backward_sd_shapes(dtype, shape, layout):
    """The Triton backward (dx, dweight, dbias) at SD shapes against autograd of the float64 reference, 2x rule."""
    x = _x(shape, dtype, layout, offset=0.5).cuda()
    w, b = (t.cuda() for t in _affine(shape[1], True))
    gy = torch.randn(shape, device="cuda").to(dtype)

    def grads(fn, xx, ww, bb):
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (xx, ww, bb))
        return torch.autograd.grad(fn(xx, ww, bb), (xx, ww, bb), gy.to(xx.dtype))

    ours = grads(lambda a, c, d: jk.group_norm(a, 32, c, d, 1e-5, silu=True, backend="triton"), x, w, b)
    ref = grads(lambda a, c, d: group_norm_reference(a, 32, c, d, 1e-5, True), x.double(), w.double(), b.double())
    same = grads(lambda a, c, d: group_norm_reference(a, 32, c, d, 1e-5, True), x, w, b)
    assert _is_layout(ours[0], x)
    for name, o, r, sm in zip(("dx", "dweight", "dbias"), ours, ref, same):
        assert_flash_rule(o, sm, r, f"group_norm gpu {name} {shape} {dtype} {layout}")


@pytest.mark.gpu
def test_gpu_backward_and_graph_capture():
    x = _x((2, 320, 16, 16), torch.float16, "nhwc").cuda().requires_grad_()
    w = torch.randn(320, device="cuda", requires_grad=True)
    jk.group_norm(x, 32, w, None, 1e-5, silu=True, backend="triton").float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    xs = x.detach().clone()
    out = jk.group_norm(xs, 32, w.detach(), None, 1e-5, silu=True, backend="triton")  # warm-up compiles
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = jk.group_norm(xs, 32, w.detach(), None, 1e-5, silu=True, backend="triton")
    xs.normal_()
    g.replay()
    ref = group_norm_reference(xs, 32, w.detach(), None, 1e-5, True)
    assert_close_verbose(out, ref, atol=2e-2, name="replayed group_norm")


# ---- concat: the norm of cat([x, concat], dim=1) without the concatenation (SD's decoder ResBlocks) ---------------
def _cat_inputs(N, C1, C2, H, W, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, x2 = (torch.randn(N, c, H, W, generator=g).to(dtype) for c in (C1, C2))
    if layout == "nhwc":
        x, x2 = x.to(memory_format=torch.channels_last), x2.to(memory_format=torch.channels_last)
    C = C1 + C2
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    sh = torch.randn(N, C, generator=g).to(dtype)
    return x, x2, w, b, sh


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
# groups that straddle the halves' boundary (C1 = 6, 4 channels a group), SD-like 64-channel blocks, a 1x1 image,
# halves of different widths
@pytest.mark.parametrize("dims", [(2, 6, 10, 3, 5, 4), (1, 64, 64, 4, 4, 32), (2, 40, 24, 8, 8, 32),
                                  (1, 3, 5, 1, 1, 8)], ids=str)
def test_concat_bitwise_equals_the_concatenation(backend, dtype, layout, dims):
    """In inference the kernels read both halves in place: bitwise the output of the same norm of torch.cat, with
    shift, affine and SiLU, in the first half's layout."""
    N, C1, C2, H, W, G = dims
    x, x2, w, b, sh = _cat_inputs(N, C1, C2, H, W, dtype, layout)
    with torch.no_grad():
        out = jk.group_norm(x, G, w, b, 1e-5, silu=True, shift=sh, concat=x2, backend=backend)
        ref = jk.group_norm(torch.cat([x, x2], dim=1), G, w, b, 1e-5, silu=True, shift=sh, backend=backend)
    assert out.shape == (N, C1 + C2, H, W) and torch.equal(out, ref)
    if H * W > 1 and layout == "nhwc":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
def test_concat_reads_the_halves_in_place_and_keys_its_launch_plan(monkeypatch):
    """No torch.cat on the Triton inference path; a second call with another second half (width, layout) gets its
    own launch plan, not the first call's."""
    x, x2, w, b, sh = _cat_inputs(2, 8, 8, 4, 4, torch.float32, "nhwc")
    real_cat = torch.cat

    def no_cat(*a, **k):
        raise AssertionError("concatenated")

    with torch.no_grad():
        monkeypatch.setattr(torch, "cat", no_cat)
        first = jk.group_norm(x, 4, w, b, concat=x2, backend="triton")
        again = jk.group_norm(x, 4, w, b, concat=x2 * 2, backend="triton")
        wider = torch.randn(2, 24, 4, 4).to(memory_format=torch.channels_last)
        w32 = torch.randn(32)
        third = jk.group_norm(x, 4, w32, None, concat=wider, backend="triton")
        fourth = jk.group_norm(x, 4, w, b, concat=x2.contiguous(), backend="triton")
        monkeypatch.setattr(torch, "cat", real_cat)
        assert torch.equal(first, jk.group_norm(torch.cat([x, x2], 1), 4, w, b, backend="triton"))
        assert torch.equal(again, jk.group_norm(torch.cat([x, 2 * x2], 1), 4, w, b, backend="triton"))
        assert torch.equal(third, jk.group_norm(torch.cat([x, wider], 1), 4, w32, None, backend="triton"))
        assert torch.equal(fourth, first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_gradients_reach_both_halves(backend):
    """With autograd the halves are concatenated first (the differentiable path): both get their gradients, equal to
    those of the norm of the concatenation in float64."""
    x, x2, w, b, sh = _cat_inputs(2, 6, 10, 3, 5, torch.float64, "nhwc")
    ins = [t.clone().requires_grad_(True) for t in (x, x2, w, b, sh)]
    out = jk.group_norm(ins[0], 4, ins[2], ins[3], silu=True, shift=ins[4], concat=ins[1], backend=backend)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, g)
    ref_ins = [t.clone().requires_grad_(True) for t in (x, x2, w, b, sh)]
    ref = group_norm_reference(torch.cat(ref_ins[:2], 1), 4, ref_ins[2], ref_ins[3], 1e-5, True, ref_ins[4])
    want = torch.autograd.grad(ref, ref_ins, g)
    for gt, wt in zip(got, want):
        assert_close_verbose(gt, wt, atol=1e-10, name=f"concat grads[{backend}]")


@pytest.mark.parametrize(
    "concat, kw, exc, match",
    [
        (torch.randn(2, 4, 3, 3), {}, ValueError, r"concat must have shape \(N, C2, H, W\) = \(2, C2, 4, 4\)"),
        (torch.randn(1, 4, 4, 4), {}, ValueError, r"concat must have shape"),
        (torch.randn(2, 4, 4, 4).double(), {}, TypeError, "concat must have x's dtype"),
        ([1.0], {}, TypeError, "concat must be a torch.Tensor"),
        (torch.randn(2, 2, 4, 4), {}, ValueError, r"num_groups must be a positive int dividing C = 10"),
        (torch.randn(2, 4, 4, 4), {"weight": torch.randn(8)}, ValueError, r"weight must have shape \(C,\) = \(12,\)"),
        (torch.randn(2, 4, 4, 4), {"shift": torch.randn(2, 8)}, ValueError, r"shift must have shape \(N, C\) = \(2, 12\)"),
    ],
    ids=["hw", "n", "dtype", "list", "groups", "weight", "shift"],
)
def test_concat_bad_inputs(concat, kw, exc, match):
    with pytest.raises(exc, match=match):
        jk.group_norm(torch.randn(2, 8, 4, 4), 4, concat=concat, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(4, 640, 320, 64, 64), (4, 1280, 640, 32, 32), (4, 1280, 1280, 8, 8)], ids=str)
def test_gpu_concat_sd_decoder_shapes(dtype, dims):
    """SD's decoder concatenations (1920 = 1280 + 640 straddles a group boundary): bitwise the norm of torch.cat."""
    N, C1, C2, H, W = dims
    x, x2, w, b, sh = (t.cuda() for t in _cat_inputs(N, C1, C2, H, W, dtype, "nhwc"))
    with torch.no_grad():
        out = jk.group_norm(x, 32, w, b, 1e-5, silu=True, concat=x2)
        ref = jk.group_norm(torch.cat([x, x2], dim=1), 32, w, b, 1e-5, silu=True)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
