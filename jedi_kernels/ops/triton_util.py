"""Triton helpers shared by the elementwise kernels (GEGLU, the residual add, the sub-pixel interleave)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backends still work
    triton = None

__all__ = ["to_out", "bf16_rne"]

if triton is not None:

    @triton.jit
    def to_out(x, out_ptr, BF16_RNE: tl.constexpr):
        """Round fp32/fp64 math to the output dtype once, to nearest even. BF16_RNE (only under the CPU interpreter,
        whose fp32 -> bf16 cast truncates toward zero where the GPU rounds to nearest even) rounds bf16 by hand:
        add half an ulp of bf16 (minus one on ties to an even mantissa) to the fp32 bits and keep the top 16."""
        if BF16_RNE:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(out_ptr.dtype.element_ty)


def bf16_rne(kernel, out: torch.Tensor) -> bool:
    """The BF16_RNE switch of :func:`to_out` for ``kernel`` writing ``out``: by hand only where Triton is interpreted
    and the output is bf16 (GPUs use the native cast)."""
    return type(kernel).__name__ == "InterpretedFunction" and out.dtype == torch.bfloat16
