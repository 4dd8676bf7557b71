// Set-wise flash attention on tensor cores (FlashAttention-2 design, mma.sync m16n8k16, sm80+): kernel templates.
// Included by the set_attention_{fwd,bwd}_*.cu instance files, and by tests/test_set_attention_emulated.cpp, which
// runs these very templates on the CPU (JEDI_SET_ATTN_EMULATE) against a float64 reference.
//
// MMA fragment conventions (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs and .f32 accumulators), with
// g = lane / 4 and c = lane % 4:
//   A (16x16, row-major)  a0: (g, 2c..2c+1)  a1: (g+8, 2c..)  a2: (g, 2c+8..)  a3: (g+8, 2c+8..)
//   B (16x8, k x n)       b0: (k = 2c..2c+1, n = g)  b1: (k = 2c+8.., n = g)
//   C (16x8, f32)         c0,c1: (g, 2c..2c+1)  c2,c3: (g+8, 2c..2c+1)
// so a 16x16 block of C (two n8 tiles) is, packed to 16 bits, exactly an A fragment: scores become the A operand
// of the next GEMM without touching shared memory. ldmatrix.x4 gives lane l the row l/4, columns 2(l%4).. of each
// of its four 8x8 matrices (transposed with .trans); the matrices' row addresses come from lanes 0-7, 8-15, 16-23,
// 24-31. Two per-lane address patterns cover every operand here:
//   "A pattern"  row (l%8) + 8*((l/8)%2), col 8*(l/16): an A fragment of a row-major [m][k] tile, or with .trans
//                the (b0, b1) pairs of two n8 tiles of a B operand stored [k][n] (V in P V, dO in P^T dO, ...)
//   "B pattern"  row (l%8) + 8*(l/16), col 8*((l/8)%2): the (b0, b1) pairs of two n8 tiles of a B operand stored
//                [n][k] (K in Q K^T, ...), or with .trans an A fragment of a tile stored transposed [k][m] (dS^T)
#pragma once

#include <atomic>
#include <type_traits>

#include "set_attention.cuh"
#include "set_attention_device.cuh"
#include "set_attention_tiles.cuh"
#if !defined(JEDI_SET_ATTN_EMULATE)
#include "set_attention_dispatch.cuh"
#endif

namespace jedi {
namespace set_attn {

// A 16x16 block of C (the two n8 accumulator tiles lo, hi), rounded to T, is the A fragment of the next MMA (see the
// fragment conventions above): P for P V, P^T for dV, dS^T for dK.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// ---- tile loads ----------------------------------------------------------------------------------------------
// Load rows [row0, row0 + kRows) x columns [0, kD) of one head of one image into a shared tile with row pitch
// smem_pitch(kD). `g` points at (image row of the tensor, column h*D); rows >= L and columns >= D (the padding up to
// the instance's head dim: the next head's data lives there) are zero-filled, so padded keys/values contribute
// exact zeros and never NaN. row0 < L. The tile's first row is one 64-bit offset; a thread's chunks (row r, column
// chunk c) are the same for every tile, so each costs an add, a compare and one zero-filling cp.async.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride_l, int64_t row0, int64_t L, int D,
                                          int tid) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  constexpr int kTotal = kRows * kChunks;
  constexpr int kPitch = smem_pitch(kD);
  const T* gt = g + row0 * stride_l;
  const int rows_in = L - row0 < kRows ? static_cast<int>(L - row0) : kRows;  // rows of the tile inside the image
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = it * kThreads + tid;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int r = i / kChunks, c = i % kChunks;
      const bool full = r < rows_in && c * 8 < D;
      cp_async16_zfill(s + r * kPitch + c * 8, gt + r * stride_l + c * 8, full);
    }
  }
}

// =================================================================================================================
// Forward
// =================================================================================================================
template <typename T, int kD, int kRB, int kStages = 1>
struct FwdTraits {
  using Elem = T;
  static constexpr FwdConfig kCfg = fwd_config(kD, kRB, kStages);
  static constexpr int kBlockM = kCfg.block_m;
  static constexpr int kBlockN = kCfg.block_n;
  static constexpr int kWarps = kCfg.num_warps;
  static constexpr int kRowBlocks = kCfg.row_blocks;  // m16 row blocks per warp
  static constexpr int kThreads = 32 * kWarps;
  static constexpr bool kQInRegs = kCfg.q_in_regs;
  static constexpr int kMinBlocks = kCfg.min_blocks;
  static constexpr int kPitch = smem_pitch(kD);
  static constexpr int kSmemBytes = static_cast<int>(fwd_smem_bytes(kD, sizeof(T), kRB, kStages));
  static constexpr int kNT = kBlockN / 8;  // score n8 tiles per warp row block
  static constexpr int kDT = kD / 8;       // output n8 tiles
  static constexpr int kKS = kD / 16;      // k16 steps of Q K^T
  static constexpr uint32_t kRowBlockBytes = 16 * kPitch * sizeof(T);
  // Softmax row sums as P . 1 on the tensor cores (one m16n8k16 per k16 step and row block) instead of one FADD per
  // score: at small head dims the loop is issue-bound and the tensor cores have room; from 80 on they are the bound.
  static constexpr bool kRowSumMma = kD <= 64;
  static_assert(kRowBlocks == kRB && kCfg.stages == kStages && fwd_has_stages(kD, kRB, kStages), "fwd config");
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0 && kBlockM == 16 * kRowBlocks * kWarps, "tile shapes");

  using Scores = float[kRB][kNT][4];  // a warp's 16 kRB x kBlockN scores (then probabilities), C fragments
  using OAcc = float[kRB][kDT][4];    // its 16 kRB x kD output accumulators
  using QFrag = uint32_t[kQInRegs ? kRB : 1][kQInRegs ? kKS : 1][4];
  // running max (log2 units) of rows g, g + 8 of each row block; row sums: [0], [1] row g, [2], [3] row g + 8
  // (kRowSumMma: P . 1 accumulators, all equal and whole-row; else this lane's partial sums in [0] and [2])
  using RowMax = float[kRB][2];
  using RowSum = float[kRB][4];
};

// ---- forward building blocks (one warp's share of one key tile) ----------------------------------------------------
// Q's MMA fragments, loaded once when they stay in registers; a negative scale flips their signs (kSignBits).
template <typename Tr>
__device__ __forceinline__ void fwd_load_q(typename Tr::QFrag& q_frag, uint32_t sQ_a, uint32_t qsign) {
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int ks = 0; ks < Tr::kKS; ++ks) {
      ldsm_x4(q_frag[rb][ks], sQ_a + rb * Tr::kRowBlockBytes + ks * 16 * sizeof(typename Tr::Elem));
#pragma unroll
      for (int i = 0; i < 4; ++i) q_frag[rb][ks][i] ^= qsign;
    }
}

// S = Q K^T of the key tile at sK_b (this lane's ldmatrix address): 16 x kBlockN per warp row block; each K fragment
// serves every row block. Straight-line code (no branches): the pipelined loop relies on it.
template <typename Tr>
__device__ __forceinline__ void fwd_scores(typename Tr::Scores& acc_s, const typename Tr::QFrag& q_frag,
                                           uint32_t sQ_a, uint32_t sK_b, uint32_t qsign) {
  using T = typename Tr::Elem;
  constexpr int kRB = Tr::kRowBlocks;
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j) acc_s[rb][j][0] = acc_s[rb][j][1] = acc_s[rb][j][2] = acc_s[rb][j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < Tr::kKS; ++ks) {
    uint32_t a[kRB][4];
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb) {
      if constexpr (Tr::kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[rb][i] = q_frag[rb][ks][i];
      } else {
        ldsm_x4(a[rb], sQ_a + rb * Tr::kRowBlockBytes + ks * 16 * sizeof(T));
#pragma unroll
        for (int i = 0; i < 4; ++i) a[rb][i] ^= qsign;
      }
    }
#pragma unroll
    for (int j = 0; j < Tr::kNT / 2; ++j) {
      uint32_t bk[4];
      ldsm_x4(bk, sK_b + (j * 16 * Tr::kPitch + ks * 16) * sizeof(T));
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) {
        mma16816<T>(acc_s[rb][2 * j], a[rb], bk[0], bk[1]);
        mma16816<T>(acc_s[rb][2 * j + 1], a[rb], bk[2], bk[3]);
      }
    }
  }
}

// Keys past the image's end (valid_keys < kBlockN: the last tile of an image only) get `value`: -inf before the row
// max (they take no probability), 0 after the exponentials (exact zeros also when scale == 0, where 0 * -inf = NaN).
template <typename Tr>
__device__ __forceinline__ void fwd_mask_tail(typename Tr::Scores& acc_s, int64_t valid_keys, int lane, float value) {
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (j * 8 + (lane % 4) * 2 + (e % 2) >= valid_keys) acc_s[rb][j][e] = value;
}

// Online softmax, first half: the tile's row maxima (a row's 4 owner lanes share theirs through two xor-shuffles)
// move the running maxima lazily; m_prev keeps the old ones. True when some row of this lane moved.
template <typename Tr>
__device__ __forceinline__ bool fwd_row_max(const typename Tr::Scores& acc_s, typename Tr::RowMax& row_max,
                                            typename Tr::RowMax& m_prev, float sl) {
  bool moved = false;
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < Tr::kNT; ++j) mx = fmaxf(mx, fmaxf(acc_s[rb][j][2 * r], acc_s[rb][j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mx2 = mx * sl;
      m_prev[rb][r] = row_max[rb][r];
      // -inf + threshold = -inf: the first finite tile max always moves it
      if (mx2 > row_max[rb][r] + kLazyRescaleLog2) {
        row_max[rb][r] = mx2;
        moved = true;
      }
    }
  return moved;
}

// Second half: P = 2^(c s - m), in place, one FFMA and one SFU exp2 per score. Branch-free.
template <typename Tr>
__device__ __forceinline__ void fwd_exp(typename Tr::Scores& acc_s, const typename Tr::RowMax& row_max, float sl) {
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_use = row_max[rb][r] == -INFINITY ? 0.f : row_max[rb][r];  // nothing allowed yet: exp2 finite
#pragma unroll
      for (int j = 0; j < Tr::kNT; ++j) {
        acc_s[rb][j][2 * r] = fast_exp2(fmaf(acc_s[rb][j][2 * r], sl, -m_use));
        acc_s[rb][j][2 * r + 1] = fast_exp2(fmaf(acc_s[rb][j][2 * r + 1], sl, -m_use));
      }
    }
}

