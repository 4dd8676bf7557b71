// Fused JeDi input preparation on the GPU: read x_t and x0 once, write cat(x_t, x0 * (1 - m), m) once.
// Memory-bound: every thread moves 16-byte vectors where the plane size allows it (NCHW planes of HW elements),
// so the kernel streams at copy bandwidth. NHWC gets one thread per (pixel, output channel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "prepare_inputs.cuh"

namespace jedi {
namespace {

// Conversions through the cuda_fp16/cuda_bf16 intrinsics, never the implicit __half/__nv_bfloat16 <-> float
// operators: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (and
// the operator macros), which remove those, and this file must compile with and without them.
template <typename T>
struct Cvt {  // float, double
  static __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
  static __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ T scale_by(T x, float s) {
  return Cvt<T>::from_float(Cvt<T>::to_float(x) * s);
}
template <>
__device__ __forceinline__ double scale_by<double>(double x, float s) {
  return x * static_cast<double>(s);
}

// 16-byte vector of T
template <typename T>
struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// NCHW: grid over (N * (2C+1)) planes x chunks of each plane. kVec elements per thread when HW % kVec == 0.
template <typename T, bool kVector>
__global__ void prepare_nchw_kernel(const T* __restrict__ x_t, const T* __restrict__ x0,
                                    const float* __restrict__ mask, T* __restrict__ out, int64_t C, int64_t HW,
                                    int64_t planes) {
  constexpr int kV = kVector ? Vec<T>::kN : 1;
  const int64_t Co = 2 * C + 1;
  const int64_t plane = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;  // n * Co + c
  if (plane >= planes) return;  // the (y, z) split may overshoot
  const int64_t n = plane / Co, c = plane % Co;
  const float m = mask[n];
  T* dst = out + plane * HW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kV;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kV; i < HW; i += stride) {
    if constexpr (kVector) {
      Vec<T> r;
      if (c < C) {
        r = *reinterpret_cast<const Vec<T>*>(x_t + (n * C + c) * HW + i);
      } else if (c < 2 * C) {
        r = *reinterpret_cast<const Vec<T>*>(x0 + (n * C + c - C) * HW + i);
#pragma unroll
        for (int j = 0; j < kV; ++j) r.v[j] = scale_by(r.v[j], 1.0f - m);
      } else {
#pragma unroll
        for (int j = 0; j < kV; ++j) r.v[j] = Cvt<T>::from_float(m);
      }
      *reinterpret_cast<Vec<T>*>(dst + i) = r;
    } else {
      T r;
      if (c < C) r = x_t[(n * C + c) * HW + i];
      else if (c < 2 * C) r = scale_by(x0[(n * C + c - C) * HW + i], 1.0f - m);
      else r = Cvt<T>::from_float(m);
      dst[i] = r;
    }
  }
}

// NHWC: one thread per output element, in output order (coalesced writes; reads of C-wide rows are contiguous too).
template <typename T>
__global__ void prepare_nhwc_kernel(const T* __restrict__ x_t, const T* __restrict__ x0,
                                    const float* __restrict__ mask, T* __restrict__ out, int64_t C, int64_t HW,
                                    int64_t total) {
  const int64_t Co = 2 * C + 1;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pix = e / Co, c = e % Co, n = pix / HW;
    const float m = mask[n];
    T r;
    if (c < C) r = x_t[pix * C + c];
    else if (c < 2 * C) r = scale_by(x0[pix * C + c - C], 1.0f - m);
    else r = Cvt<T>::from_float(m);
    out[e] = r;
  }
}

template <typename T>
__global__ void prepare_backward_nchw_kernel(const T* __restrict__ g, const float* __restrict__ mask,
                                             T* __restrict__ gx, T* __restrict__ g0, int64_t C, int64_t HW,
                                             int64_t planes) {
  const int64_t Co = 2 * C + 1;
  const int64_t plane = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;  // n * C + c
  if (plane >= planes) return;  // the (y, z) split may overshoot
  const int64_t n = plane / C, c = plane % C;
  const float keep = 1.0f - mask[n];
  const T* s1 = g + (n * Co + c) * HW;
  const T* s2 = g + (n * Co + C + c) * HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < HW;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gx[plane * HW + i] = s1[i];
    g0[plane * HW + i] = scale_by(s2[i], keep);
  }
}

