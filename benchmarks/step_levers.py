"""Issue 9: the JeDi denoising step, lever by lever, against the peers — in one run, on one card.

    python benchmarks/step_levers.py --out OUT.json [--quick] [--budget-s 420]     # GPU: OUT.json + OUT.md
    python benchmarks/step_levers.py --device cpu --tiny --compile-backend eager   # CPU rehearsal of the script

Workload: ``jedi_ng2`` of ``table6.py`` — JeDiUNet (SD v1), fp16, 64x64 latents, set size 2, guidance "joint" (two
branches) -> UNet batch 4; the target is <= 8.0 ms on an H100 (peer: diffusers + joint SDPA, torch.compile
reduce-overhead, channels-last: 12.26 ms, measured again here when diffusers is importable).

The ladder is cumulative; every rung is timed on the same inputs (CUDA-event medians, ``common.gpu_time_ms``):

    eager, float32 GN   the default model before 2026-11-27 (third session): LDM's GroupNorm32 round trip through
                        float32 (casts of x, weight, bias and back) around torch's GroupNorm
    eager               NCHW, torch SDPA ("auto" attention), GroupNorm/SiLU/GEGLU as torch ops (half GroupNorm as
                        torch's own kernel, which accumulates in float32)
    +channels_last      model and inputs channels-last
    +fused_ops          GroupNorm(+SiLU) and GEGLU through jedi_kernels (JeDiUNet.set_fused_ops, without the next)
    +fused_ln           each transformer block's residual adds + LayerNorms as jedi_kernels.add_layer_norm (part of
                        set_fused_ops: inference outside torch.compile only)
    +fold_bias          conv biases folded into the adds / GEMMs after the convs, the 1x1 convs as GEMMs with the bias
                        in the epilogue, each ResBlock's time embedding inside its second GroupNorm (the rest of
                        set_fused_ops; torch adds a cuDNN conv's bias in a pass of its own)
    +fuse_qkv           q/k/v of every self-attention as one GEMM
    +fuse_context_kv    the keys and values of the text context for every cross-attention in one GEMM
    +fold_linear_bias   the out-projections' biases as the shift of the next add + LayerNorm (their GEMMs without a
                        bias epilogue), the feed-forward output's GEMM accumulating into the residual in place
                        (addmm_, its bias in that residual already): no add after it
    +subpixel_upsample  each Upsample (nearest 2x + 3x3 conv) as one conv of its small input with four folded 2x2
                        kernels and a Triton interleave + bias pass (jedi_kernels.upsample_conv2d: 0.44x the FLOPs,
                        no upsampled tensor, no bias pass)
    +residual_add       the ResBlocks' and SpatialTransformers' residual adds take their output convs' biases
                        (jedi_kernels.residual_add, one pass): conv2 without cuDNN's strided bias pass, the 1x1 skip
                        and proj_out GEMMs without a bias epilogue
    +skip_cat           the decoder's skip concatenations never made: each decoder ResBlock's fused GroupNorm reads
                        the two halves in place, its 1x1 skip conv runs as two GEMMs (the second accumulating into
                        the first's output) (the rest of set_fused_ops; inference only)
    +frozen_weights     timed inside JeDiUNet.frozen_weights(), as jedi.sampling.personalize runs its steps: the
                        fused q/k/v and context k/v weights, the time-embedding GEMM's weights and the folded
                        sub-pixel kernels made once, not per step (the H200 profile had the weight concatenations at
                        0.109 ms a step)
    +targets_only       the sampler's step: eps of the targets only (JeDiUNet out_positions), the references run up
                        to the last joint self-attention, whose keys and values need them (on +frozen_weights; the
                        rungs after it compute every image again). Its output is half the full step's at set size 2,
                        so it is reported apart (summary best_ms_targets_only) and never picked as the best
                        configuration the peers are compared with
    +cudnn_benchmark    torch.backends.cudnn.benchmark: cuDNN times its conv algorithms once per shape instead of
                        taking its heuristic's pick (process-wide: the rungs after it and the peers run with it too)
    +fuse_ff            each feed-forward's projection + GEGLU as one Triton kernel (jedi_kernels.linear_geglu; opt-in
                        in optimize() until this rung measures it; on +cudnn_benchmark)
    +attn=triton/cuda   the joint self-attention on our Triton / CUDA kernel instead of SDPA (each on +cudnn_benchmark)
    +attn=cuda_wgmma    the CUDA kernel with the Hopper forward's variant WGMMA_VARIANT (JEDI_CUDA_FWD_WGMMA) wherever it
                        is compiled (compute capability 9.0 only); +attn=cuda runs variant 1 at d 40 only, the CUDA
                        default there, so the two rungs compare the step with variant 4 (default here) and variant 1
    +attn=triton_gluon  the Triton kernel with the Gluon Hopper forward (JEDI_TRITON_FWD_GLUON, config GLUON_VARIANT)
                        at the d 40 and d 80 layers (compute capability 9.0 only)
    +attn=triton_gluon_ws  the same with its warp-specialized config (5)
    (cuda_graph)        on a GPU, every rung above also replayed as one CUDA graph: its device time, which picks
                        the best levers (eager wall times are launch-bound and rank nothing)
    cuda_graph[attn]    each attention backend on the best levers, where no rung measured that already
    compile+cuda_graph  torch.compile (inductor, default mode) of it, replayed as a CUDA graph
    diffusers eager / compile(reduce-overhead, channels-last)   the peers
    personalize per step   (workload jedi_ng2_sampler) a whole jedi.sampling.personalize run with the best rung,
                        the UNet as CUDA graphs (GraphedUNet) and the targets' eps only, per step: against the
                        graphed +targets_only rung it shows what the sampling loop adds between the UNet steps

Then the best configuration runs ``jedi_ng4`` (batch 8; target <= 2.1x the ng2 step; also with targets_only) and
``blipd`` (plain SD, batch 2; target <= 4.5 ms), and its fp16 output is compared with the fp32 UNet on the same
inputs (target: relative error <= 1e-2). Every entry is measured in try/except (errors are recorded, the run goes
on), compiles that would not fit ``--budget-s`` are skipped and say so, and the JSON is rewritten after every entry.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table6  # noqa: E402
from table6 import (WORKLOADS, _device_info, _free, build_diffusers, build_ours, inputs_in_format,  # noqa: E402
                    time_step)

from jedi import CUDAGraphRunner  # noqa: E402
from jedi.unet import GroupNorm32, ResBlock, SpatialTransformer, TransformerBlock, Upsample  # noqa: E402
from jedi_kernels import available_backends  # noqa: E402

TARGET_MS = {"jedi_ng2": 8.0, "blipd": 4.5}
TARGET_NG4_OVER_NG2 = 2.1
ANCHOR_PEER_MS = {"jedi_ng2": 12.26, "blipd": 6.54}  # diffusers compile reduce-overhead channels-last, H100 2026-11-26

BASE = dict(gn_fp32=False, channels_last=False, fused_ops=False, fused_ln=False, fold_bias=False, fuse_qkv=False,
            fuse_context_kv=False, fold_linear_bias=False, subpixel_upsample=False, residual_add=False,
            skip_cat=False, frozen_weights=False, cudnn_benchmark=False, fuse_ff=False, attn="auto", targets_only=False)
_FUSED = dict(channels_last=True, fused_ops=True, fused_ln=True, fold_bias=True)
_PROJ = dict(_FUSED, fuse_qkv=True, fuse_context_kv=True, fold_linear_bias=True)
_UP = dict(_PROJ, subpixel_upsample=True, residual_add=True, skip_cat=True, frozen_weights=True)
_ALL = dict(_UP, cudnn_benchmark=True)
LADDER = [
    ("eager, float32 GN", dict(BASE, gn_fp32=True)),
    ("eager", dict(BASE)),
    ("+channels_last", dict(BASE, channels_last=True)),
    ("+fused_ops", dict(BASE, channels_last=True, fused_ops=True)),
    ("+fused_ln", dict(BASE, channels_last=True, fused_ops=True, fused_ln=True)),
    ("+fold_bias", dict(BASE, **_FUSED)),
    ("+fuse_qkv", dict(BASE, **_FUSED, fuse_qkv=True)),
    ("+fuse_context_kv", dict(BASE, **_FUSED, fuse_qkv=True, fuse_context_kv=True)),
    ("+fold_linear_bias", dict(BASE, **_PROJ)),
    ("+subpixel_upsample", dict(BASE, **_PROJ, subpixel_upsample=True)),
    ("+residual_add", dict(BASE, **_PROJ, subpixel_upsample=True, residual_add=True)),
    ("+skip_cat", dict(BASE, **_PROJ, subpixel_upsample=True, residual_add=True, skip_cat=True)),
    ("+frozen_weights", dict(BASE, **_UP)),
    # right after the best configuration measured so far, so that a time-capped session run reaches it
    ("+targets_only", dict(BASE, **_UP, targets_only=True)),
    ("+cudnn_benchmark", dict(BASE, **_ALL)),
    ("+fuse_ff", dict(BASE, **_ALL, fuse_ff=True)),
    ("+attn=triton", dict(BASE, **_ALL, attn="triton")),
    ("+attn=cuda", dict(BASE, **_ALL, attn="cuda")),
    ("+attn=cuda_wgmma", dict(BASE, **_ALL, attn="cuda_wgmma")),
    ("+attn=triton_gluon", dict(BASE, **_ALL, attn="triton_gluon")),
    ("+attn=triton_gluon_ws", dict(BASE, **_ALL, attn="triton_gluon_ws")),
]
ATTNS = ("triton", "cuda", "cuda_wgmma", "triton_gluon", "triton_gluon_ws")  # our attention options, besides "auto"
# the Hopper forwards' variants the cuda_wgmma / triton_gluon rungs run (benchmarks/attention_sweep.py times all):
# for the CUDA one, variant 4 (128 keys x 1 warpgroup per CTA, cuDNN's tile; twenty-third session, untimed), since
# +attn=cuda already runs the sweep's winner on the H200 (2026-11-28, d 40, every ng), variant 1 (64 keys x 2
# warpgroups: 0.727 ms at ng 2 against 0.830 for variant 3, which this rung ran then: 12.41 ms against 12.28 with
# mma.sync); at d 80 and 160, where variant 4 is not compiled, both rungs run mma.sync. Of the Gluon configs without
# warp specialization, 128 x 64 (config 2: 0.790 ms against config 1's 1.056)
WGMMA_VARIANT = os.environ.get("JEDI_STEP_WGMMA_VARIANT", "4")
GLUON_VARIANT = os.environ.get("JEDI_STEP_GLUON_VARIANT", "2")
GLUON_WS_VARIANT = "5"  # the warp-specialized Gluon config
# attn option -> (backend, the per-call switch it sets, its value); the other rungs run with the user's value of each
# switch (unset: the default kernel)
_HOPPER = {"cuda_wgmma": ("cuda", "JEDI_CUDA_FWD_WGMMA", WGMMA_VARIANT),
           "triton_gluon": ("triton", "JEDI_TRITON_FWD_GLUON", GLUON_VARIANT),
           "triton_gluon_ws": ("triton", "JEDI_TRITON_FWD_GLUON", GLUON_WS_VARIANT)}
_USER_SWITCH = {env: os.environ.get(env) for _, env, _ in _HOPPER.values()}


def configure(unet, inp: dict, cfg: dict) -> dict:
    """Apply one ladder configuration to ``unet`` in place; returns the inputs in the matching memory format."""
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    unet.to(memory_format=fmt)
    for m in unet.modules():
        if isinstance(m, GroupNorm32):
            m.fp32_round_trip = bool(cfg.get("gn_fp32", False))
    unet.set_fused_ops(cfg["fused_ops"])
    for m in unet.modules():  # set_fused_ops turns the fused add + LayerNorm and fold_bias on with the rest; a rung
        if isinstance(m, TransformerBlock):  # may not
            m.fused_ln = bool(cfg["fused_ops"] and cfg.get("fused_ln", True))
            m.fold_linear_bias = bool(m.fused_ln and cfg.get("fold_linear_bias", True))
        if isinstance(m, (ResBlock, SpatialTransformer)):
            m.fold_bias = bool(cfg["fused_ops"] and cfg.get("fold_bias", True))
            m.residual_add = bool(m.fold_bias and cfg.get("residual_add", True))
        if isinstance(m, ResBlock):
            m.skip_cat = bool(m.fold_bias and cfg.get("skip_cat", True))
        if isinstance(m, Upsample):
            m.subpixel = bool(cfg["fused_ops"] and cfg.get("subpixel_upsample", True))
    unet.set_fuse_qkv(cfg["fuse_qkv"])
    unet.set_fuse_context_kv(cfg.get("fuse_context_kv", False))
    unet.set_fuse_ff(cfg.get("fuse_ff", False))
    # attn="cuda_wgmma" / "triton_gluon[_ws]": a backend with its Hopper forward; the switches are read per call (at
    # capture time for a CUDA graph), so every configuration sets each of them (two options share one switch)
    wanted = dict(_USER_SWITCH)
    if cfg["attn"] in _HOPPER:
        _, env, value = _HOPPER[cfg["attn"]]
        wanted[env] = value
    for env, value in wanted.items():
        if value is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = value
    unet.set_attn_backend(_HOPPER[cfg["attn"]][0] if cfg["attn"] in _HOPPER else cfg["attn"])
    torch.backends.cudnn.benchmark = bool(cfg.get("cudnn_benchmark", False))
    inp = inputs_in_format(inp, fmt)
    inp.pop("out_positions", None)
    if cfg.get("targets_only") and "ng_mask" in inp and inp.get("set_size", 1) > 1:
        # table6's sets: set_size - 1 references, then the one target
        inp["out_positions"] = (inp["set_size"] - 1,)
    return inp


def frozen_scope(unet, cfg: dict):
    """``unet.frozen_weights`` for a configuration with ``frozen_weights`` (None otherwise, or for a UNet without
    it): :meth:`StepLevers.measure` runs the step inside it."""
    return getattr(unet, "frozen_weights", None) if cfg.get("frozen_weights") else None


def attn_available(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not."""
    avail = available_backends()
    key = {"triton": "triton", "cuda": "cuda_attention", "cuda_wgmma": "cuda_attention",
           "triton_gluon": "triton", "triton_gluon_ws": "triton"}.get(backend)
    if backend in _HOPPER and avail.get(key) and (
            not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)):
        return "the Hopper forward needs a compute-capability-9.0 GPU"
    if backend.startswith("triton_gluon"):
        from jedi_kernels.ops.set_attention_gluon import HAVE_GLUON, checked_configs

        if not HAVE_GLUON:
            return "this Triton has no Gluon"
        variant = int(_HOPPER[backend][2])
        if variant not in checked_configs():  # gpu_check.sh: the probe found it disagreeing, or it hung
            return f"Gluon config {variant} is not among JEDI_GLUON_CONFIGS={os.environ.get('JEDI_GLUON_CONFIGS')}"
    if key is None or avail.get(key):
        return None
    return avail["reasons"].get(key) or avail["reasons"].get("cuda") or f"{backend} unavailable"


