"""Compile one set-attention pointer kernel for sm_90 without a GPU and summarize its PTX (run as a script, outside
the interpreter: ``@triton.jit`` under ``TRITON_INTERPRET=1`` gives interpreter functions, which cannot compile).

    python tests/kernels/sm90_codegen.py KERNEL BM BN WARPS STAGES ROW_STRIDE ROW_ALIGN [KERNEL ...]

KERNEL is fwd, dkdv or dq; the launch is bf16 at head dim 40 (chunks 32 + 16 in the backward, padded to 64 in the
forward, as the launchers choose), one set mask, L 200 (not a multiple of the tiles), every row stride ROW_STRIDE
elements and each image stride 200 x ROW_STRIDE. Triton marks an int argument divisible by 16 when its value is, as
a real launch would. Prints a JSON list, one object per launch (groups of seven arguments): the shared memory, and
the count of each kind of global load, cp.async and shared store, which tell the vectorized, pipelined code from the
scalar one.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def compile_summary(kernel: str, bm: int, bn: int, warps: int, stages: int, row_stride: int, row_align: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from jedi_kernels.ops import set_attention as sa

    fn = {"fwd": sa._set_attn_fwd_kernel, "dkdv": sa._set_attn_bwd_dkdv_kernel, "dq": sa._set_attn_bwd_dq_kernel}[kernel]
    while not hasattr(fn, "params"):  # heuristics wrapper
        fn = fn.fn
    L = 200
    ints = {"H": 1, "G": 5, "L": L}
    for p in fn.params:
        if p.name.startswith("stride"):
            ints[p.name] = row_stride if p.name.endswith("l") else L * row_stride
    consts = dict(HEAD_DIM=40, HAS_MASK=True, DOT_F32=False, PREC="tf32", BLOCK_M=bm, BLOCK_N=bn, ROW_ALIGN=row_align)
    if kernel == "fwd":
        consts.update(D0=64, D1=16, HAS_D1=False, COUNT_TILES=False, EVEN_N=False, SCALE_POS=True, ROWSUM_DOT=False,
                      KV_LINEAR=True)
    else:
        consts.update(D0=32, D1=16, HAS_D1=True)
        consts.update(dict(FUSED_DQ=False, EVEN_M=False, Q_LINEAR=True) if kernel == "dkdv"
                      else dict(EVEN_N=False, KV_LINEAR=True))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", consts[p.name]
        elif p.name in ints:
            signature[p.name] = "i32"
            if ints[p.name] % 16 == 0:  # Triton's own specialization of an int argument
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in ("qk_scale_log2", "scale"):
            signature[p.name] = "fp32"
        else:  # pointers: 16-byte aligned allocations
            signature[p.name] = ("*fp32" if p.name in ("Lse", "Delta", "DQacc") else
                                 "*i32" if p.name in ("ImgList", "ImgCount", "TileCount") else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    ops = Counter(re.findall(r"\b(ld\.global[.a-z0-9]*|cp\.async\.c[ag][.a-z0-9]*|st\.shared[.a-z0-9]*)", k.asm["ptx"]))
    return {"shared": k.metadata.shared, "ops": dict(sorted(ops.items()))}


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) % 7:
        sys.exit(__doc__)
    print(json.dumps([compile_summary(args[i], *map(int, args[i + 1:i + 7])) for i in range(0, len(args), 7)]))
