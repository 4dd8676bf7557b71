// Host-side unit test of the CUDA set-attention tiling plan (csrc/cuda/set_attention_plan.h): plain C++, no CUDA,
// no torch.
//   g++ -std=c++17 -O2 -I csrc/cuda csrc/cuda/tests/test_set_attention_plan.cpp -o test_set_attention_plan
// Checks instance selection, block shapes and shared-memory budgets, grid sizes, the mask-aware tile walk (full,
// block-diagonal, one-way, gapped masks), that forward and backward walks cover every allowed (query, key) pair
// exactly once, and runs a CPU emulation of both kernels' loop structure (same plan functions, same tile order,
// log2-domain online softmax with tail masking and the negative-scale sign trick, P recomputed from lse in the
// backward) against a naive float64 softmax attention and its gradient.
// Prints "N passed, M failed"; exit code 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "set_attention_plan.h"

using namespace jedi::set_attn;

static int g_pass = 0, g_fail = 0;

#define CHECK(cond, ...)                                 \
  do {                                                   \
    if (cond) {                                          \
      ++g_pass;                                          \
    } else {                                             \
      ++g_fail;                                          \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                          \
      std::printf("\n");                                 \
    }                                                    \
  } while (0)

static std::vector<uint8_t> mask_of(int64_t G, const char* kind) {
  std::vector<uint8_t> m(G * G, 0);
  const std::string k(kind);
  for (int64_t i = 0; i < G; ++i)
    for (int64_t j = 0; j < G; ++j) {
      if (k == "full") m[i * G + j] = 1;
      if (k == "diag") m[i * G + j] = i == j;
      if (k == "oneway") m[i * G + j] = (j == 0 || i == j);  // every image sees the reference image 0
      if (k == "gapped") m[i * G + j] = (j % 2 == 0) || i == j;
      if (k == "lower") m[i * G + j] = j <= i;
    }
  return m;
}

