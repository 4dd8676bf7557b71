"""Table 6 of the JeDi paper: inference time of one diffusion step, reproduced with our code.

    python benchmarks/table6.py --out OUT.json [--quick] [--budget-s 240] [--jobs 4]  # GPU: OUT.json, .png, .md
    python benchmarks/table6.py --flops                                      # per-step FLOP counts (CPU, meta tensors)
    python benchmarks/table6.py --plot OUT.json                              # redraw OUT.png / OUT.md from a JSON
    python benchmarks/table6.py --merge A.json B.json --out OUT.json         # one table from --workloads subsets

The paper (one A100) reports BLIP-Diffusion 0.0492 s, ELITE 0.0719 s, JeDi 0.0564 s per step. Each method's per-step
workload is defined from its architecture, all on the SD v1 UNet at 512 px (64x64 latents), fp16, classifier-free
guidance, one prompt (see benchmarks/README.md, "Table 6"):

* ``blipd``    BLIP-Diffusion-like: plain SD v1.5 UNet (4-ch input), CFG -> UNet batch 2, 77 context tokens (the
  subject embedding rides in the text tokens, so the UNet costs what SD costs).
* ``elite``    ELITE-like: SD v1.4 UNet whose every cross-attention also attends to 256 image-patch tokens of width
  1024 through its own key/value projections (ELITE's local mapping; ``UNetConfig.extra_context_dim``), CFG -> 2.
* ``jedi_ng2`` JeDi, set size 2 (one reference): 9-ch input, joint self-attention, guidance "joint" (2 branches)
  -> UNet batch 4.   ``jedi_ng4``: set size 4 (three references) -> batch 8.
* ``jedi_ng2_1b`` the same set of 2 in ONE UNet branch -> batch 2: the workload whose FLOP ratio to blipd (1.152)
  matches the paper's JeDi/BLIP-Diffusion time ratio (1.146).

Our UNet (``jedi.JeDiUNet``; the two peers are configurations of it) is timed in every execution mode we support:
eager, CUDA graph (``jedi.CUDAGraphRunner``), ``torch.compile`` (default mode; compile time recorded) and compile +
CUDA graph; with ``--kernels`` also CUDA graphs with the self-attention forced to our Triton / CUDA kernels.
diffusers' ``UNet2DConditionModel`` runs the same workloads with the same weights (ELITE-like via an attention
processor with extra key/value projections, JeDi via a joint-attention processor and a 9-ch conv_in): eager (NCHW, as
a diffusers user starts) and, in full mode, compiled the way diffusers' docs advise (channels-last weights and inputs,
``torch.compile``) and that compiled step in a CUDA graph (``GraphedStep``). Times are medians of CUDA-event timings
(``common.gpu_time_ms``: triton's do_bench).

Robustness: each workload runs in its own worker process (a CUDA error or a hung compile costs that workload only, and
``--budget-s`` bounds the whole run: compile entries that would not fit are skipped and say so); every entry is
measured in try/except and an error is recorded as a string; the JSON is rewritten after every workload (wave).

``--jobs N``: N workloads' workers run at once. They build, compile and capture side by side (the compiles are
CPU-bound and take most of a full run: ~60 s per UNet per implementation), wait at a barrier, then measure one at a
time under a file lock while the others idle (``measure_gate``). compile_s is then a time under contention; a row
measured while another worker was still preparing (the barrier timed out) says so.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_time_ms, env_info, gpu_time_ms  # noqa: E402

from jedi import CUDAGraphRunner, JeDiUNet, UNetConfig, to_diffusers_state_dict  # noqa: E402
from jedi.testing import randomize_weights_

PAPER_A100_S = {"blipd": 0.0492, "elite": 0.0719, "jedi_ng2": 0.0564}  # JeDi paper, Table 6 (one A100)
OUR_MODES = ("eager", "cuda_graph", "compile", "compile+cuda_graph")
KERNEL_MODES = ("cuda_graph/attn=triton", "cuda_graph/attn=cuda")  # --kernels: our attention kernels forced
DIFFUSERS_MODES = ("eager", "compile", "compile+cuda_graph")
COMPILE_EST_S = 90.0  # first guess of one cold torch.compile of the SD UNet on an H100 (updated once measured)


@dataclass(frozen=True)
class Workload:
    """One method's per-step UNet call.

    Attributes:
        name, label: short id and the paper's method name.
        in_channels: 4 (plain SD) or 9 (JeDi: x_t, masked x0, mask).
        set_size: G (1 = no joint attention).
        batch: N, images per UNet call (CFG branches x sets x G).
        extra_tokens, extra_dim: ELITE-like local tokens per image and their width (0/None: none).
        paper_s: the paper's A100 seconds per step (None: not in the paper).
    """

    name: str
    label: str
    in_channels: int
    set_size: int
    batch: int
    extra_tokens: int = 0
    extra_dim: int | None = None
    paper_s: float | None = None

    @property
    def paper_ratio(self) -> float | None:
        return None if self.paper_s is None else round(self.paper_s / PAPER_A100_S["blipd"], 3)

    def config(self, tiny: bool = False) -> UNetConfig:
        """SD v1 (or, for CPU smoke tests, a 2-level ``UNetConfig.tiny``: every block type, attention in the top
        level and the middle block) with this workload's input channels and extra context."""
        if tiny:
            extra = TINY_EXTRA_DIM if self.extra_dim else None
            return UNetConfig.tiny(in_channels=self.in_channels, extra_context_dim=extra, channel_mult=(1, 2),
                                   attention_resolutions=(1,))
        return UNetConfig.sd_v1(in_channels=self.in_channels, extra_context_dim=self.extra_dim)


