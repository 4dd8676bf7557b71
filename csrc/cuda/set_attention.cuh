// Torch-free interface of the CUDA set-wise flash attention (the `cuda` backend of jk.set_attention).
//
// Semantics (jedi_kernels.reference.set_attention_reference): q, k, v are (N, L, H*D), N = B*G. For set b and head
// h the sequence is the G*L tokens of the set's G images; out = softmax(scale * q k^T) v over the keys each query
// may attend (all of the set, or the images allowed by set_mask), lse = natural-log logsumexp of scale * q.k over
// those keys. Backward: FlashAttention-2 (recompute P from lse; dq, dk, dv).
//
// Layouts: q, k, v, out_fwd, dout: any row strides (stride of N and of L, in elements), unit stride inside the
// H*D row, 16-byte aligned base pointers, strides multiples of 8 elements (views of a fused (N, L, 3*H*D) qkv
// projection qualify). out, dq, dk, dv: contiguous (N, L, H*D). lse, delta: contiguous (B, H, G*L) float32.
// set_mask: contiguous uint8 (G, G) on the device (set_mask[i*G + j] != 0: queries of image i may attend keys of
// image j) or nullptr for full joint attention.
// Head dims: every multiple of 8 up to 256 (set_attn::padded_head_dim); 40, 80 and 160 run padded to 48, 80, 160.
// Everything is enqueued on `stream`: no host synchronization, no allocation (CUDA-graph capturable).
#pragma once

#if defined(JEDI_SET_ATTN_EMULATE)  // CPU test build: stand-ins for the CUDA runtime types
#include "tests/set_attention_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "set_attention_plan.h"

namespace jedi {

struct SetAttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_n, q_stride_l;
  int64_t k_stride_n, k_stride_l;
  int64_t v_stride_n, v_stride_l;
  void* out;                // (N, L, H*D) contiguous, q's dtype
  float* lse;               // (B, H, G*L) float32
  const uint8_t* set_mask;  // (G, G) uint8 or nullptr
  int64_t B, G, L, H, D;
  float scale;
  // Forward instance: m16 row blocks per warp (1: 16 query rows per warp; 2: 32, FlashAttention-2's layout, compiled
  // for padded head dims <= 80 and 160, set_attn::fwd_has_row_blocks); 0 = by shape (set_attn::fwd_shape_row_blocks:
  // the head dim's default, 32 rows at 160 for sets of more than 1024 keys).
  int fwd_row_blocks;
  // Forward loop: 1 = FlashAttention-2's, 2 = software-pipelined (the next key tile's scores computed while this
  // tile's exponentials run; compiled for padded head dims <= 80, with 32 rows per warp up to 64,
  // set_attn::fwd_has_stages; with fwd_row_blocks == 0 a two-stage launch at 65-80 takes 16 rows per warp,
  // set_attn::fwd_launch_row_blocks); 0 = the default.
  int fwd_stages;
  // Hopper forward (set_attention_wgmma.cuh): 0 = off (the mma.sync kernels above); 1, 2, 3 = 64 keys x 2
  // warpgroups, 128 x 2, 128 x 3 per CTA; only where set_attention_wgmma_runnable(D) (an sm_90a build on a
  // compute-capability-9.0 device, D = 40), else the mma.sync kernels run.
  int fwd_wgmma;
  // Key splits (set_attn::fwd_has_splits instances: the one-stage mma.sync loop with the head dim's default row
  // blocks): 0 or 1 = one CTA per query tile; S > 1 (<= set_attn::kMaxFwdSplits) = S CTAs per query tile, each over
  // one run of its allowed key tiles (set_attn::split_range), writing float32 partial results to out_accum and
  // lse_accum, which a second kernel merges into out and lse. Takes precedence over fwd_wgmma.
  // set_attention_fwd_splits picks S for a launch.
  int fwd_splits;
  float* out_accum;  // S * N * L * H * D float32 (set_attn::fwd_split_out_elems), 16-byte aligned; S > 1 only
  float* lse_accum;  // S * B * H * G * L float32 (set_attn::fwd_split_lse_elems); S > 1 only
};