// ---- instances, configs, budgets ----------------------------------------------------------------------------
static void test_instances() {
  const int64_t dims[][2] = {{40, 48}, {80, 80}, {160, 160}, {8, 32}, {16, 32}, {24, 32}, {32, 32},
                             {48, 48}, {56, 64}, {64, 64}, {72, 80}, {88, 96}, {96, 96}, {104, 128},
                             {120, 128}, {128, 128}, {136, 160}, {168, 192}, {192, 192}, {200, 256},
                             {248, 256}, {256, 256}};
  for (auto& d : dims) CHECK(padded_head_dim(d[0]) == d[1], "D=%lld -> %d", (long long)d[0], padded_head_dim(d[0]));
  for (int64_t bad : {0, -8, 4, 20, 41, 257, 264, 512})
    CHECK(padded_head_dim(bad) == 0, "D=%lld should be unsupported", (long long)bad);
  // every multiple of 8 up to 256 runs, and the padding is < 16 columns except for the generic jumps
  for (int64_t D = 8; D <= 256; D += 8) {
    const int kD = padded_head_dim(D);
    CHECK(kD >= D && kD % 16 == 0, "D=%lld kD=%d", (long long)D, kD);
  }
  for (int i = 0; i < kNumInstances; ++i) {
    const int kD = instance_head_dim(i);
    CHECK(fwd_has_row_blocks(kD, 1) && fwd_has_row_blocks(kD, fwd_default_row_blocks(kD)) &&
              !fwd_has_row_blocks(kD, 0) && !fwd_has_row_blocks(kD, 3),
          "fwd instances kD=%d", kD);
    for (int rb = 1; rb <= 2; ++rb) {
      if (!fwd_has_row_blocks(kD, rb)) continue;
      const FwdConfig f = fwd_config(kD, rb);
      CHECK(f.row_blocks == rb && f.block_m == 16 * rb * f.num_warps && f.block_n % 16 == 0 && kD % 16 == 0,
            "fwd config kD=%d rb=%d", kD, rb);
      CHECK(fwd_smem_bytes(kD, 2, rb) <= 163 * 1024, "fwd smem kD=%d rb=%d", kD, rb);
      // the two-stage loop: compiled up to 80 (32 rows per warp: up to 64), same rows per CTA; K and V
      // double-buffered
      CHECK(fwd_has_stages(kD, rb, 1) && !fwd_has_stages(kD, rb, 0) && !fwd_has_stages(kD, rb, 3) &&
                fwd_has_stages(kD, rb, 2) == (kD <= (rb == 2 ? 64 : 80)) &&
                fwd_has_stages(kD, rb, fwd_default_stages(kD)),
            "fwd stages kD=%d rb=%d", kD, rb);
      // an explicit row-block request wins; stages never change it
      CHECK(fwd_launch_row_blocks(kD, rb, 1) == rb && fwd_launch_row_blocks(kD, rb, 2) == rb,
            "fwd launch row blocks kD=%d rb=%d", kD, rb);
      if (fwd_has_stages(kD, rb, 2)) {
        const FwdConfig f2 = fwd_config(kD, rb, 2);
        CHECK(f2.stages == 2 && f2.row_blocks == rb && f2.block_m == 16 * rb * f2.num_warps &&
                  f2.block_n % 16 == 0 && f2.q_in_regs == (kD <= 64),
              "fwd 2-stage config kD=%d rb=%d", kD, rb);
        CHECK(fwd_smem_bytes(kD, 2, rb, 2) == (f2.block_m + 4 * f2.block_n) * smem_pitch(kD) * 2 &&
                  fwd_smem_bytes(kD, 2, rb, 2) <= 163 * 1024,
              "fwd 2-stage smem kD=%d rb=%d", kD, rb);
      }
    }
    CHECK(fwd_config(kD).row_blocks == fwd_default_row_blocks(kD), "fwd default kD=%d", kD);
    // without a request: the default row blocks, except a two-stage launch at 65-80 takes 16 rows per warp; the
    // instance a launch picks always has the stage count asked for where any instance has it
    CHECK(fwd_launch_row_blocks(kD, 0, 1) == fwd_default_row_blocks(kD) &&
              fwd_launch_row_blocks(kD, 0, 2) == (kD > 64 && kD <= 80 ? 1 : fwd_default_row_blocks(kD)),
          "fwd launch row blocks kD=%d", kD);
    CHECK(fwd_has_stages(kD, fwd_launch_row_blocks(kD, 0, 2), 2) == (kD <= 80), "two stages kD=%d", kD);
    // by shape: 32 rows per warp at 160 for sets of more than 1024 keys (an instance it has), the default elsewhere
    for (int64_t GL : {int64_t{1}, int64_t{512}, int64_t{1024}, int64_t{1025}, int64_t{2048}, int64_t{1} << 40}) {
      const int rb = fwd_shape_row_blocks(kD, GL, 1), rb2 = fwd_shape_row_blocks(kD, 1, GL);
      CHECK(rb == rb2 && rb == (kD == 160 && GL > 1024 ? 2 : 0) && (rb == 0 || fwd_has_row_blocks(kD, rb)),
            "fwd shape row blocks kD=%d G*L=%lld: %d", kD, static_cast<long long>(GL), rb);
    }
    CHECK(bwd_has_key_blocks(kD, 1) && bwd_has_key_blocks(kD, bwd_default_key_blocks(kD)) &&
              !bwd_has_key_blocks(kD, 0) && !bwd_has_key_blocks(kD, 3),
          "bwd instances kD=%d", kD);
    for (int kb = 1; kb <= 2; ++kb) {
      if (!bwd_has_key_blocks(kD, kb)) continue;
      const BwdConfig c = bwd_config(kD, kb);
      CHECK(c.key_blocks == kb && c.block_n == 16 * kb * c.num_warps && c.block_m % c.sub_m == 0 &&
                c.sub_m % 16 == 0 && c.chunk % 16 == 0 && kD % c.chunk == 0,
            "bwd config kD=%d kb=%d", kD, kb);
      CHECK(bwd_smem_bytes(kD, 2, kb) <= 163 * 1024, "bwd smem kD=%d kb=%d", kD, kb);
      CHECK((smem_pitch(c.block_m) * 2 / 16) % 2 == 1, "dS pitch kD=%d kb=%d", kD, kb);
      // dQ units: whole groups of the chunk; every warp gets the same number of units unless there are none
      const int g = bwd_dq_groups(kD, kb), groups = c.chunk / 16, units = (c.block_m / 16) * (groups / g);
      CHECK(g >= 1 && g <= c.dq_groups_max && groups % g == 0 && (g == 1 || units % c.num_warps == 0),
            "dq groups kD=%d kb=%d: %d", kD, kb, g);
    }
    const BwdConfig b = bwd_config(kD);
    CHECK(b.key_blocks == bwd_default_key_blocks(kD), "bwd default kD=%d", kD);
    // the 8-warp backwards: 80 (16 keys per warp, 128 keys per CTA; the default) and 160 (the query-split CTA:
    // opt-in), the 4-warp shape otherwise
    CHECK(bwd_has_warps(kD, 1, 4) && bwd_has_warps(kD, 1, 8) == (kD == 80 || kD == 160) && !bwd_has_warps(kD, 2, 8) &&
              !bwd_has_warps(kD, 1, 6) && bwd_has_warps(kD, bwd_default_key_blocks(kD), bwd_default_warps(kD)) &&
              bwd_default_warps(kD) == (kD == 80 ? 8 : 4),
          "bwd warps kD=%d", kD);
    CHECK(bwd_config(kD, bwd_default_key_blocks(kD)).query_splits == 1 && bwd_split_reduce_bytes(bwd_config(kD)) == 0,
          "bwd query splits kD=%d", kD);
    if (kD == 160) {  // same keys, tile and chunk as the 4-warp CTA, two warps per 16 keys on alternate passes
      const BwdConfig w = bwd_config(kD, 1, 8), n = bwd_config(kD, 1, 4);
      CHECK(w.num_warps == 8 && w.query_splits == 2 && w.block_n == n.block_n && w.block_n == 16 * 8 / 2 &&
                w.block_m == n.block_m && w.sub_m == n.sub_m && w.block_m % (w.sub_m * 2) == 0 &&
                w.chunk == n.chunk && bwd_smem_bytes(kD, 2, 1, 8) == bwd_smem_bytes(kD, 2, 1, 4) &&
                bwd_split_reduce_bytes(w) == 4 * 32 * 80 * 4 &&
                bwd_split_reduce_bytes(w) <= bwd_smem_bytes(kD, 2, 1, 8),
            "bwd query-split config kD=%d", kD);
    } else if (bwd_has_warps(kD, 1, 8)) {
      const BwdConfig w = bwd_config(kD, 1, 8), n = bwd_config(kD, 1, 4);
      CHECK(w.num_warps == 8 && w.block_n == 16 * 8 && w.key_blocks == 1 && w.block_m == n.block_m &&
                w.sub_m == n.sub_m && w.chunk == n.chunk && bwd_smem_bytes(kD, 2, 1, 8) <= 163 * 1024,
            "bwd 8-warp config kD=%d", kD);
      const int g = bwd_dq_groups(kD, 1, 8), units = (w.block_m / 16) * (w.chunk / 16 / g);
      CHECK(g >= 1 && (g == 1 || units % 8 == 0), "bwd 8-warp dq groups kD=%d: %d", kD, g);
    }
    // A100 opt-in limit (163 KB) bounds both; H100 allows 227 KB
    CHECK(fwd_smem_bytes(kD, 2) <= 163 * 1024, "fwd smem kD=%d: %lld", kD, (long long)fwd_smem_bytes(kD, 2));
    CHECK(bwd_smem_bytes(kD, 2) <= 163 * 1024, "bwd smem kD=%d: %lld", kD, (long long)bwd_smem_bytes(kD, 2));
    // the split backward's dQ kernel: 16 query rows per warp, whole m16n8k16 steps over keys and columns, Q and dO
    // fragments in registers exactly up to 80, K and V two stages each, within the A100's limit
    const DqConfig q = bwd_dq_config(kD);
    CHECK(q.block_m == 16 * q.num_warps && q.block_n % 16 == 0 && q.frags_in_regs == (kD <= 80) &&
              bwd_dq_smem_bytes(kD, 2) == (2 * q.block_m + 4 * q.block_n) * smem_pitch(kD) * 2 &&
              bwd_dq_smem_bytes(kD, 2) <= 163 * 1024,
          "dq kernel config kD=%d", kD);
    // ldmatrix rows hit distinct 16-byte bank groups: pitch in 16-byte units is odd
    CHECK((smem_pitch(kD) * 2 / 16) % 2 == 1, "pitch kD=%d", kD);
    CHECK((smem_pitch(b.block_m) * 2 / 16) % 2 == 1, "dS pitch kD=%d", kD);
  }
  CHECK(fwd_smem_bytes(48, 2) == (128 + 128) * 56 * 2, "fwd smem 48 = %lld", (long long)fwd_smem_bytes(48, 2));
  // K, V (128 x 56), Q, dO (64 x 56), dS^T (128 x 72), lse and delta (64 floats each)
  CHECK(bwd_smem_bytes(48, 2) == ((2 * 128 + 2 * 64) * 56 + 128 * 72) * 2 + 2 * 64 * 4, "bwd smem 48 = %lld",
        (long long)bwd_smem_bytes(48, 2));
  // SD's head dims: one slab x all groups per warp (48: 3 groups, 80: 5); 160 (one 160-column chunk) has no
  // registers to spare next to its dK/dV accumulators, so (slab, group) pairs
  CHECK(bwd_dq_groups(48, 2) == 3 && bwd_dq_groups(48, 1) == 3 && bwd_dq_groups(80, 1) == 5 &&
            bwd_dq_groups(160, 1) == 1 && bwd_dq_groups(128, 1) == 4,
        "dq groups");
}