// O and l follow a moved running max: multiplied by 2^(m_prev - m), exactly 1 for rows that did not move and 0 for a
// row's first finite max (O and l are still 0 then). Called when some row of the warp moved (a warp-uniform branch).
template <typename Tr>
__device__ __forceinline__ void fwd_rescale(const typename Tr::RowMax& row_max, const typename Tr::RowMax& m_prev,
                                            typename Tr::RowSum& row_sum, typename Tr::OAcc& acc_o) {
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_use = row_max[rb][r] == -INFINITY ? 0.f : row_max[rb][r];
      const float corr = fast_exp2(m_prev[rb][r] - m_use);
      row_sum[rb][2 * r] *= corr;
      row_sum[rb][2 * r + 1] *= corr;
#pragma unroll
      for (int i = 0; i < Tr::kDT; ++i) {
        acc_o[rb][i][2 * r] *= corr;
        acc_o[rb][i][2 * r + 1] *= corr;
      }
    }
}

// Row sums by FADD (this lane's partial sums; the quad adds them once, at the end) where they are not P . 1 MMAs.
template <typename Tr>
__device__ __forceinline__ void fwd_row_sums(const typename Tr::Scores& acc_s, typename Tr::RowSum& row_sum) {
  if constexpr (!Tr::kRowSumMma) {
#pragma unroll
    for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
      for (int j = 0; j < Tr::kNT; ++j) {
        row_sum[rb][0] += acc_s[rb][j][0] + acc_s[rb][j][1];
        row_sum[rb][2] += acc_s[rb][j][2] + acc_s[rb][j][3];
      }
  }
}

// O += P V of the value tile at sV_a (this lane's ldmatrix address): P's accumulator layout is the A fragment layout
// (two n8 score tiles per k16 step); each V fragment serves every row block. kRowSumMma: l += P . 1 here too.
template <typename Tr>
__device__ __forceinline__ void fwd_pv(typename Tr::OAcc& acc_o, typename Tr::RowSum& row_sum,
                                       const typename Tr::Scores& acc_s, uint32_t sV_a, uint32_t ones,
                                       bool last_n8_live) {
  using T = typename Tr::Elem;
  constexpr int kRB = Tr::kRowBlocks;
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
    uint32_t a[kRB][4];
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb) {
      c_to_a<T>(a[rb], acc_s[rb][2 * kk], acc_s[rb][2 * kk + 1]);
    }
    if constexpr (Tr::kRowSumMma) {
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) mma16816<T>(row_sum[rb], a[rb], ones, ones);
    }
#pragma unroll
    for (int d2 = 0; d2 < Tr::kDT / 2; ++d2) {
      uint32_t bv[4];
      ldsm_x4_trans(bv, sV_a + (kk * 16 * Tr::kPitch + d2 * 16) * sizeof(T));
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) {
        mma16816<T>(acc_o[rb][2 * d2], a[rb], bv[0], bv[1]);
        if (2 * d2 + 1 < Tr::kDT - 1 || last_n8_live) mma16816<T>(acc_o[rb][2 * d2 + 1], a[rb], bv[2], bv[3]);
      }
    }
  }
}

// Normalize and write out rows < L (columns < D) and lse of this warp's rows. kSplitOut: this CTA's run of key tiles
// is split `split` of a split forward: out and lse in float32 to that split's slices of p.out_accum / p.lse_accum
// (an empty run writes zeros and lse -inf, which the merge weighs 0).
template <typename Tr, bool kSplitOut = false>
__device__ __forceinline__ void fwd_epilogue(const SetAttnParams& p, const typename Tr::OAcc& acc_o,
                                             const typename Tr::RowMax& row_max, const typename Tr::RowSum& row_sum,
                                             int64_t b, int64_t h, const TileCoord& qc, int warp, int lane,
                                             int split = 0) {
  using T = typename Tr::Elem;
  T* out = static_cast<T*>(p.out);
  const int64_t G = p.G, L = p.L, H = p.H;
  const int D = static_cast<int>(p.D);
  const int64_t HD = H * D;
  float* out_acc = nullptr;
  float* lse_acc = nullptr;
  if constexpr (kSplitOut) {
    out_acc = p.out_accum + split * fwd_split_out_elems(p.B, G, L, H, D, 1);
    lse_acc = p.lse_accum + split * fwd_split_lse_elems(p.B, G, L, H, 1);
  }
#pragma unroll
  for (int rb = 0; rb < Tr::kRowBlocks; ++rb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[rb][2 * r];
      if constexpr (!Tr::kRowSumMma) {
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      const float lse = sum > 0.f ? row_max[rb][r] * kLn2 + logf(sum) : -INFINITY;
      const int64_t pos = qc.row0 + (warp * Tr::kRowBlocks + rb) * 16 + lane / 4 + 8 * r;
      if (pos < L) {
        const int64_t off = (tensor_row(b, G, qc.image) * L + pos) * HD + h * D;
#pragma unroll
        for (int i = 0; i < Tr::kDT; ++i) {
          const int col = i * 8 + (lane % 4) * 2;
          if (col < D) {
            if constexpr (kSplitOut) {
              *reinterpret_cast<float2*>(out_acc + off + col) =
                  float2{acc_o[rb][i][2 * r] * inv, acc_o[rb][i][2 * r + 1] * inv};
            } else {
              *reinterpret_cast<uint32_t*>(out + off + col) =
                  pack2<T>(acc_o[rb][i][2 * r] * inv, acc_o[rb][i][2 * r + 1] * inv);
            }
          }
        }
        if (lane % 4 == 0) (kSplitOut ? lse_acc : p.lse)[lse_index(b, h, qc.image, pos, H, G, L)] = lse;
      }
    }
}

// One CTA: query rows [m0, m0 + kBlockM) of image i of set b, head h. With s_j = q . k_j over the allowed keys j of
// the set (in key-tile order) and c = |scale| * log2(e):
//   m_t = max(m_{t-1}, c * max_j s_j)                     (running max, log2 units, per row)
//   P_j = exp2(c s_j - m_t),  l_t = l_{t-1} 2^(m_{t-1} - m_t) + sum_j P_j
//   O_t = O_{t-1} 2^(m_{t-1} - m_t) + P V_tile            (fp32 accumulators, P rounded to T for the MMA)
//   out = O / l,  lse = ln(2) m + ln(l)                    (natural log, as the reference saves it)
// Each warp owns kRB blocks of 16 consecutive rows (16 * kRB rows); every K/V fragment a warp loads from shared
// memory feeds the MMAs of all its row blocks, so two row blocks halve the ldmatrix traffic and the per-tile
// overhead per score (FlashAttention-2's 4 warps x 32 rows) at the price of twice the accumulator registers.
// A row's 4 owner lanes (a quad) share its max through two xor-shuffles. Row sums l: either one MMA per k16 step
// with an all-ones B (P . 1: every lane gets whole-row sums, kRowSumMma) or per-lane partial sums added across the
// quad once, at the end (the rescale factor is uniform over the quad).
// Lazy rescaling (FlashAttention-4): the running max m only moves when a tile's row max exceeds it by more than
// kLazyRescaleLog2, so P = 2^(c s - m) <= 2^kLazyRescaleLog2 (fine in fp32 accumulators and 16-bit P), and O, l
// are rescaled only when some row of the warp moved (a warp-uniform branch): after the first tiles most skip the
// 2 * kD / 8 FMULs and the exp2 of the correction per row block. O and l stay relative to the same m, so the result
// and lse are exact up to rounding.
// Pipeline (one K and one V buffer, as FlashAttention-2): V_t streams in while S = Q K_t^T is computed, K_{t+1}
// while softmax and O += P V_t run. (set_attn_fwd_pipe_kernel: the two-stage loop.)
// kSplit (a split forward, p.fwd_splits = S > 1): blockIdx.x = query tile * S + split, and the CTA walks only its
// split's run of the allowed key tiles (split_range over KeyWalk's order), ending in fwd_epilogue's float32 partial
// output; set_attn_fwd_combine_kernel merges the S runs. The one-split instance compiles as if kSplit did not exist.
// (The body is fwd_kernel_body, inlined: the kernel compiles it only for the archs the instance is built for.)
template <typename T, int kD, int kRB, bool kSplit>
__device__ __forceinline__ void fwd_kernel_body(const SetAttnParams& p) {
  using Tr = FwdTraits<T, kD, kRB>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads, kPitch = Tr::kPitch;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kPitch;
  T* sV = sK + kBlockN * kPitch;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t G = p.G, L = p.L;
  const int D = static_cast<int>(p.D);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m_tiles = ceil_div(L, kBlockM);
  const TileCoord qc =
      tile_coord(kSplit ? blockIdx.x / static_cast<unsigned>(p.fwd_splits) : blockIdx.x, m_tiles, kBlockM);

  const T* q_tile = static_cast<const T*>(p.q) + tensor_row(b, G, qc.image) * p.q_stride_n + h * D;
  const uint8_t* mask_row = p.set_mask != nullptr ? p.set_mask + qc.image * G : nullptr;
  // the allowed key tiles and where they lie (no divisions or 64-bit products inside an image), and this thread's
  // share of copying each (set_attention_tiles.cuh)
  KeyWalk<T, kBlockN> kw(p, b, h, mask_row);
  int todo = 0;  // kSplit: tiles of this split's run not yet visited
  if constexpr (kSplit) {
    const int split = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.fwd_splits));
    const SplitRange run = split_range(kw.allowed_tiles(), split, p.fwd_splits);
    kw.skip(static_cast<int>(run.first));
    todo = static_cast<int>(run.count);
  }
  auto walking = [&]() -> bool {
    if constexpr (kSplit) {
      return todo > 0;
    } else {
      return !kw.done();
    }
  };
  TileCopyPlan<kBlockN, kD / 8, kThreads, kPitch * static_cast<int>(sizeof(T))> tile_copy;
  tile_copy.init(tid, p.k_stride_l, p.v_stride_l, D);

  load_tile<T, kBlockM, kD, kThreads>(sQ, q_tile, p.q_stride_l, qc.row0, L, D, tid);
  // V_0 with Q and K_0: its buffer is free before the loop, and a short walk (an L 64 image, a split's run of one or
  // two tiles) then waits for one memory round trip before its first P V instead of two. It costs the loop a
  // first-trip test (sm_90a: 2 instructions a tile at d 80 and 160, 5-8 at d 48), so head dims <= 64, whose SD walks
  // are long (L 4096), keep the old order unless split.
  constexpr bool kEarlyV0 = kSplit || kD > 64;
  if (walking()) {
    tile_copy.copy(sK, kw.k, tile_copy.koff, kw.rows);
    if constexpr (kEarlyV0) tile_copy.copy(sV, kw.v, tile_copy.voff, kw.rows);
  }
  cp_async_commit();

  const float sl = fabsf(p.scale) * kLog2e;
  const uint32_t qsign = p.scale < 0.f ? kSignBits : 0u;

  // per-lane ldmatrix addresses (see the header comment); row block rb of this warp starts 16 * rb rows further
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
  const uint32_t sQ_a = smem_u32(sQ + (warp * 16 * kRB + a_row) * kPitch + a_col);
  const uint32_t sK_b = smem_u32(sK + b_row * kPitch + b_col);
  const uint32_t sV_a = smem_u32(sV + a_row * kPitch + a_col);

  typename Tr::OAcc acc_o;
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
    for (int i = 0; i < Tr::kDT; ++i) acc_o[rb][i][0] = acc_o[rb][i][1] = acc_o[rb][i][2] = acc_o[rb][i][3] = 0.f;
  typename Tr::RowMax row_max;
  typename Tr::RowSum row_sum;
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb) {
    row_max[rb][0] = row_max[rb][1] = -INFINITY;
    row_sum[rb][0] = row_sum[rb][1] = row_sum[rb][2] = row_sum[rb][3] = 0.f;
  }
  const uint32_t ones = pack2<T>(1.f, 1.f);
  // the last output n8 tile holds only padding when D <= kD - 8 (40 on the 48 instance, 72 on 80): skip its MMAs
  const bool last_n8_live = 8 * (Tr::kDT - 1) < D;
  typename Tr::QFrag q_frag;
  bool q_loaded = false;

  for (bool first = true; walking(); first = false) {
    cp_async_wait_all();  // K_t (and Q, and with kEarlyV0 V_0, on the first trip) landed
    __syncthreads();      // ... for every thread; and every warp is done with V_{t-1}
    if (!kEarlyV0 || !first) tile_copy.copy(sV, kw.v, tile_copy.voff, kw.rows);
    cp_async_commit();
    const int valid_keys = kw.rows;  // > 0; kBlockN except in an image's last tile

    if constexpr (Tr::kQInRegs) {
      if (!q_loaded) {
        fwd_load_q<Tr>(q_frag, sQ_a, qsign);
        q_loaded = true;
      }
    }

    typename Tr::Scores acc_s;
    fwd_scores<Tr>(acc_s, q_frag, sQ_a, sK_b, qsign);
    const bool tail = valid_keys < kBlockN;
    if (tail) fwd_mask_tail<Tr>(acc_s, valid_keys, lane, -INFINITY);

    typename Tr::RowMax m_prev;
    const bool moved = fwd_row_max<Tr>(acc_s, row_max, m_prev, sl);
    fwd_exp<Tr>(acc_s, row_max, sl);
    if (__any_sync(0xffffffffu, moved)) fwd_rescale<Tr>(row_max, m_prev, row_sum, acc_o);
    if (tail) fwd_mask_tail<Tr>(acc_s, valid_keys, lane, 0.f);
    fwd_row_sums<Tr>(acc_s, row_sum);

    cp_async_wait_all();  // V_t landed
    __syncthreads();      // ... for every thread; and every warp is done reading K_t
    kw.advance();
    if constexpr (kSplit) --todo;
    if (walking()) tile_copy.copy(sK, kw.k, tile_copy.koff, kw.rows);
    cp_async_commit();

    fwd_pv<Tr>(acc_o, row_sum, acc_s, sV_a, ones, last_n8_live);
  }
  cp_async_wait_all();  // a CTA that visited no key tile still has its Q copy in flight
  // (the split index again from blockIdx: one register less across the loop)
  fwd_epilogue<Tr, kSplit>(p, acc_o, row_max, row_sum, b, h, qc, warp, lane,
                           kSplit ? static_cast<int>(blockIdx.x % static_cast<unsigned>(p.fwd_splits)) : 0);
}