WORKLOADS = {
    w.name: w for w in (
        Workload("blipd", "BLIP-Diffusion-like", 4, 1, 2, paper_s=PAPER_A100_S["blipd"]),
        Workload("elite", "ELITE-like", 4, 1, 2, extra_tokens=256, extra_dim=1024, paper_s=PAPER_A100_S["elite"]),
        Workload("jedi_ng2", "JeDi, set size 2", 9, 2, 4, paper_s=PAPER_A100_S["jedi_ng2"]),
        # one set of 2 in a single UNet branch: the only definition whose FLOP ratio to blipd (1.152) matches the
        # paper's JeDi time ratio (1.146); the paper's timing most likely ran one branch (see benchmarks/README.md)
        Workload("jedi_ng2_1b", "JeDi, set size 2, one branch", 9, 2, 2, paper_s=PAPER_A100_S["jedi_ng2"]),
        Workload("jedi_ng4", "JeDi, set size 4", 9, 4, 8),
    )
}
QUICK_WORKLOADS = ("blipd", "elite", "jedi_ng2", "jedi_ng2_1b")
SD_HW, SD_CONTEXT = 64, 77  # 512 px latents, CLIP tokens
TINY_HW, TINY_CONTEXT, TINY_EXTRA_TOKENS, TINY_EXTRA_DIM = 8, 7, 5, 24


# ---- models and inputs --------------------------------------------------------------------------------------------
def make_inputs(w: Workload, cfg: UNetConfig, device, dtype, *, tiny: bool = False, seed: int = 0) -> dict:
    """Keyword inputs of our UNet for one step of workload ``w`` (set_size included)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hw, m = (TINY_HW, TINY_CONTEXT) if tiny else (SD_HW, SD_CONTEXT)
    N, C = w.batch, cfg.out_channels

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    inp = dict(x_t=randn(N, C, hw, hw), timesteps=torch.full((N,), 500, device=device),
               context=randn(N, m, cfg.context_dim), set_size=w.set_size)
    if w.in_channels != C:  # JeDi: per set G-1 references (mask 0) then one target (mask 1), branch-major
        inp["x0"] = randn(N, C, hw, hw)
        inp["ng_mask"] = torch.tensor([False] * (w.set_size - 1) + [True], device=device).repeat(N // w.set_size)
    if w.extra_dim:
        t = TINY_EXTRA_TOKENS if tiny else w.extra_tokens
        inp["extra_context"] = randn(N, t, cfg.extra_context_dim)
    return inp


def build_ours(w: Workload, device="cuda", dtype=torch.float16, *, tiny: bool = False, seed: int = 0):
    """(JeDiUNet of workload ``w`` with random weights, eval, on device/dtype; its step inputs)."""
    cfg = w.config(tiny)
    with torch.device("meta"):
        unet = JeDiUNet(cfg)
    unet = randomize_weights_(unet.to_empty(device=device), seed).to(dtype).eval()
    return unet, make_inputs(w, cfg, device, dtype, tiny=tiny, seed=seed)


class SelfAttnProcessor:
    """attn1 of the ELITE-like diffusers model: diffusers' AttnProcessor2_0, accepting (and ignoring) the
    ``extra_context`` cross_attention_kwarg that the attn2 processors use (diffusers warns about unknown kwargs)."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 extra_context=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class EliteAttnProcessor:
    """attn2 with ELITE-like local mapping: text keys/values and the extra tokens' own (``attn.to_k_extra``,
    ``attn.to_v_extra``) concatenated, one softmax; the maths of ``jedi.unet.CrossAttention`` with extra context.
    (N, L, C), context (N, M, C_ctx), extra_context (N, T, C_extra) -> (N, L, C)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 extra_context=None):
        N, L, _ = hidden_states.shape
        H = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (N, M, H*D)
        if extra_context is not None:
            k = torch.cat([k, attn.to_k_extra(extra_context)], dim=1)  # (N, M + T, H*D)
            v = torch.cat([v, attn.to_v_extra(extra_context)], dim=1)
        D = q.shape[-1] // H
        q, k, v = (t.view(N, -1, H, D).transpose(1, 2) for t in (q, k, v))  # (N, H, *, D)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, H * D)
        return attn.to_out[1](attn.to_out[0](o))


class JointAttnProcessor:
    """attn1 of the JeDi diffusers model: joint SDPA over each set, (B*G, L, C) -> (B, G*L, C) -> (B*G, L, C)."""

    def __init__(self, set_size: int):
        self.set_size = set_size

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        N, L, C = hidden_states.shape
        G, H = self.set_size, attn.heads
        B = N // G
        x = hidden_states.reshape(B, G * L, C)  # (N, L, C) -> (B, G*L, C)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        D = q.shape[-1] // H
        q, k, v = (t.view(B, G * L, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, G*L, D)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, G * L, H * D)
        return attn.to_out[1](attn.to_out[0](o)).reshape(N, L, C)  # (B, G*L, C) -> (N, L, C)


def build_diffusers(w: Workload, ours: JeDiUNet, inp: dict):
    """diffusers UNet2DConditionModel equivalent of workload ``w`` with ``ours``' weights, and its step function
    ``step(model=dm, inp=inp) -> eps`` (by default on the same inputs; JeDi's 9-ch input is built with torch ops inside
    the step)."""
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0

    from jedi.pipeline import unet_config_to_diffusers

    cfg = ours.config
    p = next(ours.parameters())
    with torch.device("meta"):
        dm = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg))
        if cfg.extra_context_dim:
            for name, m in dm.named_modules():
                if name.endswith("attn2"):
                    inner = m.to_k.out_features
                    m.to_k_extra = nn.Linear(cfg.extra_context_dim, inner, bias=False)
                    m.to_v_extra = nn.Linear(cfg.extra_context_dim, inner, bias=False)
    # nn.Module.to: ModelMixin.to(dtype) warns about fp32-kept modules (there are none in this UNet)
    dm = nn.Module.to(dm.to_empty(device=p.device), p.dtype).eval()
    dm.load_state_dict(to_diffusers_state_dict(ours, marker=False), strict=True)
    procs = {}
    for name in dm.attn_processors:
        if w.set_size > 1 and name.endswith("attn1.processor"):
            procs[name] = JointAttnProcessor(w.set_size)
        elif cfg.extra_context_dim:
            procs[name] = EliteAttnProcessor() if name.endswith("attn2.processor") else SelfAttnProcessor()
        else:
            procs[name] = AttnProcessor2_0()
    dm.set_attn_processor(procs)
    def step(model=dm, inp=inp):
        x_t, t, ctx = inp["x_t"], inp["timesteps"], inp["context"]
        kw = {"cross_attention_kwargs": {"extra_context": inp["extra_context"]}} if "extra_context" in inp else {}
        x = x_t
        if "x0" in inp:
            N, _, h, wd = x_t.shape
            m = inp["ng_mask"].to(x_t.dtype).view(N, 1, 1, 1)
            x = torch.cat([x_t, inp["x0"] * (1 - m), m.expand(N, 1, h, wd)], dim=1)  # (N, 2C+1, h, w)
        return model(x, t, ctx, return_dict=False, **kw)[0]

    return dm, step


# ---- FLOPs ----------------------------------------------------------------------------------------------------------
def count_flops(w: Workload) -> dict:
    """FLOPs of one UNet step of ``w`` (SD v1, 64x64), counted by ``torch.utils.flop_counter`` on meta tensors
    (multiply-add = 2 FLOPs): convolutions, linears (q/k/v/out projections, FF, time embedding, ResBlock emb
    projections) and attention matmuls (QK^T and PV; self-attention run as torch SDPA's math, which the counter
    sees as bmm). Norms, activations and softmax are not counted (< 1% of the total)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = w.config()
    if w.set_size > 1:
        cfg.attn_backend = "torch"  # SDPA on the (B, G*L) view: same matmul FLOPs as our kernels
    with torch.device("meta"):
        unet = JeDiUNet(cfg).half()
        inp = make_inputs(w, cfg, "cpu", torch.float16)
        inp = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(**inp)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    conv = per_op.pop("aten.convolution", 0)
    linear = per_op.pop("aten.addmm", 0) + per_op.pop("aten.mm", 0)
    attention = per_op.pop("aten.bmm", 0) + sum(v for k, v in list(per_op.items()) if "attention" in k)
    other = sum(v for k, v in per_op.items() if "attention" not in k)
    return {"conv": conv, "linear": linear, "attention": attention, "other": other,
            "total": conv + linear + attention + other}