struct SetAttnBwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // forward output
  const void* dout;  // gradient of out
  int64_t q_stride_n, q_stride_l;
  int64_t k_stride_n, k_stride_l;
  int64_t v_stride_n, v_stride_l;
  int64_t o_stride_n, o_stride_l;
  int64_t do_stride_n, do_stride_l;
  const float* lse;         // (B, H, G*L) float32, from the forward
  const uint8_t* set_mask;  // (G, G) uint8 or nullptr
  void* dq;                 // (N, L, H*D) contiguous, input dtype
  void* dk;
  void* dv;
  float* dq_accum;  // workspace: N*L*H*D float32 (set_attn_dq_accum_elems); zeroed by the launch itself (unused
                    // by the split backward, bwd_split)
  float* delta;     // workspace: 2*B*H*G*L float32 (set_attn_delta_elems): rowsum(dout * out), then lse in log2
                    // units (+inf where lse is -inf), both written by the launch's first kernel
  int64_t B, G, L, H, D;
  float scale;
  // Backward instance: m16 key blocks per warp (1: 16 keys per warp; 2: 32, compiled for padded head dims <= 48,
  // set_attn::bwd_has_key_blocks); 0 = the head dim's default.
  int bwd_key_blocks;
  // Backward warps per CTA: 4, or 8 (128 keys per CTA; compiled for padded head dim 80 with 16 keys per warp,
  // set_attn::bwd_has_warps); 0 = the default.
  int bwd_warps;
  // 1: the split backward (set_attn::DqConfig): the main kernel computes dK and dV only and a second kernel dQ over
  // the query tiles, no float32 atomics; dq_accum is not used then (may be nullptr). 0 = the fused backward.
  int bwd_split;
};

// dtype: 0 = float16, 1 = bfloat16.
// Returns cudaErrorInvalidValue for unsupported shapes/dtypes (see set_attention_supported) and the launch error
// (cudaGetLastError) otherwise.
cudaError_t set_attention_fwd_launch(const SetAttnParams& p, int dtype, cudaStream_t stream);
cudaError_t set_attention_bwd_launch(const SetAttnBwdParams& p, int dtype, cudaStream_t stream);

// The key-split count for launching p (fwd_splits, out_accum and lse_accum aside) on the current device: `requested`
// 0 = automatic (set_attn::fwd_auto_splits with the split instance's CTAs per SM: more than 1 only for grids that
// fill less than 80 % of one wave), 1 = none, S > 1 = S (at most set_attn::kMaxFwdSplits). 1 wherever the launch
// would run an instance without splits (the Hopper forward, the two-stage loop, a non-default row-block count).
// dtype: 0 = float16, 1 = bfloat16.
int set_attention_fwd_splits(const SetAttnParams& p, int dtype, int requested);

// Whether the Hopper (wgmma) forward can run head dim D on the current device: compiled for sm_90a (setup.py's
// default for 9.0), a compute-capability-9.0 device, D = 40.
bool set_attention_wgmma_runnable(int64_t D);

// Workspace sizes (elements of float32) the caller allocates for the backward.
inline int64_t set_attn_dq_accum_elems(int64_t B, int64_t G, int64_t L, int64_t H, int64_t D) {
  return B * G * L * H * D;
}
inline int64_t set_attn_delta_elems(int64_t B, int64_t G, int64_t L, int64_t H) { return 2 * B * H * G * L; }

// nullptr when (D, dtype) is supported, else a static message naming what is supported.
inline const char* set_attention_supported(int64_t D, int dtype) {
  if (dtype != 0 && dtype != 1) return "dtype must be float16 or bfloat16";
  if (set_attn::padded_head_dim(D) == 0)
    return "head_dim must be a multiple of 8 in [8, 256] (40, 80, 160 have tuned instances)";
  return nullptr;
}

}  // namespace jedi
