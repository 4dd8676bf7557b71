"""Fused GEGLU (``jk.geglu``, Triton) vs the torch reference (chunk + gelu + mul) and its torch.compile, same run.

What is measured: the activation of SD v1's feed-forward, ``a * gelu(g)`` on the (tokens, 2F) output of the ``proj``
Linear, at the JeDi UNet step's shapes (batch N = 4 images; tokens = N * L with L = 4096/1024/256 at the three
attention resolutions, F = 4 * C = 1280/2560/5120), fp16 on the GPU. The op is memory-bound, so the floor is the
bytes it must move, read R*2F + write R*F elements, at the card's copy bandwidth (``common.copy_bandwidth_gbps``):
each case records ms, GB/s and that fraction. The eager reference (chunk, gelu, mul) is two kernels around an (R, F)
temporary: gelu reads g and writes it, the multiply reads a and it and writes out, 5/3 of the floor's bytes.

CPU: one smoke entry times the torch reference only (the Triton interpreter's timing is meaningless).
"""
import pytest
import torch

import jedi_kernels as jk
from common import bench_cpu, bench_gpu, copy_bandwidth_gbps, cpu_time_ms
from jedi_kernels.reference import geglu_reference

# (tokens R, 2F) of SD v1's GEGLU at the JeDi step, N = 4 images per UNet call
GPU_SHAPES = [(4 * 4096, 2 * 1280), (4 * 1024, 2 * 2560), (4 * 256, 2 * 5120)]
CPU_SHAPE = (4 * 256, 2 * 640)

_compiled = {}


def _bytes(shape, dtype):
    R, F2 = shape
    return (R * F2 + R * (F2 // 2)) * torch.empty((), dtype=dtype).element_size()


def _impl(impl, h):
    if impl == "triton":
        return lambda: jk.geglu(h, backend="triton")
    if impl == "torch":
        return lambda: geglu_reference(h)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(geglu_reference, dynamic=False)
    fn = _compiled["fn"]
    fn(h)  # compile for this shape outside the timing
    return lambda: fn(h)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_geglu_cpu(benchmark, impl):
    if impl == "triton":
        pytest.skip("Triton on CPU runs in the interpreter: its timing means nothing")
    h = torch.randn(CPU_SHAPE)
    fn = _impl(impl, h)
    bench_cpu(benchmark, fn, _bytes(CPU_SHAPE, torch.float32), shape=list(CPU_SHAPE), dtype="float32", impl=impl,
              ms_median=cpu_time_ms(fn))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "torch_compile"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_geglu_gpu(benchmark, impl, shape):
    h = torch.randn(shape, device="cuda", dtype=torch.float16)
    fn = _impl(impl, h)
    nbytes = _bytes(shape, torch.float16)
    copy = copy_bandwidth_gbps(nbytes)
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", impl=impl, bytes=nbytes)
    gbps = nbytes / ms / 1e6
    benchmark.extra_info.update(GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy)


# (tokens M, K, F) of SD v1's feed-forward input projection at the JeDi step (UNet batch 4): the GEMM x Wᵀ (M x K x
# 2F) and its GEGLU, unfused (cuBLAS + a GEGLU pass over the (M, 2F) result) or as one kernel (jk.linear_geglu)
FF_SHAPES = [(4 * 4096, 320, 1280), (4 * 1024, 640, 2560), (4 * 256, 1280, 5120)]


def _ff_impl(impl, x, w, b):
    if impl == "fused_triton":
        return lambda: jk.linear_geglu(x, w, b, backend="triton")
    if impl == "cublas+geglu_triton":
        return lambda: jk.geglu(torch.nn.functional.linear(x, w, b), backend="triton")
    return lambda: geglu_reference(torch.nn.functional.linear(x, w, b))  # cublas+geglu_torch


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused_triton", "cublas+geglu_triton", "cublas+geglu_torch"])
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_linear_geglu_gpu(benchmark, impl, shape):
    """The feed-forward's projection + GEGLU: the fused kernel (autotuned on first call) against cuBLAS followed by
    the fused or the torch GEGLU. Records TFLOP/s of the projection (2·M·K·2F) and its fraction of the 724 TFLOP/s
    measured matmul peak; the fused kernel also skips 2·M·2F elements of traffic (the projection's write and read)."""
    M, K, F = shape
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = (torch.randn(2 * F, K, device="cuda") * K**-0.5).to(torch.float16)
    b = torch.randn(2 * F, device="cuda", dtype=torch.float16)
    fn = _ff_impl(impl, x, w, b)
    with torch.no_grad():
        fn()  # tunes / compiles outside the timing
        ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", impl=impl)
    flop = 2 * M * K * 2 * F
    benchmark.extra_info.update(TFLOPs=flop / ms / 1e9, fraction_of_724=flop / ms / 1e9 / 724)
