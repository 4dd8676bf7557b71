"""Turn one gpu_check run into the committed results format: ``results.json`` + ``results.png``.

    python benchmarks/collect_results.py OUTDIR [--build full]

Reads, when present: OUTDIR/bench.json (pytest-benchmark), OUTDIR/pytest_gpu.xml, pytest_gpu_fused.xml and
pytest_gpu_model.xml, pytest_gpu_ws.xml, pytest_gpu_gluon.xml (junit), ws_probe.json, gluon_probe.json and
gluon_bwd_probe.json (tools/ws_probe.py), attention.json (attention_sweep.py), step.json (step_levers.py),
profile_eager.json / profile_fused.json / profile_compiled.json (profile_step.py), table6.json (table6.py),
ncu_attention.json / ncu_attention_bwd80.json (ncu_attention.py), gemm_probe.json (gemm_probe.py) and harness.log
(the torch-free CUDA harness: its TIME lines become ``harness_times``, device times without host overhead).
Commit the result as benchmarks/results/<card>-<yyyy-mm-dd>.json (+ .png; a second part of the same day gets a
``-model`` suffix).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def _tests(path: str) -> dict:
    if not os.path.exists(path):
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for s in suites:
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed[:50]
    return tot


def _benchmarks(path: str) -> tuple[list, dict]:
    if not os.path.exists(path):
        return [], {}
    data = json.load(open(path))
    rows = []
    for b in data.get("benchmarks", []):
        rows.append({"name": b["name"], "group": b.get("group"), "params": b.get("params"),
                     "median_ms_pytest_benchmark": b["stats"]["median"] * 1e3, **b.get("extra_info", {})})
    return rows, data.get("machine_info", {})


def _plot(rows: list, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = [r for r in rows if isinstance(r.get("ms"), (int, float))]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(rows))))
    names = [r["name"].replace("test_", "") for r in rows]
    ax.barh(range(len(rows)), [r["ms"] for r in rows])
    ax.set_yticks(range(len(rows)), names, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("ms (median, lower is better)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_TIME = re.compile(r"TIME B=(\d+) G=(\d+) L=(\d+) H=(\d+) D=(\d+) (\w+) mask=(\d+): fwd ([\d.]+) ms \([\d.]+ TFLOP/s\)"
                   r"\s+bwd ([\d.]+) ms \([\d.]+ TFLOP/s\)(.*)")


def harness_times(text: str) -> list[dict]:
    """The TIME lines of the CUDA harness's log (csrc/cuda/tests/set_attention_gpu_check.cu) as rows: the shape
    (B, G, L, H, D, dtype "bf16"/"fp16", mask), ``ms_fwd`` and ``ms_bwd`` of the default instances, and one
    ``ms_<label>`` per other instance the line times, under the line's own label (``ms_fwd[32 rows/warp]``,
    ``ms_fwd[2 splits, auto]``). Median times of cudaEvent-timed launches: device time, no host overhead."""
    rows = []
    for line in text.splitlines():
        m = _TIME.match(line.strip())
        if not m:
            continue
        B, G, L, H, D, dtype, mask, fwd, bwd, rest = m.groups()
        row = {"B": int(B), "G": int(G), "L": int(L), "H": int(H), "D": int(D), "dtype": dtype, "mask": int(mask),
               "ms_fwd": float(fwd), "ms_bwd": float(bwd)}
        for label, ms in re.findall(r"((?:fwd|bwd)\[[^\]]+\]) ([\d.]+) ms", rest):
            row[f"ms_{label}"] = float(ms)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("outdir")
    ap.add_argument("--build", default="unknown", help="how the extension built (full / without_cuda_attention)")
    ap.add_argument("--part", default="all", help="which gpu_check part produced OUTDIR (all / kernels / model)")
    args = ap.parse_args()
    rows, machine = _benchmarks(os.path.join(args.outdir, "bench.json"))
    card = next((r.get("device") for r in rows if r.get("device")), None)
    try:
        import torch

        card = card or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        versions = {}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    result = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "build": args.build,
        "part": args.part,
        "tests_gpu": _tests(os.path.join(args.outdir, "pytest_gpu.xml")),
        "tests_gpu_fused": _tests(os.path.join(args.outdir, "pytest_gpu_fused.xml")),
        "tests_gpu_model": _tests(os.path.join(args.outdir, "pytest_gpu_model.xml")),
        "tests_gpu_ws": _tests(os.path.join(args.outdir, "pytest_gpu_ws.xml")),
        "tests_gpu_gluon": _tests(os.path.join(args.outdir, "pytest_gpu_gluon.xml")),
        "benchmarks": rows,
        "machine_info": {k: machine.get(k) for k in ("node", "processor", "cpu") if k in machine},
    }
    for key, name in (("attention_sweep", "attention.json"), ("table6", "table6.json"), ("step_levers", "step.json"),
                      ("profile_eager", "profile_eager.json"), ("profile_fused", "profile_fused.json"),
                      ("profile_compiled", "profile_compiled.json"),
                      ("ncu_attention", "ncu_attention.json"), ("ncu_attention_bwd80", "ncu_attention_bwd80.json"),
                      ("ws_probe", "ws_probe.json"),
                      ("gluon_probe", "gluon_probe.json"), ("gluon_bwd_probe", "gluon_bwd_probe.json"),
                      ("gemm_probe", "gemm_probe.json")):
        path = os.path.join(args.outdir, name)
        if os.path.exists(path):
            result[key] = json.load(open(path))
    harness_log = os.path.join(args.outdir, "harness.log")
    if os.path.exists(harness_log):
        with open(harness_log, errors="replace") as f:
            result["harness_times"] = harness_times(f.read())
    # the predictions made before the run, against its outcome (benchmarks/predictions.json); a broken predictions
    # file costs this entry only
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import check_predictions

        result["predictions"] = check_predictions.check(result, check_predictions.load_predictions())
        print("predictions vs outcome:\n" + check_predictions.markdown(result["predictions"]))
    except Exception as e:  # noqa: BLE001
        result["predictions"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"predictions not checked: {result['predictions']['error']}")
    # issue 3's and issue 4's targets on this run's sweep (benchmarks/scorecard.py); likewise fail-safe
    if "attention_sweep" in result:
        try:
            import scorecard

            result["scorecard"] = scorecard.score(result)
            print(scorecard.markdown(result["scorecard"]))
        except Exception as e:  # noqa: BLE001
            result["scorecard"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"scorecard not made: {result['scorecard']['error']}")
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    _plot(rows, os.path.join(args.outdir, "results.png"), f"jedi-kernels GPU benchmarks on {card}")
    t = result["tests_gpu"]
    print(f"results.json: {len(rows)} benchmarks on {card}; gpu tests: {t}; model gpu tests: "
          f"{result['tests_gpu_model']}; embedded: {[k for k in ('attention_sweep', 'table6', 'step_levers') if k in result]}")


if __name__ == "__main__":
    main()
