"""backend="auto" is data: the packaged dispatch table loads, a bad one is ignored loudly, lookups honour it, and the
table generator (benchmarks/make_dispatch_table.py) only grants a class to a kernel that won every measured row; the
sweep's kernel-variant rows (benchmarks/attention_sweep.py) time every value of a variant switch."""
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from jedi_kernels import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_sweep as sw  # noqa: E402
import make_dispatch_table as mdt  # noqa: E402


def test_packaged_table_is_valid():
    doc = json.loads(dispatch.TABLE_PATH.read_text())
    assert isinstance(doc["set_attention"], list)
    assert dispatch.load_table() == dispatch.SET_ATTENTION_TABLE


def test_load_table_parses_entries(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"set_attention": [
        {"device": "sm90", "dtype": "bfloat16", "head_dim": 40, "masked": False, "backend": "triton", "rows": 5}]}))
    assert dispatch.load_table(p) == {("sm90", torch.bfloat16, 40, False): "triton"}
    assert dispatch.load_table(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("doc", ['{"set_attention": [{"device": "sm90"}]}', "not json",
                                 '{"set_attention": [{"device": "sm90", "dtype": "bfloat16", "head_dim": 40, '
                                 '"masked": false, "backend": "flash"}]}'])
def test_bad_table_warns_and_falls_back_to_sdpa(tmp_path, doc):
    p = tmp_path / "t.json"
    p.write_text(doc)
    with pytest.warns(UserWarning, match="ignoring the dispatch table"):
        assert dispatch.load_table(p) == {}


def test_auto_follows_the_table(monkeypatch):
    q = torch.empty(4, 16, 2 * 40, device="meta", dtype=torch.bfloat16)
    monkeypatch.setattr(dispatch, "device_kind", lambda device: "sm90")
    monkeypatch.setattr(dispatch, "triton_ok", lambda device: True)
    monkeypatch.setattr(dispatch, "SET_ATTENTION_TABLE", {("sm90", torch.bfloat16, 40, False): "triton"})
    assert dispatch.choose_set_attention_backend(q, 2, masked=False) == "triton"
    assert dispatch.choose_set_attention_backend(q, 2, masked=True) == "torch"  # masked class not measured
    assert dispatch.choose_set_attention_backend(q.to(torch.float16), 2, masked=False) == "torch"
    monkeypatch.setattr(dispatch, "triton_ok", lambda device: False)
    assert dispatch.choose_set_attention_backend(q, 2, masked=False) == "torch"  # listed but cannot run here


def _row(D, ratio_triton, ratio_cuda=None, dtype="bfloat16", mode="fwd", ng=2, mask="none", diff=1e-3):
    row = {"L": 4096, "D": D, "ng": ng, "dtype": dtype, "mode": mode, "mask": mask, "capability": "sm90",
           "best_sdpa": "sdpa-cudnn", "ms": {"sdpa-cudnn": 1.0}, "errors": {},
           "ratio_triton": ratio_triton, "max_abs_diff_vs_sdpa": {"triton": diff}}
    if ratio_cuda is not None:
        row["ratio_cuda"] = ratio_cuda
        row["max_abs_diff_vs_sdpa"]["cuda"] = diff
    return row


def test_generator_needs_a_win_on_every_row():
    rows = [_row(40, 1.3, 1.1), _row(40, 1.25, 1.2, mode="fwd+bwd"), _row(40, 1.4, 1.05, ng=4),
            _row(80, 1.5), _row(80, 0.98, mode="fwd+bwd"),            # one loss: D=80 stays SDPA
            _row(160, 1.2, diff=0.5),                                  # fast but wrong: not eligible
            _row(40, 3.0, mask="blockdiag", ng=4)]                     # masked rows are never used
    entries, notes = mdt.derive(rows, margin=1.03, sources=["x.json"])
    assert [(e["head_dim"], e["backend"], e["masked"]) for e in entries] == [(40, "triton", False)]
    assert entries[0]["worst_speedup"] == 1.25 and entries[0]["rows"] == 3 and entries[0]["sources"] == ["x.json"]
    assert any("D=80 triton: worst row x0.98" in n for n in notes)
    assert any("D=160 triton: output differs" in n for n in notes)


def test_generator_picks_the_faster_of_our_backends_and_writes(tmp_path, monkeypatch):
    rows = [_row(40, 1.2, 1.5), _row(40, 1.1, 1.4, mode="fwd+bwd")]
    entries, _ = mdt.derive(rows)
    assert entries[0]["backend"] == "cuda"
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(rows))
    table = tmp_path / "dispatch_table.json"
    table.write_text(json.dumps({"comment": "c", "set_attention": []}))
    monkeypatch.setattr(mdt, "TABLE", table)
    assert mdt.main([str(sweep), "--write"]) == 0
    assert dispatch.load_table(table) == {("sm90", torch.bfloat16, 40, False): "cuda"}


def test_variant_advice_reads_the_cuda_key_split_rows():
    """The sweep's key-split rows: no split (the default since the H200's third run) against the automatic count,
    either way round."""
    rows = [{"kind": "cuda_fwd_splits", "L": 1024, "D": 80, "ng": 1, "dtype": "bfloat16", "ms_auto": 0.028,
             "ms_off": 0.039, "ms_s2": 0.028, "ms_s4": 0.030},
            {"kind": "cuda_fwd_splits", "L": 256, "D": 160, "ng": 2, "dtype": "bfloat16", "ms_auto": 0.040,
             "ms_off": 0.032}]
    advice = mdt.variant_advice(rows)
    assert len(advice) == 2 and advice[1].endswith("keep") and "off 0.032 ms vs auto 0.040 ms" in advice[1]
    assert "auto x1.39 faster than the default off" in advice[0] and "fwd_splits_from_env" in advice[0]
    assert "JEDI_CUDA_FWD_SPLITS" in advice[0]


