"""A Hopper forward for the set attention in Gluon (Triton's explicit-layout dialect): warpgroup MMAs with the softmax
of one key tile running while the P·V product of the previous one is still on the tensor cores.

Why a second Triton forward: the ``tl.dot`` kernel (``set_attention._set_attn_fwd_kernel``) cannot overlap the two.
Triton 3.6 lowers each ``tl.dot`` to wgmma and waits for it right after issuing it, so the exp unit and the tensor
cores take turns (H100, d 40, L 4096, ng 2, bf16: 0.662 ms against cuDNN's 0.603; issue 3 asks for 0.45).
Gluon exposes the instructions themselves. Each warpgroup here issues S_t = Q K_tᵀ and O += P_{t-1} V_{t-1}
back to back (``warpgroup_mma(..., is_async=True)``) and waits for S_t alone (``warpgroup_mma_wait(1)``). It then
runs S_t's softmax while the P·V product finishes: FlashAttention-3's intra-warpgroup pipelining, the same schedule
as the CUDA extension's Hopper forward (csrc/cuda/set_attention_wgmma.cuh). Unlike that kernel, the shared-memory
layouts, matrix descriptors and register fragments come from the compiler (``NVMMASharedLayout``,
``NVMMADistributedLayout``), so the two do not share a layout mistake.

Loads: q, k and v through 3-D TMA descriptors over the (N·L, H, D) tensor (rows, heads, head columns). Gluon block
shapes are powers of two, so the head dim is split into power-of-two column chunks (40 -> 32 + 16, 80 -> 64 + 16; one
chunk where two would not be narrower than the head dim rounded up, DP: 24 -> 32, 64 -> 64), each chunk its own
descriptor (boxes of (rows, 1, chunk) at head h, column 0 resp. D0) and shared tile, and each product two MMAs, one
per chunk: a quarter less tensor work at d 40 than all 64 columns (config 4 runs the padded 64 for comparison). The
last chunk's columns past the head dim are outside the descriptor's tensor, so TMA fills them with zeros: no padding
to zero, and no column of another head is read. (Until the eighteenth session the chunks were slices of one DP-wide
box over the (N·L, H·D) rows, the second starting inside a swizzle atom, and the next head's columns were zeroed
in Q; per-chunk tiles, as in the backward, start every MMA operand at an atom's origin.) The MMAs read each
(rows, 1, chunk) tile as the (rows, chunk) operand it is (:func:`_flat`, a reshape: the same bytes and swizzle).
K/V tiles go through a ring of NUM_STAGES (>= 3; 4 in every config) buffers, each with an mbarrier the TMA
engine completes. At the end of iteration t the buffer of tile t−1 is refilled with tile t−1+NUM_STAGES: every
warpgroup has waited for its P·V product on it, which a CTA barrier makes sure of before the copy is issued. The copy
then has NUM_STAGES − 2 whole iterations to land (at 4 stages: tile t+3, needed after iteration t+2).

Config 5 is config 1 warp-specialized (``_set_attn_fwd_gluon_ws_kernel``, FlashAttention-3's structure without its
ping-pong): a producer warpgroup issues every TMA load, each as soon as both consumer warpgroups have released the
ring buffer (an ``empty`` mbarrier per buffer, one arrive per consumer after its P·V wait), and the two consumer
warpgroups run the schedule above on 64 query rows each with only warpgroup-local barriers, so neither waits for the
other; the consumers get 232 registers each, the producer 40. Config 6 adds the ping-pong: the consumers take turns
issuing their products (a pair of mbarriers), so one's softmax overlaps the other's products on the tensor cores.

Opt-in (``JEDI_TRITON_FWD_GLUON=1|2|3|4|5|6``, the config), sm_90 only (wgmma does not exist on sm_100), fp16/bf16, head
dims <= 128, scale > 0. It needs a GPU: Gluon has no interpreter mode. The CPU tests compile it for sm_90 and check
what the SASS must contain, and run its code on a CPU emulator of the Gluon builtins it uses
(tests/kernels/gluon_emu.py: the math, indexing and mbarrier protocol, with the products and TMA copies at their
worst-case timing; tests/kernels/test_set_attention_gluon.py). The GPU tests check its outputs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from jedi_kernels.backends import env_get
from jedi_kernels.ops import cdiv, tma_rows_ok
from jedi_kernels.ops import rows_stride as _rows_stride
from jedi_kernels.ops.fast_launch import launch

try:  # Gluon ships with Triton >= 3.4 (experimental); without it this forward is unavailable, nothing else changes
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "CONFIGS", "gluon_fwd_variant", "gluon_fwd_ok", "set_attn_fwd_gluon", "checked_configs"]

# JEDI_TRITON_FWD_GLUON=<n> runs config n: BLOCK_M = 64 rows per warpgroup x (num_warps / 4) warpgroups (configs 5, 6:
# 2 consumer warpgroups besides the kernel's num_warps = 4 of the producer); NUM_STAGES >= 3 (tiles t and t+1 stay
# resident while tile t-1's buffer is refilled at the end of iteration t).
# SPLIT: two power-of-two column chunks (:func:`_chunks`; 40 -> 32 + 16) instead of all DP columns (40 -> 64);
# config 4 is config 1 padded, to measure what the split buys.
# Four stages everywhere since the per-chunk tiles (eighteenth session): at d 40 they fit in less shared memory than
# three stages of the old 64-column boxes, give the refill two iterations of lead instead of one, and the ring index
# is a power-of-two modulo (9-11 fewer loop instructions a tile than with 3 stages).
CONFIGS = {
    1: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "NUM_STAGES": 4, "SPLIT": True},
    2: {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "NUM_STAGES": 4, "SPLIT": True},
    3: {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "NUM_STAGES": 4, "SPLIT": True},
    4: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "NUM_STAGES": 4, "SPLIT": False},
    # warp-specialized (:func:`_set_attn_fwd_gluon_ws_kernel`): a producer warpgroup issues the TMA loads, two consumer
    # warpgroups (64 query rows each) release ring buffers through mbarriers instead of CTA barriers
    5: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "NUM_STAGES": 4, "SPLIT": True, "WS": True},
    # config 5 with FlashAttention-3's ping-pong: the two consumer warpgroups take turns issuing their products (an
    # mbarrier pair), so one's softmax runs while the other's products occupy the tensor cores. On the H200
    # (2026-11-28) config 5 issued from 43 % of its slots with the tensor pipe 33 % and the exp unit 46 % busy: the
    # consumers run free and can meet at the same phase of the loop, both waiting on products or both on exp2
    6: {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "NUM_STAGES": 4, "SPLIT": True, "WS": True, "PINGPONG": True},
}
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


def _dp(head_dim: int) -> int:
    """Columns of a descriptor box: the head dim rounded up to a power of two >= 16 (Gluon block shapes are powers of
    two; 40 -> 64)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def config(variant: int, head_dim: int) -> dict:
    """Config ``variant`` of :data:`CONFIGS` for this head dim: key tiles of at most 8192 / DP keys (head dims over 64
    halve them to 64: the ring of K/V buffers stays within shared memory at d 128, and at d 80 (64 + 16 columns, 100 KB
    at config 1) two CTAs share an SM, so the 256 programs of SD's 32x32 level at set size 2 run in one wave of 132
    SMs)."""
    cfg = dict(CONFIGS[variant])
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 8192 // _dp(head_dim))
    return cfg


