"""Where the time of one UNet step goes: device time per kernel category under ``torch.profiler``, and the floors.

    python benchmarks/profile_step.py --out OUT.json [--workload jedi_ng2] [--mode eager|cuda_graph|compile]
        [--fused] [--fuse-projections] [--channels-last] [--attn-backend auto] [--steps 5] [--trace T.json]  # GPU
    python benchmarks/profile_step.py --tiny --device cpu --steps 1 --out /tmp/prof.json      # CPU smoke run
    python benchmarks/profile_step.py --floors [--workload jedi_ng2] [--out FLOORS.json]     # analytic estimate

The step is ``benchmarks/table6.py``'s: the workload's UNet (``jedi_ng2``: ``JeDiUNet(UNetConfig.sd_v1())``, UNet
batch 4 = 2 guidance branches x a set of 2; ``jedi_ng4``: batch 8; ``blipd``: plain SD, batch 2), 64x64 latents,
77 x 768 context, random weights (``jedi.testing.randomize_weights_``; timing does not depend on them), built by
``table6.build_ours``. After ``--warmup`` steps, ``--steps`` steps are timed without the profiler (``step_ms``,
synchronized wall time per step, median) and then ``--steps`` steps run under ``torch.profiler``.

What is counted:

* GPU: every device kernel event (``evt.device_type == DeviceType.CUDA``: kernels, memcpy, memset; CUDA-graph replays
  included, their kernels are traced individually), by its duration. ``device_total_ms`` is their sum per step: the
  time the GPU was busy; ``step_ms - device_total_ms`` is launch overhead and idle gaps.
* CPU (``--device cpu``, a rehearsal): every operator event (``aten::*``, ``jedi::*``; not user annotations) by its
  *self* CPU time, so nested ops (``aten::linear`` -> ``aten::addmm``) are not counted twice and each op's own work
  lands in its own category.

Each name goes to one category by :func:`categorize` (attention, gemm, conv, norm, elementwise, other). The JSON
(``--out``) holds env, workload, mode, flags, ``step_ms``, ``device_total_ms`` and per category ``ms_per_step``,
``share`` of the device total and the top 10 kernels ``(name, ms_per_step, calls_per_step)``, and ``gemm_shapes``:
the step's matmuls by shape with their time and fraction of roofline (:func:`gemm_shapes`; eager and compiled
steps, not CUDA-graph replays); ``OUT.md`` has the tables. At full SD size the table also shows each category's
floor from :func:`floors` (an estimate, see below).

``--floors``: an analytic estimate, no timing. FLOPs per category (conv, linear, attention) come from
``table6.count_flops`` (``torch.utils.flop_counter`` on meta tensors, the numbers of ``table6.py --flops``), each
at 724 TFLOP/s (H100 fp16/bf16 dense matmul, measured). Bytes of the memory-bound passes come from forward hooks on a
meta-tensor forward (sizes only): GroupNorm and LayerNorm (one read + one write of the activation), the GEGLU
activation (read the 2F projection, write F), residual and embedding adds, the decoder's skip concatenation and the
nearest upsampling, at 3.0 TB/s; plus two passes eager SD runs that a better implementation avoids (the SiLU after
each GroupNorm, fusable into it; the NCHW <-> token-layout copies around each SpatialTransformer, free channels-last).
Attention and conv/GEMM memory traffic is not counted (compute-bound); nor are the timestep embedding, the input
preparation, softmax and other small terms. It is a floor estimate, not a prediction.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info  # noqa: E402
from table6 import WORKLOADS, build_ours, count_flops, make_inputs  # noqa: E402

from jedi import CUDAGraphRunner, JeDiUNet  # noqa: E402
from jedi.unet import GEGLU, GroupNorm32, ResBlock, SpatialTransformer, TransformerBlock, Upsample  # noqa: E402

CATEGORIES = ("attention", "gemm", "conv", "norm", "elementwise", "other")
PEAK_TFLOPS = 724.0  # H100 SXM, fp16/bf16 dense matmul, measured (benchmarks/README.md)
PEAK_TBPS = 3.0  # H100 SXM copy bandwidth, measured (read + write bytes per second)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MODES = ("eager", "cuda_graph", "compile")
TOP_K = 10

# ---- categories -----------------------------------------------------------------------------------------------------
_INDUCTOR_FUSED = re.compile(r"^triton_(poi|red|per)_")
_NORM = re.compile(r"norm(?!al)|_gn_|rowwisemoments|computefusedparams|welford")
_ATTENTION = ("flash", "fmha", "sdpa", "attention", "attn", "softmax")
_CONV = ("conv", "implicit_gemm", "fprop", "dgrad", "wgrad", "winograd", "im2col", "col2im", "nchwtonhwc",
         "nhwctonchw", "cudnn")
_GEMM = ("gemm", "gemv", "cublas", "cutlass", "xmma", "nvjet", "wgmma", "matmul")
_ELEMENTWISE = ("elementwise", "vectorized", "copy", "memcpy", "memset", "catarray", "geglu", "silu", "gelu",
                "sigmoid", "upsample", "interpolate", "prepare", "fill", "reduce")


def _token(*words: str) -> re.Pattern:
    """``words`` as whole tokens: not preceded or followed by a letter or digit (``_``, ``::``, ``<`` separate)."""
    return re.compile(r"(?<![a-z0-9])(" + "|".join(words) + r")(?![a-z0-9])")


_ATTENTION_TOKENS = _token("bmm", "baddbmm")
_GEMM_TOKENS = _token("mm", "addmm", "linear", "addmv", "mv")
_ELEMENTWISE_TOKENS = _token("add", "add_", "mul", "mul_", "sub", "div", "cat", "exp", "cos", "sin", "neg",
                             "where", "clone", "contiguous", "to", "index", "pow", "rsqrt", "sqrt")


def categorize(name: str) -> str:
    """The category of a profiler event name (a GPU kernel or a CPU operator), one of :data:`CATEGORIES`.

    Rules, on the lower-cased name, first match wins (the order matters: names carry several hints):

    1. Inductor's generated pointwise/reduction kernels (``triton_poi_``, ``triton_red_``, ``triton_per_``) are
       memory-bound passes named after the ops they fuse; inductor never runs a matmul or a convolution in them (those
       are extern kernels or ``triton_tem_`` templates). ``norm`` if they fuse a norm, ``attention`` if a softmax,
       else ``elementwise`` (``triton_poi_fused_convolution_silu`` is a bias + SiLU epilogue, not a convolution).
    2. ``attention``: flash / fmha / sdpa / attention / attn / softmax (torch's flash, mem-efficient and cuDNN SDPA
       kernels, ``cudnn_generated_fort_native_sdpa_*``, our ``_set_attn_*`` and ``set_attn_*`` kernels,
       ``jedi::set_attention``, ``aten::_scaled_dot_product_*``) and the tokens bmm / baddbmm (in this UNet only
       attention runs batched matmuls; table6's FLOP count books them the same way). Before conv and gemm: cuDNN's
       SDPA kernels say ``cudnn`` and ``fprop``, CUTLASS' fmha says ``cutlass``.
    3. ``conv``: conv / implicit_gemm / fprop / dgrad / wgrad / winograd / im2col / nchwToNhwc / nhwcToNchw (cuDNN's
       layout transforms around a convolution) / any other ``cudnn`` kernel (in this UNet cuDNN runs convolutions and
       SDPA only). Before gemm: ``sm80_xmma_fprop_implicit_gemm_*`` and CUTLASS ``*fprop*`` kernels say gemm too.
    4. ``gemm``: gemm / gemv / cublas / cutlass / xmma / nvjet (cuBLAS' Hopper kernels) / wgmma / matmul and the
       tokens mm / addmm / linear (``aten::addmm``, ``triton_tem_fused_addmm_*``).
    5. ``norm``: norm (not "normal") / ``_gn_`` (our GroupNorm kernels) / RowwiseMoments / ComputeFusedParams /
       welford (torch's GroupNorm CUDA kernels). Before elementwise: torch applies a GroupNorm through an
       ``elementwise_kernel<..., GroupNorm1dForward...>``.
    6. ``elementwise``: elementwise / vectorized / copy / memcpy / memset / CatArray / geglu / silu / gelu / sigmoid /
       upsample / interpolate / prepare (input preparation) / fill / reduce, and the tokens add / mul / sub / div /
       cat / exp / cos / sin / neg / where / clone / contiguous / to / index / pow / sqrt / rsqrt.
    7. ``other``: everything else (views, allocations, the profiler's own events, unknown kernels).
    """
    n = name.lower()
    if _INDUCTOR_FUSED.match(n):
        if _NORM.search(n):
            return "norm"
        return "attention" if "softmax" in n else "elementwise"
    if any(s in n for s in _ATTENTION) or _ATTENTION_TOKENS.search(n):
        return "attention"
    if any(s in n for s in _CONV):
        return "conv"
    if any(s in n for s in _GEMM) or _GEMM_TOKENS.search(n):
        return "gemm"
    if _NORM.search(n):
        return "norm"
    if any(s in n for s in _ELEMENTWISE) or _ELEMENTWISE_TOKENS.search(n):
        return "elementwise"
    return "other"


# ---- the step -----------------------------------------------------------------------------------------------------
def set_fused_ops(unet: nn.Module, enabled: bool) -> None:
    """Turn the UNet's fused GroupNorm(+SiLU)/GEGLU kernels on or off; ValueError naming the missing API when this
    checkout's JeDiUNet has no ``set_fused_ops``."""
    fn = getattr(unet, "set_fused_ops", None)
    if fn is None:
        raise ValueError("--fused: this JeDiUNet has no set_fused_ops(enabled) (fused GroupNorm/GEGLU is not in this "
                         "checkout of jedi/unet.py)")
    fn(enabled)


def build_step(workload: str, *, device="cuda", dtype=torch.float16, tiny: bool = False, mode: str = "eager",
               attn_backend: str = "auto", fused: bool = False, channels_last: bool = False,
               compile_backend: str = "inductor", fuse_projections: bool = False, frozen_weights=None):
    """(step, info): a no-argument function running one UNet step of ``workload`` in ``mode``, and facts for the
    record. The model and inputs are table6's (``build_ours``). Call it under ``torch.no_grad()``.
    ``frozen_weights``: a ``contextlib.ExitStack`` that enters the UNet's ``frozen_weights()`` scope before the step
    is built (a CUDA graph is then captured inside it, as a sampling run captures it); keep the stack open while the
    step runs.

    Raises:
        ValueError: unknown workload or mode, cuda_graph/compile off CUDA, ``fused`` without ``set_fused_ops``.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if mode != "eager" and device.type != "cuda":
        raise ValueError(f"--mode {mode} runs only on CUDA (CUDA graphs / the inductor GPU path); use --mode eager "
                         f"on {device.type}")
    w = WORKLOADS[workload]
    unet, inp = build_ours(w, device, dtype, tiny=tiny)
    unet.set_attn_backend(attn_backend)
    if fused:
        set_fused_ops(unet, True)
    if fuse_projections:  # q/k/v of each self-attention and the context's k/v of all cross-attentions (optimize())
        for name in ("set_fuse_qkv", "set_fuse_context_kv"):
            if getattr(unet, name, None) is None:
                raise ValueError(f"--fuse-projections: this JeDiUNet has no {name}")
            getattr(unet, name)(True)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        inp = {k: (v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4
                   else v) for k, v in inp.items()}
    if frozen_weights is not None:
        if getattr(unet, "frozen_weights", None) is None:
            raise ValueError("--frozen-weights: this JeDiUNet has no frozen_weights()")
        frozen_weights.enter_context(unet.frozen_weights())
    info = {"unet_batch": w.batch, "set_size": w.set_size, "latent_hw": tuple(inp["x_t"].shape[-2:]),
            "context_tokens": inp["context"].shape[1],
            "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)}
    if mode == "eager":
        return (lambda: unet(**inp)), info
    if mode == "cuda_graph":
        runner = CUDAGraphRunner(unet, inp)
        return (lambda: runner(**inp)), info
    t0 = time.perf_counter()
    compiled = torch.compile(unet, backend=compile_backend)
    compiled(**inp)
    torch.cuda.synchronize(device)
    info.update(compile_s=round(time.perf_counter() - t0, 1), compile_backend=compile_backend)
    return (lambda: compiled(**inp)), info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(name: str, width: int) -> str:
    name = " ".join(name.split())
    return name if len(name) <= width else name[: width - 1] + "…"


def _is_annotation(evt) -> bool:
    """A range on the device timeline that is not a kernel: a ``record_function`` range mirrored onto the GPU, such as
    inductor's "## Call CompiledFxGraph ... ##" around a compiled graph's kernels (it spans them, so counting it
    counts them twice: the H200 compiled profile of 2026-11-28 had a 32.5 ms "other" row on a 10.6 ms step) or the
    profiler's "ProfilerStep#n"."""
    name = evt.name
    return (bool(getattr(evt, "is_user_annotation", False)) or (name.startswith("## ") and name.endswith(" ##"))
            or name.startswith("ProfilerStep#"))


def kernel_times(prof, device: torch.device) -> dict[str, list]:
    """{name: [total microseconds, calls]} of the profiled events that count (see the module docstring)."""
    from torch.autograd import DeviceType

    times: dict[str, list] = {}
    for evt in prof.events():
        if device.type == "cuda":
            if evt.device_type != DeviceType.CUDA or _is_annotation(evt):
                continue
            us = evt.time_range.elapsed_us()
        else:
            if (evt.device_type != DeviceType.CPU or getattr(evt, "is_user_annotation", False)
                    or getattr(evt, "is_python_function", False) or evt.name.startswith("ProfilerStep")):
                continue
            us = evt.self_cpu_time_total
        t = times.setdefault(evt.name, [0.0, 0])
        t[0] += us
        t[1] += 1
    return times


def breakdown(times: dict[str, list], steps: int) -> tuple[float, dict]:
    """(device ms per step, {category: {ms_per_step, share, calls_per_step, top_kernels}}) from kernel_times."""
    cats = {c: {"ms_per_step": 0.0, "share": 0.0, "calls_per_step": 0.0, "top_kernels": []} for c in CATEGORIES}
    per_cat: dict[str, list] = {c: [] for c in CATEGORIES}
    for name, (us, calls) in times.items():
        c = categorize(name)
        ms, n = us / 1e3 / steps, calls / steps
        cats[c]["ms_per_step"] += ms
        cats[c]["calls_per_step"] += n
        per_cat[c].append((name, ms, n))
    total = sum(v["ms_per_step"] for v in cats.values())
    for c, v in cats.items():
        v["share"] = v["ms_per_step"] / total if total > 0 else 0.0
        top = sorted(per_cat[c], key=lambda t: -t[1])[:TOP_K]
        v["top_kernels"] = [(_short(n, 300), round(ms, 4), round(k, 2)) for n, ms, k in top]
        v["ms_per_step"] = round(v["ms_per_step"], 4)
        v["calls_per_step"] = round(v["calls_per_step"], 2)
    return total, cats


# leaf matmul ops -> (M, K, N, batch) from their input shapes; nested ops (aten::linear, aten::matmul) are skipped so
# that no kernel is counted twice
_GEMM_OPS = {
    "aten::mm": lambda s: (s[0][0], s[0][1], s[1][1], 1),
    "aten::addmm": lambda s: (s[1][0], s[1][1], s[2][1], 1),
    "aten::_addmm_activation": lambda s: (s[1][0], s[1][1], s[2][1], 1),
    "aten::bmm": lambda s: (s[0][1], s[0][2], s[1][2], s[0][0]),
    "aten::baddbmm": lambda s: (s[1][1], s[1][2], s[2][2], s[1][0]),
}
GEMM_TOP = 20


def gemm_shapes(prof, steps: int, device: torch.device, dtype: torch.dtype, *, peak_tflops: float = PEAK_TFLOPS,
                peak_tbps: float = PEAK_TBPS, top: int = GEMM_TOP) -> list[dict]:
    """The step's matmuls by shape (a profile recorded with ``record_shapes=True``), most time first: op, M x K x N
    (and batch), calls and ms per step, µs per call, TFLOP/s, and the fraction of each call's roofline it reached,
    the larger of its FLOPs at ``peak_tflops`` and its bytes (A, B and C once, in ``dtype``) at ``peak_tbps``. Time
    is the device time of the op's kernels on a GPU, its self CPU time on the CPU. Ops run inside a CUDA graph
    replay are not seen (no operator events): profile eager or compiled steps for this table."""
    rows = []
    size = torch.empty((), dtype=dtype).element_size()
    for evt in prof.key_averages(group_by_input_shape=True):
        shape_of = _GEMM_OPS.get(evt.key)
        if shape_of is None:
            continue
        try:
            M, K, N, batch = (int(x) for x in shape_of(evt.input_shapes))
        except (IndexError, TypeError, ValueError):
            continue  # shapes not recorded
        us = evt.device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        calls = evt.count / steps
        flop = 2.0 * batch * M * K * N
        nbytes = size * batch * (M * K + K * N + M * N)
        roof_us = max(flop / (peak_tflops * 1e6), nbytes / (peak_tbps * 1e6))
        us_call = us / evt.count if evt.count else 0.0
        rows.append({"op": evt.key, "M": M, "K": K, "N": N, "batch": batch, "calls_per_step": round(calls, 2),
                     "ms_per_step": round(us / 1e3 / steps, 4), "us_per_call": round(us_call, 2),
                     "tflops": round(flop / (us_call * 1e6), 1) if us_call > 0 else None,
                     "roofline_us": round(roof_us, 2),
                     "fraction_of_roofline": round(roof_us / us_call, 3) if us_call > 0 else None})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:top]


def profile_step(workload: str = "jedi_ng2", *, device=None, dtype=None, tiny: bool = False, mode: str = "eager",
                 attn_backend: str = "auto", fused: bool = False, channels_last: bool = False, steps: int = 5,
                 warmup: int = 3, trace: str | None = None, compile_backend: str = "inductor",
                 with_floors: bool | None = None, fuse_projections: bool = False, frozen_weights: bool = False) -> dict:
    """Profile ``steps`` UNet steps of ``workload`` and return the result dict (see the module docstring).

    device: "cuda" (default when available) or "cpu". dtype: default float16 on CUDA, float32 on the CPU.
    with_floors: add :func:`floors` per category (default: at full SD size in fp16/bf16, the floors' assumptions).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu --tiny for a rehearsal)")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), contextlib.ExitStack() as stack:
        step, info = build_step(workload, device=device, dtype=dtype, tiny=tiny, mode=mode,
                                attn_backend=attn_backend, fused=fused, channels_last=channels_last,
                                compile_backend=compile_backend, fuse_projections=fuse_projections,
                                frozen_weights=stack if frozen_weights else None)
        for _ in range(max(warmup, 1)):  # at least one: cuDNN/cuBLAS heuristics, Triton compiles
            step()
        _sync(device)
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            walls.append((time.perf_counter() - t0) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            profiled_ms = (time.perf_counter() - t0) * 1e3 / steps
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    times = kernel_times(prof, device)
    total, cats = breakdown(times, steps)
    env = env_info(device)
    if device.type == "cuda":
        env.update(cudnn=torch.backends.cudnn.version(), capability="sm%d%d" % torch.cuda.get_device_capability(device))
    result = {
        "env": env,
        "workload": workload,
        "mode": mode,
        "flags": {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "tiny": tiny,
                  "attn_backend": attn_backend, "fused": fused, "channels_last": channels_last,
                  "fuse_projections": fuse_projections, "frozen_weights": frozen_weights, "steps": steps,
                  "warmup": warmup, **({"compile_backend": compile_backend} if mode == "compile" else {})},
        **info,
        "step_ms": round(statistics.median(walls), 4),
        "profiled_step_ms": round(profiled_ms, 4),
        "device_total_ms": round(total, 4),
        "kernels_per_step": round(sum(c for _, c in times.values()) / steps, 1),
        "time_source": ("CUDA device events (kernels, memcpy, memset) by duration" if device.type == "cuda"
                        else "CPU operator events by self CPU time"),
        "categories": cats,
        "gemm_shapes": gemm_shapes(prof, steps, device, dtype),
        "notes": [],
    }
    if total <= 0:
        result["notes"].append("no device events were recorded: the profiler saw no kernels (CUPTI unavailable?)")
    if with_floors is None:
        with_floors = not tiny and dtype in (torch.float16, torch.bfloat16)
    if with_floors:
        fl = floors(workload, channels_last=channels_last)
        result["floors"] = fl
        for c, ms in fl["floor_ms_by_category"].items():
            result["categories"][c]["floor_ms"] = ms
    return result


def markdown(result: dict) -> str:
    """The per-category table of a :func:`profile_step` result."""
    env, f = result["env"], result["flags"]
    has_floor = any("floor_ms" in v for v in result["categories"].values())
    flags = ", ".join(k for k in ("fused", "fuse_projections", "channels_last", "frozen_weights", "tiny") if f.get(k))
    lines = [f"{result['workload']} (UNet batch {result.get('unet_batch')}), mode {result['mode']}, "
             f"{f['dtype']}, attention {f['attn_backend']}{', ' + flags if flags else ''}; "
             f"{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}"
             f"{', CUDA ' + str(env['cuda']) if env.get('cuda') else ''}.", "",
             f"Step {result['step_ms']:.3f} ms wall (median of {f['steps']}; {result['profiled_step_ms']:.3f} ms "
             f"under the profiler), {result['device_total_ms']:.3f} ms "
             f"{'device' if f['device'] == 'cuda' else 'CPU op'} time per step "
             f"({result['kernels_per_step']:.0f} {'kernels' if f['device'] == 'cuda' else 'ops'}); "
             f"{result['time_source']}.", "",
             "| category | ms/step | share |" + (" floor ms (est.) |" if has_floor else "") + " top kernel |",
             "| --- | --- | --- |" + (" --- |" if has_floor else "") + " --- |"]
    for c in CATEGORIES:
        v = result["categories"][c]
        top = v["top_kernels"][0] if v["top_kernels"] else None
        top_s = f"`{_short(top[0], 80)}` ({top[1]:.3f} ms, {top[2]:g}x)" if top else "—"
        floor = (f" {v['floor_ms']:.3f} |" if "floor_ms" in v else " — |") if has_floor else ""
        lines.append(f"| {c} | {v['ms_per_step']:.3f} | {100 * v['share']:.1f}% |{floor} {top_s} |")
    lines.append(f"| total | {result['device_total_ms']:.3f} | 100% |"
                 + (f" {result['floors']['floor_ms_total']:.3f} |" if has_floor else "") + " |")
    gemms = result.get("gemm_shapes") or []
    if gemms:
        lines += ["", f"Matmuls by shape (top {len(gemms)} by time; roofline: FLOPs at {PEAK_TFLOPS:g} TFLOP/s or "
                      f"bytes at {PEAK_TBPS:g} TB/s, whichever is larger):", "",
                  "| op | M x K x N (batch) | calls/step | ms/step | µs/call | TFLOP/s | of roofline |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for g in gemms:
            b = f" ({g['batch']})" if g["batch"] != 1 else ""
            frac = f"{100 * g['fraction_of_roofline']:.0f} %" if g["fraction_of_roofline"] is not None else "—"
            lines.append(f"| {g['op']} | {g['M']} x {g['K']} x {g['N']}{b} | {g['calls_per_step']:g} | "
                         f"{g['ms_per_step']:.3f} | {g['us_per_call']:.1f} | {g['tflops'] or 0:.0f} | {frac} |")
    if result.get("notes"):
        lines += [""] + [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ---- floors (analytic estimate) -----------------------------------------------------------------------------------
# name: (description, avoidable by a better implementation, profile category it floors)
_PASSES = {
    "group_norm": ("GroupNorm: read + write the activation (a two-pass kernel reads it twice: 1.5x)", False, "norm"),
    "layer_norm": ("LayerNorm: read + write the tokens", False, "norm"),
    "geglu": ("GEGLU activation: read the (L, 2F) projection, write (L, F)", False, "elementwise"),
    "residual_adds": ("residual and timestep-embedding adds: ResBlock (emb add + skip add), TransformerBlock "
                      "(3 adds), SpatialTransformer (1 add)", False, "elementwise"),
    "skip_concat": ("decoder skip concatenation: read both, write the concatenation", False, "elementwise"),
    "upsample": ("nearest 2x upsampling: read x, write 4x", False, "elementwise"),
    "silu_after_norm": ("SiLU after each GroupNorm as its own pass (0 when fused into the norm)", True, None),
    "layout_copies": ("NCHW <-> (N, L, C) copies around each SpatialTransformer (0 channels-last)", True, None),
}


def count_pass_bytes(workload: str, *, channels_last: bool = False, dtype=torch.float16) -> dict[str, int]:
    """Bytes of the memory-bound passes of one step of ``workload`` at full SD size (see ``_PASSES``), from forward
    hooks on a meta-tensor forward: only shapes are computed. Each pass counts its minimum traffic (every input read
    once, every output written once) in ``dtype``."""
    w = WORKLOADS[workload]
    cfg = w.config()
    if w.set_size > 1:
        cfg.attn_backend = "torch"  # as table6.count_flops: SDPA on the (B, G*L) view runs on meta tensors
    with torch.device("meta"):
        unet = JeDiUNet(cfg).to(dtype)
        inp = make_inputs(w, cfg, "cpu", dtype)
        inp = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    es = torch.empty((), dtype=dtype).element_size()
    acc = dict.fromkeys(_PASSES, 0)

    def add(key, numel_times):
        acc[key] += numel_times * es

    def out_hook(key, k):
        return lambda m, args, out: add(key, k * out.numel())

    handles = []
    for m in unet.modules():
        if isinstance(m, GroupNorm32):
            handles.append(m.register_forward_hook(out_hook("group_norm", 2)))
        elif isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_hook(out_hook("layer_norm", 2)))
        elif isinstance(m, GEGLU):
            handles.append(m.register_forward_hook(out_hook("geglu", 3)))  # 2F read + F written
        elif isinstance(m, ResBlock):
            handles.append(m.register_forward_hook(out_hook("residual_adds", 2 + 3)))
        elif isinstance(m, TransformerBlock):
            handles.append(m.register_forward_hook(out_hook("residual_adds", 3 * 3)))
        elif isinstance(m, SpatialTransformer):
            handles.append(m.register_forward_hook(out_hook("residual_adds", 3)))
            if not channels_last:
                handles.append(m.register_forward_hook(out_hook("layout_copies", 2 * 2)))
        elif isinstance(m, Upsample):
            handles.append(m.register_forward_hook(lambda m, args, out: add("upsample", out.numel() * 5 // 4)))
        elif isinstance(m, nn.Sequential):
            for prev, cur in zip(m, list(m)[1:]):
                if isinstance(cur, nn.SiLU) and isinstance(prev, nn.GroupNorm):
                    handles.append(cur.register_forward_hook(out_hook("silu_after_norm", 2)))
    for block in unet.output_blocks:  # the concatenated input of every decoder block
        handles.append(block.register_forward_pre_hook(lambda m, args: add("skip_concat", 2 * args[0].numel())))
    try:
        with torch.no_grad():
            unet(**inp)
    finally:
        for h in handles:
            h.remove()
    return acc


def floors(workload: str = "jedi_ng2", *, peak_tflops: float = PEAK_TFLOPS, peak_tbps: float = PEAK_TBPS,
           channels_last: bool = False) -> dict:
    """Analytic floor estimate of one full-size SD step of ``workload``: matmul FLOPs at ``peak_tflops`` and
    memory-bound pass bytes at ``peak_tbps`` (see the module docstring). Avoidable passes are reported, not floored.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    fl = count_flops(WORKLOADS[workload])
    nbytes = count_pass_bytes(workload, channels_last=channels_last)
    flop_ms = {k: fl[k] / (peak_tflops * 1e12) * 1e3 for k in ("conv", "linear", "attention", "other")}
    byte_ms = {k: b / (peak_tbps * 1e12) * 1e3 for k, b in nbytes.items()}
    by_cat = {"attention": flop_ms["attention"], "gemm": flop_ms["linear"], "conv": flop_ms["conv"], "norm": 0.0,
              "elementwise": 0.0, "other": flop_ms["other"]}
    for k, (_, avoidable, cat) in _PASSES.items():
        if not avoidable:
            by_cat[cat] += byte_ms[k]
    total = sum(by_cat.values())
    return {
        "estimate": True,
        "workload": workload,
        "unet_batch": WORKLOADS[workload].batch,
        "dtype": "float16",
        "channels_last": channels_last,
        "peak_tflops": peak_tflops,
        "peak_tbps": peak_tbps,
        "flops": fl,
        "tflop_total": round(fl["total"] / 1e12, 4),
        "flop_floor_ms": {k: round(v, 4) for k, v in flop_ms.items()},
        "bytes": nbytes,
        "byte_floor_ms": {k: round(v, 4) for k, v in byte_ms.items()},
        "avoidable": [k for k, (_, a, _) in _PASSES.items() if a],
        "avoidable_ms": round(sum(byte_ms[k] for k, (_, a, _) in _PASSES.items() if a), 4),
        "floor_ms_by_category": {k: round(v, 4) for k, v in by_cat.items()},
        "floor_ms_total": round(total, 4),
    }


def floors_markdown(fl: dict) -> str:
    lines = [f"ESTIMATE: floors of one {fl['workload']} step (SD v1, 64x64 latents, UNet batch {fl['unet_batch']}, "
             f"{fl['dtype']}{', channels-last' if fl['channels_last'] else ''}) at {fl['peak_tflops']:g} TFLOP/s and "
             f"{fl['peak_tbps']:g} TB/s.", "",
             "| part | work | floor ms | what |", "| --- | --- | --- | --- |"]
    what = {"conv": "convolutions (incl. 1x1 proj_in/out)", "linear": "linears (q/k/v/out, FF, embeddings)",
            "attention": "attention matmuls (QK^T, PV)", "other": "other counted FLOPs"}
    for k in ("conv", "linear", "attention", "other"):
        if fl["flops"][k]:
            lines.append(f"| {k} | {fl['flops'][k] / 1e9:.1f} GFLOP | {fl['flop_floor_ms'][k]:.3f} | {what[k]} |")
    for k, (desc, avoidable, _) in _PASSES.items():
        tag = " (avoidable, not in the floor)" if avoidable else ""
        lines.append(f"| {k} | {fl['bytes'][k] / 1e9:.3f} GB | {fl['byte_floor_ms'][k]:.3f} | {desc}{tag} |")
    lines.append(f"| total floor | {fl['tflop_total']:.3f} TFLOP | {fl['floor_ms_total']:.3f} | + "
                 f"{fl['avoidable_ms']:.3f} ms of avoidable passes in eager SD |")
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------------------------------
def _write(out: str | None, result: dict, md: str) -> None:
    if not out:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(md)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="jedi_ng2", choices=("jedi_ng2", "jedi_ng4", "blipd"))
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="table6's tiny configs and latents (CPU smoke runs)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--attn-backend", default="auto", choices=("auto", "triton", "cuda", "torch"),
                    help="JeDiUNet.set_attn_backend for every joint self-attention")
    ap.add_argument("--fused", action="store_true", help="JeDiUNet.set_fused_ops(True): fused GroupNorm+SiLU, GEGLU")
    ap.add_argument("--channels-last", action="store_true", help="model and latents in channels-last")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="JeDiUNet.set_fuse_qkv(True) and set_fuse_context_kv(True), as JeDiPipeline.optimize()")
    ap.add_argument("--frozen-weights", action="store_true",
                    help="build and run the step inside JeDiUNet.frozen_weights() (as jedi.sampling.personalize does)")
    ap.add_argument("--mode", default="eager", choices=MODES, help="cuda_graph (jedi.CUDAGraphRunner) and compile "
                                                                  "(torch.compile(unet)) need CUDA")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --mode compile")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (and as many timed ones) after warmup")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; 1 avoids OpenMP stalls on a shared "
                                                "machine for --tiny)")
    ap.add_argument("--out", help="result JSON; the markdown table goes beside it as .md")
    ap.add_argument("--trace", help="also write a chrome trace (chrome://tracing, perfetto) here")
    ap.add_argument("--floors", action="store_true", help="print the analytic floor estimate of --workload at full "
                                                          "SD size (meta tensors, no timing) and exit")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="--floors: matmul TFLOP/s")
    ap.add_argument("--peak-tbps", type=float, default=PEAK_TBPS, help="--floors: memory TB/s")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.floors:
        result = floors(args.workload, peak_tflops=args.peak_tflops, peak_tbps=args.peak_tbps,
                        channels_last=args.channels_last)
        md = floors_markdown(result)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here (rehearse with --device cpu --tiny)")
        if args.mode != "eager" and device != "cuda":
            ap.error(f"--mode {args.mode} needs --device cuda (CUDA graphs / compiled GPU step); on the CPU profile "
                     f"--mode eager")
        if args.fused and getattr(JeDiUNet, "set_fused_ops", None) is None:
            ap.error("--fused: this JeDiUNet has no set_fused_ops(enabled) (fused GroupNorm/GEGLU is not in this "
                     "checkout of jedi/unet.py)")
        result = profile_step(args.workload, device=device, dtype=DTYPES[args.dtype] if args.dtype else None,
                              tiny=args.tiny, mode=args.mode, attn_backend=args.attn_backend, fused=args.fused,
                              channels_last=args.channels_last, steps=args.steps, warmup=args.warmup,
                              trace=args.trace, compile_backend=args.compile_backend,
                              fuse_projections=args.fuse_projections, frozen_weights=args.frozen_weights)
        md = markdown(result)
    print(md)
    _write(args.out, result, md)
    return result


if __name__ == "__main__":
    main()