template <typename T, int kD, int kRB, bool kSplit = false>
__global__ void __launch_bounds__(FwdTraits<T, kD, kRB>::kThreads, FwdTraits<T, kD, kRB>::kMinBlocks)
    set_attn_fwd_kernel(const SetAttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (!fwd_instance_before_sm90(kD, kRB)) {
    __trap();  // an sm_90-only instance: run_fwd never launches it on older devices
  } else
#endif
  {
    fwd_kernel_body<T, kD, kRB, kSplit>(p);
  }
}

// The merge of a split forward's S partial results (p.fwd_splits > 1): for each token and head, with lse_s the
// splits' natural-log logsumexps and out_s their normalized outputs (float32, p.lse_accum / p.out_accum),
//   lse = m + ln(sum_s e^(lse_s - m)),  out = sum_s e^(lse_s - lse) out_s      (m = max_s lse_s)
// rounded once to T into p.out, lse into p.lse. A split that saw no key (lse_s = -inf) weighs 0.
// kRowLanes threads per (image n, position l, head h) row (row_grid): each computes the row's S weights itself and
// merges the row's 8-column chunks lane, lane + 8, ... (two 16-byte loads per split and chunk, one 16-byte store);
// lane 0 writes the lse. Index arithmetic in 32 bits (the launcher's row_grid_fits).
// (Until the twenty-sixth session one warp per row with 64-bit index divisions and 4-byte stores: ncu timed it at
// 24.7 µs on the H200 for d 80, L 1024, set size 1, 2 splits, compute-bound (61 % SM, 11 % memory throughput) for
// 13 MB, which made every automatic split lose.)
template <typename T>
__global__ void __launch_bounds__(kRowThreads) set_attn_fwd_combine_kernel(const SetAttnParams p) {
  const uint32_t sub = threadIdx.x % kRowLanes;
  const uint32_t lh = blockIdx.x * kRowsPerBlock + threadIdx.x / kRowLanes;  // l*H + h
  const uint32_t H = static_cast<uint32_t>(p.H), G = static_cast<uint32_t>(p.G), L = static_cast<uint32_t>(p.L);
  if (lh >= L * H) return;  // no shuffles below: a lane may leave on its own
  const uint32_t l = lh / H, h = lh - l * H;
  const int D = static_cast<int>(p.D), S = p.fwd_splits, chunks = D / 8;  // D is a multiple of 8
  const int64_t N = p.B * p.G;
  const int64_t lse_step = fwd_split_lse_elems(p.B, p.G, p.L, p.H, 1);
  const int64_t out_step = fwd_split_out_elems(p.B, p.G, p.L, p.H, D, 1) / 4;  // in float4
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const uint32_t b = static_cast<uint32_t>(n) / G;  // N <= INT32_MAX (the launcher's check)
    const int64_t li = lse_index(b, h, static_cast<uint32_t>(n) - b * G, l, p.H, p.G, p.L);
    float w[kMaxFwdSplits];
    float m = -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxFwdSplits; ++s) {
      w[s] = s < S ? p.lse_accum[s * lse_step + li] : -INFINITY;
      m = fmaxf(m, w[s]);
    }
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kMaxFwdSplits; ++s) {
      w[s] = m == -INFINITY || w[s] == -INFINITY ? 0.f : expf(w[s] - m);  // now the weights
      sum += w[s];
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t row = (n * L + l) * (p.H * D) + static_cast<int64_t>(h) * D;  // token (n, l), head h
    const float4* src = reinterpret_cast<const float4*>(p.out_accum + row);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + row);
    for (int c = static_cast<int>(sub); c < chunks; c += kRowLanes) {
      float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int s = 0; s < kMaxFwdSplits; ++s) {
        if (s < S && w[s] != 0.f) {
          const float4 x = src[s * out_step + 2 * c], y = src[s * out_step + 2 * c + 1];
          a[0] = fmaf(w[s], x.x, a[0]);
          a[1] = fmaf(w[s], x.y, a[1]);
          a[2] = fmaf(w[s], x.z, a[2]);
          a[3] = fmaf(w[s], x.w, a[3]);
          a[4] = fmaf(w[s], y.x, a[4]);
          a[5] = fmaf(w[s], y.y, a[5]);
          a[6] = fmaf(w[s], y.z, a[6]);
          a[7] = fmaf(w[s], y.w, a[7]);
        }
      }
      dst[c] = make_uint4(pack2<T>(a[0] * inv, a[1] * inv), pack2<T>(a[2] * inv, a[3] * inv),
                          pack2<T>(a[4] * inv, a[5] * inv), pack2<T>(a[6] * inv, a[7] * inv));
    }
    if (sub == 0) p.lse[li] = sum > 0.f ? m + logf(sum) : -INFINITY;
  }
}