def _chunks(head_dim: int, split: bool = True) -> tuple[int, int]:
    """(D0, D1): the column chunks (each its own descriptor and shared tile), D0 the largest power of two <= the head
    dim (>= 16) and D1 = the next power of two >= the rest (>= 16), or (DP, 0) when two chunks would not be narrower
    than DP, the head dim rounded up to a power of two (40 -> (32, 16), not 64; 80 -> (64, 16), not 128; 24 -> (32, 0);
    64 -> (64, 0); 56 -> (64, 0))."""
    dp = _dp(head_dim)
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    if d0 >= head_dim or not split:
        return dp, 0
    d1 = max(16, 1 << (head_dim - d0 - 1).bit_length())
    return (d0, d1) if d0 + d1 < dp else (dp, 0)


def variant_switch(env: str, configs: dict) -> int:
    """A Gluon kernel's switch ``env`` (read per call): 0 (unset) = off, else a config number of ``configs``."""
    v = env_get(env) or "0"
    if v != "0" and (not v.isdigit() or int(v) not in configs):
        raise ValueError(f"{env} must be 0 or one of {sorted(configs)}, got {v!r}")
    return int(v)


def config_list(env: str, configs: dict, allow_none: bool = False) -> list[int]:
    """The configs listed in ``env`` (comma-separated, e.g. "4"; "0" = none where ``allow_none``), or all of
    ``configs`` when it is unset; ValueError on anything else."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return sorted(configs)
    if allow_none and raw == "0":
        return []
    try:
        picked = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        picked = []
    if not picked or any(c not in configs for c in picked):
        raise ValueError(f"{env} must be {'0 or ' if allow_none else ''}a comma-separated list of {sorted(configs)}, "
                         f"got {raw!r}")
    return picked


def gluon_fwd_variant() -> int:
    """``JEDI_TRITON_FWD_GLUON`` (read per call): 0 (unset) = off, else the config number of :data:`CONFIGS`."""
    return variant_switch("JEDI_TRITON_FWD_GLUON", CONFIGS)


def checked_configs() -> list[int]:
    """The configs the GPU tests and benchmarks exercise: ``JEDI_GLUON_CONFIGS`` (comma-separated, e.g. "4"), which
    ``benchmarks/gpu_check.sh`` sets to the configs ``tools/ws_probe.py --kernel gluon`` found agreeing with the
    pointer kernel when some did not (a wrong config would only fail every test and row of it); unset: all of
    :data:`CONFIGS`. The switch itself (``JEDI_TRITON_FWD_GLUON``) still takes any config."""
    return config_list("JEDI_GLUON_CONFIGS", CONFIGS)


def gluon_fwd_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float) -> bool:
    """Whether :func:`set_attn_fwd_gluon` can run these inputs: Gluon present, an sm_90 CUDA device, fp16/bf16,
    head dim <= 128 and a multiple of 8 (the descriptors' head stride must be a multiple of 16 bytes), scale > 0 (the
    row max is taken on the raw scores), and each of q, k, v evenly spaced rows with unit last stride, a 16-byte
    aligned base and row stride (what a TMA descriptor needs)."""
    if not HAVE_GLUON or head_dim > MAX_HEAD_DIM or head_dim % 8 or not scale > 0:
        return False
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return tma_rows_ok(q, k, v)


if HAVE_GLUON:

    @gluon.jit
    def _issue_kv(DescK0, DescK1, DescV0, DescV1, k0_s, k1_s, v0_s, v1_s, kv_bar, it, n_nt, ImgList, i, b, G, L,
                  head, D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  HAS_MASK: gl.constexpr):
        """Start the TMA loads of key tile ``it`` (its K and V rows, per column chunk) into ring buffer
        it % NUM_STAGES."""
        jj = it // n_nt
        if HAS_MASK:
            j = gl.load(ImgList + i * G + jj)
        else:
            j = jj
        row = (b * G + j) * L + (it - jj * n_nt) * BLOCK_N
        st = it % NUM_STAGES
        _issue_pair(DescK0, DescK1, DescV0, DescV1, k0_s.index(st), k1_s.index(st), v0_s.index(st), v1_s.index(st),
                    kv_bar.index(st), row, head, D0, D1)

    @gluon.jit
    def _issue_pair(DescA0, DescA1, DescB0, DescB1, a0, a1, b0, b1, bar, row, head, D0: gl.constexpr,
                    D1: gl.constexpr):
        """Start the TMA loads of the same rows of two tensors (K and V, or Q and dO: their two descriptors share box
        shapes), per column chunk, into the (rows, 1, chunk) tiles a0/a1 and b0/b1, all completing on mbarrier
        ``bar``: boxes at (row, head, 0) and (row, head, D0) of the (N·L, H, D) descriptors."""
        if D1 > 0:
            mbarrier.expect(bar, 2 * DescA0.block_type.nbytes + 2 * DescA1.block_type.nbytes)
        else:
            mbarrier.expect(bar, 2 * DescA0.block_type.nbytes)
        tma.async_copy_global_to_shared(DescA0, [row, head, 0], bar, a0)
        tma.async_copy_global_to_shared(DescB0, [row, head, 0], bar, b0)
        if D1 > 0:
            tma.async_copy_global_to_shared(DescA1, [row, head, D0], bar, a1)
            tma.async_copy_global_to_shared(DescB1, [row, head, D0], bar, b1)

    @gluon.jit
    def _flat(t):
        """A (rows, 1, chunk) TMA tile as the (rows, chunk) MMA operand it is (the same bytes and swizzle)."""
        return t.reshape([t.shape[0], t.shape[2]])

    @gluon.jit
    def _softmax_step(s, m_i, l_i, it, n_nt, L, qk_scale_log2, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr,
                      s_layout: gl.constexpr):
        """Online-softmax update for key tile ``it`` (scale > 0: the row max on the raw scores, one FFMA per score):
        returns P = 2^(c·s − m), the new running max and sum, and alpha = 2^(m_old − m) for the output."""
        if not EVEN_N:
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            nt = it % n_nt
            s = gl.where(gl.expand_dims(nt * BLOCK_N + cols < L, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale_log2)
        p = gl.exp2(s * qk_scale_log2 - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _issue_qk(q0, q1, k0_tile, k1_tile, s_zero, D1: gl.constexpr):
        """Issue S = Q Kᵀ for one key tile (both operands in shared memory, one tile per column chunk) over chunk 0
        and, when D1 > 0, chunk 1 as a second MMA accumulating into the first; returns its (in-flight)
        accumulator."""
        s = warpgroup_mma(q0, _flat(k0_tile).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if D1 > 0:
            s = warpgroup_mma(q1, _flat(k1_tile).permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _issue_pv(p_op, v0_tile, v1_tile, acc, acc1, alpha, D1: gl.constexpr, o_layout: gl.constexpr,
                  o1_layout: gl.constexpr, p1_layout: gl.constexpr):
        """O = O·α + P V for one key tile, per column chunk: chunk 0 into ``acc`` and, when D1 > 0, chunk 1 into
        ``acc1`` (one committed group each, P from registers for both); returns the two in-flight accumulators
        (``acc1`` unchanged when D1 = 0)."""
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        o_tok = warpgroup_mma(p_op, _flat(v0_tile), acc, is_async=True)
        if D1 > 0:
            acc1 = acc1 * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o1_layout)), 1)
            acc1 = warpgroup_mma(gl.convert_layout(p_op, p1_layout), _flat(v1_tile), acc1, is_async=True)
        return o_tok, acc1

    @gluon.jit
    def _wait_pv(o_tok, o1_tok, p_op, D1: gl.constexpr):
        """Wait for every MMA group of this warpgroup (the P·V product of both chunks); P's registers stay live to
        here. Returns (acc, acc1, p_op)."""
        if D1 > 0:
            acc, acc1, p_op = warpgroup_mma_wait(0, deps=(o_tok, o1_tok, p_op))
        else:
            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            acc1 = o1_tok
        return acc, acc1, p_op

    @gluon.jit
    def _store_out(Out, acc, l_safe, row0, mt, L, H, col0, C0: gl.constexpr, W: gl.constexpr,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, layout: gl.constexpr):
        """O[:, C0:C0+W] = acc / l for the tile's rows < L and columns < HEAD_DIM (the rest is the next head's)."""
        inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, layout))
        o = (acc * gl.expand_dims(inv_l, 1)).to(Out.dtype.element_ty)
        rows = mt * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = C0 + gl.arange(0, W, layout=gl.SliceLayout(0, layout))
        ptrs = Out + gl.expand_dims((row0 + rows) * (H * HEAD_DIM) + col0, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, o, mask=gl.expand_dims(rows < L, 1) & gl.expand_dims(cols < HEAD_DIM, 0))

    @gluon.jit
    def _first_tile(q0, q1, k0_s, k1_s, kv_bar, s_zero, m_i, l_i, n_it, n_nt, L, qk_scale_log2, D1: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr, s_layout: gl.constexpr):
        """Tile 0's scores alone (the loop then pairs S_t with P_{t-1} V_{t-1}); returns (P, m, l, alpha). n_it = 0
        only for a set_mask row allowing nothing, which the public API rejects: no wait then, or the program would
        wait for a load never issued."""
        p = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        alpha = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        if n_it > 0:
            mbarrier.wait(kv_bar.index(0), 0)
            s = _issue_qk(q0, q1, k0_s.index(0), k1_s.index(0), s_zero, D1)
            s = warpgroup_mma_wait(0, deps=(s, ))
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, n_nt, L, qk_scale_log2, BLOCK_N, EVEN_N, s_layout)
        return p, m_i, l_i, alpha

    @gluon.jit
    def _program_tile(ImgCount, H, G, L, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      HAS_MASK: gl.constexpr):
        """This program's work (grid (G·⌈L/BLOCK_M⌉, B·H)): query image i, its query tile mt, set b, head h, the
        (B, H) row pid_bh of lse, the key tiles per image n_nt, the head h, and n_it key tiles in all (those of the
        images image i may attend)."""
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        n_mt = gl.cdiv(L, BLOCK_M)
        i = pid_m // n_mt
        mt = pid_m % n_mt
        b = pid_bh // H
        h = pid_bh % H
        n_nt = gl.cdiv(L, BLOCK_N)
        if HAS_MASK:
            n_it = gl.load(ImgCount + i) * n_nt
        else:
            n_it = G * n_nt
        return i, mt, b, pid_bh, n_nt, h, n_it

    @gluon.jit
    def _epilogue(Out, Lse, acc, acc1, m_i, l_i, row0, lse_row0, rblk, L, H, col0, D0: gl.constexpr, D1: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BM: gl.constexpr, o_layout: gl.constexpr, o1_layout: gl.constexpr,
                  s_layout: gl.constexpr):
        """O = acc / l and lse = ln 2 · (m + log2 l) for the BM query rows of row block ``rblk`` (a row with no
        allowed key gets O = 0, lse = -inf); ``acc1`` holds the second column chunk when D1 > 0."""
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        _store_out(Out, acc, l_safe, row0, rblk, L, H, col0, 0, D0, HEAD_DIM, BM, o_layout)
        if D1 > 0:
            _store_out(Out, acc1, l_safe, row0, rblk, L, H, col0, D0, D1, HEAD_DIM, BM, o1_layout)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        lrows = rblk * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        gl.store(Lse + lse_row0 + lrows, lse, mask=lrows < L)

    @gluon.jit
    def _allocate_tiles(DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, dtype: gl.constexpr, D0: gl.constexpr,
                        D1: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The shared tiles, one per column chunk, shaped as the TMA boxes (:func:`_flat` gives the MMA operands): Q
        (BLOCK_M, 1, chunk) and rings of NUM_STAGES K and V tiles (BLOCK_N, 1, chunk); with D1 = 0 the second chunk's
        names are the first's (never read: the D1 > 0 branches are compiled out)."""
        q0_s = gl.allocate_shared_memory(dtype, [BLOCK_M, 1, D0], DescQ0.layout)
        k0_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, 1, D0], DescK0.layout)
        v0_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, 1, D0], DescV0.layout)
        if D1 > 0:
            q1_s = gl.allocate_shared_memory(dtype, [BLOCK_M, 1, D1], DescQ1.layout)
            k1_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, 1, D1], DescK1.layout)
            v1_s = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, 1, D1], DescV1.layout)
        else:
            q1_s = q0_s
            k1_s = k0_s
            v1_s = v0_s
        return q0_s, q1_s, k0_s, k1_s, v0_s, v1_s

    @gluon.jit
    def _issue_q(DescQ0, DescQ1, q0_s, q1_s, q_bar, row, head, D0: gl.constexpr, D1: gl.constexpr):
        """Start the TMA loads of the program's Q rows (per column chunk) onto ``q_bar``."""
        if D1 > 0:
            mbarrier.expect(q_bar, DescQ0.block_type.nbytes + DescQ1.block_type.nbytes)
        else:
            mbarrier.expect(q_bar, DescQ0.block_type.nbytes)
        tma.async_copy_global_to_shared(DescQ0, [row, head, 0], q_bar, q0_s)
        if D1 > 0:
            tma.async_copy_global_to_shared(DescQ1, [row, head, D0], q_bar, q1_s)

    @gluon.jit
    def _set_attn_fwd_gluon_kernel(
        DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, Out, Lse, ImgList, ImgCount,
        qk_scale_log2,
        H, G, L,
        HEAD_DIM: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr, HAS_MASK: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, EVEN_N: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """One program: BLOCK_M queries of image i of set b, head h (grid (G·⌈L/BLOCK_M⌉, B·H)), against every key
        tile of the images it may attend; writes O (N, L, H·D) and lse (B, H, G·L), as ``_set_attn_fwd_kernel``.

        Q, K and V come in column chunks, each its own descriptor (DescX0: columns [0, D0), DescX1: [D0, D0 + D1))
        and shared tile (D1 = 0: one chunk, the head dim padded to D0 = DP; else two power-of-two chunks, 40 -> 32 +
        16): S = Q₀ K₀ᵀ + Q₁ K₁ᵀ and O = (P V₀, P V₁), a quarter less tensor work at d 40 than the padded 64. (With D1
        = 0, DescX1 is DescX0 and never read.)"""
        gl.static_assert(D0 + D1 >= HEAD_DIM, "the chunks cover the head")
        gl.static_assert(NUM_STAGES >= 3, "the ring holds tiles t and t+1 while tile t-1's buffer is refilled")
        gl.static_assert(BLOCK_M == 16 * num_warps, "one m64 warpgroup MMA tile per 4 warps")
        dtype: gl.constexpr = DescQ0.dtype
        # accumulators: one m64 wgmma tile per warpgroup, warps stacked along the rows
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D0, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # the second chunk's accumulator (16 columns wide and unused when D1 = 0)
        D1E: gl.constexpr = D1 if D1 > 0 else 16
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, D1E, 16])
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        # groups committed per product (one per chunk): the wait for S_t leaves the P·V groups in flight
        PV_GROUPS: gl.constexpr = 2 if D1 > 0 else 1

        i, mt, b, pid_bh, n_nt, h, n_it = _program_tile(ImgCount, H, G, L, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_MASK)

        q0_s, q1_s, k0_s, k1_s, v0_s, v1_s = _allocate_tiles(DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, dtype, D0,
                                                             D1, BLOCK_M, BLOCK_N, NUM_STAGES)
        q0f = _flat(q0_s)
        q1f = _flat(q1_s)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.init(kv_bar.index(s0), count=1)
        fence_async_shared()

        _issue_q(DescQ0, DescQ1, q0_s, q1_s, q_bar, (b * G + i) * L + mt * BLOCK_M, h, D0, D1)
        for s0 in gl.static_range(NUM_STAGES):
            if s0 < n_it:
                _issue_kv(DescK0, DescK1, DescV0, DescV1, k0_s, k1_s, v0_s, v1_s, kv_bar, s0, n_nt, ImgList, i, b, G,
                          L, h, D0, D1, BLOCK_N, NUM_STAGES, HAS_MASK)
        mbarrier.wait(q_bar, 0)

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, D0], gl.float32, o_layout)
        acc1 = gl.zeros([BLOCK_M, D1E], gl.float32, o1_layout)
        p, m_i, l_i, alpha = _first_tile(q0f, q1f, k0_s, k1_s, kv_bar, s_zero, m_i, l_i, n_it, n_nt, L,
                                         qk_scale_log2, D1, BLOCK_M, BLOCK_N, EVEN_N, s_layout)
        # FlashAttention-3's order: iteration t issues S_t = Q K_tᵀ, rescales O (not in flight), issues
        # O += P_{t-1} V_{t-1}, waits for S_t alone, runs S_t's softmax while the P·V product is on the tensor
        # cores, then waits for the product.
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for it in range(1, n_it):
            st = it % NUM_STAGES
            prev = (it - 1) % NUM_STAGES
            mbarrier.wait(kv_bar.index(st), (it // NUM_STAGES) & 1)
            s_tok = _issue_qk(q0f, q1f, k0_s.index(st), k1_s.index(st), s_zero, D1)
            o_tok, o1_tok = _issue_pv(p_op, v0_s.index(prev), v1_s.index(prev), acc, acc1, alpha, D1, o_layout,
                                      o1_layout, p1_layout)
            s = warpgroup_mma_wait(PV_GROUPS, deps=(s_tok, ))
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, it, n_nt, L, qk_scale_log2, BLOCK_N, EVEN_N, s_layout)
            # The wait for the P·V product stands in both arms of a branch: ptxas schedules a wait that shares a
            # basic block with the softmax into it (seen in the SASS: between the row-max instructions), which
            # serializes the two again; it does not move instructions across blocks. The branch is the refill of
            # tile t-1's buffer with tile t-1+NUM_STAGES: once this warpgroup's P_{t-1} V_{t-1} is done and a CTA
            # barrier shows every warpgroup's is, nothing reads that buffer any more. The refill tile is needed
            # NUM_STAGES - 1 iterations later (at 4 stages: tile t+3, two whole iterations after this one). The other
            # arm (the last NUM_STAGES - 1 iterations) starts with a barrier it does not need: with the wait first in
            # both arms, LLVM hoists it out of the branch, back into the softmax's block (the SASS test catches that).
            if it - 1 + NUM_STAGES < n_it:
                acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)
                gl.thread_barrier()
                _issue_kv(DescK0, DescK1, DescV0, DescV1, k0_s, k1_s, v0_s, v1_s, kv_bar, it - 1 + NUM_STAGES, n_nt,
                          ImgList, i, b, G, L, h, D0, D1, BLOCK_N, NUM_STAGES, HAS_MASK)
            else:
                gl.thread_barrier()
                acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        # the last tile's P V
        if n_it > 0:
            last = (n_it - 1) % NUM_STAGES
            o_tok, o1_tok = _issue_pv(p_op, v0_s.index(last), v1_s.index(last), acc, acc1, alpha, D1, o_layout,
                                      o1_layout, p1_layout)
            acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)

        mbarrier.invalidate(q_bar)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(kv_bar.index(s0))

        _epilogue(Out, Lse, acc, acc1, m_i, l_i, (b * G + i).to(gl.int64) * L, (pid_bh * G + i).to(gl.int64) * L, mt,
                  L, H, h * HEAD_DIM, D0, D1, HEAD_DIM, BLOCK_M, o_layout, o1_layout, s_layout)


