"""jedi_kernels.prepare_inputs: exact equality with the reference on every available backend, grads, bad inputs."""
import pytest
import torch

import jedi_kernels as jk
from jedi_kernels.reference import prepare_inputs_reference
from jedi_kernels.testing import assert_equal_verbose


def _cpu_backends():
    avail = jk.available_backends()
    out = ["torch"]
    if avail["cpu_ext"]:
        out.append("cpu")
    if avail["triton"]:
        out.append("triton")  # under TRITON_INTERPRET=1
    return out


CPU_BACKENDS = _cpu_backends()
SHAPES = [(8, 4, 16, 16), (1, 3, 7, 7), (3, 4, 5, 9), (2, 1, 1, 1), (5, 2, 3, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(shape, dtype, device="cpu", channels_last=False):
    x_t = torch.randn(shape, device=device).to(dtype)
    x0 = torch.randn(shape, device=device).to(dtype)
    m = torch.rand(shape[0], device=device) < 0.5
    m[0] = True  # both kinds of image present whenever N > 1
    if shape[0] > 1:
        m[-1] = False
    if channels_last:
        x_t, x0 = x_t.to(memory_format=torch.channels_last), x0.to(memory_format=torch.channels_last)
    return x_t, x0, m


def test_cpu_ext_is_built():
    """The editable install must have built the CPU C++ ops (CI builds them; JEDI_SKIP_EXT installs skip this)."""
    import os

    if os.environ.get("JEDI_SKIP_EXT") == "1":
        pytest.skip("JEDI_SKIP_EXT=1: pure-Python install")
    assert jk.available_backends()["cpu_ext"], jk.available_backends()["reasons"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_exact(backend, dtype, shape, channels_last):
    x_t, x0, m = _inputs(shape, dtype, channels_last=channels_last)
    ref = prepare_inputs_reference(x_t, x0, m)
    out = jk.prepare_inputs(x_t, x0, m, backend=backend)
    assert_equal_verbose(out, ref, name=f"prepare_inputs[{backend}]")
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif not channels_last:
        assert out.is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_mask_and_bool_mask_agree(backend):
    x_t, x0, m = _inputs((4, 4, 6, 6), torch.float32)
    a = jk.prepare_inputs(x_t, x0, m, backend=backend)
    b = jk.prepare_inputs(x_t, x0, m.float(), backend=backend)
    assert_equal_verbose(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    big = torch.randn(3, 8, 9, 10)
    x_t, x0 = big[:, :4, :, 1:8], big[:, 4:, :, 2:9]  # non-contiguous views
    m = torch.tensor([1.0, 0.0, 1.0])
    assert_equal_verbose(jk.prepare_inputs(x_t, x0, m, backend=backend), prepare_inputs_reference(x_t, x0, m))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n", [4, 1])  # batch 1: grad[:, :C] is itself contiguous, and must still not alias grad
def test_backward_exact(backend, channels_last, n):
    x_t, x0, m = _inputs((n, 3, 5, 6), torch.float64, channels_last=channels_last)
    x_t.requires_grad_(True)
    x0.requires_grad_(True)
    g = torch.randn(n, 7, 5, 6, dtype=torch.float64)
    out = jk.prepare_inputs(x_t, x0, m, backend=backend)
    gx, g0 = torch.autograd.grad(out, (x_t, x0), g)
    rx, r0 = torch.autograd.grad(prepare_inputs_reference(x_t, x0, m), (x_t, x0), g)
    assert_equal_verbose(gx, rx, name="grad x_t")
    assert_equal_verbose(g0, r0, name="grad x0")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    x_t, x0, m = _inputs((2, 2, 3, 3), torch.float64)
    x_t.requires_grad_(True)
    x0.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: jk.prepare_inputs(a, b, m, backend=backend), (x_t, x0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x_t, x0, m = _inputs((3, 4, 5, 6), torch.float32)
    args = (x_t.requires_grad_(True), x0.requires_grad_(True), m.float(), backend)
    torch.library.opcheck(torch.ops.jedi.prepare_inputs.default, args)
    xc, x0c, _ = _inputs((3, 4, 5, 6), torch.float32, channels_last=True)
    torch.library.opcheck(torch.ops.jedi.prepare_inputs.default, (xc, x0c, m.float(), backend))
    g = torch.randn(3, 9, 5, 6)
    torch.library.opcheck(torch.ops.jedi.prepare_inputs_backward.default, (g, m.float(), 4, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    x_t, x0, m = _inputs((4, 4, 8, 8), torch.float32)
    x_t.requires_grad_(True)

    def f(a, b, mask):
        return (jk.prepare_inputs(a, b, mask, backend=backend) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x_t, x0, m)
    (g,) = torch.autograd.grad(loss, x_t)
    assert torch.equal(loss.detach(), f(x_t, x0, m).detach())
    assert torch.equal(g, torch.full_like(x_t, 2.0))


def test_poisoned_output_fully_written():
    """Every output element is written: NaN-poisoned allocator memory never survives (the kernels use empty)."""
    for backend in CPU_BACKENDS:
        torch.manual_seed(1)
        for _ in range(3):
            junk = torch.full((4096,), float("nan"))  # leave NaNs in freed memory the next empty() may reuse
            del junk
            x_t, x0, m = _inputs((2, 4, 7, 9), torch.float32)
            out = jk.prepare_inputs(x_t, x0, m, backend=backend)
            assert torch.isfinite(out).all(), backend


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x_t=torch.randn(2, 4, 8)), ValueError, "x_t must have shape"),
        (dict(x0=torch.randn(2, 4, 8, 9)), ValueError, "x0 must have x_t's shape"),
        (dict(x0=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "x0 must have x_t's dtype"),
        (dict(ng_mask=torch.ones(3)), ValueError, r"ng_mask must have shape \(N,\)"),
        (dict(ng_mask=torch.ones(2, dtype=torch.int64)), TypeError, "ng_mask must be bool or float"),
        (dict(x_t=torch.randn(2, 4, 8, 8).long()), TypeError, "x_t must be a float tensor"),
        (dict(x_t=[1.0]), TypeError, "x_t must be a torch.Tensor"),
        (dict(x_t=torch.randn(0, 4, 8, 8), x0=torch.randn(0, 4, 8, 8), ng_mask=torch.ones(0)), ValueError,
         "non-empty"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = dict(x_t=torch.randn(2, 4, 8, 8), x0=torch.randn(2, 4, 8, 8), ng_mask=torch.ones(2))
    args.update(kwargs)
    backend = args.pop("backend", "auto")
    with pytest.raises(exc, match=match):
        jk.prepare_inputs(args["x_t"], args["x0"], args["ng_mask"], backend=backend)


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="backend='cuda' is unavailable"):
        jk.prepare_inputs(x, x, torch.ones(2), backend="cuda")


def test_sample_ng_mask():
    g = torch.Generator().manual_seed(3)
    m = jk.sample_ng_mask(4000, 4, g)
    assert m.shape == (4000,) and m.dtype == torch.bool
    assert 0.45 < m.float().mean().item() < 0.55  # Bernoulli(0.5): 4000 draws, sd 0.008
    g2 = torch.Generator().manual_seed(3)
    assert torch.equal(m, jk.sample_ng_mask(4000, 4, g2))
    with pytest.raises(ValueError, match="set_size"):
        jk.sample_ng_mask(10, 4)
    with pytest.raises(ValueError, match="n must be"):
        jk.sample_ng_mask(0, 1)


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(16, 4, 128, 128), (4, 4, 63, 65)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_forward_backward_exact(backend, dtype, shape, channels_last):
    if backend == "cuda" and not jk.available_backends()["cuda"]:
        pytest.skip(jk.available_backends()["reasons"]["cuda"])
    x_t, x0, m = _inputs(shape, dtype, device="cuda", channels_last=channels_last)
    x_t.requires_grad_(True)
    x0.requires_grad_(True)
    out = jk.prepare_inputs(x_t, x0, m, backend=backend)
    ref = prepare_inputs_reference(x_t, x0, m)
    assert_equal_verbose(out, ref, name=f"gpu prepare_inputs[{backend}]")
    g = torch.randn_like(ref)
    assert_equal_verbose(torch.autograd.grad(out, x0, g)[0], torch.autograd.grad(ref, x0, g)[0], name="grad x0")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    if backend == "cuda" and not jk.available_backends()["cuda"]:
        pytest.skip(jk.available_backends()["reasons"]["cuda"])
    x_t, x0, m = _inputs((8, 4, 32, 32), torch.float16, device="cuda")
    mf = m.half()
    jk.prepare_inputs(x_t, x0, mf, backend=backend)  # warm up (Triton compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = jk.prepare_inputs(x_t, x0, mf, backend=backend)
    x_t.copy_(torch.randn_like(x_t))
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_verbose(out, prepare_inputs_reference(x_t, x0, mf))
