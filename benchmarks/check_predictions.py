"""Check the predictions made before a GPU run against the run's results (prediction vs outcome, as issue 9 asks
for every lever).

    python benchmarks/check_predictions.py RESULTS.json [--predictions benchmarks/predictions.json] [--any-card]
        [--json OUT.json]

``benchmarks/predictions.json`` lists each prediction: the card it is for (a substring of ``results["card"]``), the
results section (``attention_sweep``: a list of rows; ``step_levers``: its ``rows``; ``ncu_attention`` and
``ncu_attention_bwd80``: one row per profiled kernel, ``{"kernel": its name, "duration_us": ncu's Duration}``;
``harness_times``: the CUDA harness's TIME lines, device times, ``collect_results.harness_times``; ``gemm_probe``:
its ``rows``, µs per call of each variant), the fields a row must have (``null``: the field is absent, e.g.
``"kind": null`` for the sweep's plain backend rows), a dotted path to the value (``ms.cuda``, ``ms_8warps``), the
predicted range [lo, hi] in the value's unit, and optionally a peer value of
the same row (``ms.sdpa-flash``). Each verdict is one of "as predicted", "better than predicted" (below lo: these are
times), "worse than predicted", "not measured" (no such row, or no value in it; the reason is given) and "other
card" (made for another card; ``--any-card`` checks it anyway). ``gpu_check.sh`` embeds the verdicts in
``results.json["predictions"]`` through ``collect_results.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ncu_attention import duration_us  # (benchmarks/ is on sys.path when these scripts run)

DEFAULT_PREDICTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predictions.json")
SOURCES = ("attention_sweep", "step_levers", "ncu_attention", "ncu_attention_bwd80", "harness_times", "gemm_probe")
_ABSENT = object()


def load_predictions(path: str = DEFAULT_PREDICTIONS) -> list[dict]:
    """The ``predictions`` list of a predictions file, each entry checked for the fields the checker needs.

    Raises:
        ValueError: naming the entry, for a missing field, an unknown source or a range that is not [lo <= hi].
    """
    with open(path) as f:
        preds = json.load(f)["predictions"]
    ids = set()
    for p in preds:
        missing = [k for k in ("id", "card", "source", "match", "value", "range") if k not in p]
        if missing:
            raise ValueError(f"prediction {p.get('id', p)!r} lacks {missing}")
        if p["id"] in ids:
            raise ValueError(f"prediction id {p['id']!r} appears twice")
        ids.add(p["id"])
        if p["source"] not in SOURCES:
            raise ValueError(f"prediction {p['id']!r}: source must be one of {SOURCES}, got {p['source']!r}")
        lo, hi = p["range"]
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi):
            raise ValueError(f"prediction {p['id']!r}: range must be [lo, hi] with lo <= hi, got {p['range']!r}")
    return preds


def section_rows(results: dict, source: str) -> list[dict]:
    """The dict rows of a results.json section: ``attention_sweep`` and ``harness_times`` (lists), ``step_levers``
    and ``gemm_probe`` (their ``rows``), or an ncu section (its ``kernels``, each as {"kernel", "duration_us"}:
    ncu's Duration, under its clock control)."""
    section = results.get(source)
    if source.startswith("ncu_"):
        kernels = section.get("kernels") if isinstance(section, dict) else None
        return [{"kernel": k.get("kernel"), "duration_us": duration_us(k)}
                for k in kernels if isinstance(k, dict)] if isinstance(kernels, list) else []
    if source in ("step_levers", "gemm_probe"):
        section = section.get("rows") if isinstance(section, dict) else None
    return [r for r in section if isinstance(r, dict)] if isinstance(section, list) else []


def _get(row: dict, path: str):
    """The value at a dotted path (``ms.cuda``: row["ms"]["cuda"]); _ABSENT where a step is missing."""
    cur = row
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _ABSENT
        cur = cur[part]
    return cur


def _matches(row: dict, match: dict) -> bool:
    for key, want in match.items():
        have = row.get(key, None)
        if want is None:
            if have is not None:
                return False
        elif have != want:
            return False
    return True


def check(results: dict, predictions: list[dict], any_card: bool = False) -> list[dict]:
    """One verdict per prediction: its id, what, card, range, measured value (or None), peer value, verdict and, for
    "not measured", why. The first matching row with a numeric value decides (a sweep run has one row per shape)."""
    card = str(results.get("card") or "")
    out = []
    for p in predictions:
        v = {"id": p["id"], "what": p.get("what", ""), "card": p["card"], "range": list(p["range"]),
             "before": p.get("before"), "measured": None, "peer": None, "verdict": None}
        if not any_card and p["card"].lower() not in card.lower():
            v["verdict"], v["why"] = "other card", f"made for {p['card']}, results are from {card or 'an unknown card'}"
            out.append(v)
            continue
        rows = [r for r in section_rows(results, p["source"]) if _matches(r, p["match"])]
        if not rows:
            v["verdict"], v["why"] = "not measured", f"no {p['source']} row with {p['match']}"
            out.append(v)
            continue
        val = next((x for x in (_get(r, p["value"]) for r in rows) if isinstance(x, (int, float))), None)
        if val is None:
            errs = [r.get("error") or r.get("errors") for r in rows if r.get("error") or r.get("errors")]
            v["verdict"], v["why"] = "not measured", f"{p['value']} is not a number in the matching row" + (
                f" (errors: {str(errs[0])[:200]})" if errs else "")
            out.append(v)
            continue
        lo, hi = p["range"]
        v["measured"] = float(val)
        v["verdict"] = "as predicted" if lo <= val <= hi else "better than predicted" if val < lo else \
            "worse than predicted"
        if p.get("peer"):
            peer = next((x for x in (_get(r, p["peer"]) for r in rows) if isinstance(x, (int, float))), None)
            if peer is not None:
                v["peer"] = {"value": p["peer"], "ms": float(peer), "ours_faster": bool(val <= peer)}
        out.append(v)
    return out


def markdown(verdicts: list[dict]) -> str:
    """The verdicts as a markdown table (measured values in the predictions' units)."""
    lines = ["| prediction | card | before | predicted | measured | verdict | peer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in verdicts:
        lo, hi = v["range"]
        measured = f"{v['measured']:.4g}" if v["measured"] is not None else "—"
        peer = ""
        if v.get("peer"):
            who = "ours faster" if v["peer"]["ours_faster"] else "peer faster"
            peer = f"{v['peer']['value']} {v['peer']['ms']:.4g} ({who})"
        verdict = v["verdict"] + (f": {v['why']}" if v.get("why") and v["verdict"] == "not measured" else "")
        before = f"{v['before']:.4g}" if isinstance(v.get("before"), (int, float)) else ""
        lines.append(f"| {v['id']} | {v['card']} | {before} | {lo:.4g}–{hi:.4g} | {measured} | {verdict} | {peer} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results.json of gpu_check.sh (benchmarks/results/<card>-<date>.json)")
    ap.add_argument("--predictions", default=DEFAULT_PREDICTIONS)
    ap.add_argument("--any-card", action="store_true", help="check predictions made for other cards too")
    ap.add_argument("--json", help="also write the verdicts here")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    verdicts = check(results, load_predictions(args.predictions), any_card=args.any_card)
    print(markdown(verdicts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(verdicts, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
