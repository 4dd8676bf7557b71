// The Hopper (wgmma) set-attention forward at head dim 80: three tile shapes, fp16 and bf16 (opt-in through
// JEDI_CUDA_FWD_WGMMA; dispatched from set_attention_fwd_wgmma_hdim40.cu). The kernels have a body only in the sm_90a
// pass (set_attention_wgmma.cuh).
#include <cuda_runtime.h>

#include "set_attention_wgmma.cuh"

namespace jedi {
namespace set_attn {

template cudaError_t run_fwd_wgmma_hdim<80>(const SetAttnParams& p, int dtype, cudaStream_t stream);

}  // namespace set_attn
}  // namespace jedi
