"""Derive ``set_attention``'s ``backend="auto"`` table from a GPU sweep (``attention_sweep.py``), as data.

    python benchmarks/make_dispatch_table.py SWEEP.json [SWEEP2.json ...] [--write] [--margin 1.03]

A class is (device capability, dtype, head dim, masked). Our backend (triton / cuda) gets the class only if, on EVERY
measured row of that class (every L, ng, forward and forward+backward), it is at least ``margin`` times faster than
the best torch SDPA backend of the same row, and its output stayed close to SDPA's. Among qualifying backends the one
with the larger geometric-mean speedup wins. Everything else stays torch SDPA, so auto is never slower than SDPA on
what was measured. Masked rows are not used: the sweep applies a set_mask densely in SDPA, while the "torch" backend
runs a block-diagonal mask as per-image attention, so that comparison would flatter our kernel.

Prints the derived entries (and the near misses); ``--write`` replaces ``jedi_kernels/dispatch_table.json``. Also
prints what the sweep's kernel-variant rows say about the compiled-in defaults (``variant_advice``): the CUDA
forward's rows per warp, the CUDA backward's keys per warp, the Triton forward's row sums and the Triton backward's
dQ by atomics or by kernel; those defaults live in code, so changing one is a commit. ``autotune:`` lines
(``autotune_advice``) say which Triton config the autotuner picked for each shape, against the class's default.
``graphed:`` lines (``graph_notes``) give the sweep's CUDA-graph rows: device time per backend, no host time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "jedi_kernels" / "dispatch_table.json"
OURS = ("triton", "cuda")
MAX_DIFF = {"bfloat16": 6e-2, "float16": 1e-2}  # |ours - SDPA| on unit-normal inputs: beyond this, a wrong kernel


def derive(rows: list[dict], margin: float = 1.03, sources: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(table entries, notes) from sweep rows; see the module docstring for the rule."""
    classes: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "ms" not in r or "best_sdpa" not in r or r.get("mask", "none") != "none" or "capability" not in r:
            continue  # chunking / memory rows, masked rows, rows without an SDPA baseline or a device class
        classes[(r["capability"], r["dtype"], int(r["D"]))].append(r)
    entries, notes = [], []
    for (cap, dtype, D), rs in sorted(classes.items()):
        best = None
        for b in OURS:
            ratios = [r.get(f"ratio_{b}") for r in rs]
            if any(x is None for x in ratios):
                if any(x is not None for x in ratios):
                    notes.append(f"{cap} {dtype} D={D} {b}: missing on some rows (errors: "
                                 f"{sorted({e for r in rs for e in r.get('errors', {}) if e == b})})")
                continue
            worst = min(ratios)
            diff = max(r.get("max_abs_diff_vs_sdpa", {}).get(b, 0.0) for r in rs)
            gmean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            if diff > MAX_DIFF.get(dtype, 1e-2):
                notes.append(f"{cap} {dtype} D={D} {b}: output differs from SDPA by {diff:.3g}: not eligible")
            elif worst < margin:
                notes.append(f"{cap} {dtype} D={D} {b}: worst row x{worst:.2f} < x{margin:.2f} "
                             f"(geomean x{gmean:.2f}, {len(rs)} rows): stays SDPA")
            elif best is None or gmean > best["geomean_speedup"]:
                best = {"device": cap, "dtype": dtype, "head_dim": D, "masked": False, "backend": b,
                        "worst_speedup": round(worst, 3), "geomean_speedup": round(gmean, 3), "rows": len(rs),
                        "sources": sources or []}
        if best:
            entries.append(best)
    return entries, notes