// The two-stage forward (fwd_config(kD, kRB, 2); same math and results as set_attn_fwd_kernel). Iteration t holds
// the scores S_t of key tile t, computed one iteration earlier, and
//   1. waits for K_{t+1} and V_t, and (one barrier) for every warp to leave iteration t-1;
//   2. starts the copies of K_{t+2} and V_{t+1} into the buffers iteration t-1 was done with (K, V double-buffered);
//   3. takes S_t's row maxima and rescales O, l if a running max moved;
//   4. computes S_{t+1} = Q K_{t+1}^T and P_t = 2^(c S_t - m) in one branch-free stretch of code: the MMAs do not
//      depend on the exponentials, so ptxas interleaves them and the tensor pipe and the SFU run at the same time;
//   5. O += P_t V_t.
// After the last tile step 4 multiplies whatever the spare K buffer holds: those scores are never used. Two score
// tiles live in registers (S_{t+1} and P_t), so the loop is unrolled by two with the roles swapped instead of copying.
// The set-up before the loop repeats set_attn_fwd_kernel's on purpose: shared through a struct of coordinates and
// loaders, it made ptxas allocate the one-stage kernel differently, 310 -> 326 sm_90 instructions per 1024 scores of
// its steady loop (d 40, bf16), so each kernel keeps its own.
template <typename T, int kD, int kRB>
__global__ void __launch_bounds__(FwdTraits<T, kD, kRB, 2>::kThreads, FwdTraits<T, kD, kRB, 2>::kMinBlocks)
    set_attn_fwd_pipe_kernel(const SetAttnParams p) {
  using Tr = FwdTraits<T, kD, kRB, 2>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads, kPitch = Tr::kPitch;
  constexpr uint32_t kTileBytes = kBlockN * kPitch * sizeof(T);  // one K or V buffer

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kPitch;  // K buffers 0, 1
  T* sV = sK + 2 * kBlockN * kPitch;  // V buffers 0, 1

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t G = p.G, L = p.L;
  const int D = static_cast<int>(p.D);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m_tiles = ceil_div(L, kBlockM), n_tiles = ceil_div(L, kBlockN);
  const TileCoord qc = tile_coord(blockIdx.x, m_tiles, kBlockM);

  const T* q_tile = static_cast<const T*>(p.q) + tensor_row(b, G, qc.image) * p.q_stride_n + h * D;
  const T* k_head = static_cast<const T*>(p.k) + h * D;
  const T* v_head = static_cast<const T*>(p.v) + h * D;
  const uint8_t* mask_row = p.set_mask != nullptr ? p.set_mask + qc.image * G : nullptr;
  TileWalk kw = TileWalk::start(mask_row, 1, G, n_tiles);  // the tile whose scores the loop holds
  // copies of K_t (buffer t % 2) and V_t (buffer t % 2) of the walk's tiles, in walk order
  auto load_k = [&](const TileWalk& w, int buf) {
    load_tile<T, kBlockN, kD, kThreads>(sK + buf * kBlockN * kPitch,
                                        k_head + tensor_row(b, G, w.image) * p.k_stride_n, p.k_stride_l,
                                        w.tile * kBlockN, L, D, tid);
  };
  auto load_v = [&](const TileWalk& w, int buf) {
    load_tile<T, kBlockN, kD, kThreads>(sV + buf * kBlockN * kPitch,
                                        v_head + tensor_row(b, G, w.image) * p.v_stride_n, p.v_stride_l,
                                        w.tile * kBlockN, L, D, tid);
  };

  load_tile<T, kBlockM, kD, kThreads>(sQ, q_tile, p.q_stride_l, qc.row0, L, D, tid);
  if (!kw.done()) load_k(kw, 0);
  cp_async_commit();

  const float sl = fabsf(p.scale) * kLog2e;
  const uint32_t qsign = p.scale < 0.f ? kSignBits : 0u;

  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
  const uint32_t sQ_a = smem_u32(sQ + (warp * 16 * kRB + a_row) * kPitch + a_col);
  const uint32_t sK_b = smem_u32(sK + b_row * kPitch + b_col);  // buffer 1: + kTileBytes
  const uint32_t sV_a = smem_u32(sV + a_row * kPitch + a_col);

  typename Tr::OAcc acc_o;
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
    for (int i = 0; i < Tr::kDT; ++i) acc_o[rb][i][0] = acc_o[rb][i][1] = acc_o[rb][i][2] = acc_o[rb][i][3] = 0.f;
  typename Tr::RowMax row_max;
  typename Tr::RowSum row_sum;
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb) {
    row_max[rb][0] = row_max[rb][1] = -INFINITY;
    row_sum[rb][0] = row_sum[rb][1] = row_sum[rb][2] = row_sum[rb][3] = 0.f;
  }
  const uint32_t ones = pack2<T>(1.f, 1.f);
  const bool last_n8_live = 8 * (Tr::kDT - 1) < D;
  typename Tr::QFrag q_frag;

  if (!kw.done()) {
    // the walk's next two tiles (image, tile; image == G: past the end), advanced as a ring: one mask-aware step per
    // iteration instead of one per stream (K two tiles ahead, V one)
    TileWalk w1 = kw;
    w1.advance();
    TileWalk w2 = w1;
    if (!w2.done()) w2.advance();
    cp_async_wait_all();  // Q, K_0
    __syncthreads();
    load_v(kw, 0);
    if (!w1.done()) load_k(w1, 1);
    cp_async_commit();
    if constexpr (Tr::kQInRegs) fwd_load_q<Tr>(q_frag, sQ_a, qsign);

    typename Tr::Scores s_a, s_b;  // S_t of even / odd t
    fwd_scores<Tr>(s_a, q_frag, sQ_a, sK_b, qsign);
    if (L - kw.tile * kBlockN < kBlockN) fwd_mask_tail<Tr>(s_a, L - kw.tile * kBlockN, lane, -INFINITY);

    // one iteration (buffers of parity P = t % 2); true when tile t was the last
    auto step = [&](typename Tr::Scores& s_cur, typename Tr::Scores& s_next, auto parity) -> bool {
      constexpr int P = decltype(parity)::value;
      cp_async_wait_all();  // K_{t+1}, V_t landed
      __syncthreads();      // ... for every thread; and every warp is done with K_t and V_{t-1}
      if (!w2.done()) load_k(w2, P);      // K_{t+2} where K_t was
      if (!w1.done()) load_v(w1, 1 - P);  // V_{t+1} where V_{t-1} was
      cp_async_commit();

      typename Tr::RowMax m_prev;
      const bool moved = fwd_row_max<Tr>(s_cur, row_max, m_prev, sl);
      if (__any_sync(0xffffffffu, moved)) fwd_rescale<Tr>(row_max, m_prev, row_sum, acc_o);
      fwd_scores<Tr>(s_next, q_frag, sQ_a, sK_b + (1 - P) * kTileBytes, qsign);  // tensor cores: S_{t+1}
      fwd_exp<Tr>(s_cur, row_max, sl);                                             // SFU: P_t
      const int64_t valid_keys = L - kw.tile * kBlockN;
      if (valid_keys < kBlockN) fwd_mask_tail<Tr>(s_cur, valid_keys, lane, 0.f);
      fwd_row_sums<Tr>(s_cur, row_sum);
      fwd_pv<Tr>(acc_o, row_sum, s_cur, sV_a + P * kTileBytes, ones, last_n8_live);

      if (w1.done()) return true;
      kw.image = w1.image;
      kw.tile = w1.tile;
      w1.image = w2.image;
      w1.tile = w2.tile;
      if (!w2.done()) w2.advance();
      const int64_t next_valid = L - kw.tile * kBlockN;
      if (next_valid < kBlockN) fwd_mask_tail<Tr>(s_next, next_valid, lane, -INFINITY);
      return false;
    };
    while (!step(s_a, s_b, std::integral_constant<int, 0>{}) && !step(s_b, s_a, std::integral_constant<int, 1>{})) {
    }
  }
  cp_async_wait_all();  // a CTA that visited no key tile still has its Q copy in flight
  fwd_epilogue<Tr>(p, acc_o, row_max, row_sum, b, h, qc, warp, lane);
}

#if !defined(JEDI_SET_ATTN_EMULATE)  // the CPU emulation calls the kernels itself
// kernel(p) on grid g (x <= INT_MAX, y and z <= 65535; else cudaErrorInvalidValue, nothing launched) with `threads`
// threads and `smem` bytes of dynamic shared memory: more than 48 KB needs an explicit opt-in (per kernel; cheap, and
// legal during graph capture).
template <typename Kernel, typename P>
cudaError_t launch_on_grid(Kernel kernel, const Grid3& g, int threads, int smem, const P& p, cudaStream_t stream) {
  if (g.x > INT_MAX || g.y > 65535 || g.z > 65535) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z)), threads, smem,
           stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD, int kRB, int kStages>
cudaError_t run_fwd_instance(const SetAttnParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kRB, kStages>;
  auto kernel = [] {  // only the launched instance is compiled
    if constexpr (kStages == 2) {
      return set_attn_fwd_pipe_kernel<T, kD, kRB>;
    } else {
      return set_attn_fwd_kernel<T, kD, kRB>;
    }
  }();
  return launch_on_grid(kernel, fwd_grid(p.B, p.G, p.L, p.H, Tr::kBlockM), Tr::kThreads, Tr::kSmemBytes, p, stream);
}

// A split forward (p.fwd_splits = S > 1; fwd_has_splits(kD, kRB, 1)): S CTAs per query tile, then the merge.
template <typename T, int kD, int kRB>
cudaError_t run_fwd_split(const SetAttnParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kRB, 1>;
  const Grid3 g = fwd_grid(p.B, p.G, p.L, p.H, Tr::kBlockM);
  if (!row_grid_fits(p.B * p.G, p.L, p.H)) return cudaErrorInvalidValue;
  const RowGrid mg = row_grid(p.B * p.G, p.L, p.H);
  const cudaError_t e = launch_on_grid(set_attn_fwd_kernel<T, kD, kRB, true>, Grid3{g.x * p.fwd_splits, g.y, g.z},
                                       Tr::kThreads, Tr::kSmemBytes, p, stream);
  if (e != cudaSuccess) return e;
  set_attn_fwd_combine_kernel<T>
      <<<dim3(static_cast<unsigned>(mg.x), static_cast<unsigned>(mg.y)), kRowThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// A lazy per-device query of the runtime (occupancy, function attributes), cached per device: query() returns a
// value >= 0, or -1 when the runtime cannot tell (then `fallback`, not cached, and no error left behind). The first
// query may come while this thread captures a CUDA graph (a model captured without an eager call first): it runs in
// relaxed capture mode, which CUDA provides for such lazy queries, so that a strict capture cannot count it against
// the graph (these queries touch no stream). The previous mode is restored.
template <typename Query>
int cached_device_query(std::atomic<int> (&cache)[16], int fallback, Query query) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return fallback;
  if (dev >= 0 && dev < 16) {
    const int hit = cache[dev].load(std::memory_order_relaxed);  // value + 1 (0: not asked yet)
    if (hit > 0) return hit - 1;
  }
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  const bool relaxed = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
  const int value = query();
  if (relaxed) (void)cudaThreadExchangeStreamCaptureMode(&mode);
  if (value < 0) {
    (void)cudaGetLastError();  // not sticky; leave no error for the next launch check
    return fallback;
  }
  if (dev >= 0 && dev < 16) cache[dev].store(value + 1, std::memory_order_relaxed);
  return value;
}

