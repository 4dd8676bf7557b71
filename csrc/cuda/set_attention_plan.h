// Tiling plan of the CUDA set-attention kernels: pure C++ (no CUDA, no torch), shared by the kernels (as
// __host__ __device__ functions) and by the host-side unit test, so the test checks the very index arithmetic the
// kernels run.
//
// Geometry (letters of DESIGN.md: B sets, G images per set, L tokens per image, H heads, D head dim):
//   a set's sequence is the G*L tokens of its G images; token t of set b is position t % L of image t / L, stored at
//   row b*G + t/L of the (N, L, H*D) tensors. Tiles never straddle images: a query tile is block_m positions of one
//   image, and keys are visited image by image, tile by tile (the last tile of an image is partial when
//   L % block_n != 0 and its tail is masked). With a set mask (uint8 (G, G), row-major), key tiles of images that a
//   query image may not attend are skipped entirely, so a block-diagonal mask costs about 1/G of full attention.
//
// Forward: one CTA per (query tile, head, set); it walks the allowed key tiles in increasing linear index
//   t = image * n_tiles + tile (next_tile over the mask ROW of its query image).
// Backward: one CTA per (key tile, column chunk of dK/dV, head, set); it walks the query tiles of the images allowed
//   to attend its key image (next_tile over the mask COLUMN of its key image).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JEDI_HD __host__ __device__ __forceinline__
#else
#define JEDI_HD inline
#endif

