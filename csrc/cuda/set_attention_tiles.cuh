// Key/value tile bookkeeping shared by the set-attention forwards (the mma.sync kernel in set_attention_kernels.cuh
// and the Hopper one in set_attention_wgmma.cuh): where the walk's next key tile lies, and each thread's share of
// copying it. Both are worked out so that a key tile inside an image costs no 64-bit products and no per-chunk index
// arithmetic: with them (and its descriptors in uniform registers) the wgmma forward's loop went from ~341 to ~236
// sm_90a instructions per 1024 scores inside an image (d 40, 64-key tiles; tools/sass_loop_mix.py --wgmma).
#pragma once

#include "set_attention.cuh"
#include "set_attention_device.cuh"

namespace jedi {
namespace set_attn {

// A thread's share of the copies of every kRows x (8 kChunks) tile of K and V (16-byte chunks; consecutive threads
// take consecutive chunks of a row), worked out once per CTA: per chunk its byte offset inside a shared tile (kPitch
// bytes per row, or chunk-major when kPitch == 0: chunk c of row r at c * 16 kRows + 16 r), its row (kRows when its
// columns lie past D, so it is always zero-filled) and its element offset from the tile's first row in K and in V
// (32-bit: the launchers check kRows * stride against max_tile_stride_l). A tile's copy then costs per chunk an
// address add, one compare and the cp.async.
template <int kRows, int kChunks, int kThreads, int kPitch>
struct TileCopyPlan {
  static constexpr int kTotal = kRows * kChunks;
  static constexpr int kRounds = (kTotal + kThreads - 1) / kThreads;
  int soff[kRounds];  // bytes, inside a shared tile
  int row[kRounds];
  int koff[kRounds], voff[kRounds];  // elements, from the tile's first row
  bool last;  // this thread copies a chunk in the last round (every thread when kThreads divides kTotal)

  __device__ __forceinline__ void init(int tid, int64_t k_sl, int64_t v_sl, int D) {
#pragma unroll
    for (int it = 0; it < kRounds; ++it) {
      const int i = it * kThreads + tid, r = i / kChunks, c = i % kChunks;
      soff[it] = kPitch == 0 ? c * (16 * kRows) + 16 * r : r * kPitch + 16 * c;
      row[it] = c * 8 < D ? r : kRows;
      koff[it] = r * static_cast<int>(k_sl) + c * 8;
      voff[it] = r * static_cast<int>(v_sl) + c * 8;
    }
    last = kTotal % kThreads == 0 || (kRounds - 1) * kThreads + tid < kTotal;
  }
  // Rows [0, rows_in) of the tile starting at `tile` (a row of K or V, with `off` = koff or voff) into the shared
  // tile `s`; the rows after them are zero-filled.
  template <typename T>
  __device__ __forceinline__ void copy(void* s, const T* tile, const int (&off)[kRounds], int rows_in) const {
#pragma unroll
    for (int it = 0; it < kRounds; ++it) {
      if (it + 1 < kRounds || last)
        cp_async16_zfill(static_cast<unsigned char*>(s) + soff[it], tile + off[it], row[it] < rows_in);
    }
  }
};

// The walk over the key tiles of a query tile's allowed images (TileWalk's order: image by image, kBlockN keys a
// tile) with the tile's first rows in K and V and its rows inside the image (fewer than kBlockN only in an image's
// last tile). Counters are 32-bit (the launchers check G * tiles per image against INT_MAX); inside an image the
// next tile is kBlockN rows further on, and only the step into another image computes 64-bit offsets afresh.
template <typename T, int kBlockN>
struct KeyWalk {
  const uint8_t* mask_row;  // set_mask's row of the query image, or nullptr
  const T* k_set;           // image 0 of the set, head h's columns
  const T* v_set;
  int64_t k_sn, v_sn, k_sl, v_sl;  // image and row strides
  int k_step, v_step;       // kBlockN rows (32-bit: key_tiles_fit)
  int G, tiles, last_rows;
  int image = 0, tile = 0;  // the walk's tile (image == G: done)
  const T* k = nullptr;     // its first rows
  const T* v = nullptr;
  int rows = 0;

  // P: SetAttnParams, or SetAttnBwdParams (the split backward's dQ kernel walks the same tiles)
  template <typename P>
  __device__ __forceinline__ KeyWalk(const P& p, int64_t b, int64_t h, const uint8_t* mask)
      : mask_row(mask),
        k_set(static_cast<const T*>(p.k) + tensor_row(b, p.G, 0) * p.k_stride_n + h * p.D),
        v_set(static_cast<const T*>(p.v) + tensor_row(b, p.G, 0) * p.v_stride_n + h * p.D),
        k_sn(p.k_stride_n),
        v_sn(p.v_stride_n),
        k_sl(p.k_stride_l),
        v_sl(p.v_stride_l),
        k_step(kBlockN * static_cast<int>(p.k_stride_l)),
        v_step(kBlockN * static_cast<int>(p.v_stride_l)),
        G(static_cast<int>(p.G)),
        tiles(static_cast<int>(ceil_div(p.L, kBlockN))),
        last_rows(static_cast<int>(p.L - (ceil_div(p.L, kBlockN) - 1) * kBlockN)) {
    while (image < G && !allowed(image)) ++image;
    if (image < G) locate();
  }
  __device__ __forceinline__ bool allowed(int i) const { return mask_row == nullptr || mask_row[i] != 0; }
  __device__ __forceinline__ bool done() const { return image >= G; }
  __device__ __forceinline__ void locate() {
    k = k_set + image * k_sn + int64_t{tile} * kBlockN * k_sl;
    v = v_set + image * v_sn + int64_t{tile} * kBlockN * v_sl;
    rows = tile == tiles - 1 ? last_rows : kBlockN;
  }
  // Allowed tiles of the whole walk (allowed images x tiles per image; 32-bit: key_tiles_fit).
  __device__ __forceinline__ int allowed_tiles() const {
    int n = 0;
    for (int i = 0; i < G; ++i) n += allowed(i) ? 1 : 0;
    return n * tiles;
  }
  // n tiles further on (0 <= n; done() when the walk has fewer left): the first tile of a split forward's run
  // (set_attn::split_range), one step per image instead of one per tile.
  __device__ __forceinline__ void skip(int n) {
    if (n <= 0 || done()) return;
    while (image < G && n >= tiles - tile) {
      n -= tiles - tile;
      tile = 0;
      do ++image;
      while (image < G && !allowed(image));
    }
    tile += n;
    if (image < G) locate();
  }
  // On to the next allowed tile (done() after the last one).
  __device__ __forceinline__ void advance() {
    if (++tile < tiles) {
      k += k_step;
      v += v_step;
      rows = tile == tiles - 1 ? last_rows : kBlockN;
      return;
    }
    tile = 0;
    do ++image;
    while (image < G && !allowed(image));
    if (image < G) locate();
  }
};

// The launchers' side of both: row strides whose offsets inside a tile of `rows` rows fit 32 bits, and a walk whose
// counters fit (G images x tiles of at least `min_block_n` keys).
template <typename P>  // SetAttnParams or SetAttnBwdParams
JEDI_HD bool key_tiles_fit(const P& p, int rows, int min_block_n) {
  const int64_t lim = max_tile_stride_l(rows);
  return p.q_stride_l <= lim && p.k_stride_l <= lim && p.v_stride_l <= lim &&
         p.G * ceil_div(p.L, min_block_n) <= int64_t{INT_MAX};
}

}  // namespace set_attn
}  // namespace jedi
