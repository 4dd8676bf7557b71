"""Fused GEGLU, SD's feed-forward activation: ``out = a * gelu(g)`` with ``[a, g] = h.chunk(2, -1)``, and its backward.

Maths, with the exact (erf) gelu that ``torch.nn.functional.gelu`` uses by default::

    Phi(g)   = 0.5 * (1 + erf(g / sqrt(2)))           standard normal CDF
    phi(g)   = exp(-g^2 / 2) / sqrt(2 * pi)            standard normal PDF
    gelu(g)  = g * Phi(g)
    gelu'(g) = Phi(g) + g * phi(g)

    forward:  out = a * gelu(g)                                       h: (R, 2F) -> out: (R, F)
    backward: da = grad * gelu(g);  dg = grad * a * gelu'(g)          dh = [da, dg]: (R, 2F)

R is the product of h's leading dims. The torch reference (chunk, gelu, multiply) runs a gelu kernel that writes an
(R, F) temporary and a multiply that reads it back: 5 R*F element moves where the fused kernels need 3 (read h, write
out). Math runs in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64 inputs, and is rounded once to h's dtype.

Backends: "triton" (this file; GPU, or CPU under TRITON_INTERPRET=1) and "torch" (the reference forward and the
formula above in torch ops). The public op is ``jedi::geglu`` with a fake and an autograd formula that calls
``jedi::geglu_backward``, so it composes with torch.compile and CUDA graphs.
"""
from __future__ import annotations

import math

import torch

from jedi_kernels.ops import cdiv, eager_call, fast_launch, next_pow2, rows_view
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.ops.triton_util import bf16_rne
from jedi_kernels.reference import geglu_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["geglu_op", "geglu_fwd", "geglu_bwd"]

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


