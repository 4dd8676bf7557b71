"""A Hopper backward for the set attention in Gluon: one kernel for dK, dV and dQ (FlashAttention-2/3's fused design),
with dQ summed in float32 by atomics and each query tile's matmuls issued asynchronously so that the exponentials,
the dS arithmetic and the dQ atomics run while the tensor cores work.

Why: the Triton backward (``set_attention._set_attn_bwd_dkdv_kernel`` + ``_set_attn_bwd_dq_kernel``) recomputes S
and dP in its dQ kernel, 7 matmuls per score where the fused design needs 5; at d 40 that alone keeps issue 3's
forward + backward target (×1.2 cuDNN) out of reach (benchmarks/README.md, "What issue 3's forward + backward target
needs"). The fused Triton variant (``JEDI_TRITON_BWD_DQ=atomic``) lost on the H100 because Triton 3.6 waits for each
``tl.dot`` right after issuing it, so the atomics' latency sits between matmuls. Here every product is a
``warpgroup_mma(..., is_async=True)`` with explicit waits.

One program: BLOCK_N keys of image j (set b, head h), K and V resident in shared memory, looping over the query tiles
(BLOCK_M rows) of every image allowed to attend image j. Per query tile t, with keys as rows (transposed, as the
Triton kernel):

    issue Sᵀ = K Q_tᵀ and dPᵀ = V dO_tᵀ                          (tensor cores)
    wait for tile t−1's dV, dK and dQ products; add scale · dQ_{t−1} into the float32 accumulator (atomics, while
        Sᵀ and dPᵀ run)
    wait for Sᵀ;  Pᵀ = 2^(c·Sᵀ − lse₂)                          (while dPᵀ runs)
    issue dV += Pᵀ dO_t                                           (Pᵀ from registers: the accumulator layout is the
                                                                   A operand's, no shared-memory round trip)
    wait for dPᵀ;  dSᵀ = Pᵀ ∘ (dPᵀ − Delta)                       (while dV's product runs)
    dSᵀ → shared memory (double-buffered); CTA barrier; refill tile t−1's Q/dO ring buffer with tile t−1+NUM_STAGES
    issue dK += dSᵀ Q_t (dSᵀ from registers) and dQ_t = dS K (dS = the shared dSᵀ, transposed view)

The dQ product's 2 warpgroups split its head-dim columns (``warps_per_cta=[4, 2]``): each needs all BLOCK_N keys of
dS, hence the barrier. Loads: Q, dO, K, V through 3-D TMA descriptors over the (N·L, H, D) tensor, as the Gluon
forward's (``chunk_descriptors``); the head dim is split into power-of-two column chunks (40 → 32 + 16, 80 → 64 + 16),
each chunk its own descriptor and shared tile, so no chunk slices a wider box inside a swizzle atom. (The dQ product's
second warpgroup does start its half of K's columns inside one: Triton's own lowering of an 8-warp m64 MMA, the same
as a plain ``tl.dot`` of that shape.) The chunks' columns past the head dim (40..47 at d 40) are outside the
descriptors' tensors, so TMA fills them with zeros in every tile; dK/dV/dQ's padding columns are never stored.

Rows past an image's end (a tile tail when L is not a multiple of the tile) are the next image's rows in shared
memory, excluded arithmetically (lse = +inf makes their Pᵀ column 0; dSᵀ is masked for keys past the end). So, unlike
the pointer kernels, which load such rows as zeros, an Inf or NaN in a neighbouring image's q/do rows can reach this
image's gradients through 0 · Inf; the Gluon forward has the same property. Finite inputs are unaffected. (Another
head's columns are never read: the descriptors' bounds end at the head dim.)

Opt-in (``JEDI_TRITON_BWD_GLUON=1|2``, the config), sm_90 only, fp16/bf16, head dims <= ``MAX_HEAD_DIM``, not in
deterministic mode (the float32 atomics' order varies). Gluon has no interpreter: the CPU tests compile it for sm_90
and check registers, shared memory and the main loop's schedule, and run its code on a CPU emulator of the Gluon
builtins it uses (tests/kernels/gluon_emu.py: the math, indexing and mbarrier protocol, with the products and TMA
copies at their worst-case timing; tests/kernels/test_set_attention_gluon_bwd.py); the GPU tests check dq, dk, dv by
the flash rule. Never run on a GPU as of its writing (2026-11-27).
"""
from __future__ import annotations


