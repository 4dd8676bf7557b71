"""Fused GroupNorm+SiLU (``jk.group_norm(..., silu=True)``, Triton) vs what the UNet runs today, same run.

What is measured: ``silu(group_norm(x, 32, w, b, 1e-5))`` at every GroupNorm shape of the JeDi UNet step (SD v1,
64x64 latents, UNet batch N = 4: two guidance branches x a set of 2), fp16, for contiguous (NCHW) and channels-last
(NHWC) activations:

    (4, 320, 64, 64)  (4, 640, 32, 32)  (4, 1280, 16, 16)  (4, 2560, 16, 16)  (4, 960, 64, 64)  (4, 1280, 8, 8)

Implementations:

* ``triton``            ``jk.group_norm(x, 32, w, b, 1e-5, silu=True, backend="triton")``: two passes over x
  (split statistics, then normalize + affine + SiLU), fp32 math, one rounding.
* ``torch_eager``       what ``jedi.unet.GroupNorm32`` + ``nn.SiLU`` do today: cast x to fp32, GroupNorm, cast back,
  SiLU (``F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)).to(x.dtype)``); every step materialized.
* ``torch_compile``     ``torch.compile`` of that function (compiled per shape and layout before timing).
* ``torch_native_half`` ``F.silu(F.group_norm(x, 32, w.half(), b.half(), 1e-5))``: the fp16 norm torch runs without
  the fp32 cast (not bit-compatible with GroupNorm32, timed as the cheapest torch can do).

The floor: the op is memory-bound. A two-pass kernel reads x twice (statistics, then normalize) and writes y once:
``bytes = 3 * numel * 2`` (fp16), the number behind ``GBps`` and ``fraction_of_copy`` (of ``common.
copy_bandwidth_gbps`` measured in the same run for the same bytes). A kernel that kept each group on chip between
the passes would move only ``bytes_min = 2 * numel * 2`` (one read, one write); ``GBps_min`` and
``fraction_of_copy_min`` judge the time against that stricter floor.

CPU: one smoke entry times ``torch_eager`` at (2, 64, 16, 16) fp32 (the Triton interpreter's timing is meaningless).

``test_group_norm_shift_gpu``: the norm with a per-(image, channel) shift (a ResBlock's time embedding) folded into the
kernel, against the add as its own pass before it.
"""
import pytest
import torch
import torch.nn.functional as F

import jedi_kernels as jk
from common import bench_cpu, bench_gpu, copy_bandwidth_gbps, cpu_time_ms

GROUPS, EPS = 32, 1e-5
# (N, C, H, W) of SD v1's GroupNorms at the JeDi step (N = 4 images per UNet call)
GPU_SHAPES = [(4, 320, 64, 64), (4, 640, 32, 32), (4, 1280, 16, 16), (4, 2560, 16, 16), (4, 960, 64, 64),
              (4, 1280, 8, 8)]
CPU_SHAPE = (2, 64, 16, 16)

_compiled = {}


def torch_eager(x, w, b):
    """GroupNorm32 + SiLU as the UNet runs them: fp32 norm math, cast back, SiLU in x's dtype."""
    return F.silu(F.group_norm(x.float(), GROUPS, w.float(), b.float(), EPS).to(x.dtype))


def torch_native_half(x, w, b):
    """fp16 GroupNorm + SiLU, no fp32 cast of the activation."""
    return F.silu(F.group_norm(x, GROUPS, w.half(), b.half(), EPS))


def _bytes(shape, dtype, reads: int = 2):
    """Bytes a GroupNorm+SiLU must move: ``reads`` reads of x and one write of y."""
    N, C, H, W = shape
    return (reads + 1) * N * C * H * W * torch.empty((), dtype=dtype).element_size()


def _inputs(shape, dtype, device, layout):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    b = (0.1 * torch.randn(C, device=device)).to(dtype)
    return x, w, b


def _compile_limits() -> dict:
    """Dynamo config overrides for compiling one function at 12 (shape, layout) pairs: the default recompile limit
    (8 per code object) would silently fall back to eager for the later ones."""
    cfg = torch._dynamo.config
    return {k: max(getattr(cfg, k), 64) for k in ("recompile_limit", "cache_size_limit") if hasattr(cfg, k)}


