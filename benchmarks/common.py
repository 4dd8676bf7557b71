"""Shared benchmark helpers: synchronized GPU timing, environment facts for ``extra_info``."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def env_info(device: torch.device | str = "cpu") -> dict:
    """Device name and library versions, recorded with every benchmark."""
    device = torch.device(device)
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def gpu_time_ms(fn, warmup: int = 10, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU (triton.testing.do_bench: L2 flushed, CUDA events)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median"))
    except ImportError:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)


def cpu_time_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_gpu(benchmark, fn, rounds: int = 20, **extra) -> float:
    """Run ``fn`` under pytest-benchmark with a sync per round, and record the do_bench median in extra_info."""
    ms = gpu_time_ms(fn)

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(env_info("cuda"))
    benchmark.extra_info.update(extra)
    benchmark.extra_info["ms"] = ms
    return ms


def bench_cpu(benchmark, fn, nbytes: int, **extra) -> None:
    """Run ``fn`` under pytest-benchmark on the CPU and record the environment, ``extra``, the bytes it moves and
    the GB/s of the benchmark's median (a smoke entry: this shared 2-core machine's absolute times are noise)."""
    benchmark(fn)
    benchmark.extra_info.update(env_info("cpu"))
    benchmark.extra_info.update(extra, bytes=nbytes, GBps=nbytes / (benchmark.stats.stats.median * 1e9))


def copy_bandwidth_gbps(nbytes: int, device="cuda") -> float:
    """Device copy bandwidth in GB/s (bytes read + written per second) of a copy that moves ``nbytes`` in total:
    the memory-bound ceiling for a kernel with the same traffic."""
    src = torch.empty(max(1, nbytes // 4), dtype=torch.int16, device=device)  # nbytes/2 read + nbytes/2 written
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 4 * src.numel() / ms / 1e6


def impl_fn(impl: str, ours, reference, args: tuple, compiled: dict):
    """A zero-argument callable for one benchmark impl: ``ours(*args)`` for our op, ``reference(*args)`` for
    "torch", and for "torch_compile" the reference through torch.compile (compiled once per ``compiled`` cache and
    run once here, so that compiling stays outside the timing)."""
    if impl == "torch":
        return lambda: reference(*args)
    if impl != "torch_compile":
        return lambda: ours(*args)
    if "fn" not in compiled:
        compiled["fn"] = torch.compile(reference, dynamic=False)
    fn = compiled["fn"]
    fn(*args)
    return lambda: fn(*args)
