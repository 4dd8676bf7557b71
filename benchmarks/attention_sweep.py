"""Set-attention sweep on a GPU: our kernels (Triton, and CUDA when built) against torch SDPA's backends.

    python benchmarks/attention_sweep.py --out benchmarks/results/h100-2026-11-27-attention.json [--quick]

Writes one JSON list of rows (shape, dtype, pass, ms per backend, TFLOP/s, ratio to the best SDPA backend, max abs
difference to SDPA's output; where the Triton autotuner first met the shape, ``triton_autotune``: every config's time
and the winner). Shapes are Stable Diffusion v1's self-attention layers: (L, D) in (4096, 40), (1024, 80),
(256, 160), (64, 160) with H = 8 heads, B = 2 sets of ng images (joint attention over ng·L tokens). ``--quick`` runs
the essential set (forward bf16 at every shape and ng, forward+backward and fp16 at ng = 2, chunked vs padded head
dims at d 40/80, peak memory at ng 16) in <= 120 s on an H100 (estimated), Triton compilation and autotuning included.

FLOPs: forward 4·B·H·(ng·L)²·D; backward 2.5x that, so forward+backward counts 3.5x.
The helpers here are shared with ``bench_set_attention.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time

import torch

SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (L, D) of SD v1's attn1 layers at 512x512
HEADS = 8
SETS = 2  # B
NGS = (1, 2, 4, 8)
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
MATH_MAX_TOKENS = 2048  # the math backend materializes (ng·L)² scores: only small sequences
DEVICE = "cuda"  # a CPU dry run of the plumbing sets "cpu"


def versions() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    cap = "sm%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "cpu"
    return {"device": dev, "capability": cap, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def flops(B: int, H: int, ng: int, L: int, D: int, mode: str) -> float:
    fwd = 4.0 * B * H * (ng * L) ** 2 * D
    return fwd if mode == "fwd" else 3.5 * fwd


def make_inputs(B, ng, L, H, D, dtype, device=None, requires_grad=False, seed=0):
    """q, k, v (N, L, H*D) as chunks of one fused qkv projection output (the layout SetAttention produces)."""
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B * ng, L, 3 * H * D, device=device, dtype=dtype, generator=g)
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.chunk(3, dim=-1)
    return qkv, q, k, v


def sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_set_attention(q, k, v, ng, H, set_mask=None):
    """Joint attention through torch SDPA on (B, H, ng·L, D) views of the (N, L, H·D) projections."""
    N, L, HD = q.shape
    B, D = N // ng, HD // H

    def heads(x):
        # (N, L, H*D) -> (B, ng*L, H, D) -> (B, H, ng*L, D): a view, no copy
        return x.view(B, ng * L, H, D).transpose(1, 2)

    mask = None
    if set_mask is not None:
        mask = set_mask.repeat_interleave(L, 0).repeat_interleave(L, 1)  # dense (ng*L, ng*L): SDPA has no sparsity
    o = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    # (B, H, ng*L, D) -> (B, ng*L, H, D) -> (N, L, H*D)
    return o.transpose(1, 2).reshape(N, L, HD)


def time_ms(fn, rep_ms: int = 60, warmup_ms: int = 20) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def set_mask_of(kind: str, G: int) -> torch.Tensor | None:
    """The sweep's masks over G images: "full" (None), "blockdiag" (identity: each image attends itself) and "oneway"
    (every image attends image 0 only); both masks leave 1/G of full attention's work."""
    if kind == "full":
        return None
    if kind == "blockdiag":
        return torch.eye(G, dtype=torch.bool, device=DEVICE)
    if kind == "oneway":
        m = torch.zeros(G, G, dtype=torch.bool, device=DEVICE)
        m[:, 0] = True
        return m
    raise ValueError(f"unknown mask kind {kind!r}")


def build_fn(backend: str, q, k, v, ng, H, mode: str, qkv=None, do=None, set_mask=None, **launch):
    """A zero-arg callable running one forward (or forward+backward) on ``backend`` ("triton", "cuda", "cuda-splits":
    the CUDA backend with its automatic key splits, ``JEDI_CUDA_FWD_SPLITS=0`` for each call, "cuda-bwdsplit": the CUDA
    backend with its split backward, ``JEDI_CUDA_BWD_SPLIT=1`` around each forward + backward, or
    "sdpa-<cudnn|flash|efficient|math>"); returns (fn, output_of_one_run)."""
    import jedi_kernels as jk

    if backend == "cuda-bwdsplit":
        inner, _ = build_fn("cuda", q, k, v, ng, H, mode, qkv=qkv, do=do, set_mask=set_mask)

        def run_split():
            with _env("JEDI_CUDA_BWD_SPLIT", "1"):
                return inner()

        return run_split, run_split()
    if backend == "cuda-splits":
        def fwd():
            with _env("JEDI_CUDA_FWD_SPLITS", "0"):
                return jk.set_attention(q, k, v, ng, H, set_mask=set_mask, backend="cuda")
    elif backend.startswith("sdpa-"):
        from torch.nn.attention import sdpa_kernel

        enum = sdpa_backend_enum(backend[5:])

        def fwd():
            with sdpa_kernel([enum]):
                return sdpa_set_attention(q, k, v, ng, H, set_mask)
    elif launch:
        from jedi_kernels.ops.set_attention import set_attn_bwd, set_attn_fwd

        D = q.shape[-1] // H

        if mode == "fwd":
            def fwd():
                return set_attn_fwd(q, k, v, ng, H, D**-0.5, set_mask, **launch)[0]
        else:
            def run():
                out, lse = set_attn_fwd(q, k, v, ng, H, D**-0.5, set_mask, **launch)
                set_attn_bwd(do, q, k, v, out, lse, ng, H, D**-0.5, set_mask, **launch)
                return out

            return run, run()
    else:
        def fwd():
            return jk.set_attention(q, k, v, ng, H, set_mask=set_mask, backend=backend)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
    else:
        def run():
            out = fwd()
            torch.autograd.grad(out, qkv, do)
            return out
    return run, run()


def autotune_log() -> list[dict]:
    """The Triton set-attention autotuner's tunings so far (``jedi_kernels.ops.set_attention.autotune_log``)."""
    from jedi_kernels.ops.set_attention import autotune_log as log

    return log()


def available_ours() -> list[str]:
    import jedi_kernels as jk

    avail = jk.available_backends()
    return [b for b in ("triton", "cuda") if avail[b]]


