// Declarations of the per-head-dim kernel launchers of set attention. Each is explicitly instantiated in one
// set_attention_{fwd,bwd}_*.cu file (so nvcc builds the instances in parallel) and called by the dispatcher in
// set_attention_launch.cu, which picks the instance from the head dim (set_attn::padded_head_dim).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "set_attention.cuh"

namespace jedi {
namespace set_attn {

// Forward: out and lse for every (query tile, head, set).
template <typename T, int kD>
cudaError_t run_fwd(const SetAttnParams& p, cudaStream_t stream);

// CTAs per SM of the forward's split instance (the head dim's default row blocks, one stage) on the current device;
// 0 when unknown.
template <typename T, int kD>
int fwd_split_ctas_per_sm();

// Backward main kernel: dK, dV written, dQ accumulated into p.dq_accum (float32, unscaled). Needs p.delta filled and
// p.dq_accum zeroed first (set_attention_bwd_launch runs the preprocess kernel before it and the convert after).
template <typename T, int kD>
cudaError_t run_bwd(const SetAttnBwdParams& p, cudaStream_t stream);

// The Hopper forward (set_attention_fwd_wgmma_hdim{40,80,160}.cu): variant p.fwd_wgmma of head dim 40, 80 or 160,
// where set_attention_wgmma_runnable(p.D); dtype 0 = float16, 1 = bfloat16.
cudaError_t run_fwd_wgmma(const SetAttnParams& p, int dtype, cudaStream_t stream);

}  // namespace set_attn
}  // namespace jedi
