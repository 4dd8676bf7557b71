"""Set-wise flash attention in Triton (forward + FlashAttention-2 backward) and its ``jedi::`` custom ops.

JeDi's joint self-attention: for every set b of G consecutive images (N = B·G rows of q/k/v) and head h, the G·L tokens
of the set attend to each other,

    O_b,h = softmax(scale · Q_b,h K_b,hᵀ + M) V_b,h,    Q_b,h = q[b·G:(b+1)·G, :, h·D:(h+1)·D] viewed (G·L, D),

where M is 0, or -inf on the (L × L) blocks of image pairs (i, j) that ``set_mask`` forbids. The kernels read q, k, v in
the (N, L, H·D) projection layout through strides (no transpose, no copy; views of a fused qkv projection work):
token t of a set is image t // L, position t % L, i.e. row b·G + t // L of the N dim.

Tiling: a query tile never straddles two images (the grid is (image-in-set × q-tile-within-image, B·H)) and the key
loop walks image by image, key tile by key tile within the image, masking the tail of each image's last tile. A
``set_mask`` becomes, per query image, a compact list of allowed key images: forbidden images cost nothing (their
tiles are never loaded), so a block-diagonal mask costs 1/G of full joint attention.

Head dims that are not powers of two are split into two power-of-two chunks with one ``tl.dot`` per chunk instead of
padding to the next power of two: D = D0 + D1 with D0 the largest power of two <= D and D1 = next_pow2(D - D0)
(>= 16, the smallest ``tl.dot`` K); SD's 40 / 80 / 160 become 32+16 / 64+16 / 128+32 (padding would cost 64 / 128 /
256). ``_CHUNK_HEAD_DIM = False`` (or ``chunk_head_dim=False``) selects plain padding, for the benchmark. The forward
pads head dims up to ``_FWD_PAD_UP_TO`` (64) instead: on the H100 (2026-11-27, bf16, ng 2) d 40 ran 0.752 ms padded to
64 against 0.789 ms as 32+16, while d 80 ran 1.09x faster chunked (64+16) than padded to 128.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from jedi_kernels.backends import env_get, triton_interpreting
from jedi_kernels.ops import cdiv, eager_call
from jedi_kernels.ops import rows_stride as _rows_stride
from jedi_kernels.ops import tma_rows_ok
from jedi_kernels.ops import fast_launch
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.ops.set_attention_gluon import gluon_fwd_ok, gluon_fwd_variant, set_attn_fwd_gluon
from jedi_kernels.ops.set_attention_gluon_bwd import gluon_bwd_ok, gluon_bwd_variant, set_attn_bwd_gluon

__all__ = [
    "set_attn_fwd",
    "set_attn_bwd",
    "set_attention_op",
    "head_dim_chunks",
    "autotune_log",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
# Split non-power-of-two head dims into two power-of-two chunks (True) or pad to the next power of two (False).
_CHUNK_HEAD_DIM = True
# The forward pads head dims up to this many columns rather than chunking them (measured, see the module docstring).
_FWD_PAD_UP_TO = 64
# JEDI_TRITON_AUTOTUNE=0 skips autotuning on GPU and runs the first (default) config of each list.
_AUTOTUNE = os.environ.get("JEDI_TRITON_AUTOTUNE", "1") != "0"
# The interpreter runs one fixed config: small tiles keep CPU tests fast and exercise multi-tile images.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}

_LOG2E = 1.4426950408889634

# H, G, L stay runtime ints: Triton would otherwise compile a separate kernel for each of them equal to 1 (and for
# L % 16 == 0), multiplying compile and autotune time for no gain (alignment comes from HEAD_DIM and the strides).
_NO_SPECIALIZE = ["H", "G", "L"]

# Outputs are allocated through this alias so tests can poison them (fill with NaN) and prove every element is written.
_empty = torch.empty


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_aligned(stride, ROW_ALIGN: tl.constexpr):
    """``stride``, a multiple of ROW_ALIGN elements, written so the compiler knows it (1: unchanged).

    Triton specializes an int argument on divisibility by 16 only. A row stride of 40 (one head of 40: H·D = 40) is
    16-byte aligned in fp16/bf16 but not a multiple of 16, so without this the kernels compile to scalar 2-byte loads
    with no cp.async pipelining and a different shared-memory plan, a variant no SD shape reaches; on the H200
    (2026-11-28) that variant of the dQ kernel's 128x64, 8-warp config read out of bounds (illegal memory access at
    B 1, G 5, L 200, H 1, D 40, where H 2 passed). ``(stride // A) * A`` is the stride itself when A divides it, and
    the compiler's alignment analysis sees the factor A: the loads then compile as for strides divisible by 16.
    (``tl.multiple_of`` cannot mark a kernel argument: it sets an attribute on the value's defining op, which an
    argument lacks.) The launchers pass :func:`_row_align`."""
    if ROW_ALIGN > 1:
        stride = (stride // ROW_ALIGN) * ROW_ALIGN
    return stride


@triton.jit
def _load_chunk(base, rows, row_ok, stride_row, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                ROWS_IN: tl.constexpr = False):
    """Load ``base[rows, COL0:COL0+WIDTH]`` of a (rows, HEAD_DIM) head slice as (R, WIDTH); zero outside.

    ROWS_IN: every row is known valid (L is a multiple of the tile), so no row mask is needed.
    """
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    if COL0 + WIDTH <= HEAD_DIM:
        # the chunk lies inside the head: no column mask (keeps the loads vectorized)
        if ROWS_IN:
            val = tl.load(ptrs)
        else:
            val = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if ROWS_IN:
            val = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
        else:
            val = tl.load(ptrs, mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    return val


@triton.jit
def _store_chunk(base, rows, row_ok, stride_row, val, COL0: tl.constexpr, WIDTH: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Store the (R, WIDTH) tile ``val`` to ``base[rows, COL0:COL0+WIDTH]``, skipping rows/cols outside the head."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    if COL0 + WIDTH <= HEAD_DIM:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_tile(L, H, BLOCK_M: tl.constexpr):
    """(i, mt, b, h, pid_bh) of a query-tile program on the grid (G·⌈L/BLOCK_M⌉, B·H): query image i within its set,
    query tile mt within the image, set b, head h, and the (b, h) program index."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_mt = tl.cdiv(L, BLOCK_M)
    return pid_m // n_mt, pid_m % n_mt, pid_bh // H, pid_bh % H, pid_bh


@triton.jit
def _key_tile(it, n_nt, ImgList, i, G, HAS_MASK: tl.constexpr):
    """(key image j, key tile nt) of step ``it`` of the flat loop over (allowed image, tile): the ``it // n_nt``-th
    image query image i may attend (ImgList row i with a mask, else image it // n_nt itself)."""
    jj = it // n_nt
    if HAS_MASK:
        j = tl.load(ImgList + i * G + jj)
    else:
        j = jj
    return j, it - jj * n_nt


@triton.jit
def _kv_tile(it, n_nt, ImgList, i, G, L, k_set, v_set, stride_kn, stride_kl, stride_vn, stride_vl, offs_n,
             BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, ONE_BASE: tl.constexpr):
    """(k_base, v_base, n_ok) of step ``it`` of a key loop: the K and V addresses of the tile's first row (one scalar
    offset from the set's bases k_set / v_set; the rows within the tile, offs_n, stay loop-invariant so their
    addresses are hoisted) and which of its rows lie inside the image. ONE_BASE (whole tiles, no mask, the set's
    images consecutive L-row blocks): tile it starts at row it·BLOCK_N of the set, no (image, tile) division."""
    if ONE_BASE:
        row0 = tl.cast(it, tl.int64) * BLOCK_N
        return k_set + row0 * stride_kl, v_set + row0 * stride_vl, offs_n < BLOCK_N
    j, nt = _key_tile(it, n_nt, ImgList, i, G, HAS_MASK)
    j64, row0 = tl.cast(j, tl.int64), tl.cast(nt, tl.int64) * BLOCK_N
    return (k_set + j64 * stride_kn + row0 * stride_kl, v_set + j64 * stride_vn + row0 * stride_vl,
            nt * BLOCK_N + offs_n < L)


@triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _set_attn_fwd_kernel(
    Q, K, V, Out, Lse, ImgList, ImgCount, TileCount,
    stride_qn, stride_ql, stride_kn, stride_kl, stride_vn, stride_vl,
    qk_scale_log2,
    H, G, L,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    HAS_MASK: tl.constexpr, COUNT_TILES: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    SCALE_POS: tl.constexpr = True, ROWSUM_DOT: tl.constexpr = False, KV_LINEAR: tl.constexpr = False,
    ROW_ALIGN: tl.constexpr = 1,
):
    """Flash-attention forward for one (query tile of image i, set b, head h).

    With s = scale·log2(e) · q kᵀ (base-2 scores), the online softmax over the allowed key tiles j keeps per row

        m ← max(m, rowmax s_j),   ℓ ← ℓ·2^(m_old − m) + rowsum 2^(s_j − m),   acc ← acc·2^(m_old − m) + 2^(s_j − m) v_j

    and writes O = acc / ℓ and the natural-log logsumexp lse = ln 2 · (m + log2 ℓ) (what the backward recomputes P
    from). The head dim is D0 (+ D1) columns: one ``tl.dot`` per chunk for q kᵀ and for P v, fp32 accumulation.
    ImgList[i, :ImgCount[i]] lists the key images query image i may attend (HAS_MASK); without a mask all G.

    At D = 40 the loop is bound by instruction issue and the exp unit, not the tensor cores (SASS per warp and 128x64
    tile: ~650 instructions, 69 MUFU), so two switches trim per-element FP32 work:
    SCALE_POS (scale > 0): the row max is taken on the raw q kᵀ and scaled once per row, and 2^(s·c − m) is one FFMA
    per element (no separate multiply). ROWSUM_DOT: ℓ's row sums come from the tensor cores, P times a ones tile,
    instead of one FADD per element plus shuffles (the sum is then of P as rounded for the P v product, so the
    normalization matches the numerator). ROW_ALIGN: see :func:`_row_aligned`.
    """
    stride_qn, stride_ql = _row_aligned(stride_qn, ROW_ALIGN), _row_aligned(stride_ql, ROW_ALIGN)
    stride_kn, stride_kl = _row_aligned(stride_kn, ROW_ALIGN), _row_aligned(stride_kl, ROW_ALIGN)
    stride_vn, stride_vl = _row_aligned(stride_vn, ROW_ALIGN), _row_aligned(stride_vl, ROW_ALIGN)
    i, mt, b, h, pid_bh = _query_tile(L, H, BLOCK_M)
    n_nt = tl.cdiv(L, BLOCK_N)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < L

    q_base = Q + (b * G + i).to(tl.int64) * stride_qn + h * HEAD_DIM
    q0 = _load_chunk(q_base, offs_m, m_ok, stride_ql, 0, D0, HEAD_DIM)
    if HAS_D1:
        q1 = _load_chunk(q_base, offs_m, m_ok, stride_ql, D0, D1, HEAD_DIM)
    if DOT_F32:
        q0 = q0.to(tl.float32)
        if HAS_D1:
            q1 = q1.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    if ROWSUM_DOT:
        # every column of P·1 is the row sum; 16 columns is the narrowest tensor-core tile
        l_acc = tl.zeros([BLOCK_M, 16], tl.float32)
        ones = tl.full([BLOCK_N, 16], 1.0, tl.float32 if DOT_F32 else Q.dtype.element_ty)
    visited = tl.zeros([BLOCK_M], tl.int32)

    if HAS_MASK:
        n_img = tl.load(ImgCount + i)
    else:
        n_img = G
    k_set = K + (b * G).to(tl.int64) * stride_kn + h * HEAD_DIM
    v_set = V + (b * G).to(tl.int64) * stride_vn + h * HEAD_DIM
    # one flat loop over (allowed image, key tile within it): the pipeliner sees a single loop of n_img·n_nt steps.
    # The tile's first row is a scalar offset and the rows within it (offs_n) are loop-invariant, so the per-element
    # addresses are hoisted and each step adds one scalar to them
    for it in range(0, n_img * n_nt):
        k_base, v_base, n_ok = _kv_tile(it, n_nt, ImgList, i, G, L, k_set, v_set, stride_kn, stride_kl, stride_vn,
                                        stride_vl, offs_n, BLOCK_N, HAS_MASK, EVEN_N and not HAS_MASK and KV_LINEAR)

        k0 = _load_chunk(k_base, offs_n, n_ok, stride_kl, 0, D0, HEAD_DIM, EVEN_N)
        if DOT_F32:
            k0 = k0.to(tl.float32)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if HAS_D1:
            k1 = _load_chunk(k_base, offs_n, n_ok, stride_kl, D0, D1, HEAD_DIM, EVEN_N)
            if DOT_F32:
                k1 = k1.to(tl.float32)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
        if not SCALE_POS:
            s = s * qk_scale_log2
        if not EVEN_N:
            # the tail of an image's last tile is not part of the image: -inf before the row max
            s = tl.where(n_ok[None, :], s, float("-inf"))

        # every visited tile has >= 1 valid key, so m_new is finite and alpha = 0 on the first tile
        if SCALE_POS:
            # max(c·s) = c·max(s) for c > 0: scale the row max, and fold the scale into one FFMA per element
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
            p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        if ROWSUM_DOT:
            l_acc = tl.dot(p.to(ones.dtype), ones, l_acc * alpha[:, None], input_precision=PREC)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)

        v0 = _load_chunk(v_base, offs_n, n_ok, stride_vl, 0, D0, HEAD_DIM, EVEN_N)
        if DOT_F32:
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PREC)
        if HAS_D1:
            v1 = _load_chunk(v_base, offs_n, n_ok, stride_vl, D0, D1, HEAD_DIM, EVEN_N)
            if DOT_F32:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PREC)
        m_i = m_new
        if COUNT_TILES:
            visited += 1

    if ROWSUM_DOT:
        l_i = tl.max(l_acc, 1)  # all 16 columns hold the same row sum
    # a row with no allowed key (only reachable if a caller skipped set_mask validation) gets O = 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    inv_l = 1.0 / l_safe
    o_base = Out + (b * G + i).to(tl.int64) * L * H * HEAD_DIM + h * HEAD_DIM
    _store_chunk(o_base, offs_m, m_ok, H * HEAD_DIM, acc0 * inv_l[:, None], 0, D0, HEAD_DIM)
    if HAS_D1:
        _store_chunk(o_base, offs_m, m_ok, H * HEAD_DIM, acc1 * inv_l[:, None], D0, D1, HEAD_DIM)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    # lse: (B, H, G*L) contiguous, row (b, h) = pid_bh
    lse_ptrs = Lse + (pid_bh * G + i).to(tl.int64) * L + offs_m
    tl.store(lse_ptrs, lse, mask=m_ok)
    if COUNT_TILES:
        # one counter per program: the number of key tiles its loop really loaded and computed
        tl.store(TileCount + pid_bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0) + tl.arange(0, BLOCK_M),
                 visited, mask=tl.arange(0, BLOCK_M) < 1)


@triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _set_attn_fwd_ws_kernel(
    DescQ, DescK, DescV, Out, Lse, ImgList, ImgCount,
    qk_scale_log2,
    H, G, L,
    HEAD_DIM: tl.constexpr, DP: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """The forward of ``_set_attn_fwd_kernel`` (same online softmax, scale > 0 folded as SCALE_POS, FADD row sums)
    for head dims <= 64, with q/k/v read by TMA through 2-D tensor descriptors over the (N·L, H·D) rows, and the key
    loop warp-specialized by Triton's Hopper pass (``WARP_SPEC``: a producer warp group issues the TMA loads, the
    consumer warp groups run the matmuls and the softmax): the structure cuDNN's sm90 kernel has and ours lacked
    (benchmarks/README.md, the ncu table). Opt-in (``JEDI_TRITON_FWD_WS=1``) until a GPU run times it.

    A descriptor box is DP (the power of two >= HEAD_DIM) columns wide from column h·HEAD_DIM, so it also reads the
    next head's first DP − HEAD_DIM columns (zero past the last head): q's are zeroed, which makes k's irrelevant, and
    v's only reach output columns that are never stored. A key tile that runs past its image's last row reads the
    next image's rows: their scores are set to −inf before the row max, as in the pointer kernel.
    """
    i, mt, b, h, pid_bh = _query_tile(L, H, BLOCK_M)
    n_nt = tl.cdiv(L, BLOCK_N)
    col0 = h * HEAD_DIM
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, DP)
    m_ok = offs_m < L

    q = DescQ.load([(b * G + i) * L + mt * BLOCK_M, col0])
    q = tl.where((cols < HEAD_DIM)[None, :], q, tl.zeros_like(q))  # the next head's columns contribute nothing
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    if HAS_MASK:
        n_img = tl.load(ImgCount + i)
    else:
        n_img = G
    for it in tl.range(0, n_img * n_nt, warp_specialize=WARP_SPEC):
        j, nt = _key_tile(it, n_nt, ImgList, i, G, HAS_MASK)
        row = (b * G + j) * L + nt * BLOCK_N
        k = DescK.load([row, col0])
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        if not EVEN_N:
            s = tl.where((nt * BLOCK_N + offs_n < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
        p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = DescV.load([row, col0])
        if DOT_F32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc * (1.0 / l_safe)[:, None]
    o_rows = Out + ((b * G + i).to(tl.int64) * L + offs_m) * (H * HEAD_DIM) + col0
    tl.store(o_rows[:, None] + cols[None, :], o.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + (pid_bh * G + i).to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _set_attn_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_on, stride_ol, stride_don, stride_dol,
    H, G, L,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, ROW_ALIGN: tl.constexpr = 1,
):
    """Delta = rowsum(dO ∘ O) per query row (fp32), the softmax-Jacobian term dS = P ∘ (dP − Delta) needs."""
    stride_on, stride_ol = _row_aligned(stride_on, ROW_ALIGN), _row_aligned(stride_ol, ROW_ALIGN)
    stride_don, stride_dol = _row_aligned(stride_don, ROW_ALIGN), _row_aligned(stride_dol, ROW_ALIGN)
    i, mt, b, h, pid_bh = _query_tile(L, H, BLOCK_M)
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    o = _load_chunk(Out + (b * G + i).to(tl.int64) * stride_on + h * HEAD_DIM, offs_m, m_ok, stride_ol,
                    0, D_PAD, HEAD_DIM)
    do = _load_chunk(DO + (b * G + i).to(tl.int64) * stride_don + h * HEAD_DIM, offs_m, m_ok, stride_dol,
                     0, D_PAD, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (pid_bh * G + i).to(tl.int64) * L + offs_m, delta, mask=m_ok)


@triton.heuristics({"EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _set_attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQacc, ImgList, ImgCount,
    stride_qn, stride_ql, stride_kn, stride_kl, stride_vn, stride_vl, stride_don, stride_dol,
    qk_scale_log2, scale,
    H, G, L,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, FUSED_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, Q_LINEAR: tl.constexpr = False,
    ROW_ALIGN: tl.constexpr = 1,
):
    """dK, dV for one (key tile of image j, set b, head h), looping over the query tiles that attend image j.

    FlashAttention-2 backward with P recomputed from the saved logsumexp (transposed, keys as rows):

        Pᵀ = 2^(s·log2e·kqᵀ − lse·log2e),  dV += Pᵀ dO,  dPᵀ = V dOᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ − Delta),  dK += scale · dSᵀ Q

    ImgList[j, :ImgCount[j]] lists the query images allowed to attend key image j (the transposed mask); an image no
    query attends gets dK = dV = 0. With ``FUSED_DQ`` the program also adds scale · dS K, its keys' share of every
    query tile's dQ, into the float32 (N, L, H*D) DQacc with atomics (no dQ kernel: P and dP are not recomputed).
    Keys past L need no mask there: their K rows are loaded as zeros. ROW_ALIGN: see :func:`_row_aligned`.
    """
    stride_qn, stride_ql = _row_aligned(stride_qn, ROW_ALIGN), _row_aligned(stride_ql, ROW_ALIGN)
    stride_kn, stride_kl = _row_aligned(stride_kn, ROW_ALIGN), _row_aligned(stride_kl, ROW_ALIGN)
    stride_vn, stride_vl = _row_aligned(stride_vn, ROW_ALIGN), _row_aligned(stride_vl, ROW_ALIGN)
    stride_don, stride_dol = _row_aligned(stride_don, ROW_ALIGN), _row_aligned(stride_dol, ROW_ALIGN)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_mt = tl.cdiv(L, BLOCK_M)
    n_nt = tl.cdiv(L, BLOCK_N)
    j = pid_n // n_nt  # key image within the set
    nt = pid_n % n_nt
    b = pid_bh // H
    h = pid_bh % H

    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < L
    k_base = K + (b * G + j).to(tl.int64) * stride_kn + h * HEAD_DIM
    v_base = V + (b * G + j).to(tl.int64) * stride_vn + h * HEAD_DIM
    k0 = _load_chunk(k_base, offs_n, n_ok, stride_kl, 0, D0, HEAD_DIM)
    v0 = _load_chunk(v_base, offs_n, n_ok, stride_vl, 0, D0, HEAD_DIM)
    if HAS_D1:
        k1 = _load_chunk(k_base, offs_n, n_ok, stride_kl, D0, D1, HEAD_DIM)
        v1 = _load_chunk(v_base, offs_n, n_ok, stride_vl, D0, D1, HEAD_DIM)
    if DOT_F32:
        k0 = k0.to(tl.float32)
        v0 = v0.to(tl.float32)
        if HAS_D1:
            k1 = k1.to(tl.float32)
            v1 = v1.to(tl.float32)

    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], tl.float32)

    if HAS_MASK:
        n_img = tl.load(ImgCount + j)
    else:
        n_img = G
    q_set = Q + (b * G).to(tl.int64) * stride_qn + h * HEAD_DIM
    do_set = DO + (b * G).to(tl.int64) * stride_don + h * HEAD_DIM
    lse_set = (pid_bh * G).to(tl.int64) * L  # Lse and Delta rows: (B, H, G·L) contiguous, always linear
    # as in the forward: each query tile's first row is a scalar offset from the set's base, the rows within it
    # (offs_m) loop-invariant; Q_LINEAR (q and dO images consecutive L-row blocks) with whole tiles and no mask
    # needs no (image, tile) division either
    for it in range(0, n_img * n_mt):
        if EVEN_M and not HAS_MASK and Q_LINEAR:
            row0 = tl.cast(it, tl.int64) * BLOCK_M
            q_base = q_set + row0 * stride_ql
            do_base = do_set + row0 * stride_dol
            lse_row0 = lse_set + row0
            m_ok = offs_m < BLOCK_M
        else:
            ii = it // n_mt
            mt = it - ii * n_mt
            if HAS_MASK:
                i = tl.load(ImgList + j * G + ii)
            else:
                i = ii
            m_ok = mt * BLOCK_M + offs_m < L
            i64, row_in = tl.cast(i, tl.int64), tl.cast(mt, tl.int64) * BLOCK_M
            q_base = q_set + i64 * stride_qn + row_in * stride_ql
            do_base = do_set + i64 * stride_don + row_in * stride_dol
            lse_row0 = lse_set + i64 * L + row_in
        if EVEN_M:
            lse2 = tl.load(Lse + lse_row0 + offs_m) * 1.4426950408889634
            delta = tl.load(Delta + lse_row0 + offs_m)
        else:
            # rows past the image's end: lse = +inf makes their P column exactly 0
            lse2 = tl.load(Lse + lse_row0 + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + lse_row0 + offs_m, mask=m_ok, other=0.0)

        q0 = _load_chunk(q_base, offs_m, m_ok, stride_ql, 0, D0, HEAD_DIM, EVEN_M)
        do0 = _load_chunk(do_base, offs_m, m_ok, stride_dol, 0, D0, HEAD_DIM, EVEN_M)
        if DOT_F32:
            q0 = q0.to(tl.float32)
            do0 = do0.to(tl.float32)
        st = tl.dot(k0, tl.trans(q0), input_precision=PREC)  # (BLOCK_N, BLOCK_M) = (k qᵀ)
        if HAS_D1:
            q1 = _load_chunk(q_base, offs_m, m_ok, stride_ql, D0, D1, HEAD_DIM, EVEN_M)
            do1 = _load_chunk(do_base, offs_m, m_ok, stride_dol, D0, D1, HEAD_DIM, EVEN_M)
            if DOT_F32:
                q1 = q1.to(tl.float32)
                do1 = do1.to(tl.float32)
            st = tl.dot(k1, tl.trans(q1), st, input_precision=PREC)
        pt = tl.math.exp2(st * qk_scale_log2 - lse2[None, :])
        dv0 = tl.dot(pt.to(do0.dtype), do0, dv0, input_precision=PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PREC)
        if HAS_D1:
            dv1 = tl.dot(pt.to(do1.dtype), do1, dv1, input_precision=PREC)
            dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk0 = tl.dot(dst.to(q0.dtype), q0, dk0, input_precision=PREC)
        if HAS_D1:
            dk1 = tl.dot(dst.to(q1.dtype), q1, dk1, input_precision=PREC)
        if FUSED_DQ:
            ds = tl.trans(dst.to(k0.dtype))
            dq_rows = DQacc + (b * G).to(tl.int64) * L * (H * HEAD_DIM) + h * HEAD_DIM + \
                (lse_row0 - lse_set) * (H * HEAD_DIM) + offs_m[:, None] * (H * HEAD_DIM)
            cols0 = tl.arange(0, D0)
            tl.atomic_add(dq_rows + cols0[None, :], tl.dot(ds, k0, input_precision=PREC) * scale,
                          mask=m_ok[:, None] & (cols0[None, :] < HEAD_DIM), sem="relaxed")
            if HAS_D1:
                cols1 = D0 + tl.arange(0, D1)
                tl.atomic_add(dq_rows + cols1[None, :], tl.dot(ds, k1, input_precision=PREC) * scale,
                              mask=m_ok[:, None] & (cols1[None, :] < HEAD_DIM), sem="relaxed")

    row_stride = H * HEAD_DIM
    dk_base = DK + (b * G + j).to(tl.int64) * L * row_stride + h * HEAD_DIM
    dv_base = DV + (b * G + j).to(tl.int64) * L * row_stride + h * HEAD_DIM
    _store_chunk(dk_base, offs_n, n_ok, row_stride, dk0 * scale, 0, D0, HEAD_DIM)
    _store_chunk(dv_base, offs_n, n_ok, row_stride, dv0, 0, D0, HEAD_DIM)
    if HAS_D1:
        _store_chunk(dk_base, offs_n, n_ok, row_stride, dk1 * scale, D0, D1, HEAD_DIM)
        _store_chunk(dv_base, offs_n, n_ok, row_stride, dv1, D0, D1, HEAD_DIM)


@triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _set_attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, ImgList, ImgCount,
    stride_qn, stride_ql, stride_kn, stride_kl, stride_vn, stride_vl, stride_don, stride_dol,
    qk_scale_log2, scale,
    H, G, L,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, KV_LINEAR: tl.constexpr = False,
    ROW_ALIGN: tl.constexpr = 1,
):
    """dQ for one (query tile of image i, set b, head h), looping over the allowed key tiles as the forward does:

        P = 2^(s·log2e·q kᵀ − lse·log2e),  dP = dO Vᵀ,  dS = P ∘ (dP − Delta),  dQ = scale · dS K
    """
    stride_qn, stride_ql = _row_aligned(stride_qn, ROW_ALIGN), _row_aligned(stride_ql, ROW_ALIGN)
    stride_kn, stride_kl = _row_aligned(stride_kn, ROW_ALIGN), _row_aligned(stride_kl, ROW_ALIGN)
    stride_vn, stride_vl = _row_aligned(stride_vn, ROW_ALIGN), _row_aligned(stride_vl, ROW_ALIGN)
    stride_don, stride_dol = _row_aligned(stride_don, ROW_ALIGN), _row_aligned(stride_dol, ROW_ALIGN)
    i, mt, b, h, pid_bh = _query_tile(L, H, BLOCK_M)
    n_nt = tl.cdiv(L, BLOCK_N)

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < L
    q_base = Q + (b * G + i).to(tl.int64) * stride_qn + h * HEAD_DIM
    do_base = DO + (b * G + i).to(tl.int64) * stride_don + h * HEAD_DIM
    q0 = _load_chunk(q_base, offs_m, m_ok, stride_ql, 0, D0, HEAD_DIM)
    do0 = _load_chunk(do_base, offs_m, m_ok, stride_dol, 0, D0, HEAD_DIM)
    if HAS_D1:
        q1 = _load_chunk(q_base, offs_m, m_ok, stride_ql, D0, D1, HEAD_DIM)
        do1 = _load_chunk(do_base, offs_m, m_ok, stride_dol, D0, D1, HEAD_DIM)
    if DOT_F32:
        q0 = q0.to(tl.float32)
        do0 = do0.to(tl.float32)
        if HAS_D1:
            q1 = q1.to(tl.float32)
            do1 = do1.to(tl.float32)
    row = (pid_bh * G + i).to(tl.int64) * L + offs_m
    lse2 = tl.load(Lse + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)

    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], tl.float32)

    if HAS_MASK:
        n_img = tl.load(ImgCount + i)
    else:
        n_img = G
    k_set = K + (b * G).to(tl.int64) * stride_kn + h * HEAD_DIM
    v_set = V + (b * G).to(tl.int64) * stride_vn + h * HEAD_DIM
    for it in range(0, n_img * n_nt):  # key tiles addressed as in the forward
        k_base, v_base, n_ok = _kv_tile(it, n_nt, ImgList, i, G, L, k_set, v_set, stride_kn, stride_kl, stride_vn,
                                        stride_vl, offs_n, BLOCK_N, HAS_MASK, EVEN_N and not HAS_MASK and KV_LINEAR)
        k0 = _load_chunk(k_base, offs_n, n_ok, stride_kl, 0, D0, HEAD_DIM, EVEN_N)
        v0 = _load_chunk(v_base, offs_n, n_ok, stride_vl, 0, D0, HEAD_DIM, EVEN_N)
        if DOT_F32:
            k0 = k0.to(tl.float32)
            v0 = v0.to(tl.float32)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if HAS_D1:
            k1 = _load_chunk(k_base, offs_n, n_ok, stride_kl, D0, D1, HEAD_DIM, EVEN_N)
            v1 = _load_chunk(v_base, offs_n, n_ok, stride_vl, D0, D1, HEAD_DIM, EVEN_N)
            if DOT_F32:
                k1 = k1.to(tl.float32)
                v1 = v1.to(tl.float32)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PREC)
        p = tl.math.exp2(s * qk_scale_log2 - lse2[:, None])
        if not EVEN_N:
            # keys past the image's end are zero rows of K, not keys: their P must be 0
            p = tl.where(n_ok[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=PREC)
        if HAS_D1:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=PREC)

    row_stride = H * HEAD_DIM
    dq_base = DQ + (b * G + i).to(tl.int64) * L * row_stride + h * HEAD_DIM
    _store_chunk(dq_base, offs_m, m_ok, row_stride, dq0 * scale, 0, D0, HEAD_DIM)
    if HAS_D1:
        _store_chunk(dq_base, offs_m, m_ok, row_stride, dq1 * scale, D0, D1, HEAD_DIM)


