"""benchmarks/gemm_probe.py (the UNet step's linear GEMMs with and without a bias epilogue, and accumulating in place):
its CPU rehearsal writes a row per shape with every variant timed, the variants compute what they say, the roofline
is the larger of the FLOP and byte bounds, and predictions read its rows."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import check_predictions as cp  # noqa: E402
import gemm_probe as gp  # noqa: E402


def test_cpu_rehearsal_writes_every_variant(tmp_path):
    out = tmp_path / "gp.json"
    result = gp.main(["--out", str(out), "--device", "cpu", "--quick", "--dtype", "float32"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["M"], r["K"], r["N"]) for r in saved["rows"]] == gp.QUICK_SHAPES
    for r in saved["rows"]:
        assert "error" not in r, r
        assert set(r["us"]) == set(gp.VARIANTS) and all(v > 0 for v in r["us"].values())
        assert r["bias_over_nobias"] == pytest.approx(r["us"]["bias"] / r["us"]["nobias"])
    assert "| 64 x 32 x 32 |" in out.with_suffix(".md").read_text()


def test_variants_compute_what_they_say():
    gp.check_variants(torch.device("cpu"), torch.float64)
    fns = gp.make_fns(5, 7, 3, torch.device("cpu"), torch.float64)
    once = fns["accumulate"]().clone()
    assert torch.allclose(fns["accumulate"](), 2 * once)  # in place: a second call adds the product again


def test_roofline_is_the_larger_bound():
    # 16384 x 320 x 320 in fp16: 3.36 GFLOP (4.6 us at 724 TFLOP/s) against 21.2 MB (7.1 us at 3.0 TB/s)
    assert gp.roofline_us(16384, 320, 320, 2) == pytest.approx(7.06, abs=0.01)
    # 1024 x 5120 x 1280: compute-bound, 13.4 GFLOP at 724 TFLOP/s
    assert gp.roofline_us(1024, 5120, 1280, 2) == pytest.approx(2 * 1024 * 5120 * 1280 / 724e12 * 1e6)


def test_predictions_read_gemm_probe_rows():
    results = {"card": "NVIDIA H200", "gemm_probe": {"rows": [
        {"M": 16384, "K": 320, "N": 320, "dtype": "float16", "us": {"bias": 15.0, "nobias": 8.0}}]}}
    pred = {"id": "t", "card": "H200", "source": "gemm_probe", "match": {"M": 16384, "K": 320, "N": 320},
            "value": "us.nobias", "range": [7.0, 9.0], "peer": "us.bias"}
    (v,) = cp.check(results, [pred])
    assert v["measured"] == 8.0 and v["verdict"] not in ("not measured", "other card"), v