def measure_row(L, D, ng, dtype, mode, *, B=SETS, H=HEADS, rep_ms=60, set_mask=None, label=None) -> dict:
    """One sweep row: every available backend on one shape; ms, TFLOP/s, ratio to the best SDPA backend."""
    qkv, q, k, v = make_inputs(B, ng, L, H, D, dtype, requires_grad=(mode != "fwd"))
    do = torch.randn(B * ng, L, H * D, device=DEVICE, dtype=dtype) if mode != "fwd" else None
    fl = flops(B, H, ng, L, D, mode)
    row = {"L": L, "D": D, "ng": ng, "B": B, "H": H, "tokens": ng * L, "dtype": str(dtype).replace("torch.", ""),
           "mode": mode, "mask": label or ("none" if set_mask is None else "custom"), "ms": {}, "tflops": {},
           "max_abs_diff_vs_sdpa": {}, "errors": {}}
    outs = {}
    names = [f"sdpa-{b}" for b in SDPA_BACKENDS if b != "math" or ng * L <= MATH_MAX_TOKENS] + available_ours()
    n_tuned = len(autotune_log())
    for name in names:
        try:
            fn, out = build_fn(name, q, k, v, ng, H, mode, qkv=qkv, do=do, set_mask=set_mask)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ms = time_ms(fn, rep_ms=rep_ms)
        except Exception as e:  # an SDPA backend without support for this shape/dtype; a failing kernel is recorded
            row["errors"][name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            continue
        row["ms"][name] = ms
        row["tflops"][name] = fl / ms * 1e-9
        outs[name] = out.detach()
    tuned = autotune_log()[n_tuned:]
    if tuned:  # the Triton autotuner's first sight of these shapes: every config's time and the winner
        row["triton_autotune"] = tuned
    best, ratios = _vs_best_sdpa(row["ms"])
    if best:
        row["best_sdpa"] = best
        for name, ratio in ratios.items():
            row[f"ratio_{name}"] = ratio
            row["max_abs_diff_vs_sdpa"][name] = float((outs[name].float() - outs[best].float()).abs().max())
    return row


def _vs_best_sdpa(ms: dict) -> tuple:
    """(the fastest SDPA backend among ``ms`` {backend: ms}, or None; {our backend: its time's ratio to that one's}:
    > 1 means ours is faster)."""
    sdpa = {n: t for n, t in ms.items() if n.startswith("sdpa-")}
    if not sdpa:
        return None, {}
    best = min(sdpa, key=sdpa.get)
    return best, {name: sdpa[best] / ms[name] for name in available_ours() if name in ms}


def peak_memory_row(dtype=torch.bfloat16, ng=16, L=4096, D=40, H=HEADS, B=1) -> dict:
    """Peak memory above the inputs for forward and forward+backward at ng·L tokens: O(tokens), never O(tokens²)."""
    import jedi_kernels as jk

    qkv, q, k, v = make_inputs(B, ng, L, H, D, dtype, requires_grad=True)
    do = torch.randn(B * ng, L, H * D, device=DEVICE, dtype=dtype)
    row = {"L": L, "D": D, "ng": ng, "B": B, "H": H, "dtype": str(dtype).replace("torch.", ""),
           "input_bytes": qkv.numel() * qkv.element_size(),
           "dense_scores_bytes": B * H * (ng * L) ** 2 * qkv.element_size()}
    for backend in available_ours():
        # compile and autotune first: the autotuner's benchmarking buffers must not count
        torch.autograd.grad(jk.set_attention(q, k, v, ng, H, backend=backend), qkv, do)
        for mode in ("fwd", "fwd+bwd"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = jk.set_attention(q, k, v, ng, H, backend=backend)
            if mode == "fwd+bwd":
                torch.autograd.grad(out, qkv, do)
            torch.cuda.synchronize()
            row[f"peak_extra_bytes_{backend}_{mode}"] = torch.cuda.max_memory_allocated() - base
            del out
    return row


def chunking_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton forward with the head dim split into power-of-two chunks vs padded to the next power of two."""
    from jedi_kernels.ops.set_attention import head_dim_chunks

    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    row = {"L": L, "D": D, "ng": ng, "B": SETS, "H": HEADS, "dtype": str(dtype).replace("torch.", ""), "mode": "fwd",
           "kind": "head_dim_chunking", "chunks": head_dim_chunks(D, True), "padded_to": head_dim_chunks(D, False)[0]}
    for label, chunked in (("chunked", True), ("padded", False)):
        fn, _ = build_fn("triton", q, k, v, ng, HEADS, "fwd", chunk_head_dim=chunked)
        row[f"ms_{label}"] = time_ms(fn, rep_ms=rep_ms)
    row["speedup_chunked_vs_padded"] = row["ms_padded"] / row["ms_chunked"]
    return row


def bwd_chunking_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton backward alone (dK/dV + dQ kernels, on one forward's out and lse) with the head dim in power-of-two
    chunks (the default at every head dim) vs padded to the next power of two. Only the forward was ever timed both
    ways (padding won at d 40, chunks at d 80); static SASS at d 40 says padding issues ~10 % fewer instructions per
    score but gives the tensor cores 4/3 of the work, which the backward's matmuls (four per score in the dK/dV
    kernel, three in the dQ kernel) may feel."""
    from jedi_kernels.ops.set_attention import head_dim_chunks, set_attn_bwd, set_attn_fwd

    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    scale = D**-0.5
    out, lse = set_attn_fwd(q, k, v, ng, HEADS, scale)
    do = torch.randn_like(out)
    row = {"L": L, "D": D, "ng": ng, "B": SETS, "H": HEADS, "dtype": str(dtype).replace("torch.", ""), "mode": "bwd",
           "kind": "head_dim_chunking_bwd", "chunks": head_dim_chunks(D, True),
           "padded_to": head_dim_chunks(D, False)[0]}
    for label, chunked in (("chunked", True), ("padded", False)):
        fn = functools.partial(set_attn_bwd, do, q, k, v, out, lse, ng, HEADS, scale, chunk_head_dim=chunked)
        row[f"ms_{label}"] = time_ms(fn, rep_ms=rep_ms)
    row["speedup_chunked_vs_padded"] = row["ms_padded"] / row["ms_chunked"]
    return row


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set environment variable ``name`` for the block (the kernels read their variant switches per call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _spying(name: str):
    """Inside the block, calls of ``jedi_kernels.ops.set_attention.<name>`` (a Hopper kernel's launcher) are recorded
    (their last argument, the config) in the list it yields, and still run."""
    from jedi_kernels.ops import set_attention as sa

    calls, real = [], getattr(sa, name)

    def spy(*a, **kw):
        calls.append(a[-1])
        return real(*a, **kw)

    setattr(sa, name, spy)
    try:
        yield calls
    finally:
        setattr(sa, name, real)


def _variant_row(L, D, ng, dtype, rep_ms, backend: str, env: str, variants: dict[str, str], kind: str,
                 mode: str = "fwd") -> dict:
    """Timings of one backend under each value of the environment switch ``env`` ({label: value}), same inputs: a
    row with ms_<label> per variant. ``mode`` "fwd" times the forward, "bwd" the backward op alone on one forward's
    out and lse (a backward switch: the forward's time would only dilute the difference)."""
    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    row = {"L": L, "D": D, "ng": ng, "B": SETS, "H": HEADS, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
           "kind": kind}
    if mode == "bwd":
        from jedi_kernels.ops.set_attention import set_attention_bwd, set_attention_fwd

        out, lse = set_attention_fwd(q, k, v, ng, HEADS, D**-0.5, None, backend)
        bwd = functools.partial(set_attention_bwd, torch.randn_like(out), q, k, v, out, lse, ng, HEADS, D**-0.5, None,
                                backend)
    for label, value in variants.items():
        with _env(env, value):
            fn = bwd if mode == "bwd" else build_fn(backend, q, k, v, ng, HEADS, "fwd")[0]
            row[f"ms_{label}"] = time_ms(fn, rep_ms=rep_ms)
    return row


def rowsum_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton forward with the softmax row sums on the tensor cores (P·1) vs one FADD per element
    (``JEDI_ATTN_ROWSUM``; the static SASS count at d 40 says 530 vs 586 instructions per warp and tile)."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "triton", "JEDI_ATTN_ROWSUM", {"dot": "dot", "fadd": "fadd"},
                       "rowsum_dot_vs_fadd")
    row["speedup_dot_vs_fadd"] = row["ms_fadd"] / row["ms_dot"]
    return row


def triton_fwd_ws_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton forward: the pointer kernel (default) vs the TMA + warp-specialized one (``JEDI_TRITON_FWD_WS=1``;
    head dims <= 64 on sm_90). The ncu counters of 2026-11-27 put the default at 40 % tensor-pipe and 45 % exp-unit
    activity against cuDNN's 52 % / 54 % with a producer warpgroup: the WS kernel has that structure."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "triton", "JEDI_TRITON_FWD_WS", {"pointer": "0", "ws": "1"},
                       "triton_fwd_ws")
    row["speedup_ws_vs_default"] = row["ms_pointer"] / row["ms_ws"]
    return row


def cuda_row_blocks_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA forward with 16 vs 32 query rows per warp (``JEDI_CUDA_FWD_ROW_BLOCKS`` 1 / 2; head dims <= 80 and 160
    have both, 32 the default up to 80 and at 160 for sets of more than 1024 keys). Static SASS per 1024 scores of a
    full key tile, sm_90: d 40 484 vs 383 instructions, d 80 614 vs 501 (before the lazy rescale); registers 128 / 221
    and 175 / 240 (8 resident warps per SM with 32 rows); d 160 (32-key tiles with 32 rows) 543 vs 590 inside an
    image, ldmatrix 90 vs 60, 222 / 255 registers (8 warps per SM either way). The second H100 run measured 32 rows
    x1.09 at d 40 and x1.55 at d 80; the H200's third run x1.38 at d 160, L 256, set size 8."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_FWD_ROW_BLOCKS", {"16rows": "1", "32rows": "2"},
                       "cuda_fwd_rows_per_warp")
    row["speedup_32_vs_16rows"] = row["ms_16rows"] / row["ms_32rows"]
    return row