@triton.jit
def _mask_lists_kernel(Mask, Lst, Cnt, stride_r, stride_c, G, BLOCK_G: tl.constexpr):
    """Image lists of a (G, G) mask for the kernels above: program (r, t) handles row r of the mask (t = 0) or its
    column r (t = 1, the transposed lists). Lst[t, r] gets the allowed images in ascending order, then the forbidden
    ones (a permutation of 0..G-1); Cnt[t, r] the number allowed. One launch instead of a dozen small torch ops."""
    r = tl.program_id(0)
    t = tl.program_id(1)
    s_major = stride_r + (stride_c - stride_r) * t  # t = 0: walk row r; t = 1: walk column r
    s_minor = stride_c + (stride_r - stride_c) * t
    idx = tl.arange(0, BLOCK_G)
    ok = idx < G
    m = tl.load(Mask + r * s_major + idx * s_minor, mask=ok, other=0)
    a = ((m != 0) & ok).to(tl.int32)
    cnt = tl.sum(a, 0)
    # inclusive prefix counts; the padding (idx >= G) comes after every real image, so it shifts no real rank
    pos = tl.where(a != 0, tl.cumsum(a, 0) - 1, tl.cumsum(1 - a, 0) - 1 + cnt)
    tl.store(Lst + (t * G + r) * G + pos, idx, mask=ok)
    tl.store(Cnt + t * G + r, cnt)


