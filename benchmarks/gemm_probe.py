"""The UNet step's linear GEMMs with and without a bias epilogue, and accumulating into a residual in place.

    python benchmarks/gemm_probe.py --out OUT.json [--device cuda] [--dtype float16] [--rep-ms 40]
    python benchmarks/gemm_probe.py --out OUT.json --device cpu --quick     # the script's CPU rehearsal

Why: the H200 profile of the optimized step (``results/h200-2026-11-28-run2.json`` → ``profile_fused`` →
``gemm_shapes``) has the 20 bias-epilogue GEMMs of 16384 x 320 x 320 at 15.2 µs a call and the 5 of the same shape
without a bias at 8.2 µs: cuBLASLt's kernel pick for ``addmm`` with a bias (the ``..._bias_TNN`` kernel) is worse than
for ``mm`` there. ``JeDiUNet``'s ``fold_linear_bias`` (benchmarks/README.md, issue 9's levers) moves the transformer
blocks' out-projection biases into the next add + LayerNorm on that evidence, and runs each feed-forward's output
GEMM as an in-place ``addmm_`` into the residual. This probe measures the mechanism itself on every linear shape of
the step (M = tokens at UNet batch 4, K, N from the profile), so the next lever (proj_in, proj_out, the ResBlocks'
1x1 skip GEMMs) can be decided from numbers:

    bias        F.linear(x, W, b)           (aten.addmm with a 1-D bias: cuBLASLt's bias epilogue)
    nobias      F.linear(x, W)              (aten.mm)
    bias_add    F.linear(x, W, b) + r       (the unfused feed-forward output and its residual: two kernels)
    accumulate  r.addmm_(x, W.t())          (cuBLAS with beta = 1 in place: what fold_linear_bias runs instead)

Each is timed as device time inside a CUDA graph (``attention_sweep.graph_time_ms``: no host time, no L2 flush), in
µs per call, with the fraction of its roofline (the larger of its FLOPs at 724 TFLOP/s and A + B + C once at 3.0 TB/s,
the H100's measured peaks; an H200's memory is faster, so memory-bound rows read low there). On the CPU the same
script runs small shapes with wall-clock medians, only to check that it works.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_time_ms, env_info  # noqa: E402

PEAK_TFLOPS, PEAK_TBPS = 724.0, 3.0  # H100 fp16 dense matmul and copy bandwidth, measured (benchmarks/README.md)
# (M, K, N) of the jedi_ng2 step's linear GEMMs (UNet batch 4; the 64x64, 32x32, 16x16 and 8x8 levels), most time
# first in the H200 profile: q/k/v/out and proj_in/proj_out (C x C), the feed-forward (C -> 8C GEGLU projection,
# 4C -> C output), the fused q/k/v (C -> 3C) and the decoder's 1x1 skip convs (2C or 3C -> C)
SHAPES = [(16384, 320, 320), (16384, 320, 2560), (1024, 1280, 10240), (4096, 640, 5120), (1024, 1280, 1280),
          (4096, 640, 640), (16384, 1280, 320), (16384, 320, 960), (1024, 5120, 1280), (4096, 2560, 640),
          (4096, 640, 1920), (1024, 1280, 3840), (16384, 640, 320), (1024, 2560, 1280), (256, 2560, 1280),
          (256, 1280, 1280), (16384, 960, 320)]
QUICK_SHAPES = [(64, 32, 32), (48, 40, 24)]
VARIANTS = ("bias", "nobias", "bias_add", "accumulate")


def roofline_us(M: int, K: int, N: int, elem: int) -> float:
    """The larger of the GEMM's FLOPs at PEAK_TFLOPS and its bytes (A, B, C once) at PEAK_TBPS, in µs."""
    flops_us = 2.0 * M * K * N / (PEAK_TFLOPS * 1e12) * 1e6
    bytes_us = (M * K + K * N + M * N) * elem / (PEAK_TBPS * 1e12) * 1e6
    return max(flops_us, bytes_us)