// CTAs per SM of the split instance of head dim kD (the default row blocks, one stage) on the current device, 0 when
// the runtime cannot tell (set_attention_fwd_splits asks once per launch).
template <typename T, int kD>
int fwd_split_ctas_per_sm() {
  constexpr int kRB = fwd_default_row_blocks(kD);
  using Tr = FwdTraits<T, kD, kRB, 1>;
  static std::atomic<int> cache[16];
  return cached_device_query(cache, 0, [] {
    auto kernel = set_attn_fwd_kernel<T, kD, kRB, true>;
    int n = 0;
    const bool ok =
        (Tr::kSmemBytes <= 48 * 1024 ||
         cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes) == cudaSuccess) &&
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Tr::kThreads, Tr::kSmemBytes) == cudaSuccess;
    return ok ? n : -1;
  });
}

// Whether the one-stage instance <T, kD, kRB> that the current device would run has its body: instances that are not
// fwd_instance_before_sm90 trap when compiled for an older virtual arch, which is what the device gets on an older
// GPU, and also on a newer one that JIT-compiles a build's older PTX. So this asks the loaded function for the PTX
// version it came from (false when the runtime cannot tell).
template <typename T, int kD, int kRB>
bool fwd_body_on_device() {
  if constexpr (fwd_instance_before_sm90(kD, kRB)) {
    return true;
  } else {
    static std::atomic<int> cache[16];
    return cached_device_query(cache, 0, [] {
      cudaFuncAttributes attr{};
      if (cudaFuncGetAttributes(&attr, set_attn_fwd_kernel<T, kD, kRB>) != cudaSuccess) return -1;
      return attr.ptxVersion >= 90 ? 1 : 0;
    }) == 1;
  }
}

template <typename T, int kD, int kRB>
cudaError_t run_fwd_rb(const SetAttnParams& p, cudaStream_t stream) {
  const int stages = p.fwd_stages == 0 ? fwd_default_stages(kD) : p.fwd_stages;
  if constexpr (fwd_has_stages(kD, kRB, 2)) {
    if (stages == 2) return run_fwd_instance<T, kD, kRB, 2>(p, stream);
  }
  if (stages == 1) return run_fwd_instance<T, kD, kRB, 1>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T, int kD>
cudaError_t run_fwd(const SetAttnParams& p, cudaStream_t stream) {
  const int stages = p.fwd_stages == 0 ? fwd_default_stages(kD) : p.fwd_stages;
  const int rb = fwd_launch_row_blocks(kD, p.fwd_row_blocks, stages);
  if (p.fwd_splits > 1)  // (set_attention_fwd_launch checked that this instance has splits)
    return fwd_has_splits(kD, rb, stages) ? run_fwd_split<T, kD, fwd_default_row_blocks(kD)>(p, stream)
                                          : cudaErrorInvalidValue;
  if constexpr (fwd_has_row_blocks(kD, 2)) {
    if (rb == 2) {
      // an instance built for sm_90 on only (fwd_instance_before_sm90) runs with 16 rows per warp where the device
      // would get its empty body
      if (!fwd_body_on_device<T, kD, 2>()) return run_fwd_rb<T, kD, 1>(p, stream);
      return run_fwd_rb<T, kD, 2>(p, stream);
    }
  }
  if (rb == 1) return run_fwd_rb<T, kD, 1>(p, stream);
  return cudaErrorInvalidValue;
}
#endif

// =================================================================================================================
// Backward
// =================================================================================================================
template <typename T, int kD, int kKB, int kNW = 4>
struct BwdTraits {
  static constexpr BwdConfig kCfg = bwd_config(kD, kKB, kNW);
  static constexpr int kBlockN = kCfg.block_n;  // keys per CTA
  static constexpr int kBlockM = kCfg.block_m;  // queries per step
  static constexpr int kSubM = kCfg.sub_m;      // queries per register pass
  static constexpr int kWarps = kCfg.num_warps;
  static constexpr int kQS = kCfg.query_splits;       // warps per key block (1, or 2: the query-split CTA)
  static constexpr int kKeyWarps = kWarps / kQS;      // warps with keys of their own
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunk = kCfg.chunk;
  static constexpr int kChunks = kD / kChunk;
  static constexpr int kDqGroups = bwd_dq_groups(kD, kKB, kNW);
  static constexpr int kPitch = smem_pitch(kD);
  static constexpr int kPitchS = smem_pitch(kBlockM);
  static constexpr int kSmemBytes = static_cast<int>(bwd_smem_bytes(kD, sizeof(T), kKB, kNW));
  static_assert(kCfg.key_blocks == kKB && kCfg.num_warps == kNW && bwd_has_warps(kD, kKB, kNW),
                "a compiled key-block and warp count");
  static_assert(kD % 16 == 0 && kChunk % 16 == 0 && kD % kChunk == 0, "head-dim chunks");
  static_assert(kBlockN == 16 * kKB * kKeyWarps && kBlockM % (kSubM * kQS) == 0 && kSubM % 16 == 0, "tile shapes");
  static_assert(kQS == 1 || (kQS == 2 && kWarps % 2 == 0 && bwd_split_reduce_bytes(kCfg) <= kSmemBytes),
                "query splits");
  // keep this warp's K (and V) MMA fragments in registers across the query tiles instead of re-reading them from
  // shared memory every tile (the backward is bound by shared-memory bandwidth); head dims <= 48 only (at 64 the
  // instance spills), and V only with one key block (with two, V's 24 registers make ptxas spill)
  static constexpr bool kKInRegs = kD <= 48;
  static constexpr bool kVInRegs = kD <= 48 && kKB == 1;
  // lse and delta follow the 16-bit tiles in shared memory and are read as float2
  static_assert(((2 * kBlockN + 2 * kBlockM) * kPitch + kBlockN * kPitchS) * sizeof(T) % 8 == 0, "sLse alignment");
};

// One CTA: keys [n0, n0 + kBlockN) of image j of set b, head h, dK/dV columns [c0, c0 + kChunk). It walks the query
// tiles of every image allowed to attend image j and, with c = |scale| log2(e), lse2 = lse log2(e) and
// delta_i = sum_d dO_id O_id (precomputed):
//   P^T = exp2(c K Q^T - lse2)                (recomputed; 16 kKB keys x kSubM queries per warp and register pass)
//   dV += P^T dO
//   dP^T = V dO^T,   dS^T = P^T o (dP^T - delta)
//   dK += dS^T Q                              (times scale in the epilogue)
//   dQ += dS K                                (dS^T staged in shared memory; once per query tile, fp32 atomics into
//                                              dq_accum, times scale in the convert kernel)
// A warp's kKB key blocks share every Q and dO fragment it loads from shared memory.
// kWithDq = false: the split backward's first kernel (SetAttnBwdParams::bwd_split): dK and dV only (no dS^T staging,
// no dQ step; set_attn_bwd_dq_kernel computes dQ).
template <typename T, int kD, int kKB, int kNW = 4, bool kWithDq = true>
__global__ void __launch_bounds__(BwdTraits<T, kD, kKB, kNW>::kThreads, 1)
    set_attn_bwd_kernel(const SetAttnBwdParams p) {
  using Tr = BwdTraits<T, kD, kKB, kNW>;
  // K's fragments in registers (Tr::kKInRegs), except in the split backward's dK/dV kernel with two key blocks: there,
  // without the dQ step, sm_80 ptxas spilled 12 bytes (the instance SD's d 40 runs)
  constexpr bool kKRegs = Tr::kKInRegs && (kWithDq || kKB == 1);
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads, kWarps = Tr::kWarps;
  constexpr int kPitch = Tr::kPitch, kPitchS = Tr::kPitchS, kChunk = Tr::kChunk, kSubM = Tr::kSubM;
  constexpr int kMT = kSubM / 8;   // n8 tiles over the queries of one pass of S^T / dP^T
  constexpr int kCT = kChunk / 8;  // n8 tiles over the chunk columns of dK / dV
  constexpr int kKS = kD / 16;
  constexpr uint32_t kKeyBlockBytes = 16 * kPitch * sizeof(T);  // between a warp's key blocks in sK / sV

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kPitch;
  T* sQ = sV + kBlockN * kPitch;
  T* sdO = sQ + kBlockM * kPitch;
  T* sdS = sdO + kBlockM * kPitch;  // dS^T: [key][query]
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * kPitchS);
  float* sDelta = sLse + kBlockM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // the warp's keys (kw) and, in a query-split CTA, which register passes of each query tile it takes (qs); the
  // other instances keep their code exactly (warp, 0: compile-time)
  const int kw = Tr::kQS == 1 ? warp : warp % Tr::kKeyWarps, qs = Tr::kQS == 1 ? 0 : warp / Tr::kKeyWarps;
  const int64_t G = p.G, L = p.L, H = p.H;
  const int D = static_cast<int>(p.D);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t n_tiles = ceil_div(L, kBlockN), m_tiles = ceil_div(L, kBlockM);
  const int c0 = static_cast<int>(blockIdx.x % Tr::kChunks) * kChunk;
  const TileCoord kc = tile_coord(blockIdx.x / Tr::kChunks, n_tiles, kBlockN);

  const T* q_head = static_cast<const T*>(p.q) + h * D;
  const T* do_head = static_cast<const T*>(p.dout) + h * D;
  // the mask COLUMN of the key image: query images allowed to attend it
  const uint8_t* mask_col = p.set_mask != nullptr ? p.set_mask + kc.image : nullptr;
  TileWalk qw = TileWalk::start(mask_col, G, G, m_tiles);  // the allowed query tiles, no divisions in the loop

  load_tile<T, kBlockN, kD, kThreads>(
      sK, static_cast<const T*>(p.k) + tensor_row(b, G, kc.image) * p.k_stride_n + h * D, p.k_stride_l, kc.row0, L,
      D, tid);
  load_tile<T, kBlockN, kD, kThreads>(
      sV, static_cast<const T*>(p.v) + tensor_row(b, G, kc.image) * p.v_stride_n + h * D, p.v_stride_l, kc.row0, L,
      D, tid);

  // Q, dO, lse (log2 units; +inf = no probability) and delta of the query tile qw stands at, all by cp.async (the
  // preprocess kernel wrote lse2 after delta). Rows past L are zero-filled: their Q and dO rows are zero, so s = 0,
  // P = 2^0 = 1 and dP = delta = 0, hence dS = 0; they add nothing to dK, dV (and dQ skips them).
  const float* lse2_bh = p.delta + p.B * H * G * L + lse_index(b, h, 0, 0, H, G, L);
  const float* delta_bh = p.delta + lse_index(b, h, 0, 0, H, G, L);
  auto load_query_tile = [&](const TileWalk& w) {
    const TileCoord qc{w.image, w.tile * kBlockM};
    const int64_t row = tensor_row(b, G, qc.image);
    load_tile<T, kBlockM, kD, kThreads>(sQ, q_head + row * p.q_stride_n, p.q_stride_l, qc.row0, L, D, tid);
    load_tile<T, kBlockM, kD, kThreads>(sdO, do_head + row * p.do_stride_n, p.do_stride_l, qc.row0, L, D, tid);
    const int64_t first = qc.image * L + qc.row0;  // the tile's first row in (G*L) of (set, head)
    for (int i = tid; i < 2 * kBlockM; i += kThreads) {  // sLse and sDelta are adjacent: one index over both
      const int r = i < kBlockM ? i : i - kBlockM;
      cp_async4_zfill(sLse + i, (i < kBlockM ? lse2_bh : delta_bh) + first + r, qc.row0 + r < L);
    }
  };
  if (!qw.done()) load_query_tile(qw);
  cp_async_commit();

  const float sl = fabsf(p.scale) * kLog2e;
  const uint32_t ksign = p.scale < 0.f ? kSignBits : 0u;

  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
  // A: this warp's first key block (block kb at + kb * kKeyBlockBytes)
  const uint32_t sK_a = smem_u32(sK + (kw * 16 * kKB + a_row) * kPitch + a_col);
  const uint32_t sV_a = smem_u32(sV + (kw * 16 * kKB + a_row) * kPitch + a_col);
  const uint32_t sQ_b = smem_u32(sQ + b_row * kPitch + b_col);     // B [n = query][k = d]
  const uint32_t sdO_b = smem_u32(sdO + b_row * kPitch + b_col);
  const uint32_t sQ_t = smem_u32(sQ + a_row * kPitch + a_col + c0);  // B^T [k = query][n = d], chunk columns
  const uint32_t sdO_t = smem_u32(sdO + a_row * kPitch + a_col + c0);
  const uint32_t sK_t = smem_u32(sK + a_row * kPitch + a_col + c0);  // B^T [k = key][n = d], chunk columns
  const uint32_t sdS_t = smem_u32(sdS + b_row * kPitchS + b_col);    // A^T of dS from dS^T [key][query]

  int key_local[kKB][2];
  bool key_ok[kKB][2];
#pragma unroll
  for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      key_local[kb][r] = (kw * kKB + kb) * 16 + lane / 4 + 8 * r;
      key_ok[kb][r] = kc.row0 + key_local[kb][r] < L;
    }
  const bool warp_keys_full = kc.row0 + (kw + 1) * 16 * kKB <= L;  // warp-uniform: no key of this warp is past L
  // the chunk's last dK/dV n8 tile holds only padding when c0 + 8 (kCT - 1) >= D (D 40 on the 48 instance): skip
  // its MMAs (not in the dQ loop: the predicate there costs more issue slots than the MMAs cost tensor time)
  const bool last_ct_live = c0 + 8 * (kCT - 1) < D;

  float acc_dk[kKB][kCT][4], acc_dv[kKB][kCT][4];