# ----------------------------------------------------------------------------------------------------------------------
# Configs (GPU autotuning; the interpreter runs _INTERPRETER_CONFIG)
# ----------------------------------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def head_dim_chunks(D: int, chunk: Optional[bool] = None) -> tuple[int, int]:
    """(D0, D1) columns the kernels cover for head dim D; D1 = 0 means one chunk.

    Chunked: D0 = largest power of two <= D (>= 16), D1 = next_pow2(D - D0) (>= 16) when D is not a power of two:
    40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 8 -> (16, 0), 24 -> (16, 16), 72 -> (64, 16), 256 -> (256, 0).
    Padded (chunk=False): (max(16, next_pow2(D)), 0): 40 -> 64, 80 -> 128, 160 -> 256.
    """
    if chunk is None:
        chunk = _CHUNK_HEAD_DIM
    if not chunk:
        return max(16, _next_pow2(D)), 0
    d0 = 1 << (D.bit_length() - 1)
    if d0 == D or D <= 16:
        return max(16, _next_pow2(D)), 0
    return d0, max(16, _next_pow2(D - d0))


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _rowsum_dot(width: int, dtype: torch.dtype) -> bool:
    """Forward row sums on the tensor cores (``ROWSUM_DOT``, a 16-column P·1 product) instead of per-element FADDs.
    Off by default: static SASS had favoured it for narrow heads in half precision, but on the H100 (2026-11-27,
    L 4096, d 40, ng 2, bf16) the FADD kernel ran 1.03x faster (0.777 against 0.801 ms). ``JEDI_ATTN_ROWSUM=dot|fadd``
    forces one way (benchmarks compare both)."""
    force = env_get("JEDI_ATTN_ROWSUM", "")
    if force in ("dot", "fadd"):
        return force == "dot"
    return False


def _fused_dq(D0: int, D1: int) -> bool:
    """dQ inside the dK/dV kernel (``FUSED_DQ``: atomics into a float32 accumulator) instead of a second kernel that
    recomputes S, P and dP. Off by default: static SASS per 1024 scores (sm_90 bf16, tools/sass_loop_mix.py --bwd)
    predicted d 40 763 -> 583 instructions and d 80 859 -> 663, but on the H100 (2026-11-27, ng 2, bf16) the two
    kernels were faster: d 40 2.08 against 2.35 ms, d 80 0.203 against 0.221 ms (the atomics' L2 traffic and the
    zeroed float32 accumulator cost more than the recomputation saves). ``JEDI_TRITON_BWD_DQ=atomic|kernel`` forces
    one way (benchmarks compare both); deterministic mode (``torch.use_deterministic_algorithms``) always takes the
    kernel, whose dQ does not depend on atomic ordering."""
    force = env_get("JEDI_TRITON_BWD_DQ", "")
    if force not in ("", "atomic", "kernel"):
        raise ValueError(f"JEDI_TRITON_BWD_DQ must be 'atomic' or 'kernel', got {force!r}")
    if torch.are_deterministic_algorithms_enabled():
        return False
    return force == "atomic"


def _dclass(D0: int, D1: int, dtype: torch.dtype) -> str:
    """Config class of a head split into chunks D0 + D1 (padded width): d64, d96 (SD's 80), d128, d192 (SD's 160),
    d256; f32 for float32 (tests)."""
    if dtype == torch.float32:
        return "f32"  # GPU fp32 is for tests: small tiles that fit shared memory at every head dim
    width = D0 + D1
    for cls, top in (("d64", 64), ("d96", 96), ("d128", 128), ("d192", 192)):
        if width <= top:
            return cls
    return "d256"


