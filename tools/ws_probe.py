"""Does the TMA + warp-specialized Triton forward (``JEDI_TRITON_FWD_WS=1``) compile, finish and agree on this GPU?

    python tools/ws_probe.py [--kernel ws|gluon|gluon-bwd] [--json OUT.json]
    # exit 0: every step finished and agreed; 1: a mismatch; 2: no sm_90 GPU (nothing to probe)

In the third H100 run of 2026-11-27 none of the kernel's 8 GPU tests finished within the test step's time, and the
attention sweep was killed while timing it: either its compilation (Triton 3.6's Hopper warp specialization) is very
slow there, or the kernel never finishes. This probe separates the two, one line per step, flushed as it goes, so a
run under ``timeout`` shows where it stopped: compile (``warmup``, no launch), the first launch + synchronize, the
comparison with the default pointer-load kernel (out and lse), then a timing against it on SD's 64x64 shape.
``benchmarks/gpu_check.sh`` runs it before the kernel tests and lets the ws tests and sweep rows run only if it
finished: a hung kernel would otherwise take the whole test step and the sweep with it.

``--kernel gluon`` probes the Gluon Hopper forward (``JEDI_TRITON_FWD_GLUON``, ``ops/set_attention_gluon.py``) the
same way, every config of it: new and never run on a GPU before, it waits on mbarriers that a wrong phase or a lost
TMA load would leave waiting forever. The configs run one after the other, and ``configs_agreeing`` lists those that
agreed on every shape so far (the JSON is rewritten after every line): where some config disagreed, or hung until
the timeout killed the probe, ``gpu_check.sh`` still runs the Gluon tests and sweep rows on the configs that agreed
(``JEDI_GLUON_CONFIGS``) rather than on none.

``--kernel gluon-bwd`` probes the Gluon Hopper backward (``JEDI_TRITON_BWD_GLUON``, ``ops/set_attention_gluon_bwd.py``)
in the same way against the split pointer kernels (dq, dk, dv), every config; ``gpu_check.sh`` turns its
``configs_agreeing`` into ``JEDI_GLUON_BWD_CONFIGS``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


_PREFIX = ["ws_probe"]  # the log lines' prefix: ws_probe or gluon_probe (--kernel)


_JSON = [None]  # --json: rewritten after every line, so a probe killed by its timeout leaves what it had found


def _say(report: dict, key: str, value) -> None:
    report[key] = value
    print(f"{_PREFIX[0]} {key}: {value}", flush=True)
    if _JSON[0]:
        tmp = Path(_JSON[0] + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(_JSON[0])


# where the probes put their tensors: the GPU in bf16; the CPU tests' dry runs (stand-in kernels, no GPU) change it
_TENSORS = {"device": "cuda", "dtype": "bfloat16"}


def _inputs(B: int, G: int, L: int, H: int, D: int):
    """q, k, v (B·G, L, H·D) bf16 on the GPU as views of one fused projection, as the UNet passes them (seed 0)."""
    import torch

    gen = torch.Generator(device=_TENSORS["device"]).manual_seed(0)
    qkv = torch.randn(B * G, L, 3 * H * D, device=_TENSORS["device"], dtype=getattr(torch, _TENSORS["dtype"]),
                      generator=gen)
    return qkv.split(H * D, dim=-1)


def _gluon_sm90() -> bool:
    """Gluon importable and an sm_90 CUDA GPU present (the Gluon kernels' only target)."""
    import torch

    from jedi_kernels.ops.set_attention_gluon import HAVE_GLUON

    return HAVE_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _sync() -> None:
    import torch

    if _TENSORS["device"] == "cuda":
        torch.cuda.synchronize()


def _compile_and_run(report: dict, label: str, launcher, args: tuple) -> bool:
    """Compile (``launcher(*args, compile_only=True)``) and run once, each step timed and reported under ``label``;
    False (the error reported) if either raised: a config that fails is recorded and the next one still gets its turn
    (after a device fault the later configs fail too, so none of them then counts)."""
    try:
        t = time.perf_counter()
        launcher(*args, compile_only=True)
        _say(report, f"{label} compile_s", round(time.perf_counter() - t, 2))
        t = time.perf_counter()
        launcher(*args)
        _sync()
        _say(report, f"{label} first_run_s", round(time.perf_counter() - t, 3))
    except Exception as e:
        _say(report, f"{label} error", f"{type(e).__name__}: {str(e)[:300]}")
        return False
    return True


def probe_gluon(report: dict, shapes=None) -> int:
    """Each config of the Gluon forward, one after the other: compile, first run, agreement with the pointer kernel
    and time, on each probed shape (the last is SD's 64x64 level; ``shapes``: (B, G, L, H, D) tuples instead, for
    the CPU tests' dry run). ``configs_agreeing`` is updated (and the JSON rewritten) as each config finishes every
    shape, so a run killed by its timeout inside one config still says which earlier configs agreed."""
    import os

    from jedi_kernels.ops import set_attention as sa
    from jedi_kernels.ops import set_attention_gluon as sg

    if not _gluon_sm90():
        _say(report, "skipped", "needs Gluon and an sm_90 CUDA GPU")
        return 2
    from triton.testing import do_bench

    os.environ.pop("JEDI_TRITON_FWD_GLUON", None)  # the reference below is the default pointer-load kernel
    cases = []
    for B, G, L, H, D in shapes or ((1, 2, 200, 2, 40), (1, 2, 200, 2, 80), (2, 2, 4096, 8, 40)):
        shape = f"B{B} G{G} L{L} H{H} D{D}"
        q, k, v = _inputs(B, G, L, H, D)
        if not sg.gluon_fwd_ok(q, k, v, D, D**-0.5):
            _say(report, f"{shape} eligible", False)
            return 1
        ref_out, ref_lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None)
        ptr_ms = round(do_bench(lambda: sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None), return_mode="median"), 4)
        _say(report, f"{shape} pointer (autotuned) ms", ptr_ms)
        cases.append((shape, (B, G, L, H, D), (q, k, v), (ref_out, ref_lse)))
    agreeing = []  # configs that agreed on every shape
    _say(report, "configs_agreeing", agreeing)
    for variant in sorted(sg.CONFIGS):
        agree_all = True
        for shape, (B, G, L, H, D), (q, k, v), (ref_out, ref_lse) in cases:
            out, lse, lst, cnt = sa._fwd_buffers(q, B, G, L, H, D, None)
            args = (q, k, v, B, G, L, H, D, D**-0.5, None, out, lse, lst, cnt, variant)
            if not _compile_and_run(report, f"{shape} config {variant}", sg.set_attn_fwd_gluon, args):
                agree_all = False
                break
            d_out = float((out.float() - ref_out.float()).abs().max())
            d_lse = float((lse - ref_lse).abs().max())
            agree = d_out <= 2e-2 and d_lse <= 1e-3  # two bf16 kernels of the same math; lse in float32
            agree_all &= agree
            _say(report, f"{shape} config {variant} max_abs_diff", {"out": d_out, "lse": d_lse, "agree": agree})
            ms = do_bench(lambda: sg.set_attn_fwd_gluon(*args), return_mode="median")
            _say(report, f"{shape} config {variant} ms", round(ms, 4))
        if agree_all:
            agreeing.append(variant)
        # gpu_check.sh runs the tests and sweep rows on these alone when some config disagreed or hung
        # (JEDI_GLUON_CONFIGS)
        _say(report, "configs_agreeing", list(agreeing))
    return 0 if agreeing == sorted(sg.CONFIGS) else 1


