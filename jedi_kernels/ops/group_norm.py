"""GroupNorm (+ the SiLU that follows it in SD's ResBlocks) for NCHW and NHWC activations, with split reductions.

    y = silu?((x - mean_g) * rstd_g * w_c + b_c),  rstd_g = 1 / sqrt(var_g + eps)

over each (image n, group g) of C / num_groups channels x H*W pixels (biased variance, as torch's GroupNorm).

Why not one program per group (the textbook launch): SD's UNet has N * 32 groups per norm (128 at the JeDi step's
batch of 4) but 132 SMs on an H100, each group spanning up to 64*64*80 elements — a few long programs that leave the
GPU mostly idle. Here the statistics are split three ways:

  1. ``_gn_partial_kernel``, grid (N, channel blocks, pixel splits): per-channel partial (mean, M2) of a slice of the
     pixels, merged tile by tile with Chan's parallel-variance formula (no E[x^2] - E[x]^2 cancellation). Each
     program reads a (BLOCK_P pixels x BLOCK_C channels) tile through strides: contiguous along C for NHWC, along
     the pixels for NCHW, so both layouts read coalesced.
  2. ``_gn_stats_kernel``, grid (N * num_groups,): merges the splits x C/num_groups channels of a group into its
     mean and rstd.
  3. ``_gn_apply_kernel``, grid (N, channel blocks, pixel tiles): normalizes, applies the affine and SiLU, and writes
     in x's dtype and layout.

x is read twice and y written once (torch's eager GroupNorm32 + SiLU: a cast to fp32, the norm, a SiLU and a cast
back, all materialized). Math is fp32 (fp64 for fp64 inputs). The backward runs as torch ops (training is not the
hot path this kernel is for; see ``_backward``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from jedi_kernels.reference import group_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["group_norm_op", "group_norm_fwd", "split_plan"]


def _fmt(t: torch.Tensor) -> torch.memory_format:
    """NHWC-contiguous (and not also NCHW-contiguous) stays channels-last; everything else is made NCHW."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