# First config of each list = the default when autotuning is off (JEDI_TRITON_AUTOTUNE=0). Tiles: H100, wgmma
# wants BLOCK_M = 64·k per warpgroup; the key tile and stage count trade shared memory (K and V tiles per stage).
# Every default compiles for sm_90 without register spills and fits sm_80's shared memory at the widest head dim of
# its class (tools/triton_aot_check.py, in CI); three per list (five for the d <= 64 forward) keeps first-call compile
# + autotune time of a whole benchmark sweep within a couple of minutes.
_FWD_CONFIGS = {
    # d 40 (padded to 64): the default holds 8 warps per SM (254 registers: 2 CTAs), and ncu found the H100 kernel
    # latency-bound there (46 % issue slots busy, no pipe above 45 %). The last two raise occupancy at a modest
    # instruction cost (sm_90 bf16, SASS loop instructions per 1024 scores / warps per SM): 128x64 w4 258 / 8,
    # 128x128 w8 232 / 8, 64x64 w4 298 / 16, 128x64 w8 299 / 16 (128 registers), 64x128 w4 s2 233 / 12 (164
    # registers, 72 KB); the autotuner times them (autotune_log; benchmarks/README.md, "Address arithmetic")
    "d64": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 128, 4, 2)],
    # d 80: 8 warps over 128 x 128 issue 302 instead of 330 instructions per 1024 scores per warp at 197 registers,
    # but 128 x 64 over 8 warps ran 1.21-1.27x faster on the H100 at ng 2-8 (2026-11-27, third run; a tie at ng 1),
    # so it leads; 4 warps over 128 x 64 take 240 registers on sm_90 and spill 80 B on sm_80
    "d96": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3)],
    # at 128 columns 4 warps spill (255 registers, 272 B on sm_90)
    "d128": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3)],
    # d 160: 64 x 64 over 4 warps won 6 of the H100's 8 tunings (L 64 and 256, ng 1-8; x1.08-1.55), lost by 5 % at
    # L 256 ng 8 (2026-11-27, third run): SD's short 160-wide sequences fill the GPU only with small query tiles
    # (no spills on sm_90; 20 B on sm_80 in fp16)
    "d192": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2)],
    "d256": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 2)],
    "f32": [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2)],
}
# Backward defaults by static SASS per 1024 scores, sm_90 bf16 (tools/sass_loop_mix.py --bwd): a 64-key dK/dV tile
# or a 64-query dQ tile over 8 warps computes every exp twice (MUFU 66-68 instead of 33-34) and issues 1.5-2.5x the
# instructions of the 128-wide tiles: d 160 dK/dV 2256 -> 960, dQ 1014 -> 650; d 80 650 -> 491, 498 -> 368. At
# d <= 64, dK/dV (64, 128, 8 warps) issues about as much as (32, 128, 4) at d 40 (447 vs 437) and 6 % less at 64,
# where (32, 128, 4) spills (255 registers; 180-188 instead); dQ (128, 64, 8) issues 8 % less at d 40. Head dims
# 200-256 keep tiles without spills that fit sm_80's 163 KB of shared memory at D = 256.
# The H100 (2026-11-27, third run; fwd+bwd, ng 2, bf16) disagreed with the instruction counts wherever it tuned: the
# smaller tiles won, by more than the instructions they add (more programs in flight; fewer registers each), so they
# lead the lists now: dK/dV d 40 64 x 64 w4 1.070 ms vs 64 x 128 w8 1.743, d 80 0.104 vs 0.156; dQ d 40 128 x 32 w4
# 0.710 vs 128 x 64 w8 0.767, d 80 64 x 64 w4 0.072 vs 0.115 (the d 80 dK/dV one spills 64 B on sm_80, none on
# sm_90). At d 160 the winners (64 x 64 w8: dK/dV 0.036 vs 0.044 ms, dQ 0.030 vs 0.036 at L 256) stay second: on
# sm_80 they spill 868 and 64 B (the lists' first: 232 and 0). (The autotuner picks the winners anyway; the lists'
# order is what runs with JEDI_TRITON_AUTOTUNE=0.)
# dK/dV: a program owns BLOCK_N keys and walks BLOCK_M queries.
_DKDV_CONFIGS = {
    "d64": [_cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 2)],
    "d96": [_cfg(64, 64, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 128, 8, 2)],
    # d 128: 64 x 128 sat at 255 registers and spills 64 B since the query-tile addresses are hoisted out of the loop
    # (2026-11-27, fifth session), so the default is 32 x 128 (214 registers; 510 instead of 395 loop instructions
    # per 1024 scores); the autotuner still times the wider tile
    "d128": [_cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2), _cfg(64, 64, 4, 3)],
    "d192": [_cfg(32, 128, 8, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 8, 2)],
    "d256": [_cfg(32, 64, 8, 2), _cfg(64, 64, 8, 2), _cfg(32, 128, 8, 2)],
    "f32": [_cfg(32, 32, 4, 2), _cfg(16, 32, 4, 2)],
}
# dQ: a program owns BLOCK_M queries and walks BLOCK_N keys.
_DQ_CONFIGS = {
    "d64": [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3)],
    "d96": [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2)],
    "d128": [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 8, 2)],
    "d192": [_cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2)],
    "d256": [_cfg(64, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2)],
    "f32": [_cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2)],
}
# names a kernel lacks are skipped
_TUNE_KEY = ["HEAD_DIM", "D0", "L", "G", "HAS_MASK", "ROWSUM_DOT", "KV_LINEAR", "Q_LINEAR"]


_KERNELS = {"fwd": _set_attn_fwd_kernel, "dkdv": _set_attn_bwd_dkdv_kernel,
            "dkdv_dq": _set_attn_bwd_dkdv_kernel,  # FUSED_DQ: dQ by atomics into DQacc
            "dq": _set_attn_bwd_dq_kernel}


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, dclass: str, autotune: bool):
    """The autotuned wrapper of one kernel for one head-dim class (a separate tuning cache per class); with
    ``autotune`` False it holds only the class's first (default) config. The fused dK/dV/dQ kernel accumulates into
    DQacc, so the autotuner zeroes it before every timed run and once more before the real one."""
    configs = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dkdv_dq": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}[kind]
    cfgs = configs[dclass] if autotune else configs[dclass][:1]
    return triton.autotune(configs=cfgs, key=_TUNE_KEY,
                           reset_to_zero=["DQacc"] if kind == "dkdv_dq" else None)(_KERNELS[kind])


# What the autotuner measured, one entry per tuning (appended by _launch when a wrapper's cache grows): benchmarks
# record it next to their timings, so a GPU run says which config won each shape and by how much.
_TUNE_LOG: list[dict] = []


def _config_name(cfg) -> str:
    """A tuning config as one short string: ``BLOCK_MxBLOCK_N wW sS``."""
    kw = cfg.kwargs
    return f"{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')} w{cfg.num_warps} s{cfg.num_stages}"


