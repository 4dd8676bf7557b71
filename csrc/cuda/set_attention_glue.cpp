// Torch glue of the CUDA set attention (schemas in csrc/schemas.cpp): argument checks naming the argument, layout
// fix-ups (a copy only where the kernel's 16-byte vector loads cannot read a view), allocation of outputs and
// workspaces, stream and device, launch, error check. No host synchronization: capturable in CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "check.h"
#include "set_attention.cuh"

namespace jedi {
namespace {

int dtype_code(const at::Tensor& q, const char* op) {
  if (q.scalar_type() == at::kHalf) return 0;
  if (q.scalar_type() == at::kBFloat16) return 1;
  JEDI_CHECK(false, op, ": q must be float16 or bfloat16 for the cuda backend, got ", q.scalar_type());
  return -1;
}

void check_like(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  JEDI_CHECK(t.defined(), op, ": ", name, " is undefined");
  JEDI_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  JEDI_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  JEDI_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
             t.scalar_type());
  JEDI_CHECK(t.dim() == 3, op, ": ", name, " must have shape (N, L, heads*head_dim), got ", t.sizes());
  JEDI_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  JEDI_CHECK(t.size(2) <= 1 || t.stride(2) == 1, op, ": ", name,
             " must have unit stride in its last dim (heads*head_dim), got strides ", t.strides());
}

// The kernels read rows with 16-byte vectors: base 16-byte aligned and row strides multiples of 8 elements (true for
// contiguous tensors and for views of a fused qkv projection), and keep offsets inside a tile as 32-bit ints (row
// strides up to set_attn::kMaxStrideL, ~11 M elements). Anything else is copied once.
at::Tensor kernel_view(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(1) <= set_attn::kMaxStrideL && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

struct Shape {
  int64_t B, G, L, H, D;
};

Shape check_shape(const at::Tensor& q, int64_t set_size, int64_t heads, const char* op) {
  JEDI_CHECK(set_size >= 1, op, ": set_size must be >= 1, got ", set_size);
  JEDI_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  const int64_t N = q.size(0), L = q.size(1), HD = q.size(2);
  JEDI_CHECK(N % set_size == 0, op, ": q.shape[0] = N = ", N, " must be a multiple of set_size = ", set_size);
  JEDI_CHECK(HD % heads == 0, op, ": q.shape[2] = ", HD, " must be heads * head_dim with heads = ", heads);
  const int64_t D = HD / heads;
  JEDI_CHECK(HD <= set_attn::kMaxStrideL, op, ": q.shape[2] = heads * head_dim = ", HD,
             " is larger than the cuda backend takes (", set_attn::kMaxStrideL, ")");
  const char* why = set_attention_supported(D, q.scalar_type() == at::kHalf ? 0 : 1);
  JEDI_CHECK(why == nullptr, op, ": head_dim = q.shape[2] / heads = ", D, " is not supported by the cuda backend: ",
             why ? why : "");
  return Shape{N / set_size, set_size, L, heads, D};
}

// bool/uint8 (G, G) mask on q's device -> contiguous uint8 (a small async copy), or an undefined tensor.
at::Tensor mask_u8(const std::optional<at::Tensor>& set_mask, const at::Tensor& q, int64_t G, const char* op) {
  if (!set_mask.has_value() || !set_mask->defined()) return at::Tensor();
  const at::Tensor& m = *set_mask;
  JEDI_CHECK(m.device() == q.device(), op, ": set_mask must be on q's device ", q.device(), ", got ", m.device());
  JEDI_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, op,
             ": set_mask must be a bool (or uint8) tensor, got ", m.scalar_type());
  JEDI_CHECK(m.dim() == 2 && m.size(0) == G && m.size(1) == G, op,
             ": set_mask must have shape (set_size, set_size) = (", G, ", ", G, "), got ", m.sizes());
  return m.to(at::kByte).contiguous();
}

// The fields SetAttnParams and SetAttnBwdParams share: q/k/v pointers and row strides, the mask, the shape, scale.
template <typename Params>
void fill_common(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                 const Shape& s, double scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_n = q.stride(0);
  p.q_stride_l = q.stride(1);
  p.k_stride_n = k.stride(0);
  p.k_stride_l = k.stride(1);
  p.v_stride_n = v.stride(0);
  p.v_stride_l = v.stride(1);
  p.set_mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
  p.B = s.B;
  p.G = s.G;
  p.L = s.L;
  p.H = s.H;
  p.D = s.D;
  p.scale = static_cast<float>(scale);
}

// A kernel-instance switch from the environment variable `name`: 1 or 2 (m16 blocks per warp, or loop stages); unset,
// empty or 0: 0 (the head dim's default). Read per call, so a process can switch (benchmarks time both instances).
int blocks_from_env(const char* name, const char* op) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  const std::string v(env);
  JEDI_CHECK(v == "0" || v == "1" || v == "2", op, ": ", name, " must be 0, 1 or 2, got '", v, "'");
  return v[0] - '0';
}

