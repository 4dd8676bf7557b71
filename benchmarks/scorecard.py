"""The attention issues' targets, scored on one GPU run's results: which sweep rows meet them and which miss.

    python benchmarks/scorecard.py benchmarks/results/<file>.json [--json OUT.json]

Issue 4 (the CUDA backend) asks for at least the speed of torch's FlashAttention-2 SDPA backend on every shape of the
sweep (on an H100); issue 3 (the Triton backend) for 1.2x the best SDPA backend on the large shapes, forward and
forward + backward, and at L 4096, d 40, set size 2, bf16 forward for <= 0.45 ms and 1.3x. Each GPU session used to
read these off the sweep by hand (the READMEs' "x1.27 of FA2" columns). Here they are computed from the sweep's
plain rows (``attention_sweep`` entries without a ``kind``: every backend timed on the same inputs, eager, L2
flushed) and, where the sweep also replayed a shape as a CUDA graph (``kind`` "cuda_graph", the device time without
host overhead), from that too.

``gpu_check.sh`` embeds the result as ``results.json["scorecard"]`` (``collect_results.py``) and prints the tables
into ``gpu_check.log``. A score is a reading of one run: the issues are decided by the card they name.
"""
from __future__ import annotations

import argparse
import json
import sys

from check_predictions import section_rows  # (benchmarks/ is on sys.path when these scripts run)

# issue 3's headline row and its two bars
ISSUE3_HEADLINE = {"L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "mode": "fwd"}
ISSUE3_HEADLINE_MS = 0.45
ISSUE3_HEADLINE_RATIO = 1.3
ISSUE3_RATIO = 1.2  # every other shape, forward and forward + backward
ISSUE4_RATIO = 1.0  # at least FA2's speed
FA2 = "sdpa-flash"


def _plain_rows(results: dict) -> list[dict]:
    """The sweep's backend-comparison rows (no kernel-variant ``kind``, no mask)."""
    return [r for r in section_rows(results, "attention_sweep") if r.get("kind") is None
            and r.get("mask", "none") == "none" and isinstance(r.get("ms"), dict)]


def _graph_rows(results: dict) -> list[dict]:
    """The sweep's CUDA-graph rows (device time per backend in ``ms_graph``)."""
    return [r for r in section_rows(results, "attention_sweep") if r.get("kind") == "cuda_graph" and r.get("ms_graph")]


def _shape(r: dict) -> dict:
    return {k: r.get(k) for k in ("L", "D", "ng", "dtype", "mode")}


def _best_sdpa(ms: dict) -> str | None:
    sdpa = {n: t for n, t in ms.items() if n.startswith("sdpa-") and isinstance(t, (int, float)) and t > 0}
    return min(sdpa, key=sdpa.get) if sdpa else None


def _entry(issue: int, r: dict, ms: dict, ours: str, peer: str | None, target: float, timing: str,
           max_ms: float | None = None) -> dict:
    """One scored row: ours against the peer (ratio = peer ms / ours ms, > 1 = ours faster)."""
    e = {"issue": issue, **_shape(r), "timing": timing, "ours": ours, "peer": peer, "target_ratio": target}
    o, p = ms.get(ours), ms.get(peer) if peer else None
    if not isinstance(o, (int, float)) or not isinstance(p, (int, float)) or o <= 0 or p <= 0:
        e.update(ours_ms=o, peer_ms=p, ratio=None, met=None,
                 why=f"{ours} not timed" if not isinstance(o, (int, float)) else f"{peer} not timed")
        return e
    e.update(ours_ms=o, peer_ms=p, ratio=p / o, met=p / o >= target)
    if max_ms is not None:
        e["target_ms"] = max_ms
        e["met"] = e["met"] and o <= max_ms
    return e


def score(results: dict) -> dict:
    """{"rows": [scored rows], "summary": {"issue 3": ..., "issue 4": ...}, "card": ...} of one results.json."""
    rows = []
    for r in _plain_rows(results):
        ms = r["ms"]
        if "cuda" in ms or "cuda" in r.get("errors", {}):
            rows.append(_entry(4, r, ms, "cuda", FA2, ISSUE4_RATIO, "eager"))
        if "triton" in ms or "triton" in r.get("errors", {}):
            headline = _shape(r) == ISSUE3_HEADLINE
            rows.append(_entry(3, r, ms, "triton", _best_sdpa(ms),
                               ISSUE3_HEADLINE_RATIO if headline else ISSUE3_RATIO, "eager",
                               ISSUE3_HEADLINE_MS if headline else None))
    for r in _graph_rows(results):
        ms = r["ms_graph"]
        if "cuda" in ms:
            rows.append(_entry(4, r, ms, "cuda", FA2, ISSUE4_RATIO, "cuda_graph"))
        if "triton" in ms:
            rows.append(_entry(3, r, ms, "triton", _best_sdpa(ms), ISSUE3_RATIO, "cuda_graph"))
    summary = {}
    for issue in (3, 4):
        scored = [e for e in rows if e["issue"] == issue and e["timing"] == "eager"]
        timed = [e for e in scored if e["met"] is not None]
        summary[f"issue {issue}"] = {
            "eager_rows": len(scored), "timed": len(timed), "met": sum(bool(e["met"]) for e in timed),
            "missed": [_label(e) for e in timed if not e["met"]],
            "untimed": [_label(e) + f" ({e['why']})" for e in scored if e["met"] is None],
            "graph_rows_met": [_label(e) for e in rows if e["issue"] == issue and e["timing"] == "cuda_graph"
                               and e["met"]],
            "graph_rows_missed": [_label(e) for e in rows if e["issue"] == issue and e["timing"] == "cuda_graph"
                                  and e["met"] is False],
        }
    return {"card": results.get("card"), "rows": rows, "summary": summary}


def _label(e: dict) -> str:
    ratio = f" x{e['ratio']:.2f}" if e.get("ratio") else ""
    return f"L {e['L']} d {e['D']} ng {e['ng']} {e['dtype']} {e['mode']}{ratio}"


def markdown(card: dict) -> str:
    """The scorecard as text: one line per issue, then a table of the rows each misses."""
    lines = [f"Scorecard ({card.get('card')}):"]
    for issue, s in card["summary"].items():
        target = ("CUDA >= FA2 (sdpa-flash)" if issue == "issue 4" else
                  f"Triton >= {ISSUE3_RATIO}x the best SDPA backend ({ISSUE3_HEADLINE_RATIO}x and <= "
                  f"{ISSUE3_HEADLINE_MS} ms at L 4096 d 40 ng 2 bf16 fwd)")
        lines.append(f"- {issue}, {target}: {s['met']} of {s['timed']} eager rows"
                     + (f"; {len(s['untimed'])} untimed" if s["untimed"] else "")
                     + (f"; CUDA-graph rows met {len(s['graph_rows_met'])}, missed {len(s['graph_rows_missed'])}"
                        if s["graph_rows_met"] or s["graph_rows_missed"] else ""))
        for m in s["missed"]:
            lines.append(f"  - missed: {m}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results.json of gpu_check.sh (benchmarks/results/<card>-<date>.json)")
    ap.add_argument("--json", help="write the scored rows and summary here")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        card = score(json.load(f))
    print(markdown(card))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(card, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