# ---- timing ---------------------------------------------------------------------------------------------------------
def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _device_info() -> dict:
    info = env_info("cuda" if torch.cuda.is_available() else "cpu")
    info["python"] = platform.python_version()
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        try:
            import jedi_kernels as jk

            info["jedi_backends"] = {k: v for k, v in jk.available_backends().items() if k != "reasons"}
        except Exception as e:  # never lose a run to a report detail
            info["jedi_backends"] = repr(e)
    return info


def plan(workload: str, *, quick: bool, kernels: bool, diffusers_compile: bool) -> list[tuple[str, str]]:
    """(impl, mode) entries of one workload, in run order (cheap ones first, compiles last)."""
    entries = [("ours", "eager"), ("ours", "cuda_graph"), ("diffusers", "eager")]
    if kernels and WORKLOADS[workload].set_size > 1:
        entries += [("ours", m) for m in KERNEL_MODES]
    entries += [("ours", "compile"), ("ours", "compile+cuda_graph")]
    if diffusers_compile and not quick:
        entries += [("diffusers", "compile"), ("diffusers", "compile+cuda_graph")]
    return entries


def inputs_in_format(inp: dict, fmt: torch.memory_format) -> dict:
    """The step inputs with every 4-D tensor (latents, x0) in memory format ``fmt``; other values as they are."""
    return {k: (v.contiguous(memory_format=fmt) if isinstance(v, torch.Tensor) and v.dim() == 4 else v)
            for k, v in inp.items()}


