"""SD's Upsample as a sub-pixel convolution (``jk.upsample_conv2d``) vs interpolate + conv2d, eager and compiled, same run.

What is measured: the three Upsample layers of SD v1 at the JeDi step (UNet batch 4, fp16, channels-last, as the
optimized model runs them): 1280 channels 8x8 -> 16x16 and 16x16 -> 32x32, 640 channels 32x32 -> 64x64.

- ``torch``: ``F.interpolate`` (nearest) writes the 4x larger input, cuDNN's 3x3 conv reads it (36 multiply-adds per
  input pixel, C_in and C_out), and torch adds the bias in a pass of its own (cuDNN convolutions take no bias);
- ``torch_compile``: the same function through torch.compile (inductor; cuDNN still runs the conv);
- ``subpixel``: the folded 2x2 weights (one small batched GEMM per call), ONE cuDNN conv of the small input with
  4 * C_out channels (16 multiply-adds), the Triton interleave + bias pass.

Records ms, the upsampled convolution's FLOPs per second (2 * N * 4HW * C_out * C_in * 9: the work the layer stands
for, the same numerator for every impl) and the floor at the 724 TFLOP/s matmul ceiling of the sub-pixel FLOPs
(2 * N * (H+1)(W+1) * 4 C_out * C_in * 4).

CPU: smoke entries on a small shape, the reference and the sub-pixel conv with the interleave's torch twin.
"""
import pytest
import torch

import jedi_kernels as jk
from common import bench_cpu, bench_gpu, cpu_time_ms, impl_fn
from jedi_kernels.reference import upsample_conv2d_reference

# (N, C, H, W) of the Upsample inputs at the JeDi step (UNet batch 4); C_out = C
GPU_SHAPES = [(4, 1280, 8, 8), (4, 1280, 16, 16), (4, 640, 32, 32)]
CPU_SHAPE = (2, 64, 8, 8)
_compiled = {}


def _flops(shape):
    """(upsampled conv FLOPs, sub-pixel conv FLOPs) of one call."""
    N, C, H, W = shape
    return 2 * N * 4 * H * W * C * C * 9, 2 * N * (H + 1) * (W + 1) * 4 * C * C * 4


def _impl(impl, x, w, b):
    return impl_fn(impl, lambda *t: jk.upsample_conv2d(*t, backend="triton"), upsample_conv2d_reference, (x, w, b),
                   _compiled)


def _inputs(shape, device, dtype):
    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    w = (torch.randn(C, C, 3, 3, generator=g) / (3 * C**0.5)).to(device, dtype).to(memory_format=torch.channels_last)
    b = torch.randn(C, generator=g).to(device, dtype)
    return x, w, b


@pytest.mark.parametrize("impl", ["torch", "subpixel_torch"])
def test_upsample_conv_cpu(benchmark, impl, one_thread):
    """Smoke: the reference, and the sub-pixel conv with the interleave's torch twin (no Triton: the interpreter's
    timing would mean nothing)."""
    x, w, b = _inputs(CPU_SHAPE, "cpu", torch.float32)
    if impl == "subpixel_torch":
        from jedi_kernels.ops import upsample_conv as up

        def fn():
            z = torch.nn.functional.conv2d(x, up.fold_weight(w), None, padding=1)
            return up.interleave_torch(z, b)
    else:
        fn = _impl(impl, x, w, b)
    nbytes = 5 * x.numel() * 4  # read x, write the 4x output (C_out = C)
    with torch.no_grad():
        bench_cpu(benchmark, fn, nbytes, shape=list(CPU_SHAPE), dtype="float32", impl=impl,
                  ms_median=cpu_time_ms(fn))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["subpixel", "torch", "torch_compile"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[1]}x{s[2]}x{s[3]}")
def test_upsample_conv_gpu(benchmark, impl, shape):
    x, w, b = _inputs(shape, "cuda", torch.float16)
    fn = _impl(impl, x, w, b)
    with torch.no_grad():
        fn()
        ms = bench_gpu(benchmark, fn, shape=list(shape), dtype="float16", impl=impl, layout="channels_last")
    flop, sub_flop = _flops(shape)
    benchmark.extra_info.update(upsampled_conv_TFLOPs=flop / ms / 1e9, subpixel_floor_ms=sub_flop / 724e9)
