// The Hopper (wgmma) set-attention forward: its instances (head dim 40; three tile shapes; fp16 and bf16) and
// set_attention_wgmma_runnable. Compiled for every arch of the build; the kernels have a body only in the sm_90a
// pass (set_attention_wgmma.cuh), and the launcher runs them only where that pass exists and the device is 9.0.
#include <cuda_runtime.h>

#include "set_attention_wgmma.cuh"

namespace jedi {

bool set_attention_wgmma_runnable(int64_t D) {
#if defined(JEDI_SM90A)  // setup.py / CMake define it when sm_90a is among the build's archs
  if (!set_attn::wgmma_fwd_head_dim(D)) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
#else
  (void)D;
  return false;
#endif
}

namespace set_attn {

template <typename T>
cudaError_t run_fwd_wgmma_t(const SetAttnParams& p, cudaStream_t stream) {
  switch (p.fwd_wgmma) {
    case 1: return run_fwd_wgmma_instance<T, 64, 2>(p, stream);
    case 2: return run_fwd_wgmma_instance<T, 128, 2>(p, stream);
    case 3: return run_fwd_wgmma_instance<T, 128, 3>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Called by set_attention_fwd_launch when p.fwd_wgmma != 0 (after its argument checks).
cudaError_t run_fwd_wgmma(const SetAttnParams& p, int dtype, cudaStream_t stream) {
  if (!set_attention_wgmma_runnable(p.D)) return cudaErrorInvalidValue;
  return dtype == 0 ? run_fwd_wgmma_t<__half>(p, stream) : run_fwd_wgmma_t<__nv_bfloat16>(p, stream);
}

}  // namespace set_attn
}  // namespace jedi