if triton is not None:

    @triton.jit
    def _gn_partial_kernel(
        x_ptr, pmean_ptr, pm2_ptr,
        C, HW, TILES_PER_SPLIT,
        s_xn, s_xc, s_xp,  # x strides: image, channel, pixel (h*W + w)
        s_pn, s_ps,  # partial buffers (N, SPLIT, C), channel stride 1
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
    ):
        """Per-channel (mean, M2) of pixels [s*TILES_PER_SPLIT*BLOCK_P, ...) of image n, channels of block cb.

        Tiles merge with Chan et al.: for running (n_a, mean_a, M2_a) and a tile (n_b, mean_b, M2_b),
        delta = mean_b - mean_a, mean = mean_a + delta * n_b / n, M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
        Every channel of a split sees the same pixel count, so the counts are scalars.
        """
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        s = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mean = tl.zeros([BLOCK_C], dtype=acc_t)
        m2 = tl.zeros([BLOCK_C], dtype=acc_t)
        cnt = tl.sum(mean, axis=0)  # 0 of type acc_t: a loop-carried value must keep its type (fp64 when WIDE)
        t0 = s * TILES_PER_SPLIT
        t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(HW, BLOCK_P))
        for t in range(t0, t1):
            p = tl.arange(0, BLOCK_P).to(tl.int64) + t * BLOCK_P  # int64: p * s_xp may pass 2**31
            pm = p < HW
            msk = pm[:, None] & cm[None, :]
            x = tl.load(x_ptr + n * s_xn + p[:, None] * s_xp + c[None, :] * s_xc, mask=msk, other=0.0).to(acc_t)
            nb = tl.minimum(HW - t * BLOCK_P, BLOCK_P).to(acc_t)
            mean_b = tl.sum(x, axis=0) / nb
            d = tl.where(msk, x - mean_b[None, :], 0.0)
            m2_b = tl.sum(d * d, axis=0)
            tot = cnt + nb
            delta = mean_b - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2_b + delta * delta * (cnt * nb / tot)
            cnt = tot
        dst = n * s_pn + s * s_ps + c
        tl.store(pmean_ptr + dst, mean, mask=cm)
        tl.store(pm2_ptr + dst, m2, mask=cm)

    @triton.jit
    def _gn_stats_kernel(
        pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
        G, CG, HW, SPLIT, SPLIT_PIXELS, TOTAL, eps,
        s_pn, s_ps,
        BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, WIDE: tl.constexpr,
    ):
        """Merge the (SPLIT x CG) partials of group g of image n: mean = sum(n_s * mean_sc) / T,
        M2 = sum(M2_sc) + sum(n_s * (mean_sc - mean)^2), var = M2 / T with T = CG * HW; rstd = 1 / sqrt(var + eps)."""
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        acc_t = tl.float64 if WIDE else tl.float32
        s = tl.arange(0, BLOCK_S)
        j = tl.arange(0, BLOCK_G)
        msk = (s < SPLIT)[:, None] & (j < CG)[None, :]
        src = n * s_pn + s[:, None] * s_ps + (g * CG + j)[None, :]
        pmean = tl.load(pmean_ptr + src, mask=msk, other=0.0).to(acc_t)
        pm2 = tl.load(pm2_ptr + src, mask=msk, other=0.0).to(acc_t)
        # pixels of split s: SPLIT_PIXELS for all but the last, the remainder there
        ns = tl.minimum(HW - s * SPLIT_PIXELS, SPLIT_PIXELS).to(acc_t)
        ns = tl.where(s < SPLIT, ns, 0.0)
        total = TOTAL  # CG * HW as a float (exact in fp32 up to 2**24; ints equal to 1 would arrive as constexprs)
        mean = tl.sum(tl.sum(pmean * ns[:, None], axis=1), axis=0) / total
        d = tl.where(msk, pmean - mean, 0.0)
        m2 = tl.sum(tl.sum(pm2 + d * d * ns[:, None], axis=1), axis=0)
        var = tl.maximum(m2 / total, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

    @triton.jit
    def _gn_apply_kernel(
        x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
        C, HW, G, CG,
        s_xn, s_xc, s_xp,  # x strides (y has the same layout)
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr,
    ):
        """y = silu?((x - mean[n, c // CG]) * rstd[n, c // CG] * w[c] + b[c]) for one (pixel tile, channel block)."""
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        t = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        p = tl.arange(0, BLOCK_P).to(tl.int64) + t * BLOCK_P
        msk = (p < HW)[:, None] & cm[None, :]
        grp = n * G + c // CG
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        scale = rstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=cm, other=0.0).to(acc_t)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + c, mask=cm, other=0.0).to(acc_t)
        off = n * s_xn + p[:, None] * s_xp + c[None, :] * s_xc
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(acc_t)
        y = x * scale[None, :] + shift[None, :]  # (x - mean) * rstd * w + b, one FMA per element
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=msk)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one after another: few, fat programs are fastest there


