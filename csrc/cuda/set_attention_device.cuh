// Device primitives of the set-attention kernels: PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16), 16-bit
// packing, constants. Built with JEDI_SET_ATTN_EMULATE (CPU tests only), the PTX wrappers come from
// tests/set_attention_emulation.h instead, which runs the very same kernel source on the CPU with lockstep warps.
#pragma once

#if defined(JEDI_SET_ATTN_EMULATE)
#include "tests/set_attention_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "set_attention_plan.h"

namespace jedi {
namespace set_attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Lazy softmax rescaling (forward): the running max moves only when a tile exceeds it by more than this many
// binary orders of magnitude, so probabilities stay <= 2^8 = 256 before normalization.
constexpr float kLazyRescaleLog2 = 8.f;

#if !defined(JEDI_SET_ATTN_EMULATE)
// ---- PTX wrappers ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg) and registers; completes at cp_async_wait_all.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
}
// The same copy with src-size = full ? 16 : 0: when !full the 16 bytes are zero-filled and nothing is read, so gmem
// may then point past the tensor (CUTLASS's zfill copies rely on the same). One instruction instead of a branch
// between the copy and a shared-memory store of zeros, and no select of a safe address (which cost the backward's
// 32-keys-per-warp instance 8 bytes of spills).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(full ? 16 : 0)
               : "memory");
}
// A 4-byte copy (.ca: below 16 bytes cp.async has no .cg), src-size 4 or 0: when !full 4 zero bytes land and nothing
// is read. For the backward's per-row floats (lse, delta), which rows of any length make only 4-byte aligned.
__device__ __forceinline__ void cp_async4_zfill(void* smem, const void* gmem, bool full) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(full ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b on one 16x8x16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// 2^x on the SFU without the denormal fix-up exp2f carries without --use_fast_math (results below 2^-126 flush to
// 0: irrelevant for softmax weights); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif  // !JEDI_SET_ATTN_EMULATE

// Two floats -> two 16-bit values in one register, the first in the low half (the lower column of a fragment).
// memcpy is the portable bit cast (a plain register move after compilation).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  __half2 h;
  memcpy(&h, &v, 4);
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  __nv_bfloat162 h;
  memcpy(&h, &v, 4);
  return __bfloat1622float2(h);
}

// Flipping the sign bits of a packed pair negates both values exactly (fp16 and bf16 alike). A negative softmax
// scale is run as (-q) k^T * |scale|, so the running maximum is always taken over scores multiplied by scale >= 0.
constexpr uint32_t kSignBits = 0x80008000u;

}  // namespace set_attn
}  // namespace jedi
