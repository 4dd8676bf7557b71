// The two memory-bound kernels around the set-attention backward main kernel: delta = rowsum(dO o O) (with the
// reset of the fp32 dQ accumulator) before it, and dq = scale * dq_accum (fp32 -> T) after it.
#pragma once

#include "set_attention.cuh"
#include "set_attention_device.cuh"

namespace jedi {
namespace set_attn {

constexpr int kPreWarps = 8;

// One warp per (image row n, position l, head h): delta = sum_d dO * O over the head's D columns (lane c holds the
// 16-byte chunk c; D <= 256 means at most 32 chunks), and the same columns of dq_accum are zeroed so that the main
// kernel's atomics start from 0 (no memset: the whole backward stays three kernels on one stream). It also writes the
// row's lse in log2 units (lse log2(e); +inf where lse = -inf, a row with no probability: P = 0) after the delta
// array, so the main kernel copies both per query tile with cp.async and uses them as they land.
template <typename T>
__global__ void __launch_bounds__(32 * kPreWarps) set_attn_bwd_preprocess_kernel(const SetAttnBwdParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kPreWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t H = p.H, L = p.L, G = p.G, D = p.D;
  if (w >= p.B * G * L * H) return;  // whole warps only: the shuffles below stay convergent
  const int64_t h = w % H, l = (w / H) % L, n = w / (H * L);
  float dot = 0.f;
  if (lane < D / 8) {
    const int64_t col = h * D + lane * 8;
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + n * p.o_stride_n +
                                                    l * p.o_stride_l + col);
    const uint4 g = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + n * p.do_stride_n +
                                                    l * p.do_stride_l + col);
    const uint32_t ov[4] = {o.x, o.y, o.z, o.w}, gv[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = unpack2<T>(ov[i]), c = unpack2<T>(gv[i]);
      dot = fmaf(a.x, c.x, fmaf(a.y, c.y, dot));
    }
    float4* acc = reinterpret_cast<float4*>(p.dq_accum + (n * L + l) * H * D + col);
    acc[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (lane == 0) {
    const int64_t idx = lse_index(n / G, h, n % G, l, H, G, L);
    const float lse = p.lse[idx];
    p.delta[idx] = dot;
    p.delta[p.B * H * G * L + idx] = lse == -INFINITY ? INFINITY : lse * kLog2e;
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