if HAVE_GLUON:

    @gluon.jit
    def _ws_producer(DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, q0_s, q1_s, k0_s, k1_s, v0_s, v1_s, q_bar, full,
                     empty, n_it, n_nt, ImgList, i, b, G, L, head, q_row, D0: gl.constexpr, D1: gl.constexpr,
                     BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_MASK: gl.constexpr):
        """The producer warpgroup (the default partition): Q once, then key tile ``it`` into ring buffer it % NUM_STAGES
        as soon as both consumers have released the tile that used it before (``empty``: one arrive per consumer
        warpgroup; use k of a buffer waits for the completion of the empty barrier's phase k − 1)."""
        _issue_q(DescQ0, DescQ1, q0_s, q1_s, q_bar, q_row, head, D0, D1)
        for it in range(n_it):
            st = it % NUM_STAGES
            mbarrier.wait(empty.index(st), ((it // NUM_STAGES) & 1) ^ 1, pred=it >= NUM_STAGES)
            _issue_kv(DescK0, DescK1, DescV0, DescV1, k0_s, k1_s, v0_s, v1_s, full, it, n_nt, ImgList, i, b, G, L,
                      head, D0, D1, BLOCK_N, NUM_STAGES, HAS_MASK)

    @gluon.jit
    def _ws_consumer(WG: gl.constexpr, Out, Lse, q0_s, q1_s, k0_s, k1_s, v0_s, v1_s, q_bar, full, empty, turn, n_it,
                     n_nt, L, H, row0, mt, col0, lse_row0, qk_scale_log2, dtype: gl.constexpr, HEAD_DIM: gl.constexpr,
                     D0: gl.constexpr, D1: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                     EVEN_N: gl.constexpr, PINGPONG: gl.constexpr):
        """Consumer warpgroup ``WG`` (a worker partition of 4 warps): query rows [64·WG, 64·WG + 64) of the CTA's 128,
        the same schedule as :func:`_set_attn_fwd_gluon_kernel`'s warpgroups (S_t issued, O += P_{t-1} V_{t-1}
        issued, wait for S_t, softmax of S_t while the product runs, wait for it), but buffer t−1 is released by one
        mbarrier arrive of this warpgroup after its P_{t-1} V_{t-1} wait: no CTA barrier per tile, so the two
        consumers never wait for each other; then it writes its own rows of O and lse.

        PINGPONG (config 6): the warpgroups take turns issuing their two products of a tile, FlashAttention-3's
        schedule: before issuing, warpgroup WG waits for ``turn[WG]``, and after issuing it arrives on the other's
        (warpgroup 1 arrives on ``turn[0]`` once first, so warpgroup 0 leads). Warpgroup 0's products of tile t are
        then queued before warpgroup 1's, and warpgroup 1's before warpgroup 0's of tile t+1: each softmax runs while
        the other warpgroup's products keep the tensor cores busy. Wait k of ``turn[WG]`` (tile k + 1) is for its
        completion k: never a phase ahead, as each warpgroup arrives only after its own wait."""
        BM: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D0, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        D1E: gl.constexpr = D1 if D1 > 0 else 16
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, D1E, 16])
        p1_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        PV_GROUPS: gl.constexpr = 2 if D1 > 0 else 1

        q0_mine = _flat(q0_s).slice(WG * BM, BM, 0)  # (a reshape of a slice is not implemented; the reverse is)
        q1_mine = _flat(q1_s).slice(WG * BM, BM, 0)
        mbarrier.wait(q_bar, 0)

        s_zero = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BM, D0], gl.float32, o_layout)
        acc1 = gl.zeros([BM, D1E], gl.float32, o1_layout)
        p, m_i, l_i, alpha = _first_tile(q0_mine, q1_mine, k0_s, k1_s, full, s_zero, m_i, l_i, n_it, n_nt, L,
                                         qk_scale_log2, D1, BM, BLOCK_N, EVEN_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if PINGPONG and WG == 1:
            mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first
        for it in range(1, n_it):
            st = it % NUM_STAGES
            prev = (it - 1) % NUM_STAGES
            mbarrier.wait(full.index(st), (it // NUM_STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (it - 1) & 1)
            s_tok = _issue_qk(q0_mine, q1_mine, k0_s.index(st), k1_s.index(st), s_zero, D1)
            o_tok, o1_tok = _issue_pv(p_op, v0_s.index(prev), v1_s.index(prev), acc, acc1, alpha, D1, o_layout,
                                      o1_layout, p1_layout)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG))
            s = warpgroup_mma_wait(PV_GROUPS, deps=(s_tok, ))
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, it, n_nt, L, qk_scale_log2, BLOCK_N, EVEN_N, s_layout)
            # The P·V wait stands in both arms of a branch, as in the CTA-wide kernel (ptxas would otherwise schedule
            # it among the softmax's instructions): the first arm releases buffer t−1 to the producer, which refills
            # it with tile t−1+NUM_STAGES; the last NUM_STAGES − 1 iterations have nothing to release, and their arm
            # starts with a (warpgroup) barrier so that LLVM cannot hoist the common wait out of the branch.
            if it - 1 + NUM_STAGES < n_it:
                acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)
                mbarrier.arrive(empty.index(prev))
            else:
                gl.thread_barrier()
                acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        if n_it > 0:
            last = (n_it - 1) % NUM_STAGES
            o_tok, o1_tok = _issue_pv(p_op, v0_s.index(last), v1_s.index(last), acc, acc1, alpha, D1, o_layout,
                                      o1_layout, p1_layout)
            acc, acc1, p_op = _wait_pv(o_tok, o1_tok, p_op, D1)

        # this WG's 64 rows: row block 2·mt + WG of 64 rows
        _epilogue(Out, Lse, acc, acc1, m_i, l_i, row0, lse_row0, 2 * mt + WG, L, H, col0, D0, D1, HEAD_DIM, BM,
                  o_layout, o1_layout, s_layout)

    @gluon.jit
    def _set_attn_fwd_gluon_ws_kernel(
        DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, Out, Lse, ImgList, ImgCount,
        qk_scale_log2,
        H, G, L,
        HEAD_DIM: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr, HAS_MASK: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, EVEN_N: gl.constexpr,
        num_warps: gl.constexpr, PINGPONG: gl.constexpr = False,
    ):
        """The warp-specialized form of :func:`_set_attn_fwd_gluon_kernel` (configs 5 and 6; same grid, arguments and
        outputs): the kernel's 4 warps are the producer partition (TMA loads of Q and of every key tile into the ring,
        each load waiting for its buffer's ``empty`` mbarrier), and two worker partitions of 4 warps are the consumer
        warpgroups (:func:`_ws_consumer`), each with 64 of the 128 query rows. FlashAttention-3's structure, with its
        ping-pong scheduling of the two consumers under PINGPONG (config 6): where the CTA-wide kernel synchronizes
        both warpgroups every tile (its refill barrier, and the three Triton adds around the mbarrier wait and the TMA
        issues), these only wait for data (and, in config 6, for their turn to issue)."""
        gl.static_assert(D0 + D1 >= HEAD_DIM, "the chunks cover the head")
        gl.static_assert(NUM_STAGES >= 2, "a ring of at least two buffers")
        gl.static_assert(BLOCK_M == 128 and num_warps == 4, "two consumer warpgroups of 64 rows; a producer warpgroup")
        dtype: gl.constexpr = DescQ0.dtype

        i, mt, b, pid_bh, n_nt, h, n_it = _program_tile(ImgCount, H, G, L, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_MASK)
        col0 = h * HEAD_DIM
        row0 = (b * G + i).to(gl.int64) * L
        lse_row0 = (pid_bh * G + i).to(gl.int64) * L

        q0_s, q1_s, k0_s, k1_s, v0_s, v1_s = _allocate_tiles(DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, dtype, D0,
                                                             D1, BLOCK_M, BLOCK_N, NUM_STAGES)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        if PINGPONG:  # whose turn it is to issue products
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        else:
            turn = empty  # (never used: config 5's shared memory stays as it was)
        mbarrier.init(q_bar, count=1)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.init(full.index(s0), count=1)
            mbarrier.init(empty.index(s0), count=2)  # one arrive per consumer warpgroup
        if PINGPONG:
            mbarrier.init(turn.index(0), count=1)
            mbarrier.init(turn.index(1), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_ws_producer, (DescQ0, DescQ1, DescK0, DescK1, DescV0, DescV1, q0_s, q1_s, k0_s, k1_s, v0_s, v1_s, q_bar,
                            full, empty, n_it, n_nt, ImgList, i, b, G, L, h, (b * G + i) * L + mt * BLOCK_M, D0,
                            D1, BLOCK_N, NUM_STAGES, HAS_MASK)),
            (_ws_consumer, (0, Out, Lse, q0_s, q1_s, k0_s, k1_s, v0_s, v1_s, q_bar, full, empty, turn, n_it, n_nt, L, H,
                            row0, mt, col0, lse_row0, qk_scale_log2, dtype, HEAD_DIM, D0, D1, BLOCK_N, NUM_STAGES,
                            EVEN_N, PINGPONG)),
            (_ws_consumer, (1, Out, Lse, q0_s, q1_s, k0_s, k1_s, v0_s, v1_s, q_bar, full, empty, turn, n_it, n_nt, L, H,
                            row0, mt, col0, lse_row0, qk_scale_log2, dtype, HEAD_DIM, D0, D1, BLOCK_N, NUM_STAGES,
                            EVEN_N, PINGPONG)),
        ], worker_num_warps=[4, 4], worker_num_regs=[232, 232])  # (setmaxnreg: the producer gets the rest, 40)

        mbarrier.invalidate(q_bar)
        for s0 in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(full.index(s0))
            mbarrier.invalidate(empty.index(s0))
        if PINGPONG:
            mbarrier.invalidate(turn.index(0))
            mbarrier.invalidate(turn.index(1))


