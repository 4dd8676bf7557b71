"""SD's ``Upsample``, nearest 2x upsampling then a 3x3 convolution, as a sub-pixel convolution of the small input.

Nearest upsampling repeats every pixel of x (N, C, H, W) in a 2x2 block, so each output pixel (2i + a, 2j + b) of the
3x3 convolution sees only 2x2 distinct input pixels: rows (i - 1, i) for a = 0, (i, i + 1) for a = 1, and the same for
columns. Summing the 3x3 taps that land on the same input pixel gives, per phase p = 2a + b, a 2x2 kernel applied to
x itself (with the row fold R_0 = [[1, 0, 0], [0, 1, 1]], R_1 = [[1, 1, 0], [0, 0, 1]] on both axes)::

    K_p[o, c, k, l] = sum_{u, v} R_a[k, u] R_b[l, v] W[o, c, u, v]
    y[n, o, 2i + a, 2j + b] = bias[o] + sum_{c, k, l} K_p[o, c, k, l] x[n, c, i + a - 1 + k, j + b - 1 + l]

All four phases are one convolution of x with padding 1 and 4 * C_out output channels (channel 4 o + p holds phase p
of channel o), whose (H + 1) x (W + 1) output z holds phase (a, b) of y at rows a .. a + H - 1 and columns
b .. b + W - 1::

    y[n, o, 2i + a, 2j + b] = z[n, 4 o + 2a + b, i + a, j + b] + bias[o]

That costs 16 multiply-adds per (input pixel, C_in, C_out) where the upsampled convolution costs 36 (0.44x the FLOPs)
and never writes the 4x larger upsampled input; the interleave (this file's kernel) reads z once, adds the bias and
writes y once (torch adds a cuDNN convolution's bias in a pass of its own). The folded weights are computed on every
call (one small batched GEMM: 9 taps read, 16 written per (C_out, C_in)), so weight updates need no care.

Backends of the interleave: "triton" (this file; GPU, or CPU under TRITON_INTERPRET=1) and "torch"
(:func:`interleave_torch`, slices and stacks). The op is ``jedi::upsample_interleave`` with a fake and an autograd
formula (its adjoint in torch ops), so it composes with torch.compile and CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch

from jedi_kernels.ops import cdiv, eager_call, next_pow2
from jedi_kernels.ops import memory_format_of as _fmt
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.ops.triton_util import bf16_rne

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["fold_weight", "interleave_fwd", "interleave_torch", "upsample_interleave_op"]


def _fold_matrix() -> torch.Tensor:
    """(16, 9) float64: row (p = 2a + b, k, l), column (u, v) holds R_a[k, u] * R_b[l, v]."""
    r = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # (a, k, u)
    # (a, k, u) x (b, l, v) -> (a, b, k, l, u, v)
    m = r[:, None, :, None, :, None] * r[None, :, None, :, None, :]
    return m.reshape(16, 9)


_FOLD = _fold_matrix()
_FOLD_CACHE: dict = {}


def _fold_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fold matrix on ``device`` in ``dtype`` (entries 0 and 1: exact in every float dtype), made once."""
    key = (device, dtype)
    m = _FOLD_CACHE.get(key)
    if m is None:
        m = _FOLD_CACHE[key] = _FOLD.to(device=device, dtype=dtype)
    return m


def fold_weight(weight: torch.Tensor, memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """The sub-pixel kernels of a 3x3 convolution weight (module docstring).

    Args:
        weight: (C_out, C_in, 3, 3) any float dtype and layout.
        memory_format: of the result (the convolution's input's, so that torch keeps the activations' layout).

    Returns:
        (4 * C_out, C_in, 2, 2) in weight's dtype: channel 4 o + p is phase p = 2a + b of output channel o. Each entry
        is a sum of 1, 2 or 4 taps, accumulated in float32 (float64 for float64) and rounded once. Differentiable.
    """
    c_out, c_in = weight.shape[:2]
    m = _fold_on(weight.device, weight.dtype)
    # (C_out, C_in, 3, 3) -> (C_out, 9, C_in): a view for channels-last weights (the layout a channels-last model
    # keeps), then (16, 9) @ (C_out, 9, C_in) -> (C_out, 16, C_in), i.e. (C_out, p, k, l, C_in): channels-last memory
    # of the (4 C_out, C_in, 2, 2) result
    folded = torch.matmul(m, weight.flatten(2).transpose(1, 2))
    out = folded.view(4 * c_out, 2, 2, c_in).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=memory_format)


