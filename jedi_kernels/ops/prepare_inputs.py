"""Fused JeDi input preparation: ``out = cat(x_t, x0 * (1 - m), m)`` in one pass, and its backward.

Backends: "triton" (this file; GPU, or CPU under TRITON_INTERPRET=1), "cuda" / "cpu" (the compiled extension's
``jedi::prepare_inputs_ext``), "torch" (the reference). All are exact: the mask is 0 or 1, so ``x0 * (1 - m)`` is a
copy or a zero. The public op is ``jedi::prepare_inputs`` with a fake and an autograd formula, so it composes with
torch.compile and CUDA graphs.
"""
from __future__ import annotations

import torch

from jedi_kernels.ops import cdiv, next_pow2
from jedi_kernels.ops import memory_format_of as _fmt
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.reference import prepare_inputs_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the other backends still work
    triton = None

__all__ = ["prepare_inputs_op", "prep_fwd", "prep_bwd"]


def _channels_last(t: torch.Tensor) -> bool:
    """The layout rule shared with the C++ kernels: NHWC-contiguous and not also NCHW-contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


if triton is not None:

    @triton.jit
    def _masked_content(x, m, WIDE: tl.constexpr):
        """x * (1 - m) for x (BLOCK_P, BLOCK_C), m (BLOCK_P,). Math in fp64 for fp64 (WIDE), else in fp32: exact
        for m in {0, 1}, and no half-precision arithmetic (which the CPU interpreter gets wrong for bf16)."""
        if WIDE:
            return x * (1.0 - m.to(tl.float64))[:, None]
        return (x.to(tl.float32) * (1.0 - m.to(tl.float32))[:, None]).to(x.dtype)

    @triton.jit
    def _prepare_inputs_fwd_kernel(
        xt_ptr, x0_ptr, m_ptr, out_ptr,
        P, HW, C,
        s_xn, s_xc, s_xp,  # x_t / x0 strides: image, channel, pixel (h*W + w)
        s_on, s_oc, s_op,  # out strides
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
    ):
        """out[n, c] = x_t[n, c];  out[n, C + c] = x0[n, c] * (1 - m[n]);  out[n, 2C] = m[n].

        One program owns BLOCK_P pixels (flattened over (n, h, w)) and all channels: every input element is read
        once and every output element written once. Pixel strides work for NCHW and NHWC alike.
        """
        pid = tl.program_id(0)
        p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        pm = p < P
        n = p // HW
        hw = p % HW
        cm = pm[:, None] & (c[None, :] < C)
        src = (n * s_xn + hw * s_xp)[:, None] + c[None, :] * s_xc
        a = tl.load(xt_ptr + src, mask=cm)
        b = tl.load(x0_ptr + src, mask=cm)
        m = tl.load(m_ptr + n, mask=pm)
        dst = (n * s_on + hw * s_op)[:, None] + c[None, :] * s_oc
        tl.store(out_ptr + dst, a, mask=cm)
        tl.store(out_ptr + dst + C * s_oc, _masked_content(b, m, WIDE), mask=cm)
        tl.store(out_ptr + n * s_on + hw * s_op + 2 * C * s_oc, m, mask=pm)

    @triton.jit
    def _prepare_inputs_bwd_kernel(
        g_ptr, m_ptr, gx_ptr, g0_ptr,
        P, HW, C,
        s_gn, s_gc, s_gp,  # grad_out strides
        s_xn, s_xc, s_xp,  # grad_x_t / grad_x0 strides
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
    ):
        """grad_x_t = g[:, :C];  grad_x0 = g[:, C:2C] * (1 - m). The mask channel gets no gradient."""
        pid = tl.program_id(0)
        p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        pm = p < P
        n = p // HW
        hw = p % HW
        cm = pm[:, None] & (c[None, :] < C)
        src = (n * s_gn + hw * s_gp)[:, None] + c[None, :] * s_gc
        g1 = tl.load(g_ptr + src, mask=cm)
        g2 = tl.load(g_ptr + src + C * s_gc, mask=cm)
        m = tl.load(m_ptr + n, mask=pm)
        dst = (n * s_xn + hw * s_xp)[:, None] + c[None, :] * s_xc
        tl.store(gx_ptr + dst, g1, mask=cm)
        tl.store(g0_ptr + dst, _masked_content(g2, m, WIDE), mask=cm)


def _block_p(block_c: int) -> int:
    # ~2K elements of each input per program: big enough to stream, small enough for many programs per SM
    return max(16, 2048 // block_c)


def prep_fwd(x_t: torch.Tensor, x0: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the forward. x_t, x0: (N, C, H, W); m: (N,) in x_t's dtype. Returns (N, 2C+1, H, W)."""
    fmt = _fmt(x_t)
    x_t, x0, m = x_t.contiguous(memory_format=fmt), x0.contiguous(memory_format=fmt), m.contiguous()
    N, C, H, W = x_t.shape
    out = torch.empty((N, 2 * C + 1, H, W), device=x_t.device, dtype=x_t.dtype, memory_format=fmt)
    P, HW = N * H * W, H * W
    bc = next_pow2(C)
    bp = _block_p(bc)
    launch(
        _prepare_inputs_fwd_kernel, (cdiv(P, bp),),
        x_t, x0, m, out, P, HW, C,
        x_t.stride(0), x_t.stride(1), x_t.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        BLOCK_P=bp, BLOCK_C=bc, WIDE=x_t.dtype == torch.float64,
    )
    return out