static void test_grids() {
  Grid3 g = fwd_grid(2, 3, 97, 8, 128);
  CHECK(g.x == 3 && g.y == 8 && g.z == 2, "fwd grid %lld %lld %lld", (long long)g.x, (long long)g.y, (long long)g.z);
  g = fwd_grid(2, 2, 4096, 8, 128);
  CHECK(g.x == 64 && g.y == 8 && g.z == 2, "fwd grid L=4096: %lld", (long long)g.x);
  g = fwd_grid(1, 5, 129, 1, 128);  // 2 tiles per image, the second holding 1 row
  CHECK(g.x == 10, "fwd grid L=129: %lld", (long long)g.x);
  g = fwd_grid(4, 5, 1, 2, 128);
  CHECK(g.x == 5 && g.z == 4, "fwd grid L=1: %lld", (long long)g.x);
  g = bwd_grid(2, 3, 97, 8, 64, 2);
  CHECK(g.x == 3 * 2 * 2 && g.y == 8 && g.z == 2, "bwd grid %lld", (long long)g.x);
  // tile coordinates: image-major, partial last tile
  TileCoord c = tile_coord(3, 2, 64);
  CHECK(c.image == 1 && c.row0 == 64, "tile 3 of 2/image: image %lld row0 %lld", (long long)c.image,
        (long long)c.row0);
  CHECK(ceil_div(97, 64) == 2 && ceil_div(64, 64) == 1 && ceil_div(1, 64) == 1, "ceil_div");
  CHECK(lse_index(1, 2, 1, 5, 3, 2, 10) == (1 * 3 + 2) * 20 + 15, "lse_index");
  CHECK(tensor_row(2, 3, 1) == 7, "tensor_row");
}

// ---- tile walk ----------------------------------------------------------------------------------------------
static std::vector<int64_t> walk(const uint8_t* line, int64_t stride, int64_t G, int64_t tiles) {
  std::vector<int64_t> v;
  for (int64_t t = next_tile(line, stride, G, tiles, -1); t < G * tiles; t = next_tile(line, stride, G, tiles, t))
    v.push_back(t);
  return v;
}

// The kernels' TileWalk: the same sequence as next_tile, and (image, tile) == tile_coord of each index.
static std::vector<int64_t> walk_incremental(const uint8_t* line, int64_t stride, int64_t G, int64_t tiles) {
  std::vector<int64_t> v;
  for (TileWalk w = TileWalk::start(line, stride, G, tiles); !w.done(); w.advance()) {
    const TileCoord c = tile_coord(w.linear(), tiles, 64);
    CHECK(c.image == w.image && c.row0 == w.tile * 64, "TileWalk coordinates of %lld", (long long)w.linear());
    v.push_back(w.linear());
  }
  return v;
}