@functools.lru_cache(maxsize=1024)  # a pure function of ints, called by every norm of every UNet step
def split_plan(N: int, C: int, HW: int, num_sms: int) -> dict:
    """Tiling of the three kernels for an (N, C, HW) activation on a device with ``num_sms`` SMs.

    Returns dict(BLOCK_C, BLOCK_P, n_cblk, n_ptiles, tiles_per_split, split): the partial-statistics grid is
    (N, n_cblk, split), sized to about 4 programs per SM (never more splits than pixel tiles, at most 64 so the
    merge kernel holds all of a group's partials in one tile); every split covers ``tiles_per_split`` whole tiles of
    BLOCK_P pixels except possibly the last.
    """
    block_c = min(triton.next_power_of_2(C), 64)
    block_p = max(16, min(4096 // block_c, triton.next_power_of_2(HW)))
    n_cblk = triton.cdiv(C, block_c)
    n_ptiles = triton.cdiv(HW, block_p)
    want = triton.cdiv(4 * num_sms, N * n_cblk)
    split = max(1, min(want, n_ptiles, 64))
    tiles_per_split = triton.cdiv(n_ptiles, split)
    split = triton.cdiv(n_ptiles, tiles_per_split)  # no empty split
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, n_cblk=n_cblk, n_ptiles=n_ptiles,
                tiles_per_split=tiles_per_split, split=split)


def group_norm_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
) -> torch.Tensor:
    """Triton launcher. x: (N, C, H, W), NCHW or NHWC (other strides are copied once). Returns y like x."""
    x = x.contiguous(memory_format=_fmt(x))
    N, C, H, W = x.shape
    HW, G = H * W, num_groups
    CG = C // G
    wide = x.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    plan = split_plan(N, C, HW, _num_sms(x.device))  # cached dict: read, never modified
    S = plan["split"]
    pmean = torch.empty((N, S, C), device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    _gn_partial_kernel[(N, plan["n_cblk"], S)](
        x, pmean, pm2, C, HW, plan["tiles_per_split"],
        x.stride(0), x.stride(1), x.stride(3), pmean.stride(0), pmean.stride(1),
        BLOCK_P=plan["BLOCK_P"], BLOCK_C=plan["BLOCK_C"], WIDE=wide,
    )
    mean = torch.empty((N, G), device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    _gn_stats_kernel[(N * G,)](
        pmean, pm2, mean, rstd, G, CG, HW, S, plan["tiles_per_split"] * plan["BLOCK_P"], float(CG * HW), eps,
        pmean.stride(0), pmean.stride(1),
        BLOCK_S=triton.next_power_of_2(S), BLOCK_G=triton.next_power_of_2(CG), WIDE=wide,
    )
    y = torch.empty_like(x)
    dummy = mean  # never read when HAS_W / HAS_B is False
    _gn_apply_kernel[(N, plan["n_cblk"], plan["n_ptiles"])](
        x, y, weight if weight is not None else dummy, bias if bias is not None else dummy, mean, rstd,
        C, HW, G, CG, x.stride(0), x.stride(1), x.stride(3),
        BLOCK_P=plan["BLOCK_P"], BLOCK_C=plan["BLOCK_C"],
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, WIDE=wide,
    )
    return y


def _torch_fwd(x, num_groups, weight, bias, eps, silu):
    return group_norm_reference(x, num_groups, weight, bias, eps, silu).contiguous(memory_format=_fmt(x))


@torch.library.custom_op("jedi::group_norm", mutates_args=())
def _group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        return group_norm_fwd(x, num_groups, weight, bias, eps, silu)
    return _torch_fwd(x, num_groups, weight, bias, eps, silu)


@_group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu, backend):
    return torch.empty_like(x, memory_format=_fmt(x))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _backward(ctx, grad):
    """Gradients as torch ops, math in fp32 (fp64 for fp64), statistics recomputed from x:

        y = xhat * w + b, z = silu(y): dy = dz * sig(y) * (1 + y * (1 - sig(y)))
        dw = sum_{n,p} dy * xhat, db = sum_{n,p} dy
        dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * w
    """
    x, weight, bias = ctx.saved_tensors
    G = ctx.num_groups
    md = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C = x.shape[:2]
    xg = x.to(md).reshape(N, G, -1)  # (N, C, H, W) -> (N, G, C/G * H*W)
    mean = xg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + ctx.eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    w = weight.to(md).view(1, C, 1, 1) if weight is not None else None
    dy = grad.to(md)
    if ctx.silu:
        y = xhat * w if w is not None else xhat
        if bias is not None:
            y = y + bias.to(md).view(1, C, 1, 1)
        sig = torch.sigmoid(y)
        dy = dy * sig * (1 + y * (1 - sig))
    dw = (dy * xhat).sum((0, 2, 3)).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
    db = dy.sum((0, 2, 3)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
    dx = None
    if ctx.needs_input_grad[0]:
        dxh = (dy * w if w is not None else dy).reshape(N, G, -1)
        xh = xhat.reshape(N, G, -1)
        dxg = rstd * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
        dx = dxg.reshape(x.shape).to(x.dtype).contiguous(memory_format=_fmt(x))
    return dx, None, dw, db, None, None, None


_group_norm.register_autograd(_backward, setup_context=_setup_context)


def group_norm_op(x, num_groups, weight, bias, eps, silu, backend) -> torch.Tensor:
    """The differentiable op behind ``jedi_kernels.group_norm`` (inputs validated, backend resolved)."""
    return torch.ops.jedi.group_norm(x, num_groups, weight, bias, eps, silu, backend)