def _ws_meta(cfg: dict) -> dict:
    """The warp-specialized kernel's own constexpr (PINGPONG: config 6), none for the CTA-wide kernel."""
    return {"PINGPONG": bool(cfg.get("PINGPONG"))} if cfg.get("WS") else {}


def _kernel_of(cfg: dict):
    """The Gluon kernel a config runs: the warp-specialized one (configs 5 and 6) or the CTA-wide one."""
    return _set_attn_fwd_gluon_ws_kernel if cfg.get("WS") else _set_attn_fwd_gluon_kernel


@functools.lru_cache(maxsize=None)
def _box_layout(rows: int, width: int, dtype: torch.dtype):
    """The default (swizzled) shared layout of a (rows, 1, width) box, cached (≈ 7.5 µs of host time each to build on
    the CI machine's CPU)."""
    return gl.NVMMASharedLayout.get_default_for([rows, 1, width],
                                                gl.float16 if dtype == torch.float16 else gl.bfloat16)


def chunk_descriptors(t, rows: int, N: int, L: int, H: int, D: int, d0: int, d1: int):
    """(chunk 0's, chunk 1's) TMA descriptors over t as an (N·L, H, D) tensor (rows, heads, head columns): boxes of
    (rows, 1, d0) and (rows, 1, d1) with the default swizzle; the same object twice when d1 = 0 (a kernel never reads
    the second then). A chunk's columns past D are out of the tensor, so TMA fills them with zeros: no kernel reads
    another head's columns or zeroes padding. (D % 8 == 0: the head stride must be a multiple of 16 bytes.)"""
    shape, stride = [N * L, H, D], [_rows_stride(t), D, 1]
    first = TensorDescriptor(t, shape, stride, [rows, 1, d0], _box_layout(rows, d0, t.dtype))
    if not d1:
        return first, first
    return first, TensorDescriptor(t, shape, stride, [rows, 1, d1], _box_layout(rows, d1, t.dtype))


