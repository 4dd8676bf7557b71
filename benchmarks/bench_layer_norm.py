"""Fused residual add + LayerNorm (``jk.add_layer_norm``, Triton) vs torch's add + LayerNorm and its torch.compile,
same run.

What is measured: ``s = x + r; n = layer_norm(s)`` on SD v1's transformer tokens at the JeDi UNet step (batch N = 4
images; tokens R = N * L with L = 4096/1024/256, C = 320/640/1280), fp16 on the GPU. The op is memory-bound: the
floor is reading x and r and writing s and n (4 R*C elements) at the card's copy bandwidth
(``common.copy_bandwidth_gbps``); each case records ms, GB/s and that fraction. The eager torch pair moves 5 R*C
(the norm reads s back) in two launches.

CPU: one smoke entry times the torch reference only (the Triton interpreter's timing is meaningless).
"""
import pytest
import torch

import jedi_kernels as jk
from common import bench_cpu, bench_gpu, copy_bandwidth_gbps, cpu_time_ms
from jedi_kernels.reference import add_layer_norm_reference

# (tokens R, C) of SD v1's transformer blocks at the JeDi step, N = 4 images per UNet call
GPU_SHAPES = [(4 * 4096, 320), (4 * 1024, 640), (4 * 256, 1280)]
CPU_SHAPE = (4 * 256, 320)

_compiled = {}


def _bytes(shape, dtype):
    R, C = shape
    return 4 * R * C * torch.empty((), dtype=dtype).element_size()


def _impl(impl, x, r, w, b):
    if impl == "triton":
        return lambda: jk.add_layer_norm(x, r, w, b, backend="triton")
    if impl == "torch":
        return lambda: add_layer_norm_reference(x, r, w, b)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(add_layer_norm_reference, dynamic=False)
    fn = _compiled["fn"]
    fn(x, r, w, b)  # compile for this shape outside the timing
    return lambda: fn(x, r, w, b)


def _inputs(shape, device, dtype):
    x, r = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(shape[-1], device=device, dtype=dtype) for _ in range(2))
    return x, r, w, b


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_add_layer_norm_cpu(benchmark, impl):
    if impl == "triton":
        pytest.skip("Triton on CPU runs in the interpreter: its timing means nothing")
    fn = _impl(impl, *_inputs(CPU_SHAPE, "cpu", torch.float32))
    bench_cpu(benchmark, fn, _bytes(CPU_SHAPE, torch.float32), shape=list(CPU_SHAPE), dtype="float32", impl=impl,
              ms_median=cpu_time_ms(fn))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch", "torch_compile"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_add_layer_norm_gpu(benchmark, impl, shape):
    fn = _impl(impl, *_inputs(shape, "cuda", torch.float16))
    nbytes = _bytes(shape, torch.float16)
    copy = copy_bandwidth_gbps(nbytes)
    ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", impl=impl, bytes=nbytes)
    gbps = nbytes / ms / 1e6
    benchmark.extra_info.update(GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy)
