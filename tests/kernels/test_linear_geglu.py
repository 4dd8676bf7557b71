"""jedi_kernels.linear_geglu: the projection + GEGLU kernel vs the float64 reference (2x rule against the unfused
same-dtype computation), tails of every dim, strided inputs, poisoned outputs, the autotuned launch path, opcheck,
torch.compile, calls that record autograd (sent to the differentiable unfused path) and bad inputs. Triton runs
through the interpreter on CPU."""
import pytest
import torch

import jedi_kernels as jk
import jedi_kernels.ops.linear_geglu as lg
from jedi_kernels.reference import linear_geglu_reference
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule

HAS_TRITON = jk.available_backends()["triton"]
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of x, K, F): K a multiple of the interpreter's 32-wide K step and not (40, 72), F with a partial
# column tile (24, 37), several row tiles with a tail (M = 70), a single row, 3-D tokens as in SD
SHAPES = [((70,), 64, 24), ((2, 17), 40, 37), ((1,), 72, 8), ((3, 5), 32, 64)]


def _inputs(lead, K, F2, dtype, device="cpu", bias=True):
    """x with std 1, weight scaled so the gates (std ≈ 2) reach gelu's curved region and both tails."""
    x = torch.randn(*lead, K, device=device).to(dtype)
    w = (torch.randn(2 * F2, K, device=device) * (2.0 / K**0.5)).to(dtype)
    b = (0.5 * torch.randn(2 * F2, device=device)).to(dtype) if bias else None
    return x, w, b