def probe_gluon_bwd(report: dict, shapes=None) -> int:
    """Each config of the Gluon backward, one after the other, as :func:`probe_gluon`: compile, first run, agreement
    of dq, dk, dv with the default split pointer kernels on the forward's own out and lse, and the backward's time
    against theirs, on each probed shape (key and query tails, a mask with a key image no query attends, then SD's
    64x64 and 32x32 levels at set size 2; ``shapes``: (B, G, L, H, D, masked) tuples instead, for the CPU tests'
    dry run)."""
    import os

    # the split kernels' first configs (the H100's winners) instead of autotuning them on each of five shapes first:
    # the probe has a fixed time in gpu_check.sh; the sweep row times the tuned kernels
    os.environ.setdefault("JEDI_TRITON_AUTOTUNE", "0")
    import torch

    from jedi_kernels.ops import set_attention as sa
    from jedi_kernels.ops import set_attention_gluon_bwd as gb

    if not _gluon_sm90():
        _say(report, "skipped", "needs Gluon and an sm_90 CUDA GPU")
        return 2
    from triton.testing import do_bench

    os.environ.pop("JEDI_TRITON_BWD_GLUON", None)  # the reference below is the default split pointer kernels
    # masked: [[1, 0, 0], [1, 1, 0], [1, 1, 0]] leaves key image 2 without a query (dk = dv = 0) and lists the query
    # images of key image 0 (all three) differently from the key images of query image 0 (only itself)
    oneway = torch.tensor([[True, False, False], [True, True, False], [True, True, False]], device=_TENSORS["device"])
    cases = []
    for B, G, L, H, D, masked in shapes or ((1, 2, 200, 2, 40, False), (1, 3, 97, 2, 40, True),
                                            (1, 2, 200, 2, 80, False), (2, 2, 4096, 8, 40, False),
                                            (2, 2, 1024, 8, 80, False)):
        mask = oneway[:G, :G] if masked else None
        shape = f"B{B} G{G} L{L} H{H} D{D}" + (" masked" if mask is not None else "")
        q, k, v = _inputs(B, G, L, H, D)
        do = torch.randn_like(q)
        out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, mask)
        if not gb.gluon_bwd_ok(do, q, k, v, D, 1):
            _say(report, f"{shape} eligible", False)
            return 1
        # the transposed image lists (per key image, the query images attending it), or dummies without a mask
        cols, ccnt = lse, lse
        if mask is not None:
            lists, counts = sa._mask_lists(mask, G, both=True)
            cols, ccnt = lists[1], counts[1]
        ref = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5, mask)
        _sync()
        ptr_ms = round(do_bench(lambda: sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5, mask),
                                return_mode="median"), 4)
        _say(report, f"{shape} pointer (split, default configs) bwd ms", ptr_ms)
        cases.append((shape, (B, G, L, H, D), mask, (do, q, k, v, out, lse), (cols, ccnt), ref))
    agreeing = []
    _say(report, "configs_agreeing", agreeing)
    for variant in sorted(gb.BWD_CONFIGS):
        agree_all = True
        for shape, (B, G, L, H, D), mask, (do, q, k, v, out, lse), (cols, ccnt), ref in cases:
            if D > gb.BWD_CONFIGS[variant]["MAX_HEAD_DIM"]:
                continue
            delta = sa.bwd_delta(out, do, B, G, L, H, D)
            dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(2))
            dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            args = (do, q, k, v, lse, delta, B, G, L, H, D, D**-0.5, mask is not None, cols, ccnt, dk, dv, dq_acc,
                    variant)
            if not _compile_and_run(report, f"{shape} config {variant}", gb.set_attn_bwd_gluon, args):
                agree_all = False
                break
            diffs = {name: float((got.float() - r.float()).abs().max())
                     for name, got, r in zip(("dq", "dk", "dv"), (dq_acc, dk, dv), ref)}
            # two bf16 kernels of the same math; the reference rounds dq to bf16, the float32 accumulator does not
            scale_ = max(float(r.float().abs().max()) for r in ref)
            agree = all(d <= 2e-2 * max(1.0, scale_) for d in diffs.values())
            agree_all &= agree
            _say(report, f"{shape} config {variant} max_abs_diff", {**diffs, "agree": agree})
            ms = do_bench(lambda: gb.set_attn_bwd_gluon(*args), return_mode="median")
            _say(report, f"{shape} config {variant} ms (kernel alone)", round(ms, 4))
            with mock.patch.dict(os.environ, {"JEDI_TRITON_BWD_GLUON": str(variant)}):
                ms = do_bench(lambda: sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5, mask),
                              return_mode="median")
            _say(report, f"{shape} config {variant} bwd ms", round(ms, 4))
        if agree_all:
            agreeing.append(variant)
        _say(report, "configs_agreeing", list(agreeing))
    return 0 if agreeing == sorted(gb.BWD_CONFIGS) else 1