static void test_tile_walk_matches_next_tile() {
  // every mask of G <= 4 images (each row and each column of it), tiles per image 1..3, and no mask
  for (int64_t G = 1; G <= 4; ++G)
    for (int64_t tiles = 1; tiles <= 3; ++tiles) {
      CHECK(walk_incremental(nullptr, 1, G, tiles) == walk(nullptr, 1, G, tiles), "no mask G=%lld", (long long)G);
      for (uint32_t bits = 0; bits < (1u << (G * G)); ++bits) {
        std::vector<uint8_t> m(G * G);
        for (int64_t i = 0; i < G * G; ++i) m[i] = (bits >> i) & 1u;
        for (int64_t i = 0; i < G; ++i) {
          CHECK(walk_incremental(m.data() + i * G, 1, G, tiles) == walk(m.data() + i * G, 1, G, tiles),
                "row %lld of mask %u (G=%lld, tiles=%lld)", (long long)i, bits, (long long)G, (long long)tiles);
          CHECK(walk_incremental(m.data() + i, G, G, tiles) == walk(m.data() + i, G, G, tiles),
                "column %lld of mask %u (G=%lld, tiles=%lld)", (long long)i, bits, (long long)G, (long long)tiles);
        }
      }
    }
}

static void test_walk() {
  const int64_t G = 4, tiles = 3;
  // full / nullptr: every tile in order
  std::vector<int64_t> all = walk(nullptr, 1, G, tiles);
  CHECK(all.size() == 12, "full walk size %zu", all.size());
  for (size_t i = 0; i < all.size(); ++i) CHECK(all[i] == (int64_t)i, "full walk order");
  const std::vector<uint8_t> full = mask_of(G, "full");
  CHECK(walk(full.data(), 1, G, tiles) == all, "explicit full mask == no mask");
  // block-diagonal: only the query image's tiles
  const std::vector<uint8_t> diag = mask_of(G, "diag");
  for (int64_t i = 0; i < G; ++i) {
    const std::vector<int64_t> w = walk(diag.data() + i * G, 1, G, tiles);
    CHECK(w.size() == 3 && w[0] == i * tiles && w[2] == i * tiles + 2, "diag row %lld", (long long)i);
    // the backward walks the column: same pattern for a symmetric mask
    CHECK(walk(diag.data() + i, G, G, tiles) == w, "diag column %lld", (long long)i);
  }
  // one-way: row i sees images {0, i}; column 0 is seen by every image, column j>0 only by image j
  const std::vector<uint8_t> ow = mask_of(G, "oneway");
  std::vector<int64_t> w = walk(ow.data() + 2 * G, 1, G, tiles);
  CHECK(w == (std::vector<int64_t>{0, 1, 2, 6, 7, 8}), "one-way row 2");
  CHECK(walk(ow.data() + 0, G, G, tiles).size() == 12, "one-way column 0");
  CHECK(walk(ow.data() + 3, G, G, tiles) == (std::vector<int64_t>{9, 10, 11}), "one-way column 3");
  CHECK(walk(ow.data() + 0 * G, 1, G, tiles) == (std::vector<int64_t>{0, 1, 2}), "one-way row 0");
  // gapped, and leading/trailing disallowed images
  const std::vector<uint8_t> gp = mask_of(5, "gapped");
  CHECK(walk(gp.data() + 1 * 5, 1, 5, 2) == (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 8, 9}), "gapped row 1");
  const uint8_t only_last[4] = {0, 0, 0, 1};
  CHECK(walk(only_last, 1, 4, 2) == (std::vector<int64_t>{6, 7}), "leading gaps");
  const uint8_t none[4] = {0, 0, 0, 0};
  CHECK(walk(none, 1, 4, 2).empty(), "empty row visits nothing");
  // one tile per image (L <= block)
  CHECK(walk(ow.data() + 3 * G, 1, G, 1) == (std::vector<int64_t>{0, 3}), "one tile per image");
  // visited counts: block-diagonal costs 1/G
  CHECK(fwd_key_tiles_visited(diag.data(), G, 97, 64, 1) == 2, "diag visits");
  CHECK(fwd_key_tiles_visited(nullptr, G, 97, 64, 1) == 8, "full visits");
  CHECK(fwd_key_tiles_visited(ow.data(), G, 4096, 64, 2) == 128, "one-way visits");
}