# kernel-variant rows of attention_sweep.py: kind -> (timing keys (a, b), the default's key, where the default lives)
VARIANTS = {
    "cuda_fwd_rows_per_warp": (("ms_16rows", "ms_32rows"), "ms_32rows",
                               "fwd_default_row_blocks / fwd_shape_row_blocks in csrc/cuda/set_attention_plan.h "
                               "(JEDI_CUDA_FWD_ROW_BLOCKS)"),
    "cuda_fwd_stages": (("ms_1stage", "ms_2stage"), "ms_1stage",
                        "fwd_default_stages in csrc/cuda/set_attention_plan.h (JEDI_CUDA_FWD_STAGES)"),
    "cuda_fwd_splits": (("ms_off", "ms_auto"), "ms_off",
                        "fwd_splits_from_env in csrc/cuda/set_attention_glue.cpp (JEDI_CUDA_FWD_SPLITS; unset: off, "
                        "0: fwd_auto_splits)"),
    "cuda_bwd_warps": (("ms_4warps", "ms_8warps"), "ms_8warps",
                       "bwd_default_warps in csrc/cuda/set_attention_plan.h (JEDI_CUDA_BWD_WARPS)"),
    "cuda_bwd_split": (("ms_fused", "ms_split"), "ms_fused",
                       "bwd_split_from_env in csrc/cuda/set_attention_glue.cpp (JEDI_CUDA_BWD_SPLIT, opt-in)"),
    "cuda_bwd_keys_per_warp": (("ms_16keys", "ms_32keys"), "ms_32keys",
                               "bwd_default_key_blocks in csrc/cuda/set_attention_plan.h (JEDI_CUDA_BWD_KEY_BLOCKS)"),
    "rowsum_dot_vs_fadd": (("ms_dot", "ms_fadd"), "ms_fadd",
                           "_rowsum_dot in jedi_kernels/ops/set_attention.py (JEDI_ATTN_ROWSUM)"),
    "triton_bwd_dq_atomic_vs_kernel": (("ms_atomic", "ms_kernel"), "ms_kernel",
                                       "_fused_dq in jedi_kernels/ops/set_attention.py (JEDI_TRITON_BWD_DQ)"),
    "head_dim_chunking_bwd": (("ms_chunked", "ms_padded"), "ms_chunked",
                              "head_dim_chunks in set_attn_bwd, jedi_kernels/ops/set_attention.py (chunk_head_dim)"),
    "triton_fwd_ws": (("ms_pointer", "ms_ws"), "ms_pointer",
                      "_fwd_ws_requested in jedi_kernels/ops/set_attention.py (JEDI_TRITON_FWD_WS, opt-in)"),
    "fast_launch": (("ms_triton_launch", "ms_fast_launch"), "ms_fast_launch",
                    "_ENABLED in jedi_kernels/ops/fast_launch.py (JEDI_FAST_LAUNCH)"),
    # the Hopper forwards: the rows hold every variant and name the fastest (best_wgmma / best_gluon), which the
    # advice compares with the default instead of the listed one
    "cuda_fwd_wgmma": (("ms_mmasync", "ms_wg128x3"), "ms_mmasync",
                       "kDefaultWgmmaVariant / fwd_wgmma_from_env in csrc/cuda/set_attention_glue.cpp "
                       "(JEDI_CUDA_FWD_WGMMA)"),
    "triton_fwd_gluon": (("ms_pointer", "ms_gl128x128"), "ms_pointer",
                         "gluon_fwd_variant in jedi_kernels/ops/set_attention_gluon.py (JEDI_TRITON_FWD_GLUON, opt-in)"),
    "triton_bwd_gluon": (("ms_split", "ms_glbwd1"), "ms_split",
                         "gluon_bwd_variant in jedi_kernels/ops/set_attention_gluon_bwd.py (JEDI_TRITON_BWD_GLUON, "
                         "opt-in)"),
}
_BEST_OF = {"cuda_fwd_wgmma": "best_wgmma", "triton_fwd_gluon": "best_gluon", "triton_bwd_gluon": "best_gluonbwd"}
# where a row's default depends on its shape: the CUDA forward runs the Hopper kernel's default variant where it has one
# (variant 1, 64 keys x 2 warpgroups, at head dim 40 on sm_90, the only device these rows run on), the mma.sync kernel
# elsewhere (jedi_kernels.cuda_variants)
def _import_root() -> None:
    root = str(TABLE.parent.parent)  # the repo root: jedi_kernels importable from a checkout too
    if root not in sys.path:
        sys.path.insert(0, root)


def _wgmma_default(row: dict) -> str:
    _import_root()
    from jedi_kernels.cuda_variants import default_label

    return f"ms_{default_label(row.get('D'))}"


def _rows_per_warp_default(row: dict) -> str:
    """The CUDA forward's rows per warp when none is asked, at the row's head dim and set (jedi_kernels.cuda_variants,
    which mirrors csrc/cuda/set_attention_plan.h)."""
    _import_root()
    from jedi_kernels.cuda_variants import rows_per_warp_default

    keys = int(row.get("ng") or 1) * int(row.get("L") or 0)
    return f"ms_{rows_per_warp_default(int(row.get('D') or 0), keys)}rows"


_DEFAULT_OF = {"cuda_fwd_wgmma": _wgmma_default, "cuda_fwd_rows_per_warp": _rows_per_warp_default}