def _check(out, x, w, b, name):
    """The 2x rule: |ours - ref64| <= 2 |unfused in x's dtype - ref64| + 1e-5 (fp32 math, one rounding, against a
    projection rounded to x's dtype before the activation)."""
    ref64 = linear_geglu_reference(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == ref64.shape and out.dtype == x.dtype and out.is_contiguous(), (tuple(out.shape), out.dtype)
    assert_flash_rule(out, linear_geglu_reference(x, w, b), ref64, name)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, K, F2", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_triton_forward(dtype, lead, K, F2, bias):
    x, w, b = _inputs(lead, K, F2, dtype, bias=bias)
    with torch.no_grad():
        out = jk.linear_geglu(x, w, b, backend="triton")
    _check(out, x, w, b, f"linear_geglu[triton] {dtype} {lead} K={K} F={F2} bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_torch_backend_and_auto_are_the_reference(dtype):
    x, w, b = _inputs((3, 4), 16, 8, dtype)
    ref = linear_geglu_reference(x, w, b)
    assert torch.equal(jk.linear_geglu(x, w, b, backend="torch"), ref)
    assert torch.equal(jk.linear_geglu(x, w, b), ref)  # auto: torch until a GPU run says otherwise


@needs_triton
@pytest.mark.parametrize("view", ["column_slice", "transposed", "weight_transposed"])
def test_strided_inputs(view):
    """x as a column slice of wider rows (read in place), as a transposed view (copied), and a weight whose K stride
    is not 1 (copied)."""
    x, w, b = _inputs((40,), 48, 16, torch.float16)
    if view == "column_slice":
        x = torch.cat([torch.randn(40, 3).half(), x, torch.randn(40, 5).half()], dim=1)[:, 3:51]
        assert x.stride() == (56, 1)
    elif view == "transposed":
        x = x.t().contiguous().t()
        assert x.stride() == (1, 40)
    else:
        w = w.t().contiguous().t()
    with torch.no_grad():
        out = jk.linear_geglu(x, w, b, backend="triton")
    _check(out, x, w, b, f"linear_geglu strided {view}")


@needs_triton
def test_poisoned_outputs_fully_written(monkeypatch):
    """The launcher allocates with torch.empty; NaN-filling it proves every element (row and column tails) is
    stored."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    x, w, b = _inputs((70,), 40, 37, torch.float32)
    out = lg.linear_geglu_fwd(x, w, b)
    monkeypatch.undo()
    assert not out.isnan().any()
    _check(out, x, w, b, "poisoned linear_geglu")


@needs_triton
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (autotune wrapper over several configs, the EVEN_K heuristic, config-dependent grids),
    driven under the interpreter with a CPU timer standing in for the GPU benchmarker."""
    import time

    from triton.runtime.autotuner import Autotuner

    def cpu_bench(fn, quantiles=None):
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return [ms, ms, ms]

    monkeypatch.setattr(lg, "triton_interpreting", lambda: False)  # launch as on a GPU (fp16: the tuned configs)
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: cpu_bench))
    monkeypatch.setattr(lg, "_CONFIGS", [lg._cfg(32, 32, 32, 4, 1), lg._cfg(16, 32, 16, 4, 1)])
    lg._tuned.cache_clear()
    try:
        for K in (64, 40):  # EVEN_K and a K tail
            x, w, b = _inputs((37,), K, 24, torch.float16)
            _check(lg.linear_geglu_fwd(x, w, b), x, w, b, f"autotuned K={K}")
        assert len(lg._tuned().cache) == 2
        x, w, b = _inputs((37,), 64, 24, torch.float32)  # float32: one fixed config on GPUs, no tuning
        _check(lg.linear_geglu_fwd(x, w, b), x, w, b, "float32 fixed config")
        assert len(lg._tuned().cache) == 2
    finally:
        lg._tuned.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b = _inputs((2, 5), 32, 16, torch.float32)
    torch.library.opcheck(torch.ops.jedi.linear_geglu.default, (x, w, b, backend))
    torch.library.opcheck(torch.ops.jedi.linear_geglu.default, (x, w, None, backend))


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_compile_fullgraph(backend):
    x, w, b = _inputs((4, 9), 32, 16, torch.float32)

    def f(t):
        return jk.linear_geglu(t, w, b, backend=backend) * 3

    with torch.no_grad():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        assert_close_verbose(out, f(x), atol=1e-5, name=f"compiled linear_geglu[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_calls_take_the_unfused_path(backend):
    """A call that records autograd runs F.linear + geglu (the op has no backward): gradients for x, weight and bias
    equal autograd of the reference, in float64."""
    x, w, b = (t.double().requires_grad_() for t in _inputs((3, 7), 24, 12, torch.float32))
    out = jk.linear_geglu(x, w, b, backend=backend)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, w, b), grad)
    ref = torch.autograd.grad(linear_geglu_reference(x, w, b), (x, w, b), grad)
    for name, a, r in zip(("dx", "dweight", "dbias"), ours, ref):
        assert_close_verbose(a, r, atol=1e-12, name=f"{name}[{backend}]")


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((torch.randn(2, 8), torch.randn(6, 7)), {}, ValueError, r"weight must have shape \(2F, K\) = \(2F, 8\)"),
        ((torch.randn(2, 8), torch.randn(5, 8)), {}, ValueError, "even, non-zero 2F"),
        ((torch.randn(2, 8), torch.randn(6, 8).double()), {}, TypeError, "weight must have x's dtype"),
        ((torch.randn(2, 8), torch.randn(6, 8), torch.randn(4)), {}, ValueError,
         r"bias must have shape \(2F,\) = \(6,\)"),
        ((torch.randn(2, 8), torch.randn(6, 8), torch.randn(6).double()), {}, TypeError, "bias must have x's dtype"),
        ((torch.ones(2, 8, dtype=torch.int32), torch.ones(6, 8, dtype=torch.int32)), {}, TypeError,
         "x must be float16, bfloat16, float32 or float64"),
        (([[1.0]], torch.randn(2, 1)), {}, TypeError, "x and weight must be torch.Tensors"),
        ((torch.randn(2, 0), torch.randn(2, 0)), {}, ValueError, r"x must have shape \(\.\.\., K\)"),
        ((torch.randn(2, 8), torch.randn(6, 8)), {"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
    ids=["wrong_K", "odd_2F", "weight_dtype", "bias_shape", "bias_dtype", "int", "list", "zero_K", "bad_backend"],
)
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jk.linear_geglu(*args, **kwargs)


@needs_triton
def test_float64_rejected_by_triton():
    x, w, b = _inputs((2,), 8, 4, torch.float64)
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        jk.linear_geglu(x, w, b, backend="triton")


# ----------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, M, K, F2", [
    (torch.float16, 16384, 320, 1280), (torch.float16, 4096, 640, 2560), (torch.float16, 1024, 1280, 5120),
    (torch.bfloat16, 1024, 1280, 5120), (torch.float16, 308, 96, 40)], ids=str)
def test_gpu_sd_shapes(dtype, M, K, F2):
    """SD's three feed-forward widths at UNet batch 4 (autotuned; bf16 on one), and an odd small one (tails)."""
    x, w, b = _inputs((M,), K, F2, dtype, device="cuda")
    with torch.no_grad():
        out = jk.linear_geglu(x, w, b, backend="triton")
    _check(out, x, w, b, f"gpu linear_geglu {dtype} M={M} K={K} F={F2}")


@pytest.mark.gpu
def test_gpu_graph_capture():
    x, w, b = _inputs((4, 256), 1280, 5120, torch.float16, device="cuda")
    with torch.no_grad():
        out = jk.linear_geglu(x, w, b, backend="triton")  # compiles and tunes outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = jk.linear_geglu(x, w, b, backend="triton")
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, jk.linear_geglu(x, w, b, backend="triton"))
        assert not torch.equal(captured, out)
