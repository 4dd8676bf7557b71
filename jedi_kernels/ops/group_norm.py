"""GroupNorm (+ the SiLU that follows it in SD's ResBlocks) for NCHW and NHWC activations, with split reductions.

    y = silu?((x' - mean_g) * rstd_g * w_c + b_c),  rstd_g = 1 / sqrt(var_g + eps),  x' = x + shift[n, c]

over each (image n, group g) of C / num_groups channels x H*W pixels (biased variance, as torch's GroupNorm). The
optional per-(image, channel) ``shift`` (a ResBlock's time embedding + conv bias, added before its second norm) costs
no pass of its own and no per-element work: it moves each channel's mean (the partial means get it added, the
per-channel mean vectors of the apply and backward kernels get it subtracted) and leaves every M2 unchanged.

Why not one program per group (the textbook launch): SD's UNet has N * 32 groups per norm (128 at the JeDi step's
batch of 4) but 132 SMs on an H100, each group spanning up to 64*64*80 elements — a few long programs that leave the
GPU mostly idle. Here the statistics are split three ways:

  1. ``_gn_partial_kernel``, grid (N, channel blocks, pixel splits): per-channel partial (mean, M2) of a slice of the
     pixels (no E[x^2] - E[x]^2 cancellation). Each program streams (BLOCK_P pixels x BLOCK_C channels) tiles through
     strides, contiguous along C for NHWC and along the pixels for NCHW, so both layouts read coalesced; every
     element of the tile keeps its own Welford (mean, M2), and the tile's rows merge with Chan's parallel-variance
     formula once, after the loop (the loop itself has no cross-thread reduction: until 2026-11-27 it reduced each
     tile across threads, and the H100 profile had this kernel at 0.6 TB/s, 10 us a call, where the apply kernel,
     which moves twice the bytes, took 5.6 us).
  2. ``_gn_stats_kernel``, grid (N * num_groups,): merges the splits x C/num_groups channels of a group into its
     mean and rstd.
  3. ``_gn_apply_kernel``, grid (N, channel blocks, pixel tiles): normalizes, applies the affine and SiLU, and writes
     in x's dtype and layout.

x is read twice and y written once (torch's eager GroupNorm32 + SiLU: a cast to fp32, the norm, a SiLU and a cast
back, all materialized). Math is fp32 (fp64 for fp64 inputs). The backward (``jedi::group_norm_backward``) recomputes
the statistics, sums dxhat and dxhat * xhat per channel over the same splits, and writes dx in one more pass:
x is read three times and the gradient twice, nothing is saved but x.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from jedi_kernels.ops import cdiv, eager_call, fast_launch, next_pow2
from jedi_kernels.ops import memory_format_of as _fmt
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.reference import group_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["group_norm_op", "group_norm_fwd", "group_norm_bwd", "split_plan"]


if triton is not None:

    @triton.jit
    def _load_tile(x_img, x2_img, p, c, msk, C1, s_xp, s_xc, s_x2p, s_x2c, HAS_X2: tl.constexpr):
        """The (pixel, channel) tile of x; with HAS_X2 of cat([x, x2], dim=1), channels >= C1 read from x2 (each
        element from one of the two: masked loads fetch nothing for the other)."""
        if HAS_X2:
            first = (c < C1)[None, :]
            a = tl.load(x_img + p[:, None] * s_xp + c[None, :] * s_xc, mask=msk & first, other=0.0)
            b = tl.load(x2_img + p[:, None] * s_x2p + (c - C1)[None, :] * s_x2c, mask=msk & (c >= C1)[None, :],
                        other=0.0)
            return tl.where(first, a, b)
        return tl.load(x_img + p[:, None] * s_xp + c[None, :] * s_xc, mask=msk, other=0.0)

    @triton.jit
    def _gn_partial_kernel(
        x_ptr, x2_ptr, pmean_ptr, pm2_ptr, sh_ptr,
        C, C1, HW, TILES_PER_SPLIT,
        s_xn, s_xc, s_xp,  # x strides: image, channel, pixel (h*W + w)
        s_x2n, s_x2c, s_x2p,  # x2 strides (HAS_X2: the channels from C1 on)
        s_pn, s_ps,  # partial buffers (N, SPLIT, C), channel stride 1
        s_shn,  # shift (N, C), channel stride 1
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_X2: tl.constexpr,
    ):
        """Per-channel (mean, M2) of pixels [s*TILES_PER_SPLIT*BLOCK_P, ...) of image n, channels of block cb.

        Every element of the (BLOCK_P x BLOCK_C) tile keeps its own running (mean, M2) over the tiles of the split
        (Welford: d = x - mean, mean += d / n, M2 += d * (x - mean)), so the loop has no cross-thread reduction (no
        shuffles, no barriers: it only streams x); the tile's rows, whose counts ``cnt`` differ only where the last
        tile of the image is cut short, merge once at the end with Chan et al.: mean = sum(n_p * mean_p) / n,
        M2 = sum(M2_p + n_p * (mean_p - mean)^2). No E[x^2] - E[x]^2 cancellation anywhere. With HAS_SHIFT the
        statistics are those of x + shift[n, c]: the same M2, the mean moved by the channel's shift.
        """
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        s = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mean_e = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        m2_e = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        cnt = tl.zeros([BLOCK_P], dtype=acc_t)  # pixels seen by each row of the tile
        x_img = x_ptr + n * s_xn  # int64 image base; offsets inside an image are int32
        x2_img = x2_ptr + n * s_x2n
        t0 = s * TILES_PER_SPLIT
        t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(HW, BLOCK_P))
        # cp.async prefetch of the next two tiles (num_stages=3): the loop only streams, so keep loads in flight
        for t in tl.range(t0, t1, num_stages=3):
            p = tl.arange(0, BLOCK_P) + t * BLOCK_P
            pm = p < HW
            x = _load_tile(x_img, x2_img, p, c, pm[:, None] & cm[None, :], C1, s_xp, s_xc, s_x2p, s_x2c,
                           HAS_X2).to(acc_t)
            cnt = cnt + pm.to(acc_t)
            inv = tl.where(pm, 1.0 / tl.maximum(cnt, 1.0), 0.0)  # 0: a row past HW keeps its (mean, M2)
            d = x - mean_e
            mean_e = mean_e + d * inv[:, None]
            m2_e = m2_e + tl.where(pm[:, None], d * (x - mean_e), 0.0)
        total = tl.sum(cnt, axis=0)  # >= 1: every split holds at least one pixel
        mean = tl.sum(mean_e * cnt[:, None], axis=0) / total
        dm = mean_e - mean[None, :]
        m2 = tl.sum(m2_e + dm * dm * cnt[:, None], axis=0)
        if HAS_SHIFT:
            mean = mean + tl.load(sh_ptr + n * s_shn + c, mask=cm, other=0.0).to(acc_t)
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
    def _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, sh_ptr, s_shn, n, c, cm, G, CG,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, WIDE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """Per-channel (mean, rstd, w, b) of image n for channels c: the group statistics gathered by c // CG and
        the affine parameters in the math dtype (w, b = mean as placeholders when absent: never used then). With
        HAS_SHIFT the mean comes back minus the channel's shift: x - (mean - shift) = (x + shift) - mean."""
        acc_t = tl.float64 if WIDE else tl.float32
        grp = n * G + c // CG
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        if HAS_SHIFT:
            mean = mean - tl.load(sh_ptr + n * s_shn + c, mask=cm, other=0.0).to(acc_t)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(acc_t) if HAS_W else mean
        b = tl.load(b_ptr + c, mask=cm, other=0.0).to(acc_t) if HAS_B else mean
        return mean, rstd, w, b

    @triton.jit
    def _gn_apply_kernel(
        x_ptr, x2_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sh_ptr,
        C, C1, HW, G, CG,
        s_xn, s_xc, s_xp,  # x strides
        s_x2n, s_x2c, s_x2p,  # x2 strides (HAS_X2)
        s_yn, s_yc, s_yp,  # y strides
        s_shn,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_X2: tl.constexpr,
    ):
        """y = silu?((x + shift[n, c] - mean[n, c // CG]) * rstd[n, c // CG] * w[c] + b[c]) for one (pixel tile,
        channel block); with HAS_X2, x is cat([x, x2], dim=1)."""
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        t = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        p = tl.arange(0, BLOCK_P) + t * BLOCK_P
        msk = (p < HW)[:, None] & cm[None, :]
        mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, sh_ptr, s_shn, n, c, cm, G, CG,
                                            HAS_W, HAS_B, WIDE, HAS_SHIFT)
        scale = rstd * w if HAS_W else rstd
        shift = -mean * scale
        if HAS_B:
            shift = shift + b
        # offsets within image n: int32 (the launcher checks C*HW < 2**31)
        x = _load_tile(x_ptr + n * s_xn, x2_ptr + n * s_x2n, p, c, msk, C1, s_xp, s_xc, s_x2p, s_x2c,
                       HAS_X2).to(acc_t)
        y = x * scale[None, :] + shift[None, :]  # (x - mean) * rstd * w + b, one FMA per element
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + n * s_yn + p[:, None] * s_yp + c[None, :] * s_yc, y.to(y_ptr.dtype.element_ty), mask=msk)


    @triton.jit
    def _gn_bwd_terms(x, dz, mean, rstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
        """(xhat, dy, dxhat) of a tile: xhat = (x - mean) * rstd, y = xhat * w + b, dy = dz * silu'(y) (or dz),
        dxhat = dy * w. Per-channel vectors broadcast over the tile's pixel rows."""
        xhat = (x - mean[None, :]) * rstd[None, :]
        dy = dz
        if SILU:
            y = xhat
            if HAS_W:
                y = y * w[None, :]
            if HAS_B:
                y = y + b[None, :]
            sig = 1.0 / (1.0 + tl.exp(-y))
            dy = dz * sig * (1.0 + y * (1.0 - sig))
        dxhat = dy
        if HAS_W:
            dxhat = dy * w[None, :]
        return xhat, dy, dxhat

    @triton.jit
    def _gn_bwd_partial_kernel(
        x_ptr, dz_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sh_ptr, pa_ptr, pb_ptr, pdw_ptr, pdb_ptr,
        C, HW, G, CG, TILES_PER_SPLIT,
        s_xn, s_xc, s_xp,  # x and dz strides (same layout)
        s_pn, s_ps,  # partial buffers (N, SPLIT, C), channel stride 1
        s_shn,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        """Per-channel sums over a pixel slice of image n: sum dxhat, sum dxhat * xhat (for dx), sum dy * xhat and
        sum dy (for dweight, dbias). Accumulated per element of the tile and reduced over its rows once at the end
        (the loop has no cross-thread reduction), with the next tiles prefetched as in the forward."""
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        s = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, sh_ptr, s_shn, n, c, cm, G, CG,
                                            HAS_W, HAS_B, WIDE, HAS_SHIFT)
        sa = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        sb = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        sdw = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        sdb = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
        t0 = s * TILES_PER_SPLIT
        t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(HW, BLOCK_P))
        x_img = x_ptr + n * s_xn  # int64 image bases; offsets inside an image are int32
        dz_img = dz_ptr + n * s_xn
        for t in tl.range(t0, t1, num_stages=3):
            p = tl.arange(0, BLOCK_P) + t * BLOCK_P
            msk = (p < HW)[:, None] & cm[None, :]
            off = p[:, None] * s_xp + c[None, :] * s_xc
            x = tl.load(x_img + off, mask=msk, other=0.0).to(acc_t)
            dz = tl.load(dz_img + off, mask=msk, other=0.0).to(acc_t)
            xhat, dy, dxhat = _gn_bwd_terms(x, dz, mean, rstd, w, b, HAS_W, HAS_B, SILU)
            xhat = tl.where(msk, xhat, 0.0)  # masked pixels: x = 0 gives xhat != 0, and dz = 0 keeps dy = 0
            sa += dxhat
            sb += dxhat * xhat
            sdw += dy * xhat
            sdb += dy
        dst = n * s_pn + s * s_ps + c
        tl.store(pa_ptr + dst, tl.sum(sa, axis=0), mask=cm)
        tl.store(pb_ptr + dst, tl.sum(sb, axis=0), mask=cm)
        tl.store(pdw_ptr + dst, tl.sum(sdw, axis=0), mask=cm)
        tl.store(pdb_ptr + dst, tl.sum(sdb, axis=0), mask=cm)

    @triton.jit
    def _gn_bwd_apply_kernel(
        x_ptr, dz_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sh_ptr, c1_ptr, c2_ptr,
        C, HW, G, CG,
        s_xn, s_xc, s_xp,  # x, dz and dx strides (same layout)
        s_shn,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, WIDE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        """dx = rstd * (dxhat - c1[n, g] - xhat * c2[n, g]), c1 = mean_g(dxhat), c2 = mean_g(dxhat * xhat)."""
        n = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        t = tl.program_id(2)
        acc_t = tl.float64 if WIDE else tl.float32
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mean, rstd, w, b = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, sh_ptr, s_shn, n, c, cm, G, CG,
                                            HAS_W, HAS_B, WIDE, HAS_SHIFT)
        grp = n * G + c // CG
        c1 = tl.load(c1_ptr + grp, mask=cm, other=0.0)
        c2 = tl.load(c2_ptr + grp, mask=cm, other=0.0)
        p = tl.arange(0, BLOCK_P) + t * BLOCK_P
        msk = (p < HW)[:, None] & cm[None, :]
        base = n * s_xn  # int64 image base; offsets inside an image are int32
        off = p[:, None] * s_xp + c[None, :] * s_xc
        x = tl.load(x_ptr + base + off, mask=msk, other=0.0).to(acc_t)
        dz = tl.load(dz_ptr + base + off, mask=msk, other=0.0).to(acc_t)
        xhat, dy, dxhat = _gn_bwd_terms(x, dz, mean, rstd, w, b, HAS_W, HAS_B, SILU)
        dx = rstd[None, :] * (dxhat - c1[None, :] - xhat * c2[None, :])
        tl.store(dx_ptr + base + off, dx.to(dx_ptr.dtype.element_ty), mask=msk)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one after another: few, fat programs are fastest there