def variant_advice(rows: list[dict], margin: float = 1.03) -> list[str]:
    """One line per kernel-variant row: which variant was faster, and whether the compiled-in default should change
    (only when the other variant wins by at least ``margin``)."""
    out = []
    for r in rows:
        spec = VARIANTS.get(r.get("kind"))
        if spec is None:
            continue
        (a, b), default, where = spec
        if r.get("kind") in _DEFAULT_OF:
            default = _DEFAULT_OF[r["kind"]](r)
        other = b if default == a else a
        best = r.get(_BEST_OF.get(r.get("kind")))
        if best and f"ms_{best}" in r:  # (a Hopper row may hold only some variants: JEDI_GLUON_CONFIGS)
            other = f"ms_{best}"
        if default not in r or other not in r:
            continue
        ratio = r[default] / r[other]  # > 1: the other variant is faster
        label = lambda k: k[3:]  # noqa: E731  (ms_32rows -> 32rows)
        shape = f"{r.get('kind')} L={r.get('L')} D={r.get('D')} ng={r.get('ng')} {r.get('dtype', '')}"
        if ratio >= margin:
            out.append(f"{shape}: {label(other)} x{ratio:.2f} faster than the default {label(default)}: "
                       f"change {where}")
        else:
            out.append(f"{shape}: default {label(default)} {r[default]:.3f} ms vs {label(other)} {r[other]:.3f} ms: "
                       f"keep")
    return out


_CONFIG_LISTS = {"fwd": "_FWD_CONFIGS", "dkdv": "_DKDV_CONFIGS", "dkdv_dq": "_DKDV_CONFIGS", "dq": "_DQ_CONFIGS"}


def autotune_advice(rows: list[dict], margin: float = 1.03) -> list[str]:
    """One line per Triton tuning recorded in the sweep (a row's ``triton_autotune``): the winning config against the
    class's default (the first of its list, what runs with ``JEDI_TRITON_AUTOTUNE=0``), and whether the default
    should change (only when the winner is at least ``margin`` times faster)."""
    out = []
    for r in rows:
        shape = f"L={r.get('L')} D={r.get('D')} ng={r.get('ng')} {r.get('dtype', '')} {r.get('mode', '')}"
        for t in r.get("triton_autotune", []):
            ms, best, default = t.get("ms", {}), t.get("best"), t.get("default")
            head = f"{t.get('kernel')} {t.get('class')} {shape}"
            if best not in ms or default not in ms:
                out.append(f"{head}: best {best} (no timings recorded)")
                continue
            ranked = ", ".join(f"{c} {v:.3f}" for c, v in sorted(ms.items(), key=lambda kv: kv[1]))
            ratio = ms[default] / ms[best] if ms[best] > 0 else float("nan")
            verdict = (f"the default is x{ratio:.2f} slower: consider {best} first in "
                       f"{_CONFIG_LISTS.get(t.get('kernel'), '?')}[{t.get('class')!r}]" if ratio >= margin
                       else "default kept")
            out.append(f"{head}: {verdict} (ms: {ranked})")
    return out


def graph_notes(rows: list[dict]) -> list[str]:
    """One line per CUDA-graph row of the sweep (``kind`` "cuda_graph"): every backend's device time and ours against
    the best SDPA backend, both replayed from a graph. Information only: ``auto`` decides on the eager rows (what an
    eager call costs), and a kernel that wins only here wins inside CUDA graphs and torch.compile."""
    out = []
    for r in rows:
        if r.get("kind") != "cuda_graph" or not r.get("ms_graph"):
            continue
        times = ", ".join(f"{n} {t:.3f}" for n, t in sorted(r["ms_graph"].items(), key=lambda kv: kv[1]))
        ours = ", ".join(f"{n[12:]} x{r[n]:.2f}" for n in sorted(r) if n.startswith("ratio_graph_"))
        errors = f"; errors: {sorted(r['errors'])}" if r.get("errors") else ""
        out.append(f"L={r.get('L')} D={r.get('D')} ng={r.get('ng')} {r.get('dtype', '')} {r.get('mode', '')}: "
                   f"ms {times}; vs {r.get('best_sdpa_graph')}: {ours or '-'}{errors}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="attention_sweep.py JSON files (or results.json with attention_sweep)")
    ap.add_argument("--margin", type=float, default=1.03, help="minimum speedup over the best SDPA on every row")
    ap.add_argument("--write", action="store_true", help=f"replace {TABLE.relative_to(TABLE.parent.parent)}")
    args = ap.parse_args(argv)
    rows = []
    for p in args.sweeps:
        data = json.loads(Path(p).read_text())
        rows += data.get("attention_sweep", []) if isinstance(data, dict) else data
    entries, notes = derive(rows, args.margin, [Path(p).name for p in args.sweeps])
    for e in entries:
        print(f"auto -> {e['backend']:6s} on {e['device']} {e['dtype']:8s} D={e['head_dim']:3d} "
              f"(worst x{e['worst_speedup']:.2f}, geomean x{e['geomean_speedup']:.2f}, {e['rows']} rows)")
    for n in notes:
        print("  " + n)
    for line in variant_advice(rows, args.margin):
        print("variant: " + line)
    for line in autotune_advice(rows, args.margin):
        print("autotune: " + line)
    for line in graph_notes(rows):
        print("graphed: " + line)
    if args.write:
        doc = json.loads(TABLE.read_text())
        doc["set_attention"] = entries
        TABLE.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {len(entries)} entries to {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
