// The two memory-bound kernels around the set-attention backward main kernel: delta = rowsum(dO o O) (with the
// reset of the fp32 dQ accumulator, which the split backward has not) before it, and dq = scale * dq_accum
// (fp32 -> T) after it (the fused backward only).
#pragma once

#include "set_attention.cuh"
#include "set_attention_device.cuh"

namespace jedi {
namespace set_attn {

// kRowLanes consecutive threads per (image row n, position l, head h) (row_grid, set_attention_plan.h), consecutive
// rows taking consecutive heads of one position, whose columns are contiguous: lane s of a row reads 16-byte chunks
// s, s + 8, ... of the head's D
// columns of dO and O, so the 8 lanes of a row read 128 contiguous bytes per step and a warp 4 rows' worth;
// delta = sum_d dO * O is summed over the 8 lanes by three shuffles. The same columns of dq_accum are zeroed so that
// the main kernel's atomics start from 0 (no memset: the whole backward stays three kernels on one stream). Lane 0
// also writes the row's lse in log2 units (lse log2(e); +inf where lse = -inf, a row with no probability: P = 0)
// after the delta array, so the main kernel copies both per query tile with cp.async and uses them as they land.
// Rows past L*H run the shuffles with nothing loaded (a full-warp shuffle needs every lane) and write nothing.
// History, on the H200 at d 80, L 1024, set size 2 (ncu):
// - until the twenty-fifth session, one warp per row with D/8 lanes active (10 of 32 at d 80), with 64-bit index
//   divisions and a shuffle reduction: 17.9 µs, compute-bound (about 290 warp instructions per row);
// - the twenty-fifth session's one thread per row: 14.8 µs, latency-bound. Its 32768 threads fill 12 % of the SMs'
//   warp slots, and each of its 16-byte loads sits in a different 160-byte row of the warp's footprint
//   (long-scoreboard stalls, 24 cycles per instruction);
// - FA2's equivalent takes 8.3 µs, our Triton one 7.5; 21 MB moved is ≈ 4.4 µs at 4.8 TB/s.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) set_attn_bwd_preprocess_kernel(const SetAttnBwdParams p) {
  const uint32_t sub = threadIdx.x % kRowLanes;
  const uint32_t lh = blockIdx.x * kRowsPerBlock + threadIdx.x / kRowLanes;  // l*H + h
  const uint32_t H = static_cast<uint32_t>(p.H), G = static_cast<uint32_t>(p.G);
  const bool row_ok = lh < static_cast<uint32_t>(p.L) * H;
  const uint32_t l = row_ok ? lh / H : 0, h = row_ok ? lh - l * H : 0;
  const int64_t D = p.D, N = p.B * p.G, rows_per_image = p.L * p.H;
  const int chunks = row_ok ? static_cast<int>(D / 8) : 0;  // D is a multiple of 8, at most 256
  const bool reset = p.bwd_split == 0;  // the split backward has no dQ accumulator
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // block-uniform: every lane reaches the shuffles
    const uint4* o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + n * p.o_stride_n +
                                                    l * p.o_stride_l + h * D);
    const uint4* g = reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + n * p.do_stride_n +
                                                    l * p.do_stride_l + h * D);
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + (reset ? (n * rows_per_image + lh) * D : 0));  // row n*L + l
    float dot = 0.f;
#pragma unroll 2
    for (int c = static_cast<int>(sub); c < chunks; c += kRowLanes) {
      const uint4 ov4 = o[c], gv4 = g[c];
      const uint32_t ov[4] = {ov4.x, ov4.y, ov4.z, ov4.w}, gv[4] = {gv4.x, gv4.y, gv4.z, gv4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = unpack2<T>(ov[i]), b = unpack2<T>(gv[i]);
        dot = fmaf(a.x, b.x, fmaf(a.y, b.y, dot));
      }
      if (reset) {
        acc[2 * c] = make_float4(0.f, 0.f, 0.f, 0.f);
        acc[2 * c + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int m = kRowLanes / 2; m > 0; m /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, m);
    if (row_ok && sub == 0) {
      const uint32_t b = static_cast<uint32_t>(n) / G;  // N <= INT32_MAX (the launcher's check)
      const int64_t idx = lse_index(b, h, static_cast<uint32_t>(n) - b * G, l, p.H, p.G, p.L);
      const float lse = p.lse[idx];
      p.delta[idx] = dot;
      p.delta[p.B * p.H * p.G * p.L + idx] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
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