@functools.lru_cache(maxsize=1024)  # a pure function of ints, called by every norm of every UNet step
def split_plan(N: int, C: int, HW: int, num_sms: int, tile: int = 2048) -> dict:
    """Tiling of the three kernels for an (N, C, HW) activation on a device with ``num_sms`` SMs.

    ``tile``: elements per program tile (2048 forward; the backward's kernels keep more values live per element and
    use 1024): with 4 warps that is 16 (8) elements per thread, which compiles to <= 128 registers on sm_90 (163 on
    sm_80) without spills; 4096 took 255 registers in the forward and spilled in the backward
    (tools/triton_aot_check.py).

    Returns dict(BLOCK_C, BLOCK_P, n_cblk, n_ptiles, tiles_per_split, split): the partial-statistics grid is
    (N, n_cblk, split), sized to about 4 programs per SM (never more splits than pixel tiles, at most 64 so the
    merge kernel holds all of a group's partials in one tile); every split covers ``tiles_per_split`` whole tiles of
    BLOCK_P pixels except possibly the last.
    """
    block_c = min(next_pow2(C), 64)
    block_p = max(16, min(tile // block_c, next_pow2(HW)))
    n_cblk = cdiv(C, block_c)
    n_ptiles = cdiv(HW, block_p)
    want = cdiv(4 * num_sms, N * n_cblk)
    split = max(1, min(want, n_ptiles, 64))
    tiles_per_split = cdiv(n_ptiles, split)
    split = cdiv(n_ptiles, tiles_per_split)  # no empty split
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, n_cblk=n_cblk, n_ptiles=n_ptiles,
                tiles_per_split=tiles_per_split, split=split)


def _check_int32(x: torch.Tensor) -> None:
    """The kernels index inside one image with int32 (fewer registers than int64 per element)."""
    per_image = x.numel() // x.shape[0]
    if per_image >= 2**31:
        raise ValueError(f"group_norm: one image of x has {per_image} elements; the Triton kernels index an image "
                         f"with int32 (< 2**31 elements); use backend='torch'")


def _shift_rows(shift: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read shift[n, c] at n * stride(0) + c: any row stride (e.g. a column slice of the UNet's one
    time-embedding GEMM, jedi.unet.TimeEmb) but unit channel stride; copied only without it."""
    if shift is None or shift.stride(1) == 1 or shift.shape[1] == 1:
        return shift
    return shift.contiguous()


def _shift_args(shift: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer tensor, image stride) of an (N, C) shift with unit channel stride; a never-read dummy without one."""
    if shift is None:
        return dummy, 0
    return shift, shift.stride(0)


def _x2_args(x2: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple:
    """(pointer tensor, image, channel and pixel strides) of the second input of a concatenation; a never-read dummy
    and zero strides without one."""
    if x2 is None:
        return dummy, 0, 0, 0
    return x2, x2.stride(0), x2.stride(1), x2.stride(3)


def _stats(x: torch.Tensor, G: int, eps: float, plan: dict, shift: Optional[torch.Tensor] = None,
           channel_means: bool = False, scratch: Optional[list] = None, x2: Optional[torch.Tensor] = None):
    """(mean, rstd), each (N, G) in the math dtype, of x (N, C, H, W) laid out NCHW or NHWC, plus x + shift[n, c].
    With ``channel_means`` also each channel's mean (N, C) (the backward's gradient of the shift needs it).
    ``scratch``: receives the buffers allocated here (partials, mean, rstd), in allocation order (launch plans).
    ``x2``: (N, C2, H, W) in x's layout: the statistics of cat([x, x2], dim=1) (C = C1 + C2), never materialized."""
    N, C1, H, W = x.shape
    C = C1 + (x2.shape[1] if x2 is not None else 0)
    HW, CG = H * W, C // G
    wide = x.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    S = plan["split"]
    pmean = torch.empty((N, S, C), device=x.device, dtype=acc)
    pm2 = torch.empty_like(pmean)
    sh, s_shn = _shift_args(shift, pmean)
    x2_args = _x2_args(x2, x)
    launch(
        _gn_partial_kernel, (N, plan["n_cblk"], S),
        x, x2_args[0], pmean, pm2, sh, C, C1, HW, plan["tiles_per_split"],
        x.stride(0), x.stride(1), x.stride(3), *x2_args[1:], pmean.stride(0), pmean.stride(1), s_shn,
        BLOCK_P=plan["BLOCK_P"], BLOCK_C=plan["BLOCK_C"], WIDE=wide, HAS_SHIFT=shift is not None,
        HAS_X2=x2 is not None,
    )
    mean = torch.empty((N, G), device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    launch(
        _gn_stats_kernel, (N * G,),
        pmean, pm2, mean, rstd, G, CG, HW, S, plan["tiles_per_split"] * plan["BLOCK_P"], float(CG * HW), eps,
        pmean.stride(0), pmean.stride(1),
        BLOCK_S=next_pow2(S), BLOCK_G=next_pow2(CG), WIDE=wide,
    )
    if scratch is not None:
        scratch += [pmean, pm2, mean, rstd]
    if not channel_means:
        return mean, rstd
    split_pixels = plan["tiles_per_split"] * plan["BLOCK_P"]
    ns = torch.full((S,), float(split_pixels), device=x.device, dtype=acc)
    ns[-1] = HW - (S - 1) * split_pixels
    return mean, rstd, (pmean * ns[:, None]).sum(1) / HW


def group_norm_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    shift: Optional[torch.Tensor] = None,
    x2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton launcher. x: (N, C, H, W), NCHW or NHWC (other strides are copied once); shift: None or (N, C), added
    to x before the norm. Returns y like x. ``x2``: (N, C2, H, W) or None: normalize cat([x, x2], dim=1) without
    making it (y then has C + C2 channels, in x's layout; x2 is read in place when it has that layout).

    An eager call whose properties (:func:`_fwd_plan_key`) match an earlier call's replays that call's allocations
    and three launches (``fast_launch`` launch plans; ≈ 10 instead of ≈ 28 µs of host time on the CI machine's CPU,
    tools/host_overhead.py): the UNet's 61 norms a step are most of its eager Triton launches."""
    # a plan replays the recorded call's scalars (True == 1, 0.0 == -0.0) and allocates y with torch.empty_strided
    # (torch.empty_like keeps a tensor subclass): plain ints, nonzero floats and plain tensors only
    dev = None
    if type(eps) is float and eps and type(silu) is bool and type(num_groups) is int and type(x) is torch.Tensor:
        dev = fast_launch.plan_device()
    if dev is not None:
        key = _fwd_plan_key(x, num_groups, weight, bias, eps, silu, shift, dev) + (fast_launch.tensor_facts(x2),)
        inputs = (x, weight, bias, shift, x2)
        res = fast_launch.replay(_FWD_PLANS, key, inputs, dev)
        if res is None:
            def call():
                y, scratch = _group_norm_fwd(x, num_groups, weight, bias, eps, silu, shift, x2)
                return (y,), (*scratch, y)

            res = fast_launch.record_plan(_FWD_PLANS, key, inputs, call)
        return res[0]
    return _group_norm_fwd(x, num_groups, weight, bias, eps, silu, shift, x2)[0]


_FWD_PLANS: dict = fast_launch.plan_cache()


def _fwd_plan_key(x, num_groups, weight, bias, eps, silu, shift, device: int) -> tuple:
    """Everything the forward's allocations and launches depend on besides the tensors' addresses: x's shape,
    strides, dtype, device and alignment, those of the optional weight, bias and shift (or their absence), the
    groups, eps, silu and Triton's current device (the SM count that sizes the splits comes with x's device)."""
    facts = fast_launch.tensor_facts
    return facts(x), num_groups, eps, silu, facts(weight), facts(bias), facts(shift), device


def _group_norm_fwd(x, num_groups, weight, bias, eps, silu, shift, x2=None):
    """:func:`group_norm_fwd` after its launch-plan lookup: (y, the scratch buffers its launches used, in
    allocation order)."""
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    N, C1, H, W = x.shape
    if x2 is not None:
        x2 = x2.contiguous(memory_format=fmt)
        _check_int32(x2)
    C = C1 + (x2.shape[1] if x2 is not None else 0)
    HW, G = H * W, num_groups
    CG = C // G
    wide = x.dtype == torch.float64
    _check_int32(x)
    shift = _shift_rows(shift)
    plan = split_plan(N, C, HW, _num_sms(x.device))  # cached dict: read, never modified
    scratch = []
    mean, rstd = _stats(x, G, eps, plan, shift, scratch=scratch, x2=x2)
    y = (torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=fmt) if x2 is not None
         else torch.empty_like(x))
    if x2 is not None:
        _check_int32(y)
    dummy = mean  # never read when HAS_W / HAS_B / HAS_SHIFT is False
    sh, s_shn = _shift_args(shift, dummy)
    launch(
        _gn_apply_kernel, (N, plan["n_cblk"], plan["n_ptiles"]),
        x, _x2_args(x2, x)[0], y, weight if weight is not None else dummy, bias if bias is not None else dummy,
        mean, rstd, sh, C, C1, HW, G, CG, x.stride(0), x.stride(1), x.stride(3), *_x2_args(x2, x)[1:],
        y.stride(0), y.stride(1), y.stride(3), s_shn,
        BLOCK_P=plan["BLOCK_P"], BLOCK_C=plan["BLOCK_C"],
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, WIDE=wide, HAS_SHIFT=shift is not None,
        HAS_X2=x2 is not None,
    )
    return y, scratch


def group_norm_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    shift: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Triton launcher of the backward (statistics recomputed from x: one more read of x instead of saving them).

    Args:
        grad: (N, C, H, W) gradient of the output. x, num_groups, weight, bias, eps, silu, shift: the forward's.

    Returns:
        (dx like x, dweight (C,) or None, dbias (C,) or None, dshift (N, C) or None); dweight/dbias/dshift in the
        dtypes of their inputs. dshift[n, c] = sum over the pixels of dx[n, c], from per-channel sums the kernels
        already make (no pass over dx): rstd_g * (sum dxhat_c - HW * c1_g - c2_g * sum xhat_c), with
        sum xhat_c = rstd_g * HW * (mean of channel c of x + shift - mean_g).
    """
    fmt = _fmt(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad.contiguous(memory_format=fmt)
    if grad.stride() != x.stride():  # e.g. a size-1 dim with another stride: one layout for both
        grad = torch.empty_like(x).copy_(grad)
    N, C, H, W = x.shape
    HW, G = H * W, num_groups
    CG = C // G
    wide = x.dtype == torch.float64
    acc = torch.float64 if wide else torch.float32
    _check_int32(x)
    shift = _shift_rows(shift)
    stats = _stats(x, G, eps, split_plan(N, C, HW, _num_sms(x.device)), shift, channel_means=shift is not None)
    mean, rstd = stats[:2]
    plan = split_plan(N, C, HW, _num_sms(x.device), tile=1024)
    S = plan["split"]
    parts = torch.empty((4, N, S, C), device=x.device, dtype=acc)  # sum dxhat, sum dxhat*xhat, dweight, dbias
    dummy = mean
    sh, s_shn = _shift_args(shift, dummy)
    common = dict(BLOCK_P=plan["BLOCK_P"], BLOCK_C=plan["BLOCK_C"], HAS_W=weight is not None,
                  HAS_B=bias is not None, SILU=silu, WIDE=wide, HAS_SHIFT=shift is not None)
    wb = (weight if weight is not None else dummy, bias if bias is not None else dummy)
    launch(
        _gn_bwd_partial_kernel, (N, plan["n_cblk"], S),
        x, grad, *wb, mean, rstd, sh, parts[0], parts[1], parts[2], parts[3],
        C, HW, G, CG, plan["tiles_per_split"], x.stride(0), x.stride(1), x.stride(3),
        parts.stride(1), parts.stride(2), s_shn, **common,
    )
    # (4, N, S, C) -> per (n, group) means of dxhat and dxhat * xhat: a few hundred KB, torch reduces it
    ch_sums = parts[:2].sum(2)  # (2, N, C)
    sums = ch_sums.view(2, N, G, CG).sum(-1) / (CG * HW)  # (2, N, G)
    c1, c2 = sums[0].contiguous(), sums[1].contiguous()
    dx = torch.empty_like(x)
    launch(
        _gn_bwd_apply_kernel, (N, plan["n_cblk"], plan["n_ptiles"]),
        x, grad, dx, *wb, mean, rstd, sh, c1, c2, C, HW, G, CG, x.stride(0), x.stride(1), x.stride(3), s_shn,
        **common,
    )
    dw = parts[2].sum((0, 1)).to(weight.dtype) if weight is not None else None
    db = parts[3].sum((0, 1)).to(bias.dtype) if bias is not None else None
    dsh = None
    if shift is not None:
        r, m = rstd[:, :, None], mean[:, :, None]  # (N, G, 1) against (N, G, CG) per-channel sums
        sum_xhat = r * HW * (stats[2].view(N, G, CG) - m)
        dsh = r * (ch_sums[0].view(N, G, CG) - HW * c1[:, :, None] - c2[:, :, None] * sum_xhat)
        dsh = dsh.reshape(N, C).to(shift.dtype)
    return dx, dw, db, dsh


def _torch_fwd(x, num_groups, weight, bias, eps, silu, shift=None):
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, shift).contiguous(memory_format=_fmt(x))


@torch.library.custom_op("jedi::group_norm", mutates_args=())
def _group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    backend: str,
    shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _fwd_body(x, num_groups, weight, bias, eps, silu, backend, shift)


@_group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu, backend, shift=None):
    return torch.empty_like(x, memory_format=_fmt(x))


def _torch_bwd(grad, x, num_groups, weight, bias, eps, silu, shift=None):
    """The backward as torch ops, math in fp32 (fp64 for fp64), statistics recomputed from x (+ shift):

        y = xhat * w + b, z = silu(y): dy = dz * sig(y) * (1 + y * (1 - sig(y)))
        dw = sum_{n,p} dy * xhat, db = sum_{n,p} dy
        dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dy * w; dshift = sum_p dx
    """
    G = num_groups
    md = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C = x.shape[:2]
    xm = x.to(md)
    if shift is not None:
        xm = xm + shift.to(md).view(N, C, 1, 1)
    xg = xm.reshape(N, G, -1)  # (N, C, H, W) -> (N, G, C/G * H*W)
    mean = xg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    w = weight.to(md).view(1, C, 1, 1) if weight is not None else None
    dy = grad.to(md)
    if silu:
        y = xhat * w if w is not None else xhat
        if bias is not None:
            y = y + bias.to(md).view(1, C, 1, 1)
        sig = torch.sigmoid(y)
        dy = dy * sig * (1 + y * (1 - sig))
    dw = (dy * xhat).sum((0, 2, 3)).to(weight.dtype) if weight is not None else None
    db = dy.sum((0, 2, 3)).to(bias.dtype) if bias is not None else None
    dxh = (dy * w if w is not None else dy).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dxg = rstd * (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True))
    dsh = dxg.reshape(N, C, -1).sum(-1).to(shift.dtype) if shift is not None else None
    dx = dxg.reshape(x.shape).to(x.dtype).contiguous(memory_format=_fmt(x))
    return dx, dw, db, dsh


@torch.library.custom_op("jedi::group_norm_backward", mutates_args=())
def _group_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    backend: str,
    shift: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dshift); each of the last three is an empty (0,) tensor when its input is None."""
    fn = group_norm_bwd if backend == "triton" else _torch_bwd
    dx, dw, db, dsh = fn(grad, x, num_groups, weight, bias, eps, silu, shift)
    return dx, *(t if t is not None else x.new_empty((0,)) for t in (dw, db, dsh))


@_group_norm_backward.register_fake
def _(grad, x, num_groups, weight, bias, eps, silu, backend, shift=None):
    dx = torch.empty_like(x, memory_format=_fmt(x))
    return dx, *(torch.empty_like(t) if t is not None else x.new_empty((0,)) for t in (weight, bias, shift))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, backend, shift = inputs
    ctx.save_for_backward(x, weight, bias, shift)
    ctx.num_groups, ctx.eps, ctx.silu, ctx.backend = num_groups, eps, silu, backend


def _grads(ctx, dx, dw, db, dsh):
    """The gradients of (x, num_groups, weight, bias, eps, silu, backend[, shift]) from the backward's outputs: a
    call of the custom op without its trailing default ``shift`` has 7 inputs to answer for."""
    need = ctx.needs_input_grad
    grads = (dx if need[0] else None, None, dw if need[2] else None, db if need[3] else None, None, None, None,
             dsh if len(need) > 7 and need[7] else None)
    return grads[:len(need)]


def _backward(ctx, grad):
    """jedi::group_norm_backward (Triton: statistics recomputed, per-channel partial sums split like the forward's,
    then one pass writing dx; torch: :func:`_torch_bwd`)."""
    x, weight, bias, shift = ctx.saved_tensors
    return _grads(ctx, *torch.ops.jedi.group_norm_backward(grad, x, ctx.num_groups, weight, bias, ctx.eps, ctx.silu,
                                                           ctx.backend, shift))


_group_norm.register_autograd(_backward, setup_context=_setup_context)


def _fwd_body(x, num_groups, weight, bias, eps, silu, backend, shift=None):
    """What ``jedi::group_norm`` runs (and the eager paths)."""
    if backend == "triton":
        return group_norm_fwd(x, num_groups, weight, bias, eps, silu, shift)
    return _torch_fwd(x, num_groups, weight, bias, eps, silu, shift)


class _GroupNormEager(torch.autograd.Function):
    """Eager calls that record autograd: ``jedi::group_norm``'s forward, saved tensors and backward without the
    custom op's dispatch layers (see :func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, silu, backend, shift):
        ctx.save_for_backward(x, weight, bias, shift)
        ctx.num_groups, ctx.eps, ctx.silu, ctx.backend = num_groups, eps, silu, backend
        return _fwd_body(x, num_groups, weight, bias, eps, silu, backend, shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, shift = ctx.saved_tensors
        fn = group_norm_bwd if ctx.backend == "triton" else _torch_bwd
        return _grads(ctx, *fn(grad, x, ctx.num_groups, weight, bias, ctx.eps, ctx.silu, shift))


def group_norm_op(x, num_groups, weight, bias, eps, silu, backend, shift=None, x2=None) -> torch.Tensor:
    """The differentiable op behind ``jedi_kernels.group_norm`` (inputs validated, backend resolved): the custom op
    ``jedi::group_norm`` while compiling and for tensor subclasses, the same kernels without its dispatch layers on
    eager calls (:func:`jedi_kernels.ops.eager_call`). ``x2``: normalize cat([x, x2], dim=1); the Triton kernels
    read both in place on eager calls without autograd (inference), every other call concatenates first."""
    how = eager_call(x, weight, bias, shift, x2)
    if x2 is not None:
        if how == "direct" and backend == "triton":
            return group_norm_fwd(x, num_groups, weight, bias, eps, silu, shift, x2)
        x = torch.cat([x, x2], dim=1)
    if how == "direct":
        return _fwd_body(x, num_groups, weight, bias, eps, silu, backend, shift)
    if how == "function":
        return _GroupNormEager.apply(x, num_groups, weight, bias, eps, silu, backend, shift)
    return torch.ops.jedi.group_norm(x, num_groups, weight, bias, eps, silu, backend, shift)