def interleave_torch(z: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The interleave in torch ops: z (N, 4C, H + 1, W + 1) -> y (N, C, 2H, 2W) in z's dtype and memory format,
    ``y[:, o, 2i + a, 2j + b] = z[:, 4 o + 2a + b, i + a, j + b] + bias[o]`` (added in z's dtype)."""
    N, C4, H1, W1 = z.shape
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    zz = z.unflatten(1, (C, 2, 2))  # (N, C, a, b, H + 1, W + 1)
    # (N, C, H, W) per phase -> stack b last, then a before W: (N, C, H, a, W, b) -> (N, C, 2H, 2W)
    rows = [torch.stack([zz[:, :, a, b, a:a + H, b:b + W] for b in (0, 1)], dim=-1) for a in (0, 1)]
    y = torch.stack(rows, dim=-3).reshape(N, C, 2 * H, 2 * W)
    if bias is not None:
        y = y + bias.to(z.dtype)[None, :, None, None]
    return y.contiguous(memory_format=_fmt(z))


def _interleave_adjoint(grad: torch.Tensor, z_shape, need_bias: bool):
    """(dz (N, 4C, H + 1, W + 1) in grad's memory format, dbias (C,) float or None) of :func:`interleave_torch`:
    each z entry feeds at most one y entry (the border rows and columns a phase does not use get zeros)."""
    N, C4, H1, W1 = z_shape
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    g = grad.reshape(N, C, H, 2, W, 2)  # (n, o, i, a, j, b)
    dz = grad.new_zeros((N, C, 2, 2, H1, W1))
    for a in (0, 1):
        for b in (0, 1):
            dz[:, :, a, b, a:a + H, b:b + W] = g[:, :, :, a, :, b]
    dz = dz.view(N, C4, H1, W1).contiguous(memory_format=_fmt(grad))
    db = grad.sum((0, 2, 3)) if need_bias else None
    return dz, db


if triton is not None:
    from jedi_kernels.ops.triton_util import to_out as _to_out

    @triton.jit
    def _interleave_kernel(
        z_ptr, b_ptr, y_ptr,
        C, H, W,
        s_zn, s_zc, s_zh, s_zw,  # z (N, 4C, H + 1, W + 1)
        s_yn, s_yc, s_yh, s_yw,  # y (N, C, 2H, 2W)
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr,
        BF16_RNE: tl.constexpr,
    ):
        """y[n, o, 2(r - a) + a, 2(s - b) + b] = z[n, 4 o + 2a + b, r, s] + bias[o] for a (pixel block, channel
        block) of z's pixels (r, s) of image n and the four phases (a, b): every z entry is read at most once (the
        phases' unused border row and column are skipped), every y entry written once. The four phase loads of a
        pixel read the same 4 * BLOCK_C contiguous channels (channels-last) in strides of 4, from L1 after the first."""
        n = tl.program_id(0).to(tl.int64)
        q = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # z pixel index r * (W + 1) + s
        o = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc_t = tl.float64 if WIDE else tl.float32
        W1 = W + 1
        r = q // W1
        s = q % W1
        qm = q < (H + 1) * W1
        om = o < C
        if HAS_BIAS:
            bias = tl.load(b_ptr + o, mask=om, other=0.0).to(acc_t)
        z_img = z_ptr + n * s_zn
        y_img = y_ptr + n * s_yn
        for p in tl.static_range(4):
            a = p // 2
            b = p % 2
            i = r - a  # output pixel (2i + a, 2j + b)
            j = s - b
            ok = qm & (i >= 0) & (i < H) & (j >= 0) & (j < W)
            m = ok[:, None] & om[None, :]
            v = tl.load(z_img + (r * s_zh + s * s_zw)[:, None] + (4 * o + p)[None, :] * s_zc, mask=m, other=0.0)
            v = v.to(acc_t)
            if HAS_BIAS:
                v = v + bias[None, :]
            dst = ((2 * i + a) * s_yh + (2 * j + b) * s_yw)[:, None] + o[None, :] * s_yc
            tl.store(y_img + dst, _to_out(v, y_ptr, BF16_RNE), mask=m)


def interleave_fwd(z: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton launcher of the interleave.

    Args:
        z: (N, 4C, H + 1, W + 1) float16/bfloat16/float32/float64 on a device Triton runs on, any strides (int32
            offsets inside one image: < 2**31 elements of z and of y per image).
        bias: (C,) any float dtype, or None.

    Returns:
        y (N, C, 2H, 2W) in z's dtype and memory format (channels-last z: channels-last y), math in float32 (float64
        for float64) and rounded once.
    """
    N, C4, H1, W1 = z.shape
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    y = torch.empty((N, C, 2 * H, 2 * W), device=z.device, dtype=z.dtype, memory_format=_fmt(z))
    if y.numel() == 0:
        return y
    if z.numel() // N >= 2**31 or y.numel() // N >= 2**31:
        raise ValueError("upsample_interleave: one image has >= 2**31 elements; the kernel indexes an image with "
                         "int32; use backend='torch'")
    if bias is not None:
        bias = bias.contiguous()
    # 16 x 64 tiles: 8 outputs per thread and phase (32 x 64 spilled on sm_90 with a runtime channel stride,
    # tools/triton_aot_check.py)
    block_c = min(64, next_pow2(C))
    block_p = max(1, 1024 // block_c)
    grid = (N, cdiv(H1 * W1, block_p), cdiv(C, block_c))
    launch(
        _interleave_kernel, grid,
        z, bias if bias is not None else z, y, C, H, W, *z.stride(), *y.stride(),
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, WIDE=z.dtype == torch.float64,
        BF16_RNE=bf16_rne(_interleave_kernel, y), num_warps=4,
    )
    return y


def _fwd_body(z: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """What ``jedi::upsample_interleave`` runs (and the eager paths)."""
    if backend == "triton":
        return interleave_fwd(z, bias)
    return interleave_torch(z, bias)


@torch.library.custom_op("jedi::upsample_interleave", mutates_args=())
def _upsample_interleave(z: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _fwd_body(z, bias, backend)


@_upsample_interleave.register_fake
def _(z, bias, backend):
    N, C4, H1, W1 = z.shape
    return z.new_empty((N, C4 // 4, 2 * (H1 - 1), 2 * (W1 - 1))).contiguous(memory_format=_fmt(z))


def _grads(grad, z_shape, bias, needs):
    dz, db = _interleave_adjoint(grad, z_shape, bias is not None and needs[1])
    return (dz if needs[0] else None, db.to(bias.dtype) if db is not None else None, None)


def _setup_context(ctx, inputs, output):
    z, bias, backend = inputs
    ctx.z_shape = tuple(z.shape)
    ctx.save_for_backward(bias)


def _backward(ctx, grad):
    (bias,) = ctx.saved_tensors
    return _grads(grad, ctx.z_shape, bias, ctx.needs_input_grad)


_upsample_interleave.register_autograd(_backward, setup_context=_setup_context)


class _InterleaveEager(torch.autograd.Function):
    """Eager calls that record autograd: ``jedi::upsample_interleave``'s forward and backward without the custom
    op's dispatch layers (see :func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, z, bias, backend):
        ctx.z_shape = tuple(z.shape)
        ctx.save_for_backward(bias)
        return _fwd_body(z, bias, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (bias,) = ctx.saved_tensors
        return _grads(grad, ctx.z_shape, bias, ctx.needs_input_grad)


def upsample_interleave_op(z: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """The differentiable interleave behind ``jedi_kernels.upsample_conv2d`` (inputs validated, backend resolved):
    the custom op while compiling and for tensor subclasses, its kernels directly on eager calls."""
    how = eager_call(z, bias)
    if how == "direct":
        return _fwd_body(z, bias, backend)
    if how == "function":
        return _InterleaveEager.apply(z, bias, backend)
    return torch.ops.jedi.upsample_interleave(z, bias, backend)