class Run:
    """Rows of one run, written to ``out`` (JSON + markdown) after every entry."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.deadline = time.time() + args.budget_s
        self.compile_est = args.compile_est
        self.device = torch.device(args.device)
        self.result = dict(date=str(datetime.date.today()), env=_device_info(), args=vars(args), rows=[],
                           targets=dict(ms=TARGET_MS, ng4_over_ng2=TARGET_NG4_OVER_NG2),
                           anchor_peer_ms=ANCHOR_PEER_MS)

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def add(self, **row) -> dict:
        row.setdefault("ms", None)
        row.setdefault("error", None)
        self.result["rows"].append(row)
        self.result["summary"] = summarize(self.result["rows"], self.device.type)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=1))
        self.out.with_suffix(".md").write_text(markdown(self.result))
        status = f"{row['ms']:.3f} ms" if row["ms"] else row["error"]
        print(f"[step_levers] {row['workload']:9s} {row['entry']:28s} {status}", flush=True)
        return row

    def fits(self, compile_: bool) -> str | None:
        need = self.compile_est if compile_ else 10.0
        left = self.deadline - time.time()
        return None if left > need else f"skipped: time budget ({left:.0f} s left, entry needs ~{need:.0f} s)"

    def measure(self, workload: str, entry: str, cfg: dict, prepare, *, compile_: bool = False, scope=None,
                **extra) -> dict:
        """Time ``prepare() -> step`` (built under no_grad, and inside ``scope()`` when given: e.g. the UNet's
        frozen_weights, for graphs captured and replayed in it); errors and budget skips become the row's error."""
        row = dict(workload=workload, entry=entry, config=dict(cfg), **extra)
        skip = self.fits(compile_)
        if skip:
            return self.add(**row, error=skip)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.no_grad(), (scope() if scope is not None else contextlib.nullcontext()):
                step = prepare()
                t1 = time.perf_counter()
                row["ms"] = round(time_step(step, self.device, self.args.rep_ms), 3)
            if compile_:
                row["compile_s"] = round(t1 - t0, 1)
                self.compile_est = max(30.0, 1.2 * row["compile_s"])
            if self.device.type == "cuda":
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-2500:])
        return self.add(**row)

    # -- the ladder --------------------------------------------------------------------------------------------------
    def graph_step(self, unet, inp):
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        runner = CUDAGraphRunner(unet, inp)
        return lambda: runner(**inp)

    def compile_step(self, unet, inp, *, graph: bool, mode: str | None = None):
        compiled = torch.compile(unet, backend=self.args.compile_backend, mode=mode)
        compiled(**inp)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.graph_step(compiled, inp) if graph else (lambda: compiled(**inp))

    def ladder(self) -> dict | None:
        """jedi_ng2 rungs and peers; returns the best configuration found (with its mode).

        On a GPU every rung is timed eagerly and replayed as a CUDA graph, and the graph times pick the best: eager
        wall times of this UNet are bound by Python launch overhead (H100, 2026-11-27: 29-48 ms eager against
        12.9-21.2 ms of device time, the order of the rungs shuffled from run to run), so they cannot rank levers
        that only change device time."""
        name = "jedi_ng2"
        unet, inp0 = build_ours(WORKLOADS[name], self.device, self.dtype, tiny=self.args.tiny)
        cuda = self.device.type == "cuda"
        eager_ms, rung_graph_ms = {}, {}
        if not cuda:
            self.add(workload=name, entry="every rung (cuda_graph)", config={},
                     error="skipped: CUDA graphs need a CUDA device")
        for entry, cfg in LADDER:
            why = attn_available(cfg["attn"])
            if why:
                self.add(workload=name, entry=entry, config=cfg, error=f"skipped: {why}")
                continue
            inp = configure(unet, inp0, cfg)
            scope = frozen_scope(unet, cfg)
            row = self.measure(name, entry, cfg, lambda: (lambda: unet(**inp)), mode="eager", scope=scope)
            if row["ms"]:
                eager_ms[entry] = row["ms"]
            if cuda:
                row = self.measure(name, f"{entry} (cuda_graph)", cfg, lambda: self.graph_step(unet, inp),
                                   mode="cuda_graph", scope=scope)
                _free()
                if row["ms"]:
                    rung_graph_ms[entry] = row["ms"]
        if not eager_ms:
            return None
        # the best non-attention levers (by graph time where there is one), then each attention backend on them
        rank = rung_graph_ms or eager_ms
        # (+targets_only returns fewer outputs than the peers: reported apart, never the configuration compared)
        base_entry = min((e for e in rank if not e.startswith("+attn") and not dict(LADDER)[e].get("targets_only")),
                         key=rank.get, default=None)
        if base_entry is None:
            return None
        base_cfg = dict(dict(LADDER)[base_entry], attn="auto")
        # the whole sampling loop on these levers, early: a time-capped session run still reaches it
        self.sampler_loop(unet, inp0, base_cfg)
        graph_ms = {}
        if base_entry in rung_graph_ms:
            graph_ms["auto"] = rung_graph_ms[base_entry]
        for attn in ATTNS:
            cfg = dict(base_cfg, attn=attn)
            rung = f"+attn={attn}"
            if rung in rung_graph_ms and dict(LADDER)[rung] == cfg:  # that rung was timed on these levers already
                graph_ms[attn] = rung_graph_ms[rung]
                continue
            why = attn_available(attn) or (None if cuda else "CUDA graphs need a CUDA device")
            if why:
                self.add(workload=name, entry=f"cuda_graph[attn={attn}]", config=cfg, error=f"skipped: {why}")
                continue
            inp = configure(unet, inp0, cfg)
            row = self.measure(name, f"cuda_graph[attn={attn}]", cfg, lambda: self.graph_step(unet, inp),
                               mode="cuda_graph", scope=frozen_scope(unet, cfg))
            _free()
            if row["ms"]:
                graph_ms[attn] = row["ms"]
        best_attn = min(graph_ms, key=graph_ms.get) if graph_ms else min(
            ("auto", *ATTNS), key=lambda a: eager_ms.get(f"+attn={a}", eager_ms[base_entry] if a == "auto"
                                                                    else float("inf")))
        best = dict(base_cfg, attn=best_attn, mode="cuda_graph" if graph_ms else "eager")
        best_ms = graph_ms.get(best_attn) or eager_ms.get(base_entry)
        if not self.args.quick:
            cfg = dict(base_cfg, attn=best_attn)
            inp = configure(unet, inp0, cfg)
            graph = self.device.type == "cuda"
            row = self.measure(name, "compile+cuda_graph" if graph else "compile", cfg,
                               lambda: self.compile_step(unet, inp, graph=graph), compile_=True,
                               scope=frozen_scope(unet, cfg))
            torch._dynamo.reset()
            _free()
            if row["ms"] and row["ms"] < best_ms:
                best, best_ms = dict(cfg, mode="compile+cuda_graph" if graph else "compile"), row["ms"]
        # the peers get the process-wide cuDNN setting of our best configuration (a diffusers user can set it too)
        self.peers(name, unet, configure(unet, inp0, dict(BASE, cudnn_benchmark=best.get("cudnn_benchmark", False))))
        self.precision(unet, inp0, best)
        unet = inp = None  # free before the next workloads
        _free()
        return best

    def peers(self, name: str, unet, inp) -> None:
        if importlib.util.find_spec("diffusers") is None:
            self.add(workload=name, entry="diffusers eager", config={}, error="skipped: diffusers not importable")
            return
        state = {}

        def build():
            state["dm"], state["step"] = build_diffusers(WORKLOADS[name], unet, inp)
            return state["step"]

        self.measure(name, "diffusers eager", {}, build, impl="diffusers")
        if self.args.quick or "dm" not in state:
            return
        dm, step = state["dm"], state["step"]

        def compiled():
            dm.to(memory_format=torch.channels_last)
            for k in ("x_t", "x0"):
                if k in inp:  # in place: the diffusers step closes over these tensors
                    inp[k].data = inp[k].contiguous(memory_format=torch.channels_last)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            c = torch.compile(dm, backend=self.args.compile_backend, mode=mode)
            step(c)
            return lambda: step(c)

        self.measure(name, "diffusers compile(reduce-overhead, channels-last)", {}, compiled, compile_=True,
                     impl="diffusers")
        torch._dynamo.reset()
        state.clear()
        _free()

    def sampler_loop(self, unet, inp0, best: dict, steps: int = 10) -> None:
        """jedi.sampling.personalize with the best non-attention levers (``best``), the UNet replayed as CUDA graphs (GraphedUNet) and the
        targets' eps only: the device time of a whole sampling run per step (CUDA events around it, so any gap the
        host leaves between steps counts), to set against the graphed +targets_only rung. Workload jedi_ng2_sampler:
        one set of 1 reference + 1 target, guidance "joint" (two branches): UNet batch 4, as jedi_ng2."""
        cuda = self.device.type == "cuda"
        mode = "cuda_graph" if cuda else "eager"  # (eager: the CPU rehearsal of this code)
        name, entry = "jedi_ng2_sampler", f"personalize per step ({steps} steps, {mode})"
        cfg = dict(best, targets_only=True, mode=mode)
        from jedi.runtime import GraphedUNet
        from jedi.sampling import personalize, uniform_timesteps

        row = dict(workload=name, entry=entry, config=cfg, steps=len(uniform_timesteps(steps)))
        skip = self.fits(False)
        if skip:
            self.add(**row, error=skip)
            return
        try:
            inp = configure(unet, inp0, dict(cfg, targets_only=False))
            graphed = GraphedUNet(unet) if cuda else unet
            refs, ctx = inp["x0"][:1], inp["context"][:1]  # (R=1, C, h, w), (B=1, M, D)
            null = torch.zeros_like(ctx[0])

            def run():
                return personalize(graphed, refs, ctx, null, num_targets=1, steps=steps, strategy="joint", l1=7.5,
                                   generator=torch.Generator(self.device).manual_seed(0), progress=False)

            with torch.no_grad():
                run()  # captures the graph
                ms = time_step(run, self.device, self.args.rep_ms)
            row.update(ms=round(ms / row["steps"], 3), run_ms=round(ms, 3))
            if cuda:
                row["captures"] = graphed.captures
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-2500:])
        self.add(**row)
        _free()

    def precision(self, unet, inp0, best: dict) -> None:
        """fp16 output of the best configuration vs the fp32 UNet on the same inputs (relative L2 error)."""
        row = dict(workload="jedi_ng2", entry="precision fp16 best vs fp32", config=best)
        try:
            with torch.no_grad():
                inp = configure(unet, inp0, best)
                got = unet(**inp).float()
                ref = build_ours(WORKLOADS["jedi_ng2"], self.device, torch.float32, tiny=self.args.tiny)[0]
                ref.set_attn_backend("torch")
                inp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                         for k, v in inp0.items()}
                tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
                try:
                    want = ref(**inp32).float()
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                row["rel_err"] = float((got - want).norm() / want.norm())
                row["target_rel_err"] = 1e-2
            del ref
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-2500:])
        self.add(**row)
        _free()

    def others(self, best: dict) -> None:
        """The best configuration on jedi_ng4 and blipd."""
        for name in ("jedi_ng4", "blipd"):
            cfg = dict(best)
            mode = cfg.pop("mode")
            if mode.startswith("compile") and self.args.quick:
                mode = "cuda_graph" if self.device.type == "cuda" else "eager"
            try:
                unet, inp0 = build_ours(WORKLOADS[name], self.device, self.dtype, tiny=self.args.tiny)
            except Exception as e:
                self.add(workload=name, entry=f"best ({mode})", config=cfg, error=f"{type(e).__name__}: {e}"[:1500])
                continue
            inp = configure(unet, inp0, cfg)
            if mode == "eager":
                prep, comp = (lambda: (lambda: unet(**inp))), False
            elif mode == "cuda_graph":
                prep, comp = (lambda: self.graph_step(unet, inp)), False
            else:
                graph = self.device.type == "cuda"
                prep, comp = (lambda: self.compile_step(unet, inp, graph=graph)), True
            self.measure(name, f"best ({mode})", cfg, prep, compile_=comp, scope=frozen_scope(unet, cfg))
            if name == "jedi_ng4" and self.device.type == "cuda":  # the sampler's step: 3 of 4 images stop early
                # (graphed, not compiled: a second compile for the other output shape would not fit the budget)
                cfg_t = dict(cfg, targets_only=True)
                inp = configure(unet, inp0, cfg_t)
                self.measure(name, "best+targets_only (cuda_graph)", cfg_t, lambda: self.graph_step(unet, inp),
                             scope=frozen_scope(unet, cfg_t))
            unet = inp = inp0 = prep = None
            torch._dynamo.reset()
            _free()

    def run(self) -> dict:
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        cudnn_benchmark = torch.backends.cudnn.benchmark
        try:
            best = self.ladder()
            if best is not None:
                self.result["best_config"] = best
                self.others(best)
        finally:
            torch.backends.cudnn.benchmark = cudnn_benchmark  # configure() sets it process-wide
        self.add(workload="-", entry="done", config={}, error=None, ms=None)
        return self.result