def chunk_desc_types(rows: int, d0: int, d1: int, dtype: torch.dtype) -> tuple[str, str]:
    """The signature types of :func:`chunk_descriptors`' pair, for compiling without a GPU."""
    ty = "fp16" if dtype == torch.float16 else "bf16"
    w1 = d1 or d0
    return (f"tensordesc<{ty}[{rows},1,{d0}],{_box_layout(rows, d0, dtype)!r}>",
            f"tensordesc<{ty}[{rows},1,{w1}],{_box_layout(rows, w1, dtype)!r}>")


def set_attn_fwd_gluon(q, k, v, B: int, G: int, L: int, H: int, D: int, scale: float, set_mask, out, lse,
                       img_list, img_count, variant: int, compile_only: bool = False):
    """Run the Gluon forward on validated inputs (:func:`gluon_fwd_ok`) into ``out`` (N, L, H·D) and ``lse``
    (B, H, G·L); ``img_list``/``img_count``: the mask's image lists (``set_attention._mask_lists``) or dummies.
    ``compile_only``: compile for these arguments without launching (a probe that tells a slow compile from a
    kernel that does not finish)."""
    cfg = config(variant, D)
    d0, d1 = _chunks(D, cfg["SPLIT"])
    bm, bn, N = cfg["BLOCK_M"], cfg["BLOCK_N"], B * G
    descs = (*chunk_descriptors(q, bm, N, L, H, D, d0, d1), *chunk_descriptors(k, bn, N, L, H, D, d0, d1),
             *chunk_descriptors(v, bn, N, L, H, D, d0, d1))
    grid = (G * cdiv(L, bm), B * H)
    args = (*descs, out, lse, img_list, img_count, float(scale) * _LOG2E, H, G, L)
    meta = dict(HEAD_DIM=D, D0=d0, D1=d1, HAS_MASK=set_mask is not None, BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"], NUM_STAGES=cfg["NUM_STAGES"], EVEN_N=L % cfg["BLOCK_N"] == 0,
                num_warps=cfg["num_warps"], **_ws_meta(cfg))
    kernel = _kernel_of(cfg)
    if compile_only:
        kernel.warmup(*args, grid=grid, **meta)
        return
    launch(kernel, grid, *args, **meta)