if triton is not None:
    from jedi_kernels.ops.triton_util import to_out as _to_out

    # constexpr so the jit may read them; Python floats stay weakly typed, so in fp64 math they keep full precision
    _C_SQRT1_2 = tl.constexpr(_SQRT1_2)
    _C_INV_SQRT_2PI = tl.constexpr(_INV_SQRT_2PI)

    @triton.jit
    def _geglu_fwd_kernel(
        h_ptr, out_ptr,
        R, F,
        s_hr,  # h row stride (elements); the feature stride is 1
        s_or,  # out row stride
        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, WIDE: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        """out[r, f] = h[r, f] * gelu(h[r, F + f]),  gelu(g) = 0.5 * g * (1 + erf(g / sqrt(2))).

        One program owns a (BLOCK_R, BLOCK_F) tile of the output and reads the matching value and gate tiles, so
        every element of h is read once and every output element written once. Math in fp64 when WIDE (fp64 input),
        else in fp32 (half inputs never do half-precision arithmetic); the result is rounded once on store.
        """
        pid_r = tl.program_id(0)
        pid_f = tl.program_id(1)
        r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
        m = (r < R)[:, None] & (f < F)[None, :]
        src = (r * s_hr)[:, None] + f[None, :]
        a = tl.load(h_ptr + src, mask=m, other=0.0)
        g = tl.load(h_ptr + src + F, mask=m, other=0.0)
        if WIDE:
            a = a.to(tl.float64)
            g = g.to(tl.float64)
        else:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        out = a * (0.5 * g * (1.0 + tl.erf(g * _C_SQRT1_2)))
        dst = (r * s_or)[:, None] + f[None, :]
        tl.store(out_ptr + dst, _to_out(out, out_ptr, BF16_RNE), mask=m)

    @triton.jit
    def _geglu_bwd_kernel(
        grad_ptr, h_ptr, dh_ptr,
        R, F,
        s_gr,  # grad row stride; feature stride 1
        s_hr,  # h row stride; feature stride 1
        s_dr,  # dh row stride
        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, WIDE: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        """dh[r, f] = grad[r, f] * gelu(g);  dh[r, F + f] = grad[r, f] * a * (Phi(g) + g * phi(g)),

        with a = h[r, f], g = h[r, F + f], Phi(g) = 0.5 * (1 + erf(g / sqrt(2))), phi(g) = exp(-g^2 / 2) / sqrt(2 pi).
        Reads grad and h once, writes dh once (h, a saved input, is only read). Math in fp64 when WIDE, else fp32.
        """
        pid_r = tl.program_id(0)
        pid_f = tl.program_id(1)
        r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
        m = (r < R)[:, None] & (f < F)[None, :]
        src = (r * s_hr)[:, None] + f[None, :]
        gr = tl.load(grad_ptr + (r * s_gr)[:, None] + f[None, :], mask=m, other=0.0)
        a = tl.load(h_ptr + src, mask=m, other=0.0)
        g = tl.load(h_ptr + src + F, mask=m, other=0.0)
        if WIDE:
            gr = gr.to(tl.float64)
            a = a.to(tl.float64)
            g = g.to(tl.float64)
        else:
            gr = gr.to(tl.float32)
            a = a.to(tl.float32)
            g = g.to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(g * _C_SQRT1_2))
        pdf = tl.exp(-0.5 * g * g) * _C_INV_SQRT_2PI
        da = gr * (g * cdf)
        dg = gr * a * (cdf + g * pdf)
        dst = (r * s_dr)[:, None] + f[None, :]
        tl.store(dh_ptr + dst, _to_out(da, dh_ptr, BF16_RNE), mask=m)
        tl.store(dh_ptr + dst + F, _to_out(dg, dh_ptr, BF16_RNE), mask=m)


def _bf16_rne(h: torch.Tensor) -> bool:
    """Round bf16 outputs by hand only where Triton is interpreted (see ``triton_util.to_out``)."""
    return bf16_rne(_geglu_fwd_kernel, h)


def _config(R: int, F: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_F, num_warps). BLOCK_F <= 256 divides SD's F (1280, 2560, 5120) so no column tile is partly
    empty, and a 256-wide fp16 row segment is one warp of 16-byte accesses; ~4K outputs per program keeps the grid
    at thousands of programs for SD's shapes (and the interpreter's per-program overhead small on CPU)."""
    block_f = min(256, max(16, next_pow2(F)))
    block_r = min(max(1, 4096 // block_f), next_pow2(R))
    return block_r, block_f, 4


def geglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the forward.

    Args:
        h: (..., 2F) float16/bfloat16/float32/float64 on a device Triton runs on (CUDA, or CPU under the
            interpreter). Any leading strides; the (R, 2F) row view is used in place when the leading dims flatten
            into one row stride with unit feature stride (e.g. a column slice of a wider tensor), else h is copied.

    Returns:
        (..., F) contiguous in h's dtype: ``h[..., :F] * gelu(h[..., F:])``.

    An eager call whose input has the shape, strides, dtype, device and alignment of an earlier call's replays that
    call's allocation and launch (``fast_launch`` launch plans), without the Python in between.
    """
    F = h.shape[-1] // 2
    lead = h.shape[:-1]
    if h.numel() == 0 or F == 0:
        return torch.empty((*lead, F), device=h.device, dtype=h.dtype)
    h2 = rows_view(h)  # (R, 2F): h itself viewed, or a copy (the plan's input either way)
    dev = fast_launch.plan_device() if type(h) is torch.Tensor else None
    if dev is None:
        return _geglu_fwd(h2, F).view(*lead, F)
    key = (fast_launch.tensor_facts(h), dev)
    res = fast_launch.replay(_FWD_PLANS, key, (h2,), dev)
    if res is None:
        def call():
            out2 = _geglu_fwd(h2, F)
            return (out2,), (out2,)

        res = fast_launch.record_plan(_FWD_PLANS, key, (h2,), call)
    return res[0].view(*lead, F)


_FWD_PLANS: dict = fast_launch.plan_cache()


def _geglu_fwd(h2: torch.Tensor, F: int) -> torch.Tensor:
    """:func:`geglu_fwd` on the (R, 2F) row view, R > 0: its (R, F) output."""
    out2 = torch.empty((h2.shape[0], F), device=h2.device, dtype=h2.dtype)
    R = h2.shape[0]
    block_r, block_f, warps = _config(R, F)
    grid = (cdiv(R, block_r), cdiv(F, block_f))
    launch(
        _geglu_fwd_kernel, grid,
        h2, out2, R, F, h2.stride(0), out2.stride(0),
        BLOCK_R=block_r, BLOCK_F=block_f, WIDE=h2.dtype == torch.float64, BF16_RNE=_bf16_rne(h2), num_warps=warps,
    )
    return out2