// every allowed (query token, key token) pair is computed exactly once, disallowed ones never, by both walks
static void test_coverage(int64_t G, int64_t L, const char* kind) {
  const std::vector<uint8_t> m = mask_of(G, kind);
  const int64_t S = G * L;
  const FwdConfig f = fwd_config(48);
  const BwdConfig bc = bwd_config(48);
  std::vector<int> fwd(S * S, 0), bwd(S * S, 0);
  const int64_t m_tiles = ceil_div(L, f.block_m), n_tiles = ceil_div(L, f.block_n);
  const Grid3 g = fwd_grid(1, G, L, 1, f.block_m);
  for (int64_t x = 0; x < g.x; ++x) {
    const TileCoord qc = tile_coord(x, m_tiles, f.block_m);
    for (int64_t t = next_tile(m.data() + qc.image * G, 1, G, n_tiles, -1); t < G * n_tiles;
         t = next_tile(m.data() + qc.image * G, 1, G, n_tiles, t)) {
      const TileCoord kc = tile_coord(t, n_tiles, f.block_n);
      for (int64_t i = qc.row0; i < std::min(L, qc.row0 + f.block_m); ++i)
        for (int64_t j = kc.row0; j < std::min(L, kc.row0 + f.block_n); ++j)
          fwd[(qc.image * L + i) * S + kc.image * L + j]++;
    }
  }
  const int64_t bn_tiles = ceil_div(L, bc.block_n), bm_tiles = ceil_div(L, bc.block_m);
  const Grid3 gb = bwd_grid(1, G, L, 1, bc.block_n, 1);
  for (int64_t x = 0; x < gb.x; ++x) {
    const TileCoord kc = tile_coord(x, bn_tiles, bc.block_n);
    for (int64_t t = next_tile(m.data() + kc.image, G, G, bm_tiles, -1); t < G * bm_tiles;
         t = next_tile(m.data() + kc.image, G, G, bm_tiles, t)) {
      const TileCoord qc = tile_coord(t, bm_tiles, bc.block_m);
      for (int64_t i = qc.row0; i < std::min(L, qc.row0 + bc.block_m); ++i)
        for (int64_t j = kc.row0; j < std::min(L, kc.row0 + bc.block_n); ++j)
          bwd[(qc.image * L + i) * S + kc.image * L + j]++;
    }
  }
  int bad_f = 0, bad_b = 0;
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j < S; ++j) {
      const int want = m[(i / L) * G + j / L];
      bad_f += fwd[i * S + j] != want;
      bad_b += bwd[i * S + j] != want;
    }
  CHECK(bad_f == 0, "forward coverage G=%lld L=%lld %s: %d wrong pairs", (long long)G, (long long)L, kind, bad_f);
  CHECK(bad_b == 0, "backward coverage G=%lld L=%lld %s: %d wrong pairs", (long long)G, (long long)L, kind, bad_b);
}

// ---- CPU emulation of the kernels' algorithm -----------------------------------------------------------------
struct Problem {
  int64_t B, G, L, H, D;
  float scale;
  std::vector<uint8_t> mask;  // empty = full
  std::vector<float> q, k, v, dout;  // (N, L, H*D) contiguous
};

// Forward as the kernel runs it: per (query tile, head, set) CTA, walk key tiles, log2-domain online softmax.
static void emulate_fwd(const Problem& p, int block_m, int block_n, std::vector<float>& out, std::vector<float>& lse) {
  const int64_t G = p.G, L = p.L, H = p.H, D = p.D, HD = H * D;
  out.assign(p.B * G * L * HD, NAN);
  lse.assign(p.B * H * G * L, NAN);
  const int64_t m_tiles = ceil_div(L, block_m), n_tiles = ceil_div(L, block_n);
  const Grid3 g = fwd_grid(p.B, G, L, H, block_m);
  const float sl = std::fabs(p.scale) * 1.4426950408889634f;
  const float sgn = p.scale < 0 ? -1.f : 1.f;  // the kernel flips q's sign bits
  for (int64_t b = 0; b < g.z; ++b)
    for (int64_t h = 0; h < g.y; ++h)
      for (int64_t x = 0; x < g.x; ++x) {
        const TileCoord qc = tile_coord(x, m_tiles, block_m);
        const uint8_t* row = p.mask.empty() ? nullptr : p.mask.data() + qc.image * G;
        std::vector<float> m_run(block_m, -INFINITY), l_run(block_m, 0.f), acc(block_m * D, 0.f);
        for (int64_t t = next_tile(row, 1, G, n_tiles, -1); t < G * n_tiles; t = next_tile(row, 1, G, n_tiles, t)) {
          const TileCoord kc = tile_coord(t, n_tiles, block_n);
          const int64_t valid_keys = L - kc.row0;
          for (int r = 0; r < block_m; ++r) {
            const int64_t qpos = qc.row0 + r;
            std::vector<float> s(block_n);
            for (int j = 0; j < block_n; ++j) {
              float dot = 0.f;  // zero-filled rows beyond L, as in shared memory
              if (qpos < L && j < valid_keys)
                for (int64_t d = 0; d < D; ++d)
                  dot += sgn * p.q[((tensor_row(b, G, qc.image) * L + qpos) * HD) + h * D + d] *
                         p.k[((tensor_row(b, G, kc.image) * L + kc.row0 + j) * HD) + h * D + d];
              s[j] = j < valid_keys ? dot : -INFINITY;
            }
            float mx = -INFINITY;
            for (float x2 : s) mx = std::max(mx, x2);
            const float m_new = std::max(m_run[r], mx * sl);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            const float corr = std::exp2(m_run[r] - m_use);
            m_run[r] = m_new;
            float sum = 0.f;
            for (int j = 0; j < block_n; ++j) {
              s[j] = j < valid_keys ? std::exp2(std::fma(s[j], sl, -m_use)) : 0.f;
              sum += s[j];
            }
            l_run[r] = l_run[r] * corr + sum;
            for (int64_t d = 0; d < D; ++d) {
              float o = acc[r * D + d] * corr;
              for (int j = 0; j < valid_keys && j < block_n; ++j)
                o += s[j] * p.v[((tensor_row(b, G, kc.image) * L + kc.row0 + j) * HD) + h * D + d];
              acc[r * D + d] = o;
            }
          }
        }
        for (int r = 0; r < block_m; ++r) {
          const int64_t qpos = qc.row0 + r;
          if (qpos >= L) continue;
          const float inv = l_run[r] > 0 ? 1.f / l_run[r] : 0.f;
          for (int64_t d = 0; d < D; ++d)
            out[(tensor_row(b, G, qc.image) * L + qpos) * HD + h * D + d] = acc[r * D + d] * inv;
          lse[lse_index(b, h, qc.image, qpos, H, G, L)] =
              l_run[r] > 0 ? m_run[r] * 0.6931471805599453f + std::log(l_run[r]) : -INFINITY;
        }
      }
}