def cuda_fwd_stages_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA forward: FlashAttention-2's loop (1 stage, the default) vs the software-pipelined one (``JEDI_CUDA_FWD_STAGES``
    1 / 2; padded head dims <= 80) at the default rows per warp (32; for two stages at padded 65-80, 16: the only
    two-stage instance there), plus the pipelined loop at 16 rows per warp (``ms_2stage_16rows``). The H100's ncu
    counters (2026-11-27) had the one-stage kernel at 44 % tensor-pipe and 36 % exp-unit activity, latency-bound: the
    two-stage loop computes the next tile's scores while this tile's exponentials run (the MMAs and MUFUs interleave
    in its SASS), at 12-20 % more instructions per score."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_FWD_STAGES", {"1stage": "1", "2stage": "2"},
                       "cuda_fwd_stages")
    with _env("JEDI_CUDA_FWD_ROW_BLOCKS", "1"):
        row["ms_2stage_16rows"] = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_FWD_STAGES", {"x": "2"},
                                               "cuda_fwd_stages")["ms_x"]
    row["speedup_2_vs_1stage"] = row["ms_1stage"] / row["ms_2stage"]
    return row


def cuda_fwd_splits_row(L, D, ng=1, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA forward with its keys split over several CTAs per query tile (``JEDI_CUDA_FWD_SPLITS``: 0 = the
    automatic count, which splits only grids that fill less than 80 % of one wave; unset or 1 = never, the default
    since the H200's third run; 2, 4 = forced), with
    torch's FA2 backend on the same inputs (``ms_fa2``): the shapes of issue 4's matrix where one wave of CTAs walks
    every key tile in turn (d 80, L 1024, set size 1: 128 CTAs of 16 tiles, 0.039 ms on the H100 against FA2's 0.038,
    which splits there). The mma.sync kernel throughout (JEDI_CUDA_FWD_WGMMA=0; the Hopper forward has no splits)."""
    with _env("JEDI_CUDA_FWD_WGMMA", "0"):
        row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_FWD_SPLITS",
                           {"auto": "0", "off": "", "s2": "2", "s4": "4"}, "cuda_fwd_splits")
    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    with contextlib.suppress(Exception):  # FA2 may not take the shape
        row["ms_fa2"] = time_ms(build_fn("sdpa-flash", q, k, v, ng, HEADS, "fwd")[0], rep_ms=rep_ms)
    row["speedup_auto_vs_off"] = row["ms_off"] / row["ms_auto"]
    if "ms_fa2" in row:
        row["speedup_auto_vs_fa2"] = row["ms_fa2"] / row["ms_auto"]
    return row


def _hopper_summary(row: dict, out, ref, labels: tuple, tag: str, base: str) -> dict:
    """A Hopper-forward row's verdict: its output's max |diff| from cuDNN's, the fastest of ``labels``
    (``best_<tag>``), its speedups over the row's ``base`` kernel and cuDNN, and its TFLOP/s."""
    row["max_abs_diff_vs_cudnn"] = float((out.float() - ref.float()).abs().max())
    best = min(labels, key=lambda n: row[f"ms_{n}"])
    row[f"best_{tag}"] = best
    row[f"speedup_{tag}_vs_{base}"] = row[f"ms_{base}"] / row[f"ms_{best}"]
    row[f"speedup_{tag}_vs_cudnn"] = row["ms_cudnn"] / row[f"ms_{best}"]
    work = flops(SETS, HEADS, row["ng"], row["L"], row["D"], "fwd")
    row[f"tflops_best_{tag}"] = work / (row[f"ms_{best}"] * 1e-3) / 1e12
    return row


def cuda_wgmma_fwd_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA forward: the mma.sync kernel vs the Hopper one (``JEDI_CUDA_FWD_WGMMA`` 1 / 2 / 3 / 4 / 5: 64 keys x 2
    warpgroups, 128 x 2, 128 x 3, 128 x 1, 64 x 1; warpgroup MMAs with the softmax overlapping the P V product;
    sm_90a, head dims 40 (all five), 80 (1, 2, 5) and 160 (1): only the compiled ones are timed), and cuDNN SDPA on the
    same inputs (``ms_cudnn``, the number to beat: 0.575 ms at L 4096 D 40 ng 2 bf16 on the H200). Static SASS per
    1024 scores of a tile inside an image (tools/sass_loop_mix.py --wgmma, since the twentieth session): d 40 236 /
    184 / 178 / 189 / 248, d 80 252 / 188 / - / - / 256, d 160 270, against 32 MUFU x 8 = 256 exp-unit clocks;
    resident warps per SM at d 40: 16 / 8 / 12 / 12 / 16, at d 80: 8 / 8 / - / - / 12."""
    from jedi_kernels.cuda_variants import wgmma_labels

    labels = wgmma_labels(D)  # labels "wg<keys>x<warpgroups>" of the variants compiled at D
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_FWD_WGMMA", {"mmasync": "0", **labels},
                       "cuda_fwd_wgmma")
    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    cudnn, ref = build_fn("sdpa-cudnn", q, k, v, ng, HEADS, "fwd")
    row["ms_cudnn"] = time_ms(cudnn, rep_ms=rep_ms)
    with _env("JEDI_CUDA_FWD_WGMMA", "1"):  # the variant ran (the profiler's kernel names), and its output agrees
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = build_fn("cuda", q, k, v, ng, HEADS, "fwd")[1]
            torch.cuda.synchronize()
    row["wgmma_ran"] = any("wgmma" in e.name for e in prof.events())
    return _hopper_summary(row, out, ref, tuple(labels) or ("mmasync",), "wgmma", "mmasync")


def triton_gluon_fwd_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton forward: the pointer kernel (the default) vs the Gluon Hopper one (``JEDI_TRITON_FWD_GLUON`` 1 / 2 /
    3 / 4 / 5: 128 queries x 128 keys over 2 warpgroups, 128 x 64, 64 x 128 over 1, config 1 with its MMAs over the
    whole padded box instead of 32 + 16 columns (``speedup_split_vs_padded``), config 1 warp-specialized (a TMA
    producer warpgroup, consumers synchronized by mbarriers only), and that with ping-pong (``gl128x128pp``: the
    consumers take turns issuing their products); warpgroup MMAs with the softmax of S_t
    running while P_{t-1} V_{t-1} is on the tensor cores, TMA loads into a ring of mbarrier-tracked buffers; sm_90,
    head dims <= 64 in a power-of-two box (40 -> 64)), and cuDNN SDPA on the same inputs (``ms_cudnn``; issue 3's
    target at L 4096 D 40 ng 2 bf16 is 0.45 ms, cuDNN 0.603 on the third H100 run). Static SASS per 1024 scores of a
    full tile, config 1: 276 instructions (padded: 266) against 32 MUFU x 8 = 256 exp-unit clocks and ~184 (padded
    ~246) tensor clocks."""
    from jedi_kernels.ops.set_attention_gluon import checked_configs

    # the configs the probe found agreeing (JEDI_GLUON_CONFIGS, set by gpu_check.sh when some did not), else all
    configs = {"gl128x128": "1", "gl128x64": "2", "gl64x128": "3", "gl128x128pad": "4", "gl128x128ws": "5",
               "gl128x128pp": "6"}
    configs = {label: c for label, c in configs.items() if int(c) in checked_configs()}
    row = _variant_row(L, D, ng, dtype, rep_ms, "triton", "JEDI_TRITON_FWD_GLUON", {"pointer": "0", **configs},
                       "triton_fwd_gluon")
    _, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype)
    cudnn, ref = build_fn("sdpa-cudnn", q, k, v, ng, HEADS, "fwd")
    row["ms_cudnn"] = time_ms(cudnn, rep_ms=rep_ms)
    # the Gluon kernel ran, and its output agrees with cuDNN's (the first checked config)
    with _spying("set_attn_fwd_gluon") as calls, _env("JEDI_TRITON_FWD_GLUON", next(iter(configs.values()))):
        out = build_fn("triton", q, k, v, ng, HEADS, "fwd")[1]
        torch.cuda.synchronize()
    row["gluon_ran"] = bool(calls)
    if "ms_gl128x128pad" in row and "ms_gl128x128" in row:  # issue 3: chunking vs padding
        row["speedup_split_vs_padded"] = row["ms_gl128x128pad"] / row["ms_gl128x128"]
    return _hopper_summary(row, out, ref, tuple(configs), "gluon", "pointer")


def triton_gluon_bwd_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton backward: the split pointer kernels (dK/dV, then dQ: 7 matmuls per score; the default) vs the Gluon
    Hopper one (``JEDI_TRITON_BWD_GLUON`` 1 / 2: 128 or 64 keys per program; dK, dV and dQ by float32 atomics in one
    kernel, 5 matmuls per score, every product asynchronous; sm_90, head dims <= 80 / 64), the backward op alone on
    one forward's out and lse (``ms_<label>``); then forward + backward through autograd, ours with the split kernels
    and with the fastest Gluon config against cuDNN SDPA's (``ms_fwdbwd_*``; issue 3 asks ×1.2 cuDNN: at L 4096
    D 40 ng 2 bf16 cuDNN took 2.162 ms on the third H100 run, so <= 1.80 ms), and the Gluon grads' max |diff| from
    cuDNN's."""
    from torch.nn.attention import sdpa_kernel

    import jedi_kernels as jk
    from jedi_kernels.ops.set_attention_gluon_bwd import BWD_CONFIGS, checked_bwd_configs

    # the configs the probe found agreeing (JEDI_GLUON_BWD_CONFIGS, set by gpu_check.sh when not all did), else all
    configs = {f"glbwd{c}": str(c) for c in checked_bwd_configs() if D <= BWD_CONFIGS[c]["MAX_HEAD_DIM"]}
    row = _variant_row(L, D, ng, dtype, rep_ms, "triton", "JEDI_TRITON_BWD_GLUON", {"split": "0", **configs},
                       "triton_bwd_gluon", mode="bwd")
    best = min(configs, key=lambda n: row[f"ms_{n}"])
    row["best_gluonbwd"] = best
    row["speedup_gluonbwd_vs_split"] = row["ms_split"] / row[f"ms_{best}"]
    row["tflops_best_gluonbwd"] = (flops(SETS, HEADS, ng, L, D, "fwd+bwd") - flops(SETS, HEADS, ng, L, D, "fwd")) \
        / (row[f"ms_{best}"] * 1e-3) / 1e12
    qkv, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype, requires_grad=True)
    do = torch.randn_like(q)
    cudnn = build_fn("sdpa-cudnn", q, k, v, ng, HEADS, "fwd+bwd", qkv=qkv, do=do)[0]
    row["ms_fwdbwd_cudnn"] = time_ms(cudnn, rep_ms=rep_ms)
    row["ms_fwdbwd_split"] = time_ms(build_fn("triton", q, k, v, ng, HEADS, "fwd+bwd", qkv=qkv, do=do)[0],
                                     rep_ms=rep_ms)
    with _env("JEDI_TRITON_BWD_GLUON", configs[best]):
        row["ms_fwdbwd_gluon"] = time_ms(build_fn("triton", q, k, v, ng, HEADS, "fwd+bwd", qkv=qkv, do=do)[0],
                                         rep_ms=rep_ms)
        with _spying("set_attn_bwd_gluon") as calls:  # the Gluon kernel ran
            ours = torch.autograd.grad(jk.set_attention(q, k, v, ng, HEADS, backend="triton"), qkv, do)[0]
            torch.cuda.synchronize()
    row["gluonbwd_ran"] = bool(calls)
    with sdpa_kernel([sdpa_backend_enum("cudnn")]):
        ref = torch.autograd.grad(sdpa_set_attention(q, k, v, ng, HEADS, None), qkv, do)[0]
    row["max_abs_diff_vs_cudnn"] = float((ours.float() - ref.float()).abs().max())
    row["speedup_gluonbwd_vs_cudnn"] = row["ms_fwdbwd_cudnn"] / row["ms_fwdbwd_gluon"]  # forward + backward
    return row


