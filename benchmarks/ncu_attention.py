"""Hardware counters of the set-attention kernels on one shape, through Nsight Compute (issues 3 and 4 ask what bounds
each kernel: tensor pipes, the exponential unit, memory, occupancy, stalls).

    python benchmarks/ncu_attention.py --out OUT.json [--L 4096 --D 40 --ng 2] [--bwd] [--mask blockdiag|oneway]  # OUT.json/.md
    python benchmarks/ncu_attention.py --run [...]                                       # the profiled program alone

``--run`` warms every backend of ``--backends`` up (Triton compiles and autotunes, cuDNN plans) and then brackets
exactly one forward of each (by default cuDNN SDPA, Triton, CUDA when built, and the Hopper forwards: CUDA's wgmma
variant 3, the Gluon configs 1 and 5 where the probe passed them; with ``--bwd`` also one backward each) between
``cudaProfilerStart``/``Stop``, so ``ncu --profile-from-start off`` profiles those kernels and nothing else. The
parent mode runs ncu on it with the SpeedOfLight, ComputeWorkloadAnalysis, Occupancy, LaunchStats and WarpStateStats
sections plus the pipe-utilization metrics this ncu knows (``ncu --query-metrics``: the tensor pipe's ``hmma``, which
counts wgmma too on the H100, wgmma's ``gmma`` where listed, the XU unit that runs exp2, FMA), and writes every metric per kernel (JSON) and a table of the key ones
(markdown). Needs a CUDA GPU and ncu; skips with a message otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
# base metric -> short name; each is added (as .avg.pct_of_peak_sustained_active) only if this ncu lists it
PIPE_METRICS = {
    # on the H100 with ncu 2025.x the hmma pipe metric counts wgmma too (cuDNN's wgmma kernel reads 52 %) and the gmma
    # one is not listed: the column is the tensor pipe's activity whatever the instruction
    "sm__pipe_tensor_op_hmma_cycles_active": "tensor pipe % (hmma)",
    "sm__pipe_tensor_op_gmma_cycles_active": "tensor wgmma %",
    "sm__inst_executed_pipe_xu": "XU (exp2) %",
    "sm__pipe_fma_cycles_active": "FMA %",
    "sm__pipe_alu_cycles_active": "ALU %",
}
# why warps wait: cycles per issued instruction each stall reason accounts for (WarpStateStats' breakdown, which the
# details page does not list by itself; the H200 run of 2026-11-28 had only their sum, "Warp Cycles Per Issued
# Instruction", 6.3 for Gluon config 1 against 4.3 for the pointer kernel). Added as .ratio where this ncu lists them
STALL_REASONS = ("barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle", "long_scoreboard",
                 "math_pipe_throttle", "membar", "mio_throttle", "misc", "no_instruction", "not_selected", "selected",
                 "short_scoreboard", "sleeping", "tex_throttle", "wait")
STALL_METRICS = {f"smsp__average_warps_issue_stalled_{r}_per_issue_active": r for r in STALL_REASONS}
# (column, substring of ncu's "Metric Name") for the markdown table, first match wins
KEY_METRICS = [
    ("duration", "Duration"),
    ("SM throughput %", "Compute (SM) Throughput"),
    ("memory throughput %", "Memory Throughput"),
    ("registers/thread", "Registers Per Thread"),
    ("achieved occupancy %", "Achieved Occupancy"),
    ("issue slots busy %", "Issue Slots Busy"),
    ("cycles per issued instr", "Warp Cycles Per Issued Instruction"),
] + [(short, base) for base, short in PIPE_METRICS.items()]


def run_program(args) -> None:
    """The profiled program: warm up, then one call per backend inside the profiler range."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from attention_sweep import HEADS, SETS, build_fn, make_inputs, set_mask_of

    import jedi_kernels as jk

    mode = "fwd+bwd" if args.bwd else "fwd"
    qkv, q, k, v = make_inputs(SETS, args.ng, args.L, HEADS, args.D, torch.bfloat16, requires_grad=args.bwd)
    do = torch.randn_like(q) if args.bwd else None
    set_mask = None if args.mask == "none" else set_mask_of(args.mask, args.ng)
    backends, fns = [], {}
    for name in args.backends.split(","):
        base, env = variant_of(name)
        why = unavailable(name, base, env, jk)
        if why:
            print(f"not profiled: {name} ({why})", flush=True)
            continue
        try:
            fn, _ = build_fn(base, q, k, v, args.ng, HEADS, mode, qkv=qkv, do=do, set_mask=set_mask)
        except Exception as e:  # one backend that cannot run must not cost the others their profile
            print(f"not profiled: {name} ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        if env:
            # a kernel variant chosen by its per-call switch (the CUDA forward's stages or Hopper forward, the Gluon
            # forward's config): set around each call
            def fn(fn=fn, env=env):
                os.environ[env[0]] = env[1]
                try:
                    return fn()
                finally:
                    os.environ.pop(env[0], None)
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        except Exception as e:
            print(f"not profiled: {name} ({type(e).__name__}: {str(e)[:200]})", flush=True)
            continue
        backends.append(name)
        fns[name] = fn
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for b in backends:
        torch.cuda.nvtx.range_push(b)
        fns[b]()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled", backends, mode, flush=True)


# backend names beyond build_fn's: (build_fn backend, (switch, value)) of a kernel variant chosen per call
_VARIANTS = {"cuda-2stage": ("cuda", ("JEDI_CUDA_FWD_STAGES", "2")),
             "cuda-bwdsplit": ("cuda", ("JEDI_CUDA_BWD_SPLIT", "1"))}  # the split CUDA backward (with --bwd)
# CUDA: the mma.sync kernel (wgmma0) and the default, which at d 40 on sm_90 is the wgmma kernel's variant 1 (the H200
# sweep's fastest, 2026-11-28; that run profiled variant 3) and variant 4 (cuDNN's tile: 128 keys, one warpgroup per
# CTA, three CTAs per SM); Gluon config 1 (the plain loop), 5 (warp-specialized) and 6 (5 with ping-pong)
DEFAULT_BACKENDS = "sdpa-cudnn,triton,cuda-wgmma0,cuda,cuda-wgmma4,triton-gluon1,triton-gluon5,triton-gluon6"


def variant_of(name: str) -> tuple[str, tuple[str, str] | None]:
    """(build_fn backend, its switch and value or None) of a profiled backend name: "sdpa-<b>", "triton", "cuda",
    "cuda-2stage" (JEDI_CUDA_FWD_STAGES=2), "cuda-wgmma<n>" (JEDI_CUDA_FWD_WGMMA=n), "triton-gluon<n>"
    (JEDI_TRITON_FWD_GLUON=n), "triton-gluonbwd<n>" (JEDI_TRITON_BWD_GLUON=n: the Gluon backward; with --bwd),
    "cuda-bwdsplit" (JEDI_CUDA_BWD_SPLIT=1: the split CUDA backward; with --bwd)."""
    if name in _VARIANTS:
        return _VARIANTS[name]
    for prefix, base, env in (("cuda-wgmma", "cuda", "JEDI_CUDA_FWD_WGMMA"),
                              ("triton-gluonbwd", "triton", "JEDI_TRITON_BWD_GLUON"),
                              ("triton-gluon", "triton", "JEDI_TRITON_FWD_GLUON")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return base, (env, name[len(prefix):])
    if name.startswith("sdpa-") or name in ("triton", "cuda"):
        return name, None
    raise ValueError(f"unknown backend {name!r} (sdpa-<backend>, triton, cuda, cuda-2stage, cuda-bwdsplit, "
                     f"cuda-wgmma<n>, triton-gluon<n>, triton-gluonbwd<n>)")


def unavailable(name: str, base: str, env, jk) -> str | None:
    """Why ``name`` cannot be profiled here, or None."""
    import torch

    if base == "cuda" and not jk.available_backends()["cuda_attention"]:
        return "the CUDA extension's attention is not built"
    if env and env[0] in ("JEDI_CUDA_FWD_WGMMA", "JEDI_TRITON_FWD_GLUON", "JEDI_TRITON_BWD_GLUON") and \
            env != ("JEDI_CUDA_FWD_WGMMA", "0") and torch.cuda.get_device_capability() != (9, 0):
        return "a Hopper kernel: compute capability 9.0 only"
    if env and env[0] == "JEDI_TRITON_BWD_GLUON":
        from jedi_kernels.ops.set_attention_gluon_bwd import HAVE_GLUON, checked_bwd_configs

        if not HAVE_GLUON:
            return "this Triton has no Gluon"
        if os.environ.get("JEDI_SWEEP_GLUON_BWD", "1") == "0" or int(env[1]) not in checked_bwd_configs():
            return "the Gluon backward probe did not pass this config (JEDI_SWEEP_GLUON_BWD / JEDI_GLUON_BWD_CONFIGS)"
    if env and env[0] == "JEDI_TRITON_FWD_GLUON":
        from jedi_kernels.ops.set_attention_gluon import HAVE_GLUON, checked_configs

        if not HAVE_GLUON:
            return "this Triton has no Gluon"
        if os.environ.get("JEDI_SWEEP_GLUON", "1") == "0" or int(env[1]) not in checked_configs():
            return "the Gluon probe did not pass this config (JEDI_SWEEP_GLUON / JEDI_GLUON_CONFIGS)"
    return None


def available_metrics(ncu: str) -> list[str]:
    """The PIPE_METRICS and STALL_METRICS this ncu knows on this GPU (query output lists base names)."""
    try:
        out = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m for m in (*PIPE_METRICS, *STALL_METRICS) if m in out]


def metric_arg(base: str) -> str:
    """The full metric name asked of ncu: a pipe's utilization in % of peak, a stall reason's cycles per issue."""
    return base + (".ratio" if base in STALL_METRICS else ".avg.pct_of_peak_sustained_active")


def parse_details_csv(text: str) -> list[dict]:
    """ncu ``--csv --page details`` -> one dict per profiled kernel launch: name, nvtx range (when given), and
    ``metrics[name] = (value, unit)``; kernels appear in launch order."""
    start = text.find('"ID"')
    if start < 0:
        return []
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        kid = row.get("ID")
        if kid is None:
            continue
        k = kernels.setdefault(kid, {"id": int(kid), "kernel": row.get("Kernel Name", ""),
                                     "block": row.get("Block Size"), "grid": row.get("Grid Size"), "metrics": {}})
        name = row.get("Metric Name")
        if name:
            k["metrics"][name] = (row.get("Metric Value"), row.get("Metric Unit"))
    return sorted(kernels.values(), key=lambda k: k["id"])


_US_PER_UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def duration_us(kernel: dict) -> float | None:
    """ncu's Duration of a parsed kernel (its metric ("17,920", "ns"), a list once in a results file) in µs, or None
    when ncu gave none or in a unit not known here."""
    metrics = kernel.get("metrics")
    value = metrics.get("Duration") if isinstance(metrics, dict) else None
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        return None
    scale = _US_PER_UNIT.get(str(value[1]).strip())
    try:
        return float(str(value[0]).replace(",", "")) * scale if scale is not None else None
    except ValueError:
        return None


def _shorter_than(kernel: dict, min_us: float) -> bool:
    """Whether ncu timed the kernel under ``min_us`` (SDPA's helper kernels, not attention)."""
    us = duration_us(kernel)
    return us is not None and us < min_us


def key_table(kernels: list[dict], min_us: float = 5.0) -> str:
    """Markdown: one row per kernel that ran at least ``min_us`` (the attention kernels, not SDPA's helpers)."""
    lines = ["| kernel | " + " | ".join(c for c, _ in KEY_METRICS) + " |",
             "| --- | " + " | ".join("---" for _ in KEY_METRICS) + " |"]
    for k in kernels:
        if _shorter_than(k, min_us):
            continue
        cells = []
        for _, sub in KEY_METRICS:
            hit = next((v for n, v in k["metrics"].items() if sub in n), None)
            cells.append("" if hit is None else f"{hit[0]} {hit[1] or ''}".strip())
        lines.append(f"| `{k['kernel'][:60]}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stall_table(kernels: list[dict], min_us: float = 5.0, min_cycles: float = 0.05) -> str:
    """Markdown: per kernel (as in :func:`key_table`), the cycles per issued instruction each stall reason accounts
    for, the reasons any kernel spends at least ``min_cycles`` on; empty if ncu reported none."""
    rows, reasons = [], []
    for k in kernels:
        if _shorter_than(k, min_us):
            continue
        got = {}
        for name, (v, _) in k["metrics"].items():
            for base, reason in STALL_METRICS.items():
                if name.startswith(base):
                    with contextlib.suppress(TypeError, ValueError):
                        got[reason] = float(str(v).replace(",", ""))
        rows.append((k["kernel"][:60], got))
        reasons += [r for r, c in got.items() if c >= min_cycles and r not in reasons]
    if not reasons:
        return ""
    reasons = [r for r in STALL_REASONS if r in reasons]
    lines = ["| kernel (stall cycles per issued instruction) | " + " | ".join(reasons) + " |",
             "| --- | " + " | ".join("---" for _ in reasons) + " |"]
    for name, got in rows:
        lines.append(f"| `{name}` | " + " | ".join(f"{got[r]:.2f}" if r in got else "" for r in reasons) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON to write (with .md beside it)")
    ap.add_argument("--run", action="store_true", help="be the profiled program")
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--D", type=int, default=40)
    ap.add_argument("--ng", type=int, default=2)
    ap.add_argument("--bwd", action="store_true", help="profile forward+backward instead of the forward")
    ap.add_argument("--mask", choices=("none", "blockdiag", "oneway"), default="none",
                    help="blockdiag: each image attends only itself (ours run it as per-image attention); oneway: "
                         "every image attends image 0 (our kernels walk their image lists and skip the other tiles). "
                         "SDPA gets either as a dense mask")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS,
                    help="comma-separated: sdpa-<backend>, triton, cuda, cuda-2stage, cuda-wgmma<n>, triton-gluon<n> "
                         f"(default {DEFAULT_BACKENDS}; the unavailable ones are skipped with a message)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole ncu run")
    args = ap.parse_args(argv)
    if args.run:
        run_program(args)
        return 0
    if not args.out:
        ap.error("--out is required (or --run)")
    import torch

    ncu = shutil.which("ncu")
    if not torch.cuda.is_available() or ncu is None:
        print(f"ncu_attention.py needs a CUDA GPU and ncu (cuda: {torch.cuda.is_available()}, ncu: {ncu})")
        return 2
    metrics = available_metrics(ncu)
    cmd = [ncu, "--profile-from-start", "off", "--csv", "--page", "details"]
    for s in SECTIONS:
        cmd += ["--section", s]
    if metrics:
        cmd += ["--metrics", ",".join(metric_arg(m) for m in metrics)]
    cmd += [sys.executable, os.path.abspath(__file__), "--run", "--L", str(args.L), "--D", str(args.D),
            "--ng", str(args.ng), "--mask", args.mask, "--backends", args.backends] + (["--bwd"] if args.bwd else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:  # keep what ncu printed before the limit
        p = subprocess.CompletedProcess(cmd, 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes)
                                        else (e.stdout or ""), f"timed out after {args.timeout:.0f} s")
    kernels = parse_details_csv(p.stdout)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"shape": {"B": 2, "H": 8, "L": args.L, "D": args.D, "ng": args.ng, "dtype": "bfloat16",
                        "mode": "fwd+bwd" if args.bwd else "fwd", "mask": args.mask},
              "backends": args.backends.split(","), "profiled_line": next(
                  (ln for ln in p.stdout.splitlines() if ln.startswith("profiled")), None),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "ncu_rc": p.returncode,
              "metrics_requested": metrics, "kernels": kernels, "stderr_tail": p.stderr[-3000:]}
    out.write_text(json.dumps(result, indent=1))
    md = (f"ncu on {result['device']}, L {args.L}, d {args.D}, ng {args.ng}, bf16, {result['shape']['mode']}, "
          f"mask {args.mask}\n\n"
          + key_table(kernels) + "\n")
    stalls = stall_table(kernels)
    if stalls:
        md += "\n" + stalls + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"ncu rc={p.returncode}, {len(kernels)} kernels profiled -> {out}")
    return 0 if p.returncode == 0 and kernels else 1


if __name__ == "__main__":
    sys.exit(main())