namespace jedi {
namespace set_attn {

JEDI_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// The largest row stride (elements) whose offsets inside a tile of `rows` rows fit 32 bits (the forwards keep a
// thread's offsets inside a key tile as 32-bit ints: set_attention_tiles.cuh).
JEDI_HD constexpr int64_t max_tile_stride_l(int rows) { return (int64_t{1} << 31) / (rows + 1) - 256; }
// The row strides the CUDA kernels take (the glue copies tensors with larger ones; tiles of up to 192 rows).
constexpr int64_t kMaxStrideL = max_tile_stride_l(192);

// Head dims with a compiled kernel instance. A head dim D runs on the smallest instance >= D (columns D..kD-1 are
// zero-filled on load and never stored). 48 serves SD's 40 (16-column k-steps of mma.m16n8k16: 40 -> 48, not 64),
// 80 and 160 are SD's other two; the rest cover every multiple of 8 up to 256.
constexpr int kNumInstances = 9;
JEDI_HD constexpr int instance_head_dim(int i) {
  return i == 0 ? 32 : i == 1 ? 48 : i == 2 ? 64 : i == 3 ? 80 : i == 4 ? 96 : i == 5 ? 128 : i == 6 ? 160
       : i == 7 ? 192 : 256;
}
constexpr int kMaxHeadDim = 256;

// Padded head dim of the instance serving D, or 0 when D is unsupported (D must be a positive multiple of 8, <= 256:
// 16-byte vector loads need 8-element alignment of every head's columns).
JEDI_HD constexpr int padded_head_dim(int64_t D) {
  if (D <= 0 || D % 8 != 0 || D > kMaxHeadDim) return 0;
  for (int i = 0; i < kNumInstances; ++i)
    if (instance_head_dim(i) >= D) return instance_head_dim(i);
  return 0;
}

// ---- block shapes ----------------------------------------------------------------------------------------------
// Forward: every warp owns row_blocks m16 MMA row blocks (16 or 32 query rows), so block_m = 16 * row_blocks *
// num_warps. Two row blocks share every K/V fragment a warp loads from shared memory (FlashAttention-2's layout: half
// the ldmatrix traffic and per-tile overhead per score) but double the accumulator registers.
struct FwdConfig {
  int block_m;     // query rows per CTA
  int block_n;     // keys per iteration
  int num_warps;   // block_m / (16 * row_blocks)
  int row_blocks;  // m16 row blocks per warp: 1 or 2
  bool q_in_regs;  // keep Q's MMA fragments in registers (small D) or re-read them from shared memory (large D)
  int min_blocks;  // __launch_bounds__ occupancy hint
  int stages = 1;  // 1: FlashAttention-2's loop; 2: software-pipelined (fwd_has_stages)
};
// Row blocks per warp compiled for a kernel head dim: 1 always; 2 up to 80 (sm_90 ptxas: 189-255 registers, no
// spills; 96 took 255 and 128 spilled) and at 160 with 32-key tiles (SD's 16x16 level: 255 registers on sm_90 without
// spills; 4 bytes of spill on sm_80, so that instance is built for sm_90 on: fwd_instance_before_sm90).
JEDI_HD constexpr bool fwd_has_row_blocks(int kD, int row_blocks) {
  return row_blocks == 1 || (row_blocks == 2 && (kD <= 80 || kD == 160));
}
// Whether an instance has a body for devices before sm_90 (run_fwd runs 16 rows per warp instead there).
JEDI_HD constexpr bool fwd_instance_before_sm90(int kD, int row_blocks) { return !(row_blocks == 2 && kD > 80); }
// The instance a launch uses when the caller does not ask for one (SetAttnParams::fwd_row_blocks == 0): two row
// blocks up to head dim 80 (at 160 they are opt-in, JEDI_CUDA_FWD_ROW_BLOCKS=2, until a GPU run has timed them).
// Static SASS of the main loop, sm_90 bf16, per 1024 scores of a full key tile (tools/sass_loop_mix.py --cuda):
// D 40 484 -> 383 instructions, ldmatrix 27 -> 15; D 80 614 -> 501, 45 -> 25; at ~220/240 registers instead of
// 128/175 (8 resident warps per SM instead of 16 / 8); the H100 measured 1.09x at d 40 and 1.55x at d 80 (second run
// of 2026-11-27, L 4096 / 1024, set size 2: more than the instruction counts say). D 160 with 32-key tiles: 543 -> 590
// instructions inside an image, ldmatrix 90 -> 60, the same 8 warps per SM.
JEDI_HD constexpr int fwd_default_row_blocks(int kD) { return kD <= 80 ? 2 : 1; }
// Software-pipelined forward (stages = 2): a warp computes the scores of key tile t+1 on the tensor cores in the same
// straight-line code as the exponentials of tile t, so ptxas interleaves the two and the tensor pipe and the SFU work
// at the same time (FlashAttention-3's intra-warpgroup overlap, done with mma.sync); the one-stage loop issues them
// in turn, and its two barriers per tile keep a CTA's warps in the same phase. K and V are double-buffered (one
// barrier per tile). Compiled for padded head dims <= 80, where the exponentials weigh as much as the matmuls; two
// score tiles live in registers, so the two-row-block instance takes 32 keys per tile, and exists up to 64 only (at 80
// it needed 250-255 registers and spilled on sm_80, for more instructions per score than the 16-row one).
JEDI_HD constexpr bool fwd_has_stages(int kD, int row_blocks, int stages) {
  return fwd_has_row_blocks(kD, row_blocks) &&
         (stages == 1 || (stages == 2 && kD <= (row_blocks == 2 ? 64 : 80)));
}
// The forward's default stage count (SetAttnParams::fwd_stages == 0): 1. The pipelined loop (JEDI_CUDA_FWD_STAGES=2)
// lost on the H100 (2026-11-27, third session; bf16, ng 2): d 40 L 4096 0.869 vs 0.811 ms, d 80 L 1024 0.108 vs
// 0.089. ncu at d 40: issue slots 50 % busy vs 41 %, but tensor pipe 41 % vs 45 % and exp unit 34 % vs 37 %: the
// extra instructions of the interleaved loop cost more than the overlap won.
JEDI_HD constexpr int fwd_default_stages(int) { return 1; }
// Row blocks per warp of a launch: the requested count (SetAttnParams::fwd_row_blocks), or when none is requested the
// head dim's default, except that a two-stage launch takes 16 rows per warp where only that instance has two stages
// (padded head dims 65-80), so one stage switch serves a whole model.
JEDI_HD constexpr int fwd_launch_row_blocks(int kD, int requested, int stages) {
  return requested != 0 ? requested
       : (stages == 2 && !fwd_has_stages(kD, fwd_default_row_blocks(kD), 2) && fwd_has_stages(kD, 1, 2))
           ? 1
           : fwd_default_row_blocks(kD);
}
// The rows per warp a launch takes when it does not ask (SetAttnParams::fwd_row_blocks == 0), by shape: the head
// dim's default, except at padded head dim 160 with more than 1024 keys per set (G * L), which takes 32 rows per warp
// (set_attention_fwd_launch resolves it before anything else; 0 = the default). Measured on the H200 (2026-11-28,
// third run's follow-up; the torch-free harness's device times, bf16, B 2, H 8; 32 vs 16 rows per warp, ms):
// L 256, set size 8: 0.144 vs 0.198; set size 4: 0.060 vs 0.060; set size 2: 0.036 vs 0.035; L 64, set sizes 1, 2
// and 4: 0.016 vs 0.014, 0.019 vs 0.017, 0.025 vs 0.023. (With a set mask the walks may be shorter than G * L: the
// rule goes by the set's size, which the host knows without reading the mask.)
JEDI_HD constexpr int fwd_shape_row_blocks(int kD, int64_t G, int64_t L) { return kD == 160 && G * L > 1024 ? 2 : 0; }
JEDI_HD constexpr FwdConfig fwd_config(int kD, int row_blocks, int stages = 1) {
  // Registers per thread ~ row_blocks * (kD/2 (O accumulator) + stages * block_n/2 (scores) [+ kD/4 Q fragments]):
  // 192/256 take a narrower key tile so they fit without spills.
  return stages == 2
             ? (row_blocks == 2 ? FwdConfig{128, 32, 4, 2, kD <= 64, 2, 2} : FwdConfig{128, 64, 8, 1, kD <= 64, 1, 2})
       : row_blocks == 2 ? (kD <= 64 ? FwdConfig{128, 64, 4, 2, true, 2}
                            : kD <= 80 ? FwdConfig{128, 64, 4, 2, false, 1} : FwdConfig{128, 32, 4, 2, false, 1})
       : kD <= 64        ? FwdConfig{128, 64, 8, 1, true, 2}
       : kD <= 128       ? FwdConfig{128, 64, 8, 1, true, 1}
       : kD <= 160       ? FwdConfig{128, 64, 8, 1, false, 1}
                         : FwdConfig{128, 32, 8, 1, false, 1};
}
JEDI_HD constexpr FwdConfig fwd_config(int kD) { return fwd_config(kD, fwd_default_row_blocks(kD)); }

// Key splits of the forward (FlashAttention-2's split-KV, for grids too small to fill the GPU): with S splits a query
// tile's allowed key tiles are cut into S contiguous runs of the walk, one CTA each; every CTA writes its run's
// normalized output and logsumexp in float32 to a workspace, and a second kernel merges the S partial results
// (out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s)). A forward at d 80, L 1024, one image per set
// (B 2, H 8) is 128 CTAs of 128 query rows walking 16 key tiles each: one CTA per SM where two fit, so every SM runs
// a single 4-warp CTA through 16 dependent tiles (0.039-0.046 ms on the H100/H200 against 0.038 for FA2, which splits
// there). Compiled for the one-stage loop with the head dim's default row blocks.
constexpr int kMaxFwdSplits = 8;
JEDI_HD constexpr bool fwd_has_splits(int kD, int row_blocks, int stages) {
  return stages == 1 && row_blocks == fwd_default_row_blocks(kD);
}
// The split count for `ctas` CTAs of `key_tiles` key tiles each (without a mask: G * ceil(L / block_n)) on
// `sm_count` SMs holding `ctas_per_sm` CTAs each: 1 when the grid already fills 80 % of one wave of CTA slots;
// otherwise the smallest S (at most kMaxFwdSplits and key_tiles) whose waves are at least 85 % as full as the best
// S's, FlashAttention-2's rule (num_splits_heuristic). 1 for unknown device facts (<= 0).
inline int fwd_auto_splits(int64_t ctas, int64_t key_tiles, int sm_count, int ctas_per_sm) {
  if (ctas <= 0 || key_tiles <= 1 || sm_count <= 0 || ctas_per_sm <= 0) return 1;
  const int64_t slots = static_cast<int64_t>(sm_count) * ctas_per_sm;
  if (ctas * 5 >= slots * 4) return 1;
  const int max_s = static_cast<int>(key_tiles < kMaxFwdSplits ? key_tiles : kMaxFwdSplits);
  double eff[kMaxFwdSplits + 1] = {};
  double best = 0.0;
  for (int s = 1; s <= max_s; ++s) {
    const int64_t n = ctas * s, waves = ceil_div(n, slots);
    eff[s] = static_cast<double>(n) / static_cast<double>(waves * slots);
    if (eff[s] > best) best = eff[s];
  }
  for (int s = 1; s <= max_s; ++s)
    if (eff[s] >= 0.85 * best) return s;
  return 1;
}
// Split s of S (0 <= s < S) of a walk of n tiles: tiles [first, first + count) in walk order; runs differ by at most
// one tile and a run is empty only when n < S.
struct SplitRange {
  int64_t first, count;
};
JEDI_HD SplitRange split_range(int64_t n, int s, int S) {
  const int64_t a = n * s / S, b = n * (s + 1) / S;
  return SplitRange{a, b - a};
}
// Workspace of a split forward (float32 elements): S partial outputs (N * L * H * D each) and S partial logsumexps
// (B * H * G * L each).
JEDI_HD constexpr int64_t fwd_split_out_elems(int64_t B, int64_t G, int64_t L, int64_t H, int64_t D, int S) {
  return S * B * G * L * H * D;
}
JEDI_HD constexpr int64_t fwd_split_lse_elems(int64_t B, int64_t G, int64_t L, int64_t H, int S) {
  return S * B * H * G * L;
}

// The two memory-bound kernels with one row per (image n, position l, head h), the backward's preprocess and the split
// forward's merge, run kRowLanes threads per row (each taking the row's 8-column chunks lane, lane + 8, ...) in
// blocks of kRowThreads: x covers the L*H rows of one image, y the images (a grid-stride loop past 65535). Their
// launchers check x <= INT_MAX, L*H <= INT32_MAX and N <= INT32_MAX, which keeps the kernels' index arithmetic in
// 32 bits (row_grid_fits).
constexpr int kRowThreads = 256;
constexpr int kRowLanes = 8;
constexpr int kRowsPerBlock = kRowThreads / kRowLanes;
constexpr int64_t kRowMaxGridY = 65535;
struct RowGrid {
  int64_t x, y;
};
inline RowGrid row_grid(int64_t N, int64_t L, int64_t H) {
  return {ceil_div(L * H, kRowsPerBlock), N < kRowMaxGridY ? N : kRowMaxGridY};
}
inline bool row_grid_fits(int64_t N, int64_t L, int64_t H) {
  return ceil_div(L * H, kRowsPerBlock) <= INT32_MAX && L * H <= INT32_MAX && N <= INT32_MAX;
}

// Backward: every warp owns key_blocks m16 blocks of keys (16 or 32 keys: dK, dV accumulators of 16 key_blocks x
// chunk), block_n = 16 * key_blocks * num_warps. Large head dims split the dK/dV columns into chunks handled by
// separate CTAs (each recomputes S and dP over the full head dim), which bounds the accumulator registers at the cost
// of recomputing two of the five GEMMs. A CTA loads block_m queries per step into shared memory and works through
// them in register passes of sub_m queries (the S, dP accumulators hold 16 key_blocks x sub_m scores).
struct BwdConfig {
  int block_n;     // keys per CTA
  int block_m;     // queries per step (shared-memory tile; the dQ reduction runs once per step)
  int num_warps;   // block_n / (16 * key_blocks)
  int chunk;       // dK/dV/dQ columns per CTA (divides the padded head dim, multiple of 16)
  int key_blocks;  // m16 key blocks per warp: 1 or 2
  int sub_m;       // queries per register pass (divides block_m, multiple of 16)
  int dq_groups_max;  // widest dQ unit in 16-column groups (bwd_dq_groups) the registers allow next to dK/dV
  // warps sharing each key block: 1, or 2 (the query-split CTA: warps w and w + num_warps / 2 own the same keys and
  // take alternate register passes of each query tile; their dK/dV sums meet in shared memory at the end). block_n
  // = 16 * key_blocks * num_warps / query_splits.
  int query_splits = 1;
};
// Key blocks per warp compiled for a kernel head dim: 1 always; 2 up to 48, where the K fragments still fit in
// registers next to the doubled dK/dV accumulators (sm_90 ptxas: 254 registers at 48, no spills). Two key blocks
// share every Q and dO fragment a warp loads (the four per-score ldmatrix streams of the backward halve), and a
// CTA's 128 keys halve the dQ atomics. Static SASS per 1024 scores, sm_90 bf16, D 40 (tools/sass_loop_mix.py
// --bwd): 16 keys per warp ~973 instructions, 32 keys ~691.
JEDI_HD constexpr bool bwd_has_key_blocks(int kD, int key_blocks) {
  return key_blocks == 1 || (key_blocks == 2 && kD <= 48);
}
// The instance a launch uses when the caller does not ask for one (SetAttnBwdParams::bwd_key_blocks == 0): two key
// blocks wherever compiled. Not yet timed on a GPU: the benchmarks time both (JEDI_CUDA_BWD_KEY_BLOCKS).
JEDI_HD constexpr int bwd_default_key_blocks(int kD) { return bwd_has_key_blocks(kD, 2) ? 2 : 1; }
// Warps per backward CTA: 4, or 8 for padded head dim 80 with 16 keys per warp (128 keys per CTA, FlashAttention-2's
// d 80 backward shape): each query tile's Q, dO, lse and delta are loaded once for twice the keys, and the dQ
// atomics into the float32 accumulator halve (at L 1024, ng 2, H 8, B 2: 84 M -> 42 M float adds). The warps' own
// work and registers do not change. The default wherever compiled: on the H100 (2026-11-27, third session) the
// backward at L 1024, d 80, ng 2, bf16 took 0.326 ms with 8 warps against 0.482 with 4 (x1.48; harness: 0.331 vs
// 0.488, and 1.214 vs 1.863 ms at ng 4). JEDI_CUDA_BWD_WARPS=4 still runs the 4-warp CTA.
// At padded head dim 160, 8 warps is a different CTA (opt-in, untimed; twenty-sixth session): the same 64 keys as
// the 4-warp one, each 16 keys shared by two warps that take alternate 16-query register passes of every query tile
// (query_splits = 2), their dK/dV sums added through shared memory once at the end. The H200's graph rows
// (2026-11-28) had the CUDA forward + backward at d 160, L 256, set size 2 at 0.124 ms against FA2's 0.076: 128 CTAs
// of 4 warps, one per SM, ≈ 5 µs per 32-query step, latency-bound with one warp per scheduler. FA2's d 160 backward
// runs 8 warps per 64-key CTA; this gives each scheduler two warps on the same grid.
JEDI_HD constexpr bool bwd_has_warps(int kD, int key_blocks, int warps) {
  return bwd_has_key_blocks(kD, key_blocks) &&
         (warps == 4 || (warps == 8 && key_blocks == 1 && (kD == 80 || kD == 160)));
}
JEDI_HD constexpr int bwd_default_warps(int kD) { return kD == 80 ? 8 : 4; }
JEDI_HD constexpr BwdConfig bwd_config(int kD, int key_blocks) {
  // (sm_80 and sm_90 ptxas: no spills for every instance with these shapes.) 160 runs as one chunk: its 160
  // registers of dK/dV accumulators leave room for S and dP of 16 queries at a time and for dQ units of one group;
  // two 80-column chunks, each recomputing S and dP, cost 4264 instead of 2936 instructions per 1024 scores.
  return key_blocks == 2 ? BwdConfig{128, 64, 4, kD, 2, 32, 16}
       : kD <= 80        ? BwdConfig{64, 64, 4, kD, 1, 64, 16}
       : kD <= 128       ? BwdConfig{64, 32, 4, kD, 1, 32, 16}
       : kD == 160       ? BwdConfig{64, 32, 4, 160, 1, 16, 1}
       : kD == 192       ? BwdConfig{64, 32, 4, 96, 1, 32, 16}
                         : BwdConfig{64, 32, 4, 64, 1, 32, 16};  // 256: four chunks
}
JEDI_HD constexpr BwdConfig bwd_config(int kD) { return bwd_config(kD, bwd_default_key_blocks(kD)); }
JEDI_HD constexpr BwdConfig bwd_config(int kD, int key_blocks, int warps) {
  return warps != 8   ? bwd_config(kD, key_blocks)
       : kD == 160    ? BwdConfig{64, 32, 8, 160, 1, 16, 1, 2}
                      : BwdConfig{128, 64, 8, kD, 1, 64, 16};
}

// dQ step of the backward: dQ[block_m x chunk] += dS[block_m x block_n] K[block_n x chunk] is split into units of
// one 16-query slab x dq_groups(kD, kb) 16-column groups, handed to the warps round-robin. A warp loads a slab's dS
// fragment once per 16 keys for all of its groups, so larger units save ldmatrix; the largest group count (up to
// dq_groups_max) that divides the chunk's groups and gives every warp the same number of units is used (1 where none
// does).
JEDI_HD constexpr int bwd_dq_groups(int kD, int key_blocks, int warps = 4) {
  const BwdConfig c = bwd_config(kD, key_blocks, warps);
  const int groups = c.chunk / 16, slabs = c.block_m / 16;
  for (int g = groups < c.dq_groups_max ? groups : c.dq_groups_max; g > 1; --g)
    if (groups % g == 0 && (slabs * (groups / g)) % c.num_warps == 0) return g;
  return 1;
}

// Shared-memory row pitch (elements) of a kD-wide tile: +8 elements (16 bytes) makes the 8 row addresses of every
// ldmatrix phase hit 8 distinct 16-byte bank groups: pitch/8 = kD/8 + 1 is odd because kD % 16 == 0.
JEDI_HD constexpr int smem_pitch(int cols) { return cols + 8; }

JEDI_HD constexpr int64_t fwd_smem_bytes(int kD, int elem_bytes, int row_blocks, int stages = 1) {
  // Q, and one K and one V tile per stage
  return static_cast<int64_t>(fwd_config(kD, row_blocks, stages).block_m +
                              2 * stages * fwd_config(kD, row_blocks, stages).block_n) *
         smem_pitch(kD) * elem_bytes;
}
JEDI_HD constexpr int64_t fwd_smem_bytes(int kD, int elem_bytes) {
  return fwd_smem_bytes(kD, elem_bytes, fwd_default_row_blocks(kD));
}
// The float32 dK (or dV) accumulators of the warps a query-split CTA adds into its first warps' at the end.
JEDI_HD constexpr int64_t bwd_split_reduce_bytes(const BwdConfig& c) {
  return c.query_splits == 1 ? 0
                             : static_cast<int64_t>(c.num_warps - c.num_warps / c.query_splits) * 32 * c.key_blocks *
                                   c.chunk / 2 * 4;
}
JEDI_HD constexpr int64_t bwd_smem_bytes(int kD, int elem_bytes, int key_blocks, int warps = 4) {
  // K, V (block_n x kD), Q, dO (block_m x kD), dS^T (block_n x block_m), lse and delta (block_m floats each); a
  // query-split CTA reuses them for its dK/dV reduction
  const BwdConfig c = bwd_config(kD, key_blocks, warps);
  const int64_t tiles = (static_cast<int64_t>(2 * c.block_n + 2 * c.block_m) * smem_pitch(kD) +
                         static_cast<int64_t>(c.block_n) * smem_pitch(c.block_m)) *
                            elem_bytes +
                        2 * c.block_m * 4;
  return tiles > bwd_split_reduce_bytes(c) ? tiles : bwd_split_reduce_bytes(c);
}
JEDI_HD constexpr int64_t bwd_smem_bytes(int kD, int elem_bytes) {
  return bwd_smem_bytes(kD, elem_bytes, bwd_default_key_blocks(kD));
}

// The split backward (SetAttnBwdParams::bwd_split = 1; opt-in, twenty-seventh session, not yet timed on a GPU): the
// main kernel above without its dQ step (dK and dV only: no dS^T staging, no float32 atomics, no dq_accum), then a
// kernel over the query tiles that recomputes S = Q K^T, P, dP = dO V^T and dS for each allowed key tile and
// accumulates dQ = scale dS K in registers, written once in the input dtype (no dQ conversion kernel). Two GEMMs
// more (7 instead of 5), in exchange for no atomics and a dQ loop shaped like the forward's. Our Triton backward is
// split this way, and the H200's ncu run of d 80, L 1024, set size 2 (2026-11-28) timed it at 226 µs (preprocess,
// dK/dV and dQ kernels) against 355 for FA2 and 412 for this CUDA backward fused (at ncu's clocks).
// dQ kernel tiles: 4 warps x 16 query rows, key tiles of block_n, K and V double-buffered; Q's and dO's MMA
// fragments stay in registers up to head dim 80 (re-read from shared memory beyond, as the forward does Q's).
struct DqConfig {
  int block_m;          // query rows per CTA (16 per warp)
  int block_n;          // keys per tile
  int num_warps;
  bool frags_in_regs;   // Q and dO fragments in registers
};
JEDI_HD constexpr DqConfig bwd_dq_config(int kD) {
  // registers per thread ~ kD/2 (dQ accumulators) + block_n (S and dP) [+ kD/4 (Q and dO fragments)]
  return kD <= 80 ? DqConfig{64, 64, 4, true} : kD <= 96 ? DqConfig{64, 64, 4, false} : DqConfig{64, 32, 4, false};
}
JEDI_HD constexpr int64_t bwd_dq_smem_bytes(int kD, int elem_bytes) {
  // Q and dO (block_m rows), K and V two stages each (block_n rows)
  return static_cast<int64_t>(2 * bwd_dq_config(kD).block_m + 4 * bwd_dq_config(kD).block_n) * smem_pitch(kD) *
         elem_bytes;
}

// ---- mask-aware tile walk ----------------------------------------------------------------------------------------
// `line` points at the mask entries of one image pair line: mask[i][j] for j = 0..G-1 (row: stride 1) or i = 0..G-1
// (column: stride G). nullptr = every image allowed.
JEDI_HD bool image_allowed(const uint8_t* line, int64_t stride, int64_t img) {
  return line == nullptr || line[img * stride] != 0;
}

// The smallest linear tile index t' > t (t' = image * tiles_per_image + tile) whose image is allowed, or
// G * tiles_per_image when none is left. Start with t = -1. Within an image every tile is visited (t was allowed, so
// t+1 in the same image is too); crossing into a new image skips disallowed images whole.
JEDI_HD int64_t next_tile(const uint8_t* line, int64_t stride, int64_t G, int64_t tiles_per_image, int64_t t) {
  const int64_t t1 = t + 1;
  if (t1 % tiles_per_image != 0) return t1;
  int64_t img = t1 / tiles_per_image;
  while (img < G && !image_allowed(line, stride, img)) ++img;
  return img * tiles_per_image;  // == G * tiles_per_image when img == G
}

// The same walk as next_tile, kept as (image, tile within the image) and advanced without dividing: the kernels'
// key/query loops call it once per tile, and a 64-bit division or remainder is a ~70-instruction subroutine call on
// the GPU (three per iteration with next_tile + tile_coord). Visits exactly next_tile's sequence (tested).
struct TileWalk {
  const uint8_t* line;
  int64_t stride, G, tiles;
  int64_t image, tile;  // image == G: done

