"""benchmarks/ncu_attention.py's parsing of ncu's ``--csv --page details`` output (the GPU run itself needs ncu)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "ncu_attention", Path(__file__).resolve().parents[2] / "benchmarks" / "ncu_attention.py")
ncu_attention = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ncu_attention)

_HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
         '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _row(kid, kernel, name, unit, value):
    fields = [kid, 1, "python", "h", kernel, 1, 7, "(128, 1, 1)", "(64, 8, 2)", 0, "9.0", "S", name, unit, value]
    return ",".join(f'"{f}"' for f in fields)


def test_details_csv_groups_metrics_per_launch_and_drops_short_kernels():
    text = "\n".join([
        "==PROF== Connected to process 1 (python)", "profiled ['sdpa-cudnn', 'triton'] fwd", _HEAD,
        _row(0, "cudnn_sdpa", "Duration", "usecond", "602.30"),
        _row(0, "cudnn_sdpa", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "%", "61.2"),
        _row(1, "helper", "Duration", "nsecond", "2,100"),
        _row(2, "_set_attn_fwd_kernel", "Duration", "msecond", "0.80"),
        _row(2, "_set_attn_fwd_kernel", "Achieved Occupancy", "%", "12.1"),
    ])
    kernels = ncu_attention.parse_details_csv(text)
    assert [k["kernel"] for k in kernels] == ["cudnn_sdpa", "helper", "_set_attn_fwd_kernel"]
    assert kernels[2]["metrics"]["Achieved Occupancy"] == ("12.1", "%")
    table = ncu_attention.key_table(kernels).splitlines()
    assert len(table) == 4  # header, rule, and the two kernels of >= 5 us (the 2.1 us helper is left out)
    assert "61.2 %" in table[2] and "12.1 %" in table[3] and "0.80 msecond" in table[3]


def test_no_csv_is_no_kernels():
    assert ncu_attention.parse_details_csv("==ERROR== the profiler failed") == []