def _note_tuning(kind: str, dclass: str, tuner, n_before: int, timings_before) -> None:
    """Log the tuning an autotuned launch just ran: the keys added to ``tuner.cache`` after its first ``n_before``
    (a dict keeps insertion order), each with the winning config and the median ms of every config
    (``tuner.configs_timings``, the latest tuning's; none if it is still ``timings_before``, as when Triton's disk
    cache of tunings answered)."""
    timings = getattr(tuner, "configs_timings", None)
    if timings is timings_before or not isinstance(timings, dict):
        timings = {}
    for key in list(tuner.cache)[n_before:]:
        ms = {_config_name(c): float(t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        _TUNE_LOG.append({"kernel": kind, "class": dclass, "key": [str(x) for x in key],
                          "best": _config_name(tuner.cache[key]), "default": _config_name(tuner.configs[0]),
                          "ms": ms})


def autotune_log() -> list[dict]:
    """Every tuning the set-attention autotuner ran in this process, oldest first: kernel ("fwd", "dkdv", "dkdv_dq",
    "dq"), head-dim class, tuning key (``_TUNE_KEY`` values and the argument dtypes), the winning config, the
    class's default (first) config and the median ms of each config tried. Empty under the interpreter or with
    ``JEDI_TRITON_AUTOTUNE=0`` (nothing is tuned)."""
    return [dict(e, ms=dict(e["ms"])) for e in _TUNE_LOG]


def _launch(kind: str, dclass: str, grid_fn, args: tuple, meta: dict, config: Optional[dict], grid_key: tuple):
    """Run a kernel: a fixed config under the interpreter or when given one, else the autotuned wrapper (whose new
    tunings go to :func:`autotune_log`). Through :func:`fast_launch.launch`: ``grid_key`` holds what ``grid_fn``
    depends on besides the config."""
    kernel = _KERNELS[kind]
    if config is None and triton_interpreting():
        config = _INTERPRETER_CONFIG
    if config is not None:
        cfg = dict(config)
        launch(kernel, grid_fn(cfg), *args, **meta, **cfg)
    else:
        tuner = _tuned(kind, dclass, _AUTOTUNE)
        n, timings = len(tuner.cache), getattr(tuner, "configs_timings", None)
        launch(tuner, grid_fn, *args, grid_key=grid_key, **meta)
        if len(tuner.cache) > n:
            _note_tuning(kind, dclass, tuner, n, timings)


# ----------------------------------------------------------------------------------------------------------------------
# Launch plans: an eager call replayed from the launches its first call recorded
# ----------------------------------------------------------------------------------------------------------------------
#
# With cached launches (fast_launch) an eager forward still cost ≈ 25 µs of host time on the CI machine's CPU before
# the driver (tools/host_overhead.py), spread over checks, three environment switches, allocations, the head-dim
# split, the alignment and stride rules, the config class, the autotuner lookup and the launch key. All of it is a
# function of a few properties of the call: the shapes, strides, dtypes and 16-byte alignments of the inputs, the
# set size, heads and scale, the device, the switches read per call and the module's constants (the plan keys
# below). So the first call with given properties runs as before, recording (fast_launch.recording) the cache entry
# of each launch and where each tensor argument came from (an input, or a buffer the call allocated); later calls
# with the same properties allocate the same buffers and replay the entries with the new tensors (fast_launch.
# make_plan / run_plan): ≈ 8 µs for the forward, ≈ 12 instead of ≈ 50 for the backward. Planned: the forward on the
# pointer kernels, with or without a set mask (the mask's uint8 view is a plan input), and the backward without a
# mask, with dQ by its own kernel. Not planned (the full path every call): the opt-in Gluon / TMA kernels, a fixed
# config, a chunking override, a tile counter, the masked backward, the atomic dQ, arguments that compare equal
# without being the same (0.0 / -0.0 scales, bools or numpy ints as sizes: _plan_device), tensor subclasses, and a
# call whose inputs alias each other (a backward whose gradient is its output) or whose launches took a copy made on
# the way (a strided input), when it is the first of its key. tests/kernels/test_fast_launch.py checks on the
# stand-in driver that a replayed call passes the driver exactly what Triton's own launch path passes, tensor by
# tensor.

_FWD_PLANS: dict = fast_launch.plan_cache()
_BWD_PLANS: dict = fast_launch.plan_cache()


def _fwd_plan_key(q, k, v, m8, set_size, heads, scale, device: int) -> tuple:
    """Everything the forward's launches depend on besides the tensors' addresses (section comment); ``m8``: the set
    mask as the mask-list kernel reads it (uint8), or None; ``device``: :func:`fast_launch.plan_device`. The buffers
    go where the full path puts them: out and lse on q's device, the mask lists on the mask's."""
    mask = fast_launch.tensor_facts(m8)
    return (q.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, mask, set_size, heads, scale, device,
            env_get("JEDI_ATTN_ROWSUM"), _AUTOTUNE, _CHUNK_HEAD_DIM, _FWD_PAD_UP_TO)


def _bwd_plan_key(do, q, k, v, out, lse, set_size, heads, scale, device: int) -> tuple:
    """Everything the backward's launches depend on besides the tensors' addresses (section comment); ``device``:
    :func:`fast_launch.plan_device`. The buffers go where the full path puts them: delta on out's device, the
    gradients on q's."""
    return (q.shape, do.stride(), q.stride(), k.stride(), v.stride(), out.stride(), lse.shape, lse.stride(),
            do.dtype, q.dtype, k.dtype, v.dtype, out.dtype, lse.dtype, q.device, out.device,
            do.data_ptr() & 15, q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, out.data_ptr() & 15,
            lse.data_ptr() & 15, set_size, heads, scale, device, _AUTOTUNE, _CHUNK_HEAD_DIM)


def _plan_device(q, k, v, set_size, heads, scale, chunk_head_dim, config) -> int | None:
    """Triton's current device when this call may use a launch plan, else None: plain tensors (a subclass keeps its
    own dispatch), a plain int set size and heads and a nonzero float scale (a plan replays the recorded call's
    scalars, and True == 1, 0.0 == -0.0), no launch overrides, and plans possible at all
    (:func:`fast_launch.plan_device`)."""
    if (chunk_head_dim is not None or config is not None or type(scale) is not float or not scale
            or type(set_size) is not int or type(heads) is not int
            or type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor):
        return None
    return fast_launch.plan_device()


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------


def _check_launch(q: torch.Tensor, set_size: int, heads: int, name: str = "q") -> tuple[int, int, int, int, int]:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"{name}: the Triton set-attention kernels take float16, bfloat16 or float32, got {q.dtype} "
            f"(float64 runs on backend='torch')"
        )
    if q.dim() != 3:
        raise ValueError(f"{name} must have shape (N, L, heads*head_dim), got {tuple(q.shape)}")
    N, L, HD = q.shape
    if N % set_size or HD % heads:
        raise ValueError(f"{name} shape {tuple(q.shape)} does not split into N = B*{set_size}, H*D = {heads}*D")
    D = HD // heads
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim = {D} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    return N // set_size, set_size, L, heads, D


def _row_align(*tensors: torch.Tensor) -> int:
    """ROW_ALIGN for the pointer kernels (:func:`_row_aligned`): 16 bytes' worth of elements when some image or row
    stride is not a multiple of 16 but every base pointer and every such stride is 16-byte aligned; else 1, which
    changes nothing (strides divisible by 16, as at every SD shape, are specialized by Triton itself; unaligned rows
    get no alignment claim)."""
    strides = [s for t in tensors for s in (t.stride(0), t.stride(1))]
    if all(s % 16 == 0 for s in strides):
        return 1
    es = tensors[0].element_size()
    if any(t.data_ptr() % 16 for t in tensors) or any((s * es) % 16 for s in strides):
        return 1
    return 16 // es


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels read rows through strides but need unit stride along H*D (e.g. expanded grads have stride 0)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_lists(set_mask: torch.Tensor, G: int, both: bool = False):
    """Compact int32 image lists + counts of a bool (G, G) mask, on its device, in one launch (no host sync, no
    data-dependent allocation: CUDA-graph safe; :func:`_mask_lists_kernel`).

    Returns (lst, cnt): lst (G, G), row i holding the images j with mask[i, j] (ascending), then the forbidden ones
    (the kernels read only the first cnt[i]); cnt (G,). With ``both``, lst is (2, G, G) and cnt (2, G): index 0 as
    above, index 1 the transposed lists (per key image j, the query images i with mask[i, j]) the backward needs.
    """
    m = set_mask.view(torch.uint8) if set_mask.dtype == torch.bool else set_mask
    n = 2 if both else 1
    # (G, G) / (G,) without ``both``: the layout of index 0 of the (2, G, G) / (2, G) ones, the buffers themselves
    # (no views: a launch plan must find them among the call's allocations)
    lst = _empty((n, G, G) if both else (G, G), device=m.device, dtype=torch.int32)
    cnt = _empty((n, G) if both else (G,), device=m.device, dtype=torch.int32)
    launch(_mask_lists_kernel, (G, n), m, lst, cnt, m.stride(0), m.stride(1), G, BLOCK_G=max(2, _next_pow2(G)))
    return lst, cnt


def _prec(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, input_precision): the interpreter's bf16 dot is wrong, so it runs every dot in fp32; fp32 inputs use
    IEEE fp32 dots (not tf32) so GPU fp32 results are comparable to torch's fp32 matmul."""
    interp = triton_interpreting()
    return interp, ("ieee" if (interp or dtype == torch.float32) else "tf32")


# The TMA + warp-specialized forward (``_set_attn_fwd_ws_kernel``, ``JEDI_TRITON_FWD_WS=1``): 128 queries per program
# and 64-key tiles on 4 consumer warps; Triton's Hopper pass adds the producer warps (12 in all on sm_90).
_WS_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_WS_MAX_HEAD_DIM = 64


def _fwd_ws_requested() -> bool:
    """``JEDI_TRITON_FWD_WS``: "1" takes the TMA + warp-specialized forward where it applies; unset/"0": not."""
    v = env_get("JEDI_TRITON_FWD_WS", "")
    if v not in ("", "0", "1"):
        raise ValueError(f"JEDI_TRITON_FWD_WS must be 0 or 1, got {v!r}")
    return v == "1"


def _rows_linear(t: torch.Tensor, L: int) -> bool:
    """The images of ``t`` (N, L, ·) are consecutive blocks of L rows: stride(0) == L·stride(1), so row r of image n
    is row n·L + r of one (N·L)-row matrix (contiguous tensors and views of a fused qkv projection). The kernels then
    address a set's key tiles from one base without splitting the tile index into (image, tile)."""
    return t.stride(0) == L * t.stride(1)


def _fwd_ws_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, D: int) -> bool:
    """The TMA forward's preconditions: head dim <= 64; an sm_90+ GPU with fp16/bf16 (any dtype under the
    interpreter, which runs the tests); each of q, k, v evenly spaced rows with unit last stride, a 16-byte aligned
    base and 16-byte aligned row stride (views of a fused qkv projection qualify)."""
    if D > _WS_MAX_HEAD_DIM:
        return False
    if not triton_interpreting():
        if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
        if q.dtype not in (torch.float16, torch.bfloat16):
            return False
    return tma_rows_ok(q, k, v)


def _fwd_buffers(q, B, G, L, H, D, set_mask):
    """The forward's outputs, out (N, L, H*D) in q's dtype and lse (B, H, G*L) float32, and the mask's image lists
    and counts (:func:`_mask_lists`; without a mask, dummies the kernels never read)."""
    out = _empty((B * G, L, H * D), device=q.device, dtype=q.dtype)
    lse = _empty((B, H, G * L), device=q.device, dtype=torch.float32)
    lst, cnt = _mask_lists(set_mask, G) if set_mask is not None else (lse, lse)
    return out, lse, lst, cnt


