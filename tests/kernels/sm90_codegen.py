"""Compile one set-attention pointer kernel for sm_90 without a GPU and summarize its PTX (run as a script, outside
the interpreter: ``@triton.jit`` under ``TRITON_INTERPRET=1`` gives interpreter functions, which cannot compile).

    python tests/kernels/sm90_codegen.py KERNEL BM BN WARPS STAGES ROW_STRIDE ROW_ALIGN [KERNEL ...]

KERNEL is fwd, dkdv or dq; the launch is bf16 at head dim 40 (chunks 32 + 16 in the backward, padded to 64 in the
forward, as the launchers choose), one set mask, L 200 (not a multiple of the tiles), every row stride ROW_STRIDE
elements and each image stride 200 x ROW_STRIDE; compiled by tools/sass_loop_mix.compile_kernel, with Triton's
divisibility-by-16 mark on the strides that are multiples of 16, as a real launch would have it. Prints a JSON list,
one object per launch (groups of seven arguments): the shared memory, and the count of each kind of global load,
cp.async and shared store, which tell the vectorized, pipelined code from the scalar one.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

L = 200


def compile_summary(kernel: str, bm: int, bn: int, warps: int, stages: int, row_stride: int, row_align: int) -> dict:
    import triton

    from sass_loop_mix import compile_kernel

    odd = tuple(f"stride_{t}{d}" for t in ("q", "k", "v", "do") for d, s in (("n", L * row_stride), ("l", row_stride))
                if s % 16)
    switches = dict(HAS_MASK=True, EVEN_N=False, EVEN_M=False, ROW_ALIGN=row_align)
    if kernel == "fwd":  # the launcher pads d 40 to one 64-column chunk in the forward
        switches.update(D0=64, HAS_D1=False)
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    k, _ = compile_kernel(kernel, 40, 90, config=cfg, odd_ints=odd, **switches)
    ops = Counter(re.findall(r"\b(ld\.global[.a-z0-9]*|cp\.async\.c[ag][.a-z0-9]*|st\.shared[.a-z0-9]*)", k.asm["ptx"]))
    return {"shared": k.metadata.shared, "ops": dict(sorted(ops.items()))}


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or len(args) % 7:
        sys.exit(__doc__)
    print(json.dumps([compile_summary(args[i], *map(int, args[i + 1:i + 7])) for i in range(0, len(args), 7)]))
