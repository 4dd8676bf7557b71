"""Compile every Triton kernel of jedi_kernels for a real GPU target on a machine without a GPU.

    python tools/triton_aot_check.py [--arch 90 --arch 80] [--all-configs] [--json OUT.json]

The CPU test-suite runs the kernels through Triton's interpreter, which is plain numpy: it never type-checks
loop-carried values, lowers ``tl.dot`` to wgmma/mma, allocates shared memory or counts registers. A kernel can pass
every interpreter test and still fail to compile for the GPU. This tool closes that gap in two phases:

1. record (a subprocess with ``TRITON_INTERPRET=1``): run each op's Triton backend once on small representative inputs
   (every dtype, layout and head-dim class the ops support) and record each launch: the kernel, its argument types and
   constexpr values, num_warps / num_stages;
2. compile (this process, no interpreter): for each distinct launch, ``triton.compile`` the kernel for ``cuda:<arch>``
   with the GPU's values of the interpreter-only switches (``DOT_F32``, ``PREC``, ``BF16_RNE``); the set-attention
   kernels are compiled with every config of their autotune list (``--all-configs``; default: the first config of each
   list, the one used when autotuning is off). ptxas runs (it ships with Triton); ``ptxas -v`` reports registers and spill bytes,
   Triton's metadata the shared memory, per kernel.

Exit status 1 if any kernel fails to compile or needs more shared memory than one block of the arch may use (it
would compile here and fail at launch with OutOfResources), or, with ``--no-spills``, spills on sm_90 in fp16/bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the most shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ---- phase 1: record launches under the interpreter ----------------------------------------------------------------
def _record(out_path: str) -> None:
    import torch
    from triton.runtime import interpreter

    launches = []
    real_run = interpreter.InterpretedFunction.run

    from triton.tools.tensor_descriptor import TensorDescriptor

    def run(self, *args, **kwargs):
        fn = self.fn
        names = list(self.arg_names)
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        rec = {}
        for name in names:
            v = values.get(name)
            if isinstance(v, torch.Tensor):
                rec[name] = {"ptr": _DTYPES[str(v.dtype).replace("torch.", "")]}
            elif isinstance(v, TensorDescriptor):
                rec[name] = {"desc": _DTYPES[str(v.base.dtype).replace("torch.", "")], "block": list(v.block_shape)}
            elif isinstance(v, bool) or v is None or isinstance(v, str):
                rec[name] = {"value": v}
            elif isinstance(v, int):
                rec[name] = {"int": v}
            elif isinstance(v, float):
                rec[name] = {"float": v}
            else:
                rec[name] = {"value": getattr(v, "value", repr(v))}
        launches.append({"module": fn.__module__, "name": fn.__name__, "args": rec,
                         "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)})
        return real_run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    import jedi_kernels as jk

    torch.manual_seed(0)
    halves = (torch.float16, torch.bfloat16)
    for dtype in (*halves, torch.float32):
        for cl in (False, True):
            x_t = torch.randn(2, 4, 4, 4, dtype=dtype, requires_grad=True)
            x0 = torch.randn(2, 4, 4, 4, dtype=dtype, requires_grad=True)
            if cl:
                x_t, x0 = (t.detach().to(memory_format=torch.channels_last).requires_grad_() for t in (x_t, x0))
            jk.prepare_inputs(x_t, x0, torch.tensor([True, False]), backend="triton").sum().backward()
    for dtype in (*halves, torch.float32, torch.float64):
        x = torch.randn(1, 64, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)  # 64-pixel tiles, as at SD sizes
        for silu, affine in ((True, True), (False, False)):
            w = torch.randn(64, requires_grad=True) if affine else None
            xg = x.detach().requires_grad_()
            jk.group_norm(xg, 32, w, w, 1e-5, silu=silu, backend="triton").float().sum().backward()
        sh = torch.randn(1, 64, dtype=dtype, requires_grad=True)  # a ResBlock's second norm: time embedding folded in
        jk.group_norm(x.detach().requires_grad_(), 32, None, None, 1e-5, silu=True, shift=sh,
                      backend="triton").float().sum().backward()
        with torch.no_grad():  # a decoder ResBlock's first norm: the skip concatenation read in place (inference)
            w128 = torch.randn(128)
            jk.group_norm(x, 32, w128, w128, 1e-5, silu=True, concat=x.clone(), backend="triton")
        h = torch.randn(16, 2 * 256, dtype=dtype, requires_grad=True)  # 16 x 256 tiles, as at SD sizes
        jk.geglu(h, backend="triton").sum().backward()
        for C in (320, 1280, 40):  # SD's narrowest and widest token rows, and a non-power of two
            t, r, w = torch.randn(8, C, dtype=dtype), torch.randn(8, C, dtype=dtype), torch.randn(C, dtype=dtype)
            jk.add_layer_norm(t, r, w, w, backend="triton")
            jk.add_layer_norm(t, None, None, None, backend="triton")
            # the transformer block's folded biases (JeDiUNet fold_linear_bias): shift alone, shift + sum_shift
            jk.add_layer_norm(t, r, w, w, shift=w, backend="triton")
            jk.add_layer_norm(t, r, w, w, shift=w, sum_shift=w, backend="triton")
    cases = [(40, torch.bfloat16, False), (40, torch.float16, False), (80, torch.bfloat16, False),
             (80, torch.bfloat16, True), (160, torch.float16, False), (64, torch.bfloat16, False),
             (24, torch.bfloat16, False), (40, torch.float32, False),
             # the widest head dims of the d128 / d256 classes (the largest tiles' shared memory)
             (128, torch.bfloat16, False), (256, torch.float16, False)]
    for D, dtype, masked in cases:
        # up to 96 padded columns the backward's dQ comes by atomics from the dK/dV kernel; the dQ kernel (taken in
        # deterministic mode and by JEDI_TRITON_BWD_DQ=kernel) is recorded there too
        for dq_mode in ("", "kernel") if D <= 96 and dtype != torch.float32 else ("",):
            os.environ["JEDI_TRITON_BWD_DQ"] = dq_mode
            q, k, v = (torch.randn(4, 17, 2 * D, dtype=dtype, requires_grad=True) for _ in range(3))
            mask = torch.tensor([[True, False], [True, True]]) if masked else None
            jk.set_attention(q, k, v, 2, 2, set_mask=mask, backend="triton").float().sum().backward()
    os.environ.pop("JEDI_TRITON_BWD_DQ")
    # the TMA + warp-specialized forward (JEDI_TRITON_FWD_WS=1; sm_90 only, head dims <= 64)
    os.environ["JEDI_TRITON_FWD_WS"] = "1"
    for D, dtype, masked in ((40, torch.bfloat16, False), (40, torch.float16, True), (64, torch.bfloat16, False),
                             (24, torch.bfloat16, False)):
        q, k, v = (torch.randn(4, 17, 2 * D, dtype=dtype) for _ in range(3))
        mask = torch.tensor([[True, False], [True, True]]) if masked else None
        jk.set_attention(q, k, v, 2, 2, set_mask=mask, backend="triton")
    os.environ.pop("JEDI_TRITON_FWD_WS")
    # the feed-forward projection + GEGLU kernel: SD's K (multiples of 64) and a K tail, with and without a bias
    for dtype in (*halves, torch.float32):
        for K, bias in ((64, True), (40, False)):
            x = torch.randn(8, K, dtype=dtype)
            w = torch.randn(2 * 24, K, dtype=dtype)
            jk.linear_geglu(x, w, torch.randn(48, dtype=dtype) if bias else None, backend="triton")
    # the Upsample's sub-pixel interleave: channels-last with a bias (SD's), NCHW without, every dtype; 64-channel
    # blocks as at SD sizes
    for dtype in (*halves, torch.float32, torch.float64):
        for cl, bias in ((True, True), (False, False)):
            x = torch.randn(1, 8, 3, 3, dtype=dtype)
            x = x.to(memory_format=torch.channels_last) if cl else x
            w = torch.randn(64, 8, 3, 3, dtype=dtype)
            jk.upsample_conv2d(x, w, torch.randn(64, dtype=dtype) if bias else None, backend="triton")
    # the residual add with the output conv's bias: channels-last + a GEMM's strided output (SD's), NCHW, no bias
    for dtype in (*halves, torch.float32, torch.float64):
        x = torch.randn(1, 64, 4, 4, dtype=dtype)
        r = torch.randn(1, 4, 4, 64, dtype=dtype).permute(0, 3, 1, 2)
        jk.residual_add(x.to(memory_format=torch.channels_last), r, torch.randn(64, dtype=dtype), backend="triton")
        jk.residual_add(x, x, None, backend="triton")
    interpreter.InterpretedFunction.run = real_run
    Path(out_path).write_text(json.dumps(launches))


# ---- phase 2: compile for the GPU -----------------------------------------------------------------------------------
def _val(a: dict):
    """The recorded Python value of an argument (None for tensors)."""
    return a.get("value", a.get("int", a.get("float")))


def _gpu_values(rec: dict) -> dict:
    """The interpreter-only switches, as a GPU launch sets them (see ops/set_attention._prec, ops/geglu)."""
    args = dict(rec["args"])
    first_ptr = next((a["ptr"] for a in args.values() if "ptr" in a), None)
    if "DOT_F32" in args:
        args["DOT_F32"] = {"value": False}
    if "PREC" in args:
        args["PREC"] = {"value": "ieee" if first_ptr == "fp32" else "tf32"}
    if "BF16_RNE" in args:
        args["BF16_RNE"] = {"value": False}
    return args


def _variants(rec: dict, all_configs: bool) -> list[dict]:
    """One launch record -> the GPU launches to compile (set-attention kernels: their autotune configs)."""
    from jedi_kernels.ops import set_attention as sa

    args = _gpu_values(rec)
    if rec["name"] == "_set_attn_fwd_ws_kernel":  # one fixed config, sm_90+, fp16/bf16 only (sa._fwd_ws_ok)
        if args["Out"]["ptr"] not in ("fp16", "bf16"):
            return []
        cfg, a = sa._WS_CONFIG, dict(args)
        dp = _val(a["DP"])
        for k in ("BLOCK_M", "BLOCK_N"):
            a[k] = {"value": cfg[k]}
        a["EVEN_N"], a["WARP_SPEC"] = {"value": True}, {"value": True}
        for name, rows in (("DescQ", cfg["BLOCK_M"]), ("DescK", cfg["BLOCK_N"]), ("DescV", cfg["BLOCK_N"])):
            a[name] = dict(a[name], block=[rows, dp])
        return [dict(rec, args=a, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], min_arch=90)]
    if rec["name"] == "_linear_geglu_kernel":  # its autotune list (the first config when autotuning is off)
        from jedi_kernels.ops import linear_geglu as lg

        out = []
        if args["X"]["ptr"] == "fp32":  # float32 (tests) runs one fixed config on GPUs
            f32 = dict(lg._F32_CONFIG)
            cfgs = [(f32.pop("num_warps"), f32.pop("num_stages"), f32)]
        else:
            cfgs = [(c.num_warps, c.num_stages, c.kwargs) for c in lg._CONFIGS[: None if all_configs else 1]]
        for warps, stages, kw in cfgs:
            a = dict(args, **{k: {"value": v} for k, v in kw.items()})
            if _val(a["EVEN_K"]):  # recorded with the interpreter's 32-wide K step: keep K's own divisibility
                a["EVEN_K"] = {"value": _val(a["K"]) % kw["BLOCK_K"] == 0}
            out.append(dict(rec, args=a, num_warps=warps, num_stages=stages))
        return out
    lists = {"_set_attn_fwd_kernel": sa._FWD_CONFIGS, "_set_attn_bwd_dkdv_kernel": sa._DKDV_CONFIGS,
             "_set_attn_bwd_dq_kernel": sa._DQ_CONFIGS}
    if rec["name"] not in lists:
        return [dict(rec, args=args)]
    ptr = args["Q"]["ptr"]
    # the launchers pass D1 >= 16 even without a second chunk (HAS_D1 False): the class is that of D0 alone then
    D0, D1 = _val(args["D0"]), (_val(args["D1"]) if _val(args["HAS_D1"]) else 0)
    dclass = "f32" if ptr == "fp32" else sa._dclass(D0, D1, None)
    out = []
    for cfg in lists[rec["name"]][dclass][: None if all_configs else 1]:
        a = dict(args)
        for k, v in cfg.kwargs.items():
            a[k] = {"value": v}
        if "EVEN_N" in a:  # the heuristic, for the real (SD-sized) L it would see: a multiple of every tile
            a["EVEN_N"] = {"value": True}
        if "EVEN_M" in a:
            a["EVEN_M"] = {"value": True}
        out.append(dict(rec, args=a, num_warps=cfg.num_warps, num_stages=cfg.num_stages, config=dclass))
    return out


def _key(rec: dict) -> str:
    return json.dumps([rec["module"], rec["name"], rec["args"], rec["num_warps"], rec["num_stages"]], sort_keys=True)


def _resource_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory as ptxas reports them (``ptxas -v``, the one bundled with Triton)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        text = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        return {"ptxas": text[-300:]}
    return {"regs": int(regs.group(1)), "spills": int(spill.group(1)) + int(spill.group(2)) if spill else 0}


def _compile(rec: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(rec["module"])
    fn = getattr(mod, rec["name"])
    while not hasattr(fn, "params"):  # Autotuner / Heuristics wrappers
        fn = fn.fn
    signature, constexprs = {}, {}
    for p in fn.params:
        a = rec["args"][p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _val(a)
        elif "ptr" in a:
            signature[p.name] = "*" + a["ptr"]
        elif "desc" in a:
            signature[p.name] = f"tensordesc<{a['desc']}[{','.join(map(str, a['block']))}]>"
        elif "int" in a:
            signature[p.name] = "i32" if -2**31 <= a["int"] < 2**31 else "i64"
        elif "float" in a:
            signature[p.name] = "fp32"
        elif a.get("value") is None:
            signature[p.name], constexprs[p.name] = "constexpr", None
        else:
            signature[p.name] = "i1"
    # the specialization a real launch at SD shapes gets: 16-byte aligned pointers and strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if signature[p.name].startswith("*") or (p.name.startswith(("s_", "stride")) and
                                                       signature[p.name] in ("i32", "i64"))}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})
    info = {"compile_s": round(time.perf_counter() - t0, 2), "shared": k.metadata.shared}
    info.update(_resource_usage(k.asm["ptx"], arch))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config of the set-attention kernels")
    ap.add_argument("--no-spills", action="store_true",
                    help="also fail on register spills of the production path: sm_90, fp16/bf16 kernels (fp32/fp64 "
                         "variants exist for tests, sm_80 configs are tuned for H100; those spills are reported only)")
    ap.add_argument("--json", help="write the per-kernel report here")
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.record:
        _record(args.record)
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        rec_path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        subprocess.run([sys.executable, __file__, "--record", rec_path], check=True, env=env, cwd=ROOT)
        launches = json.loads(Path(rec_path).read_text())
    sys.path.insert(0, str(ROOT))
    todo = {}
    for rec in launches:
        for v in _variants(rec, args.all_configs):
            todo.setdefault(_key(v), v)
    report, failed, spilled = [], 0, 0
    for arch in args.arch or [90]:
        for rec in todo.values():
            if rec.get("min_arch", 0) > arch:
                continue
            consts = {k: _val(a) for k, a in rec["args"].items()
                      if k.isupper() and k not in ("H", "G", "L", "C", "HW", "R", "F", "P", "M", "K")}
            row = {"arch": arch, "kernel": rec["name"], "num_warps": rec["num_warps"], "num_stages": rec["num_stages"],
                   "dtype": next((a["ptr"] for a in rec["args"].values() if "ptr" in a), None), "constexprs": consts}
            try:
                row.update(_compile(rec, arch))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
                failed += 1
            spilled += bool(row.get("spills")) and arch == 90 and row["dtype"] in ("fp16", "bf16")
            if "shared" in row and row["shared"] > SMEM_LIMIT.get(arch, 101376):
                row["error"] = f"shared memory {row['shared']} B > {SMEM_LIMIT.get(arch, 101376)} B, the sm_{arch} limit"
                failed += 1
            report.append(row)
            status = row.get("error", "").splitlines()[-1][:150] if "error" in row else (
                f"regs {row.get('regs')} spills {row.get('spills')} smem {row['shared']} ({row['compile_s']} s)")
            short = {k: v for k, v in consts.items() if k in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_C",
                                                               "BLOCK_R", "BLOCK_F", "HAS_MASK", "SILU", "WIDE",
                                                               "WARP_SPEC")}
            print(f"sm_{arch} {rec['name']:28s} {row['dtype']} w{rec['num_warps']} s{rec['num_stages']} {short}: "
                  f"{status}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    n_spill = sum(bool(r.get("spills")) for r in report)
    max_smem = {a: max((r.get("shared", 0) for r in report if r["arch"] == a), default=0) for a in args.arch or [90]}
    print(f"{len(report)} compiles, {failed} failed, {n_spill} with spills ({spilled} on the production path: "
          f"sm_90 fp16/bf16); most shared memory per block: "
          + ", ".join(f"sm_{a} {m} B of {SMEM_LIMIT.get(a, 101376)}" for a, m in max_smem.items()))
    return 1 if failed or (args.no_spills and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