#pragma unroll
  for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
    for (int i = 0; i < kCT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[kb][i][e] = acc_dv[kb][i][e] = 0.f;

  float* dq_accum = p.dq_accum;
  const int64_t HD = H * D;
  uint32_t k_frag[kKRegs ? kKB : 1][kKRegs ? kKS : 1][4];
  uint32_t v_frag[Tr::kVInRegs ? kKB : 1][Tr::kVInRegs ? kKS : 1][4];
  bool kv_loaded = false;

  while (!qw.done()) {
    const TileCoord qc{qw.image, qw.tile * kBlockM};
    const int64_t valid_q = L - qc.row0;
    cp_async_wait_all();
    __syncthreads();  // Q, dO, lse, delta of tile t visible; every warp done with the previous dS^T and dQ step

    if constexpr (kKRegs || Tr::kVInRegs) {
      if (!kv_loaded) {  // K and V landed with the first query tile
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int ks = 0; ks < kKS; ++ks) {
            if constexpr (kKRegs) {
              ldsm_x4(k_frag[kb][ks], sK_a + kb * kKeyBlockBytes + ks * 16 * sizeof(T));
#pragma unroll
              for (int i = 0; i < 4; ++i) k_frag[kb][ks][i] ^= ksign;
            }
            if constexpr (Tr::kVInRegs) ldsm_x4(v_frag[kb][ks], sV_a + kb * kKeyBlockBytes + ks * 16 * sizeof(T));
          }
        kv_loaded = true;
      }
    }

    // register passes over the tile's queries [q0, q0 + kSubM) (a query-split CTA's warps take every kQS-th)
#pragma unroll 1
    for (int q0 = qs * kSubM; q0 < kBlockM; q0 += kSubM * Tr::kQS) {
      // S^T = K Q^T
      float acc_s[kKB][kMT][4];
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
        for (int j = 0; j < kMT; ++j) acc_s[kb][j][0] = acc_s[kb][j][1] = acc_s[kb][j][2] = acc_s[kb][j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKS; ++ks) {
        uint32_t a[kKB][4];
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          if constexpr (kKRegs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[kb][i] = k_frag[kb][ks][i];
          } else {
            ldsm_x4(a[kb], sK_a + kb * kKeyBlockBytes + ks * 16 * sizeof(T));
#pragma unroll
            for (int i = 0; i < 4; ++i) a[kb][i] ^= ksign;
          }
        }
#pragma unroll
        for (int j = 0; j < kMT / 2; ++j) {
          uint32_t bq[4];
          ldsm_x4(bq, sQ_b + ((q0 + j * 16) * kPitch + ks * 16) * sizeof(T));
#pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma16816<T>(acc_s[kb][2 * j], a[kb], bq[0], bq[1]);
            mma16816<T>(acc_s[kb][2 * j + 1], a[kb], bq[2], bq[3]);
          }
        }
      }
      // P^T. Queries past L have lse2 = +inf (P = 0 exactly: their Q rows are zero-filled, so s = 0, never NaN);
      // keys past L (zero-filled K rows: s = 0, P > 0) are zeroed, only in a warp that has such keys.
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        const float2 lse2 = *reinterpret_cast<const float2*>(sLse + q0 + j * 8 + (lane % 4) * 2);
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_s[kb][j][e] = fast_exp2(fmaf(acc_s[kb][j][e], sl, -(e % 2 ? lse2.y : lse2.x)));
      }
      if (!warp_keys_full) {
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int j = 0; j < kMT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (!key_ok[kb][e / 2]) acc_s[kb][j][e] = 0.f;
      }

      // dV += P^T dO
#pragma unroll
      for (int kk = 0; kk < kSubM / 16; ++kk) {
        uint32_t a[kKB][4];
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          c_to_a<T>(a[kb], acc_s[kb][2 * kk], acc_s[kb][2 * kk + 1]);
        }
#pragma unroll
        for (int d2 = 0; d2 < kChunk / 16; ++d2) {
          uint32_t bo[4];
          ldsm_x4_trans(bo, sdO_t + ((q0 + kk * 16) * kPitch + d2 * 16) * sizeof(T));
#pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma16816<T>(acc_dv[kb][2 * d2], a[kb], bo[0], bo[1]);
            if (2 * d2 + 1 < kCT - 1 || last_ct_live) mma16816<T>(acc_dv[kb][2 * d2 + 1], a[kb], bo[2], bo[3]);
          }
        }
      }

      // dP^T = V dO^T
      float acc_dp[kKB][kMT][4];
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
        for (int j = 0; j < kMT; ++j)
          acc_dp[kb][j][0] = acc_dp[kb][j][1] = acc_dp[kb][j][2] = acc_dp[kb][j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKS; ++ks) {
        uint32_t a[kKB][4];
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          if constexpr (Tr::kVInRegs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[kb][i] = v_frag[kb][ks][i];
          } else {
            ldsm_x4(a[kb], sV_a + kb * kKeyBlockBytes + ks * 16 * sizeof(T));
          }
        }
#pragma unroll
        for (int j = 0; j < kMT / 2; ++j) {
          uint32_t bo[4];
          ldsm_x4(bo, sdO_b + ((q0 + j * 16) * kPitch + ks * 16) * sizeof(T));
#pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma16816<T>(acc_dp[kb][2 * j], a[kb], bo[0], bo[1]);
            mma16816<T>(acc_dp[kb][2 * j + 1], a[kb], bo[2], bo[3]);
          }
        }
      }
      // dS^T = P^T o (dP^T - delta)
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        const float2 dlt = *reinterpret_cast<const float2*>(sDelta + q0 + j * 8 + (lane % 4) * 2);
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_dp[kb][j][e] = acc_s[kb][j][e] * (acc_dp[kb][j][e] - (e % 2 ? dlt.y : dlt.x));
      }

      // dK += dS^T Q, and stage dS^T (rounded to T, as the MMA sees it) for dQ
