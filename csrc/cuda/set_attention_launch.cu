// Entry points of the CUDA set attention: argument validation, head-dim/dtype dispatch to the compiled instances,
// and the backward's sequence preprocess (delta, dQ-accumulator reset) -> main kernel -> dQ conversion (or, split:
// preprocess -> dK/dV kernel -> dQ kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "set_attention.cuh"
#include "set_attention_bwd_aux.cuh"
#include "set_attention_dispatch.cuh"
#include "set_attention_wgmma.cuh"

namespace jedi {
namespace set_attn {
namespace {

// f(std::integral_constant<int, kD>{}) for a compiled instance head dim kD (set_attn::instance_head_dim), else
// `otherwise`: the one switch over the instances that every per-head-dim dispatch below goes through.
template <typename R, typename F>
R on_instance(int kD, R otherwise, F&& f) {
  static_assert(kNumInstances == 9, "one case per instance_head_dim");
  switch (kD) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 48: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 160: return f(std::integral_constant<int, 160>{});
    case 192: return f(std::integral_constant<int, 192>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return otherwise;
  }
}

template <typename T>
cudaError_t dispatch_fwd(const SetAttnParams& p, cudaStream_t s) {
  return on_instance(padded_head_dim(p.D), cudaErrorInvalidValue,
                     [&](auto kD) { return run_fwd<T, decltype(kD)::value>(p, s); });
}

template <typename T>
cudaError_t dispatch_bwd(const SetAttnBwdParams& p, cudaStream_t s) {
  return on_instance(padded_head_dim(p.D), cudaErrorInvalidValue,
                     [&](auto kD) { return run_bwd<T, decltype(kD)::value>(p, s); });
}

template <typename T>
cudaError_t bwd_all(const SetAttnBwdParams& p, cudaStream_t s) {
  const int64_t rows = p.B * p.G * p.L * p.H;
  if (!row_grid_fits(p.B * p.G, p.L, p.H)) return cudaErrorInvalidValue;
  const RowGrid pg = row_grid(p.B * p.G, p.L, p.H);
  set_attn_bwd_preprocess_kernel<T>
      <<<dim3(static_cast<unsigned>(pg.x), static_cast<unsigned>(pg.y)), kRowThreads, 0, s>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  e = dispatch_bwd<T>(p, s);
  if (e != cudaSuccess || p.bwd_split != 0) return e;  // the split backward wrote dq itself
  const int64_t n4 = rows * p.D / 4;
  const int64_t blocks = ceil_div(n4, 256) < 65536 ? ceil_div(n4, 256) : 65536;  // grid-stride beyond
  set_attn_dq_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(p.dq_accum, static_cast<T*>(p.dq), n4,
                                                                            p.scale);
  return cudaGetLastError();
}

template <typename T>
int dispatch_split_ctas_per_sm(int kD) {
  return on_instance(kD, 0, [](auto d) { return fwd_split_ctas_per_sm<T, decltype(d)::value>(); });
}

// p with the instance choices it leaves to the shape filled in (fwd_shape_row_blocks): only the row blocks of a
// one-stage mma.sync launch that asks for none.
SetAttnParams with_shape_defaults(const SetAttnParams& p) {
  SetAttnParams r = p;
  const int kD = padded_head_dim(p.D);
  if (r.fwd_row_blocks == 0 && r.fwd_stages <= 1 && r.fwd_wgmma == 0 && kD != 0)
    r.fwd_row_blocks = fwd_shape_row_blocks(kD, p.G, p.L);
  return r;
}

// Whether a launch of p runs the Hopper forward (it has no splits).
bool runs_wgmma(const SetAttnParams& p) {
  return p.fwd_wgmma != 0 && set_attention_wgmma_runnable(p.D) && wgmma_variant_compiled(p.D, p.fwd_wgmma);
}

// Whether the mma.sync instance a launch of p runs has a split variant.
bool instance_has_splits(const SetAttnParams& p) {
  const int kD = padded_head_dim(p.D);
  if (kD == 0) return false;
  const int stages = p.fwd_stages == 0 ? fwd_default_stages(kD) : p.fwd_stages;
  return fwd_has_splits(kD, fwd_launch_row_blocks(kD, p.fwd_row_blocks, stages), stages);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool aligned8(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 7u) == 0; }
bool strides_ok(int64_t sn, int64_t sl) { return sn % 8 == 0 && sl % 8 == 0; }

}  // namespace
}  // namespace set_attn

cudaError_t set_attention_fwd_launch(const SetAttnParams& p_in, int dtype, cudaStream_t stream) {
  using namespace set_attn;
  const SetAttnParams p = with_shape_defaults(p_in);
  if (set_attention_supported(p.D, dtype) != nullptr) return cudaErrorInvalidValue;
  if (p.B < 0 || p.G < 1 || p.L < 0 || p.H < 1) return cudaErrorInvalidValue;
  if (p.fwd_row_blocks != 0 && !fwd_has_row_blocks(padded_head_dim(p.D), p.fwd_row_blocks))
    return cudaErrorInvalidValue;
  if (p.fwd_stages != 0 &&
      !fwd_has_stages(padded_head_dim(p.D), fwd_launch_row_blocks(padded_head_dim(p.D), p.fwd_row_blocks, p.fwd_stages),
                      p.fwd_stages))
    return cudaErrorInvalidValue;
  if (p.fwd_wgmma < 0 || p.fwd_wgmma > kWgmmaVariants) return cudaErrorInvalidValue;
  if (p.fwd_splits < 0 || p.fwd_splits > kMaxFwdSplits) return cudaErrorInvalidValue;
  if (p.fwd_splits > 1 && (!instance_has_splits(p) || p.out_accum == nullptr || p.lse_accum == nullptr))
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.L == 0) return cudaSuccess;  // nothing to compute
  if (p.fwd_splits > 1 && (!aligned16(p.out_accum) || !aligned8(p.lse_accum))) return cudaErrorMisalignedAddress;
  // 16-byte vector/cp.async access of every row chunk
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out) ||
      !strides_ok(p.q_stride_n, p.q_stride_l) || !strides_ok(p.k_stride_n, p.k_stride_l) ||
      !strides_ok(p.v_stride_n, p.v_stride_l))
    return cudaErrorMisalignedAddress;
  // 32-bit offsets inside a key tile and 32-bit walk counters (set_attention_tiles.cuh; the glue copies tensors with
  // larger row strides)
  if (!key_tiles_fit(p, 192, 32)) return cudaErrorInvalidValue;
  // the Hopper forward where it applies (an sm_90a build on a 9.0 device, head dim 40, 80 or 160 with the variant
  // compiled for it); elsewhere the request falls back to the mma.sync kernels, like the other instance switches
  if (p.fwd_splits <= 1 && runs_wgmma(p)) return run_fwd_wgmma(p, dtype, stream);
  return dtype == 0 ? dispatch_fwd<__half>(p, stream) : dispatch_fwd<__nv_bfloat16>(p, stream);
}