// JEDI_CUDA_FWD_ROW_BLOCKS=1|2 picks the forward instance with 16 or 32 query rows per warp; 0: by shape
// (set_attn::fwd_default_row_blocks: 32 up to 80, 16 above; set_attn::fwd_shape_row_blocks: 32 at 160 for sets of
// more than 1024 keys). 2 applies where it is compiled (padded head dims <= 80, and 160 on sm_90 devices:
// set_attn::run_fwd falls back to 16 rows before that); other head dims keep their one instance, so one setting
// serves a whole model.
int fwd_row_blocks_from_env(int64_t D, const char* op) {
  const int rb = blocks_from_env("JEDI_CUDA_FWD_ROW_BLOCKS", op);
  return set_attn::fwd_has_row_blocks(set_attn::padded_head_dim(D), rb) ? rb : 0;
}

// JEDI_CUDA_FWD_STAGES=1|2 picks the forward loop: 1 FlashAttention-2's, 2 software-pipelined (the next key tile's
// scores computed while this tile's exponentials run); 0: the default (set_attn::fwd_default_stages). 2 applies where
// it is compiled (padded head dims <= 80; 16 rows per warp at 65-80 unless JEDI_CUDA_FWD_ROW_BLOCKS asks for 32,
// set_attn::fwd_launch_row_blocks); other head dims keep their one loop.
int fwd_stages_from_env(int64_t D, int row_blocks, const char* op) {
  const int stages = blocks_from_env("JEDI_CUDA_FWD_STAGES", op);
  const int kD = set_attn::padded_head_dim(D);
  return set_attn::fwd_has_stages(kD, set_attn::fwd_launch_row_blocks(kD, row_blocks, stages), stages) ? stages : 0;
}

// JEDI_CUDA_FWD_WGMMA=1..5 runs the Hopper forward (warpgroup MMAs; variants: set_attn::wgmma_variant_block_n /
// wgmma_variant_warpgroups) where it applies: an sm_90a build on a compute-capability-9.0 device, head dim 40, 80 or
// 160 with the variant compiled for it (set_attn::wgmma_variant_compiled; the launcher falls back to the mma.sync
// kernels elsewhere, so one setting serves a whole model); 0: off, the mma.sync kernels everywhere; unset or empty:
// variant 1 (64 keys x 2 warpgroups) at head dim 40, which ran 1.10-1.15x faster than mma.sync at every d 40 row of
// the H200 sweep of 2026-11-28 (0.727 vs 0.829 ms at L 4096, ng 2, bf16), unless an mma.sync instance switch
// (JEDI_CUDA_FWD_ROW_BLOCKS / _STAGES) is set: an explicit request for an mma.sync instance wins over the default.
// Head dims 80 and 160 (added after that run, untimed) take it only when asked.
constexpr int kDefaultWgmmaVariant = 1;
bool env_set(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' && std::string(env) != "0";
}
int fwd_wgmma_from_env(int64_t D, const char* op) {
  const char* env = std::getenv("JEDI_CUDA_FWD_WGMMA");
  if (env == nullptr || *env == '\0')
    return D != 40 || env_set("JEDI_CUDA_FWD_ROW_BLOCKS") || env_set("JEDI_CUDA_FWD_STAGES") ? 0 : kDefaultWgmmaVariant;
  const std::string v(env);
  JEDI_CHECK(v.size() == 1 && v[0] >= '0' && v[0] <= '5', op,  // set_attn::kWgmmaVariants
             ": JEDI_CUDA_FWD_WGMMA must be 0, 1, 2, 3, 4 or 5, got '", v, "'");
  return v[0] - '0';
}

