"""Issue 9's step ladder (``step_levers.py``) as a CPU rehearsal under pytest-benchmark.

The measurement itself is the script on a GPU (``benchmarks/gpu_check.sh`` runs it); here it runs end to end on
``UNetConfig.tiny``-sized models with the eager compile backend, so its configuration switches, bookkeeping, JSON and
markdown are exercised in CI: every rung present, the CPU-impossible ones (CUDA graphs, the CUDA kernel) recorded as
skipped with the reason, the precision row filled.
"""
from __future__ import annotations

import json

import step_levers as sl
import torch
from common import env_info


def test_step_levers_script_cpu_rehearsal(benchmark, tmp_path, one_thread):
    out = tmp_path / "levers.json"
    cudnn_before = torch.backends.cudnn.benchmark
    argv = ["--device", "cpu", "--tiny", "--compile-backend", "eager", "--rep-ms", "20", "--out", str(out)]
    benchmark.pedantic(lambda: sl.main(argv), rounds=1, iterations=1)
    result = json.loads(out.read_text())
    rows = {(r["workload"], r["entry"]): r for r in result["rows"]}
    for entry, _ in sl.LADDER:
        assert ("jedi_ng2", entry) in rows, entry
    for entry in ("eager, float32 GN", "eager", "+channels_last", "+fused_ops", "+fused_ln", "+fold_bias", "+fuse_qkv",
                  "+fuse_context_kv", "+fold_linear_bias", "+subpixel_upsample", "+residual_add",
                  "+skip_cat", "+frozen_weights", "+cudnn_benchmark"):
        assert rows[("jedi_ng2", entry)]["ms"] > 0, rows[("jedi_ng2", entry)]
    assert rows[("jedi_ng2", "+cudnn_benchmark")]["config"]["cudnn_benchmark"] is True
    assert torch.backends.cudnn.benchmark is cudnn_before  # the script restores the process-wide switch
    assert "CUDA graphs need a CUDA device" in rows[("jedi_ng2", "every rung (cuda_graph)")]["error"]
    assert rows[("jedi_ng2", "cuda_graph[attn=triton]")]["error"].startswith("skipped")
    assert rows[("jedi_ng2", "precision fp16 best vs fp32")]["rel_err"] is not None
    assert {"jedi_ng4", "blipd"} <= {r["workload"] for r in result["rows"]}
    assert set(result["summary"]["best_ms"]) == {"jedi_ng2", "jedi_ng4", "blipd"}
    assert "| jedi_ng2 | +fused_ops |" in out.with_suffix(".md").read_text()
    benchmark.extra_info.update(env_info("cpu"), summary=result["summary"])