#pragma unroll
      for (int kk = 0; kk < kSubM / 16; ++kk) {
        uint32_t a[kKB][4];
        // rows key_local[kb][0] (a0: queries q0 + 16kk + 2c.., a2: + 8) and key_local[kb][1] (a1, a3)
        const int qcol = q0 + kk * 16 + (lane % 4) * 2;
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          c_to_a<T>(a[kb], acc_dp[kb][2 * kk], acc_dp[kb][2 * kk + 1]);
          if constexpr (kWithDq) {
            *reinterpret_cast<uint32_t*>(sdS + key_local[kb][0] * kPitchS + qcol) = a[kb][0];
            *reinterpret_cast<uint32_t*>(sdS + key_local[kb][1] * kPitchS + qcol) = a[kb][1];
            *reinterpret_cast<uint32_t*>(sdS + key_local[kb][0] * kPitchS + qcol + 8) = a[kb][2];
            *reinterpret_cast<uint32_t*>(sdS + key_local[kb][1] * kPitchS + qcol + 8) = a[kb][3];
          }
        }
#pragma unroll
        for (int d2 = 0; d2 < kChunk / 16; ++d2) {
          uint32_t bq[4];
          ldsm_x4_trans(bq, sQ_t + ((q0 + kk * 16) * kPitch + d2 * 16) * sizeof(T));
#pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma16816<T>(acc_dk[kb][2 * d2], a[kb], bq[0], bq[1]);
            if (2 * d2 + 1 < kCT - 1 || last_ct_live) mma16816<T>(acc_dk[kb][2 * d2 + 1], a[kb], bq[2], bq[3]);
          }
        }
      }
    }
    __syncthreads();  // dS^T complete; every warp done with Q, dO, lse, delta of tile t

    qw.advance();
    if (!qw.done()) load_query_tile(qw);  // overlaps the dQ step below
    cp_async_commit();
    if constexpr (kWithDq) {  // (the split backward's dK/dV kernel has no dQ step)
    // dQ[tile t] += dS K over this CTA's keys, chunk columns, in units of (16-query slab, kDqG 16-column groups)
    // over the warps: a unit loads its slab's dS fragment once per 16 keys for all of its groups
    constexpr int kDqG = Tr::kDqGroups, kSpans = kChunk / 16 / kDqG, kUnits = (kBlockM / 16) * kSpans;
    // this lane's query row (slab 0, r = 0) of the tile; 32-bit row bound (valid queries of the tile <= kBlockM)
    float* const dq_lane = dq_accum + (tensor_row(b, G, qc.image) * L + qc.row0 + lane / 4) * HD + h * D + c0 +
                           (lane % 4) * 2;
    const int q_end = static_cast<int>(valid_q < kBlockM ? valid_q : kBlockM) - lane / 4;  // slab*16 + 8r < q_end
    const int col_end = D - c0 - (lane % 4) * 2;  // grp*16 + 8n < col_end
#pragma unroll 1
    for (int u = warp; u < kUnits; u += kWarps) {
      const int slab = u / kSpans, grp0 = (u % kSpans) * kDqG;
      float acc[kDqG][2][4];
#pragma unroll
      for (int g = 0; g < kDqG; ++g)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[g][0][e] = acc[g][1][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_trans(a, sdS_t + (kk * 16 * kPitchS + slab * 16) * sizeof(T));
#pragma unroll
        for (int g = 0; g < kDqG; ++g) {
          uint32_t bk[4];
          ldsm_x4_trans(bk, sK_t + (kk * 16 * kPitch + (grp0 + g) * 16) * sizeof(T));
          mma16816<T>(acc[g][0], a, bk[0], bk[1]);
          mma16816<T>(acc[g][1], a, bk[2], bk[3]);
        }
      }
      float* const dst0 = dq_lane + slab * 16 * HD + grp0 * 16;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (slab * 16 + 8 * r < q_end) {
          float* const dst = dst0 + 8 * r * HD;
#pragma unroll
          for (int g = 0; g < kDqG; ++g)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              if ((grp0 + g) * 16 + n * 8 < col_end) {
                atomicAdd(dst + g * 16 + n * 8, acc[g][n][2 * r]);
                atomicAdd(dst + g * 16 + n * 8 + 1, acc[g][n][2 * r + 1]);
              }
            }
        }
      }
    }
    }  // kWithDq
  }
  cp_async_wait_all();  // a CTA that visited no query tile still has its K/V copies in flight

  if constexpr (Tr::kQS == 2) {
    // the query-split CTA: the second half's warps hand their dK, then dV sums to the warps with the same keys,
    // through the shared memory the tiles are done with (each lane's accumulators in one float4 column per n8 tile)
    float4* red = reinterpret_cast<float4*>(smem_raw);
    constexpr int kVecs = kKB * kCT;  // float4 per lane
    const int slot = kw * 32 + lane;  // this lane's column in red, per key-owning warp
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      float(&acc)[kKB][kCT][4] = which == 0 ? acc_dk : acc_dv;
      __syncthreads();  // every warp done with the tiles (which == 0) or with the dK reduction (which == 1)
      if (qs == 1) {
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int i = 0; i < kCT; ++i)
            red[(kb * kCT + i) * (Tr::kKeyWarps * 32) + slot] =
                make_float4(acc[kb][i][0], acc[kb][i][1], acc[kb][i][2], acc[kb][i][3]);
      }
      __syncthreads();
      if (qs == 0) {
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
          for (int i = 0; i < kCT; ++i) {
            const float4 o = red[(kb * kCT + i) * (Tr::kKeyWarps * 32) + slot];
            acc[kb][i][0] += o.x;
            acc[kb][i][1] += o.y;
            acc[kb][i][2] += o.z;
            acc[kb][i][3] += o.w;
          }
      }
      static_assert(kVecs * Tr::kKeyWarps * 32 * 16 == bwd_split_reduce_bytes(Tr::kCfg), "reduction buffer");
    }
    if (qs != 0) return;  // the first half writes the sums
  }

  // epilogue: dK (times scale), dV for keys < L, chunk columns < D
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
#pragma unroll
  for (int kb = 0; kb < kKB; ++kb)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!key_ok[kb][r]) continue;
      const int64_t off = (tensor_row(b, G, kc.image) * L + kc.row0 + key_local[kb][r]) * HD + h * D;
#pragma unroll
      for (int i = 0; i < kCT; ++i) {
        const int col = c0 + i * 8 + (lane % 4) * 2;
        if (col < D) {
          *reinterpret_cast<uint32_t*>(dk + off + col) =
              pack2<T>(acc_dk[kb][i][2 * r] * p.scale, acc_dk[kb][i][2 * r + 1] * p.scale);
          *reinterpret_cast<uint32_t*>(dv + off + col) = pack2<T>(acc_dv[kb][i][2 * r], acc_dv[kb][i][2 * r + 1]);
        }
      }
    }
}

// ---- the split backward's dQ kernel (SetAttnBwdParams::bwd_split; set_attn::DqConfig) -------------------------------
// Shapes in the form the forward's building blocks take (fwd_scores, fwd_mask_tail): one m16 row block per warp,
// Q's (and dO's) fragments in registers or re-read from shared memory per key tile.
template <typename T, int kD>
struct DqTraits {
  using Elem = T;
  static constexpr DqConfig kCfg = bwd_dq_config(kD);
  static constexpr int kBlockM = kCfg.block_m;
  static constexpr int kBlockN = kCfg.block_n;
  static constexpr int kWarps = kCfg.num_warps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowBlocks = 1;
  static constexpr bool kQInRegs = kCfg.frags_in_regs;
  static constexpr int kPitch = smem_pitch(kD);
  static constexpr int kSmemBytes = static_cast<int>(bwd_dq_smem_bytes(kD, sizeof(T)));
  static constexpr int kNT = kBlockN / 8;  // score n8 tiles per warp
  static constexpr int kDT = kD / 8;       // dQ n8 tiles
  static constexpr int kKS = kD / 16;      // k16 steps of Q K^T and dO V^T
  static constexpr uint32_t kRowBlockBytes = 16 * kPitch * sizeof(T);
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0 && kBlockM == 16 * kWarps, "tile shapes");

  using Scores = float[1][kNT][4];  // a warp's 16 x kBlockN scores (S, then P; dP, then dS)
  using QFrag = uint32_t[1][kQInRegs ? kKS : 1][4];
};

