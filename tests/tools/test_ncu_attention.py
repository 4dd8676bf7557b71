"""benchmarks/ncu_attention.py's parsing of ncu's ``--csv --page details`` output (the GPU run itself needs ncu)."""
from __future__ import annotations

import importlib.util

import pytest
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


def test_stall_reasons_are_asked_as_ratios_and_tabled_per_kernel():
    """Each stall reason's cycles per issued instruction (WarpStateStats' breakdown) is asked as ``.ratio`` (the pipes
    as % of peak), and the second table has a column for each reason some kernel spends >= 0.05 cycles on."""
    barrier = "smsp__average_warps_issue_stalled_barrier_per_issue_active"
    assert ncu_attention.metric_arg(barrier) == barrier + ".ratio"
    assert ncu_attention.metric_arg("sm__inst_executed_pipe_xu").endswith(".avg.pct_of_peak_sustained_active")
    wait = "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
    text = "\n".join([_HEAD,
                      _row(0, "gluon", "Duration", "usecond", "1,384.77"),
                      _row(0, "gluon", barrier + ".ratio", "", "1.92"),
                      _row(0, "gluon", wait, "", "0.61"),
                      _row(0, "gluon", "smsp__average_warps_issue_stalled_drain_per_issue_active.ratio", "", "0.01"),
                      _row(1, "pointer", "Duration", "usecond", "874.18"),
                      _row(1, "pointer", wait, "", "0.70"),
                      _row(2, "helper", "Duration", "nsecond", "900"),
                      _row(2, "helper", barrier + ".ratio", "", "9.0")])
    table = ncu_attention.stall_table(ncu_attention.parse_details_csv(text)).splitlines()
    assert table[0] == "| kernel (stall cycles per issued instruction) | barrier | wait |"  # drain < 0.05: no column
    assert table[2] == "| `gluon` | 1.92 | 0.61 |" and table[3] == "| `pointer` |  | 0.70 |" and len(table) == 4
    assert ncu_attention.stall_table([]) == ""


def test_no_csv_is_no_kernels():
    assert ncu_attention.parse_details_csv("==ERROR== the profiler failed") == []


def test_backend_names_map_to_build_fn_backends_and_switches():
    """Profiled backend names: build_fn's own, and kernel variants chosen by their per-call switch."""
    v = ncu_attention.variant_of
    assert v("sdpa-cudnn") == ("sdpa-cudnn", None) and v("triton") == ("triton", None) and v("cuda") == ("cuda", None)
    assert v("cuda-2stage") == ("cuda", ("JEDI_CUDA_FWD_STAGES", "2"))
    assert v("cuda-bwdsplit") == ("cuda", ("JEDI_CUDA_BWD_SPLIT", "1"))
    assert v("cuda-wgmma3") == ("cuda", ("JEDI_CUDA_FWD_WGMMA", "3"))
    assert v("triton-gluon5") == ("triton", ("JEDI_TRITON_FWD_GLUON", "5"))
    assert v("triton-gluonbwd1") == ("triton", ("JEDI_TRITON_BWD_GLUON", "1"))
    for bad in ("flash", "triton-gluon", "triton-gluonbwd", "cuda-wgmmaX", "cudnn"):
        with pytest.raises(ValueError, match="unknown backend"):
            v(bad)
    assert all(v(n) for n in ncu_attention.DEFAULT_BACKENDS.split(","))  # the default list parses


def test_gluon_configs_the_probe_rejected_are_not_profiled(monkeypatch):
    """A Gluon config is profiled only on a 9.0 device and where the probe passed it (gpu_check.sh's JEDI_SWEEP_GLUON
    and JEDI_GLUON_CONFIGS); the CUDA variants need the extension."""
    import torch
    from jedi_kernels.ops import set_attention_gluon as sg

    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")

    class JK:
        @staticmethod
        def available_backends():
            return {"cuda_attention": False}

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    gluon5 = ("triton", ("JEDI_TRITON_FWD_GLUON", "5"))
    monkeypatch.delenv("JEDI_SWEEP_GLUON", raising=False)
    monkeypatch.delenv("JEDI_GLUON_CONFIGS", raising=False)
    assert ncu_attention.unavailable("triton-gluon5", *gluon5, JK) is None
    monkeypatch.setenv("JEDI_GLUON_CONFIGS", "1,4")
    assert "did not pass" in ncu_attention.unavailable("triton-gluon5", *gluon5, JK)
    monkeypatch.delenv("JEDI_GLUON_CONFIGS")
    monkeypatch.setenv("JEDI_SWEEP_GLUON", "0")
    assert "did not pass" in ncu_attention.unavailable("triton-gluon5", *gluon5, JK)
    assert "not built" in ncu_attention.unavailable("cuda-wgmma3", "cuda", ("JEDI_CUDA_FWD_WGMMA", "3"), JK)
    # the Gluon backward: its own probe's switches
    bwd1 = ("triton", ("JEDI_TRITON_BWD_GLUON", "1"))
    monkeypatch.delenv("JEDI_SWEEP_GLUON_BWD", raising=False)
    monkeypatch.delenv("JEDI_GLUON_BWD_CONFIGS", raising=False)
    assert ncu_attention.unavailable("triton-gluonbwd1", *bwd1, JK) is None
    monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", "2")
    assert "did not pass" in ncu_attention.unavailable("triton-gluonbwd1", *bwd1, JK)
    monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", "0")
    assert "did not pass" in ncu_attention.unavailable("triton-gluonbwd1", *bwd1, JK)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.delenv("JEDI_SWEEP_GLUON")
    assert "9.0 only" in ncu_attention.unavailable("triton-gluon1", "triton", ("JEDI_TRITON_FWD_GLUON", "1"), JK)
    assert "9.0 only" in ncu_attention.unavailable("triton-gluonbwd1", *bwd1, JK)