// Backward as the kernels run it: delta preprocess, per (key tile, chunk, head, set) CTA walking the query tiles of
// the mask column, P from lse, dK/dV in "registers", dQ accumulated (unscaled) then scaled in the convert step.
static void emulate_bwd(const Problem& p, const std::vector<float>& out, const std::vector<float>& lse, int block_n,
                        int block_m, int chunk, int kD, std::vector<float>& dq, std::vector<float>& dk,
                        std::vector<float>& dv) {
  const int64_t G = p.G, L = p.L, H = p.H, D = p.D, HD = H * D, N = p.B * G;
  std::vector<float> delta(p.B * H * G * L, NAN), dq_acc(N * L * HD, NAN);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h) {
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = (n * L + l) * HD + h * D + d;
          s += p.dout[i] * out[i];
          dq_acc[i] = 0.f;
        }
        delta[lse_index(n / G, h, n % G, l, H, G, L)] = s;
      }
  dk.assign(N * L * HD, NAN);
  dv.assign(N * L * HD, NAN);
  const int chunks = kD / chunk;
  const int64_t n_tiles = ceil_div(L, block_n), m_tiles = ceil_div(L, block_m);
  const Grid3 g = bwd_grid(p.B, G, L, H, block_n, chunks);
  const float sl = std::fabs(p.scale) * 1.4426950408889634f;
  const float sgn = p.scale < 0 ? -1.f : 1.f;
  auto at = [&](const std::vector<float>& t, int64_t b, int64_t img, int64_t pos, int64_t h, int64_t d) {
    return (pos < L && d < D) ? t[(tensor_row(b, G, img) * L + pos) * HD + h * D + d] : 0.f;  // zero-filled tiles
  };
  for (int64_t b = 0; b < g.z; ++b)
    for (int64_t h = 0; h < g.y; ++h)
      for (int64_t x = 0; x < g.x; ++x) {
        const int c0 = static_cast<int>(x % chunks) * chunk;
        const TileCoord kc = tile_coord(x / chunks, n_tiles, block_n);
        const uint8_t* col = p.mask.empty() ? nullptr : p.mask.data() + kc.image;
        std::vector<float> adk(block_n * chunk, 0.f), adv(block_n * chunk, 0.f);
        for (int64_t t = next_tile(col, G, G, m_tiles, -1); t < G * m_tiles; t = next_tile(col, G, G, m_tiles, t)) {
          const TileCoord qc = tile_coord(t, m_tiles, block_m);
          const int64_t valid_q = L - qc.row0;
          std::vector<float> P(block_n * block_m), dS(block_n * block_m);
          for (int kr = 0; kr < block_n; ++kr)
            for (int qi = 0; qi < block_m; ++qi) {
              float s = 0.f, dp = 0.f;
              for (int d = 0; d < kD; ++d) {
                s += sgn * at(p.k, b, kc.image, kc.row0 + kr, h, d) * at(p.q, b, qc.image, qc.row0 + qi, h, d);
                dp += at(p.v, b, kc.image, kc.row0 + kr, h, d) * at(p.dout, b, qc.image, qc.row0 + qi, h, d);
              }
              const int64_t pos = qc.row0 + qi;
              float lse2 = INFINITY, dl = 0.f;
              if (pos < L) {
                const float ls = lse[lse_index(b, h, qc.image, pos, H, G, L)];
                lse2 = ls == -INFINITY ? INFINITY : ls * 1.4426950408889634f;
                dl = delta[lse_index(b, h, qc.image, pos, H, G, L)];
              }
              const bool ok = kc.row0 + kr < L && qi < valid_q;
              const float pv = ok ? std::exp2(std::fma(s, sl, -lse2)) : 0.f;
              P[kr * block_m + qi] = pv;
              dS[kr * block_m + qi] = pv * (dp - dl);
            }
          for (int kr = 0; kr < block_n; ++kr)
            for (int c = 0; c < chunk; ++c)
              for (int qi = 0; qi < block_m; ++qi) {
                adv[kr * chunk + c] += P[kr * block_m + qi] * at(p.dout, b, qc.image, qc.row0 + qi, h, c0 + c);
                adk[kr * chunk + c] += dS[kr * block_m + qi] * at(p.q, b, qc.image, qc.row0 + qi, h, c0 + c);
              }
          for (int qi = 0; qi < block_m && qi < valid_q; ++qi)
            for (int c = c0; c < c0 + chunk && c < D; ++c) {
              float a = 0.f;
              for (int kr = 0; kr < block_n; ++kr)
                a += dS[kr * block_m + qi] * at(p.k, b, kc.image, kc.row0 + kr, h, c);
              dq_acc[(tensor_row(b, G, qc.image) * L + qc.row0 + qi) * HD + h * D + c] += a;
            }
        }
        for (int kr = 0; kr < block_n; ++kr) {
          if (kc.row0 + kr >= L) continue;
          for (int c = c0; c < c0 + chunk && c < D; ++c) {
            const int64_t i = (tensor_row(b, G, kc.image) * L + kc.row0 + kr) * HD + h * D + c;
            dk[i] = adk[kr * chunk + (c - c0)] * p.scale;
            dv[i] = adv[kr * chunk + (c - c0)];
          }
        }
      }
  dq.resize(N * L * HD);
  for (size_t i = 0; i < dq.size(); ++i) dq[i] = dq_acc[i] * p.scale;
}

