"""jedi_kernels.upsample_conv2d (SD's Upsample as a sub-pixel convolution) and its interleave op
``jedi::upsample_interleave``: float64 equality with interpolate + conv2d, the 2x rule in lower precisions, the Triton
interleave bitwise equal to its torch twin (every dtype, layout, strided inputs, poisoned outputs), gradients,
gradcheck, opcheck, torch.compile and bad inputs (Triton via the interpreter on CPU)."""
import pytest
import torch
import torch.nn.functional as F

import jedi_kernels as jk
import jedi_kernels.ops.upsample_conv as up
from jedi_kernels.reference import upsample_conv2d_reference
from jedi_kernels.testing import assert_close_verbose, assert_equal_verbose, assert_flash_rule

HAS_TRITON = jk.available_backends()["triton"]
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
# (N, C_in, C_out, H, W): square and not, 1x1 and 1-row images, C_out that is no multiple of a channel block (70 > 64)
SHAPES = [(2, 5, 7, 3, 4), (1, 3, 2, 1, 1), (2, 8, 16, 5, 3), (1, 4, 3, 1, 6), (1, 6, 70, 2, 2)]
CL = torch.channels_last


def _make(shape, dtype=torch.float64, layout="nchw", bias=True, seed=0):
    N, ci, co, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, ci, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / 3
    b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if layout == "nhwc":
        x, w = x.to(memory_format=CL), w.to(memory_format=CL)
    return x, w, b


def _fmt_of(t):
    return "nhwc" if t.is_contiguous(memory_format=CL) and not t.is_contiguous() else "nchw"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_equals_interpolate_then_conv(backend, layout, bias, shape):
    """The sub-pixel convolution is the upsampled one regrouped: float64 agrees to rounding, in x's layout."""
    x, w, b = _make(shape, layout=layout, bias=bias)
    ref = upsample_conv2d_reference(x, w, b)
    out = jk.upsample_conv2d(x, w, b, backend=backend)
    assert out.shape == ref.shape and out.dtype == x.dtype
    if min(shape[3:]) > 1 or layout == "nchw":  # (a 1x1 image is contiguous in both layouts)
        assert _fmt_of(out) == layout
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name=f"upsample_conv2d[{backend}] {shape}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 16, 24, 6, 5), (1, 32, 8, 4, 4)], ids=str)
def test_lower_precision_2x_rule(dtype, layout, shape):
    """Against the float64 reference: within twice the error of interpolate + conv2d in the same dtype as a GPU runs
    them, the convolution rounded and then its bias added (cuDNN convolutions take no bias; the CPU's fused bias
    rounds once, half an ulp better). Each folded weight is a sum of up to four taps rounded once; the conv
    accumulates in float32 as torch's does."""
    x, w, b = _make(shape, dtype=dtype, layout=layout)
    ref64 = upsample_conv2d_reference(x.double(), w.double(), b.double())
    out = jk.upsample_conv2d(x, w, b, backend="triton")
    assert out.dtype == dtype
    as_gpu = upsample_conv2d_reference(x, w, None) + b[:, None, None]
    assert_flash_rule(out, as_gpu, ref64, f"upsample_conv2d {dtype} {layout} {shape}")