def summarize(rows: list[dict], device_type: str = "cuda") -> dict:
    """Headline numbers: best ms per workload (ours), best peer, and the targets' verdicts (GPU runs only: the
    targets are H100 milliseconds, a CPU rehearsal is not judged)."""
    ours, targets_only = {}, {}
    for r in rows:
        if r.get("ms") and r.get("impl") != "diffusers":
            best = targets_only if r.get("config", {}).get("targets_only") else ours
            best[r["workload"]] = min(best.get(r["workload"], float("inf")), r["ms"])
    peers = [r for r in rows if r.get("impl") == "diffusers" and r.get("ms")]
    best_peer = min(peers, key=lambda r: r["ms"], default=None)
    peer = best_peer["ms"] if best_peer else None
    # which peer: a --quick run measures diffusers eager only, and a speedup over it is not one over the compiled peer
    s = {"best_ms": ours, "best_peer_ms_ng2": peer, "best_peer_entry_ng2": best_peer["entry"] if best_peer else None}
    if targets_only:  # the sampler's step (targets' eps only): not the output the peers compute
        s["best_ms_targets_only"] = targets_only
    if device_type != "cuda":
        s["verdicts"] = "none: CPU rehearsal (the targets are GPU milliseconds)"
        return s
    if "jedi_ng2" in ours:
        s["ng2_meets_8ms"] = ours["jedi_ng2"] <= TARGET_MS["jedi_ng2"]
        if peer:
            s["speedup_vs_best_peer"] = round(peer / ours["jedi_ng2"], 3)
        if "jedi_ng4" in ours:
            s["ng4_over_ng2"] = round(ours["jedi_ng4"] / ours["jedi_ng2"], 3)
    if "jedi_ng2" in targets_only:
        s["ng2_targets_only_meets_8ms"] = targets_only["jedi_ng2"] <= TARGET_MS["jedi_ng2"]
    if "blipd" in ours:
        s["blipd_meets_4.5ms"] = ours["blipd"] <= TARGET_MS["blipd"]
    prec = [r for r in rows if r.get("rel_err") is not None]
    if prec:
        s["rel_err_fp16_vs_fp32"] = prec[-1]["rel_err"]
    return s


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# JeDi step levers — {env.get('device')} — {result['date']}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"diffusers {env.get('diffusers')}", "",
             "| workload | entry | attention | ms | compile s | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["entry"] == "done":
            continue
        ms = f"{r['ms']:.3f}" if r.get("ms") else ""
        note = (r.get("error") or "")[:90]
        if r.get("rel_err") is not None:
            note = f"rel err {r['rel_err']:.2e} (target <= 1e-2)"
        elif r.get("config", {}).get("targets_only") and not note:
            note = "targets' eps only (the sampler's step)"
        lines.append(f"| {r['workload']} | {r['entry']} | {r.get('config', {}).get('attn', '')} | {ms} | "
                     f"{r.get('compile_s', '')} | {note} |")
    lines += ["", "Summary: `" + json.dumps(result.get("summary", {})) + "`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="result JSON (default benchmarks/results/<card>-<date>-step.json); .md beside it")
    ap.add_argument("--quick", action="store_true", help="no torch.compile entries (ours and diffusers)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; compiles that would not fit "
                                                                  "are skipped")
    ap.add_argument("--rep-ms", type=int, default=300, help="do_bench measuring time per entry")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a rehearsal)")
    ap.add_argument("--tiny", action="store_true", help="UNetConfig.tiny-sized models (rehearsal)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: CPU rehearsal)")
    ap.add_argument("--compile-est", type=float, default=table6.COMPILE_EST_S, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[step_levers] no CUDA device: nothing to time (`--device cpu --tiny --compile-backend eager` rehearses "
              "this script)")
        return
    if not args.out:
        args.out = table6.default_results_path("step")
    Run(args).run()


if __name__ == "__main__":
    main()