// JEDI_CUDA_FWD_SPLITS=0..8 asks for key splits of the forward (set_attention_fwd_splits): unset, empty or 1 =
// none, 0 = automatic (more than one only where the grid fills less than 80 % of one wave of CTAs), S = S splits
// where the launched instance has them (the one-stage mma.sync loop with the head dim's default row blocks).
// Off unless asked: on the H200 (2026-11-28, third run, the torch-free harness's device times) the automatic count
// lost on every shape it splits: d 80 L 1024 set size 1 0.049 ms (2 splits) against 0.037 unsplit, d 160 L 64 set
// size 4 0.027 against 0.024, d 160 L 256 set size 2 0.038 against 0.036.
int fwd_splits_from_env(const char* op) {
  const char* env = std::getenv("JEDI_CUDA_FWD_SPLITS");
  if (env == nullptr || *env == '\0') return 1;
  const std::string v(env);
  JEDI_CHECK(v.size() == 1 && v[0] >= '0' && v[0] <= '8', op, ": JEDI_CUDA_FWD_SPLITS must be one of 0-8, got '", v,
             "'");
  return v[0] - '0';
}

// JEDI_CUDA_BWD_KEY_BLOCKS=1|2 picks the backward instance with 16 or 32 keys per warp; 0: the head dim's default
// (set_attn::bwd_default_key_blocks). 2 applies where it is compiled (padded head dims <= 48); other head dims keep
// their one instance, as for the forward.
int bwd_key_blocks_from_env(int64_t D, const char* op) {
  const int kb = blocks_from_env("JEDI_CUDA_BWD_KEY_BLOCKS", op);
  return set_attn::bwd_has_key_blocks(set_attn::padded_head_dim(D), kb) ? kb : 0;
}

// JEDI_CUDA_BWD_WARPS=4|8 picks the backward CTA: 4 warps, or 8 where compiled: 128 keys per CTA at padded head dim
// 80 (16 keys per warp), the query-split CTA at 160 (64 keys, two warps per 16 keys); unset, empty or 0: the default
// (set_attn::bwd_default_warps: 8 at 80, 4 elsewhere). Elsewhere 8 keeps the head dim's one CTA shape, as for the
// other switches.
int bwd_warps_from_env(int64_t D, int key_blocks, const char* op) {
  const char* env = std::getenv("JEDI_CUDA_BWD_WARPS");
  if (env == nullptr || *env == '\0') return 0;
  const std::string v(env);
  JEDI_CHECK(v == "0" || v == "4" || v == "8", op, ": JEDI_CUDA_BWD_WARPS must be 0, 4 or 8, got '", v, "'");
  const int warps = std::stoi(v);
  const int kD = set_attn::padded_head_dim(D);
  const int kb = key_blocks == 0 ? set_attn::bwd_default_key_blocks(kD) : key_blocks;
  return set_attn::bwd_has_warps(kD, kb, warps) ? warps : 0;
}

// JEDI_CUDA_BWD_SPLIT=1 runs the split backward (set_attn::DqConfig): the main kernel computes dK and dV only and a
// second kernel dQ over the query tiles, no float32 atomics and no dQ accumulator (nor its workspace); unset, empty or
// 0: the fused backward. Opt-in until a GPU run has timed it (twenty-seventh session).
int bwd_split_from_env(const char* op) {
  const char* env = std::getenv("JEDI_CUDA_BWD_SPLIT");
  if (env == nullptr || *env == '\0') return 0;
  const std::string v(env);
  JEDI_CHECK(v == "0" || v == "1", op, ": JEDI_CUDA_BWD_SPLIT must be 0 or 1, got '", v, "'");
  return v[0] - '0';
}