def cuda_bwd_warps_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA backward with 4 vs 8 warps per CTA (``JEDI_CUDA_BWD_WARPS`` 4 / 8; padded head dims 80 and 160 have both).
    At 80: 64 or 128 keys per CTA, FlashAttention-2's d 80 shape being the latter. The wider CTA loads each query
    tile once for twice the keys and halves the dQ atomics (84 M -> 42 M float adds at L 1024, ng 2); on the H100
    (2026-11-27) the CUDA forward+backward at d 80 ran 0.88x FA2's. At 160: the same 64 keys, two warps per 16 keys
    on alternate 16-query passes (twenty-sixth session, untimed), for grids of one 4-warp CTA per SM."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_BWD_WARPS", {"4warps": "4", "8warps": "8"},
                       "cuda_bwd_warps", mode="bwd")
    row["speedup_8_vs_4warps"] = row["ms_4warps"] / row["ms_8warps"]
    return row


def cuda_bwd_split_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA backward fused (dQ by float32 atomics from the dK/dV kernel, then a conversion kernel) vs split (the dK/dV
    kernel without its dQ step, then a dQ kernel over the query tiles; ``JEDI_CUDA_BWD_SPLIT`` 0 / 1; twenty-seventh
    session, untimed). On the H200 (ncu, d 80, L 1024, ng 2) our Triton backward, split this way, took 226 µs against
    412 for the CUDA one fused."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_BWD_SPLIT", {"fused": "0", "split": "1"},
                       "cuda_bwd_split", mode="bwd")
    row["speedup_split_vs_fused"] = row["ms_fused"] / row["ms_split"]
    return row