def test_variant_advice_knows_the_rows_per_warp_default_by_shape():
    """The CUDA forward's rows per warp: 32 up to head dim 80; at head dim 160, 32 for sets of more than 1024 keys
    (fwd_shape_row_blocks), 16 below. The advice compares each row with the default of its own shape."""
    def row(L, D, ng, ms16, ms32):
        return {"kind": "cuda_fwd_rows_per_warp", "L": L, "D": D, "ng": ng, "dtype": "bfloat16",
                "ms_16rows": ms16, "ms_32rows": ms32}

    advice = mdt.variant_advice([row(1024, 80, 2, 0.114, 0.085), row(256, 160, 8, 0.198, 0.144),
                                 row(256, 160, 4, 0.060, 0.060), row(64, 160, 2, 0.017, 0.019),
                                 row(256, 160, 4, 0.060, 0.050)])
    assert advice[0].endswith("keep") and "default 32rows 0.085" in advice[0]
    assert advice[1].endswith("keep") and "default 32rows 0.144" in advice[1]      # 2048 keys
    assert advice[2].endswith("keep") and "default 16rows 0.060" in advice[2]      # 1024 keys: not more
    assert advice[3].endswith("keep") and "default 16rows 0.017" in advice[3]
    assert "32rows x1.20 faster than the default 16rows" in advice[4] and "fwd_shape_row_blocks" in advice[4]


def test_variant_advice_compares_the_hopper_forward_with_its_default_per_head_dim():
    """The CUDA Hopper-forward rows: at head dim 40 the default is variant 1 (64 keys x 2 warpgroups), elsewhere the
    mma.sync kernel; the row's fastest variant is compared with that."""
    rows = [{"kind": "cuda_fwd_wgmma", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_mmasync": 0.83,
             "ms_wg64x2": 0.73, "ms_wg128x1": 0.60, "best_wgmma": "wg128x1"},
            {"kind": "cuda_fwd_wgmma", "L": 4096, "D": 40, "ng": 1, "dtype": "bfloat16", "ms_mmasync": 0.22,
             "ms_wg64x2": 0.195, "ms_wg128x1": 0.20, "best_wgmma": "wg64x2"},
            {"kind": "cuda_fwd_wgmma", "L": 256, "D": 160, "ng": 8, "dtype": "bfloat16", "ms_mmasync": 0.198,
             "ms_wg64x2": 0.150, "best_wgmma": "wg64x2"}]
    advice = mdt.variant_advice(rows)
    assert "wg128x1 x1.22 faster than the default wg64x2" in advice[0] and "kDefaultWgmmaVariant" in advice[0]
    assert advice[1].endswith("keep") and "default wg64x2 0.195 ms" in advice[1]
    assert "wg64x2 x1.32 faster than the default mmasync" in advice[2]


def test_variant_advice_flags_a_faster_non_default():
    rows = [{"kind": "cuda_fwd_rows_per_warp", "L": 4096, "D": 40, "dtype": "bfloat16", "ms_16rows": 0.50,
             "ms_32rows": 0.40},
            {"kind": "cuda_fwd_rows_per_warp", "L": 1024, "D": 80, "dtype": "bfloat16", "ms_16rows": 0.20,
             "ms_32rows": 0.25},
            {"kind": "rowsum_dot_vs_fadd", "L": 4096, "D": 40, "ms_dot": 0.301, "ms_fadd": 0.300},
            {"kind": "head_dim_chunking", "ms_chunked": 1.0, "ms_padded": 2.0},  # not a variant row
            {"kind": "cuda_bwd_keys_per_warp", "L": 4096, "D": 40, "ng": 1, "dtype": "bfloat16", "ms_16keys": 1.00,
             "ms_32keys": 1.10},
            {"kind": "cuda_bwd_keys_per_warp", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_16keys": 2.00,
             "ms_32keys": 1.60},
            {"kind": "triton_bwd_dq_atomic_vs_kernel", "L": 1024, "D": 80, "ng": 2, "dtype": "bfloat16",
             "ms_atomic": 0.40, "ms_kernel": 0.50},
            {"kind": "triton_fwd_ws", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_pointer": 0.72,
             "ms_ws": 0.60},
            {"kind": "head_dim_chunking_bwd", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_chunked": 2.0,
             "ms_padded": 1.8},
            {"kind": "triton_fwd_gluon", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_pointer": 0.66,
             "ms_gl128x128": 0.44},
            {"kind": "triton_fwd_gluon", "L": 4096, "D": 40, "ng": 1, "dtype": "bfloat16", "ms_pointer": 0.20,
             "ms_gl128x128": 0.25, "ms_gl64x128": 0.16, "best_gluon": "gl64x128"},
            {"kind": "fast_launch", "L": 1024, "D": 80, "ng": 2, "dtype": "bfloat16", "ms_triton_launch": 0.30,
             "ms_fast_launch": 0.40},
            # only the configs the probe found agreeing (JEDI_GLUON_CONFIGS=4): no ms_gl128x128 in the row
            {"kind": "triton_fwd_gluon", "L": 4096, "D": 40, "ng": 4, "dtype": "bfloat16", "ms_pointer": 2.6,
             "ms_gl128x128pad": 2.0, "best_gluon": "gl128x128pad"},
            {"kind": "triton_fwd_gluon", "L": 4096, "D": 40, "ng": 8, "dtype": "bfloat16", "ms_pointer": 2.6},
            {"kind": "triton_bwd_gluon", "L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "ms_split": 1.5,
             "ms_glbwd1": 1.1, "ms_glbwd2": 1.0, "best_gluonbwd": "glbwd2"}]
    advice = mdt.variant_advice(rows)
    assert len(advice) == 13  # the Gluon forward's ng=8 row has no Gluon timing at all: no line
    assert "glbwd2 x1.50 faster than the default split" in advice[12] and "JEDI_TRITON_BWD_GLUON" in advice[12]
    assert "ng=4" in advice[11] and "gl128x128pad x1.30 faster than the default pointer" in advice[11]
    assert "triton_launch x1.33 faster than the default fast_launch" in advice[10]
    assert "JEDI_FAST_LAUNCH" in advice[10]
    assert "gl128x128 x1.50 faster than the default pointer" in advice[8] and "JEDI_TRITON_FWD_GLUON" in advice[8]
    assert "gl64x128 x1.25 faster than the default pointer" in advice[9]  # the row's fastest config, not config 1
    assert "padded x1.11 faster than the default chunked" in advice[7] and "set_attn_bwd" in advice[7]
    assert "ws x1.20 faster than the default pointer" in advice[6] and "JEDI_TRITON_FWD_WS" in advice[6]
    assert "D=40" in advice[0] and advice[0].endswith("keep")
    assert "16rows x1.25 faster than the default 32rows" in advice[1] and "set_attention_plan.h" in advice[1]
    assert advice[2].endswith("keep")  # within the margin
    assert "ng=1" in advice[3] and "16keys x1.10 faster than the default 32keys" in advice[3]
    assert "bwd_default_key_blocks" in advice[3] and "JEDI_CUDA_BWD_KEY_BLOCKS" in advice[3]
    assert "ng=2" in advice[4] and advice[4].endswith("keep")
    assert "atomic x1.25 faster than the default kernel" in advice[5] and "JEDI_TRITON_BWD_DQ" in advice[5]