class Session:
    """One workload's models and inputs, and the step function of each (impl, mode).

    Args:
        w: the workload. device: "cuda" (fp16) or "cpu" (fp32; CPU rehearsal). tiny: ``UNetConfig.tiny`` sizes.
        compile_backend: torch.compile backend ("inductor"; "eager" for quick CPU rehearsals).

    ``prepare(impl, mode) -> (step, info)`` builds what the mode needs (a CUDA graph, a compiled module, the diffusers
    model on first use) and returns a no-argument step function plus facts for the record (compile_s, attn_backend,
    the ours-vs-diffusers output check). Call it under ``torch.no_grad()``. ``release()`` drops CUDA graphs (their
    memory pools); ``close()`` frees everything and resets dynamo.
    """

    def __init__(self, w: Workload, device="cuda", *, tiny: bool = False, compile_backend: str = "inductor",
                 plain: bool = False):
        self.w, self.device, self.compile_backend = w, torch.device(device), compile_backend
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.unet, self.inp = build_ours(w, device, self.dtype, tiny=tiny)
        # ours runs as JeDiPipeline.optimize() sets it up (channels-last, fused GroupNorm/GEGLU/add+LayerNorm, folded
        # biases, fused q/k/v and context k/v) unless ``plain``; diffusers gets the NCHW inputs, as a diffusers user
        # runs it
        self.inp_ours = self.inp
        if not plain:
            self.unet.to(memory_format=torch.channels_last)
            self.unet.set_fused_ops(True)
            self.unet.set_fuse_qkv(True)
            self.unet.set_fuse_context_kv(True)
            self.inp_ours = inputs_in_format(self.inp, torch.channels_last)
        self.compiled = self.dm = self.dm_step = self.dm_compiled = self.check = None
        self.runners: list = []

    def prepare(self, impl: str, mode: str):
        unet, inp = self.unet, self.inp_ours
        unet.set_attn_backend("auto")
        if impl == "ours" and mode == "eager":
            return (lambda: unet(**inp)), {"attn_backend": "auto"}
        if impl == "ours" and mode.startswith("cuda_graph"):
            backend = mode.split("attn=")[1] if "attn=" in mode else "auto"
            unet.set_attn_backend(backend)
            runner = CUDAGraphRunner(unet, inp)
            self.runners.append(runner)
            return (lambda: runner(**inp)), {"attn_backend": backend}
        if impl == "ours" and mode == "compile":
            t0 = time.perf_counter()
            compiled = torch.compile(unet, backend=self.compile_backend)
            compiled(**inp)
            self._sync()
            self.compiled = compiled
            return (lambda: compiled(**inp)), {"compile_s": round(time.perf_counter() - t0, 1),
                                               "compile_backend": self.compile_backend}
        if impl == "ours" and mode == "compile+cuda_graph":
            info = {}
            if self.compiled is None:  # normally the "compile" entry ran just before
                _, info = self.prepare("ours", "compile")
            runner = CUDAGraphRunner(self.compiled, inp)
            self.runners.append(runner)
            return (lambda: runner(**inp)), info
        if impl == "diffusers" and mode in DIFFUSERS_MODES:
            if self.dm is None:
                self.dm, self.dm_step = build_diffusers(self.w, unet, self.inp)
                ref, out = self.dm_step().float(), unet(**inp).float()
                self.check = {"max_abs_diff_vs_ours": float((out - ref).abs().max()),
                              "max_abs_ours": float(out.abs().max())}
            step = self.dm_step
            if mode == "eager":
                return step, dict(self.check)
            if mode == "compile+cuda_graph":
                info = {}
                if self.dm_compiled is None:  # normally the "compile" entry ran just before
                    _, info = self.prepare("diffusers", "compile")
                compiled, inp_cl = self.dm_compiled
                graph = GraphedStep(lambda: step(compiled, inp_cl))
                self.runners.append(graph)
                return graph, info
            # compiled as diffusers' docs advise: channels-last weights and inputs (on a copy: the eager entry keeps
            # the NCHW model a diffusers user starts from)
            t0 = time.perf_counter()
            dm_cl = copy.deepcopy(self.dm).to(memory_format=torch.channels_last)
            inp_cl = inputs_in_format(self.inp, torch.channels_last)
            compiled = torch.compile(dm_cl, backend=self.compile_backend)
            step(compiled, inp_cl)
            self._sync()
            self.dm_compiled = (compiled, inp_cl)
            return (lambda: step(compiled, inp_cl)), {"compile_s": round(time.perf_counter() - t0, 1),
                                                      "compile_backend": self.compile_backend,
                                                      "memory_format": "channels_last", **self.check}
        raise ValueError(f"unknown entry {impl!r} {mode!r}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def release(self) -> None:
        self.runners.clear()
        self.unet.set_attn_backend("auto")
        _free()

    def close(self) -> None:
        self.release()
        self.unet = self.inp = self.compiled = self.dm = self.dm_step = self.dm_compiled = None
        torch._dynamo.reset()
        _free()


class GraphedStep:
    """``fn()`` (no inputs: it reads fixed tensors) captured into a CUDA graph after 3 warm-up calls on a side stream;
    calling replays it and returns the static output. For diffusers' compiled step, the counterpart of
    :class:`jedi.CUDAGraphRunner` (which also copies new inputs in: a few KB, not measurable per step)."""

    def __init__(self, fn, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs CUDA")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def time_step(step, device, rep_ms: int = 500) -> float:
    """Median ms of ``step()``: CUDA events (do_bench) on a GPU, perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        return gpu_time_ms(step, warmup=100, rep_ms=rep_ms)
    return cpu_time_ms(step, reps=2)


def run_workload(name: str, entries, *, deadline: float | None = None, rep_ms: int = 500, emit=None,
                 device="cuda", tiny: bool = False, compile_backend: str = "inductor",
                 compile_est_s: float = COMPILE_EST_S, plain: bool = False, gate=None) -> list[dict]:
    """Measure the (impl, mode) ``entries`` of one workload; one dict per entry, errors recorded as strings.

    ``deadline`` (time.time() seconds): a compile entry that would not finish by then is skipped (estimated from the
    last measured compile, else ``compile_est_s``). ``emit(row)`` is called after each entry (incremental output).
    device/tiny/compile_backend/plain: see :class:`Session` (the defaults are the real measurement).
    ``gate``: None (each entry is prepared and measured in turn; CUDA graphs are freed after their entry), or a
    context-manager factory: every entry is prepared first (compiles, graph captures; ``deadline`` then bounds this
    phase) and all are measured inside ``with gate() as extra:`` (``extra``, a dict, is added to each row). The
    parallel mode (``--jobs``) passes a barrier + file lock, so workloads compile side by side but only one measures
    at a time while the others wait idle.
    """
    w = WORKLOADS[name]
    cuda = torch.device(device).type == "cuda"
    rows: list[dict] = []
    est_compile = compile_est_s

    def row_for(impl, mode, **extra):
        row = dict(workload=name, impl=impl, mode=mode, unet_batch=w.batch, set_size=w.set_size, ms=None, error=None)
        row.update(extra)
        rows.append(row)
        if emit:
            emit(row)
        return row

    try:
        session = Session(w, device, tiny=tiny, compile_backend=compile_backend, plain=plain)
    except Exception as e:
        for impl, mode in entries:
            row_for(impl, mode, error=f"building the model failed: {type(e).__name__}: {e}"[:2000])
        return rows

    def prepare(impl, mode):
        """(step or None, info): the entry built (or why not) and what it cost."""
        nonlocal est_compile
        if mode == "compile" and deadline is not None and time.time() + est_compile > deadline:
            return None, {"error": f"skipped: time budget (a compile takes ~{est_compile:.0f} s, "
                                   f"{max(0.0, deadline - time.time()):.0f} s left)"}
        compiled = session.compiled if impl == "ours" else session.dm_compiled
        if mode == "compile+cuda_graph" and compiled is None:
            return None, {"error": "skipped: the compile entry did not succeed"}
        info: dict = {}
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.no_grad():
                step, info = session.prepare(impl, mode)
            info["prepare_s"] = round(time.perf_counter() - t0, 1)
            if cuda:
                info["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as e:
            step = None
            info.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
        if info.get("compile_s"):
            est_compile = info["compile_s"] * 1.2
        return step, info

    def measure(step, info):
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.no_grad():
                info["ms"] = round(time_step(step, device, rep_ms), 3)
            info["measure_s"] = round(time.perf_counter() - t0, 1)
            if cuda:
                peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if gate is None:
                    info["peak_mem_gb"] = max(peak, info.get("peak_mem_gb", 0.0))
                else:  # every entry's graphs and models are alive: the process's, not this entry's
                    info["peak_mem_gb_process"] = peak
        except Exception as e:
            info.update(error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])

    if gate is None:
        for impl, mode in entries:
            step, info = prepare(impl, mode)
            if step is not None:
                measure(step, info)
            step = None
            if "cuda_graph" in mode:
                session.release()
            row_for(impl, mode, **info)
    else:
        prepared = [(impl, mode, *prepare(impl, mode)) for impl, mode in entries]
        session.unet.set_attn_backend("auto")  # what the eager entry runs (a forced-kernel graph set it otherwise)
        with gate() as extra:
            for impl, mode, step, info in prepared:
                if step is not None:
                    measure(step, info)
                    info.update(extra)
                row_for(impl, mode, **info)
        prepared = None
    session.close()
    return rows


# ---- the run ---------------------------------------------------------------------------------------------------
def _card_slug(device: str) -> str:
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")).lower()


def default_results_path(kind: str) -> str:
    """benchmarks/results/<card>-<date>-<kind>.json for the current CUDA device."""
    slug = _card_slug(torch.cuda.get_device_name())
    return str(Path(__file__).resolve().parent / "results" / f"{slug}-{datetime.date.today()}-{kind}.json")


def _add_ratios(result: dict) -> None:
    base = {(r["impl"], r["mode"]): r["ms"] for r in result["results"] if r["workload"] == "blipd" and r["ms"]}
    for r in result["results"]:
        b = base.get((r["impl"], r["mode"]))
        r["ratio_to_blipd"] = round(r["ms"] / b, 3) if (b and r["ms"]) else None
        r["paper_ratio"] = WORKLOADS[r["workload"]].paper_ratio
        gf = result["workloads"][r["workload"]].get("tflop")
        r["tflops_per_s"] = round(gf / (r["ms"] * 1e-3), 1) if (gf and r["ms"]) else None


MEASURE_EST_S = 1.2  # one entry's do_bench (100 ms warm-up + 500 ms; 0.6-0.8 s on the H100) with margin


@contextlib.contextmanager
def measure_gate(gate_dir: str, n_workers: int, barrier_deadline: float, name: str, poll_s: float = 0.2):
    """The parallel mode's measuring turn: mark this worker ready, wait until all ``n_workers`` are ready (or exited,
    which the parent marks) or ``barrier_deadline`` passes, then hold an exclusive file lock while measuring, so one
    workload measures at a time and nothing else compiles or launches meanwhile. Yields the dict added to each row:
    ``measured_while_others_prepared`` when the barrier timed out and another worker was still preparing."""
    d = Path(gate_dir)
    (d / f"{name}.ready").touch()

    def done() -> int:  # workers ready or gone (one that measured and exited has both marks: count it once)
        return len({p.stem for p in d.iterdir() if p.suffix in (".ready", ".exited")})

    while done() < n_workers and time.time() < barrier_deadline:
        time.sleep(poll_s)
    with open(d / "measure.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield {"measured_while_others_prepared": True} if done() < n_workers else {}
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _worker_main(args) -> None:
    """One workload in this process; rows as JSON lines on args.result_file."""
    entries = [tuple(e.split(":", 1)) for e in args.entries.split(",")]

    def emit(row):
        with open(args.result_file, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    gate = None
    if args.gate_dir:
        gate = functools.partial(measure_gate, args.gate_dir, args.gate_n, args.gate_barrier, args.worker)
    run_workload(args.worker, entries, deadline=args.deadline, rep_ms=args.rep_ms, emit=emit,
                 compile_est_s=args.compile_est, gate=gate, **_session_kw(args))


def _session_kw(args) -> dict:
    return dict(device=args.device, tiny=args.tiny, compile_backend=args.compile_backend, plain=args.plain)


def _worker_cmd(name, entries, deadline, args, compile_est_s, result_file) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", name, "--entries", ",".join(f"{i}:{m}" for i, m in entries),
           "--result-file", result_file, "--deadline", str(deadline), "--rep-ms", str(args.rep_ms),
           "--device", args.device, "--compile-backend", args.compile_backend, "--compile-est", str(compile_est_s)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--plain"] if args.plain else []
    return cmd


def _collect_rows(name, entries, path, note) -> list[dict]:
    """The rows a worker wrote, plus one per entry it did not reach (with ``note``, why)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    os.unlink(path)
    done = {(r["impl"], r["mode"]) for r in rows}
    w = WORKLOADS[name]
    for impl, mode in entries:
        if (impl, mode) not in done:
            rows.append(dict(workload=name, impl=impl, mode=mode, unet_batch=w.batch, set_size=w.set_size, ms=None,
                             error=note or "not run"))
    return rows


def _tmp_jsonl() -> str:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        return f.name


def _run_isolated(name, entries, deadline, args, compile_est_s) -> list[dict]:
    """run_workload in a worker process (a CUDA error or a hung compile costs this workload only)."""
    path = _tmp_jsonl()
    note = None
    try:
        p = subprocess.run(_worker_cmd(name, entries, deadline, args, compile_est_s, path), capture_output=True,
                           text=True, timeout=max(30.0, deadline - time.time() + 30))
        if p.returncode:
            note = f"worker exited rc={p.returncode}: {p.stderr[-1500:]}"
    except subprocess.TimeoutExpired:
        note = "worker killed: past the time budget"
    return _collect_rows(name, entries, path, note)


def _run_parallel(plans: dict, deadline: float, args, compile_est_s: float) -> dict[str, list[dict]]:
    """Every workload of ``plans`` (name -> entries) in its own worker, all at once: they build, compile and capture
    side by side (CPU-bound: the compiles dominate), then measure one at a time (:func:`measure_gate`). The prepare
    phase ends early enough to leave ``MEASURE_EST_S`` per entry before ``deadline``: the barrier gives up waiting
    then, and a worker starts no compile that would not end before its own measuring must begin (a compile may run past
    the barrier: the rows measured meanwhile say so)."""
    gate_dir = tempfile.mkdtemp(prefix="table6_gate_")
    reserve = MEASURE_EST_S * sum(len(e) for e in plans.values()) + 10.0
    barrier = max(time.time() + 30.0, deadline - reserve)
    procs = {}
    for name, entries in plans.items():
        path = _tmp_jsonl()
        err = tempfile.TemporaryFile("w+")
        own = deadline - MEASURE_EST_S * len(entries) - 10.0  # the last moment a compile may end
        cmd = _worker_cmd(name, entries, max(barrier, own), args, compile_est_s, path)
        cmd += ["--gate-dir", gate_dir, "--gate-n", str(len(plans)), "--gate-barrier", str(barrier)]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True), path, err)
    notes: dict[str, str | None] = {}
    while len(notes) < len(procs):
        for name, (p, _, err) in procs.items():
            if name in notes:
                continue
            if p.poll() is None and time.time() > deadline + 30:
                p.kill()
                p.wait()
                notes[name] = "worker killed: past the time budget"
            elif p.poll() is not None:
                err.seek(0)
                notes[name] = f"worker exited rc={p.returncode}: {err.read()[-1500:]}" if p.returncode else None
            if name in notes:
                Path(gate_dir, f"{name}.exited").touch()  # a worker that died before its turn must not hold the rest
        time.sleep(0.5)
    out = {}
    for name, (_, path, err) in procs.items():
        err.close()
        out[name] = _collect_rows(name, plans[name], path, notes[name])
    return out