import torch

from jedi_kernels.ops import cdiv, tma_rows_ok
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.ops.set_attention_gluon import (HAVE_GLUON, chunk_desc_types, chunk_descriptors, compile_source,
                                                  config_list, variant_switch)

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from jedi_kernels.ops.set_attention_gluon import _flat, _issue_pair

__all__ = ["BWD_CONFIGS", "MAX_HEAD_DIM", "gluon_bwd_variant", "gluon_bwd_ok", "bwd_chunks", "checked_bwd_configs",
           "set_attn_bwd_gluon", "compile_bwd_for"]

# JEDI_TRITON_BWD_GLUON=<n> runs config n: BLOCK_N keys per program (16 rows per warp: one m64 warpgroup MMA tile per
# 4 warps), BLOCK_M queries per tile, NUM_STAGES Q/dO ring buffers (>= 2: a buffer is refilled one tile after its
# use, so at 4 stages a load has about 2.5 tiles' time to land; 4 rather than 3 also makes the slot index a mask:
# 661 instead of 688 SASS instructions per warp and tile at d 40).
# MAX_HEAD_DIM: the widest head that compiles without register spills (dK and dV accumulate BLOCK_N x (D0 + D1)
# float32 values in registers; config 2's dQ product, on one warpgroup, holds twice config 1's share of dQ).
BWD_CONFIGS = {
    1: {"BLOCK_N": 128, "BLOCK_M": 64, "num_warps": 8, "NUM_STAGES": 4, "MAX_HEAD_DIM": 80},
    2: {"BLOCK_N": 64, "BLOCK_M": 64, "num_warps": 4, "NUM_STAGES": 4, "MAX_HEAD_DIM": 64},
}
MAX_HEAD_DIM = max(c["MAX_HEAD_DIM"] for c in BWD_CONFIGS.values())
_LOG2E = 1.4426950408889634


def bwd_chunks(head_dim: int) -> tuple[int, int]:
    """(D0, D1): power-of-two column chunks (each >= 16) covering the head dim, D1 = 0 when one chunk does:
    D0 the largest power of two <= the head dim, D1 the next power of two >= the rest (40 -> (32, 16),
    80 -> (64, 16), 72 -> (64, 16), 24 -> (32, 0), 64 -> (64, 0), 8 -> (16, 0))."""
    if head_dim <= 16:
        return 16, 0
    d0 = 1 << (head_dim.bit_length() - 1)
    if d0 == head_dim:
        return d0, 0
    d1 = max(16, 1 << (head_dim - d0 - 1).bit_length())
    if d1 >= d0:  # e.g. 24 -> 16 + 8 would be 16 + 16 = 32: one chunk of 32 is the same width
        return 2 * d0, 0
    return d0, d1


def gluon_bwd_variant() -> int:
    """``JEDI_TRITON_BWD_GLUON`` (read per call): 0 (unset) = off, else the config number of :data:`BWD_CONFIGS`."""
    return variant_switch("JEDI_TRITON_BWD_GLUON", BWD_CONFIGS)


def checked_bwd_configs() -> list[int]:
    """The configs the GPU tests and benchmark rows exercise: ``JEDI_GLUON_BWD_CONFIGS`` (comma-separated; "0": none),
    which ``benchmarks/gpu_check.sh`` sets from what ``tools/ws_probe.py --kernel gluon-bwd`` found agreeing with the
    split pointer kernels when not all did; unset: all of :data:`BWD_CONFIGS`. The switch itself
    (``JEDI_TRITON_BWD_GLUON``) still takes any config."""
    return config_list("JEDI_GLUON_BWD_CONFIGS", BWD_CONFIGS, allow_none=True)


