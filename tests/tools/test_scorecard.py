"""benchmarks/scorecard.py: issue 3's and issue 4's targets scored on a results.json (CPU only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import scorecard  # noqa: E402


def _row(L, D, ng, ms, mode="fwd", dtype="bfloat16", **kw):
    return {"L": L, "D": D, "ng": ng, "dtype": dtype, "mode": mode, "mask": "none", "ms": ms, "errors": {}, **kw}


def test_rows_are_scored_against_their_issue_targets():
    sweep = [
        _row(1024, 80, 1, {"sdpa-flash": 0.038, "sdpa-cudnn": 0.08, "cuda": 0.030, "triton": 0.09}),  # 4 met
        _row(256, 160, 8, {"sdpa-flash": 0.189, "sdpa-cudnn": 0.093, "cuda": 0.198, "triton": 0.07}),  # 4 missed
        # issue 3's headline: 1.3x cuDNN is not enough without <= 0.45 ms, and the reverse
        _row(4096, 40, 2, {"sdpa-flash": 1.1, "sdpa-cudnn": 0.62, "cuda": 0.7, "triton": 0.47}),
        _row(4096, 40, 2, {"sdpa-flash": 1.1, "sdpa-cudnn": 0.50, "cuda": 0.7, "triton": 0.44}, dtype="float16"),
        _row(64, 160, 2, {"sdpa-flash": 0.2, "sdpa-cudnn": 0.3}, mode="fwd+bwd",
             errors={"cuda": "RuntimeError: ..."}),  # ours failed: untimed, not met
        # not scored: a masked row, a kernel-variant row
        _row(1024, 80, 4, {"sdpa-flash": 1.0, "cuda": 9.0}, mask="blockdiag"),
        {"kind": "cuda_fwd_wgmma", "L": 4096, "D": 40, "ng": 2, "ms_wg64x2": 0.7},
        {"kind": "cuda_graph", "L": 1024, "D": 80, "ng": 2, "dtype": "bfloat16", "mode": "fwd+bwd",
         "ms_graph": {"sdpa-flash": 0.30, "sdpa-cudnn": 0.40, "cuda": 0.28, "triton": 0.33}},
    ]
    card = scorecard.score({"card": "NVIDIA H100 80GB HBM3", "attention_sweep": sweep})
    s4, s3 = card["summary"]["issue 4"], card["summary"]["issue 3"]
    assert s4["eager_rows"] == 5 and s4["timed"] == 4 and s4["met"] == 3
    assert s4["missed"] == ["L 256 d 160 ng 8 bfloat16 fwd x0.95"]
    assert s4["untimed"] == ["L 64 d 160 ng 2 bfloat16 fwd+bwd (cuda not timed)"]
    assert s4["graph_rows_met"] == ["L 1024 d 80 ng 2 bfloat16 fwd+bwd x1.07"] and s4["graph_rows_missed"] == []
    assert s3["timed"] == 4 and s3["met"] == 1  # only d 160 ng 8 (x1.33 of cuDNN) meets its 1.2x
    headline = [e for e in card["rows"] if e["issue"] == 3 and e["D"] == 40]
    assert [e["target_ratio"] for e in headline] == [1.3, 1.2]  # the bf16 row is the headline, fp16 is not
    assert headline[0]["ratio"] > 1.3 and headline[0]["target_ms"] == 0.45 and headline[0]["met"] is False
    assert headline[1]["ratio"] > 1.1 and headline[1]["met"] is False
    assert s3["graph_rows_missed"] == ["L 1024 d 80 ng 2 bfloat16 fwd+bwd x0.91"]
    text = scorecard.markdown(card)
    assert "issue 4, CUDA >= FA2 (sdpa-flash): 3 of 4 eager rows; 1 untimed; CUDA-graph rows met 1, missed 0" in text
    assert "  - missed: L 256 d 160 ng 8 bfloat16 fwd x0.95" in text


def test_the_committed_runs_score_as_their_write_ups_say():
    """The H200 run's write-up (benchmarks/README.md) has the CUDA backend at or above FA2 on 22 of 24 rows, below on
    d 80 ng 1 forward and d 160 ng 8 forward; its second run 20 of 24 (and Triton 9 of 24 for issue 3), its third 21
    of 24 (Triton 10) with the first CUDA-graph rows; the third H100 run's remaining misses are the ones the twenty-second
    session's note lists (d 80 forward + backward, d 160 L 256 ng 4 / 8 forward, and small-grid forwards)."""
    with open(os.path.join(ROOT, "benchmarks", "results", "h200-2026-11-28.json")) as f:
        s4 = scorecard.score(json.load(f))["summary"]["issue 4"]
    assert (s4["met"], s4["timed"]) == (22, 24)
    assert s4["missed"] == ["L 1024 d 80 ng 1 bfloat16 fwd x0.84", "L 256 d 160 ng 8 bfloat16 fwd x0.95"]
    with open(os.path.join(ROOT, "benchmarks", "results", "h200-2026-11-28-run2.json")) as f:
        summary = scorecard.score(json.load(f))["summary"]
    assert (summary["issue 4"]["met"], summary["issue 4"]["timed"]) == (20, 24)
    assert summary["issue 4"]["missed"] == [
        "L 1024 d 80 ng 1 bfloat16 fwd x0.53", "L 1024 d 80 ng 2 bfloat16 fwd+bwd x0.91",
        "L 256 d 160 ng 8 bfloat16 fwd x0.97", "L 64 d 160 ng 1 bfloat16 fwd x0.77"]
    assert (summary["issue 3"]["met"], summary["issue 3"]["timed"]) == (9, 24)
    # the third: the first working CUDA-graph rows (device time), where the CUDA backend meets FA2 only at d 40
    with open(os.path.join(ROOT, "benchmarks", "results", "h200-2026-11-28-run3.json")) as f:
        summary = scorecard.score(json.load(f))["summary"]
    assert (summary["issue 4"]["met"], summary["issue 4"]["timed"]) == (21, 24)
    assert (summary["issue 3"]["met"], summary["issue 3"]["timed"]) == (10, 24)
    assert summary["issue 4"]["graph_rows_met"] == ["L 4096 d 40 ng 2 bfloat16 fwd+bwd x1.36"]
    assert "L 256 d 160 ng 2 bfloat16 fwd+bwd x0.62" in summary["issue 4"]["graph_rows_missed"]
    with open(os.path.join(ROOT, "benchmarks", "results", "h100-2026-11-27-run3.json")) as f:
        s4 = scorecard.score(json.load(f))["summary"]["issue 4"]
    assert (s4["met"], s4["timed"]) == (17, 24)
    assert "L 1024 d 80 ng 2 bfloat16 fwd+bwd x0.65" in s4["missed"]
    assert "L 256 d 160 ng 4 bfloat16 fwd x0.90" in s4["missed"] and "L 256 d 160 ng 8 bfloat16 fwd x0.96" in s4["missed"]


def test_cli_prints_and_writes_json(tmp_path):
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"card": "NVIDIA H200", "attention_sweep": [
        _row(1024, 80, 1, {"sdpa-flash": 0.038, "cuda": 0.030})]}))
    out = tmp_path / "score.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scorecard.py"), str(res),
                           "--json", str(out)], capture_output=True, text=True, check=True)
    assert "Scorecard (NVIDIA H200):" in proc.stdout and "1 of 1 eager rows" in proc.stdout
    assert json.loads(out.read_text())["summary"]["issue 4"]["met"] == 1
