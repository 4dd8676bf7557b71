// The two memory-bound kernels around the set-attention backward main kernel: delta = rowsum(dO o O) (with the
// reset of the fp32 dQ accumulator) before it, and dq = scale * dq_accum (fp32 -> T) after it.
#pragma once

#include "set_attention.cuh"
#include "set_attention_device.cuh"

namespace jedi {
namespace set_attn {

constexpr int kPreThreads = 256;
constexpr int64_t kPreMaxGridY = 65535;

// The grid of set_attn_bwd_preprocess_kernel (kPreThreads threads per block) for N = B*G images of L positions and
// H heads: x covers the L*H (position, head) rows of one image, y the images (a grid-stride loop past 65535). The
// launcher checks x <= INT_MAX, L*H <= INT32_MAX and N <= INT32_MAX, which keeps the kernel's index arithmetic in 32
// bits.
struct PreGrid {
  int64_t x, y;
};
inline PreGrid preprocess_grid(int64_t N, int64_t L, int64_t H) {
  return {(L * H + kPreThreads - 1) / kPreThreads, N < kPreMaxGridY ? N : kPreMaxGridY};
}

// One thread per (image row n, position l, head h); consecutive threads take consecutive heads of one position, whose
// columns are contiguous: delta = sum_d dO * O over the head's D columns, 16 bytes of each at a time, and the same
// columns of dq_accum are zeroed so that the main kernel's atomics start from 0 (no memset: the whole backward stays
// three kernels on one stream). It also writes the row's lse in log2 units (lse log2(e); +inf where lse = -inf, a
// row with no probability: P = 0) after the delta array, so the main kernel copies both per query tile with
// cp.async and uses them as they land.
// (Until the twenty-fifth session this was one warp per row with D/8 lanes active (5, 10 or 20 of 32 at SD's head
// dims), each warp doing the row's index arithmetic (64-bit divisions) and a shuffle reduction. On the H200 ncu
// timed it at 17.9 µs for d 80, L 1024, set size 2, compute-bound (67 % of issue slots, 22 % memory throughput),
// against 8.4 µs for FA2's equivalent: about 290 warp instructions per row for 320 bytes read.)
template <typename T>
__global__ void __launch_bounds__(kPreThreads) set_attn_bwd_preprocess_kernel(const SetAttnBwdParams p) {
  const uint32_t lh = blockIdx.x * kPreThreads + threadIdx.x;  // l*H + h
  const uint32_t H = static_cast<uint32_t>(p.H), G = static_cast<uint32_t>(p.G);
  if (lh >= static_cast<uint32_t>(p.L) * H) return;
  const uint32_t l = lh / H, h = lh - l * H;
  const int64_t D = p.D, N = p.B * p.G, rows_per_image = p.L * p.H;
  const int chunks = static_cast<int>(D / 8);  // D is a multiple of 8, at most 256
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const uint4* o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + n * p.o_stride_n +
                                                    l * p.o_stride_l + h * D);
    const uint4* g = reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + n * p.do_stride_n +
                                                    l * p.do_stride_l + h * D);
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + (n * rows_per_image + lh) * D);  // row n*L + l, head h
    float dot = 0.f;
#pragma unroll 4
    for (int c = 0; c < chunks; ++c) {
      const uint4 ov4 = o[c], gv4 = g[c];
      const uint32_t ov[4] = {ov4.x, ov4.y, ov4.z, ov4.w}, gv[4] = {gv4.x, gv4.y, gv4.z, gv4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = unpack2<T>(ov[i]), b = unpack2<T>(gv[i]);
        dot = fmaf(a.x, b.x, fmaf(a.y, b.y, dot));
      }
      acc[2 * c] = make_float4(0.f, 0.f, 0.f, 0.f);
      acc[2 * c + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const uint32_t b = static_cast<uint32_t>(n) / G;  // N <= INT32_MAX (the launcher's check)
    const int64_t idx = lse_index(b, h, static_cast<uint32_t>(n) - b * G, l, p.H, p.G, p.L);
    const float lse = p.lse[idx];
    p.delta[idx] = dot;
    p.delta[p.B * p.H * p.G * p.L + idx] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
}

// dq = scale * dq_accum, four elements per thread (the element count N*L*H*D is a multiple of 8).
template <typename T>
__global__ void set_attn_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n4,
                                           float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    reinterpret_cast<uint2*>(dq)[i] =
        make_uint2(pack2<T>(a.x * scale, a.y * scale), pack2<T>(a.z * scale, a.w * scale));
  }
}

}  // namespace set_attn
}  // namespace jedi