def make_fns(M: int, K: int, N: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The four variants on fresh inputs (small values: the in-place accumulation is replayed many times)."""
    g = torch.Generator(device="cpu").manual_seed(M * 7 + K * 3 + N)
    x = (torch.randn(M, K, generator=g) * 0.01).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * 0.01).to(device, dtype)
    b = (torch.randn(N, generator=g) * 0.01).to(device, dtype)
    r = torch.zeros(M, N, device=device, dtype=dtype)
    return {
        "bias": lambda: F.linear(x, w, b),
        "nobias": lambda: F.linear(x, w),
        "bias_add": lambda: F.linear(x, w, b) + r,
        "accumulate": lambda: r.addmm_(x, w.t()),
    }


def check_variants(device: torch.device, dtype: torch.dtype) -> None:
    """The variants compute what their names say (float64 on the CPU, or the run's dtype loosely on the GPU)."""
    fns = make_fns(8, 16, 12, device, dtype)
    ref = fns["nobias"]()
    b = fns["bias"]() - ref  # the bias row, broadcast
    tol = 1e-12 if dtype == torch.float64 else 1e-3
    assert torch.allclose(fns["bias_add"](), ref + b, atol=tol), "bias_add"
    assert torch.allclose(fns["accumulate"](), ref, atol=tol), "accumulate into zeros"


def probe(shapes, device: torch.device, dtype: torch.dtype, rep_ms: int) -> list[dict]:
    """One row per shape: µs per call of each variant, fraction of roofline, and the two ratios that decide a fold."""
    if device.type == "cuda":
        from attention_sweep import graph_time_ms

        def time_ms(fn):
            return graph_time_ms(fn, rep_ms=rep_ms)
    else:
        def time_ms(fn):
            return cpu_time_ms(fn, reps=5)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for M, K, N in shapes:
        row = dict(M=M, K=K, N=N, dtype=str(dtype).replace("torch.", ""), roofline_us=roofline_us(M, K, N, elem))
        try:
            fns = make_fns(M, K, N, device, dtype)
            row["us"] = {name: time_ms(fn) * 1e3 for name, fn in fns.items()}
            row["fraction_of_roofline"] = {k: row["roofline_us"] / v for k, v in row["us"].items() if v > 0}
            row["bias_over_nobias"] = row["us"]["bias"] / row["us"]["nobias"]
            row["bias_add_over_accumulate"] = row["us"]["bias_add"] / row["us"]["accumulate"]
        except Exception as e:  # noqa: BLE001 (a row's failure is recorded, the probe goes on)
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"[gemm_probe] {M}x{K}x{N}: " + (row.get("error") or ", ".join(
            f"{k} {v:.2f}" for k, v in row["us"].items()) + " us"), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| M x K x N | bias | no bias | bias + add | accumulate | roofline | bias / no bias | "
             "(bias + add) / accumulate |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "us" not in r:
            lines.append(f"| {r['M']} x {r['K']} x {r['N']} | {r.get('error')} | | | | | | |")
            continue
        u = r["us"]
        lines.append(f"| {r['M']} x {r['K']} x {r['N']} | {u['bias']:.2f} | {u['nobias']:.2f} | {u['bias_add']:.2f} | "
                     f"{u['accumulate']:.2f} | {r['roofline_us']:.2f} | x{r['bias_over_nobias']:.2f} | "
                     f"x{r['bias_add_over_accumulate']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON path (a .md table is written beside it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32", "float64"])
    ap.add_argument("--rep-ms", type=int, default=40, help="unrolled calls per CUDA graph, in ms of device time")
    ap.add_argument("--quick", action="store_true", help="two small shapes (the CPU rehearsal)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    check_variants(device, torch.float64 if device.type == "cpu" else dtype)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    result = dict(env=env_info(device), args=vars(args), peaks=dict(tflops=PEAK_TFLOPS, tbps=PEAK_TBPS),
                  rows=probe(shapes, device, dtype, args.rep_ms))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result["rows"]))
    print(markdown(result["rows"]))
    return result


if __name__ == "__main__":
    main()