def cuda_bwd_key_blocks_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """CUDA backward with 16 vs 32 keys per warp (``JEDI_CUDA_BWD_KEY_BLOCKS`` 1 / 2; padded head dims <= 48 have
    both): two key blocks share every Q and dO fragment a warp loads, and a CTA's 128 keys halve the dQ atomics."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "cuda", "JEDI_CUDA_BWD_KEY_BLOCKS", {"16keys": "1", "32keys": "2"},
                       "cuda_bwd_keys_per_warp", mode="bwd")
    row["speedup_32_vs_16keys"] = row["ms_16keys"] / row["ms_32keys"]
    return row


def triton_bwd_dq_row(L, D, ng=2, dtype=torch.bfloat16, rep_ms=60) -> dict:
    """Triton backward with dQ by atomics from the dK/dV kernel vs its own kernel (``JEDI_TRITON_BWD_DQ``; atomics
    are the default up to 96 padded columns). Static SASS per 1024 scores, sm_90: d 40 583 vs 763 instructions, d 80
    663 vs 859; the atomics add D·4/BLOCK_N bytes of float32 reductions per score to the L2 traffic."""
    row = _variant_row(L, D, ng, dtype, rep_ms, "triton", "JEDI_TRITON_BWD_DQ",
                       {"atomic": "atomic", "kernel": "kernel"}, "triton_bwd_dq_atomic_vs_kernel", mode="bwd")
    row["speedup_atomic_vs_kernel"] = row["ms_kernel"] / row["ms_atomic"]
    return row


def fast_launch_row(L, D, ng=2, dtype=torch.bfloat16, mode="fwd+bwd", rep_ms=60) -> dict:
    """Eager Triton set attention (``jk.set_attention`` through autograd for "fwd+bwd") with every launch through
    Triton's own path vs cached direct launches (``jedi_kernels.ops.fast_launch``, the default), same inputs. For
    the host-bound rows: on the CI machine's CPU the direct launches cut a forward + backward's host time from ≈ 216
    to ≈ 136 µs (tools/host_overhead.py), and the third H100 run measured 0.652 ms here for ≈ 0.25 ms of kernels."""
    from jedi_kernels.ops import fast_launch

    qkv, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype, requires_grad=(mode != "fwd"))
    do = torch.randn(SETS * ng, L, HEADS * D, device=DEVICE, dtype=dtype) if mode != "fwd" else None
    row = {"L": L, "D": D, "ng": ng, "B": SETS, "H": HEADS, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
           "kind": "fast_launch"}
    for label, on in (("triton_launch", False), ("fast_launch", True)):
        with fast_launch.switched(on):
            fn, _ = build_fn("triton", q, k, v, ng, HEADS, mode, qkv=qkv, do=do)
            row[f"ms_{label}"] = time_ms(fn, rep_ms=rep_ms)
    row["speedup_fast_vs_triton_launch"] = row["ms_triton_launch"] / row["ms_fast_launch"]
    return row


def graph_time_ms(fn, rep_ms: int = 60, stream=None) -> float:
    """Median milliseconds of one fn() replayed inside a CUDA graph: device time, with no host time per call and no
    L2 flush between calls. PyTorch's recipe for capturing a backward: fn() runs three times on a side stream first
    (lazy allocations and library handles outside the capture), the capture is on that stream, and the capture's
    error mode is thread_local (the autograd engine launches the backward kernels from its own thread). One graph
    holds ≈ rep_ms of unrolled calls; 10 replays. ``stream``: the side stream (:func:`graph_row` passes the one its
    inputs and first call ran on; a forward + backward captures only if every leaf's first use was on it)."""
    import statistics

    s = stream if stream is not None else torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            fn()
        t1.record()
    torch.cuda.synchronize()
    est = t0.elapsed_time(t1) / 5
    n = max(1, min(1000, int(rep_ms / est))) if est > 0 else 1000
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
        for _ in range(n):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        g.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / n)
    return float(statistics.median(times))


def _capture_stream():
    """The side stream a CUDA-graph row makes its inputs on, runs its first calls on and captures on (None on the CPU
    dry run)."""
    return torch.cuda.Stream() if DEVICE == "cuda" else None


def graph_backends() -> list[str]:
    """The backends a CUDA-graph row times: SDPA's (not math) and ours."""
    return [f"sdpa-{b}" for b in SDPA_BACKENDS if b != "math"] + available_ours()


def _graph_row_start(L, D, ng, dtype, mode) -> dict:
    return {"L": L, "D": D, "ng": ng, "B": SETS, "H": HEADS, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
            "kind": "cuda_graph", "ms_graph": {}, "tflops_graph": {}, "errors": {}}


