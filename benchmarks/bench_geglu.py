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