def probe(report: dict) -> int:
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        _say(report, "skipped", "needs an sm_90+ CUDA GPU")
        return 2
    import os

    from jedi_kernels.ops import set_attention as sa

    os.environ.pop("JEDI_TRITON_FWD_WS", None)  # the reference below is the default pointer-load kernel
    ok = True
    # (B, G, L, H, D): a small case (one query tile per image, a key tail), then SD's 64x64 level at set size 2
    for B, G, L, H, D in ((1, 2, 200, 2, 40), (2, 2, 4096, 8, 40)):
        shape = f"B{B} G{G} L{L} H{H} D{D}"
        q, k, v = _inputs(B, G, L, H, D)
        if not sa._fwd_ws_ok(q, k, v, D):
            _say(report, f"{shape} eligible", False)
            return 1
        args = (q, k, v, B, G, L, H, D, D**-0.5, None, None)
        t = time.perf_counter()
        sa._set_attn_fwd_ws(*args, compile_only=True)
        _say(report, f"{shape} compile_s", round(time.perf_counter() - t, 2))
        t = time.perf_counter()
        out, lse = sa._set_attn_fwd_ws(*args)
        torch.cuda.synchronize()
        _say(report, f"{shape} first_run_s", round(time.perf_counter() - t, 3))
        ref_out, ref_lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None, config={"BLOCK_M": 128, "BLOCK_N": 64,
                                                                                   "num_warps": 4, "num_stages": 3})
        torch.cuda.synchronize()
        d_out = float((out.float() - ref_out.float()).abs().max())
        d_lse = float((lse - ref_lse).abs().max())
        agree = d_out <= 2e-2 and d_lse <= 1e-3  # two bf16 kernels of the same math; lse in float32
        ok &= agree
        _say(report, f"{shape} max_abs_diff", {"out": d_out, "lse": d_lse, "agree": agree})
    from triton.testing import do_bench  # as attention_sweep.py times its rows (median, L2 flushed between runs)

    ws_ms = do_bench(lambda: sa._set_attn_fwd_ws(*args), return_mode="median")
    ptr_ms = do_bench(lambda: sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None), return_mode="median")
    _say(report, f"{shape} ms", {"ws": round(ws_ms, 4), "pointer (autotuned)": round(ptr_ms, 4)})
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--kernel", choices=("ws", "gluon", "gluon-bwd"), default="ws",
                    help="ws: the TMA + warp-specialized forward (default); gluon: the Gluon Hopper forward; "
                         "gluon-bwd: the Gluon Hopper backward")
    args = ap.parse_args(argv)
    report: dict = {}
    _JSON[0] = args.json
    try:
        _PREFIX[0] = f"{args.kernel.replace('-', '_')}_probe"
        rc = {"gluon": probe_gluon, "gluon-bwd": probe_gluon_bwd, "ws": probe}[args.kernel](report)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
