"""JeDi paper Table 6 (inference time of one diffusion step) as pytest-benchmark: ``pytest benchmarks --benchmark-only
-k table6``. Workloads, modes and peers are defined in ``table6.py`` (also a plain script, which gpu_check.sh runs).

GPU (``-m gpu``; SD v1 UNet, 64x64 latents, fp16): {blipd, elite, jedi_ng2, jedi_ng2_1b, jedi_ng4} x ours {eager, cuda_graph,
compile, compile+cuda_graph} + diffusers {eager, compile, compile+cuda_graph}. They run only when selected (``-k`` naming table6, or
``JEDI_TABLE6=1``), so a plain ``pytest benchmarks -m gpu --benchmark-only`` does not spend minutes compiling.
Each workload's models are built once (a module-scoped fixture, freed before the next workload).
``JEDI_TABLE6_QUICK=1``: blipd, elite, jedi_ng2 and jedi_ng2_1b only, no diffusers compile. ``extra_info`` records ms (do_bench
median), ratio to blipd (same impl and mode, when blipd ran in this session), the paper's ratio, UNet batch, compile
time, peak memory, device and versions.

CPU (not marked gpu): ``test_table6_cpu_smoke`` builds each workload on ``UNetConfig.tiny``-sized models, runs one
forward and checks the diffusers equivalent (same weights) gives the same eps; ``test_table6_script_cpu_rehearsal``
runs ``table6.py`` end to end on the CPU (tiny models, eager compile backend; CUDA-graph entries fail and are
recorded as such), so the GPU script's bookkeeping, JSON, markdown and plot are exercised in CI.
"""
from __future__ import annotations

import json
import os

import pytest
import table6 as t6
import torch
from common import env_info, gpu_time_ms

QUICK = os.environ.get("JEDI_TABLE6_QUICK", "") not in ("", "0")
_MS: dict[tuple[str, str, str], float] = {}  # (impl, mode, workload) -> ms, for the ratios to blipd


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(t6.WORKLOADS))
def t6_session(request):
    """One workload's models (ours + diffusers on first use), built once; freed (dynamo reset too) afterwards."""
    name = request.param
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "table6" not in (request.config.getoption("keyword") or "") and os.environ.get("JEDI_TABLE6") != "1":
        pytest.skip("the Table 6 GPU suite (minutes: it compiles the SD UNet) runs when selected: -k table6 or "
                    "JEDI_TABLE6=1 (benchmarks/table6.py is its script form)")
    if QUICK and name not in t6.QUICK_WORKLOADS:
        pytest.skip(f"JEDI_TABLE6_QUICK=1 runs {t6.QUICK_WORKLOADS} only")
    s = t6.Session(t6.WORKLOADS[name])
    yield s
    s.close()


def _measure(benchmark, session: t6.Session, impl: str, mode: str) -> None:
    w = session.w
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        step, info = session.prepare(impl, mode)
        ms = gpu_time_ms(step, warmup=100, rep_ms=500)

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    _MS[(impl, mode, w.name)] = ms
    base = _MS.get((impl, mode, "blipd"))
    benchmark.extra_info.update(env_info("cuda"))
    benchmark.extra_info.update(
        info, workload=w.name, label=w.label, impl=impl, mode=mode, unet_batch=w.batch, set_size=w.set_size,
        config="sd_v1", dtype="float16", latents="64x64", ms=round(ms, 3),
        ratio_to_blipd=round(ms / base, 3) if base else None, paper_ratio=w.paper_ratio,
        paper_a100_ms=w.paper_s * 1e3 if w.paper_s else None,
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )
    if "cuda_graph" in mode:
        session.release()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", t6.OUR_MODES)
def test_table6_ours(benchmark, t6_session, mode):
    _measure(benchmark, t6_session, "ours", mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", t6.DIFFUSERS_MODES)
def test_table6_diffusers(benchmark, t6_session, mode):
    pytest.importorskip("diffusers")
    if QUICK and mode.startswith("compile"):
        pytest.skip("JEDI_TABLE6_QUICK=1: no diffusers compile")
    _measure(benchmark, t6_session, "diffusers", mode)


# ---- CPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workload", list(t6.WORKLOADS))
def test_table6_cpu_smoke(benchmark, workload, one_thread):
    """Each workload's construction and one forward on tiny-sized models; the diffusers equivalent (extra K/V
    processor, joint-attention processor, 9-ch conv_in; same weights) agrees to 1e-4 in fp32."""
    w = t6.WORKLOADS[workload]
    s = t6.Session(w, "cpu", tiny=True)
    try:
        with torch.no_grad():
            if w.extra_dim:  # the extra tokens are attended
                text_only = s.unet(**{k: v for k, v in s.inp.items() if k != "extra_context"})
                assert (s.unet(**s.inp) - text_only).abs().max() > 1e-3
            try:
                import diffusers  # noqa: F401
            except ImportError:
                pass
            else:  # builds the diffusers model and compares one forward of each
                _, info = s.prepare("diffusers", "eager")
                assert info["max_abs_ours"] > 0.1, info  # a meaningful comparison
                assert info["max_abs_diff_vs_ours"] <= 1e-4, info
            out = benchmark.pedantic(lambda: s.unet(**s.inp), rounds=1, iterations=1)
            assert out.shape == (w.batch, 4, t6.TINY_HW, t6.TINY_HW) and torch.isfinite(out).all()
    finally:
        s.close()
    benchmark.extra_info.update(env_info("cpu"), workload=workload, config="tiny", unet_batch=w.batch,
                                set_size=w.set_size, dtype="float32")


def test_table6_script_cpu_rehearsal(benchmark, tmp_path, one_thread):
    """table6.py end to end on the CPU (in-process; the GPU run puts each workload in a worker process): JSON +
    markdown + PNG, every planned entry present, CUDA-graph entries recorded as errors (no GPU), ratios filled."""
    out = tmp_path / "t6.json"
    argv = ["--device", "cpu", "--tiny", "--compile-backend", "eager", "--workloads", "blipd,jedi_ng2",
            "--no-diffusers-compile", "--no-isolate", "--out", str(out)]
    benchmark.pedantic(lambda: t6.main(argv), rounds=1, iterations=1)
    result = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"], r["mode"]): r for r in result["results"]}
    for name in ("blipd", "jedi_ng2"):
        for impl, mode in t6.plan(name, quick=False, kernels=False, diffusers_compile=False):
            assert (name, impl, mode) in rows, (name, impl, mode)
        assert rows[(name, "ours", "eager")]["ms"] > 0 and rows[(name, "ours", "compile")]["ms"] > 0
        assert "CUDAGraphRunner needs CUDA" in rows[(name, "ours", "cuda_graph")]["error"]
        assert rows[(name, "ours", "compile+cuda_graph")]["error"]
    assert rows[("blipd", "ours", "eager")]["ratio_to_blipd"] == 1.0
    assert rows[("jedi_ng2", "ours", "eager")]["paper_ratio"] == 1.146
    assert result["workloads"]["jedi_ng2"]["tflop"] > 2 * result["workloads"]["blipd"]["tflop"]
    if rows[("blipd", "diffusers", "eager")]["ms"]:  # diffusers installed
        assert rows[("blipd", "diffusers", "eager")]["max_abs_diff_vs_ours"] < 1e-4
    md = out.with_suffix(".md").read_text()
    assert "| jedi_ng2 | 4 |" in md and "1.146" in md
    assert out.with_suffix(".png").stat().st_size > 10_000 or not _has_matplotlib()
    benchmark.extra_info.update(env_info("cpu"), total_s=result.get("total_s"))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