def _set_attn_fwd_ws(q, k, v, B, G, L, H, D, scale, set_mask, config, compile_only=False):
    """The TMA + warp-specialized forward (``_set_attn_fwd_ws_kernel``) on validated inputs; returns (out, lse).
    ``compile_only``: compile the kernel for these arguments without launching it and return None (tools/ws_probe.py
    times the compilation apart from the first run, to tell a slow compile from a kernel that does not finish)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N = B * G
    DP = max(16, _next_pow2(D))
    cfg = dict(config or (_INTERPRETER_CONFIG if triton_interpreting() else _WS_CONFIG))
    out, lse, lst, cnt = _fwd_buffers(q, B, G, L, H, D, set_mask)
    has_mask = set_mask is not None
    dot_f32, prec = _prec(q.dtype)

    def desc(t, rows):
        return TensorDescriptor(t, [N * L, H * D], [_rows_stride(t), 1], [rows, DP])

    grid = (G * cdiv(L, cfg["BLOCK_M"]), B * H)
    args = (desc(q, cfg["BLOCK_M"]), desc(k, cfg["BLOCK_N"]), desc(v, cfg["BLOCK_N"]), out, lse, lst, cnt,
            float(scale) * _LOG2E, H, G, L)
    meta = dict(HEAD_DIM=D, DP=DP, HAS_MASK=has_mask, DOT_F32=dot_f32, PREC=prec, WARP_SPEC=not triton_interpreting(),
                **cfg)
    if compile_only:
        _set_attn_fwd_ws_kernel.warmup(*args, grid=grid, **meta)
        return None
    _set_attn_fwd_ws_kernel[grid](*args, **meta)
    return out, lse


def set_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float,
    set_mask: Optional[torch.Tensor] = None,
    *,
    chunk_head_dim: Optional[bool] = None,
    config: Optional[dict] = None,
    tile_counter: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set-wise flash-attention forward (Triton).

    Args:
        q, k, v: (N, L, H*D), N = B*G, float16/bfloat16/float32, same shape/dtype/device; any row strides, unit stride
            along H*D (chunks of a fused (N, L, 3*H*D) qkv projection work without a copy).
        set_size: G, images per set.
        heads: H.
        scale: softmax scale (e.g. D**-0.5).
        set_mask: optional bool (G, G) on q's device; ``set_mask[i, j]`` = queries of image i attend keys of image j.
            Forbidden key tiles are skipped. Every row must allow an image (rows that allow none give O = 0).
        chunk_head_dim: split D into power-of-two chunks or pad to a power of two; default: pad when D <= 64
            (``_FWD_PAD_UP_TO``), else ``_CHUNK_HEAD_DIM``.
        config: fixed launch config {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} instead of autotuning.
            ``JEDI_TRITON_FWD_WS=1`` (read per call) runs ``_set_attn_fwd_ws_kernel`` instead where it applies
            (``_fwd_ws_ok``: head dim <= 64, sm_90+, evenly spaced 16-byte aligned rows; not with tile_counter),
            with ``config`` or ``_WS_CONFIG``. ``JEDI_TRITON_FWD_GLUON=<n>`` (read per call) runs the Gluon Hopper
            forward with config n of ``set_attention_gluon.CONFIGS`` where it applies (``gluon_fwd_ok``: sm_90,
            fp16/bf16, head dim <= 128, scale > 0, 16-byte aligned evenly spaced rows; not with tile_counter).
        tile_counter: optional int32 tensor of >= G*cdiv(L, BLOCK_M)*B*H elements; receives, per program, the number of
            key tiles it visited (instrumentation for tests; compiled in only when given).

    Eager calls whose inputs have the properties of an earlier call's replay its recorded launches (a launch plan,
    see "Launch plans" above): the same kernels, grid and arguments, without the Python in between.

    Returns:
        out: (N, L, H*D) contiguous, q's dtype.
        lse: (B, H, G*L) float32, natural-log logsumexp of scale·q·kᵀ over the allowed keys.

    Raises:
        TypeError: float64 (or other) dtypes. ValueError: shapes that do not split into (B, G) / (H, D), D > 256.
    """
    gv, ws = gluon_fwd_variant(), _fwd_ws_requested()
    key = None
    dev = None
    if not gv and not ws and tile_counter is None:
        dev = _plan_device(q, k, v, set_size, heads, scale, chunk_head_dim, config)
    if dev is not None:
        # the mask's uint8 view is an input of the plan (the mask-list kernel reads it)
        m8 = None if set_mask is None else set_mask.view(torch.uint8) if set_mask.dtype == torch.bool else set_mask
        key = _fwd_plan_key(q, k, v, m8, set_size, heads, scale, dev)
        res = fast_launch.replay(_FWD_PLANS, key, (q, k, v, m8), dev)
        if res is not None:
            return res
    B, G, L, H, D = _check_launch(q, set_size, heads)
    q_in = q, k, v
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if gv and tile_counter is None and gluon_fwd_ok(q, k, v, D, scale):
        out, lse, lst, cnt = _fwd_buffers(q, B, G, L, H, D, set_mask)
        set_attn_fwd_gluon(q, k, v, B, G, L, H, D, scale, set_mask, out, lse, lst, cnt, gv)
        return out, lse
    if ws and tile_counter is None and scale > 0 and _fwd_ws_ok(q, k, v, D):
        return _set_attn_fwd_ws(q, k, v, B, G, L, H, D, scale, set_mask, config)
    if key is not None:
        def call():
            out, lse, lists = _set_attn_fwd_pointer(q, k, v, B, G, L, H, D, scale, m8, None, None, None)
            return (out, lse), (out, lse, *lists)

        return fast_launch.record_plan(_FWD_PLANS, key, (*q_in, m8), call)
    return _set_attn_fwd_pointer(q, k, v, B, G, L, H, D, scale, set_mask, chunk_head_dim, config, tile_counter)[:2]


def _set_attn_fwd_pointer(q, k, v, B, G, L, H, D, scale, set_mask, chunk_head_dim, config, tile_counter):
    """The pointer-kernel forward (``_set_attn_fwd_kernel``) on validated inputs with unit last strides; returns
    (out, lse, the mask's image lists and counts or ())."""
    if chunk_head_dim is None and D <= _FWD_PAD_UP_TO:
        chunk_head_dim = False
    D0, D1 = head_dim_chunks(D, chunk_head_dim)
    out, lse, lst, cnt = _fwd_buffers(q, B, G, L, H, D, set_mask)
    has_mask = set_mask is not None
    dot_f32, prec = _prec(q.dtype)
    count = tile_counter is not None
    args = (
        q, k, v, out, lse, lst, cnt, tile_counter if count else lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(scale) * _LOG2E,
        H, G, L,
    )
    meta = dict(HEAD_DIM=D, D0=D0, D1=max(D1, 16), HAS_D1=D1 > 0, HAS_MASK=has_mask, COUNT_TILES=count,
                DOT_F32=dot_f32, PREC=prec, SCALE_POS=scale > 0, ROWSUM_DOT=_rowsum_dot(D0 + D1, q.dtype),
                KV_LINEAR=_rows_linear(k, L) and _rows_linear(v, L), ROW_ALIGN=_row_align(q, k, v))

    def grid(c):
        return (G * cdiv(L, c["BLOCK_M"]), B * H)

    _launch("fwd", _dclass(D0, D1, q.dtype), grid, args, meta, config, (B, G, L, H))
    return out, lse, ((lst, cnt) if has_mask else ())


def bwd_delta(out: torch.Tensor, do: torch.Tensor, B: int, G: int, L: int, H: int, D: int) -> torch.Tensor:
    """Delta = rowsum(dO ∘ O) per query row and head, (B, H, G·L) float32 like lse (out, do: (N, L, H·D), unit last
    stride): the term of dS = P ∘ (dP − Delta) every backward kernel reads."""
    delta = _empty((B, H, G * L), device=out.device, dtype=torch.float32)
    pre_bm = 64 if not triton_interpreting() else 32
    launch(
        _set_attn_bwd_preprocess_kernel, (G * cdiv(L, pre_bm), B * H),
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), H, G, L,
        HEAD_DIM=D, D_PAD=max(16, _next_pow2(D)), BLOCK_M=pre_bm, ROW_ALIGN=_row_align(out, do),
    )
    return delta