std::tuple<at::Tensor, at::Tensor> set_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t set_size, int64_t heads,
                                                          double scale, const std::optional<at::Tensor>& set_mask) {
  constexpr const char* op = "set_attention_fwd_ext";
  JEDI_CHECK(q_in.defined() && q_in.is_cuda(), op, ": q must be a CUDA tensor");
  check_like(q_in, q_in, op, "q");
  check_like(k_in, q_in, op, "k");
  check_like(v_in, q_in, op, "v");
  const int dtype = dtype_code(q_in, op);
  const Shape s = check_shape(q_in, set_size, heads, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor mask = mask_u8(set_mask, q_in, s.G, op);

  const int64_t N = q_in.size(0), HD = q_in.size(2);
  at::Tensor out = at::empty({N, s.L, HD}, q_in.options());
  at::Tensor lse = at::empty({s.B, s.H, s.G * s.L}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor q = kernel_view(q_in), k = kernel_view(k_in), v = kernel_view(v_in);
  SetAttnParams p{};
  fill_common(p, q, k, v, mask, s, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.fwd_row_blocks = fwd_row_blocks_from_env(s.D, op);
  p.fwd_stages = fwd_stages_from_env(s.D, p.fwd_row_blocks, op);
  p.fwd_wgmma = fwd_wgmma_from_env(s.D, op);
  // key splits for grids too small to fill the GPU: float32 partial results, merged by the launch's second kernel
  const int splits = set_attention_fwd_splits(p, dtype, fwd_splits_from_env(op));
  at::Tensor out_accum, lse_accum;
  if (splits > 1) {
    const auto f32 = q_in.options().dtype(at::kFloat);
    out_accum = at::empty({set_attn::fwd_split_out_elems(s.B, s.G, s.L, s.H, s.D, splits)}, f32);
    lse_accum = at::empty({set_attn::fwd_split_lse_elems(s.B, s.G, s.L, s.H, splits)}, f32);
    p.fwd_splits = splits;
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  const cudaError_t err = set_attention_fwd_launch(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  JEDI_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t set_size, int64_t heads, double scale,
    const std::optional<at::Tensor>& set_mask) {
  constexpr const char* op = "set_attention_bwd_ext";
  JEDI_CHECK(q_in.defined() && q_in.is_cuda(), op, ": q must be a CUDA tensor");
  check_like(q_in, q_in, op, "q");
  check_like(k_in, q_in, op, "k");
  check_like(v_in, q_in, op, "v");
  check_like(out_in, q_in, op, "out");
  JEDI_CHECK(grad_out_in.defined() && grad_out_in.is_cuda() && grad_out_in.device() == q_in.device(), op,
             ": grad_out must be a CUDA tensor on q's device ", q_in.device());
  JEDI_CHECK(grad_out_in.scalar_type() == q_in.scalar_type(), op, ": grad_out must have q's dtype ",
             q_in.scalar_type(), ", got ", grad_out_in.scalar_type());
  JEDI_CHECK(grad_out_in.sizes() == q_in.sizes(), op, ": grad_out must have q's shape ", q_in.sizes(), ", got ",
             grad_out_in.sizes());
  const int dtype = dtype_code(q_in, op);
  const Shape s = check_shape(q_in, set_size, heads, op);
  JEDI_CHECK(lse_in.defined() && lse_in.device() == q_in.device(), op, ": lse must be on q's device ", q_in.device());
  JEDI_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  JEDI_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.H && lse_in.size(2) == s.G * s.L, op,
             ": lse must have shape (B, heads, set_size*L) = (", s.B, ", ", s.H, ", ", s.G * s.L, "), got ",
             lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor mask = mask_u8(set_mask, q_in, s.G, op);

  const int64_t N = q_in.size(0), HD = q_in.size(2);
  at::Tensor dq = at::empty({N, s.L, HD}, q_in.options());
  at::Tensor dk = at::empty({N, s.L, HD}, q_in.options());
  at::Tensor dv = at::empty({N, s.L, HD}, q_in.options());
  if (dq.numel() == 0) return {dq, dk, dv};

  const at::Tensor q = kernel_view(q_in), k = kernel_view(k_in), v = kernel_view(v_in), o = kernel_view(out_in);
  const at::Tensor g = kernel_view(grad_out_in.contiguous());
  const at::Tensor lse = lse_in.contiguous();
  const int split = bwd_split_from_env(op);
  at::Tensor dq_accum;  // the fused backward's float32 dQ accumulator (the split backward has none)
  if (split == 0)
    dq_accum = at::empty({set_attn_dq_accum_elems(s.B, s.G, s.L, s.H, s.D)}, q_in.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({set_attn_delta_elems(s.B, s.G, s.L, s.H)}, q_in.options().dtype(at::kFloat));

  SetAttnBwdParams p{};
  fill_common(p, q, k, v, mask, s, scale);
  p.out = o.data_ptr();
  p.dout = g.data_ptr();
  p.o_stride_n = o.stride(0);
  p.o_stride_l = o.stride(1);
  p.do_stride_n = g.stride(0);
  p.do_stride_l = g.stride(1);
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = split == 0 ? dq_accum.data_ptr<float>() : nullptr;
  p.bwd_split = split;
  p.delta = delta.data_ptr<float>();
  p.bwd_key_blocks = bwd_key_blocks_from_env(s.D, op);
  p.bwd_warps = bwd_warps_from_env(s.D, p.bwd_key_blocks, op);
  const cudaError_t err = set_attention_bwd_launch(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  JEDI_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(jedi, CUDA, m) {
  m.impl("set_attention_fwd_ext", &set_attention_fwd_cuda);
  m.impl("set_attention_bwd_ext", &set_attention_bwd_cuda);
}

}  // namespace jedi