def _impl(impl, x, w, b):
    if impl == "triton":
        return lambda: jk.group_norm(x, GROUPS, w, b, EPS, silu=True, backend="triton")
    if impl == "torch_eager":
        return lambda: torch_eager(x, w, b)
    if impl == "torch_native_half":
        return lambda: torch_native_half(x, w, b)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(torch_eager, dynamic=False)
    fn = _compiled["fn"]
    with torch._dynamo.config.patch(**_compile_limits()):
        fn(x, w, b)  # compile for this shape and layout outside the timing
    return lambda: fn(x, w, b)


def test_group_norm_cpu(benchmark):
    x, w, b = _inputs(CPU_SHAPE, torch.float32, "cpu", "nchw")
    fn = _impl("torch_eager", x, w, b)
    bench_cpu(benchmark, fn, _bytes(CPU_SHAPE, torch.float32), shape=list(CPU_SHAPE), dtype="float32", layout="nchw",
              impl="torch_eager", bytes_min=_bytes(CPU_SHAPE, torch.float32, reads=1), ms_median=cpu_time_ms(fn))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch_eager", "torch_compile", "torch_native_half"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_gpu(benchmark, impl, layout, shape):
    x, w, b = _inputs(shape, torch.float16, "cuda", layout)
    fn = _impl(impl, x, w, b)
    nbytes, nbytes_min = _bytes(shape, torch.float16), _bytes(shape, torch.float16, reads=1)
    copy, copy_min = copy_bandwidth_gbps(nbytes), copy_bandwidth_gbps(nbytes_min)
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", layout=layout, impl=impl, bytes=nbytes,
                   bytes_min=nbytes_min, groups=GROUPS, eps=EPS, silu=True)
    gbps, gbps_min = nbytes / ms / 1e6, nbytes_min / ms / 1e6
    benchmark.extra_info.update(GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy,
                                GBps_min=gbps_min, copy_GBps_min=copy_min, fraction_of_copy_min=gbps_min / copy_min)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch_eager"])
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_group_norm_fwd_bwd_gpu(benchmark, impl, shape):
    """Forward + backward (training), channels-last fp16: the Triton pair (jedi::group_norm + jedi::group_norm_backward:
    x read 2 + 3 times, the gradient twice, y and dx written once each) vs GroupNorm32 + SiLU under autograd."""
    x, w, b = _inputs(shape, torch.float16, "cuda", "nhwc")
    x.requires_grad_()
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    gy = torch.randn_like(x)
    if impl == "triton":
        def fn():
            return torch.autograd.grad(jk.group_norm(x, GROUPS, w, b, EPS, silu=True, backend="triton"), (x, w, b), gy)
    else:
        def fn():
            return torch.autograd.grad(torch_eager(x, w, b), (x, w, b), gy)
    N, C, H, W = shape
    nbytes = 9 * N * C * H * W * 2  # the Triton pair's traffic: 5 reads of x, 2 of the grad, writes of y and dx
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", layout="nhwc", impl=impl, mode="fwd+bwd",
                   bytes_triton_pair=nbytes)
    benchmark.extra_info.update(GBps_triton_pair_traffic=nbytes / ms / 1e6)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton_shift", "add_then_triton", "add_then_torch_native_half"])
@pytest.mark.parametrize("shape", [(4, 320, 64, 64), (4, 1280, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_group_norm_shift_gpu(benchmark, impl, shape):
    """A ResBlock's second norm, ``silu(group_norm(h + temb[:, :, None, None]))`` (channels-last fp16): the shift
    inside the Triton kernel (``jk.group_norm(..., shift=temb)``: x read twice, y written once) against the
    broadcast add as its own pass before the Triton norm (the model without ``fold_bias``) or torch's half norm."""
    x, w, b = _inputs(shape, torch.float16, "cuda", "nhwc")
    sh = torch.randn(shape[:2], device="cuda", dtype=torch.float16)
    if impl == "triton_shift":
        def fn():
            return jk.group_norm(x, GROUPS, w, b, EPS, silu=True, shift=sh, backend="triton")
    elif impl == "add_then_triton":
        def fn():
            return jk.group_norm(x + sh[:, :, None, None], GROUPS, w, b, EPS, silu=True, backend="triton")
    else:
        def fn():
            return torch_native_half(x + sh[:, :, None, None], w, b)
    nbytes = _bytes(shape, torch.float16)
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", layout="nhwc", impl=impl, bytes=nbytes,
                   groups=GROUPS, eps=EPS, silu=True, shift=True)
    benchmark.extra_info.update(GBps=nbytes / ms / 1e6)