def gluon_bwd_ok(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                 variant: int) -> bool:
    """Whether :func:`set_attn_bwd_gluon` can run these inputs with config ``variant``: Gluon present, an sm_90 CUDA
    device, fp16/bf16, head dim <= the config's ``MAX_HEAD_DIM`` and a multiple of 8 (the descriptors' head stride
    must be a multiple of 16 bytes), not in deterministic mode, and do, q, k, v each evenly spaced rows with unit last
    stride, a 16-byte aligned base and row stride (what a TMA descriptor needs)."""
    if not HAVE_GLUON or head_dim > BWD_CONFIGS[variant]["MAX_HEAD_DIM"] or head_dim % 8:
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return tma_rows_ok(do, q, k, v)


if HAVE_GLUON:

    @gluon.jit
    def _query_tile_of(it, n_mt, ImgList, j, b, pid_bh, G, L, BLOCK_M: gl.constexpr, HAS_MASK: gl.constexpr):
        """Query tile ``it`` of the program's loop: its first row in the (N·L) rows of q/dO, its first row in the
        (B·H·G·L) rows of lse/Delta, and its tile index within its image."""
        ii = it // n_mt
        if HAS_MASK:
            i = gl.load(ImgList + j * G + ii)
        else:
            i = ii
        mt = it - ii * n_mt
        return (b * G + i) * L + mt * BLOCK_M, (pid_bh * G + i).to(gl.int64) * L + mt * BLOCK_M, mt

    @gluon.jit
    def _issue_qdo(DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, bars, it, n_mt, ImgList, j, b,
                   pid_bh, G, L, head, D0: gl.constexpr, D1: gl.constexpr, BLOCK_M: gl.constexpr,
                   NUM_STAGES: gl.constexpr, HAS_MASK: gl.constexpr):
        """Start the TMA loads of query tile ``it`` (its Q and dO rows, per column chunk) into ring buffer
        it % NUM_STAGES."""
        row, _, _ = _query_tile_of(it, n_mt, ImgList, j, b, pid_bh, G, L, BLOCK_M, HAS_MASK)
        st = it % NUM_STAGES
        _issue_pair(DescQ0, DescQ1, DescDO0, DescDO1, q0_s.index(st), q1_s.index(st), do0_s.index(st),
                    do1_s.index(st), bars.index(st), row, head, D0, D1)

    @gluon.jit
    def _load_rows(Lse, Delta, lse_row, mt, L, BLOCK_M: gl.constexpr, EVEN_M: gl.constexpr, layout: gl.constexpr):
        """lse·log2e and Delta of a query tile's rows, along the columns of the transposed scores (``layout``: a
        SliceLayout(0, ·)). Rows past the image's end get lse = +inf (their Pᵀ column is exactly 0) and Delta = 0."""
        offs = gl.arange(0, BLOCK_M, layout=layout)
        if EVEN_M:
            lse2 = gl.load(Lse + lse_row + offs) * 1.4426950408889634
            delta = gl.load(Delta + lse_row + offs)
        else:
            ok = mt * BLOCK_M + offs < L
            lse2 = gl.load(Lse + lse_row + offs, mask=ok, other=float("inf")) * 1.4426950408889634
            delta = gl.load(Delta + lse_row + offs, mask=ok, other=0.0)
        return lse2, delta

    @gluon.jit
    def _issue_t(a0, a1, b0, b1, zero, D1: gl.constexpr):
        """Issue X Yᵀ over the column chunks (A = a0/a1 (rows, chunk), B = b0/b1 (cols, chunk) transposed), the
        second chunk accumulating into the first; returns the in-flight accumulator."""
        acc = warpgroup_mma(_flat(a0), _flat(b0).permute((1, 0)), zero, use_acc=False, is_async=True)
        if D1 > 0:
            acc = warpgroup_mma(_flat(a1), _flat(b1).permute((1, 0)), acc, is_async=True)
        return acc

    @gluon.jit
    def _issue_dk_dq(ds_op, ds_buf, q0_s, q1_s, k0_s, k1_s, st, dk0, dk1, dq0_zero, dq1_zero, a1_layout: gl.constexpr,
                     D1: gl.constexpr):
        """Issue a query tile's dK += dSᵀ Q (dSᵀ from registers, per chunk) and dQ = dS K (dS: the transposed view of
        dSᵀ in shared memory, per chunk; K from shared memory); returns the in-flight (dk0, dk1, dq0, dq1) and the
        second chunk's copy of dSᵀ (ds_op when D1 = 0), which must stay live until the wait (dk1, dq1 unchanged when
        D1 = 0)."""
        dk0 = warpgroup_mma(ds_op, _flat(q0_s.index(st)), dk0, is_async=True)
        ds_op1 = ds_op
        if D1 > 0:
            ds_op1 = gl.convert_layout(ds_op, a1_layout)
            dk1 = warpgroup_mma(ds_op1, _flat(q1_s.index(st)), dk1, is_async=True)
        dq0 = warpgroup_mma(ds_buf.permute((1, 0)), _flat(k0_s), dq0_zero, use_acc=False, is_async=True)
        if D1 > 0:
            dq1 = warpgroup_mma(ds_buf.permute((1, 0)), _flat(k1_s), dq1_zero, use_acc=False, is_async=True)
        else:
            dq1 = dq1_zero
        return dk0, dk1, dq0, dq1, ds_op1

    @gluon.jit
    def _wait_dk_dq(n: gl.constexpr, dk0, dk1, dq0, dq1, ds_op, ds_op1, D1: gl.constexpr):
        """Wait until at most ``n`` MMA groups are in flight, the dK and dQ products issued by :func:`_issue_dk_dq`
        among the finished (their dSᵀ registers stay live to here); returns (dk0, dk1, dq0, dq1, ds_op)."""
        if D1 > 0:
            dk0, dk1, dq0, dq1, ds_op, ds_op1 = warpgroup_mma_wait(n, deps=(dk0, dk1, dq0, dq1, ds_op, ds_op1))
        else:
            dk0, dq0, ds_op = warpgroup_mma_wait(n, deps=(dk0, dq0, ds_op))
        return dk0, dk1, dq0, dq1, ds_op

    @gluon.jit
    def _tile_tail(s_tok, dp_tok, lse2, delta, dv0, dv1, it, n_it, nt, n_mt, ImgList, j, b, pid_bh, G, L, head,
                   qk_scale_log2, DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, ds_s, qdo_bar,
                   dtype: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_MASK: gl.constexpr, EVEN_N: gl.constexpr,
                   a0_layout: gl.constexpr, a1_layout: gl.constexpr, st_layout: gl.constexpr):
        """Query tile ``it`` once its Sᵀ and dPᵀ products are issued: wait for Sᵀ, Pᵀ (while dPᵀ runs), issue
        dV += Pᵀ dO, wait for dPᵀ, dSᵀ (while dV's product runs) into shared-memory slot it % 2, CTA barrier, refill
        tile t−1's Q/dO buffer with tile t−1+NUM_STAGES, wait for dV. Returns (dv0, dv1, dSᵀ as the dK product's A
        operand)."""
        NCH: gl.constexpr = 2 if D1 > 0 else 1
        st = it % NUM_STAGES
        s = warpgroup_mma_wait(NCH, deps=(s_tok, ))
        pt = gl.exp2(s * qk_scale_log2 - gl.expand_dims(lse2, 0))
        pt_op = gl.convert_layout(pt.to(dtype), a0_layout)
        dv0_tok = warpgroup_mma(pt_op, _flat(do0_s.index(st)), dv0, is_async=True)
        if D1 > 0:
            pt_op1 = gl.convert_layout(pt_op, a1_layout)
            dv1_tok = warpgroup_mma(pt_op1, _flat(do1_s.index(st)), dv1, is_async=True)
        dpt = warpgroup_mma_wait(NCH, deps=(dp_tok, ))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        if not EVEN_N:  # keys past the image's end (the next image's rows) must not reach dQ
            keys = nt * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
            dst = gl.where(gl.expand_dims(keys < L, 1), dst, 0.0)
        ds_lo = dst.to(dtype)
        ds_s.index(it % 2).store(ds_lo)
        fence_async_shared()
        # every warpgroup's dS rows are in shared memory, and every warpgroup has waited for tile t-1's products
        # (its dK product read Q_{t-1}, its dV product dO_{t-1}): tile t-1's Q/dO buffer is free
        gl.thread_barrier()
        if it >= 1:
            if it - 1 + NUM_STAGES < n_it:
                _issue_qdo(DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, qdo_bar, it - 1 + NUM_STAGES,
                           n_mt, ImgList, j, b, pid_bh, G, L, head, D0, D1, BLOCK_M, NUM_STAGES, HAS_MASK)
        ds_op = gl.convert_layout(ds_lo, a0_layout)
        if D1 > 0:
            dv0, dv1, pt_op, pt_op1 = warpgroup_mma_wait(0, deps=(dv0_tok, dv1_tok, pt_op, pt_op1))
        else:
            dv0, pt_op = warpgroup_mma_wait(0, deps=(dv0_tok, pt_op))
        return dv0, dv1, ds_op

    @gluon.jit
    def _add_dq(DQacc, dq, row, mt, L, H, col0, scale, C0: gl.constexpr, W: gl.constexpr, HEAD_DIM: gl.constexpr,
                BLOCK_M: gl.constexpr, layout: gl.constexpr):
        """DQacc[rows, C0:C0+W] += scale · dq for the tile's rows < L and columns < HEAD_DIM (float32 atomics)."""
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = C0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
        ptrs = DQacc + gl.expand_dims((row + rows).to(gl.int64) * (H * HEAD_DIM) + col0, 1) + gl.expand_dims(cols, 0)
        ok = gl.expand_dims(mt * BLOCK_M + rows < L, 1) & gl.expand_dims(cols < HEAD_DIM, 0)
        gl.atomic_add(ptrs, dq * scale, mask=ok, sem="relaxed")

    @gluon.jit
    def _store_rows(Out, acc, row0, nt, L, H, col0, factor, C0: gl.constexpr, W: gl.constexpr,
                    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, layout: gl.constexpr):
        """Out[keys, C0:C0+W] = factor · acc for the tile's key rows < L and columns < HEAD_DIM."""
        rows = nt * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        cols = C0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
        ptrs = Out + gl.expand_dims((row0 + rows) * (H * HEAD_DIM) + col0, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, (acc * factor).to(Out.dtype.element_ty),
                 mask=gl.expand_dims(rows < L, 1) & gl.expand_dims(cols < HEAD_DIM, 0))

    @gluon.jit
    def _set_attn_bwd_gluon_kernel(
        DescQ0, DescQ1, DescDO0, DescDO1, DescK0, DescK1, DescV0, DescV1,
        Lse, Delta, DK, DV, DQacc, ImgList, ImgCount,
        qk_scale_log2, scale,
        H, G, L,
        HEAD_DIM: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr, HAS_MASK: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, EVEN_M: gl.constexpr,
        EVEN_N: gl.constexpr, num_warps: gl.constexpr,
    ):
        """dK, dV of one (key tile of image j, set b, head h) (grid (G·⌈L/BLOCK_N⌉, B·H)), and that tile's share of
        every query row's dQ, added into the float32 (N, L, H·D) DQacc. ImgList[j, :ImgCount[j]] lists the query
        images allowed to attend image j (the transposed mask); Lse and Delta are (B, H, G·L) float32 (natural-log
        logsumexp, rowsum(dO ∘ O)). DK, DV: (N, L, H·D) contiguous; key images no query attends get 0."""
        gl.static_assert(D0 + D1 >= HEAD_DIM, "the chunks cover the head")
        gl.static_assert(NUM_STAGES >= 2, "a ring buffer is refilled one tile after its last use")
        gl.static_assert(BLOCK_N == 16 * num_warps, "one m64 warpgroup MMA tile of keys per 4 warps")
        dtype: gl.constexpr = DescQ0.dtype
        NCH: gl.constexpr = 2 if D1 > 0 else 1  # MMA groups committed per product (one per chunk)
        D1E: gl.constexpr = D1 if D1 > 0 else 16  # (the unused second chunk's register shapes when D1 = 0)
        # transposed scores (BLOCK_N keys x BLOCK_M queries) and dK/dV: keys along the rows, 16 per warp
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        kv0_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, D0, 16])
        kv1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, D1E, 16])
        a0_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv0_layout, k_width=2)
        a1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv1_layout, k_width=2)
        # dQ (BLOCK_M queries x chunk): the warpgroups split the chunk's columns (every one needs all keys of dS)
        WG: gl.constexpr = num_warps // 4
        dq0_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                             instr_shape=[16, D0 // WG, 16])
        dq1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                             instr_shape=[16, D1E // WG, 16])
        col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)

        pid_n = gl.program_id(0)
        pid_bh = gl.program_id(1)
        n_nt = gl.cdiv(L, BLOCK_N)
        n_mt = gl.cdiv(L, BLOCK_M)
        j = pid_n // n_nt
        nt = pid_n % n_nt
        b = pid_bh // H
        head = pid_bh % H
        col0 = head * HEAD_DIM
        if HAS_MASK:
            n_it = gl.load(ImgCount + j) * n_mt
        else:
            n_it = G * n_mt
        krow0 = (b * G + j) * L  # the key image's first row

        # tiles shaped as the TMA boxes, (rows, 1, chunk); the MMAs read them through _flat
        k0_s = gl.allocate_shared_memory(dtype, [BLOCK_N, 1, D0], DescK0.layout)
        v0_s = gl.allocate_shared_memory(dtype, [BLOCK_N, 1, D0], DescV0.layout)
        q0_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, 1, D0], DescQ0.layout)
        do0_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, 1, D0], DescDO0.layout)
        if D1 > 0:
            k1_s = gl.allocate_shared_memory(dtype, [BLOCK_N, 1, D1], DescK1.layout)
            v1_s = gl.allocate_shared_memory(dtype, [BLOCK_N, 1, D1], DescV1.layout)
            q1_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, 1, D1], DescQ1.layout)
            do1_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, 1, D1], DescDO1.layout)
        else:  # never read: the D1 > 0 branches are compiled out
            k1_s = k0_s
            v1_s = v0_s
            q1_s = q0_s
            do1_s = do0_s
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        ds_s = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        qdo_bar = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.init(qdo_bar.index(s0), count=1)
        fence_async_shared()

        _issue_pair(DescK0, DescK1, DescV0, DescV1, k0_s, k1_s, v0_s, v1_s, kv_bar, krow0 + nt * BLOCK_N, head, D0,
                    D1)
        for s0 in gl.static_range(NUM_STAGES):
            if s0 < n_it:
                _issue_qdo(DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, qdo_bar, s0, n_mt, ImgList,
                           j, b, pid_bh, G, L, head, D0, D1, BLOCK_M, NUM_STAGES, HAS_MASK)
        mbarrier.wait(kv_bar, 0)  # (a chunk's columns past the head came in as zeros: TMA's out-of-bounds fill)

        st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        dq0_zero = gl.zeros([BLOCK_M, D0], gl.float32, dq0_layout)
        dq1_zero = gl.zeros([BLOCK_M, D1E], gl.float32, dq1_layout)
        dv0 = gl.zeros([BLOCK_N, D0], gl.float32, kv0_layout)
        dk0 = gl.zeros([BLOCK_N, D0], gl.float32, kv0_layout)
        dv1 = gl.zeros([BLOCK_N, D1E], gl.float32, kv1_layout)
        dk1 = gl.zeros([BLOCK_N, D1E], gl.float32, kv1_layout)
        # dSᵀ of the previous tile as the A operand of its dK product (issued at the top of the next iteration)
        ds_op = gl.zeros([BLOCK_N, BLOCK_M], dtype, a0_layout)
        row = 0
        mt = 0

        # Tile t's dK and dQ products are issued at the top of iteration t + 1, just before its Sᵀ and dPᵀ, and every
        # product is waited for within the iteration that issues it: an accumulator still in flight across the
        # loop's back edge makes ptxas serialize every wgmma of the kernel (warning C7514: the loop's register copies
        # read it). The tensor cores see the same order as with the products issued at the end of iteration t.
        # Tile 0 (which has no previous tile) is peeled off the loop.
        if n_it > 0:
            row, lse_row, mt = _query_tile_of(0, n_mt, ImgList, j, b, pid_bh, G, L, BLOCK_M, HAS_MASK)
            mbarrier.wait(qdo_bar.index(0), 0)
            s_tok = _issue_t(k0_s, k1_s, q0_s.index(0), q1_s.index(0), st_zero, D1)
            dp_tok = _issue_t(v0_s, v1_s, do0_s.index(0), do1_s.index(0), st_zero, D1)
            lse2, delta = _load_rows(Lse, Delta, lse_row, mt, L, BLOCK_M, EVEN_M, col_layout)
            dv0, dv1, ds_op = _tile_tail(
                s_tok, dp_tok, lse2, delta, dv0, dv1, 0, n_it, nt, n_mt, ImgList, j, b, pid_bh, G, L, head,
                qk_scale_log2, DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, ds_s, qdo_bar, dtype,
                D0, D1, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_MASK, EVEN_N, a0_layout, a1_layout, st_layout)
        for it in range(1, n_it):
            st = it % NUM_STAGES
            prev_row = row
            prev_mt = mt
            row, lse_row, mt = _query_tile_of(it, n_mt, ImgList, j, b, pid_bh, G, L, BLOCK_M, HAS_MASK)
            mbarrier.wait(qdo_bar.index(st), (it // NUM_STAGES) & 1)
            dk0t, dk1t, dq0t, dq1t, ds_op1 = _issue_dk_dq(
                ds_op, ds_s.index((it - 1) % 2), q0_s, q1_s, k0_s, k1_s, (it - 1) % NUM_STAGES, dk0, dk1, dq0_zero,
                dq1_zero, a1_layout, D1)
            s_tok = _issue_t(k0_s, k1_s, q0_s.index(st), q1_s.index(st), st_zero, D1)
            dp_tok = _issue_t(v0_s, v1_s, do0_s.index(st), do1_s.index(st), st_zero, D1)
            # this tile's lse and Delta (their latency hides behind the products queued before Sᵀ); tile t-1's dK and
            # dQ (all but this tile's Sᵀ and dPᵀ), then its dQ into the accumulator while Sᵀ and dPᵀ run
            lse2, delta = _load_rows(Lse, Delta, lse_row, mt, L, BLOCK_M, EVEN_M, col_layout)
            dk0, dk1, dq0, dq1, ds_op = _wait_dk_dq(2 * NCH, dk0t, dk1t, dq0t, dq1t, ds_op, ds_op1, D1)
            _add_dq(DQacc, dq0, prev_row, prev_mt, L, H, col0, scale, 0, D0, HEAD_DIM, BLOCK_M, dq0_layout)
            if D1 > 0:
                _add_dq(DQacc, dq1, prev_row, prev_mt, L, H, col0, scale, D0, D1, HEAD_DIM, BLOCK_M, dq1_layout)
            dv0, dv1, ds_op = _tile_tail(
                s_tok, dp_tok, lse2, delta, dv0, dv1, it, n_it, nt, n_mt, ImgList, j, b, pid_bh, G, L, head,
                qk_scale_log2, DescQ0, DescQ1, DescDO0, DescDO1, q0_s, q1_s, do0_s, do1_s, ds_s, qdo_bar, dtype,
                D0, D1, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_MASK, EVEN_N, a0_layout, a1_layout, st_layout)

        if n_it > 0:  # the last tile's dK and dQ
            last = n_it - 1
            dk0t, dk1t, dq0t, dq1t, ds_op1 = _issue_dk_dq(
                ds_op, ds_s.index(last % 2), q0_s, q1_s, k0_s, k1_s, last % NUM_STAGES, dk0, dk1, dq0_zero, dq1_zero,
                a1_layout, D1)
            dk0, dk1, dq0, dq1, ds_op = _wait_dk_dq(0, dk0t, dk1t, dq0t, dq1t, ds_op, ds_op1, D1)
            _add_dq(DQacc, dq0, row, mt, L, H, col0, scale, 0, D0, HEAD_DIM, BLOCK_M, dq0_layout)
            if D1 > 0:
                _add_dq(DQacc, dq1, row, mt, L, H, col0, scale, D0, D1, HEAD_DIM, BLOCK_M, dq1_layout)

        mbarrier.invalidate(kv_bar)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(qdo_bar.index(s0))

        krow64 = krow0.to(gl.int64)
        _store_rows(DV, dv0, krow64, nt, L, H, col0, 1.0, 0, D0, HEAD_DIM, BLOCK_N, kv0_layout)
        _store_rows(DK, dk0, krow64, nt, L, H, col0, scale, 0, D0, HEAD_DIM, BLOCK_N, kv0_layout)
        if D1 > 0:
            _store_rows(DV, dv1, krow64, nt, L, H, col0, 1.0, D0, D1, HEAD_DIM, BLOCK_N, kv1_layout)
            _store_rows(DK, dk1, krow64, nt, L, H, col0, scale, D0, D1, HEAD_DIM, BLOCK_N, kv1_layout)


def _meta(cfg: dict, head_dim: int, has_mask: bool, L: int) -> dict:
    d0, d1 = bwd_chunks(head_dim)
    return dict(HEAD_DIM=head_dim, D0=d0, D1=d1, HAS_MASK=has_mask, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                NUM_STAGES=cfg["NUM_STAGES"], EVEN_M=L % cfg["BLOCK_M"] == 0, EVEN_N=L % cfg["BLOCK_N"] == 0,
                num_warps=cfg["num_warps"])


def set_attn_bwd_gluon(do, q, k, v, lse, delta, B: int, G: int, L: int, H: int, D: int, scale: float, has_mask: bool,
                       img_list, img_count, dk, dv, dq_acc, variant: int, compile_only: bool = False):
    """Run the Gluon backward on validated inputs (:func:`gluon_bwd_ok`): dk, dv (N, L, H·D) written, dq_acc (N, L,
    H·D) float32 (zeroed by the caller) accumulated; lse, delta (B, H, G·L) float32; ``img_list``/``img_count``: the
    transposed mask's image lists (``set_attention._mask_lists(..., both=True)``, second entries) or dummies.
    ``compile_only``: compile for these arguments without launching."""
    cfg = BWD_CONFIGS[variant]
    d0, d1 = bwd_chunks(D)
    N = B * G

    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    descs = tuple(d for t, rows in ((q, bm), (do, bm), (k, bn), (v, bn))
                  for d in chunk_descriptors(t, rows, N, L, H, D, d0, d1))
    grid = (G * cdiv(L, bn), B * H)
    args = (*descs, lse, delta, dk, dv, dq_acc, img_list, img_count, float(scale) * _LOG2E, float(scale), H, G, L)
    meta = _meta(cfg, D, has_mask, L)
    if compile_only:
        _set_attn_bwd_gluon_kernel.warmup(*args, grid=grid, **meta)
        return
    launch(_set_attn_bwd_gluon_kernel, grid, *args, **meta)


def compile_bwd_for(arch: int = 90, head_dim: int = 40, dtype: torch.dtype = torch.bfloat16, variant: int = 1,
                    has_mask: bool = False, even: bool = True):
    """Compile the Gluon backward for ``cuda:<arch>`` without a GPU (``triton.compile`` on a GluonASTSource with the
    signature of a launch on SD-sized inputs; ``even=False``: L a multiple of neither tile) and return the
    CompiledKernel (``.asm["ptx"]``, ``["cubin"]``, ``.metadata``), for the CPU tests."""
    cfg = BWD_CONFIGS[variant]
    d0, d1 = bwd_chunks(head_dim)
    ty = "fp16" if dtype == torch.float16 else "bf16"
    m0, m1 = chunk_desc_types(cfg["BLOCK_M"], d0, d1, dtype)
    n0, n1 = chunk_desc_types(cfg["BLOCK_N"], d0, d1, dtype)
    signature = {"DescQ0": m0, "DescQ1": m1, "DescDO0": m0, "DescDO1": m1, "DescK0": n0, "DescK1": n1, "DescV0": n0,
                 "DescV1": n1,
                 "Lse": "*fp32", "Delta": "*fp32", "DK": "*" + ty, "DV": "*" + ty, "DQacc": "*fp32",
                 "ImgList": "*i32", "ImgCount": "*i32", "qk_scale_log2": "fp32", "scale": "fp32",
                 "H": "i32", "G": "i32", "L": "i32"}
    constexprs = _meta(cfg, head_dim, has_mask, 4096 if even else 4097)
    return compile_source(_set_attn_bwd_gluon_kernel, signature, constexprs,
                          ("Lse", "Delta", "DK", "DV", "DQacc", "ImgList", "ImgCount"), arch)