def _graph_row_finish(row: dict) -> dict:
    """TFLOP/s and the ratios to the best SDPA backend of a row whose ``ms_graph`` is filled in."""
    fl = flops(row["B"], row["H"], row["ng"], row["L"], row["D"], row["mode"])
    row["tflops_graph"] = {name: fl / ms * 1e-9 for name, ms in row["ms_graph"].items()}
    best, ratios = _vs_best_sdpa(row["ms_graph"])
    if best:
        row["best_sdpa_graph"] = best
        row.update({f"ratio_graph_{name}": ratio for name, ratio in ratios.items()})
    return row


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def graph_row(L, D, ng=2, dtype=torch.bfloat16, mode="fwd+bwd", rep_ms=60, backends=None, stop_on_error=False) -> dict:
    """Every backend of :func:`measure_row` (or ``backends``) on one shape, each call replayed from a CUDA graph: the
    kernels' device time, which the eager rows cannot show where the host is slower than the GPU. The third H100 run
    timed the eager Triton forward + backward at d 80, L 1024, ng 2 at 0.652 ms against cuDNN's 0.280, for ≈ 0.25 ms
    of our kernels: whether ours lose there on the device or only on the host is what this row says. Without an L2
    flush between calls (a graph replays them back to back) the small shapes run from a warm L2, ours and SDPA's
    alike. ``ms_graph`` / ``ratio_graph_<ours>`` (> 1: ours faster than the best SDPA backend, both graphed); a backend
    that cannot be captured gets an entry in ``errors`` (``stop_on_error``: and no later backend runs, as a failed
    capture can leave the process's CUDA state unusable; :func:`graph_rows_isolated` runs the rest in a new process).

    Everything runs on one side stream: the inputs, each backend's first (eager) call, the warm-up and the capture.
    The autograd engine remembers the stream of a leaf's first use and, at the end of every backward, makes the
    caller's stream wait on it; a leaf first used on the default stream pulls that stream into a capture on the side
    stream and invalidates it. That is what failed every fwd+bwd capture on the H200 (2026-11-28, two runs: "operation
    failed due to a previous error during capture", for SDPA's backends and ours alike; PyTorch PRs 180090 and 189591
    describe the same pattern)."""
    stream = _capture_stream()
    on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    row = _graph_row_start(L, D, ng, dtype, mode)
    with on_stream:
        if stream is not None:
            stream.wait_stream(torch.cuda.default_stream())
        qkv, q, k, v = make_inputs(SETS, ng, L, HEADS, D, dtype, requires_grad=(mode != "fwd"))
        do = torch.randn(SETS * ng, L, HEADS * D, device=DEVICE, dtype=dtype) if mode != "fwd" else None
        for name in backends if backends is not None else graph_backends():
            try:
                fn, _ = build_fn(name, q, k, v, ng, HEADS, mode, qkv=qkv, do=do)  # one eager call: compiles, tunes
                torch.cuda.synchronize()
                ms = graph_time_ms(fn, rep_ms=rep_ms, stream=stream)
            except Exception as e:  # a backend that cannot be captured (or cannot run the shape): recorded, not fatal
                row["errors"][name] = _error_text(e)
                with contextlib.suppress(Exception):  # (a failed capture's error surfaces here, if anywhere)
                    torch.cuda.synchronize()
                if stop_on_error:
                    break
                continue
            row["ms_graph"][name] = ms
    return _graph_row_finish(row)


def _run_graph_child(items: list, rep_ms: int, timeout_s: float) -> tuple[list, int, str]:
    """Run ``items`` ([L, D, mode, backend], ...) in a fresh process (``--graph-items``): (its results in order, one
    per item it finished: {"ms": ...} or {"error": ...}; its exit status, 124 if it outran ``timeout_s``; the tail
    of its output). It stops after the first failed item (exit status 3)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "items.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--graph-items", json.dumps(items), "--rep-ms", str(rep_ms),
               "--out", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-600:]
        except subprocess.TimeoutExpired as e:
            rc, tail = 124, (str(e.stdout or "") + str(e.stderr or ""))[-600:]
        results = []
        with contextlib.suppress(OSError, ValueError):
            with open(out) as f:
                results = json.load(f)
    return results, rc, tail


def graph_rows_isolated(specs, rep_ms: int = 60, timeout_s: float = 120, run_child=None) -> list[dict]:
    """:func:`graph_row` for each (L, D, mode) or (L, D, mode, ng) of ``specs`` (ng 2 when absent; bf16), every
    backend's capture in a child process that stops at its first failure, the next child going on after it: on the
    H200 (2026-11-28) the first fwd+bwd capture failed, every later capture in the process failed with it ("operation
    failed due to a previous error during capture"), and the next row's torch.randn raised ("Offset increment outside
    graph capture"), which ended the sweep. A child that crashes or hangs costs its item an error entry, nothing
    else. ``timeout_s`` bounds all children together; items left when it runs out get an error entry. Forward specs
    also time "cuda-splits", forward + backward specs "cuda-bwdsplit" (see :func:`build_fn`), after every spec's own
    backends."""
    run_child = run_child or _run_graph_child
    specs = [(s[0], s[1], s[2], s[3] if len(s) > 3 else 2) for s in specs]
    items = [[L, D, mode, name, ng] for L, D, mode, ng in specs for name in graph_backends()]
    # the CUDA forward with its automatic key splits (opt-in since the H200's third run, where they lost because of
    # their merge kernel, now rewritten) beside the default, on every forward spec: the graphed device time of the
    # whole split path, workspace and merge included
    items += [[L, D, mode, "cuda-splits", ng] for L, D, mode, ng in specs
              if mode == "fwd" and "cuda" in graph_backends()]
    # the CUDA split backward (opt-in, twenty-seventh session: dK/dV kernel without the dQ step, then a dQ kernel; no
    # float32 atomics) on every forward + backward spec
    items += [[L, D, mode, "cuda-bwdsplit", ng] for L, D, mode, ng in specs
              if mode != "fwd" and "cuda" in graph_backends()]
    results: list = []
    deadline = time.time() + timeout_s
    empty = 0  # children in a row that wrote nothing
    while len(results) < len(items):
        left = deadline - time.time()
        if left < 5:
            results += [{"error": "skipped: the graph rows' time ran out"}] * (len(items) - len(results))
            break
        got, rc, tail = run_child(items[len(results):], rep_ms, left)
        results += got[: len(items) - len(results)]
        empty = 0 if got else empty + 1
        if len(results) < len(items) and (not got or "error" not in got[-1]):
            # died (or timed out) inside an item without writing it
            results.append({"error": f"child process exited {rc} during this item: {tail.strip()[-300:]}"})
            if empty >= 2:  # two children failed before their first result: they cannot run here
                results += [{"error": f"skipped: two child processes in a row wrote nothing (exit {rc})"}] * (
                    len(items) - len(results))
    rows = []
    for L, D, mode, ng in specs:
        row = _graph_row_start(L, D, ng, torch.bfloat16, mode)
        row["isolated"] = True
        for (iL, iD, imode, name, ing), res in zip(items, results):
            if (iL, iD, imode, ing) == (L, D, mode, ng):
                if "ms" in res:
                    row["ms_graph"][name] = res["ms"]
                else:
                    row["errors"][name] = res["error"]
        rows.append(_graph_row_finish(row))
    return rows


def graph_items_main(items: list, rep_ms: int, out: str) -> int:
    """The child of :func:`graph_rows_isolated`: time each [L, D, mode, backend, ng] item (ng 2 when absent) from a
    CUDA graph, writing the results after each; exit 3 after the first failure."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    results = []
    for L, D, mode, name, *rest in items:
        ng = rest[0] if rest else 2
        row = graph_row(L, D, ng=ng, mode=mode, rep_ms=rep_ms, backends=[name], stop_on_error=True)
        results.append({"ms": row["ms_graph"][name]} if name in row["ms_graph"] else {"error": row["errors"][name]})
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, out)
        if "error" in results[-1]:
            return 3
    return 0