def run(args) -> dict:
    t_start = time.time()
    names = args.workloads.split(",") if args.workloads else list(QUICK_WORKLOADS if args.quick else WORKLOADS)
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown workload {n!r}: choose from {sorted(WORKLOADS)}")
    budget = args.budget_s if args.budget_s is not None else (300 if args.quick else 900)
    deadline = t_start + budget
    result = {
        "table": "JeDi Table 6: one diffusion step, SD v1 UNet, 512 px (64x64 latents), fp16, CFG, one prompt",
        "date": datetime.date.today().isoformat(),
        "env": _device_info(),
        "quick": args.quick,
        "ours_config": "plain (NCHW, unfused)" if args.plain else "JeDiPipeline.optimize(): channels-last, fused "
                                                                 "GroupNorm/GEGLU/add+LayerNorm, fused q/k/v",
        "argv": sys.argv[1:],
        "budget_s": budget,
        "paper": {"device": "A100", "seconds": PAPER_A100_S,
                  "ratios": {k: WORKLOADS[k].paper_ratio for k in PAPER_A100_S}},
        "workloads": {},
        "results": [],
    }
    if args.device != "cuda" or args.tiny:
        result["rehearsal"] = {"device": args.device, "tiny": args.tiny, "compile_backend": args.compile_backend}
    for n in names:
        w = WORKLOADS[n]
        info = {k: v for k, v in asdict(w).items() if k != "name"}
        try:
            fl = count_flops(w)  # of the real SD workload, also in a tiny rehearsal
            info.update(tflop=round(fl["total"] / 1e12, 4), flops=fl)
        except Exception as e:
            info["flops_error"] = repr(e)
        result["workloads"][n] = info
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = 1 if args.no_isolate else max(1, args.jobs)
    if jobs > 1:
        result["parallel"] = {"jobs": jobs, "how": "workloads build, compile and capture side by side in worker "
                              "processes, then measure one at a time (the others idle); compile_s is under that "
                              "contention"}
    for wave in [names[i:i + jobs] for i in range(0, len(names), jobs)]:
        plans = {n: plan(n, quick=args.quick, kernels=args.kernels, diffusers_compile=not args.no_diffusers_compile)
                 for n in wave}
        print(f"[table6] {', '.join(wave)}: {sum(map(len, plans.values()))} entries, "
              f"{deadline - time.time():.0f} s of budget left", flush=True)
        compiled = [r["compile_s"] for r in result["results"] if r.get("compile_s")]
        est = 1.2 * compiled[-1] if compiled else COMPILE_EST_S  # a cold compile of the last workload, with margin
        if args.no_isolate:
            rows_by = {n: run_workload(n, plans[n], deadline=deadline, rep_ms=args.rep_ms, compile_est_s=est,
                                       **_session_kw(args)) for n in wave}
        elif jobs == 1:
            rows_by = {n: _run_isolated(n, plans[n], deadline, args, est) for n in wave}
        else:
            rows_by = _run_parallel(plans, deadline, args, est)
        for n in wave:
            print(f"[table6] {n}", flush=True)
            for r in rows_by[n]:
                res = f"{r['ms']:8.2f} ms" if r["ms"] else f"-- {r['error']}"[:160]
                print(f"  {r['impl']:9s} {r['mode']:24s} {res}", flush=True)
            result["results"] += rows_by[n]
        result["total_s"] = round(time.time() - t_start, 1)
        _add_ratios(result)
        out.write_text(json.dumps(result, indent=1, default=str))
    write_report(result, out)
    return result


