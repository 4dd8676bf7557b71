"""table6.py --jobs: workloads prepared side by side in worker processes, measured one at a time (measure_gate)."""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import table6 as t6  # noqa: E402


def _hold_turn(gate_dir, n, barrier, name, log, hold_s):
    with t6.measure_gate(gate_dir, n, barrier, name, poll_s=0.02) as extra:
        with open(log, "a") as f:
            f.write(f"{name} start {time.time():.4f} {json.dumps(extra)}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"{name} end {time.time():.4f}\n")


def _turns(log):
    spans = {}
    for line in Path(log).read_text().splitlines():
        name, what, t = line.split()[:3]
        spans.setdefault(name, {})[what] = float(t)
    return spans


def test_gate_waits_for_every_worker_then_measures_one_at_a_time(tmp_path):
    gate, log = tmp_path / "gate", tmp_path / "log"
    gate.mkdir()
    ctx = mp.get_context("spawn")
    barrier = time.time() + 60
    procs = [ctx.Process(target=_hold_turn, args=(str(gate), 3, barrier, f"w{i}", str(log), 0.3)) for i in range(2)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    assert not log.exists()  # two of three ready: nobody measures yet
    (gate / "w2.exited").touch()  # the third died before its turn: the parent marks it, the others go on
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    spans = _turns(log)
    (a, b) = sorted(spans.values(), key=lambda s: s["start"])
    assert a["end"] <= b["start"]  # the lock: turns do not overlap
    assert "measured_while_others_prepared" not in log.read_text()


def test_gate_counts_a_worker_once_when_it_is_both_ready_and_gone(tmp_path):
    """A worker that measured and exited leaves both marks; it must not stand in for one still compiling."""
    gate, log = tmp_path / "gate", tmp_path / "log"
    gate.mkdir()
    (gate / "w1.ready").touch()
    (gate / "w1.exited").touch()  # w1 done; w2 (never comes) is still preparing
    t0 = time.time()
    _hold_turn(str(gate), 3, t0 + 0.3, "w0", str(log), 0.0)
    assert time.time() - t0 >= 0.3  # waited for the barrier: 2 of 3 workers, not 3
    assert '"measured_while_others_prepared": true' in log.read_text()


def test_gate_gives_up_at_the_barrier_and_says_so(tmp_path):
    gate, log = tmp_path / "gate", tmp_path / "log"
    gate.mkdir()
    t0 = time.time()
    _hold_turn(str(gate), 2, t0 + 0.3, "w0", str(log), 0.0)  # the other worker never comes
    assert 0.3 <= time.time() - t0 < 5
    assert '"measured_while_others_prepared": true' in log.read_text()


def test_parallel_cpu_rehearsal(tmp_path):
    """--jobs 2 end to end on the CPU (tiny models, eager compile backend): every planned entry of both workloads
    present, measured after the barrier (not flagged), the run described in the JSON."""
    out = tmp_path / "t6.json"
    t6.main(["--device", "cpu", "--tiny", "--compile-backend", "eager", "--workloads", "blipd,jedi_ng2", "--jobs", "2",
             "--budget-s", "300", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["parallel"]["jobs"] == 2
    rows = {(r["workload"], r["impl"], r["mode"]): r for r in result["results"]}
    for name in ("blipd", "jedi_ng2"):
        for impl, mode in t6.plan(name, quick=False, kernels=False, diffusers_compile=True):
            assert (name, impl, mode) in rows, (name, impl, mode)
        for mode in ("eager", "compile"):
            r = rows[(name, "ours", mode)]
            assert r["ms"] > 0 and r["error"] is None and "measured_while_others_prepared" not in r, r
        assert "CUDAGraphRunner needs CUDA" in rows[(name, "ours", "cuda_graph")]["error"]
        if rows[(name, "diffusers", "eager")]["ms"]:  # diffusers installed
            assert rows[(name, "diffusers", "compile")]["memory_format"] == "channels_last"
            assert "GraphedStep needs CUDA" in rows[(name, "diffusers", "compile+cuda_graph")]["error"]
    assert rows[("jedi_ng2", "ours", "compile")]["ratio_to_blipd"] > 0