def prep_bwd(grad: torch.Tensor, m: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of the backward. grad: (N, 2C+1, H, W). Returns (grad_x_t, grad_x0), each (N, C, H, W)."""
    fmt = _fmt(grad)
    grad, m = grad.contiguous(memory_format=fmt), m.contiguous()
    N, _, H, W = grad.shape
    gx = torch.empty((N, C, H, W), device=grad.device, dtype=grad.dtype, memory_format=fmt)
    g0 = torch.empty_like(gx)
    P, HW = N * H * W, H * W
    bc = next_pow2(C)
    bp = _block_p(bc)
    launch(
        _prepare_inputs_bwd_kernel, (cdiv(P, bp),),
        grad, m, gx, g0, P, HW, C,
        grad.stride(0), grad.stride(1), grad.stride(3),
        gx.stride(0), gx.stride(1), gx.stride(3),
        BLOCK_P=bp, BLOCK_C=bc, WIDE=grad.dtype == torch.float64,
    )
    return gx, g0


def _torch_bwd(grad: torch.Tensor, m: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = _fmt(grad)
    keep = (1 - m).view(-1, 1, 1, 1)
    # clone, not contiguous: with batch 1 the slice is already contiguous, and a custom op may not return its input
    return (grad[:, :C].clone(memory_format=fmt), (grad[:, C : 2 * C] * keep).contiguous(memory_format=fmt))


@torch.library.custom_op("jedi::prepare_inputs", mutates_args=())
def _prepare_inputs(x_t: torch.Tensor, x0: torch.Tensor, ng_mask: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return prep_fwd(x_t, x0, ng_mask)
    if backend in ("cpu", "cuda"):
        return torch.ops.jedi.prepare_inputs_ext(x_t, x0, ng_mask)
    return prepare_inputs_reference(x_t, x0, ng_mask).contiguous(memory_format=_fmt(x_t))


@_prepare_inputs.register_fake
def _(x_t, x0, ng_mask, backend):
    N, C, H, W = x_t.shape
    return x_t.new_empty((N, 2 * C + 1, H, W)).contiguous(memory_format=_fmt(x_t))


@torch.library.custom_op("jedi::prepare_inputs_backward", mutates_args=())
def _prepare_inputs_backward(
    grad_out: torch.Tensor, ng_mask: torch.Tensor, channels: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return prep_bwd(grad_out, ng_mask, channels)
    if backend in ("cpu", "cuda"):
        return torch.ops.jedi.prepare_inputs_backward_ext(grad_out, ng_mask, channels)
    return _torch_bwd(grad_out, ng_mask, channels)


@_prepare_inputs_backward.register_fake
def _(grad_out, ng_mask, channels, backend):
    N, _, H, W = grad_out.shape
    g = grad_out.new_empty((N, channels, H, W)).contiguous(memory_format=_fmt(grad_out))
    return g, torch.empty_like(g)


def _setup_context(ctx, inputs, output):
    x_t, x0, ng_mask, backend = inputs
    ctx.save_for_backward(ng_mask)
    ctx.channels, ctx.backend = x_t.shape[1], backend


def _backward(ctx, grad_out):
    (ng_mask,) = ctx.saved_tensors
    gx, g0 = torch.ops.jedi.prepare_inputs_backward(grad_out, ng_mask, ctx.channels, ctx.backend)
    return gx, g0, None, None


_prepare_inputs.register_autograd(_backward, setup_context=_setup_context)


def prepare_inputs_op(x_t: torch.Tensor, x0: torch.Tensor, ng_mask: torch.Tensor, backend: str) -> torch.Tensor:
    """The differentiable op behind ``jedi_kernels.prepare_inputs`` (inputs already validated, mask in x_t's dtype)."""
    return torch.ops.jedi.prepare_inputs(x_t, x0, ng_mask, backend)
