"""Fused residual add + LayerNorm, as SD's transformer blocks use them: ``s = x + residual; n = layer_norm(s)``.

In a block ``x = x + attn1(norm1(x)); x = x + attn2(norm2(x)); x = x + ff(norm3(x))`` two of the three adds feed the
next LayerNorm. Unfused, each pair is two kernels: the add reads x and the residual and writes s, then the norm reads
s again and writes n. Here one kernel reads x and the residual once and writes s and n: four moves of the (rows, C)
tokens instead of five, one launch instead of two. ``residual=None`` is a plain LayerNorm (the block's first norm).

Two (C,) vectors fold the biases of the layers around the add into this pass (``JeDiUNet.set_fused_ops``):
``shift`` is added to the sum before the norm (the bias of the sub-layer whose output is the residual, so that
sub-layer's GEMM runs without a bias epilogue), ``sum_shift`` to the stored sum only, after the norm has read it (the
bias of the next sub-layer, whose GEMM then adds its product to this sum in place: ``addmm_``, no add pass).

Numerics match the unfused ops: s is rounded to x's dtype as torch's add rounds it (x + residual + shift with one
rounding; sum_shift's add is a second one), and the norm is computed from
that rounded s in float32 (float64 for float64 inputs) and rounded once, as torch's LayerNorm does (biased
variance, ``eps`` inside the square root).

One program normalizes BLOCK_R whole rows (BLOCK_C = the power of two >= C columns, masked): SD's C is 320, 640 or
1280, so a row fits a program and the statistics need no split. The backward is torch's own LayerNorm backward
(``aten.native_layer_norm_backward`` after recomputing the row statistics from the saved s) plus the residual's
gradient, which is the same as x's: exact, and two native kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from jedi_kernels.ops import cdiv, eager_call, fast_launch, next_pow2, rows_view
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.reference import add_layer_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["add_layer_norm_op", "add_layer_norm_fwd", "MAX_C"]

MAX_C = 16384  # one row per program at most: BLOCK_C = next_pow2(C) elements live in registers


if triton is not None:

    @triton.jit
    def _add_ln_fwd_kernel(
        x_ptr, r_ptr, w_ptr, b_ptr, sh_ptr, ss_ptr, s_ptr, n_ptr,
        R, C, s_xr, s_rr, s_sr, s_nr, eps,
        HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SUM_SHIFT: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Rows [pid * BLOCK_R, ...): t = x + r + shift rounded once to x's dtype (x itself without r and shift),
        n = (t - mean) * rstd * w + b with mean and the biased variance of each row of t, math in fp32 (fp64 when
        WIDE), rounded once; stored: n, and s = t + sum_shift (rounded again; t itself without sum_shift) whenever
        any of r, shift, sum_shift is given."""
        acc_t = tl.float64 if WIDE else tl.float32
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        cm = cols < C
        m = (rows < R)[:, None] & cm[None, :]
        x = tl.load(x_ptr + (rows * s_xr)[:, None] + cols[None, :], mask=m, other=0.0)
        if HAS_RES or HAS_SHIFT:
            tf = x.to(acc_t)
            if HAS_RES:
                tf += tl.load(r_ptr + (rows * s_rr)[:, None] + cols[None, :], mask=m, other=0.0).to(acc_t)
            if HAS_SHIFT:
                tf += tl.load(sh_ptr + cols, mask=cm, other=0.0).to(acc_t)[None, :]
            t = tf.to(s_ptr.dtype.element_ty)  # rounded as torch's add rounds it
        else:
            t = x
        if HAS_SUM_SHIFT:
            ss = tl.load(ss_ptr + cols, mask=cm, other=0.0).to(acc_t)[None, :]
            tl.store(s_ptr + (rows * s_sr)[:, None] + cols[None, :], (t.to(acc_t) + ss).to(s_ptr.dtype.element_ty),
                     mask=m)
        elif HAS_RES or HAS_SHIFT:
            tl.store(s_ptr + (rows * s_sr)[:, None] + cols[None, :], t, mask=m)
        sf = t.to(acc_t)
        mean = tl.sum(sf, axis=1) / C
        d = tl.where(m, sf - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        n = d * rstd[:, None]
        if HAS_W:
            n = n * tl.load(w_ptr + cols, mask=cm, other=0.0).to(acc_t)[None, :]
        if HAS_B:
            n = n + tl.load(b_ptr + cols, mask=cm, other=0.0).to(acc_t)[None, :]
        tl.store(n_ptr + (rows * s_nr)[:, None] + cols[None, :], n.to(n_ptr.dtype.element_ty), mask=m)


def _config(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows per program, ~4K elements per program (16-32 per thread)."""
    block_c = max(16, next_pow2(C))
    block_r = max(1, 4096 // block_c)
    return block_r, block_c, 4 if block_c * block_r <= 4096 else 8


def add_layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, shift: Optional[torch.Tensor] = None,
                       sum_shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher.

    Args:
        x, residual: (..., C) with C <= MAX_C, same shape and dtype, on a device Triton runs on; any leading strides.
        weight, bias: optional (C,). eps: variance epsilon.
        shift: optional (C,), added to the sum before the norm. sum_shift: optional (C,), added to the stored sum
            only (after the norm has read it).

    Returns:
        (s, n), each (..., C) contiguous in x's dtype; s is an empty (0,) tensor when residual, shift and sum_shift
        are all None.

    An eager call whose inputs have the shapes, strides, dtypes, devices and alignments (and eps) of an earlier
    call's replays that call's allocations and launch (``fast_launch`` launch plans), without the Python in between.
    """
    has_s = residual is not None or shift is not None or sum_shift is not None
    if x.numel() == 0:
        n = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        return torch.empty(x.shape if has_s else (0,), device=x.device, dtype=x.dtype), n
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else None
    dev = None
    if type(eps) is float and eps and type(x) is torch.Tensor and (residual is None or type(residual) is torch.Tensor):
        dev = fast_launch.plan_device()
    if dev is None:
        s2, n2, s = _add_layer_norm_fwd(x2, r2, weight, bias, eps, shift, sum_shift)
    else:
        facts = fast_launch.tensor_facts
        key = (facts(x), facts(residual), facts(weight), facts(bias), facts(shift), facts(sum_shift), eps, dev)
        inputs = (x2, r2, weight, bias, shift, sum_shift)
        res = fast_launch.replay(_FWD_PLANS, key, inputs, dev)
        if res is None:
            def call():
                s2, n2, s = _add_layer_norm_fwd(x2, r2, weight, bias, eps, shift, sum_shift)
                return (s2, n2, s), (n2, s2 if has_s else s)

            res = fast_launch.record_plan(_FWD_PLANS, key, inputs, call)
        s2, n2, s = res
    return (s2.view(x.shape) if has_s else s), n2.view(x.shape)


_FWD_PLANS: dict = fast_launch.plan_cache()


def _add_layer_norm_fwd(x2, r2, weight, bias, eps, shift=None, sum_shift=None):
    """:func:`add_layer_norm_fwd` on the (R, C) row views, R > 0: (s2, n2, the empty s when nothing is added; else
    s2)."""
    R, C = x2.shape
    n2 = torch.empty((R, C), device=x2.device, dtype=x2.dtype)
    has_res = r2 is not None
    if has_res or shift is not None or sum_shift is not None:
        s2 = s = torch.empty((R, C), device=x2.device, dtype=x2.dtype)
    else:
        s = torch.empty((0,), device=x2.device, dtype=x2.dtype)
        s2 = n2  # a dummy: s2 is not written
    if r2 is None:
        r2 = x2  # a dummy: not read
    block_r, block_c, warps = _config(C)
    launch(
        _add_ln_fwd_kernel, (cdiv(R, block_r),),
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
        shift if shift is not None else x2, sum_shift if sum_shift is not None else x2, s2, n2,
        R, C, x2.stride(0), r2.stride(0), s2.stride(0), n2.stride(0), eps,
        HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None, HAS_SHIFT=shift is not None,
        HAS_SUM_SHIFT=sum_shift is not None, WIDE=x2.dtype == torch.float64, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warps,
    )
    return s2, n2, s


def _torch_fwd(x, residual, weight, bias, eps, shift=None, sum_shift=None):
    s, n = add_layer_norm_reference(x, residual, weight, bias, eps, shift=shift, sum_shift=sum_shift)
    has_s = residual is not None or shift is not None or sum_shift is not None
    return (s.contiguous() if has_s else x.new_empty((0,))), n.contiguous()


def _fwd_body(x, residual, weight, bias, eps, backend, shift=None, sum_shift=None):
    """What ``jedi::add_layer_norm`` runs (and the eager paths; only these take ``sum_shift``)."""
    if backend == "triton":
        return add_layer_norm_fwd(x, residual, weight, bias, eps, shift, sum_shift)
    return _torch_fwd(x, residual, weight, bias, eps, shift, sum_shift)


@torch.library.custom_op("jedi::add_layer_norm", mutates_args=())
def _add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float, backend: str, shift: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, n): s = x + residual + shift ((0,) when residual and shift are None), n = layer_norm(s), both contiguous in
    x's dtype."""
    return _fwd_body(x, residual, weight, bias, eps, backend, shift)


@_add_layer_norm.register_fake
def _(x, residual, weight, bias, eps, backend, shift=None):
    has_s = residual is not None or shift is not None
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if has_s else x.new_empty((0,))
    return s, torch.empty_like(x, memory_format=torch.contiguous_format)


def _backward_body(grad_s, grad_n, s, weight, bias, eps, has_res, has_shift=False):
    """(dx, dresidual, dweight, dbias, dshift) from the saved s: torch's LayerNorm backward on statistics recomputed
    from s, plus s's own gradient; x and the residual both receive the sum (ds/dx = ds/dresidual = 1), the shift its
    sum over the rows."""
    C = s.shape[-1]
    _, mean, rstd = torch.ops.aten.native_layer_norm(s, [C], weight, bias, eps)
    if grad_n is None:
        grad_n = torch.zeros_like(s)
    ds, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad_n.contiguous(), s, [C], mean, rstd, weight, bias,
        [True, weight is not None, bias is not None])
    if (has_res or has_shift) and grad_s is not None:
        ds = ds + grad_s
    dshift = None
    if has_shift:  # summed in float32 (float64 for float64) over every row, rounded once
        dshift = ds.reshape(-1, C).sum(0, dtype=torch.float64 if ds.dtype == torch.float64 else torch.float32)
        dshift = dshift.to(ds.dtype)
    return ds, (ds if has_res else None), dw, db, dshift