def test_autotune_advice_names_a_faster_non_default_config():
    tuned = [{"kernel": "fwd", "class": "d64", "key": ["40", "64", "4096", "2"], "best": "128x64 w8 s3",
              "default": "128x64 w4 s3", "ms": {"128x64 w4 s3": 0.72, "128x64 w8 s3": 0.60, "64x64 w4 s3": 0.80}},
             {"kernel": "dq", "class": "d64", "key": [], "best": "128x64 w8 s2", "default": "128x64 w8 s2",
              "ms": {"128x64 w8 s2": 0.50, "64x64 w4 s3": 0.51}},
             {"kernel": "dkdv", "class": "d64", "key": [], "best": "64x64 w4 s3", "default": "64x128 w8 s2",
              "ms": {}}]  # a tuning answered by Triton's disk cache: no timings
    rows = [{"L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "mode": "fwd", "triton_autotune": tuned[:1]},
            {"L": 4096, "D": 40, "ng": 2, "dtype": "bfloat16", "mode": "fwd+bwd", "triton_autotune": tuned[1:]},
            {"L": 64, "D": 160, "ng": 1, "dtype": "bfloat16", "mode": "fwd"}]  # nothing tuned: no line
    advice = mdt.autotune_advice(rows)
    assert len(advice) == 3
    assert advice[0].startswith("fwd d64 L=4096 D=40 ng=2 bfloat16 fwd: the default is x1.20 slower")
    assert "128x64 w8 s3 first in _FWD_CONFIGS['d64']" in advice[0]
    assert "ms: 128x64 w8 s3 0.600, 128x64 w4 s3 0.720, 64x64 w4 s3 0.800" in advice[0]
    assert "dq d64" in advice[1] and "default kept" in advice[1]
    assert advice[2].endswith("best 64x64 w4 s3 (no timings recorded)")


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter's
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_sweep_variant_row_times_each_switch_value(monkeypatch, mode):
    """The sweep's variant rows (input to variant_advice) time each value of the switch with the switch set, since
    the kernels read it per call: the forward, or the backward op alone. Here on the Triton backend (interpreted
    without a GPU) with a stand-in timer that runs the callable once."""
    seen = []

    def fake_time_ms(fn, rep_ms=60):
        seen.append((os.environ.get("JEDI_TEST_SWITCH"), fn()))
        return float(len(seen))

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "time_ms", fake_time_ms)
    monkeypatch.delenv("JEDI_TEST_SWITCH", raising=False)
    row = sw._variant_row(16, 8, 1, torch.float32, 1, "triton", "JEDI_TEST_SWITCH", {"a": "1", "b": "2"}, "k",
                          mode=mode)
    assert row["mode"] == mode and row["kind"] == "k" and (row["ms_a"], row["ms_b"]) == (1.0, 2.0)
    assert [value for value, _ in seen] == ["1", "2"] and "JEDI_TEST_SWITCH" not in os.environ
    shape = (sw.SETS, 16, sw.HEADS * 8)
    for _, result in seen:
        outs = result if mode == "bwd" else (result,)  # (dq, dk, dv) or out
        assert len(outs) == (3 if mode == "bwd" else 1) and all(t.shape == shape for t in outs)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter's
def test_fast_launch_row_times_both_launch_paths(monkeypatch):
    """The sweep's fast_launch row times the eager forward + backward once with every launch through Triton's path
    and once through the cached direct launches, and leaves the switch as it found it (stand-in timer: one run)."""
    from jedi_kernels.ops import fast_launch

    seen = []

    def fake_time_ms(fn, rep_ms=60):
        seen.append((fast_launch.enabled(), fn().shape))
        return float(len(seen))

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "time_ms", fake_time_ms)
    before = fast_launch.enabled()
    row = sw.fast_launch_row(16, 8, ng=2, dtype=torch.float32, rep_ms=1)
    assert fast_launch.enabled() == before
    assert [on for on, _ in seen] == [False, True] and row["kind"] == "fast_launch" and row["mode"] == "fwd+bwd"
    assert (row["ms_triton_launch"], row["ms_fast_launch"], row["speedup_fast_vs_triton_launch"]) == (1.0, 2.0, 0.5)
    assert all(shape == (2 * sw.SETS, 16, sw.HEADS * 8) for _, shape in seen)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter's
def test_bwd_chunking_row_times_both_layouts(monkeypatch):
    """The backward chunking row times the backward alone, chunked and padded, on the same forward's out and lse:
    here with a stand-in timer that runs each callable once and checks the two layouts' gradients agree."""
    results = []

    def fake_time_ms(fn, rep_ms=60):
        results.append(fn())
        return float(len(results))

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "time_ms", fake_time_ms)
    row = sw.bwd_chunking_row(16, 24, ng=2, dtype=torch.float32, rep_ms=1)
    assert row["kind"] == "head_dim_chunking_bwd" and row["mode"] == "bwd"
    assert (row["ms_chunked"], row["ms_padded"], row["speedup_chunked_vs_padded"]) == (1.0, 2.0, 2.0)
    assert row["chunks"] == (16, 16) and row["padded_to"] == 32
    for a, b in zip(*results):  # dq, dk, dv of both layouts
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter's
def test_measure_row_ratios_and_output_check(monkeypatch):
    """A dispatch row: ms per backend that ran, a failing backend recorded with its error, the best SDPA backend, our
    ratio to it and our output's max |diff| from its output (stand-in timer; SDPA's math backend and the Triton
    kernel compute for real: interpreted on the CPU)."""
    times = {"sdpa-math": 2.0, "triton": 0.5}
    current = [None]
    build = sw.build_fn

    def spy_build(name, *a, **kw):
        current[0] = name
        return build(name, *a, **kw)

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "time_ms", lambda fn, rep_ms=60: times[current[0]])
    monkeypatch.setattr(sw, "build_fn", spy_build)
    monkeypatch.setattr(sw, "available_ours", lambda: ["triton"])
    monkeypatch.setattr(sw, "SDPA_BACKENDS", ("math", "nonexistent"))  # the second fails in build_fn: KeyError
    row = sw.measure_row(16, 8, 2, torch.float32, "fwd", rep_ms=1)
    assert row["ms"] == times and list(row["errors"]) == ["sdpa-nonexistent"]
    assert row["best_sdpa"] == "sdpa-math" and row["ratio_triton"] == pytest.approx(4.0)
    assert row["max_abs_diff_vs_sdpa"]["triton"] < 1e-4  # the same attention in fp32


