"""table6.py --merge: one Table 6 from runs of disjoint workload subsets (a device session fits only part of the full
run)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import table6 as t6  # noqa: E402

ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "cudnn": 91900,
       "diffusers": "0.42.1"}


def _part(names, ms, env=ENV, config="optimized"):
    rows = [dict(workload=n, impl="ours", mode="cuda_graph", ms=ms[n], error=None) for n in names]
    return {"env": dict(env), "date": "2026-11-27", "argv": ["--workloads", ",".join(names)], "quick": False,
            "ours_config": config, "total_s": 100.0, "results": rows,
            "workloads": {n: dict(asdict(t6.WORKLOADS[n]), tflop=t6.WORKLOADS[n].batch * 0.8) for n in names}}


def test_merge_recomputes_ratios_across_parts(tmp_path):
    a = _part(["blipd", "elite"], {"blipd": 10.0, "elite": 11.0})
    b = _part(["jedi_ng2", "elite"], {"jedi_ng2": 15.0, "elite": 12.0})  # elite measured again: the later run wins
    m = t6.merge_results([a, b])
    rows = {r["workload"]: r for r in m["results"]}
    assert set(rows) == {"blipd", "elite", "jedi_ng2"} and len(m["results"]) == 3
    assert rows["jedi_ng2"]["ratio_to_blipd"] == 1.5 and rows["elite"]["ratio_to_blipd"] == 1.2
    assert m["total_s"] == 200.0 and len(m["merged_from"]) == 2
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    t6.main(["--merge", str(pa), str(pb), "--out", str(out)])
    assert "| jedi_ng2 |" in out.with_suffix(".md").read_text()
    assert {r["workload"] for r in json.loads(out.read_text())["results"]} == {"blipd", "elite", "jedi_ng2"}


@pytest.mark.parametrize("other", [dict(ENV, torch="2.12.0"), dict(ENV, device="NVIDIA A100-SXM4-80GB")])
def test_merge_refuses_different_software_or_card(other):
    with pytest.raises(ValueError, match="different cards or software"):
        t6.merge_results([_part(["blipd"], {"blipd": 1.0}), _part(["elite"], {"elite": 1.0}, env=other)])


def test_merge_refuses_different_unet_configurations():
    with pytest.raises(ValueError, match="different UNet configurations"):
        t6.merge_results([_part(["blipd"], {"blipd": 1.0}), _part(["elite"], {"elite": 1.0}, config="plain")])