  // The first allowed tile (image 0 if allowed, else the next allowed image's tile 0).
  JEDI_HD static TileWalk start(const uint8_t* line, int64_t stride, int64_t G, int64_t tiles) {
    TileWalk w{line, stride, G, tiles, 0, 0};
    while (w.image < G && !image_allowed(line, stride, w.image)) ++w.image;
    return w;
  }
  JEDI_HD bool done() const { return image >= G; }
  JEDI_HD void advance() {
    if (++tile < tiles) return;
    tile = 0;
    do ++image;
    while (image < G && !image_allowed(line, stride, image));
  }
  JEDI_HD int64_t linear() const { return image * tiles + tile; }  // next_tile's index
};

// ---- grids and coordinates -------------------------------------------------------------------------------------
struct Grid3 {
  int64_t x, y, z;
};

// Forward grid: x = query tile of the set (image-major: x = image * m_tiles + tile), y = head, z = set. Consecutive
// CTAs share (set, head) and so the same K/V in L2.
JEDI_HD Grid3 fwd_grid(int64_t B, int64_t G, int64_t L, int64_t H, int block_m) {
  return Grid3{G * ceil_div(L, block_m), H, B};
}

// Backward grid: x = (key tile of the set) * chunks + chunk, y = head, z = set.
JEDI_HD Grid3 bwd_grid(int64_t B, int64_t G, int64_t L, int64_t H, int block_n, int chunks) {
  return Grid3{G * ceil_div(L, block_n) * chunks, H, B};
}

// A tile of linear index t (image-major) -> its image and its first position inside the image.
struct TileCoord {
  int64_t image;
  int64_t row0;
};
JEDI_HD TileCoord tile_coord(int64_t t, int64_t tiles_per_image, int block) {
  return TileCoord{t / tiles_per_image, (t % tiles_per_image) * block};
}

// Row of the (N, L, ...) tensors holding image `image` of set b.
JEDI_HD int64_t tensor_row(int64_t b, int64_t G, int64_t image) { return b * G + image; }

// Index of (set b, head h, set token image*L + pos) in the (B, H, G*L) lse / delta arrays.
JEDI_HD int64_t lse_index(int64_t b, int64_t h, int64_t image, int64_t pos, int64_t H, int64_t G, int64_t L) {
  return (b * H + h) * (G * L) + image * L + pos;
}

// Host-side summary of one forward CTA's work (tests, docs): number of key tiles it visits.
inline int64_t fwd_key_tiles_visited(const uint8_t* mask, int64_t G, int64_t L, int block_n, int64_t q_image) {
  const int64_t tiles = ceil_div(L, block_n);
  const uint8_t* row = mask ? mask + q_image * G : nullptr;
  int64_t n = 0;
  for (int64_t t = next_tile(row, 1, G, tiles, -1); t < G * tiles; t = next_tile(row, 1, G, tiles, t)) ++n;
  return n;
}

}  // namespace set_attn
}  // namespace jedi