# ---- report ---------------------------------------------------------------------------------------------------------
def _columns(result) -> list[tuple[str, str]]:
    """(impl, mode) pairs present, in a fixed order: ours (modes, then forced-kernel modes), then diffusers."""
    order = [("ours", m) for m in OUR_MODES + KERNEL_MODES] + [("diffusers", m) for m in DIFFUSERS_MODES]
    present = {(r["impl"], r["mode"]) for r in result["results"]}
    return [k for k in order if k in present] + sorted(present - set(order))


def markdown(result: dict) -> str:
    """README-ready tables: ms per step and ratios to blipd (same impl and mode), paper A100 numbers alongside."""
    env = result["env"]
    cols = _columns(result)
    ms = {(r["workload"], r["impl"], r["mode"]): r for r in result["results"]}
    head = (f"{env.get('device')} ({env.get('capability', '')}), torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, diffusers {env.get('diffusers')}; "
            f"{result['date']}{', quick mode' if result.get('quick') else ''}; "
            f"ours: {result.get('ours_config', 'plain (NCHW, unfused)')}")
    lines = [f"Measured on {head}.", "",
             "| workload | UNet batch | TFLOP/step | " + " | ".join(f"{i} {m}" for i, m in cols)
             + " | paper A100 |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " | --- |"]
    def cell(r) -> str:
        if r is None:
            return "—"
        if r.get("ms"):
            return f"{r['ms']:.2f}"
        return "skipped" if str(r.get("error")).startswith("skipped") else "failed"

    for n, info in result["workloads"].items():
        paper = f"{info['paper_s'] * 1e3:.1f}" if info.get("paper_s") else "—"
        cells = [cell(ms.get((n, i, m))) for i, m in cols]
        lines.append(f"| {n} | {info['batch']} | {info.get('tflop', '?')} | " + " | ".join(cells) + f" | {paper} |")
    lines += ["", "Ratio to blipd (same implementation and mode):", "",
              "| workload | FLOP ratio | " + " | ".join(f"{i} {m}" for i, m in cols) + " | paper A100 ratio |",
              "| --- | --- | " + " | ".join("---" for _ in cols) + " | --- |"]
    base_tf = result["workloads"].get("blipd", {}).get("tflop")
    for n, info in result["workloads"].items():
        cells = []
        for i, m in cols:
            r = ms.get((n, i, m))
            cells.append(f"{r['ratio_to_blipd']:.3f}" if r and r.get("ratio_to_blipd") else "—")
        fr = f"{info['tflop'] / base_tf:.3f}" if (base_tf and info.get("tflop")) else "—"
        pr = f"{WORKLOADS[n].paper_ratio:.3f}" if WORKLOADS[n].paper_ratio else "—"
        lines.append(f"| {n} | {fr} | " + " | ".join(cells) + f" | {pr} |")
    errs: dict[str, list[str]] = {}
    for r in result["results"]:
        if r.get("error"):
            errs.setdefault(r["error"].splitlines()[0][:200], []).append(f"{r['workload']} {r['impl']} {r['mode']}")
    if errs:
        lines += ["", "Not measured:", ""] + [f"- {', '.join(where)}: {why}" for why, where in errs.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Two panels: ms per step (grouped bars, one per implementation/mode, the paper's A100 bar beside) and the ratio
    to blipd (same implementation/mode) beside the paper's ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[table6] matplotlib missing: no plot")
        return
    names = list(result["workloads"])
    cols = _columns(result)
    rows = {(r["workload"], r["impl"], r["mode"]): r for r in result["results"]}
    blues, oranges = plt.get_cmap("Blues"), plt.get_cmap("Oranges")
    n_ours = max(1, sum(i == "ours" for i, _ in cols))
    n_diff = max(1, len(cols) - n_ours)
    series = []
    for k, (i, m) in enumerate(cols):
        ours = i == "ours"
        shade = 0.35 + 0.6 * ((k if ours else k - n_ours) + 1) / ((n_ours if ours else n_diff) + 1)
        color = blues(shade) if ours else oranges(shade)
        ms = [(rows.get((n, i, m)) or {}).get("ms") or 0.0 for n in names]
        ratio = [(rows.get((n, i, m)) or {}).get("ratio_to_blipd") or 0.0 for n in names]
        series.append((f"{i} {m}", color, ms, ratio))
    series.append(("paper (A100)", "0.6", [(WORKLOADS[n].paper_s or 0.0) * 1e3 for n in names],
                   [WORKLOADS[n].paper_ratio or 0.0 for n in names]))
    fig, axes = plt.subplots(1, 2, figsize=(max(11.0, 3.2 * len(names) + 3), 4.8))
    width = 0.85 / len(series)
    for ax, which, ylabel, fmt in ((axes[0], 2, "ms per diffusion step (median)", "{:.0f}"),
                                   (axes[1], 3, "ratio to blipd (same impl. and mode)", "{:.2f}")):
        for k, s in enumerate(series):
            vals = s[which]
            xs = [j + (k - (len(series) - 1) / 2) * width for j in range(len(names))]
            paper = s[0].startswith("paper")
            ax.bar(xs, vals, width, label=s[0], color=s[1], hatch="//" if paper else None,
                   edgecolor="black" if paper else None, linewidth=0.3)
            for x, v in zip(xs, vals):
                if v:
                    ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=5, rotation=90)
        ax.set_xticks(range(len(names)), [f"{n}\n(UNet batch {result['workloads'][n]['batch']})" for n in names],
                      fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.margins(y=0.12)
    axes[1].axhline(1.0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=6, ncol=2)
    env = result["env"]
    fig.suptitle(f"JeDi Table 6 reproduction, SD v1 UNet 512 px fp16: {env.get('device')}, torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, CUDA {env.get('cuda')} ({result['date']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def merge_results(parts: list[dict]) -> dict:
    """One Table 6 from runs of disjoint workload subsets (``--workloads``; e.g. one per device session, whose time
    does not fit the full run). They must come from the same card and software; the first part's header is kept, a
    workload measured twice keeps its last run, and the ratios to blipd are recomputed across parts."""
    if not parts:
        raise ValueError("nothing to merge")
    keys = ("device", "torch", "triton", "cuda", "cudnn", "diffusers")
    first = parts[0]
    for p in parts[1:]:
        diff = [k for k in keys if p["env"].get(k) != first["env"].get(k)]
        if diff:
            raise ValueError(f"cannot merge runs from different cards or software: {diff} differ "
                             f"({[p['env'].get(k) for k in diff]} vs {[first['env'].get(k) for k in diff]})")
        if p.get("ours_config") != first.get("ours_config"):
            raise ValueError(f"cannot merge runs of different UNet configurations: {p.get('ours_config')!r} vs "
                             f"{first.get('ours_config')!r}")
    merged = dict(first, workloads={}, results=[], merged_from=[p.get("argv") for p in parts],
                  quick=any(p.get("quick") for p in parts), total_s=sum(p.get("total_s") or 0 for p in parts))
    for p in parts:
        names = set(p["workloads"])
        merged["results"] = [r for r in merged["results"] if r["workload"] not in names] + list(p["results"])
        merged["workloads"].update(p["workloads"])
    order = list(WORKLOADS)  # the table's usual row order, whatever order the parts ran in
    merged["workloads"] = dict(sorted(merged["workloads"].items(), key=lambda kv: order.index(kv[0])))
    _add_ratios(merged)
    return merged


def write_report(result: dict, out: Path) -> None:
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    plot(result, out.with_suffix(".png"))
    print(md)


def flops_table() -> str:
    lines = ["| workload | UNet batch | conv | linear | attention | total TFLOP | ratio to blipd |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    counts = {n: count_flops(w) for n, w in WORKLOADS.items()}
    for n, c in counts.items():
        g = {k: c[k] / 1e9 for k in c}
        ratio = c["total"] / counts["blipd"]["total"]
        lines.append(f"| {n} | {WORKLOADS[n].batch} | {g['conv']:.1f} G | {g['linear']:.1f} G | "
                     f"{g['attention']:.1f} G | {c['total'] / 1e12:.3f} | {ratio:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="result JSON (default benchmarks/results/<card>-<date>-table6.json); .png and .md "
                                  "are written beside it")
    ap.add_argument("--quick", action="store_true", help="blipd, elite, jedi_ng2, jedi_ng2_1b; no diffusers compile")
    ap.add_argument("--workloads", help=f"comma list from {sorted(WORKLOADS)}")
    ap.add_argument("--kernels", action="store_true",
                    help="also time CUDA graphs with the self-attention forced to our Triton / CUDA kernels (JeDi)")
    ap.add_argument("--no-diffusers-compile", action="store_true", help="skip torch.compile of diffusers")
    ap.add_argument("--plain", action="store_true", help="our UNet as built (NCHW, unfused ops), not as "
                                                         "JeDiPipeline.optimize() runs it")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget of the whole run (default 300 quick, 900 full): "
                                                   "compile entries that would not fit are skipped")
    ap.add_argument("--rep-ms", type=int, default=500, help="do_bench measuring time per entry")
    ap.add_argument("--no-isolate", action="store_true", help="run workloads in this process (no worker processes)")
    ap.add_argument("--jobs", type=int, default=1, help="workloads prepared (built, compiled, captured) in parallel "
                                                        "worker processes, then measured one at a time")
    ap.add_argument("--flops", action="store_true", help="print the per-step FLOP table and exit (CPU)")
    ap.add_argument("--plot", metavar="JSON", help="redraw the PNG and markdown of a result JSON and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge runs of different --workloads (same card and "
                                                               "software) into --out, with its PNG and markdown")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a rehearsal of the script)")
    ap.add_argument("--tiny", action="store_true", help="UNetConfig.tiny-sized models (rehearsal)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: fast rehearsal)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--entries", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--compile-est", type=float, default=COMPILE_EST_S, help=argparse.SUPPRESS)
    ap.add_argument("--gate-dir", help=argparse.SUPPRESS)
    ap.add_argument("--gate-n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--gate-barrier", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.flops:
        print(flops_table())
        return
    if args.plot:
        p = Path(args.plot)
        write_report(json.loads(p.read_text()), p)
        return
    if args.merge:
        if not args.out:
            ap.error("--merge needs --out")
        merged = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
        out = Path(args.out)
        out.write_text(json.dumps(merged, indent=1, default=str))
        write_report(merged, out)
        return
    if args.worker:
        _worker_main(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[table6] no CUDA device: nothing to time (the CPU smoke test is `pytest benchmarks -k table6`; "
              "`--device cpu --tiny --compile-backend eager` rehearses this script)")
        return
    if not args.out:
        args.out = default_results_path("table6")
    run(args)


if __name__ == "__main__":
    main()