def geglu_bwd(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the backward.

    Args:
        grad: (..., F) gradient of the output, h's dtype and device, any strides (copied if not row-viewable).
        h: (..., 2F) the forward's input (only read).

    Returns:
        dh: (..., 2F) contiguous in h's dtype, ``[grad * gelu(g), grad * a * gelu'(g)]``.
    """
    F = h.shape[-1] // 2
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    if dh.numel() == 0:
        return dh
    h2 = rows_view(h)  # (R, 2F)
    g2 = rows_view(grad.to(h.dtype))  # (R, F)
    d2 = dh.view(-1, 2 * F)  # (R, 2F)
    R = h2.shape[0]
    block_r, block_f, warps = _config(R, F)
    grid = (cdiv(R, block_r), cdiv(F, block_f))
    launch(
        _geglu_bwd_kernel, grid,
        g2, h2, d2, R, F, g2.stride(0), h2.stride(0), d2.stride(0),
        BLOCK_R=block_r, BLOCK_F=block_f, WIDE=h.dtype == torch.float64, BF16_RNE=_bf16_rne(h), num_warps=warps,
    )
    return dh


def _torch_bwd(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The backward formula in torch ops, in fp32 (fp64 for fp64 inputs), rounded once to h's dtype."""
    wide = torch.float64 if h.dtype == torch.float64 else torch.float32
    a, g = h.to(wide).chunk(2, dim=-1)
    gr = grad.to(wide)
    cdf = 0.5 * (1.0 + torch.erf(g * _SQRT1_2))
    pdf = torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    # (..., F) x 2 -> (..., 2F), contiguous
    return torch.cat([gr * g * cdf, gr * a * (cdf + g * pdf)], dim=-1).to(h.dtype)


def _fwd_body(h: torch.Tensor, backend: str) -> torch.Tensor:
    """What ``jedi::geglu`` runs (and the eager paths)."""
    if backend == "triton":
        return geglu_fwd(h)
    return geglu_reference(h).contiguous()


def _bwd_body(grad: torch.Tensor, h: torch.Tensor, backend: str) -> torch.Tensor:
    """What ``jedi::geglu_backward`` runs (and the eager path's backward)."""
    if backend == "triton":
        return geglu_bwd(grad, h)
    return _torch_bwd(grad, h)


@torch.library.custom_op("jedi::geglu", mutates_args=())
def _geglu(h: torch.Tensor, backend: str) -> torch.Tensor:
    return _fwd_body(h, backend)


@_geglu.register_fake
def _(h, backend):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("jedi::geglu_backward", mutates_args=())
def _geglu_backward(grad: torch.Tensor, h: torch.Tensor, backend: str) -> torch.Tensor:
    return _bwd_body(grad, h, backend)


@_geglu_backward.register_fake
def _(grad, h, backend):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    h, backend = inputs
    ctx.save_for_backward(h)
    ctx.backend = backend


def _backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return torch.ops.jedi.geglu_backward(grad, h, ctx.backend), None


_geglu.register_autograd(_backward, setup_context=_setup_context)


class _GegluEager(torch.autograd.Function):
    """Eager calls that record autograd: ``jedi::geglu``'s forward, saved tensor and backward without the custom
    op's dispatch layers (see :func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, h, backend):
        ctx.save_for_backward(h)
        ctx.backend = backend
        return _fwd_body(h, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return _bwd_body(grad, h, ctx.backend), None


def geglu_op(h: torch.Tensor, backend: str) -> torch.Tensor:
    """The differentiable op behind ``jedi_kernels.geglu``.

    Args:
        h: (..., 2F) float16/bfloat16/float32/float64, already validated (even, non-zero last dim).
        backend: "triton" or "torch" (already resolved from "auto").

    Returns:
        (..., F) contiguous in h's dtype; gradients flow to h through ``jedi::geglu_backward``'s kernels.

    The custom op ``jedi::geglu`` runs while compiling and for tensor subclasses; eager calls take the same kernels
    without its dispatch layers (:func:`jedi_kernels.ops.eager_call`).
    """
    how = eager_call(h)
    if how == "direct":
        return _fwd_body(h, backend)
    if how == "function":
        return _GegluEager.apply(h, backend)
    return torch.ops.jedi.geglu(h, backend)