template <typename T>
__global__ void prepare_backward_nhwc_kernel(const T* __restrict__ g, const float* __restrict__ mask,
                                             T* __restrict__ gx, T* __restrict__ g0, int64_t C, int64_t HW,
                                             int64_t total) {
  const int64_t Co = 2 * C + 1;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pix = e / C, c = e % C;
    const float keep = 1.0f - mask[pix / HW];
    gx[e] = g[pix * Co + c];
    g0[e] = scale_by(g[pix * Co + C + c], keep);
  }
}

constexpr int kThreads = 256;

// Planes go on grid.y (split over grid.z past 65535); chunks of a plane on grid.x.
dim3 plane_grid(int64_t planes, int64_t HW, int per_thread) {
  int64_t chunks = (HW + static_cast<int64_t>(kThreads) * per_thread - 1) / (static_cast<int64_t>(kThreads) * per_thread);
  if (chunks > 1024) chunks = 1024;  // grid-stride loop covers the rest
  int64_t z = (planes + 65534) / 65535;
  int64_t y = (planes + z - 1) / z;
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

unsigned flat_blocks(int64_t total) {
  int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b > 65535 * 8 ? 65535 * 8 : (b < 1 ? 1 : b));
}

template <typename T>
cudaError_t launch_fwd(const PrepareParams& p, cudaStream_t s) {
  const T* a = static_cast<const T*>(p.x_t);
  const T* b = static_cast<const T*>(p.x0);
  T* o = static_cast<T*>(p.out);
  const int64_t Co = 2 * p.C + 1;
  if (p.channels_last) {
    const int64_t total = p.N * p.HW * Co;
    prepare_nhwc_kernel<T><<<flat_blocks(total), kThreads, 0, s>>>(a, b, p.mask, o, p.C, p.HW, total);
  } else {
    const int64_t planes = p.N * Co;
    // planes start at multiples of HW elements: vectors stay 16-byte aligned iff HW is a multiple of the width
    const bool vec = (p.HW % Vec<T>::kN == 0) && (reinterpret_cast<uintptr_t>(a) % 16 == 0) &&
                     (reinterpret_cast<uintptr_t>(b) % 16 == 0) && (reinterpret_cast<uintptr_t>(o) % 16 == 0);
    dim3 grid = plane_grid(planes, p.HW, vec ? Vec<T>::kN : 1);
    if (vec) prepare_nchw_kernel<T, true><<<grid, kThreads, 0, s>>>(a, b, p.mask, o, p.C, p.HW, planes);
    else prepare_nchw_kernel<T, false><<<grid, kThreads, 0, s>>>(a, b, p.mask, o, p.C, p.HW, planes);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const PrepareBackwardParams& p, cudaStream_t s) {
  const T* g = static_cast<const T*>(p.grad_out);
  T* gx = static_cast<T*>(p.grad_x_t);
  T* g0 = static_cast<T*>(p.grad_x0);
  if (p.channels_last) {
    const int64_t total = p.N * p.HW * p.C;
    prepare_backward_nhwc_kernel<T><<<flat_blocks(total), kThreads, 0, s>>>(g, p.mask, gx, g0, p.C, p.HW, total);
  } else {
    const int64_t planes = p.N * p.C;
    dim3 grid = plane_grid(planes, p.HW, 1);
    prepare_backward_nchw_kernel<T><<<grid, kThreads, 0, s>>>(g, p.mask, gx, g0, p.C, p.HW, planes);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t prepare_inputs_launch(const PrepareParams& p, DType dtype, cudaStream_t stream) {
  if (p.N * p.C * p.HW == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(p, stream);
    case DType::kFloat16: return launch_fwd<__half>(p, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return launch_fwd<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t prepare_inputs_backward_launch(const PrepareBackwardParams& p, DType dtype, cudaStream_t stream) {
  if (p.N * p.C * p.HW == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_bwd<float>(p, stream);
    case DType::kFloat16: return launch_bwd<__half>(p, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(p, stream);
    case DType::kFloat64: return launch_bwd<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jedi
