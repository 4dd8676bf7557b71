// The Hopper (wgmma) set-attention forward: its head-dim-40 instances (three tile shapes; fp16 and bf16), the dispatch
// by head dim (80 and 160: set_attention_fwd_wgmma_hdim80.cu / _hdim160.cu, built in parallel) and
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

template cudaError_t run_fwd_wgmma_hdim<40>(const SetAttnParams& p, int dtype, cudaStream_t stream);
extern template cudaError_t run_fwd_wgmma_hdim<80>(const SetAttnParams& p, int dtype, cudaStream_t stream);
extern template cudaError_t run_fwd_wgmma_hdim<160>(const SetAttnParams& p, int dtype, cudaStream_t stream);

// Called by set_attention_fwd_launch when p.fwd_wgmma != 0 (after its argument checks).
cudaError_t run_fwd_wgmma(const SetAttnParams& p, int dtype, cudaStream_t stream) {
  if (!set_attention_wgmma_runnable(p.D)) return cudaErrorInvalidValue;
  switch (p.D) {
    case 40: return run_fwd_wgmma_hdim<40>(p, dtype, stream);
    case 80: return run_fwd_wgmma_hdim<80>(p, dtype, stream);
    case 160: return run_fwd_wgmma_hdim<160>(p, dtype, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace set_attn
}  // namespace jedi