int set_attention_fwd_splits(const SetAttnParams& p_in, int dtype, int requested) {
  using namespace set_attn;
  const SetAttnParams p = with_shape_defaults(p_in);
  if (requested == 1 || (dtype != 0 && dtype != 1) || runs_wgmma(p) || !instance_has_splits(p)) return 1;
  if (requested > 1) return requested < kMaxFwdSplits ? requested : kMaxFwdSplits;
  if (p.B <= 0 || p.L <= 0 || p.G < 1 || p.H < 1) return 1;
  const int kD = padded_head_dim(p.D);
  const FwdConfig c = fwd_config(kD, fwd_default_row_blocks(kD), 1);
  const Grid3 g = fwd_grid(p.B, p.G, p.L, p.H, c.block_m);
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  const int per_sm =
      dtype == 0 ? dispatch_split_ctas_per_sm<__half>(kD) : dispatch_split_ctas_per_sm<__nv_bfloat16>(kD);
  return fwd_auto_splits(g.x * g.y * g.z, p.G * ceil_div(p.L, c.block_n), sms, per_sm);
}

cudaError_t set_attention_bwd_launch(const SetAttnBwdParams& p, int dtype, cudaStream_t stream) {
  using namespace set_attn;
  if (set_attention_supported(p.D, dtype) != nullptr) return cudaErrorInvalidValue;
  if (p.B < 0 || p.G < 1 || p.L < 0 || p.H < 1) return cudaErrorInvalidValue;
  if (p.bwd_key_blocks != 0 && !bwd_has_key_blocks(padded_head_dim(p.D), p.bwd_key_blocks))
    return cudaErrorInvalidValue;
  if (p.bwd_warps != 0 &&
      !bwd_has_warps(padded_head_dim(p.D),
                     p.bwd_key_blocks == 0 ? bwd_default_key_blocks(padded_head_dim(p.D)) : p.bwd_key_blocks,
                     p.bwd_warps))
    return cudaErrorInvalidValue;
  if (p.bwd_split != 0 && p.bwd_split != 1) return cudaErrorInvalidValue;
  // the split backward's dQ kernel walks key tiles as the forward does (32-bit offsets inside a tile)
  if (p.bwd_split == 1 && (!key_tiles_fit(p, 64, 32) || p.do_stride_l > max_tile_stride_l(64)))
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.L == 0) return cudaSuccess;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out) || !aligned16(p.dout) ||
      !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv) || (p.bwd_split == 0 && !aligned16(p.dq_accum)) ||
      !strides_ok(p.q_stride_n, p.q_stride_l) || !strides_ok(p.k_stride_n, p.k_stride_l) ||
      !strides_ok(p.v_stride_n, p.v_stride_l) || !strides_ok(p.o_stride_n, p.o_stride_l) ||
      !strides_ok(p.do_stride_n, p.do_stride_l))
    return cudaErrorMisalignedAddress;
  return dtype == 0 ? bwd_all<__half>(p, stream) : bwd_all<__nv_bfloat16>(p, stream);
}

}  // namespace jedi