def test_fold_weight_sums_the_taps_of_each_phase():
    """Channel 4 o + (2a + b), tap (k, l) of the folded weight is the sum of the 3x3 taps (u, v) with
    R_a[k, u] R_b[l, v] = 1, written out by hand; the result is channels-last by default, NCHW on request."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    rows = {(0, 0): [0], (0, 1): [1, 2], (1, 0): [0, 1], (1, 1): [2]}  # (phase bit, k) -> the taps u it sums
    f = up.fold_weight(w)
    assert f.shape == (12, 2, 2, 2) and f.is_contiguous(memory_format=CL)
    for o in range(3):
        for a in (0, 1):
            for b in (0, 1):
                for k in (0, 1):
                    for ll in (0, 1):
                        want = sum(w[o, :, u, v] for u in rows[(a, k)] for v in rows[(b, ll)])
                        assert torch.equal(f[4 * o + 2 * a + b, :, k, ll], want)
    g = up.fold_weight(w.to(memory_format=CL), torch.contiguous_format)
    assert g.is_contiguous() and torch.equal(g, f)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "channel_slice"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_triton_interleave_bitwise_equals_torch(dtype, layout, bias):
    """The kernel moves data and adds the bias in float32 (float64), rounding once: bitwise what the torch twin
    (slices, stacks, one add in z's dtype) gives, in z's memory format; also for a channel slice of a wider tensor
    (strides the launcher must honour, not assume)."""
    g = torch.Generator().manual_seed(3)
    C, H, W = 70, 3, 5
    if layout == "channel_slice":
        z = torch.randn(2, 4 * C + 8, H + 1, W + 1, generator=g).to(dtype).to(memory_format=CL)[:, 3:3 + 4 * C]
    else:
        z = torch.randn(2, 4 * C, H + 1, W + 1, generator=g).to(dtype)
        z = z.to(memory_format=CL) if layout == "nhwc" else z
    b = torch.randn(C, generator=g).to(dtype) if bias else None
    out = up.interleave_fwd(z, b)
    want = up.interleave_torch(z, b)
    assert_equal_verbose(out, want, name=f"interleave {dtype} {layout}")
    assert out.stride() == want.stride()


@needs_triton
@pytest.mark.parametrize("shape", [(2, 70, 3, 5), (1, 1, 1, 1), (3, 9, 7, 2)], ids=str)
def test_poisoned_outputs_fully_written(monkeypatch, shape):
    """The launcher allocates y with torch.empty; NaN-filling it proves every element is stored (channel and pixel
    tails, 1x1 images)."""
    N, C, H, W = shape
    z = torch.randn(N, 4 * C, H + 1, W + 1)
    b = torch.randn(C)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    out = up.interleave_fwd(z, b)
    monkeypatch.undo()
    assert not out.isnan().any()
    assert_equal_verbose(out, up.interleave_torch(z, b), name=f"poisoned interleave {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gradients_equal_the_reference(backend, layout):
    """dx, dweight, dbias through the fold, the conv and the interleave's adjoint: the reference's in float64."""
    x, w, b = _make((2, 5, 6, 3, 4), layout=layout)
    grad = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b)]
    got = torch.autograd.grad(jk.upsample_conv2d(*ins, backend=backend), ins, grad)
    ins64 = [t.clone().requires_grad_(True) for t in (x, w, b)]
    want = torch.autograd.grad(upsample_conv2d_reference(*ins64), ins64, grad)
    for name, gt, wt in zip(("dx", "dweight", "dbias"), got, want):
        assert_close_verbose(gt, wt, atol=1e-11 * float(wt.abs().max()), name=f"{name}[{backend}] {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, w, b = _make((1, 2, 3, 2, 3))
    ins = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *t: jk.upsample_conv2d(*t, backend=backend), ins)
    z = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(2, dtype=torch.float64, requires_grad=True)
    op_backend = "triton" if backend == "triton" else "torch"
    assert torch.autograd.gradcheck(lambda z, bb: up.upsample_interleave_op(z, bb, op_backend), (z, bb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z = torch.randn(2, 4 * 5, 4, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    op = torch.ops.jedi.upsample_interleave.default
    torch.library.opcheck(op, (z, b, backend))
    torch.library.opcheck(op, (z.detach().to(memory_format=CL), None, backend))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph(backend):
    x, w, b = _make((2, 4, 6, 3, 3), dtype=torch.float32, layout="nhwc")
    ins = [t.requires_grad_(True) for t in (x, w, b)]

    def f(*t):
        return jk.upsample_conv2d(*t, backend=backend) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*ins)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, grad)
    ref = f(*ins)
    want = torch.autograd.grad(ref, ins, grad)
    assert_close_verbose(out, ref, atol=1e-5, name=f"compiled upsample_conv2d[{backend}]")
    for gt, wt in zip(got, want):
        assert_close_verbose(gt, wt, atol=1e-4, name=f"compiled grads[{backend}]")


@needs_triton
def test_a_precomputed_folded_weight_gives_the_same_output():
    """folded_weight = fold_weight(weight, x's layout), made once by a caller (JeDiUNet.frozen_weights): bitwise the
    output of folding on the call."""
    x, w, b = _make((2, 5, 7, 3, 4), dtype=torch.float32, layout="nhwc")
    folded = up.fold_weight(w, CL)
    assert torch.equal(jk.upsample_conv2d(x, w, b, folded_weight=folded, backend="triton"),
                       jk.upsample_conv2d(x, w, b, backend="triton"))
    with pytest.raises(ValueError, match=r"folded_weight must be fold_weight\(weight\): a \(28, 5, 2, 2\)"):
        jk.upsample_conv2d(x, w, b, folded_weight=folded[:8], backend="triton")
    with pytest.raises(ValueError, match="folded_weight must be"):
        jk.upsample_conv2d(x, w, b, folded_weight=folded.double(), backend="triton")


def test_auto_on_cpu_is_the_reference():
    x, w, b = _make((2, 3, 4, 3, 3), dtype=torch.float32)
    assert torch.equal(jk.upsample_conv2d(x, w, b), upsample_conv2d_reference(x, w, b))
    assert torch.equal(upsample_conv2d_reference(x, w, b),
                       F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1))


_X = torch.randn(1, 3, 4, 4)
_W = torch.randn(5, 3, 3, 3)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((_X[0], _W), {}, ValueError, r"x must be a non-empty \(N, C_in, H, W\)"),
        ((_X[:, :, :0], _W), {}, ValueError, r"x must be a non-empty"),
        ((_X.int(), _W), {}, TypeError, "x must be float16, bfloat16, float32 or float64"),
        ((_X, torch.randn(5, 3, 1, 1)), {}, ValueError, r"weight must have shape \(C_out, C_in, 3, 3\) = \(C_out, 3"),
        ((_X, torch.randn(5, 4, 3, 3)), {}, ValueError, r"weight must have shape"),
        ((_X, _W.double()), {}, TypeError, "weight must have x's dtype"),
        ((_X, _W, torch.randn(4)), {}, ValueError, r"bias must have shape \(C_out,\) = \(5,\)"),
        ((_X, _W, torch.randn(5).double()), {}, TypeError, "bias must have x's dtype"),
        ((_X, _W, [0.0] * 5), {}, TypeError, "bias must be a torch.Tensor or None"),
        (([[1.0]], _W), {}, TypeError, "x and weight must be torch.Tensors"),
        ((_X, _W), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
    ids=["3d", "empty", "int", "1x1_weight", "c_in", "weight_dtype", "bias_shape", "bias_dtype", "bias_list", "list",
         "bad_backend"],
)
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jk.upsample_conv2d(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 1280, 1280, 8, 8), (4, 1280, 1280, 16, 16), (4, 640, 640, 32, 32)], ids=str)
def test_gpu_sd_shapes(dtype, shape):
    """SD v1's three Upsample layers at UNet batch 4, channels-last: the 2x rule against the float64 reference
    (cuDNN's convolutions on both sides), output channels-last."""
    x, w, b = (t.cuda() for t in _make(shape, dtype=dtype, layout="nhwc"))
    out = jk.upsample_conv2d(x, w, b)  # auto: Triton on CUDA
    assert out.is_contiguous(memory_format=CL)
    ref64 = upsample_conv2d_reference(x.double(), w.double(), b.double())
    assert_flash_rule(out, upsample_conv2d_reference(x, w, b), ref64, f"gpu upsample_conv2d {dtype} {shape}")


@pytest.mark.gpu
def test_gpu_graph_capture_and_all_dtypes():
    """Captured in a CUDA graph, the replay equals the eager call; float32 and float64 too, NCHW too."""
    for dtype in (torch.float32, torch.float64):
        for layout in ("nchw", "nhwc"):
            x, w, b = (t.cuda() for t in _make((2, 24, 40, 5, 7), dtype=dtype, layout=layout))
            assert_close_verbose(jk.upsample_conv2d(x, w, b), upsample_conv2d_reference(x, w, b),
                                 atol=(1e-12 if dtype == torch.float64 else 1e-4) * 20, name=f"gpu {dtype} {layout}")
    x, w, b = (t.cuda() for t in _make((4, 320, 320, 32, 32), dtype=torch.float16, layout="nhwc"))
    eager = jk.upsample_conv2d(x, w, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = jk.upsample_conv2d(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
