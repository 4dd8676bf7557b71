"""Fused input preparation vs the unfused torch ops, same run, same inputs.

Targets (issue 2): CPU C++ >= 2x the unfused ops at (8, 4, 64, 64) fp32; GPU >= 80% of copy bandwidth at
(16, 4, 128, 128) bf16. Bytes moved (the floor): read 2*N*C*H*W, write N*(2C+1)*H*W elements.
"""
import pytest
import torch

import jedi_kernels as jk
from common import bench_gpu, copy_bandwidth_gbps, cpu_time_ms, env_info


def unfused(x_t, x0, m):
    """What the seed does: three ops and a cat (m broadcast by expand)."""
    mm = m.view(-1, 1, 1, 1)
    return torch.cat([x_t, x0 * (1 - mm), mm.expand(x_t.shape[0], 1, *x_t.shape[2:])], dim=1)


def _inputs(shape, dtype, device):
    x_t = torch.randn(shape, device=device, dtype=dtype)
    x0 = torch.randn(shape, device=device, dtype=dtype)
    m = (torch.rand(shape[0], device=device) < 0.5).to(dtype)
    return x_t, x0, m


def _bytes(shape, dtype):
    N, C, H, W = shape
    return (2 * N * C * H * W + N * (2 * C + 1) * H * W) * torch.empty((), dtype=dtype).element_size()


CPU_SHAPE = (8, 4, 64, 64)


@pytest.mark.parametrize("impl", ["fused_cpu", "unfused_torch"])
def test_prepare_inputs_cpu(benchmark, impl):
    x_t, x0, m = _inputs(CPU_SHAPE, torch.float32, "cpu")
    if impl == "fused_cpu":
        if not jk.available_backends()["cpu_ext"]:
            pytest.skip("CPU extension not built")
        fn = lambda: jk.prepare_inputs(x_t, x0, m, backend="cpu")  # noqa: E731
    else:
        fn = lambda: unfused(x_t, x0, m)  # noqa: E731
    ms_fused = cpu_time_ms(lambda: jk.prepare_inputs(x_t, x0, m, backend="cpu")) if jk.available_backends()["cpu_ext"] else None
    ms_unfused = cpu_time_ms(lambda: unfused(x_t, x0, m))
    benchmark(fn)
    benchmark.extra_info.update(env_info("cpu"))
    nbytes = _bytes(CPU_SHAPE, torch.float32)
    benchmark.extra_info.update(
        shape=list(CPU_SHAPE), dtype="float32", impl=impl, bytes=nbytes,
        speedup_fused_vs_unfused=(ms_unfused / ms_fused) if ms_fused else None,
        GBps=nbytes / (benchmark.stats.stats.median * 1e9),
    )


GPU_SHAPE = (16, 4, 128, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "triton", "unfused_torch"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_prepare_inputs_gpu(benchmark, impl, layout):
    x_t, x0, m = _inputs(GPU_SHAPE, torch.bfloat16, "cuda")
    if layout == "nhwc":
        x_t, x0 = x_t.to(memory_format=torch.channels_last), x0.to(memory_format=torch.channels_last)
    if impl == "cuda" and not jk.available_backends()["cuda"]:
        pytest.skip(jk.available_backends()["reasons"]["cuda"])
    if impl == "unfused_torch":
        fn = lambda: unfused(x_t, x0, m)  # noqa: E731
    else:
        fn = lambda: jk.prepare_inputs(x_t, x0, m, backend=impl)  # noqa: E731
    nbytes = _bytes(GPU_SHAPE, torch.bfloat16)
    copy = copy_bandwidth_gbps(nbytes)
    ms = bench_gpu(benchmark, fn, shape=list(GPU_SHAPE), dtype="bfloat16", impl=impl, layout=layout, bytes=nbytes)
    gbps = nbytes / ms / 1e6
    benchmark.extra_info.update(GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy)