// naive float64 attention and gradient
static void naive(const Problem& p, std::vector<double>& out, std::vector<double>& lse, std::vector<double>& dq,
                  std::vector<double>& dk, std::vector<double>& dv) {
  const int64_t G = p.G, L = p.L, H = p.H, D = p.D, HD = H * D, S = G * L, N = p.B * G;
  out.assign(N * L * HD, 0);
  dq.assign(N * L * HD, 0);
  dk.assign(N * L * HD, 0);
  dv.assign(N * L * HD, 0);
  lse.assign(p.B * H * S, 0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      auto idx = [&](int64_t t, int64_t d) { return ((b * G + t / L) * L + t % L) * HD + h * D + d; };
      std::vector<double> P(S * S, 0), dP(S * S, 0);
      for (int64_t i = 0; i < S; ++i) {
        double mx = -INFINITY;
        std::vector<double> s(S, -INFINITY);
        for (int64_t j = 0; j < S; ++j) {
          if (!p.mask.empty() && !p.mask[(i / L) * G + j / L]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += (double)p.q[idx(i, d)] * p.k[idx(j, d)];
          s[j] = dot * p.scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += std::exp(s[j] - mx);
        lse[(b * H + h) * S + i] = mx + std::log(sum);
        for (int64_t j = 0; j < S; ++j) P[i * S + j] = std::exp(s[j] - mx) / sum;
        double delta = 0;
        for (int64_t j = 0; j < S; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += (double)p.dout[idx(i, d)] * p.v[idx(j, d)];
          dP[i * S + j] = dot;
          delta += P[i * S + j] * dot;
        }
        for (int64_t j = 0; j < S; ++j) dP[i * S + j] = P[i * S + j] * (dP[i * S + j] - delta);  // dS
        for (int64_t d = 0; d < D; ++d) {
          double o = 0, g = 0;
          for (int64_t j = 0; j < S; ++j) {
            o += P[i * S + j] * p.v[idx(j, d)];
            g += dP[i * S + j] * p.k[idx(j, d)];
          }
          out[idx(i, d)] = o;
          dq[idx(i, d)] = g * p.scale;
        }
      }
      for (int64_t j = 0; j < S; ++j)
        for (int64_t d = 0; d < D; ++d) {
          double gk = 0, gv = 0;
          for (int64_t i = 0; i < S; ++i) {
            gk += dP[i * S + j] * p.q[idx(i, d)];
            gv += P[i * S + j] * p.dout[idx(i, d)];
          }
          dk[idx(j, d)] = gk * p.scale;
          dv[idx(j, d)] = gv;
        }
    }
}

template <typename A, typename B>
static double max_err(const std::vector<A>& a, const std::vector<B>& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite((double)a[i])) return INFINITY;
    e = std::max(e, std::fabs((double)a[i] - (double)b[i]));
  }
  return e;
}

static void test_emulation(int64_t B, int64_t G, int64_t L, int64_t H, int64_t D, const char* kind, float scale,
                           int block_m, int block_n, int bwd_block_n, int bwd_block_m, int chunk_div) {
  Problem p{B, G, L, H, D, scale == 0.f ? 1.f / std::sqrt((float)D) : scale, {}, {}, {}, {}, {}};
  if (std::string(kind) != "none") p.mask = mask_of(G, kind);
  std::mt19937 rng(static_cast<uint32_t>(B * 1000 + G * 100 + L * 10 + D));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t n = B * G * L * H * D;
  for (auto* t : {&p.q, &p.k, &p.v, &p.dout}) {
    t->resize(n);
    for (auto& x : *t) x = nd(rng);
  }
  std::vector<float> out, lse, dq, dk, dv;
  emulate_fwd(p, block_m, block_n, out, lse);
  const int kD = padded_head_dim(D);
  emulate_bwd(p, out, lse, bwd_block_n, bwd_block_m, kD / chunk_div, kD, dq, dk, dv);
  std::vector<double> ro, rl, rdq, rdk, rdv;
  naive(p, ro, rl, rdq, rdk, rdv);
  const double eo = max_err(out, ro), el = max_err(lse, rl), eq = max_err(dq, rdq), ek = max_err(dk, rdk),
               ev = max_err(dv, rdv);
  const bool ok = eo < 1e-4 && el < 1e-4 && eq < 1e-3 && ek < 1e-3 && ev < 1e-3;
  CHECK(ok, "emulation B=%lld G=%lld L=%lld H=%lld D=%lld mask=%s scale=%g blocks %d/%d bwd %d/%d/%d: "
            "out %.1e lse %.1e dq %.1e dk %.1e dv %.1e",
        (long long)B, (long long)G, (long long)L, (long long)H, (long long)D, kind, p.scale, block_m, block_n,
        bwd_block_n, bwd_block_m, kD / chunk_div, eo, el, eq, ek, ev);
}

