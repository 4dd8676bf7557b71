"""A residual add with a per-channel bias in one pass: ``out = x + residual + bias[c]`` over (N, C, H, W).

SD's ResBlocks end in ``skip(x) + conv2(h)`` and its SpatialTransformers in ``x + proj_out(t)``. cuDNN convolutions
take no bias, so torch adds a conv's bias in a pass of its own (the strided broadcast kernel, ≈ 1.3 TB/s on the
H200), and cuBLASLt's bias epilogue on the 1x1 convs' GEMMs picked a slower kernel than the plain GEMM at the 64x64
level (15.2 against 8.2 µs, H200 profile). Here the residual add takes the bias: one read of x, one of the residual,
one write, the (C,) bias loaded once per tile, math in float32 (float64 for float64) and rounded once.

Backends: "triton" (this file; GPU, or CPU under TRITON_INTERPRET=1) and "torch" (``reference.residual_add_reference``:
two adds in the input dtype). The op is ``jedi::residual_add`` with a fake and an autograd formula (dx = dr = grad,
dbias = its per-channel sum), so it composes with torch.compile and CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

from jedi_kernels.ops import cdiv, eager_call, next_pow2
from jedi_kernels.ops import memory_format_of as _fmt
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.ops.triton_util import bf16_rne
from jedi_kernels.reference import residual_add_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["residual_add_fwd", "residual_add_op"]


if triton is not None:
    from jedi_kernels.ops.triton_util import to_out as _to_out

    @triton.jit
    def _residual_add_kernel(
        x_ptr, r_ptr, b_ptr, y_ptr,
        C, HW,
        s_xn, s_xc, s_xp,  # x strides: image, channel, pixel (h * W + w)
        s_rn, s_rc, s_rp,  # residual strides
        s_yn, s_yc, s_yp,  # output strides (x's memory format)
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr,
        BF16_RNE: tl.constexpr,
    ):
        """y[n, c, p] = x[n, c, p] + r[n, c, p] + bias[c] for one (image, channel block, pixel tile)."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        acc_t = tl.float64 if WIDE else tl.float32
        cm = c < C
        m = (p < HW)[:, None] & cm[None, :]
        x = tl.load(x_ptr + n * s_xn + p[:, None] * s_xp + c[None, :] * s_xc, mask=m, other=0.0).to(acc_t)
        r = tl.load(r_ptr + n * s_rn + p[:, None] * s_rp + c[None, :] * s_rc, mask=m, other=0.0).to(acc_t)
        y = x + r
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=cm, other=0.0).to(acc_t)[None, :]
        tl.store(y_ptr + n * s_yn + p[:, None] * s_yp + c[None, :] * s_yc, _to_out(y, y_ptr, BF16_RNE), mask=m)


def _pixel_stride(t: torch.Tensor) -> Optional[int]:
    """The stride of pixel p = h * W + w of an (N, C, H, W) tensor, or None when h and w do not flatten into one."""
    _, _, H, W = t.shape
    if H == 1:
        return t.stride(3)
    if W == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == W * t.stride(3) else None


def _offsets_fit_int32(t: torch.Tensor) -> bool:
    """The kernel's offsets inside one image, (HW - 1) * pixel stride + (C - 1) * channel stride, fit in int32."""
    _, C, H, W = t.shape
    return (H * W - 1) * abs(_pixel_stride(t)) + (C - 1) * abs(t.stride(1)) < 2**31


def residual_add_fwd(x: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton launcher.

    Args:
        x, residual: (N, C, H, W), same dtype and device, any strides (a tensor whose (H, W) do not flatten into one
            pixel stride is copied). bias: (C,) any float dtype, or None.

    Returns:
        (N, C, H, W) in x's dtype and memory format (channels-last x: channels-last out; other strides: NCHW).
    """
    N, C, H, W = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_fmt(x))
    if out.numel() == 0:
        return out
    if _pixel_stride(x) is None:
        x = x.contiguous(memory_format=_fmt(x))
    if _pixel_stride(residual) is None:
        residual = residual.contiguous(memory_format=_fmt(x))
    if not all(_offsets_fit_int32(t) for t in (x, residual, out)):
        raise ValueError("residual_add: offsets inside one image exceed int32 (the kernel indexes an image with int32); "
                         "use backend='torch'")
    if bias is not None:
        bias = bias.contiguous()
    HW = H * W
    block_c = min(64, next_pow2(C))
    block_p = max(1, min(2048 // block_c, next_pow2(HW)))
    grid = (N, cdiv(C, block_c), cdiv(HW, block_p))
    launch(
        _residual_add_kernel, grid,
        x, residual, bias if bias is not None else x, out, C, HW,
        x.stride(0), x.stride(1), _pixel_stride(x),
        residual.stride(0), residual.stride(1), _pixel_stride(residual),
        out.stride(0), out.stride(1), _pixel_stride(out),
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, WIDE=x.dtype == torch.float64,
        BF16_RNE=bf16_rne(_residual_add_kernel, out),
        num_warps=4,
    )
    return out


def _fwd_body(x, residual, bias, backend):
    """What ``jedi::residual_add`` runs (and the eager paths)."""
    if backend == "triton":
        return residual_add_fwd(x, residual, bias)
    return residual_add_reference(x, residual, bias).contiguous(memory_format=_fmt(x))


@torch.library.custom_op("jedi::residual_add", mutates_args=())
def _residual_add(x: torch.Tensor, residual: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _fwd_body(x, residual, bias, backend)


@_residual_add.register_fake
def _(x, residual, bias, backend):
    return torch.empty_like(x, memory_format=_fmt(x))


def _setup_context(ctx, inputs, output):
    x, residual, bias, backend = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    """dx = dresidual = grad; dbias = grad summed over images and pixels, in the bias's dtype."""
    needs = ctx.needs_input_grad
    db = grad.sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[2] else None
    return (grad if needs[0] else None, grad if needs[1] else None, db, None)


_residual_add.register_autograd(_backward, setup_context=_setup_context)


class _ResidualAddEager(torch.autograd.Function):
    """Eager calls that record autograd: ``jedi::residual_add``'s forward and backward without the custom op's
    dispatch layers (see :func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, x, residual, bias, backend):
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _fwd_body(x, residual, bias, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _backward(ctx, grad)


def residual_add_op(x, residual, bias, backend) -> torch.Tensor:
    """The differentiable op behind ``jedi_kernels.residual_add`` (inputs validated, backend resolved): the custom op
    while compiling and for tensor subclasses, its kernel directly on eager calls."""
    how = eager_call(x, residual, bias)
    if how == "direct":
        return _fwd_body(x, residual, bias, backend)
    if how == "function":
        return _ResidualAddEager.apply(x, residual, bias, backend)
    return torch.ops.jedi.residual_add(x, residual, bias, backend)