def test_graph_row_times_every_backend_from_a_graph_and_records_failures(monkeypatch):
    """The CUDA-graph row times each backend through graph_time_ms (never the eager timer), after one eager call
    (build_fn's); a backend that fails to build or capture lands in ``errors`` and the others still run; the ratio is
    the best SDPA backend's graphed time over ours. Stand-ins for build_fn and the timers."""
    built, timed = [], []
    graph_ms = {"sdpa-cudnn": 0.30, "sdpa-flash": 0.40, "triton": 0.25, "cuda": 0.50}

    def fake_build_fn(name, q, k, v, ng, H, mode, qkv=None, do=None, **kw):
        built.append((name, mode, tuple(q.shape), do is not None, qkv.requires_grad))
        if name == "sdpa-efficient":
            raise RuntimeError("stream capture unsupported\nsecond line")
        return (lambda: name), None

    def fake_graph_time_ms(fn, rep_ms=60, stream=None):
        timed.append(fn())
        return graph_ms[timed[-1]]

    def eager_timer(fn, rep_ms=60):
        raise AssertionError("the graph row must not use the eager timer")

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "build_fn", fake_build_fn)
    monkeypatch.setattr(sw, "graph_time_ms", fake_graph_time_ms)
    monkeypatch.setattr(sw, "time_ms", eager_timer)
    monkeypatch.setattr(sw.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(sw, "available_ours", lambda: ["triton", "cuda"])
    row = sw.graph_row(16, 8, ng=2, dtype=torch.float32, mode="fwd+bwd", rep_ms=1)
    assert [b[0] for b in built] == ["sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "triton", "cuda"]  # no math
    assert all(b[1:] == ("fwd+bwd", (2 * sw.SETS, 16, sw.HEADS * 8), True, True) for b in built)
    assert timed == ["sdpa-cudnn", "sdpa-flash", "triton", "cuda"]
    assert row["kind"] == "cuda_graph" and row["ms_graph"] == graph_ms
    assert row["errors"] == {"sdpa-efficient": "RuntimeError: stream capture unsupported"}
    assert row["best_sdpa_graph"] == "sdpa-cudnn"
    assert row["ratio_graph_triton"] == pytest.approx(0.30 / 0.25) and row["ratio_graph_cuda"] == pytest.approx(0.6)
    assert "ms" not in row and "best_sdpa" not in row  # never read as a dispatch row (derive skips it)
    assert mdt.derive([dict(row, capability="sm90")])[0] == []
    assert mdt.graph_notes([row, {"kind": "fake"}]) == [
        "L=16 D=8 ng=2 float32 fwd+bwd: ms triton 0.250, sdpa-cudnn 0.300, sdpa-flash 0.400, cuda 0.500; "
        "vs sdpa-cudnn: cuda x0.60, triton x1.20; errors: ['sdpa-efficient']"]
    fwd = sw.graph_row(16, 8, ng=2, dtype=torch.float32, mode="fwd", rep_ms=1)
    assert fwd["mode"] == "fwd" and built[-1][3:] == (False, False)


def test_graph_row_makes_inputs_first_calls_and_capture_on_one_side_stream(monkeypatch):
    """A forward + backward captures only if every leaf was first used on the capture stream (the autograd engine
    makes the caller's stream wait on each leaf's stream at the end of a backward; on the H200 a leaf first used on
    the default stream failed every capture). So the inputs, each backend's first call and graph_time_ms all run with
    the row's side stream current, and graph_time_ms captures on that stream. Stand-in streams: the CPU has none."""
    current = ["default"]
    seen = []

    class FakeStream:
        def wait_stream(self, other):
            seen.append(("wait", other))

    side = FakeStream()

    @contextlib.contextmanager
    def fake_stream_ctx(stream):
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    real_make_inputs = sw.make_inputs

    def spy_make_inputs(*a, **kw):
        seen.append(("inputs", current[0]))
        return real_make_inputs(*a, **kw)

    def fake_build_fn(name, q, k, v, ng, H, mode, qkv=None, do=None, **kw):
        seen.append(("first call", name, current[0]))
        return (lambda: name), None

    def fake_graph_time_ms(fn, rep_ms=60, stream=None):
        seen.append(("graph", fn(), current[0], stream))
        return 1.0

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "_capture_stream", lambda: side)
    monkeypatch.setattr(sw.torch.cuda, "stream", fake_stream_ctx)
    monkeypatch.setattr(sw.torch.cuda, "default_stream", lambda *a: "default")
    monkeypatch.setattr(sw.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(sw, "make_inputs", spy_make_inputs)
    monkeypatch.setattr(sw, "build_fn", fake_build_fn)
    monkeypatch.setattr(sw, "graph_time_ms", fake_graph_time_ms)
    row = sw.graph_row(16, 8, ng=2, dtype=torch.float32, mode="fwd+bwd", rep_ms=1, backends=["sdpa-cudnn", "triton"])
    assert row["ms_graph"] == {"sdpa-cudnn": 1.0, "triton": 1.0}
    assert seen == [("wait", "default"), ("inputs", side),
                    ("first call", "sdpa-cudnn", side), ("graph", "sdpa-cudnn", side, side),
                    ("first call", "triton", side), ("graph", "triton", side, side)]
    assert current == ["default"]


def test_graph_rows_isolated_goes_on_after_failed_and_crashed_children(monkeypatch):
    """The graph rows' captures run in child processes that stop at their first failure: a failed capture costs its
    own backend an error entry (the child stops, the next child resumes after it), a child that dies inside an item
    without writing it costs that item an error with the exit status, and the rows come out as graph_row's (stand-in
    children: the real ones need a GPU)."""
    monkeypatch.setattr(sw, "graph_backends", lambda: ["sdpa-cudnn", "triton", "cuda"])
    monkeypatch.setattr(sw, "available_ours", lambda: ["triton", "cuda"])
    calls = []
    ms = {"sdpa-cudnn": 0.30, "triton": 0.25, "cuda": 0.50, "cuda-splits": 0.20, "cuda-bwdsplit": 0.40}

    def child(items, rep_ms, timeout_s):
        calls.append([tuple(i) for i in items])
        if len(calls) == 1:  # item 0 timed; item 1 (triton, first spec) fails its capture: exit 3 after writing it
            return [{"ms": ms[items[0][3]]}, {"error": "AcceleratorError: capture failed"}], 3, ""
        if len(calls) == 2:  # item 2 timed, then the process dies inside item 3 (second spec's cudnn)
            return [{"ms": ms[items[0][3]]}], -11, "Fatal Python error: Segmentation fault"
        return [{"ms": ms[i[3]]} for i in items], 0, ""

    rows = sw.graph_rows_isolated([(1024, 80, "fwd+bwd"), (64, 160, "fwd")], rep_ms=7, timeout_s=60, run_child=child)
    assert [c[0] for c in calls] == [(1024, 80, "fwd+bwd", "sdpa-cudnn", 2), (1024, 80, "fwd+bwd", "cuda", 2),
                                     (64, 160, "fwd", "triton", 2)]
    assert len(calls[0]) == 8 and len(calls[2]) == 4  # (then the forward spec's "cuda-splits" item, and the
    assert calls[0][-2:] == [(64, 160, "fwd", "cuda-splits", 2),  # forward + backward spec's "cuda-bwdsplit")
                             (1024, 80, "fwd+bwd", "cuda-bwdsplit", 2)]
    first, second = rows
    assert (first["L"], first["D"], first["mode"], first["kind"], first["ng"]) == (1024, 80, "fwd+bwd", "cuda_graph", 2)
    assert first["ms_graph"] == {"sdpa-cudnn": 0.30, "cuda": 0.50, "cuda-bwdsplit": 0.40}
    assert first["errors"] == {"triton": "AcceleratorError: capture failed"}
    assert first["ratio_graph_cuda"] == pytest.approx(0.6) and "ratio_graph_triton" not in first
    assert second["ms_graph"] == {"triton": 0.25, "cuda": 0.50, "cuda-splits": 0.20} and "best_sdpa_graph" not in second
    assert "cuda-splits" not in first["ms_graph"] and "cuda-splits" not in first["errors"]  # fwd+bwd: not split
    assert "cuda-bwdsplit" not in second["ms_graph"]  # a forward spec: no backward to split
    assert second["errors"]["sdpa-cudnn"].startswith("child process exited -11 during this item: Fatal Python error")
    assert second["tflops_graph"]["triton"] == pytest.approx(sw.flops(2, sw.HEADS, 2, 64, 160, "fwd") / 0.25 * 1e-9)
    # no time left: every item is an error entry, no child runs
    calls.clear()
    rows = sw.graph_rows_isolated([(64, 160, "fwd")], timeout_s=0, run_child=child)
    assert calls == [] and rows[0]["ms_graph"] == {} and len(rows[0]["errors"]) == 4
    # children that fail before their first item (an import error, no GPU): two tries, then the rest is skipped
    calls.clear()
    rows = sw.graph_rows_isolated([(64, 160, "fwd"), (1024, 80, "fwd+bwd")], timeout_s=60,
                                  run_child=lambda items, rep_ms, t: (calls.append(len(items)) or [], 1, "ImportError"))
    assert calls == [8, 7]
    errors = [e for r in rows for e in r["errors"].values()]
    assert len(errors) == 8 and errors[:2] == ["child process exited 1 during this item: ImportError"] * 2
    assert all(e.startswith("skipped: two child processes in a row wrote nothing") for e in errors[2:])
    # a spec may name its set size (ng 2 when it does not): the items carry it, and so do the rows
    calls.clear()
    rows = sw.graph_rows_isolated([(1024, 80, "fwd", 1), (1024, 80, "fwd")], timeout_s=60, run_child=child)
    assert [i[4] for i in calls[0]] == [1, 1, 1, 2, 2, 2, 1, 2] and [r["ng"] for r in rows] == [1, 2]
    assert rows[0]["tflops_graph"]["sdpa-cudnn"] == pytest.approx(sw.flops(2, sw.HEADS, 1, 1024, 80, "fwd") / 0.30 * 1e-9)


def test_build_fn_cuda_splits_runs_the_cuda_backend_with_the_automatic_split_count(monkeypatch):
    """"cuda-splits" is the CUDA backend with JEDI_CUDA_FWD_SPLITS=0 set around each call (so a CUDA-graph capture
    records the split kernels), the variable restored after it (stand-in for the op)."""
    import jedi_kernels as jk

    seen = []

    def fake_set_attention(q, k, v, ng, H, set_mask=None, backend="auto"):
        seen.append((backend, os.environ.get("JEDI_CUDA_FWD_SPLITS")))
        return q.clone()

    monkeypatch.setattr(jk, "set_attention", fake_set_attention)
    monkeypatch.delenv("JEDI_CUDA_FWD_SPLITS", raising=False)
    q = torch.randn(2, 8, 16)
    fn, out = sw.build_fn("cuda-splits", q, q, q, 2, 2, "fwd")
    fn()
    assert seen == [("cuda", "0"), ("cuda", "0")] and "JEDI_CUDA_FWD_SPLITS" not in os.environ
    assert torch.equal(out, q)


def test_build_fn_cuda_bwdsplit_sets_the_switch_around_forward_and_backward(monkeypatch):
    """"cuda-bwdsplit" is the CUDA backend's forward + backward with JEDI_CUDA_BWD_SPLIT=1 set around each call (the
    backward reads it; a CUDA-graph capture records the split kernels), the variable restored after it (stand-in
    for the op, which autograd differentiates as the identity here)."""
    import jedi_kernels as jk

    seen = []

    def fake_set_attention(q, k, v, ng, H, set_mask=None, backend="auto"):
        seen.append((backend, os.environ.get("JEDI_CUDA_BWD_SPLIT")))
        return q * 1.0

    monkeypatch.setattr(jk, "set_attention", fake_set_attention)
    monkeypatch.delenv("JEDI_CUDA_BWD_SPLIT", raising=False)
    qkv = torch.randn(2, 8, 16, requires_grad=True)
    fn, out = sw.build_fn("cuda-bwdsplit", qkv, qkv, qkv, 2, 2, "fwd+bwd", qkv=qkv, do=torch.ones(2, 8, 16))
    fn()
    # (build_fn runs once for the inner "cuda" function without the switch, then each call of the split one)
    assert seen[-2:] == [("cuda", "1"), ("cuda", "1")] and "JEDI_CUDA_BWD_SPLIT" not in os.environ
    assert torch.equal(out, qkv)


def test_graph_items_child_writes_each_result_and_stops_at_the_first_failure(monkeypatch, tmp_path):
    """The child side (``--graph-items``): one graph_row per item, results written after each, exit 3 at the first
    failure; and the parent's runner on a real child process that cannot run (no GPU here: exit 2, no results)."""
    seen = []

    def fake_graph_row(L, D, mode, rep_ms, backends, stop_on_error, ng=2):
        seen.append((L, D, ng, mode, backends[0], rep_ms, stop_on_error))
        if backends[0] == "triton":
            return {"ms_graph": {}, "errors": {"triton": "RuntimeError: no"}}
        return {"ms_graph": {backends[0]: 1.5}, "errors": {}}

    monkeypatch.setattr(sw, "graph_row", fake_graph_row)
    out = tmp_path / "items.json"
    items = [[64, 160, "fwd", "cuda", 1], [64, 160, "fwd", "triton"], [64, 160, "fwd", "sdpa-flash"]]
    assert sw.graph_items_main(items, 9, str(out)) == 3
    assert seen == [(64, 160, 1, "fwd", "cuda", 9, True), (64, 160, 2, "fwd", "triton", 9, True)]
    assert json.loads(out.read_text()) == [{"ms": 1.5}, {"error": "RuntimeError: no"}]
    if not torch.cuda.is_available():
        results, rc, tail = sw._run_graph_child(items, 9, timeout_s=300)
        assert (results, rc) == ([], 2) and "needs a CUDA GPU" in tail


def test_gluon_row_times_only_the_checked_configs(monkeypatch):
    """With JEDI_GLUON_CONFIGS (gpu_check.sh: the configs the probe found agreeing), the sweep's Gluon row times the
    pointer kernel and those configs only, checks that the first of them ran, and leaves the split-vs-padded ratio out
    when one side is missing (stand-ins for the timers, inputs and kernels)."""
    from jedi_kernels.ops import set_attention as sa

    timed, ran = [], []

    def fake_variant_row(L, D, ng, dtype, rep_ms, backend, env, variants, kind, mode="fwd"):
        timed.append(dict(variants))
        return {"L": L, "D": D, "ng": ng, "kind": kind, **{f"ms_{k}": 1.0 + int(v) for k, v in variants.items()}}

    def fake_build_fn(name, *a, **kw):
        if name == "triton":
            sa.set_attn_fwd_gluon(os.environ.get("JEDI_TRITON_FWD_GLUON"))
        return (lambda: None), torch.zeros(3)

    if not torch.cuda.is_available():
        monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "_variant_row", fake_variant_row)
    monkeypatch.setattr(sw, "build_fn", fake_build_fn)
    monkeypatch.setattr(sw, "time_ms", lambda fn, rep_ms=60: 9.0)
    monkeypatch.setattr(sw.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(sa, "set_attn_fwd_gluon", lambda *a: ran.append(a))
    monkeypatch.setenv("JEDI_GLUON_CONFIGS", "4")
    row = sw.triton_gluon_fwd_row(64, 40, ng=2, rep_ms=1)
    assert timed == [{"pointer": "0", "gl128x128pad": "4"}]
    assert ran == [("4",)] and row["gluon_ran"] and "JEDI_TRITON_FWD_GLUON" not in os.environ
    assert row["best_gluon"] == "gl128x128pad" and "speedup_split_vs_padded" not in row
    assert row["speedup_gluon_vs_pointer"] == 1.0 / 5.0 and row["ms_cudnn"] == 9.0
    monkeypatch.delenv("JEDI_GLUON_CONFIGS")
    row = sw.triton_gluon_fwd_row(64, 40, ng=2, rep_ms=1)
    assert list(timed[-1]) == ["pointer", "gl128x128", "gl128x64", "gl64x128", "gl128x128pad", "gl128x128ws",
                               "gl128x128pp"]
    assert ran[-1] == ("1",) and row["speedup_split_vs_padded"] == 5.0 / 2.0 and row["best_gluon"] == "gl128x128"


def test_gluon_bwd_row_times_only_the_checked_configs(monkeypatch):
    """The sweep's Gluon backward row: the split kernels and the checked configs that take the head dim (backward
    alone), then forward + backward of cuDNN, the split kernels and the fastest Gluon config, whose run is checked to
    reach the Gluon kernel; JEDI_GLUON_BWD_CONFIGS restricts the configs (stand-ins for timers, inputs, kernels)."""
    from jedi_kernels.ops import set_attention as sa

    timed, ran, fwdbwd = [], [], []

    def fake_variant_row(L, D, ng, dtype, rep_ms, backend, env, variants, kind, mode="fwd"):
        assert mode == "bwd" and env == "JEDI_TRITON_BWD_GLUON"
        timed.append(dict(variants))
        return {"L": L, "D": D, "ng": ng, "kind": kind, **{f"ms_{k}": 4.0 - int(v) for k, v in variants.items()}}

    def fake_build_fn(name, *a, **kw):
        fwdbwd.append((name, os.environ.get("JEDI_TRITON_BWD_GLUON")))
        return (lambda: None), torch.zeros(3)

    def fake_set_attention(q, k, v, ng, H, backend):
        sa.set_attn_bwd_gluon(os.environ.get("JEDI_TRITON_BWD_GLUON"))
        return q * 1.0

    monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "_variant_row", fake_variant_row)
    monkeypatch.setattr(sw, "build_fn", fake_build_fn)
    monkeypatch.setattr(sw, "time_ms", lambda fn, rep_ms=60: 9.0)
    monkeypatch.setattr(sw, "sdpa_set_attention", lambda q, k, v, ng, H, m: q * 2.0)
    monkeypatch.setattr(sw, "sdpa_backend_enum", lambda name: sw.torch.nn.attention.SDPBackend.MATH)
    monkeypatch.setattr(sw.torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(sa, "set_attn_bwd_gluon", lambda *a: ran.append(a))
    import jedi_kernels as jk

    monkeypatch.setattr(jk, "set_attention", fake_set_attention)
    monkeypatch.delenv("JEDI_GLUON_BWD_CONFIGS", raising=False)
    row = sw.triton_gluon_bwd_row(64, 40, ng=2, rep_ms=1)
    assert timed[-1] == {"split": "0", "glbwd1": "1", "glbwd2": "2"}
    assert row["best_gluonbwd"] == "glbwd2" and row["speedup_gluonbwd_vs_split"] == 4.0 / 2.0
    assert fwdbwd == [("sdpa-cudnn", None), ("triton", None), ("triton", "2")] and ran == [("2",)]
    assert row["gluonbwd_ran"] and "JEDI_TRITON_BWD_GLUON" not in os.environ
    assert row["speedup_gluonbwd_vs_cudnn"] == 1.0 and row["max_abs_diff_vs_cudnn"] > 1.0  # |dO| of randn
    row = sw.triton_gluon_bwd_row(64, 80, ng=2, rep_ms=1)  # config 2 stops at head dim 64
    assert timed[-1] == {"split": "0", "glbwd1": "1"} and ran[-1] == ("1",)
    monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", "1")
    sw.triton_gluon_bwd_row(64, 40, ng=2, rep_ms=1)
    assert timed[-1] == {"split": "0", "glbwd1": "1"}


def test_cuda_fwd_splits_row_times_each_setting_on_the_mma_sync_kernel(monkeypatch):
    """The sweep's key-split row times the CUDA forward with 0 (automatic), unset (off) and with 2 and 4 splits, all
    with the Hopper forward off (it has no splits), then FA2 on the same shape; a shape FA2 refuses leaves its entries out
    (stand-ins for the timers and kernels)."""
    seen = []

    def fake_variant_row(L, D, ng, dtype, rep_ms, backend, env, variants, kind, mode="fwd"):
        assert backend == "cuda" and env == "JEDI_CUDA_FWD_SPLITS" and mode == "fwd"
        seen.append((dict(variants), os.environ.get("JEDI_CUDA_FWD_WGMMA")))
        return {"L": L, "D": D, "ng": ng, "kind": kind, "ms_auto": 2.0, "ms_off": 3.0, "ms_s2": 2.0, "ms_s4": 2.5}

    def fake_build_fn(name, *a, **kw):
        if name != "sdpa-flash":
            raise AssertionError(name)
        return (lambda: None), None

    monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "_variant_row", fake_variant_row)
    monkeypatch.setattr(sw, "build_fn", fake_build_fn)
    monkeypatch.setattr(sw, "time_ms", lambda fn, rep_ms=60: 2.4)
    monkeypatch.delenv("JEDI_CUDA_FWD_WGMMA", raising=False)
    row = sw.cuda_fwd_splits_row(64, 80, ng=1, rep_ms=1)
    assert seen == [({"auto": "0", "off": "", "s2": "2", "s4": "4"}, "0")]
    assert "JEDI_CUDA_FWD_WGMMA" not in os.environ
    assert row["kind"] == "cuda_fwd_splits" and row["speedup_auto_vs_off"] == 1.5
    assert row["ms_fa2"] == 2.4 and row["speedup_auto_vs_fa2"] == 1.2

    def refusing_build_fn(name, *a, **kw):
        raise RuntimeError("No available kernel")

    monkeypatch.setattr(sw, "build_fn", refusing_build_fn)
    row = sw.cuda_fwd_splits_row(64, 80, ng=1, rep_ms=1)
    assert "ms_fa2" not in row and "speedup_auto_vs_fa2" not in row and row["speedup_auto_vs_off"] == 1.5


def test_cuda_wgmma_row_times_the_variants_compiled_for_the_head_dim(monkeypatch):
    """The sweep's Hopper-forward row times the mma.sync kernel and each wgmma variant compiled for the row's head dim
    (40: all five tile shapes; 80: 64 x 2, 128 x 2 and 64 x 1; 160: 64 x 2), no label that would silently time the mma.sync
    fallback, then cuDNN; it names the fastest variant (stand-ins for the timers and kernels)."""
    seen = []
    ms = {"mmasync": 5.0, "wg64x2": 4.0, "wg128x2": 4.5, "wg128x3": 4.2, "wg128x1": 3.0, "wg64x1": 3.5}

    def fake_variant_row(L, D, ng, dtype, rep_ms, backend, env, variants, kind, mode="fwd"):
        assert backend == "cuda" and env == "JEDI_CUDA_FWD_WGMMA" and kind == "cuda_fwd_wgmma"
        seen.append(dict(variants))
        return {"L": L, "D": D, "ng": ng, "kind": kind, **{f"ms_{k}": ms[k] for k in variants}}

    class Event:
        name = "set_attn_fwd_wgmma_kernel"

    class Prof:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def events(self):
            return [Event()]

    out = torch.zeros(2, 3)
    monkeypatch.setattr(sw, "_variant_row", fake_variant_row)
    monkeypatch.setattr(sw, "make_inputs", lambda *a, **k: (None, None, None, None))
    monkeypatch.setattr(sw, "build_fn", lambda name, *a, **k: ((lambda: None), out))
    monkeypatch.setattr(sw, "time_ms", lambda fn, rep_ms=60: 6.0)
    monkeypatch.setattr(torch.profiler, "profile", lambda **k: Prof())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    row = sw.cuda_wgmma_fwd_row(4096, 40, ng=2, rep_ms=1)
    assert seen[-1] == {"mmasync": "0", "wg64x2": "1", "wg128x2": "2", "wg128x3": "3", "wg128x1": "4", "wg64x1": "5"}
    assert row["best_wgmma"] == "wg128x1" and row["speedup_wgmma_vs_mmasync"] == 5.0 / 3.0
    assert row["speedup_wgmma_vs_cudnn"] == 2.0 and row["wgmma_ran"]
    sw.cuda_wgmma_fwd_row(1024, 80, ng=2, rep_ms=1)
    assert seen[-1] == {"mmasync": "0", "wg64x2": "1", "wg128x2": "2", "wg64x1": "5"}
    row = sw.cuda_wgmma_fwd_row(256, 160, ng=4, rep_ms=1)
    assert seen[-1] == {"mmasync": "0", "wg64x2": "1"} and row["best_wgmma"] == "wg64x2"


def _fake_sweep_row(*args, **kwargs):
    """A stand-in for every row function of the sweep: each key the sweep's printing reads."""
    return {"ms": {}, "errors": {}, "dtype": "bfloat16", "kind": "fake", "speedup_chunked_vs_padded": 1.0,
            "speedup_dot_vs_fadd": 1.0, "speedup_atomic_vs_kernel": 1.0, "speedup_32_vs_16rows": 1.0,
            "speedup_32_vs_16keys": 1.0, "speedup_ws_vs_default": 1.0, "speedup_2_vs_1stage": 1.0,
            "ms_2stage_16rows": 1.0, "speedup_8_vs_4warps": 1.0, "wgmma_ran": True, "best_wgmma": "wg128x3",
            "speedup_wgmma_vs_mmasync": 1.0, "speedup_wgmma_vs_cudnn": 1.0, "tflops_best_wgmma": 1.0,
            "max_abs_diff_vs_cudnn": 0.0, "gluon_ran": True, "best_gluon": "gl128x128",
            "speedup_gluon_vs_pointer": 1.0, "speedup_gluon_vs_cudnn": 1.0, "tflops_best_gluon": 1.0,
            "speedup_fast_vs_triton_launch": 1.0, "ms_fast_launch": 1.0, "gluonbwd_ran": True,
            "best_gluonbwd": "glbwd1", "speedup_gluonbwd_vs_split": 1.0, "speedup_gluonbwd_vs_cudnn": 1.0,
            "tflops_best_gluonbwd": 1.0, "speedup_auto_vs_off": 1.0, "speedup_split_vs_fused": 1.0}


_SWEEP_ROW_FNS = ("measure_row", "chunking_row", "bwd_chunking_row", "rowsum_row", "triton_bwd_dq_row",
                  "cuda_row_blocks_row", "cuda_bwd_key_blocks_row", "peak_memory_row", "triton_fwd_ws_row",
                  "cuda_fwd_stages_row", "cuda_bwd_warps_row", "cuda_wgmma_fwd_row", "triton_gluon_fwd_row",
                  "triton_gluon_bwd_row", "fast_launch_row", "graph_row", "cuda_fwd_splits_row", "cuda_bwd_split_row")


def _fake_sweep(monkeypatch, **spies):
    """Every row function of the sweep replaced by _fake_sweep_row (``spies``: name -> replacement), both of ours
    available, the CUDA attention extension too."""
    import jedi_kernels as jk

    for name in _SWEEP_ROW_FNS:
        monkeypatch.setattr(sw, name, spies.get(name, _fake_sweep_row))
    monkeypatch.setattr(sw, "available_ours", lambda: ["triton", "cuda"])
    monkeypatch.setattr(jk, "available_backends", lambda: {"cuda_attention": True})
    monkeypatch.setattr(sw, "set_mask_of", lambda *a, **k: None)  # the masked rows' masks (device = GPU)


def test_sweep_saves_after_every_row(monkeypatch):
    """gpu_check.sh gives the sweep a fixed time: every row is written as soon as it is measured, so a run cut short
    keeps its rows (stand-in measurements; the order puts the dispatch-deciding rows first)."""
    _fake_sweep(monkeypatch)
    saved = []
    rows = sw.sweep(True, 1, save=lambda r: saved.append(len(r)))
    assert saved == list(range(1, len(rows) + 1)) and len(rows) > 20


def test_sweep_times_the_d160_row_blocks_without_the_gluon_backward(monkeypatch):
    """The CUDA forward's 32-rows-per-warp rows at d 160 (issue 4's full-wave misses) depend on the CUDA extension
    only: gpu_check.sh's session runs leave the Gluon backward's probe off (JEDI_SWEEP_GLUON_BWD=0), and until the
    twenty-fifth session these rows sat under its condition, so no run timed them."""
    calls = []

    def spy(L, D, ng=2, **kw):
        calls.append((L, D, ng))
        return _fake_sweep_row()

    _fake_sweep(monkeypatch, cuda_row_blocks_row=spy)
    monkeypatch.setenv("JEDI_SWEEP_GLUON_BWD", "0")
    sw.sweep(True, 1, save=lambda r: None)
    assert [c for c in calls if c[1] == 160] == [(256, 160, 4), (256, 160, 8), (256, 160, 2)]


@pytest.mark.gpu
def test_gpu_graph_rows_capture_forward_and_backward_for_every_backend():
    """On the GPU, through the sweep's own child process (``--graph-items``): every backend's forward + backward and
    forward are captured into a CUDA graph and timed, on a small SD-like shape (L 64, d 40, set size 2, bf16). Both
    H200 runs of 2026-11-28 failed every fwd+bwd capture (a leaf first used on the default stream)."""
    items = [[64, 40, mode, name] for mode in ("fwd+bwd", "fwd") for name in sw.graph_backends()]
    if "cuda" in sw.graph_backends():  # the forward with key splits asked for, as the sweep's graph rows time it,
        items += [[1024, 80, "fwd", "cuda-splits", 1],  # and the split backward
                  [64, 40, "fwd+bwd", "cuda-bwdsplit", 2], [256, 160, "fwd+bwd", "cuda-bwdsplit", 2]]
    results, rc, tail = sw._run_graph_child(items, rep_ms=2, timeout_s=240)
    assert rc == 0 and len(results) == len(items), (rc, results, tail)
    failed = {f"{item[2]} {item[3]}": res for item, res in zip(items, results) if "ms" not in res}
    assert not failed, failed
    assert all(res["ms"] > 0 for res in results)