// One CTA: dQ of query rows [m0, m0 + kBlockM) of image i of set b, head h. With c = |scale| log2(e), lse2 = lse
// log2(e) and delta (the preprocess kernel's, as for the main kernel), over the allowed key tiles of the query image
// (the forward's walk, K and V double-buffered: tile t + 1 streams in while tile t is worked on):
//   P = exp2(c Q K^T - lse2),  dP = dO V^T,  dS = P o (dP - delta),  dQ += dS K
// dQ = scale dQ is written once, in T. A negative scale flips Q's fragments (S then carries sign(scale), as in the
// forward); K in shared memory is the true K for dS K. Queries past L: zero-filled Q and dO rows and lse2 = +inf, so
// P = 0 and dS = 0 (never written out); keys past L (an image's last tile): P is set to 0 (their K rows are zero
// too, but 2^(0 - lse2) may overflow when lse is very negative).
template <typename T, int kD>
__global__ void __launch_bounds__(DqTraits<T, kD>::kThreads, 1) set_attn_bwd_dq_kernel(const SetAttnBwdParams p) {
  using Tr = DqTraits<T, kD>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads, kPitch = Tr::kPitch;
  constexpr int kNT = Tr::kNT, kDT = Tr::kDT;
  constexpr uint32_t kStageBytes = kBlockN * kPitch * sizeof(T);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kPitch;
  T* sK = sdO + kBlockM * kPitch;  // stage s at + s * kBlockN * kPitch
  T* sV = sK + 2 * kBlockN * kPitch;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t G = p.G, L = p.L, H = p.H;
  const int D = static_cast<int>(p.D);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const TileCoord qc = tile_coord(blockIdx.x, ceil_div(L, kBlockM), kBlockM);
  const int64_t row = tensor_row(b, G, qc.image);

  const uint8_t* mask_row = p.set_mask != nullptr ? p.set_mask + qc.image * G : nullptr;
  KeyWalk<T, kBlockN> kw(p, b, h, mask_row);
  TileCopyPlan<kBlockN, kD / 8, kThreads, kPitch * static_cast<int>(sizeof(T))> tile_copy;
  tile_copy.init(tid, p.k_stride_l, p.v_stride_l, D);

  load_tile<T, kBlockM, kD, kThreads>(sQ, static_cast<const T*>(p.q) + row * p.q_stride_n + h * D, p.q_stride_l,
                                      qc.row0, L, D, tid);
  load_tile<T, kBlockM, kD, kThreads>(sdO, static_cast<const T*>(p.dout) + row * p.do_stride_n + h * D,
                                      p.do_stride_l, qc.row0, L, D, tid);
  if (!kw.done()) {
    tile_copy.copy(sK, kw.k, tile_copy.koff, kw.rows);
    tile_copy.copy(sV, kw.v, tile_copy.voff, kw.rows);
  }
  cp_async_commit();

  // this lane's two rows (g, g + 8 of the warp's 16): lse2 (+inf past L: P = 0) and delta
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t pos = qc.row0 + warp * 16 + lane / 4 + 8 * r;
    const int64_t i = lse_index(b, h, qc.image, pos < L ? pos : 0, H, G, L);
    lse2[r] = pos < L ? p.delta[p.B * H * G * L + i] : INFINITY;
    dlt[r] = pos < L ? p.delta[i] : 0.f;
  }

  const float sl = fabsf(p.scale) * kLog2e;
  const uint32_t qsign = p.scale < 0.f ? kSignBits : 0u;
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_col = 8 * (lane / 16);
  const int b_row = (lane % 8) + 8 * (lane / 16), b_col = 8 * ((lane / 8) % 2);
  const uint32_t sQ_a = smem_u32(sQ + (warp * 16 + a_row) * kPitch + a_col);
  const uint32_t sdO_a = smem_u32(sdO + (warp * 16 + a_row) * kPitch + a_col);
  const uint32_t sK_b = smem_u32(sK + b_row * kPitch + b_col);  // B [n = key][k = d] of Q K^T (stage 0)
  const uint32_t sV_b = smem_u32(sV + b_row * kPitch + b_col);  // ... of dO V^T
  const uint32_t sK_t = smem_u32(sK + a_row * kPitch + a_col);  // B^T [k = key][n = d] of dS K
  // the last dQ n8 tile holds only padding when D <= kD - 8 (40 on the 48 instance): skip its MMAs
  const bool last_n8_live = 8 * (kDT - 1) < D;

  float acc_dq[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;
  typename Tr::QFrag q_frag, do_frag;
  bool frags_loaded = false;

  int stage = 0;
  bool have = !kw.done();
  while (have) {
    const int valid_keys = kw.rows;  // > 0; kBlockN except in an image's last tile
    cp_async_wait_all();  // tile t (and Q, dO on the first trip) landed
    __syncthreads();      // ... for every thread; and every warp is done with the other stage (tile t - 1)
    kw.advance();
    have = !kw.done();
    if (have) {
      tile_copy.copy(reinterpret_cast<unsigned char*>(sK) + (stage ^ 1) * kStageBytes, kw.k, tile_copy.koff,
                     kw.rows);
      tile_copy.copy(reinterpret_cast<unsigned char*>(sV) + (stage ^ 1) * kStageBytes, kw.v, tile_copy.voff,
                     kw.rows);
    }
    cp_async_commit();
    if constexpr (Tr::kQInRegs) {
      if (!frags_loaded) {
        fwd_load_q<Tr>(q_frag, sQ_a, qsign);
        fwd_load_q<Tr>(do_frag, sdO_a, 0u);
        frags_loaded = true;
      }
    }
    const uint32_t so = stage * kStageBytes;

    typename Tr::Scores acc_s, acc_dp;
    fwd_scores<Tr>(acc_s, q_frag, sQ_a, sK_b + so, qsign);     // S = Q K^T (times sign(scale))
    fwd_scores<Tr>(acc_dp, do_frag, sdO_a, sV_b + so, 0u);     // dP = dO V^T
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)  // rows g (e < 2) and g + 8
        acc_s[0][j][e] = fast_exp2(fmaf(acc_s[0][j][e], sl, -lse2[e / 2]));
    if (valid_keys < kBlockN) fwd_mask_tail<Tr>(acc_s, valid_keys, lane, 0.f);
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[0][j][e] = acc_s[0][j][e] * (acc_dp[0][j][e] - dlt[e / 2]);

    // dQ += dS K: dS's accumulator layout is the A fragment layout (two n8 tiles per k16 step), K's rows the k dim
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, acc_dp[0][2 * kk], acc_dp[0][2 * kk + 1]);
#pragma unroll
      for (int d2 = 0; d2 < kDT / 2; ++d2) {
        uint32_t bk[4];
        ldsm_x4_trans(bk, sK_t + so + (kk * 16 * kPitch + d2 * 16) * sizeof(T));
        mma16816<T>(acc_dq[2 * d2], a, bk[0], bk[1]);
        if (2 * d2 + 1 < kDT - 1 || last_n8_live) mma16816<T>(acc_dq[2 * d2 + 1], a, bk[2], bk[3]);
      }
    }
    stage ^= 1;
  }
  cp_async_wait_all();  // a CTA that visited no key tile still has its Q and dO copies in flight

  T* dq = static_cast<T*>(p.dq);
  const int64_t HD = H * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t pos = qc.row0 + warp * 16 + lane / 4 + 8 * r;
    if (pos >= L) continue;
    T* const dst = dq + (row * L + pos) * HD + h * D;
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      const int col = i * 8 + (lane % 4) * 2;
      if (col < D)
        *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(acc_dq[i][2 * r] * p.scale, acc_dq[i][2 * r + 1] * p.scale);
    }
  }
}

#if !defined(JEDI_SET_ATTN_EMULATE)  // the CPU emulation calls the kernels itself
template <typename T, int kD, int kKB, int kNW = 4, bool kWithDq = true>
cudaError_t run_bwd_kb(const SetAttnBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<T, kD, kKB, kNW>;
  return launch_on_grid(set_attn_bwd_kernel<T, kD, kKB, kNW, kWithDq>,
                        bwd_grid(p.B, p.G, p.L, p.H, Tr::kBlockN, Tr::kChunks), Tr::kThreads, Tr::kSmemBytes, p,
                        stream);
}

// The main kernel of the instance p asks for (key blocks, warps), with or without its dQ step.
template <typename T, int kD, bool kWithDq>
cudaError_t run_bwd_main(const SetAttnBwdParams& p, cudaStream_t stream) {
  const int kb = p.bwd_key_blocks == 0 ? bwd_default_key_blocks(kD) : p.bwd_key_blocks;
  const int warps = p.bwd_warps == 0 ? bwd_default_warps(kD) : p.bwd_warps;
  if constexpr (bwd_has_warps(kD, 1, 8)) {
    if (kb == 1 && warps == 8) return run_bwd_kb<T, kD, 1, 8, kWithDq>(p, stream);
  }
  if (warps != 4) return cudaErrorInvalidValue;
  if (kb == 1) return run_bwd_kb<T, kD, 1, 4, kWithDq>(p, stream);
  if constexpr (bwd_has_key_blocks(kD, 2)) {
    if (kb == 2) return run_bwd_kb<T, kD, 2, 4, kWithDq>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// The split backward's dQ kernel: one CTA per query tile (the forward's grid).
template <typename T, int kD>
cudaError_t run_bwd_dq(const SetAttnBwdParams& p, cudaStream_t stream) {
  using Tr = DqTraits<T, kD>;
  return launch_on_grid(set_attn_bwd_dq_kernel<T, kD>, fwd_grid(p.B, p.G, p.L, p.H, Tr::kBlockM), Tr::kThreads,
                        Tr::kSmemBytes, p, stream);
}

// The backward's tensor-core kernels (the preprocess and dQ conversion kernels are the launcher's): fused, or split
// into the dK/dV kernel and the dQ kernel (p.bwd_split).
template <typename T, int kD>
cudaError_t run_bwd(const SetAttnBwdParams& p, cudaStream_t stream) {
  if (p.bwd_split == 0) return run_bwd_main<T, kD, true>(p, stream);
  const cudaError_t e = run_bwd_main<T, kD, false>(p, stream);
  return e != cudaSuccess ? e : run_bwd_dq<T, kD>(p, stream);
}
#endif

}  // namespace set_attn
}  // namespace jedi

// Explicit instantiation of both dtypes of one head-dim instance (used by the *_hdim*.cu / *_generic.cu files).
#define JEDI_SET_ATTN_INSTANTIATE_FWD(KD)                                                                     \
  template cudaError_t jedi::set_attn::run_fwd<__half, KD>(const jedi::SetAttnParams&, cudaStream_t);        \
  template cudaError_t jedi::set_attn::run_fwd<__nv_bfloat16, KD>(const jedi::SetAttnParams&, cudaStream_t); \
  template int jedi::set_attn::fwd_split_ctas_per_sm<__half, KD>();                                           \
  template int jedi::set_attn::fwd_split_ctas_per_sm<__nv_bfloat16, KD>();
#define JEDI_SET_ATTN_INSTANTIATE_BWD(KD)                                                                     \
  template cudaError_t jedi::set_attn::run_bwd<__half, KD>(const jedi::SetAttnBwdParams&, cudaStream_t);     \
  template cudaError_t jedi::set_attn::run_bwd<__nv_bfloat16, KD>(const jedi::SetAttnBwdParams&, cudaStream_t);