def compile_for(arch: int = 90, head_dim: int = 40, dtype: torch.dtype = torch.bfloat16, variant: int = 1,
                has_mask: bool = False, even_n: bool = True):
    """Compile the Gluon forward for ``cuda:<arch>`` without a GPU (``triton.compile`` on a GluonASTSource with the
    signature a launch on SD-sized inputs produces) and return the CompiledKernel (``.asm["ptx"]``, ``["cubin"]``,
    ``.metadata``). The CPU tests and tools/triton_aot_check.py use it: Gluon has no interpreter mode."""
    cfg = config(variant, head_dim)
    ty = "fp16" if dtype == torch.float16 else "bf16"
    d0, d1 = _chunks(head_dim, cfg["SPLIT"])
    q0, q1 = chunk_desc_types(cfg["BLOCK_M"], d0, d1, dtype)
    kv0, kv1 = chunk_desc_types(cfg["BLOCK_N"], d0, d1, dtype)
    signature = {"DescQ0": q0, "DescQ1": q1, "DescK0": kv0, "DescK1": kv1, "DescV0": kv0, "DescV1": kv1,
                 "Out": "*" + ty, "Lse": "*fp32", "ImgList": "*i32", "ImgCount": "*i32", "qk_scale_log2": "fp32",
                 "H": "i32", "G": "i32", "L": "i32"}
    constexprs = {"HEAD_DIM": head_dim, "D0": d0, "D1": d1, "HAS_MASK": has_mask,
                  "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "NUM_STAGES": cfg["NUM_STAGES"],
                  "EVEN_N": even_n, "num_warps": cfg["num_warps"], **_ws_meta(cfg)}
    return compile_source(_kernel_of(cfg), signature, constexprs, ("Out", "Lse", "ImgList", "ImgCount"), arch)


def compile_source(fn, signature: dict, constexprs: dict, aligned: tuple, arch: int):
    """``triton.compile`` of Gluon kernel ``fn`` for ``cuda:<arch>`` without a GPU: ``signature`` the runtime
    arguments' types, ``constexprs`` (num_warps among them) added as constexpr, ``aligned`` the pointer arguments a
    launch sees 16-byte aligned."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = [p.name for p in fn.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": constexprs["num_warps"]})