def _save(ctx, x, residual, s, weight, bias, eps, shift=None) -> None:
    """What the backward needs: the normalized input (the sum s, or x when nothing is added), the affine, eps."""
    has_s = residual is not None or shift is not None
    ctx.save_for_backward(s if has_s else x, weight, bias)
    ctx.eps, ctx.has_res, ctx.has_shift = eps, residual is not None, shift is not None


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend, shift = inputs
    _save(ctx, x, residual, output[0], weight, bias, eps, shift)


def _backward(ctx, grad_s, grad_n):
    s, weight, bias = ctx.saved_tensors
    dx, dres, dw, db, dshift = _backward_body(grad_s, grad_n, s, weight, bias, ctx.eps, ctx.has_res, ctx.has_shift)
    return dx, dres, dw, db, None, None, dshift


_add_layer_norm.register_autograd(_backward, setup_context=_setup_context)


class _AddLayerNormEager(torch.autograd.Function):
    """Eager calls that record autograd: ``jedi::add_layer_norm``'s forward, saved tensors and backward without the
    custom op's dispatch layers (see :func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, backend, shift):
        s, n = _fwd_body(x, residual, weight, bias, eps, backend, shift)
        _save(ctx, x, residual, s, weight, bias, eps, shift)
        return s, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s, grad_n):
        s, weight, bias = ctx.saved_tensors
        dx, dres, dw, db, dshift = _backward_body(grad_s, grad_n, s, weight, bias, ctx.eps, ctx.has_res,
                                                  ctx.has_shift)
        return dx, dres, dw, db, None, None, dshift


def add_layer_norm_op(x, residual, weight, bias, eps, backend, shift=None, sum_shift=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable op behind ``jedi_kernels.add_layer_norm`` (inputs validated, backend resolved): the custom
    op while compiling and for tensor subclasses, the same kernels without its dispatch layers on eager calls.

    ``sum_shift`` joins the kernel only on calls that record no autograd graph (the inference path it is for);
    elsewhere it is a torch add after the op, whose gradient is the identity.

    Returns:
        (s, n) as ``jedi::add_layer_norm`` (s is (0,) when residual, shift and sum_shift are None), s with
        ``sum_shift`` added.
    """
    how = eager_call(x, residual, weight, bias, shift, sum_shift)
    if how == "direct":
        return _fwd_body(x, residual, weight, bias, eps, backend, shift, sum_shift)
    if how == "function":
        s, n = _AddLayerNormEager.apply(x, residual, weight, bias, eps, backend, shift)
    else:
        s, n = torch.ops.jedi.add_layer_norm(x, residual, weight, bias, eps, backend, shift)
    if sum_shift is None:
        return s, n
    return (s if residual is not None or shift is not None else x) + sum_shift, n
