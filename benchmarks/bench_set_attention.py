"""Set-attention benchmarks (pytest-benchmark): ours (Triton, CUDA when built) vs torch SDPA per backend.

    pytest benchmarks/bench_set_attention.py --benchmark-only

GPU benches (marked ``gpu``; skipped without CUDA) time each backend with ``benchmark.pedantic`` (a CUDA sync inside
every round, so pytest-benchmark's own statistics are real GPU time) and record the ``triton.testing.do_bench`` median,
TFLOP/s (forward 4·B·H·(ng·L)²·D, forward+backward 3.5x), the ratio to the best SDPA backend measured in the same
run, device and versions in ``benchmark.extra_info``. A CPU bench of backend "torch" at a tiny shape gives CPU runs
content (the Triton interpreter is far too slow to benchmark).
"""
from __future__ import annotations

import pytest
import torch

import attention_sweep as sw

GPU = torch.cuda.is_available()
REP_MS = 40  # do_bench repetition time: the whole GPU file stays around 90 s


def _ours():
    return sw.available_ours() if GPU else ["triton"]


def _sync_fn(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


_SDPA_BEST: dict[tuple, float] = {}  # (L, D, ng, dtype, mode) -> best SDPA median ms measured in this run


def _sdpa_best(L, D, ng, dtype, mode):
    """The best SDPA backend's do_bench median on this shape (measured once per run, on the same card)."""
    key = (L, D, ng, dtype, mode)
    if key not in _SDPA_BEST:
        qkv, q, k, v = sw.make_inputs(sw.SETS, ng, L, sw.HEADS, D, dtype, requires_grad=(mode != "fwd"))
        do = torch.randn(sw.SETS * ng, L, sw.HEADS * D, device=sw.DEVICE, dtype=dtype) if mode != "fwd" else None
        best = float("inf")
        for b in sw.SDPA_BACKENDS:
            if b == "math" and ng * L > sw.MATH_MAX_TOKENS:
                continue
            try:
                fn, _ = sw.build_fn(f"sdpa-{b}", q, k, v, ng, sw.HEADS, mode, qkv=qkv, do=do)
                best = min(best, sw.time_ms(fn, rep_ms=REP_MS))
            except RuntimeError:
                continue
        _SDPA_BEST[key] = best
    return _SDPA_BEST[key]


def _bench_gpu(benchmark, backend, L, D, ng, dtype, mode, *, compare=True, set_mask=None, **launch):
    qkv, q, k, v = sw.make_inputs(sw.SETS, ng, L, sw.HEADS, D, dtype, requires_grad=(mode != "fwd"))
    do = torch.randn(sw.SETS * ng, L, sw.HEADS * D, device=sw.DEVICE, dtype=dtype) if mode != "fwd" else None
    try:
        fn, _ = sw.build_fn(backend, q, k, v, ng, sw.HEADS, mode, qkv=qkv, do=do, set_mask=set_mask, **launch)
    except RuntimeError as e:  # an SDPA backend without support for this shape/dtype
        pytest.skip(f"{backend} does not run this case: {str(e).splitlines()[0][:120]}")
    ms = sw.time_ms(fn, rep_ms=REP_MS)
    fl = sw.flops(sw.SETS, sw.HEADS, ng, L, D, mode)
    benchmark.extra_info.update(sw.versions())
    benchmark.extra_info.update({
        "backend": backend, "L": L, "D": D, "ng": ng, "B": sw.SETS, "H": sw.HEADS, "dtype": str(dtype), "mode": mode,
        "ms": ms, "ms_median_do_bench": ms, "tflops": fl / ms * 1e-9, **{k: str(v) for k, v in launch.items()},
    })
    if compare:
        best = _sdpa_best(L, D, ng, dtype, mode)
        benchmark.extra_info["best_sdpa_ms"] = best
        benchmark.extra_info["speedup_vs_best_sdpa"] = best / ms
    rounds = max(3, min(50, int(200 / max(ms, 1e-3))))
    benchmark.pedantic(_sync_fn(fn), rounds=rounds, iterations=1, warmup_rounds=1)


BACKENDS = ["triton", "cuda", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math"]


def _backend_params():
    out = []
    for b in BACKENDS:
        marks = [pytest.mark.gpu]
        if b in ("triton", "cuda"):
            ok = b in _ours() if GPU else b == "triton"
            marks.append(pytest.mark.skipif(not ok, reason=f"backend {b} is not available"))
        out.append(pytest.param(b, id=b, marks=marks))
    return out


SHAPE_IDS = [f"L{L}-D{D}" for L, D in sw.SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("ng", sw.NGS, ids=[f"ng{g}" for g in sw.NGS])
@pytest.mark.parametrize("L, D", sw.SHAPES, ids=SHAPE_IDS)
def test_fwd_bf16(benchmark, backend, L, D, ng):
    if backend == "sdpa-math" and ng * L > sw.MATH_MAX_TOKENS:
        pytest.skip("math backend only at small sequence lengths")
    benchmark.group = f"set-attention fwd bf16 L={L} D={D} ng={ng}"
    _bench_gpu(benchmark, backend, L, D, ng, torch.bfloat16, "fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("L, D", sw.SHAPES, ids=SHAPE_IDS)
def test_fwd_bwd_bf16_ng2(benchmark, backend, L, D):
    if backend == "sdpa-math" and 2 * L > sw.MATH_MAX_TOKENS:
        pytest.skip("math backend only at small sequence lengths")
    benchmark.group = f"set-attention fwd+bwd bf16 L={L} D={D} ng=2"
    _bench_gpu(benchmark, backend, L, D, 2, torch.bfloat16, "fwd+bwd")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("L, D", sw.SHAPES, ids=SHAPE_IDS)
def test_fwd_fp16_ng2(benchmark, backend, L, D):
    if backend == "sdpa-math" and 2 * L > sw.MATH_MAX_TOKENS:
        pytest.skip("math backend only at small sequence lengths")
    benchmark.group = f"set-attention fwd fp16 L={L} D={D} ng=2"
    _bench_gpu(benchmark, backend, L, D, 2, torch.float16, "fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "padded"])
@pytest.mark.parametrize("L, D", [(4096, 40), (1024, 80), (256, 160)], ids=["L4096-D40", "L1024-D80", "L256-D160"])
def test_head_dim_chunked_vs_padded(benchmark, L, D, chunked):
    """What splitting D into power-of-two chunks buys over padding it (40 -> 64, 80 -> 128, 160 -> 256)."""
    benchmark.group = f"head-dim chunked vs padded fwd bf16 L={L} D={D} ng=2"
    _bench_gpu(benchmark, "triton", L, D, 2, torch.bfloat16, "fwd", compare=False, chunk_head_dim=chunked)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["full", "blockdiag", "oneway"])
def test_block_diagonal_mask_cost(benchmark, mask):
    """A block-diagonal mask over ng = 4 images (run as per-image attention) and a one-way mask (every image attends
    image 0 only: the kernel skips the other images' key tiles, walking its image lists) both have 1/4 of full
    attention's work: each should cost ~1/4 of it."""
    ng = 4
    set_mask = sw.set_mask_of(mask, ng)
    benchmark.group = "set_mask cost fwd bf16 L=1024 D=80 ng=4"
    _bench_gpu(benchmark, "triton", 1024, 80, ng, torch.bfloat16, "fwd", compare=False, set_mask=set_mask)


@pytest.mark.gpu
def test_peak_memory_ng16(benchmark):
    """ng = 16 images of L = 4096 tokens (65,536 tokens per set): peak memory stays O(tokens), far below the 2·H·T²
    bytes dense scores would take."""
    row = sw.peak_memory_row()
    benchmark.extra_info.update(sw.versions())
    benchmark.extra_info.update(row)
    for key, val in row.items():
        if key.startswith("peak_extra_bytes"):
            assert val < row["dense_scores_bytes"] / 100, f"{key} = {val} bytes looks quadratic"
    qkv, q, k, v = sw.make_inputs(1, 16, 4096, sw.HEADS, 40, torch.bfloat16)
    fn, _ = sw.build_fn(_ours()[0], q, k, v, 16, sw.HEADS, "fwd")
    benchmark.pedantic(_sync_fn(fn), rounds=3, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------------------------------
# CPU content: backend "torch" (SDPA) at a tiny shape
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cpu_torch_backend_tiny(benchmark, mode):
    import jedi_kernels as jk

    B, ng, L, H, D = 1, 2, 64, 2, 40
    qkv = torch.randn(B * ng, L, 3 * H * D, requires_grad=(mode != "fwd"))
    q, k, v = qkv.chunk(3, dim=-1)
    do = torch.randn(B * ng, L, H * D)

    def run():
        out = jk.set_attention(q, k, v, ng, H, backend="torch")
        if mode != "fwd":
            torch.autograd.grad(out, qkv, do)
        return out

    benchmark.group = "set-attention CPU backend=torch tiny"
    benchmark.extra_info.update({"backend": "torch", "device": "cpu", "torch": torch.__version__, "L": L, "D": D,
                                 "ng": ng, "mode": mode, "gflop": sw.flops(B, H, ng, L, D, mode) * 1e-9})
    benchmark(run)
