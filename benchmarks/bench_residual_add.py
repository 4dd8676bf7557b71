"""``jk.residual_add`` (x + residual + bias[c] in one pass, Triton) vs torch's two adds and their torch.compile, same run.

What is measured: the residual add at the end of SD v1's ResBlocks and SpatialTransformers at the JeDi step (UNet
batch 4, fp16, channels-last: the residual is a GEMM's (N, HW, C) output viewed as NCHW, as proj_out gives it), at
the four widths and resolutions. Memory-bound: the floor is read x + read residual + write out at the card's copy
bandwidth (``common.copy_bandwidth_gbps``); each case records ms, GB/s and that fraction. torch's eager form is two
kernels, ``x + r`` (vectorized) and ``+ bias`` (the strided broadcast kernel): 5/3 of the floor's bytes.

CPU: smoke entries of the torch form only (the Triton interpreter's timing means nothing).
"""
import pytest
import torch

import jedi_kernels as jk
from common import bench_cpu, bench_gpu, copy_bandwidth_gbps, cpu_time_ms, impl_fn
from jedi_kernels.reference import residual_add_reference

# (N, C, H, W) of the residual adds at the JeDi step (UNet batch 4)
GPU_SHAPES = [(4, 320, 64, 64), (4, 640, 32, 32), (4, 1280, 16, 16), (4, 1280, 8, 8)]
CPU_SHAPE = (2, 64, 16, 16)
_compiled = {}


def _inputs(shape, device, dtype):
    N, C, H, W = shape
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    r = torch.randn(N, H * W, C, device=device).to(dtype).view(N, H, W, C).permute(0, 3, 1, 2)
    return x, r, torch.randn(C, device=device).to(dtype)


def _impl(impl, x, r, b):
    return impl_fn(impl, lambda *t: jk.residual_add(*t, backend="triton"), residual_add_reference, (x, r, b),
                   _compiled)


def test_residual_add_cpu(benchmark, one_thread):
    x, r, b = _inputs(CPU_SHAPE, "cpu", torch.float32)
    fn = _impl("torch", x, r, b)
    bench_cpu(benchmark, fn, 3 * x.numel() * 4, shape=list(CPU_SHAPE), dtype="float32", impl="torch",
              ms_median=cpu_time_ms(fn))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "torch_compile"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[1]}x{s[2]}x{s[3]}")
def test_residual_add_gpu(benchmark, impl, shape):
    x, r, b = _inputs(shape, "cuda", torch.float16)
    fn = _impl(impl, x, r, b)
    nbytes = 3 * x.numel() * x.element_size()
    copy = copy_bandwidth_gbps(nbytes)
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", impl=impl, bytes=nbytes)
    gbps = nbytes / ms / 1e6
    benchmark.extra_info.update(GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy)
