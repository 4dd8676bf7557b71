"""benchmarks/check_predictions.py: predictions made before a GPU run against its results.json (CPU only)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import check_predictions as cp  # noqa: E402


def _pred(**kw):
    p = {"id": "p", "card": "H100", "source": "attention_sweep",
         "match": {"kind": None, "L": 1024, "D": 80, "ng": 1, "dtype": "bfloat16", "mode": "fwd"},
         "value": "ms.cuda", "range": [0.026, 0.031], "peer": "ms.sdpa-flash"}
    p.update(kw)
    return p


def _results(cuda_ms, card="NVIDIA H100 80GB HBM3"):
    return {"card": card, "attention_sweep": [
        # a kernel-variant row of the same shape first: "kind": None must skip it
        {"kind": "cuda_fwd_splits", "L": 1024, "D": 80, "ng": 1, "dtype": "bfloat16", "mode": "fwd", "ms_auto": 1.0},
        {"L": 1024, "D": 80, "ng": 1, "dtype": "bfloat16", "mode": "fwd", "mask": "none",
         "ms": {"cuda": cuda_ms, "sdpa-flash": 0.038}},
        {"L": 1024, "D": 80, "ng": 1, "dtype": "float16", "mode": "fwd", "ms": {"cuda": 9.0}}],
        "step_levers": {"rows": [{"workload": "jedi_ng2", "entry": "+targets_only (cuda_graph)", "ms": 10.95},
                                 {"workload": "jedi_ng4", "entry": "best+targets_only (cuda_graph)", "ms": None,
                                  "error": "OutOfMemoryError: ..."}]}}


@pytest.mark.parametrize("ms, verdict, faster", [(0.028, "as predicted", True), (0.020, "better than predicted", True),
                                                 (0.033, "worse than predicted", True),
                                                 (0.040, "worse than predicted", False)])
def test_verdicts_and_peer(ms, verdict, faster):
    (v,) = cp.check(_results(ms), [_pred()])
    assert v["measured"] == ms and v["verdict"] == verdict
    assert v["peer"] == {"value": "ms.sdpa-flash", "ms": 0.038, "ours_faster": faster}


def test_other_cards_are_reported_not_checked_unless_asked():
    (v,) = cp.check(_results(0.028, card="NVIDIA H200"), [_pred()])
    assert v["verdict"] == "other card" and v["measured"] is None and "H200" in v["why"]
    (v,) = cp.check(_results(0.028, card="NVIDIA H200"), [_pred()], any_card=True)
    assert v["verdict"] == "as predicted"


def test_not_measured_says_why():
    preds = [_pred(id="a", match={"kind": None, "L": 4096}), _pred(id="b", value="ms.triton"),
             _pred(id="c", source="step_levers",
                   match={"workload": "jedi_ng4", "entry": "best+targets_only (cuda_graph)"},
                   value="ms", range=[25.5, 26.0], peer=None),
             _pred(id="d", source="step_levers", match={"workload": "jedi_ng2", "entry": "+targets_only (cuda_graph)"},
                   value="ms", range=[10.9, 11.0], peer=None)]
    va, vb, vc, vd = cp.check(_results(0.028), preds)
    assert va["verdict"] == "not measured" and "no attention_sweep row" in va["why"]
    assert vb["verdict"] == "not measured" and "ms.triton is not a number" in vb["why"]
    assert vc["verdict"] == "not measured" and "OutOfMemoryError" in vc["why"]
    assert vd["verdict"] == "as predicted" and vd["measured"] == 10.95
    table = cp.markdown([va, vb, vc, vd])
    assert table.count("\n") == 5 and "not measured: no attention_sweep row" in table and "| 10.95 |" in table


def test_load_rejects_malformed_predictions(tmp_path):
    def write(preds):
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"predictions": preds}))
        return str(path)

    with pytest.raises(ValueError, match="lacks"):
        cp.load_predictions(write([{"id": "x"}]))
    with pytest.raises(ValueError, match="lo <= hi"):
        cp.load_predictions(write([_pred(range=[2, 1])]))
    with pytest.raises(ValueError, match="source must be"):
        cp.load_predictions(write([_pred(source="table7")]))
    with pytest.raises(ValueError, match="twice"):
        cp.load_predictions(write([_pred(), _pred()]))


def test_the_committed_predictions_load_and_find_their_rows_in_the_committed_results():
    """Every prediction is well formed, and on the committed GPU results of its card its selector finds the row it
    is about: a prediction that can never be checked (a typo in its match) would stay "not measured" forever. Rows
    that first appear with the change a prediction is about (the key-split sweep rows, the step ladder's newer rungs)
    are exempt, listed here."""
    preds = cp.load_predictions()
    assert len(preds) >= 10
    new_rows = {"s23-cuda-fwd-32rows-d160-ng8", "s25-cuda-bwd-preprocess-d80-h100",
                "s26-cuda-fwd-d160-L256-ng8-default-h200",  # (a harness TIME shape added with the change)
                "s26-cuda-fwd-split-graph-d80-ng1-h200",  # (the graph rows' "cuda-splits" entry, likewise)
                "s26-cuda-bwd-query-split-d160-L256-ng2-h200",  # (a harness variant compiled with the change)
                # the step ladder's +fold_linear_bias rung, added with the change
                "s27-fold-linear-bias-ng2-h200", "s27-fold-linear-bias-ng2-h100",
                # the GEMM probe (benchmarks/gemm_probe.py), added with the change
                "s27-gemm-nobias-64x64-h200", "s27-gemm-accumulate-ff-out-64x64-h200",
                # the harness's bwd[split] timing, added with the split backward
                "s27-cuda-bwd-split-d80-L1024-ng2-h200", "s27-cuda-bwd-split-d160-L256-ng2-h200",
                "s27-cuda-bwd-split-d40-L4096-ng2-h200",
                # the step ladder's +subpixel_upsample rung, added with the change
                "s28-subpixel-upsample-ng2-h200", "s28-subpixel-upsample-ng2-h100",
                "s28-residual-add-ng2-h200", "s28-residual-add-ng2-h100",  # (and its +residual_add rung)
                "s28-skip-cat-ng2-h200", "s28-skip-cat-ng2-h100",  # (and +skip_cat)
                "s28-frozen-weights-ng2-h200", "s28-frozen-weights-ng2-h100",  # (and +frozen_weights)
                # H100 predictions on the sweep's key-split rows, which no H100 run has had yet
                "s22-cuda-fwd-splits-d80-L1024-ng1", "s22-cuda-fwd-splits-d160-L64-ng4",
                "s22-cuda-fwd-splits-d160-L256-ng1", "s22-cuda-fwd-splits-d160-L256-ng2"}
    found = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        with open(path) as f:
            results = json.load(f)
        for v in cp.check(results, preds):
            if v["verdict"] not in ("other card", "not measured"):
                found.add(v["id"])
    assert {p["id"] for p in preds} - new_rows <= found, {p["id"] for p in preds} - new_rows - found


def test_ncu_sections_give_one_row_per_kernel_with_its_duration_in_us():
    """The ncu sections (ncu_attention, ncu_attention_bwd80) are checked by kernel name; their Duration strings
    ("17,920" ns, "1.2" ms) come out in µs, and a kernel without one is "not measured"."""
    name = "void jedi::set_attn_bwd_preprocess_kernel<__nv_bfloat16>(jedi::SetAttnBwdParams)"
    results = {"card": "NVIDIA H200", "ncu_attention_bwd80": {"kernels": [
        {"kernel": "_set_attn_bwd_preprocess_kernel", "metrics": {"Duration": ["7,488", "ns"]}},
        {"kernel": name, "metrics": {"Duration": ["17,920", "ns"]}},
        {"kernel": "slow", "metrics": {"Duration": ["1.25", "ms"]}},
        {"kernel": "no duration", "metrics": {"Registers Per Thread": ["30", "register/thread"]}}]}}
    rows = cp.section_rows(results, "ncu_attention_bwd80")
    assert [r["duration_us"] for r in rows] == [pytest.approx(7.488), pytest.approx(17.92), pytest.approx(1250.0), None]
    assert cp.section_rows(results, "ncu_attention") == []
    preds = [_pred(id="pre", card="H200", source="ncu_attention_bwd80", match={"kernel": name}, value="duration_us",
                   range=[5.5, 10.0], peer=None),
             _pred(id="none", card="H200", source="ncu_attention_bwd80", match={"kernel": "no duration"},
                   value="duration_us", range=[1.0, 2.0], peer=None)]
    pre, none = cp.check(results, preds)
    assert pre["verdict"] == "worse than predicted" and pre["measured"] == pytest.approx(17.92)
    assert none["verdict"] == "not measured"


def test_harness_times_come_from_the_cuda_harness_log_and_are_checked_by_shape():
    """collect_results.harness_times turns the CUDA harness's TIME lines into rows (default fwd / bwd and every
    labelled instance, other lines ignored); check_predictions reads them as the ``harness_times`` source."""
    import collect_results

    log = ("device: NVIDIA H200 (sm_90, 132 SMs)\nPASS something\n"
           "TIME B=2 G=1 L=1024 H=8 D=80 bf16 mask=0: fwd 0.037 ms (145 TFLOP/s)  bwd 0.098 ms (137 TFLOP/s)  "
           "fwd[16 rows/warp] 0.036 ms  fwd[2 splits, auto] 0.049 ms  bwd[4 warps] 0.128 ms\n"
           "TIME B=2 G=2 L=4096 H=8 D=40 fp16 mask=1: fwd 0.420 ms (204 TFLOP/s)  bwd 1.121 ms (192 TFLOP/s)\n"
           "251 passed, 0 failed\n")
    rows = collect_results.harness_times(log)
    assert rows == [
        {"B": 2, "G": 1, "L": 1024, "H": 8, "D": 80, "dtype": "bf16", "mask": 0, "ms_fwd": 0.037, "ms_bwd": 0.098,
         "ms_fwd[16 rows/warp]": 0.036, "ms_fwd[2 splits, auto]": 0.049, "ms_bwd[4 warps]": 0.128},
        {"B": 2, "G": 2, "L": 4096, "H": 8, "D": 40, "dtype": "fp16", "mask": 1, "ms_fwd": 0.42, "ms_bwd": 1.121}]
    results = {"card": "NVIDIA H200", "harness_times": rows}
    pred = _pred(id="h", card="H200", source="harness_times",
                 match={"B": 2, "G": 1, "L": 1024, "H": 8, "D": 80, "dtype": "bf16", "mask": 0},
                 value="ms_fwd[2 splits, auto]", range=[0.026, 0.034], peer="ms_fwd")
    (v,) = cp.check(results, [pred])
    assert v["verdict"] == "worse than predicted" and v["measured"] == 0.049 and v["peer"]["ms"] == 0.037
    (v,) = cp.check({"card": "NVIDIA H200"}, [pred])
    assert v["verdict"] == "not measured"


def test_cli_prints_the_table_and_writes_json(tmp_path):
    res = tmp_path / "results.json"
    results = _results(0.028)
    results["attention_sweep"][0]["ms_auto"] = 0.028  # the key-split row, which s22's d 80 prediction reads
    res.write_text(json.dumps(results))
    out = tmp_path / "v.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "check_predictions.py"), str(res),
                           "--json", str(out)], capture_output=True, text=True, check=True)
    assert "| s22-cuda-fwd-splits-d80-L1024-ng1 | H100 |" in proc.stdout and "as predicted" in proc.stdout
    verdicts = json.loads(out.read_text())
    assert {v["id"] for v in verdicts} == {p["id"] for p in cp.load_predictions()}