// Key splits of the forward: which instances have them, the automatic count (FlashAttention-2's wave rule) on the
// issue's small shapes, and split_range's runs (disjoint, covering, balanced, empty only when n < S).
static void test_splits() {
  CHECK(fwd_has_splits(80, 2, 1) && fwd_has_splits(160, 1, 1) && fwd_has_splits(48, 2, 1), "default instances");
  CHECK(!fwd_has_splits(80, 1, 1) && !fwd_has_splits(48, 2, 2), "non-default row blocks or two stages: none");
  // d 80, L 1024, one image per set, B 2, H 8: 128 CTAs of 16 key tiles, 2 CTAs per SM on 132 SMs -> 2 splits
  const Grid3 g80 = fwd_grid(2, 1, 1024, 8, fwd_config(80).block_m);
  const int s80 = fwd_auto_splits(g80.x * g80.y * g80.z, 1 * ceil_div(1024, fwd_config(80).block_n), 132, 2);
  CHECK(g80.x * g80.y * g80.z == 128 && s80 == 2, "d80 ng1: ctas %lld splits %d",
        (long long)(g80.x * g80.y * g80.z), s80);
  // the same on an A100 (108 SMs, 216 slots): 2 splits fill 59 % of two waves, 3 fill 89 % -> 3
  const int s80a = fwd_auto_splits(128, 16, 108, 2);
  CHECK(s80a == 3, "A100 d80 ng1 splits %d", s80a);
  // d 40, L 4096, set size 2 (the UNet's 64x64 layer): 1024 CTAs fill the GPU -> none
  const Grid3 g40 = fwd_grid(2, 2, 4096, 8, fwd_config(48).block_m);
  CHECK(fwd_auto_splits(g40.x * g40.y * g40.z, 2 * ceil_div(4096, 64), 132, 2) == 1, "d40 ng2: no split");
  // d 160, L 256, set size 4: 128 CTAs, one per SM -> already one full wave, none
  CHECK(fwd_auto_splits(128, 16, 132, 1) == 1, "d160 ng4: one CTA per SM, none");
  // d 160, L 256, one image: 32 CTAs of 4 key tiles -> 4 splits (one tile each); never more splits than tiles
  CHECK(fwd_auto_splits(32, 4, 132, 1) == 4, "d160 L256 ng1: %d", fwd_auto_splits(32, 4, 132, 1));
  CHECK(fwd_auto_splits(16, 1, 132, 1) == 1, "a single key tile: none");
  CHECK(fwd_auto_splits(4, 100, 132, 1) >= kMaxFwdSplits - 1, "tiny grid: nearly the most splits (7: 28 of 132 "
        "slots is within 85 %% of 8's 32)");
  CHECK(fwd_auto_splits(128, 16, 0, 2) == 1 && fwd_auto_splits(128, 16, 132, 0) == 1, "unknown device: none");
  // the chosen count's waves are >= 85 % as full as the best count's, and no smaller count's are
  for (int64_t ctas : {1, 7, 33, 64, 100, 128, 200}) {
    const int s = fwd_auto_splits(ctas, 64, 132, 2);
    auto eff = [&](int k) {
      const int64_t n = ctas * k;
      return double(n) / double(ceil_div(n, 264) * 264);
    };
    double best = 0;
    for (int k = 1; k <= kMaxFwdSplits; ++k) best = std::max(best, eff(k));
    bool smallest = true;
    for (int k = 1; k < s; ++k) smallest = smallest && eff(k) < 0.85 * best;
    CHECK(ctas * 5 >= 264 * 4 ? s == 1 : (eff(s) >= 0.85 * best && smallest), "ctas %lld -> %d", (long long)ctas, s);
  }
  // runs: disjoint, in order, covering [0, n), sizes differ by at most one
  for (int64_t n : {0, 1, 2, 5, 16, 17, 64, 1000})
    for (int S = 1; S <= kMaxFwdSplits; ++S) {
      int64_t next = 0, lo = n, hi = 0;
      bool ok = true;
      for (int s = 0; s < S; ++s) {
        const SplitRange r = split_range(n, s, S);
        ok = ok && r.first == next && r.count >= 0;
        next += r.count;
        lo = std::min(lo, r.count);
        hi = std::max(hi, r.count);
      }
      CHECK(ok && next == n && hi - lo <= 1, "split_range n %lld S %d", (long long)n, S);
    }
  CHECK(fwd_split_out_elems(2, 3, 5, 7, 40, 3) == 3 * 2 * 3 * 5 * 7 * 40 && fwd_split_lse_elems(2, 3, 5, 7, 3) == 3 * 2 * 3 * 5 * 7,
        "workspace sizes");
}

int main() {
  test_instances();
  test_splits();
  test_grids();
  test_walk();
  test_tile_walk_matches_next_tile();
  for (const char* kind : {"full", "diag", "oneway", "gapped", "lower"}) {
    test_coverage(3, 97, kind);
    test_coverage(5, 17, kind);
    test_coverage(2, 256, kind);
    test_coverage(4, 1, kind);
  }
  // small blocks so that several tiles per image, partial tails and masks all occur at small sizes
  test_emulation(2, 3, 37, 2, 40, "none", 0.f, 16, 16, 16, 16, 1);
  test_emulation(1, 3, 37, 1, 40, "diag", 0.f, 16, 32, 32, 16, 1);
  test_emulation(1, 4, 21, 1, 24, "oneway", 0.f, 16, 16, 16, 32, 1);
  test_emulation(1, 5, 9, 1, 16, "gapped", 0.f, 16, 16, 16, 16, 1);
  test_emulation(1, 2, 50, 1, 40, "lower", -0.2f, 16, 16, 32, 16, 1);  // negative scale
  test_emulation(1, 2, 33, 1, 160, "full", 0.f, 16, 16, 16, 16, 2);    // split dK/dV columns (chunk 80)
  test_emulation(1, 3, 1, 2, 8, "none", 0.f, 16, 16, 16, 16, 1);       // one token per image
  test_emulation(1, 2, 64, 1, 72, "oneway", 0.f, 128, 64, 64, 32, 1);  // the real block shapes
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
