"""Static instruction mix of the set-attention forward's main loop, compiled for sm_90 without a GPU.

    python tools/sass_loop_mix.py [--arch 90] [--cuda]

Compiles ``_set_attn_fwd_kernel`` (bf16, SD's head dims 40/80/160, the default GPU config of each class) with the
variants of its per-element work (``SCALE_POS``: scale folded into one FFMA; ``ROWSUM_DOT``: row sums on the tensor
cores), disassembles the cubin with the cuobjdump that ships with Triton and counts the SASS opcodes of the main loop
(the longest backward branch): instructions per warp and 128x64 tile, MUFU (exp2), FP32-pipe ops, HGMMA, SHFL.

``--cuda`` adds the CUDA C++ forward instances (nvcc, the flags of torch's extension build) per 1024 score elements
next to the Triton kernel's production variant, so the two designs (wgmma vs mma.sync) compare per unit of work.

This is a static proxy, not a timing: it tells how many issue slots, exp-unit and FP32 operations one tile costs, the
quantities that bound the loop at small head dims (at d = 40 a warp's tile needs ~8 clocks of the exp unit per MUFU
instruction and one issue slot per instruction, against ~384 clocks of tensor-core work). GPU timings decide.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FP32_PIPE = ("FMUL", "FADD", "FFMA", "FMNMX", "F2FP", "FSEL", "FSETP")


def compile_fwd(D: int, arch: int, *, dtype: str = "bf16", **switches):
    """The forward kernel for head dim D with its class's default GPU config; ``switches`` override constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from jedi_kernels.ops import set_attention as sa

    D0, D1 = sa.head_dim_chunks(D, True)
    cfg = sa._FWD_CONFIGS[sa._dclass(D0, D1, None)][0]
    fn = sa._set_attn_fwd_kernel
    while not hasattr(fn, "params"):
        fn = fn.fn
    values = dict(HEAD_DIM=D, D0=D0, D1=max(D1, 16), HAS_D1=D1 > 0, HAS_MASK=False, COUNT_TILES=False,
                  DOT_F32=False, PREC="tf32", EVEN_N=True, SCALE_POS=True, ROWSUM_DOT=False, **cfg.kwargs)
    values.update(switches)
    sig, const = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", values[p.name]
        elif p.name in ("Q", "K", "V", "Out"):
            sig[p.name] = "*" + dtype
        elif p.name == "Lse":
            sig[p.name] = "*fp32"
        elif p.name in ("ImgList", "ImgCount", "TileCount"):
            sig[p.name] = "*i32"
        elif p.name == "qk_scale_log2":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or p.name.startswith("stride")}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin (the cuobjdump that ships with Triton)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loop_mix(kernel) -> tuple[collections.Counter, int]:
    """(opcode counts, instruction count) of the Triton kernel's main loop: the span of its longest backward branch."""
    return sass_loop_mix(_sass(kernel.asm["cubin"]))


def cuda_fwd_sass(D: int, arch: int, dtype: str = "bf16") -> str:
    """SASS of the CUDA C++ forward instance serving head dim D (csrc/cuda/set_attention_fwd_hdim<D>.cu), compiled
    with nvcc as torch's extension build compiles it; only the ``dtype`` instantiation's function."""
    src = ROOT / "csrc" / "cuda" / f"set_attention_fwd_hdim{D}.cu"
    flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'cuda'}",
                        "-cubin", f"-arch=sm_{arch}", *flags, "-o", str(out), str(src)], check=True)
        sass = _sass(out.read_bytes())
    want = "13__nv_bfloat16" if dtype == "bf16" else "6__half"
    blocks = re.split(r"\n\s*Function : ", sass)
    return next(b for b in blocks[1:] if b.split("\n", 1)[0].split("I", 1)[-1].startswith(want))


def sass_loop_mix(sass: str) -> tuple[collections.Counter, int]:
    """(opcode counts, instruction count) of the main loop of SASS text: the span of its longest backward branch."""
    pat = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(.*)")
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(pat.match, sass.splitlines()) if m]
    span = None
    for addr, op, rest in instrs:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", op + rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            if span is None or addr - lo > span[1] - span[0]:
                span = (lo, addr)
    body = [op for addr, op, _ in instrs if span is None or span[0] <= addr <= span[1]]
    return collections.Counter(body), len(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cuda", action="store_true", help="also the CUDA C++ forward instances (needs nvcc), per score "
                    "element next to the Triton kernel's best variant")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    variants = (("unfused scale, FADD row sums", dict(SCALE_POS=False, ROWSUM_DOT=False)),
                ("FFMA scale, FADD row sums", dict(SCALE_POS=True, ROWSUM_DOT=False)),
                ("FFMA scale, row sums by P.1", dict(SCALE_POS=True, ROWSUM_DOT=True)))
    print(f"sm_{args.arch}, bf16, per warp and key tile of the forward's main loop")
    for D in (40, 80, 160):
        for label, sw in variants:
            ops, n = loop_mix(compile_fwd(D, args.arch, **sw))
            fp32 = sum(ops[o] for o in FP32_PIPE)
            print(f"  D={D:3d} {label:30s} instructions {n:4d}  MUFU {ops['MUFU']:3d}  FP32 {fp32:4d}  "
                  f"HGMMA {ops['HGMMA']:3d}  SHFL {ops['SHFL']:3d}")
    if args.cuda:
        # per score element of a warp's share of one key tile: Triton's tile is BLOCK_M x BLOCK_N over num_warps
        # warps; the CUDA kernel's warp owns 16 query rows x block_n keys (mma.sync m16n8k16)
        from jedi_kernels.ops import set_attention as sa

        print(f"per 1024 score elements (one warp's work), sm_{args.arch}, bf16: Triton (FFMA scale, P.1 row sums) "
              f"vs CUDA C++ (csrc/cuda/set_attention_fwd_hdim<D>.cu, mma.sync)")
        for D in (40, 80, 160):
            D0, D1 = sa.head_dim_chunks(D, True)
            cfg = sa._FWD_CONFIGS[sa._dclass(D0, D1, None)][0]
            per_warp = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / cfg.num_warps
            rows = [("triton", *loop_mix(compile_fwd(D, args.arch, SCALE_POS=True, ROWSUM_DOT=D <= 64)), per_warp),
                    ("cuda", *sass_loop_mix(cuda_fwd_sass(D, args.arch)), 16 * 64)]
            for name, ops, n, elems in rows:
                k = 1024 / elems
                fp32 = sum(ops[o] for o in FP32_PIPE)
                mma = ops["HGMMA"] + ops["HMMA"]
                print(f"  D={D:3d} {name:6s} instructions {n * k:6.0f}  MUFU {ops['MUFU'] * k:5.0f}  "
                      f"FP32 {fp32 * k:5.0f}  MMA {mma * k:4.0f} ({'HGMMA' if ops['HGMMA'] else 'HMMA'})  "
                      f"SHFL {ops['SHFL'] * k:4.0f}  LDSM {ops['LDSM'] * k:4.0f}  BAR {ops['BAR'] * k:3.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