def set_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float,
    set_mask: Optional[torch.Tensor] = None,
    *,
    chunk_head_dim: Optional[bool] = None,
    config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set-wise flash-attention backward (Triton, FlashAttention-2: P recomputed from ``lse``).

    Args:
        do: (N, L, H*D) gradient of ``out``, q's dtype, any strides.
        q, k, v: the forward's inputs (N, L, H*D).
        out: (N, L, H*D) the forward's output.
        lse: (B, H, G*L) float32, the forward's natural-log logsumexp.
        set_size, heads, scale, set_mask: as in :func:`set_attn_fwd`.
        chunk_head_dim, config: as in :func:`set_attn_fwd` (config applies to both the dK/dV and the dQ kernel).

    Returns:
        dq, dk, dv: (N, L, H*D) contiguous, q's dtype. Key images that no query image may attend get dk = dv = 0.
        With ``JEDI_TRITON_BWD_DQ=atomic`` dq is summed by float32 atomics (see ``_fused_dq``), so it may differ in
        the last bits from run to run; the default dQ kernel (and deterministic mode) does not. So does
        ``JEDI_TRITON_BWD_GLUON=<n>`` (read per call), which runs the Gluon Hopper backward with config n of
        ``set_attention_gluon_bwd.BWD_CONFIGS`` where it applies (``gluon_bwd_ok``: sm_90, fp16/bf16, head dim
        <= the config's MAX_HEAD_DIM, not deterministic, 16-byte aligned evenly spaced rows).

    Raises:
        TypeError / ValueError: as :func:`set_attn_fwd`.
    """
    gv = gluon_bwd_variant()
    dev = None
    if set_mask is None and not gv and not _fused_dq(0, 0) and type(do) is torch.Tensor and type(out) is torch.Tensor:
        dev = _plan_device(q, k, v, set_size, heads, scale, chunk_head_dim, config)
    if dev is not None:
        key = _bwd_plan_key(do, q, k, v, out, lse, set_size, heads, scale, dev)
        inputs = (do, q, k, v, out, lse)
        res = fast_launch.replay(_BWD_PLANS, key, inputs, dev)
        if res is not None:
            return res

        def call():
            (dq, dk, dv), delta = _set_attn_bwd(do, q, k, v, out, lse, set_size, heads, scale, None, None, None, 0)
            return (dq, dk, dv), (delta, dk, dv, dq)

        return fast_launch.record_plan(_BWD_PLANS, key, inputs, call)
    return _set_attn_bwd(do, q, k, v, out, lse, set_size, heads, scale, set_mask, chunk_head_dim, config, gv)[0]


def _set_attn_bwd(do, q, k, v, out, lse, set_size, heads, scale, set_mask, chunk_head_dim, config, gv):
    """:func:`set_attn_bwd` after its launch-plan lookup: ((dq, dk, dv), delta)."""
    B, G, L, H, D = _check_launch(q, set_size, heads)
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    lse = lse.contiguous()
    N = B * G
    D0, D1 = head_dim_chunks(D, chunk_head_dim)
    dclass = _dclass(D0, D1, q.dtype)
    dot_f32, prec = _prec(q.dtype)

    delta = bwd_delta(out, do, B, G, L, H, D)

    dk = _empty((N, L, H * D), device=q.device, dtype=q.dtype)
    dv = _empty((N, L, H * D), device=q.device, dtype=q.dtype)
    has_mask = set_mask is not None
    if has_mask:
        lists, counts = _mask_lists(set_mask, G, both=True)
        rows, cols, rcnt, ccnt = lists[0], lists[1], counts[0], counts[1]
    else:
        rows = rcnt = cols = ccnt = delta  # dummies: never read without a mask
    if gv and gluon_bwd_ok(do, q, k, v, D, gv):
        # one Gluon kernel: dK, dV, and dQ by float32 atomics (set_attention_gluon_bwd)
        dq_acc = torch.zeros((N, L, H * D), device=q.device, dtype=torch.float32)
        set_attn_bwd_gluon(do, q, k, v, lse, delta, B, G, L, H, D, scale, has_mask, cols, ccnt, dk, dv, dq_acc, gv)
        return (dq_acc.to(q.dtype), dk, dv), delta
    fused = _fused_dq(D0, D1)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    meta = dict(HEAD_DIM=D, D0=D0, D1=max(D1, 16), HAS_D1=D1 > 0, HAS_MASK=has_mask, DOT_F32=dot_f32, PREC=prec,
                ROW_ALIGN=_row_align(q, k, v, do))
    scalars = (float(scale) * _LOG2E, float(scale), H, G, L)

    # dQ: scale * dS K summed over every key tile, by atomics from the dK/dV programs or by its own kernel
    dq_acc = torch.zeros((N, L, H * D), device=q.device, dtype=torch.float32) if fused else dk  # dk: unread dummy
    _launch("dkdv_dq" if fused else "dkdv", dclass, lambda c: (G * cdiv(L, c["BLOCK_N"]), B * H),
            (q, k, v, do, lse, delta, dk, dv, dq_acc, cols, ccnt, *strides, *scalars),
            dict(meta, FUSED_DQ=fused, Q_LINEAR=_rows_linear(q, L) and _rows_linear(do, L)), config, (B, G, L, H))
    if fused:
        return (dq_acc.to(q.dtype), dk, dv), delta
    dq = _empty((N, L, H * D), device=q.device, dtype=q.dtype)
    _launch("dq", dclass, lambda c: (G * cdiv(L, c["BLOCK_M"]), B * H),
            (q, k, v, do, lse, delta, dq, rows, rcnt, *strides, *scalars),
            dict(meta, KV_LINEAR=_rows_linear(k, L) and _rows_linear(v, L)), config, (B, G, L, H))
    return (dq, dk, dv), delta


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops (torch.library): jedi::set_attention_fwd / jedi::set_attention_bwd
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("jedi::set_attention_fwd", mutates_args=())
def set_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float,
    set_mask: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, L, H*D), lse (B, H, G*L) fp32) of set-wise attention on backend "triton" or "cuda"."""
    return _fwd_body(q, k, v, set_size, heads, scale, set_mask, backend)


def _fwd_body(q, k, v, set_size, heads, scale, set_mask, backend):
    """What ``jedi::set_attention_fwd`` runs (and the eager path, :class:`_SetAttentionEager`)."""
    if backend == "cuda":
        return torch.ops.jedi.set_attention_fwd_ext(q, k, v, set_size, heads, scale, set_mask)
    if backend != "triton":
        raise ValueError(f"jedi::set_attention_fwd: backend must be 'triton' or 'cuda', got {backend!r}")
    return set_attn_fwd(q, k, v, set_size, heads, scale, set_mask)


@set_attention_fwd.register_fake
def _set_attention_fwd_fake(q, k, v, set_size, heads, scale, set_mask, backend):
    N, L, HD = q.shape
    B = N // set_size
    out = q.new_empty((N, L, HD))
    lse = q.new_empty((B, heads, set_size * L), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("jedi::set_attention_bwd", mutates_args=())
def set_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float,
    set_mask: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (N, L, H*D) in q's dtype, of set-wise attention on backend "triton" or "cuda"."""
    return _bwd_body(grad_out, q, k, v, out, lse, set_size, heads, scale, set_mask, backend)


def _bwd_body(grad_out, q, k, v, out, lse, set_size, heads, scale, set_mask, backend):
    """What ``jedi::set_attention_bwd`` runs (and the eager path's backward)."""
    if backend == "cuda":
        return torch.ops.jedi.set_attention_bwd_ext(grad_out, q, k, v, out, lse, set_size, heads, scale, set_mask)
    if backend != "triton":
        raise ValueError(f"jedi::set_attention_bwd: backend must be 'triton' or 'cuda', got {backend!r}")
    return set_attn_bwd(grad_out, q, k, v, out, lse, set_size, heads, scale, set_mask)


@set_attention_bwd.register_fake
def _set_attention_bwd_fake(grad_out, q, k, v, out, lse, set_size, heads, scale, set_mask, backend):
    shape = q.shape
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape)


def _setup_context(ctx, inputs, output):
    q, k, v, set_size, heads, scale, set_mask, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_mask = set_mask
    ctx.set_size, ctx.heads, ctx.scale, ctx.backend = set_size, heads, scale, backend
    # lse is an auxiliary output for the backward; gradients do not flow through it
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.jedi.set_attention_bwd(
        grad_out, q, k, v, out, lse, ctx.set_size, ctx.heads, ctx.scale, ctx.set_mask, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None


set_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SetAttentionEager(torch.autograd.Function):
    """Eager calls of :func:`set_attention_op` that record autograd: the same kernels and saved tensors as
    ``jedi::set_attention_fwd`` / ``_bwd``, without the custom op's Python dispatch layers (on the CI machine's CPU
    ≈ 26 µs of a forward and ≈ 50 µs of a forward+backward, measured on a no-op stand-in), which is what an eager
    call at small shapes costs. Without autograd the kernels are called directly; under torch.compile, and for
    tensor subclasses (fake or functional tensors of a tracer), the custom op runs (:func:`jedi_kernels.ops.eager_call`)."""

    @staticmethod
    def forward(ctx, q, k, v, set_size, heads, scale, set_mask, backend):
        out, lse = _fwd_body(q, k, v, set_size, heads, scale, set_mask, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_mask, ctx.args = set_mask, (set_size, heads, scale, backend)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        set_size, heads, scale, backend = ctx.args
        dq, dk, dv = _bwd_body(grad_out, q, k, v, out, lse, set_size, heads, scale, ctx.set_mask, backend)
        return dq, dk, dv, None, None, None, None, None


def set_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float,
    set_mask: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """Differentiable set-wise attention through ``jedi::set_attention_fwd`` (inputs already validated by
    :func:`jedi_kernels.set_attention`); eager calls on plain tensors take the same kernels through
    :class:`_SetAttentionEager`, which skips the custom op's dispatch overhead.

    Args:
        q, k, v: (N, L, H*D) with unit last-dim stride; float16/bfloat16/float32 for backend "triton".
        set_size: G. heads: H. scale: softmax scale (float).
        set_mask: bool (G, G) on q's device, or None.
        backend: "triton" or "cuda" (resolved).

    Returns:
        (N, L, H*D) contiguous, q's dtype.

    Raises:
        TypeError: a dtype the Triton kernels do not take (float64). ValueError: head_dim > 256 on backend "triton".
    """
    if backend == "triton":
        _check_launch(q, set_size, heads)  # raise here, before the op, with the argument named
    how = eager_call(q, k, v)
    if how == "direct":
        return _fwd_body(q, k, v, set_size, heads, float(scale), set_mask, backend)[0]
    if how == "function":
        return _SetAttentionEager.apply(q, k, v, set_size, heads, float(scale), set_mask, backend)
    return torch.ops.jedi.set_attention_fwd(q, k, v, set_size, heads, float(scale), set_mask, backend)[0]