def warm_gpu(seconds: float = 0.5) -> None:
    """Keep the GPU busy with fp16 matmuls for ``seconds`` before the first timed row: in the third H100 run the
    sweep's first measurement (cuDNN, d 40, ng 1) read 0.450 ms where the two runs before read 0.161, and no later row
    was off like that (clocks ramping up after the previous step's idle gap, most likely)."""
    if DEVICE != "cuda" or not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.float16)
    t = time.time()
    while time.time() - t < seconds:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def sweep(quick: bool, rep_ms: int, save=None) -> list[dict]:
    """Every row of the report, the dispatch-deciding ones first; ``save(rows)`` runs after each new row, so a run cut
    short (gpu_check.sh gives the sweep a fixed time) keeps what it measured."""
    rows = []
    warm_gpu()

    def add(row: dict) -> None:
        rows.append(row)
        if save is not None:
            save(rows)

    plan = []
    for L, D in SHAPES:
        for ng in NGS:
            plan.append((L, D, ng, torch.bfloat16, "fwd"))
        plan.append((L, D, 2, torch.bfloat16, "fwd+bwd"))
        plan.append((L, D, 2, torch.float16, "fwd"))
        if not quick:
            plan.append((L, D, 2, torch.float16, "fwd+bwd"))
            plan.append((L, D, 4, torch.bfloat16, "fwd+bwd"))
    for L, D, ng, dtype, mode in plan:
        t = time.time()
        row = measure_row(L, D, ng, dtype, mode, rep_ms=rep_ms)
        row["wall_s"] = time.time() - t
        add(row)
        ours = {n: f"{row['ms'][n]:.3f}ms x{row.get('ratio_' + n, float('nan')):.2f}" for n in available_ours()
                if n in row["ms"]}
        best = row.get("best_sdpa")
        best_ms = f"{row['ms'][best]:.3f}ms" if best else "-"
        print(f"L={L:5d} D={D:3d} ng={ng} {row['dtype']:8s} {mode:8s} best SDPA {best} {best_ms} | ours {ours} "
              f"errors {list(row['errors'])} ({row['wall_s']:.1f}s)", flush=True)
    import jedi_kernels as jk

    if jk.available_backends()["cuda_attention"]:
        # the CUDA forward's key splits (new, never timed; a few seconds) on issue 4's small-grid shapes
        for L, D, ng in ((1024, 80, 1), (256, 160, 1), (256, 160, 2), (64, 160, 4), (1024, 80, 2)):
            add(cuda_fwd_splits_row(L, D, ng=ng, rep_ms=rep_ms))
            r = rows[-1]
            print(f"CUDA forward key splits, L={L} D={D} ng={ng}: "
                  f"{ {k[3:]: round(v, 4) for k, v in r.items() if k.startswith('ms_')} } "
                  f"auto x{r['speedup_auto_vs_off']:.2f} vs off, x{r.get('speedup_auto_vs_fa2', float('nan')):.2f} "
                  f"vs FA2", flush=True)
    # the two Hopper forwards (new, never timed) right after the dispatch rows: a cut-short sweep must not lose them.
    # JEDI_SWEEP_GLUON=0 (gpu_check.sh, when tools/ws_probe.py --kernel gluon did not finish) skips the Gluon one
    d40 = [(4096, 40, 2, torch.bfloat16), (4096, 40, 2, torch.float16), (4096, 40, 1, torch.bfloat16),
           (4096, 40, 4, torch.bfloat16)]
    hopper = []
    if jk.available_backends()["cuda_attention"]:
        # and SD's 32x32 / 16x16 levels, where cuDNN beats FA2 1.6-2x on the H200 (Hopper MMAs) and mma.sync does not
        # (d 160 at set sizes 4 and 8: issue 4's forward misses with a full wave of CTAs, 0.90x and 0.96x of FA2 on
        # the H100, which key splits cannot reach)
        hopper.append((cuda_wgmma_fwd_row, d40 + [(1024, 80, 2, torch.bfloat16), (1024, 80, 8, torch.bfloat16),
                                                  (256, 160, 4, torch.bfloat16), (256, 160, 8, torch.bfloat16)],
                       "CUDA forward, Hopper wgmma vs mma.sync", "wgmma", "mmasync", "mma.sync"))
    if "triton" in available_ours() and os.environ.get("JEDI_SWEEP_GLUON", "1") != "0":
        # the Gluon forward also covers d 80 (SD's 32x32 level: 64 + 16 columns)
        hopper.append((triton_gluon_fwd_row, d40 + [(1024, 80, 2, torch.bfloat16)],
                       "Triton forward, Gluon Hopper vs pointer", "gluon", "pointer", "pointer"))
    from jedi_kernels.ops.set_attention_gluon_bwd import checked_bwd_configs

    if jk.available_backends()["cuda_attention"]:
        # 32 query rows per warp at d 160 (opt-in, never timed) on issue 4's full-wave forward misses (H100: x0.90 and
        # x0.96 of FA2 at set sizes 4 and 8), and set size 2 (this sat under the Gluon backward's condition until the
        # twenty-fifth session, so the H200 session runs, which leave the Gluon probes off, never timed it)
        for ng in (4, 8, 2):
            add(cuda_row_blocks_row(256, 160, ng=ng, rep_ms=rep_ms))
            print(f"CUDA forward 32 vs 16 rows per warp, L=256 D=160 ng={ng}: "
                  f"x{rows[-1]['speedup_32_vs_16rows']:.2f}", flush=True)
    if "triton" in available_ours() and os.environ.get("JEDI_SWEEP_GLUON_BWD", "1") != "0" and checked_bwd_configs():
        # the Gluon backward (JEDI_SWEEP_GLUON_BWD=0: its probe did not finish); speedup_gluonbwd_vs_cudnn is forward
        # + backward against cuDNN's
        hopper.append((triton_gluon_bwd_row, [(4096, 40, 2, torch.bfloat16), (4096, 40, 2, torch.float16),
                                              (1024, 80, 2, torch.bfloat16)],
                       "Triton backward, Gluon Hopper vs split pointer kernels", "gluonbwd", "split", "split"))
    for row_fn, shapes, title, tag, base, base_name in hopper:
        for L, D, ng, dtype in shapes:
            add(row_fn(L, D, ng=ng, dtype=dtype, rep_ms=rep_ms))
            r = rows[-1]
            print(f"{title}, L={L} D={D} ng={ng} {r['dtype']}: "
                  f"{ {k[3:]: round(v, 3) for k, v in r.items() if k.startswith('ms_')} } ran={r[f'{tag}_ran']} "
                  f"best {r[f'best_{tag}']} x{r[f'speedup_{tag}_vs_{base}']:.2f} vs {base_name}, "
                  f"x{r[f'speedup_{tag}_vs_cudnn']:.2f} vs cuDNN, {r[f'tflops_best_{tag}']:.0f} TFLOP/s, "
                  f"max|diff| {r['max_abs_diff_vs_cudnn']:.1e}", flush=True)
    # masks with 1/ng of the work; SDPA can only apply them densely. Our backends run the block-diagonal (identity)
    # mask as per-image attention; the one-way mask (every image attends image 0) goes through the kernels' image
    # lists, which skip the other images' key tiles
    G = 4
    for label in ("blockdiag", "oneway"):
        row = measure_row(1024, 80, G, torch.bfloat16, "fwd", set_mask=set_mask_of(label, G), label=label,
                          rep_ms=rep_ms)
        add(row)
        print(f"{label} L=1024 D=80 ng={G}: {row['ms']}", flush=True)
    # issue 3 asks for both in every report: O(tokens) memory, and what head-dim chunking buys over padding (the
    # kernel-variant rows after it come last: they compile the non-default variants, and a cut-short run loses them)
    # device time (CUDA-graph replays) where the eager rows above are host-bound, and d 40 as the device-bound control
    # (with set size 1 the forwards of issue 4's two host-bound misses on the H200: x0.53 and x0.77 of FA2 eager)
    graph_specs = ((1024, 80, "fwd+bwd"), (256, 160, "fwd+bwd"), (64, 160, "fwd"), (1024, 80, "fwd", 1),
                   (64, 160, "fwd", 1), (4096, 40, "fwd+bwd"))
    graph_s = float(os.environ.get("JEDI_SWEEP_GRAPH_S", 120))  # all the graph rows' child processes together
    for r in graph_rows_isolated(graph_specs, rep_ms=rep_ms, timeout_s=graph_s):
        add(r)
        print(f"CUDA graph {r['mode']} L={r['L']} D={r['D']} ng={r['ng']}: "
              f"{ {n: round(t, 3) for n, t in r.get('ms_graph', {}).items()} } "
              f"ours/best SDPA { {n[12:]: round(r[n], 2) for n in r if n.startswith('ratio_graph_')} } "
              f"errors {list(r.get('errors', ()))}", flush=True)
    add(peak_memory_row())
    print(f"peak memory ng=16 L=4096: { {k: v for k, v in rows[-1].items() if k.startswith('peak')} }", flush=True)

    if "triton" in available_ours():
        # the TMA + warp-specialized forward first: the one variant no GPU run has timed yet (the third H100 run's
        # sweep was killed inside it). JEDI_SWEEP_WS=0 (gpu_check.sh, when tools/ws_probe.py did not finish) skips it
        if os.environ.get("JEDI_SWEEP_WS", "1") != "0":
            for ng in (1, 2):
                add(triton_fwd_ws_row(4096, 40, ng=ng, rep_ms=rep_ms))
                print(f"Triton forward, warp-specialized TMA vs default, L=4096 D=40 ng={ng}: "
                      f"x{rows[-1]['speedup_ws_vs_default']:.2f}", flush=True)
        else:
            print("Triton forward, warp-specialized TMA: skipped (JEDI_SWEEP_WS=0: the probe did not finish)",
                  flush=True)
        for L, D in SHAPES[: 2 if quick else 3]:
            add(chunking_row(L, D, rep_ms=rep_ms))
            print(f"chunking L={L} D={D}: x{rows[-1]['speedup_chunked_vs_padded']:.2f}", flush=True)
        for L, D in SHAPES[: 2 if quick else 3]:
            add(bwd_chunking_row(L, D, rep_ms=rep_ms))
            print(f"backward chunking L={L} D={D}: x{rows[-1]['speedup_chunked_vs_padded']:.2f}", flush=True)
        for L, D, mode in ((1024, 80, "fwd+bwd"), (256, 160, "fwd+bwd"), (64, 160, "fwd")):  # host-bound rows
            add(fast_launch_row(L, D, mode=mode, rep_ms=rep_ms))
            print(f"Triton eager {mode}, cached direct launches vs Triton's launch path, L={L} D={D}: "
                  f"x{rows[-1]['speedup_fast_vs_triton_launch']:.2f} ({rows[-1]['ms_fast_launch']:.3f} ms)", flush=True)
        add(rowsum_row(4096, 40, rep_ms=rep_ms))
        print(f"rowsum on tensor cores vs FADD, L=4096 D=40: x{rows[-1]['speedup_dot_vs_fadd']:.2f}", flush=True)
        for L, D in ((4096, 40), (1024, 80)):
            add(triton_bwd_dq_row(L, D, rep_ms=rep_ms))
            print(f"Triton backward, dQ by atomics vs kernel, L={L} D={D}: "
                  f"x{rows[-1]['speedup_atomic_vs_kernel']:.2f}", flush=True)
    if jk.available_backends()["cuda_attention"]:
        for L, D in ((1024, 80), (256, 160)):
            add(cuda_bwd_warps_row(L, D, rep_ms=rep_ms))
            print(f"CUDA backward 8 vs 4 warps, L={L} D={D}: x{rows[-1]['speedup_8_vs_4warps']:.2f}", flush=True)
        for L, D in ((4096, 40), (1024, 80), (256, 160)):
            add(cuda_bwd_split_row(L, D, rep_ms=rep_ms))
            print(f"CUDA backward split vs fused, L={L} D={D}: x{rows[-1]['speedup_split_vs_fused']:.2f}", flush=True)
        for L, D in ((4096, 40), (1024, 80)):  # the forward's two instance switches per shape
            add(cuda_fwd_stages_row(L, D, rep_ms=rep_ms))
            print(f"CUDA forward 2 vs 1 stages, L={L} D={D}: x{rows[-1]['speedup_2_vs_1stage']:.2f} "
                  f"(2 stages at 16 rows/warp: {rows[-1]['ms_2stage_16rows']:.3f} ms)", flush=True)
            add(cuda_row_blocks_row(L, D, rep_ms=rep_ms))
            print(f"CUDA forward 32 vs 16 rows per warp, L={L} D={D}: x{rows[-1]['speedup_32_vs_16rows']:.2f}",
                  flush=True)
        # only d 40 (padded 48) of SD's head dims has both backward instances; two set sizes, as the 128-key CTAs
        # of 32 keys per warp halve the grid
        for ng in (1, 2):
            add(cuda_bwd_key_blocks_row(4096, 40, ng=ng, rep_ms=rep_ms))
            print(f"CUDA backward 32 vs 16 keys per warp, L=4096 D=40 ng={ng}: "
                  f"x{rows[-1]['speedup_32_vs_16keys']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--graph-items", help=argparse.SUPPRESS)  # graph_rows_isolated's child: a JSON list of items
    ap.add_argument("--quick", action="store_true", help="the essential rows only (<= 120 s on an H100)")
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench repetition time per measurement (ms)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_sweep.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args.graph_items:
        return graph_items_main(json.loads(args.graph_items), args.rep_ms or 40, args.out)
    t0 = time.time()
    meta = versions()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(rows: list[dict]) -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump([{**r, **meta} for r in rows], f, indent=1)
        os.replace(tmp, args.out)  # a reader (or a kill mid-write) never sees half a file

    rows = sweep(args.quick, args.rep_ms or (40 if args.quick else 100), save=save)
    print(f"wrote {len(rows)} rows to {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
