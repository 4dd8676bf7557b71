// Torch-free GPU check of the CUDA set attention (needs a GPU; not part of the CPU test-suite):
// forward (out, lse) and backward (dq, dk, dv) against a float64 CPU reference computed from the same rounded
// inputs, over every kernel instance, odd shapes, masks, strided fused-qkv views, negative scales; outputs are
// poisoned with NaN first so unwritten elements show. Also replays the whole forward + backward from a CUDA graph.
//
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -I csrc/cuda \
//        csrc/cuda/tests/set_attention_gpu_check.cu csrc/cuda/set_attention_*.cu -o set_attention_gpu_check
//   ./set_attention_gpu_check            # all cases, then timings
//   ./set_attention_gpu_check --quick    # a few small cases (for compute-sanitizer)
//   ./set_attention_gpu_check --perf     # timings only
//   ./set_attention_gpu_check --time B G L H D [fp16|bf16]   # one shape's TIME line (bf16 unless fp16)
// Prints one line per case and "N passed, M failed"; exit code 1 on any failure.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../set_attention.cuh"
#include "../set_attention_wgmma.cuh"
#include "set_attention_reference.h"

#define CK(x)                                                                                         \
  do {                                                                                                \
    cudaError_t e_ = (x);                                                                             \
    if (e_ != cudaSuccess) {                                                                          \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x);    \
      std::exit(2);                                                                                   \
    }                                                                                                 \
  } while (0)

namespace {

using jedi::SetAttnBwdParams;
using jedi::SetAttnParams;
using jedi_test::compare;
using jedi_test::Err;
using jedi_test::make_mask;

struct Case {
  int64_t B, G, L, H, D;
  int dtype;         // 0 fp16, 1 bf16
  int mask;          // 0 none, 1 block-diagonal, 2 one-way (image i sees 0 and itself), 3 column never attended
  int layout;        // 0 separate contiguous, 1 fused qkv view, 2 padded row strides
  float scale;       // 0 -> D^-0.5 ; use scale_raw for an explicit value
  bool explicit_scale;
  int row_blocks = 0;  // forward instance (SetAttnParams::fwd_row_blocks): 0 = the head dim's default
  int key_blocks = 0;  // backward instance (SetAttnBwdParams::bwd_key_blocks): 0 = the head dim's default
  int stages = 0;      // forward loop (SetAttnParams::fwd_stages): 0 = the default
  int bwd_warps = 0;   // backward CTA (SetAttnBwdParams::bwd_warps): 0 = the default
  int wgmma = 0;       // Hopper forward variant (SetAttnParams::fwd_wgmma): 0 = off
  int splits = 0;      // forward key splits (set_attention_fwd_splits' request): 0 = none, S > 1 = S
  int bwd_split = 0;   // the split backward (SetAttnBwdParams::bwd_split)
};

uint16_t to_bits(float x, int dtype) {
  if (dtype == 0) {
    __half h = __float2half_rn(x);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float from_bits(uint16_t u, int dtype) {
  if (dtype == 0) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &u, 2);
  return __bfloat162float(h);
}

struct DeviceBuffers {
  void *qkv = nullptr, *out = nullptr, *dout = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float *lse = nullptr, *dq_acc = nullptr, *delta = nullptr, *out_acc = nullptr, *lse_acc = nullptr;
  uint8_t* mask = nullptr;
  ~DeviceBuffers() {
    for (void* p : {qkv, out, dout, dq, dk, dv, (void*)lse, (void*)dq_acc, (void*)delta, (void*)mask, (void*)out_acc,
                    (void*)lse_acc})
      if (p) cudaFree(p);
  }
};

int g_pass = 0, g_fail = 0;

bool run_case(const Case& c, bool use_graph) {
  const int64_t B = c.B, G = c.G, L = c.L, H = c.H, D = c.D, HD = H * D, N = B * G, S = G * L;
  const double scale = c.explicit_scale ? c.scale : 1.0 / std::sqrt((double)D);
  std::mt19937 rng(1234 + (uint32_t)(B * 7 + G * 131 + L * 17 + D * 3 + c.mask * 11 + c.layout));
  std::normal_distribution<float> nd(0.f, 1.f);

  // device layout of q, k, v
  int64_t row_elems, q_off, k_off, v_off, sn, sl;
  if (c.layout == 1) {  // fused (N, L, 3*HD): q | k | v
    row_elems = 3 * HD; q_off = 0; k_off = HD; v_off = 2 * HD; sl = 3 * HD; sn = L * sl;
  } else if (c.layout == 2) {  // padded strides: rows of HD + 24, images of L + 3 rows
    row_elems = HD + 24; sl = row_elems; sn = (L + 3) * sl; q_off = 0; k_off = 0; v_off = 0;
  } else {
    row_elems = HD; sl = HD; sn = L * HD; q_off = k_off = v_off = 0;
  }
  const int64_t per_tensor = (c.layout == 2) ? N * (L + 3) * row_elems : N * L * HD;
  const int64_t total = c.layout == 1 ? N * L * 3 * HD : 3 * per_tensor;
  std::vector<uint16_t> h_qkv(total);
  for (auto& x : h_qkv) x = to_bits(nd(rng), c.dtype);  // also fills the padding with finite noise
  std::vector<float> q(N * L * HD), k(N * L * HD), v(N * L * HD), dout(N * L * HD);
  auto base_of = [&](int which) -> int64_t {  // element offset of tensor `which` (0 q, 1 k, 2 v)
    if (c.layout == 1) return which == 0 ? q_off : which == 1 ? k_off : v_off;
    return which * per_tensor;
  };
  for (int which = 0; which < 3; ++which) {
    std::vector<float>& dst = which == 0 ? q : which == 1 ? k : v;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t e = 0; e < HD; ++e)
          dst[(n * L + l) * HD + e] = from_bits(h_qkv[base_of(which) + n * sn + l * sl + e], c.dtype);
  }
  std::vector<uint16_t> h_dout(N * L * HD);
  for (int64_t i = 0; i < N * L * HD; ++i) {
    h_dout[i] = to_bits(nd(rng), c.dtype);
    dout[i] = from_bits(h_dout[i], c.dtype);
  }
  std::vector<uint8_t> mask = c.mask ? make_mask(G, c.mask) : std::vector<uint8_t>();

  DeviceBuffers d;
  const size_t tb = (size_t)N * L * HD * 2;
  CK(cudaMalloc(&d.qkv, total * 2));
  CK(cudaMalloc(&d.out, tb));
  CK(cudaMalloc(&d.dout, tb));
  CK(cudaMalloc(&d.dq, tb));
  CK(cudaMalloc(&d.dk, tb));
  CK(cudaMalloc(&d.dv, tb));
  CK(cudaMalloc(&d.lse, B * H * S * 4));
  CK(cudaMalloc(&d.dq_acc, jedi::set_attn_dq_accum_elems(B, G, L, H, D) * 4));
  CK(cudaMalloc(&d.delta, jedi::set_attn_delta_elems(B, G, L, H) * 4));
  CK(cudaMemcpy(d.qkv, h_qkv.data(), total * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d.dout, h_dout.data(), tb, cudaMemcpyHostToDevice));
  if (c.mask) {
    CK(cudaMalloc(&d.mask, G * G));
    CK(cudaMemcpy(d.mask, mask.data(), G * G, cudaMemcpyHostToDevice));
  }
  // poison every output (0xFF bytes: NaN in fp16, bf16 and fp32) and the workspaces
  for (void* p : {d.out, d.dq, d.dk, d.dv}) CK(cudaMemset(p, 0xFF, tb));
  CK(cudaMemset(d.lse, 0xFF, B * H * S * 4));
  CK(cudaMemset(d.dq_acc, 0xFF, N * L * HD * 4));
  CK(cudaMemset(d.delta, 0xFF, jedi::set_attn_delta_elems(B, G, L, H) * 4));

  const uint16_t* base = static_cast<const uint16_t*>(d.qkv);
  SetAttnParams fp{};
  fp.q = base + base_of(0);
  fp.k = base + base_of(1);
  fp.v = base + base_of(2);
  fp.q_stride_n = fp.k_stride_n = fp.v_stride_n = sn;
  fp.q_stride_l = fp.k_stride_l = fp.v_stride_l = sl;
  fp.out = d.out;
  fp.lse = d.lse;
  fp.set_mask = d.mask;
  fp.B = B; fp.G = G; fp.L = L; fp.H = H; fp.D = D;
  fp.scale = (float)scale;
  fp.fwd_row_blocks = c.row_blocks;
  fp.fwd_stages = c.stages;
  fp.fwd_wgmma = c.wgmma;
  if (c.splits > 1) {  // as the torch glue does: the launcher's split count, its workspaces
    fp.fwd_splits = jedi::set_attention_fwd_splits(fp, c.dtype, c.splits);
    if (fp.fwd_splits != c.splits) {
      std::printf("FAIL set_attention_fwd_splits granted %d of %d splits\n", fp.fwd_splits, c.splits);
      ++g_fail;
      return false;
    }
    CK(cudaMalloc(&d.out_acc, jedi::set_attn::fwd_split_out_elems(B, G, L, H, D, c.splits) * 4));
    CK(cudaMalloc(&d.lse_acc, jedi::set_attn::fwd_split_lse_elems(B, G, L, H, c.splits) * 4));
    CK(cudaMemset(d.out_acc, 0xFF, jedi::set_attn::fwd_split_out_elems(B, G, L, H, D, c.splits) * 4));
    CK(cudaMemset(d.lse_acc, 0xFF, jedi::set_attn::fwd_split_lse_elems(B, G, L, H, c.splits) * 4));
    fp.out_accum = d.out_acc;
    fp.lse_accum = d.lse_acc;
  }
  SetAttnBwdParams bp{};
  bp.q = fp.q; bp.k = fp.k; bp.v = fp.v; bp.out = d.out; bp.dout = d.dout;
  bp.q_stride_n = bp.k_stride_n = bp.v_stride_n = sn;
  bp.q_stride_l = bp.k_stride_l = bp.v_stride_l = sl;
  bp.o_stride_n = bp.do_stride_n = L * HD;
  bp.o_stride_l = bp.do_stride_l = HD;
  bp.lse = d.lse; bp.set_mask = d.mask; bp.dq = d.dq; bp.dk = d.dk; bp.dv = d.dv;
  bp.dq_accum = d.dq_acc; bp.delta = d.delta;
  bp.B = B; bp.G = G; bp.L = L; bp.H = H; bp.D = D; bp.scale = (float)scale;
  bp.bwd_key_blocks = c.key_blocks;
  bp.bwd_warps = c.bwd_warps;
  bp.bwd_split = c.bwd_split;
  if (c.bwd_split) bp.dq_accum = nullptr;  // the split backward has no dQ accumulator

  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  if (use_graph) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    const cudaError_t e1 = jedi::set_attention_fwd_launch(fp, c.dtype, st);
    const cudaError_t e2 = jedi::set_attention_bwd_launch(bp, c.dtype, st);
    CK(cudaStreamEndCapture(st, &graph));
    CK(e1);
    CK(e2);
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaGraphLaunch(exec, st));  // replays must be idempotent (dq_accum re-zeroed inside)
    CK(cudaStreamSynchronize(st));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  } else {
    CK(jedi::set_attention_fwd_launch(fp, c.dtype, st));
    CK(jedi::set_attention_bwd_launch(bp, c.dtype, st));
    CK(cudaStreamSynchronize(st));
  }
  CK(cudaGetLastError());
  CK(cudaStreamDestroy(st));

  auto fetch = [&](void* p) {
    std::vector<uint16_t> hb(N * L * HD);
    CK(cudaMemcpy(hb.data(), p, tb, cudaMemcpyDeviceToHost));
    std::vector<double> r(N * L * HD);
    for (size_t i = 0; i < r.size(); ++i) r[i] = from_bits(hb[i], c.dtype);
    return r;
  };
  std::vector<double> g_out = fetch(d.out), g_dq = fetch(d.dq), g_dk = fetch(d.dk), g_dv = fetch(d.dv);
  std::vector<float> lse_f(B * H * S);
  CK(cudaMemcpy(lse_f.data(), d.lse, B * H * S * 4, cudaMemcpyDeviceToHost));
  std::vector<double> g_lse(lse_f.begin(), lse_f.end());

  const jedi_test::AttnRef r = jedi_test::attention_reference(B, G, L, H, D, scale, q, k, v, dout, mask);
  // Tolerances relative to each tensor's largest reference value: far above fp16/bf16 rounding noise, far below
  // what an indexing, masking or softmax bug produces. The flash-attention 2x rule is checked in the pytest suite.
  const double tol_o = c.dtype == 0 ? 4e-3 : 2.5e-2, tol_g = c.dtype == 0 ? 1e-2 : 5e-2;
  struct Item {
    const char* name;
    Err e;
    double tol;
  } items[] = {{"out", compare(g_out, r.out), tol_o},
               {"lse", compare(g_lse, r.lse), 2e-3},
               {"dq", compare(g_dq, r.dq), tol_g},
               {"dk", compare(g_dk, r.dk), tol_g},
               {"dv", compare(g_dv, r.dv), tol_g}};
  bool ok = true;
  std::string msg;
  char buf[256];
  for (auto& it : items) {
    const double lim = it.tol * std::max(1.0, it.e.max_ref);
    const bool good = it.e.nonfinite == 0 && it.e.max_err <= lim;
    ok = ok && good;
    std::snprintf(buf, sizeof(buf), " %s %.2e/%.1e%s", it.name, it.e.max_err, lim,
                  good ? "" : (it.e.nonfinite ? " NONFINITE" : " FAIL"));
    msg += buf;
    if (!good) {
      std::snprintf(buf, sizeof(buf), "[idx %lld nonfinite %lld]", (long long)it.e.where, (long long)it.e.nonfinite);
      msg += buf;
    }
  }
  std::printf("%s B=%lld G=%lld L=%lld H=%lld D=%lld %s mask=%d layout=%d scale=%.3f fwd_row_blocks=%d "
              "fwd_stages=%d fwd_wgmma=%d fwd_splits=%d bwd_key_blocks=%d bwd_warps=%d bwd_split=%d%s:%s\n",
              ok ? "PASS" : "FAIL", (long long)B, (long long)G, (long long)L, (long long)H, (long long)D,
              c.dtype ? "bf16" : "fp16", c.mask, c.layout, scale, c.row_blocks, c.stages, c.wgmma, c.splits,
              c.key_blocks, c.bwd_warps, c.bwd_split, use_graph ? " graph" : "", msg.c_str());
  std::fflush(stdout);
  (ok ? g_pass : g_fail)++;
  return ok;
}

// ---- timings -----------------------------------------------------------------------------------------------------
void time_case(int64_t B, int64_t G, int64_t L, int64_t H, int64_t D, int dtype, int mask_kind) {
  const int64_t N = B * G, HD = H * D, S = G * L;
  const size_t tb = (size_t)N * L * HD * 2;
  DeviceBuffers d;
  CK(cudaMalloc(&d.qkv, 3 * tb));
  CK(cudaMalloc(&d.out, tb));
  CK(cudaMalloc(&d.dout, tb));
  CK(cudaMalloc(&d.dq, tb));
  CK(cudaMalloc(&d.dk, tb));
  CK(cudaMalloc(&d.dv, tb));
  CK(cudaMalloc(&d.lse, B * H * S * 4));
  CK(cudaMalloc(&d.dq_acc, N * L * HD * 4));
  CK(cudaMalloc(&d.delta, jedi::set_attn_delta_elems(B, G, L, H) * 4));
  {
    std::vector<uint16_t> h(3 * N * L * HD);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& x : h) x = to_bits(nd(rng), dtype);
    CK(cudaMemcpy(d.qkv, h.data(), 3 * tb, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d.dout, h.data(), tb, cudaMemcpyHostToDevice));
  }
  std::vector<uint8_t> mask = mask_kind ? make_mask(G, mask_kind) : std::vector<uint8_t>();
  if (mask_kind) {
    CK(cudaMalloc(&d.mask, G * G));
    CK(cudaMemcpy(d.mask, mask.data(), G * G, cudaMemcpyHostToDevice));
  }
  const uint16_t* base = static_cast<const uint16_t*>(d.qkv);
  SetAttnParams fp{};
  fp.q = base; fp.k = base + N * L * HD; fp.v = base + 2 * N * L * HD;
  fp.q_stride_n = fp.k_stride_n = fp.v_stride_n = L * HD;
  fp.q_stride_l = fp.k_stride_l = fp.v_stride_l = HD;
  fp.out = d.out; fp.lse = d.lse; fp.set_mask = d.mask;
  fp.B = B; fp.G = G; fp.L = L; fp.H = H; fp.D = D; fp.scale = 1.f / std::sqrt((float)D);
  SetAttnBwdParams bp{};
  bp.q = fp.q; bp.k = fp.k; bp.v = fp.v; bp.out = d.out; bp.dout = d.dout;
  bp.q_stride_n = bp.k_stride_n = bp.v_stride_n = bp.o_stride_n = bp.do_stride_n = L * HD;
  bp.q_stride_l = bp.k_stride_l = bp.v_stride_l = bp.o_stride_l = bp.do_stride_l = HD;
  bp.lse = d.lse; bp.set_mask = d.mask; bp.dq = d.dq; bp.dk = d.dk; bp.dv = d.dv;
  bp.dq_accum = d.dq_acc; bp.delta = d.delta;
  bp.B = B; bp.G = G; bp.L = L; bp.H = H; bp.D = D; bp.scale = fp.scale;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto median_ms = [&](auto fn) {
    for (int i = 0; i < 3; ++i) CK(fn());
    std::vector<float> ts;
    for (int i = 0; i < 15; ++i) {
      CK(cudaEventRecord(e0));
      CK(fn());
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  const float f_ms = median_ms([&] { return jedi::set_attention_fwd_launch(fp, dtype, 0); });
  const float b_ms = median_ms([&] { return jedi::set_attention_bwd_launch(bp, dtype, 0); });
  // both forward instances where the head dim has two (16 and 32 query rows per warp)
  std::string alt;
  const int kD = jedi::set_attn::padded_head_dim(D);
  for (int rb = 1; rb <= 2; ++rb) {
    if (!jedi::set_attn::fwd_has_row_blocks(kD, rb) || !jedi::set_attn::fwd_has_row_blocks(kD, 3 - rb)) continue;
    fp.fwd_row_blocks = rb;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "  fwd[%d rows/warp] %.3f ms", 16 * rb,
                  median_ms([&] { return jedi::set_attention_fwd_launch(fp, dtype, 0); }));
    alt += buf;
  }
  fp.fwd_row_blocks = 0;
  // the two-stage (software-pipelined) forward where compiled, with each row-block count
  for (int rb = 1; rb <= 2; ++rb) {
    if (!jedi::set_attn::fwd_has_stages(kD, rb, 2) || jedi::set_attn::fwd_default_stages(kD) == 2) continue;
    fp.fwd_row_blocks = rb;
    fp.fwd_stages = 2;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "  fwd[2 stages, %d rows/warp] %.3f ms", 16 * rb,
                  median_ms([&] { return jedi::set_attention_fwd_launch(fp, dtype, 0); }));
    alt += buf;
  }
  fp.fwd_row_blocks = 0;
  fp.fwd_stages = 0;
  // the Hopper forward's variants where it runs (those compiled for the head dim: the others fall back to mma.sync)
  if (jedi::set_attention_wgmma_runnable(D)) {
    for (int v = 1; v <= jedi::set_attn::kWgmmaVariants; ++v) {
      if (!jedi::set_attn::wgmma_variant_compiled(D, v)) continue;
      fp.fwd_wgmma = v;
      char buf[80];
      std::snprintf(buf, sizeof(buf), "  fwd[wgmma %d keys x %d warpgroups] %.3f ms",
                    jedi::set_attn::wgmma_variant_block_n(v), jedi::set_attn::wgmma_variant_warpgroups(v),
                    median_ms([&] { return jedi::set_attention_fwd_launch(fp, dtype, 0); }));
      alt += buf;
    }
    fp.fwd_wgmma = 0;
  }
  // key splits (the automatic count on this device, and 2 and 4 forced; the mma.sync forward)
  {
    const int auto_s = jedi::set_attention_fwd_splits(fp, dtype, 0);
    float* acc = nullptr;
    float* lacc = nullptr;
    CK(cudaMalloc(&acc, jedi::set_attn::fwd_split_out_elems(B, G, L, H, D, jedi::set_attn::kMaxFwdSplits) * 4));
    CK(cudaMalloc(&lacc, jedi::set_attn::fwd_split_lse_elems(B, G, L, H, jedi::set_attn::kMaxFwdSplits) * 4));
    fp.out_accum = acc;
    fp.lse_accum = lacc;
    std::vector<int> counts;
    if (auto_s > 1) counts.push_back(auto_s);
    for (int S : {2, 4})
      if (S != auto_s) counts.push_back(S);
    for (int S : counts) {
      fp.fwd_splits = jedi::set_attention_fwd_splits(fp, dtype, S);
      if (fp.fwd_splits <= 1) continue;
      char buf[64];
      std::snprintf(buf, sizeof(buf), "  fwd[%d splits%s] %.3f ms", fp.fwd_splits, S == auto_s ? ", auto" : "",
                    median_ms([&] { return jedi::set_attention_fwd_launch(fp, dtype, 0); }));
      alt += buf;
    }
    fp.fwd_splits = 0;
    fp.out_accum = fp.lse_accum = nullptr;
    CK(cudaFree(acc));
    CK(cudaFree(lacc));
  }
  // both backward instances where the head dim has two (16 and 32 keys per warp)
  for (int kb = 1; kb <= 2; ++kb) {
    if (!jedi::set_attn::bwd_has_key_blocks(kD, kb) || !jedi::set_attn::bwd_has_key_blocks(kD, 3 - kb)) continue;
    bp.bwd_key_blocks = kb;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "  bwd[%d keys/warp] %.3f ms", 16 * kb,
                  median_ms([&] { return jedi::set_attention_bwd_launch(bp, dtype, 0); }));
    alt += buf;
  }
  bp.bwd_key_blocks = 0;
  // the backward CTA shape that is not the default where both are compiled (4 or 8 warps of 16 keys)
  if (jedi::set_attn::bwd_has_warps(kD, 1, 8)) {
    const int other = jedi::set_attn::bwd_default_warps(kD) == 8 ? 4 : 8;
    bp.bwd_key_blocks = 1;
    bp.bwd_warps = other;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "  bwd[%d warps] %.3f ms", other,
                  median_ms([&] { return jedi::set_attention_bwd_launch(bp, dtype, 0); }));
    alt += buf;
    bp.bwd_key_blocks = 0;
    bp.bwd_warps = 0;
  }
  // the split backward (dK/dV kernel without the dQ step, then the dQ kernel; no dQ accumulator)
  {
    bp.bwd_split = 1;
    char buf[64];
    std::snprintf(buf, sizeof(buf), "  bwd[split] %.3f ms",
                  median_ms([&] { return jedi::set_attention_bwd_launch(bp, dtype, 0); }));
    alt += buf;
    bp.bwd_split = 0;
  }
  // useful FLOPs (unpadded D, allowed key fraction of the mask)
  double frac = 1.0;
  if (mask_kind) frac = (double)std::count(mask.begin(), mask.end(), 1) / (double)(G * G);
  const double fl = 4.0 * B * H * (double)S * S * D * frac;
  std::printf("TIME B=%lld G=%lld L=%lld H=%lld D=%lld %s mask=%d: fwd %.3f ms (%.0f TFLOP/s)  "
              "bwd %.3f ms (%.0f TFLOP/s)%s\n",
              (long long)B, (long long)G, (long long)L, (long long)H, (long long)D, dtype ? "bf16" : "fp16", mask_kind,
              f_ms, fl / f_ms * 1e-9, b_ms, 2.5 * fl / b_ms * 1e-9, alt.c_str());
  std::fflush(stdout);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool perf_only = argc > 1 && std::strcmp(argv[1], "--perf") == 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  if (argc > 1 && std::strcmp(argv[1], "--time") == 0) {  // one shape (e.g. under ncu, or a shape the list lacks)
    int64_t v[5];
    bool ok = argc == 7 || argc == 8;
    for (int i = 0; ok && i < 5; ++i) {
      char* end = nullptr;
      v[i] = std::strtoll(argv[2 + i], &end, 10);
      ok = end != argv[2 + i] && *end == '\0' && v[i] >= 1;
    }
    ok = ok && v[4] % 8 == 0 && v[4] <= 256 &&
         (argc == 7 || !std::strcmp(argv[7], "fp16") || !std::strcmp(argv[7], "bf16"));
    if (!ok) {
      std::fprintf(stderr, "usage: %s --time B G L H D [fp16|bf16] (positive integers, D a multiple of 8, <= 256)\n",
                   argv[0]);
      return 2;
    }
    time_case(v[0], v[1], v[2], v[3], v[4], argc == 8 && !std::strcmp(argv[7], "fp16") ? 0 : 1, 0);
    return 0;
  }
  std::vector<Case> cases;
  // both dtypes; head dims with two forward (backward) instances also run the non-default one
  auto add = [&](int64_t B, int64_t G, int64_t L, int64_t H, int64_t D, int mask, int layout) {
    const int kD = jedi::set_attn::padded_head_dim(D);
    for (int dt = 0; dt < 2; ++dt) {
      cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, 0, 0});
      for (int rb = 1; rb <= 2; ++rb)
        if (rb != jedi::set_attn::fwd_default_row_blocks(kD) && jedi::set_attn::fwd_has_row_blocks(kD, rb))
          cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, rb, 0});
      for (int kb = 1; kb <= 2; ++kb)
        if (kb != jedi::set_attn::bwd_default_key_blocks(kD) && jedi::set_attn::bwd_has_key_blocks(kD, kb))
          cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, 0, kb});
      // the other forward loop (two stages unless that is the default) with each row-block count
      const int other = jedi::set_attn::fwd_default_stages(kD) == 2 ? 1 : 2;
      for (int rb = 1; rb <= 2; ++rb)
        if (jedi::set_attn::fwd_has_stages(kD, rb, other))
          cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, rb, 0, other});
      if (jedi::set_attn::bwd_has_warps(kD, 1, 8))  // the other backward CTA shape (4 or 8 warps)
        cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, 0, 1, 0,
                             jedi::set_attn::bwd_default_warps(kD) == 8 ? 4 : 8});
      if (jedi::set_attention_wgmma_runnable(D))  // the Hopper forward's variants (sm_90a build, 9.0 device, D 40,
        for (int v = 1; v <= jedi::set_attn::kWgmmaVariants; ++v)  // 80 or 160: those compiled for it)
          if (jedi::set_attn::wgmma_variant_compiled(D, v))
            cases.push_back(Case{B, G, L, H, D, dt, mask, layout, 0.f, false, 0, 0, 0, 0, v});
      // the split backward (dK/dV kernel without the dQ step, then the dQ kernel), with the default CTA shape
      Case split{B, G, L, H, D, dt, mask, layout, 0.f, false};
      split.bwd_split = 1;
      cases.push_back(split);
    }
  };
  if (quick) {
    add(1, 2, 97, 2, 40, 0, 1);
    add(1, 3, 17, 1, 160, 2, 0);
    add(1, 2, 33, 1, 256, 3, 2);
  } else if (!perf_only) {
    // SD head dims, real-ish and odd shapes
    add(2, 2, 97, 3, 40, 0, 1);
    add(1, 3, 64, 2, 40, 1, 0);
    add(1, 2, 1024, 1, 40, 0, 0);
    add(1, 2, 256, 2, 80, 2, 1);
    add(2, 5, 17, 1, 80, 3, 2);
    add(1, 2, 97, 2, 160, 0, 1);
    add(2, 5, 17, 1, 160, 1, 0);
    add(1, 3, 64, 1, 160, 3, 2);
    // generic instances and padding
    add(1, 1, 1024, 1, 64, 0, 0);
    add(1, 3, 17, 2, 8, 2, 1);
    add(1, 2, 64, 2, 24, 0, 2);
    add(1, 2, 97, 1, 72, 1, 1);
    add(1, 2, 130, 1, 256, 0, 1);
    add(1, 2, 77, 1, 248, 2, 0);
    add(1, 2, 100, 1, 128, 3, 1);
    add(1, 2, 70, 1, 96, 0, 2);
    add(1, 2, 50, 1, 192, 2, 1);
    add(1, 2, 45, 1, 32, 0, 0);
    add(1, 2, 45, 1, 48, 0, 0);
    add(1, 2, 45, 1, 16, 1, 0);
    add(1, 2, 66, 1, 120, 0, 1);
    add(1, 2, 66, 1, 176, 0, 1);
    // single-token images, one image per set
    add(3, 5, 1, 2, 40, 0, 1);
    add(2, 1, 256, 2, 80, 0, 0);
    add(1, 1, 1, 1, 160, 0, 0);
    // scales: negative and zero (uniform attention)
    cases.push_back(Case{1, 2, 97, 2, 40, 0, 0, 1, -0.3f, true});
    cases.push_back(Case{1, 2, 97, 1, 160, 1, 2, 0, -0.1f, true});
    cases.push_back(Case{1, 2, 65, 1, 80, 1, 0, 0, 0.0f, true});
    for (int v = 1; v <= jedi::set_attn::kWgmmaVariants; ++v)  // the Hopper forward at negative and zero scale
      for (float sc : {-0.3f, 0.0f}) cases.push_back(Case{1, 2, 97, 2, 40, 1, 1, 0, sc, true, 0, 0, 0, 0, v});
    // split forwards: d 80 with one image per set (the shape the automatic count splits), masks, d 160, more splits
    // than key tiles
    for (int dt = 0; dt < 2; ++dt) {
      cases.push_back(Case{2, 1, 1024, 2, 80, dt, 0, 1, 0.f, false, 0, 0, 0, 0, 0, 2});
      cases.push_back(Case{1, 3, 97, 2, 72, dt, 2, 2, 0.f, false, 0, 0, 0, 0, 0, 3});
      cases.push_back(Case{1, 2, 256, 1, 160, dt, 3, 0, -0.2f, true, 0, 0, 0, 0, 0, 4});
      cases.push_back(Case{1, 2, 33, 1, 40, dt, 1, 1, 0.f, false, 0, 0, 0, 0, 0, 8});
    }
  }
  for (const Case& c : cases) run_case(c, false);
  if (!perf_only) {
    // the whole fwd + bwd captured in a CUDA graph and replayed twice
    run_case(Case{1, 2, 97, 2, 40, 1, 1, 1, 0.f, false}, true);
    run_case(Case{1, 3, 40, 1, 160, 0, 2, 0, 0.f, false}, true);
    run_case(Case{2, 1, 256, 2, 80, 1, 0, 1, 0.f, false, 0, 0, 0, 0, 0, 2}, true);  // a split forward in the graph
    // the automatic split count's first occupancy query (head dim 184 -> instance 192, asked nowhere before) made
    // inside a strict capture: it must not invalidate the capture
    {
      SetAttnParams sp{};
      sp.B = 1; sp.G = 1; sp.L = 1024; sp.H = 1; sp.D = 184;
      cudaStream_t st;
      CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      const int splits = jedi::set_attention_fwd_splits(sp, 1, 0);
      cudaGraph_t graph = nullptr;
      const cudaError_t e = cudaStreamEndCapture(st, &graph);
      const bool ok = e == cudaSuccess && splits >= 1;
      std::printf("%s the split count's first query inside a global-mode capture: %d splits, capture %s\n",
                  ok ? "PASS" : "FAIL", splits, cudaGetErrorString(e));
      (ok ? g_pass : g_fail)++;
      if (graph) cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      CK(cudaStreamDestroy(st));
    }
  }
  if (!quick) {
    time_case(2, 2, 4096, 8, 40, 1, 0);  // the design's reference point (cuDNN SDPA 0.59 ms, FA2 1.07 ms)
    time_case(2, 2, 4096, 8, 40, 0, 0);
    time_case(2, 2, 4096, 8, 40, 1, 1);  // block-diagonal: ~1/2 the work at G=2
    time_case(2, 2, 1024, 8, 80, 1, 0);
    time_case(2, 1, 1024, 8, 80, 1, 0);  // one image per set: 128 CTAs, the automatic count splits (2 on an H100)
    time_case(2, 4, 64, 8, 160, 1, 0);   // L 64, set size 4: 32 CTAs of 4 one-tile images
    time_case(2, 2, 256, 8, 160, 1, 0);
    // issue 4's d 160 forward misses (set sizes 4 and 8 at L 256) and L 64's host-bound rows, in device time, with
    // both rows-per-warp instances
    time_case(2, 4, 256, 8, 160, 1, 0);
    time_case(2, 8, 256, 8, 160, 1, 0);
    time_case(2, 1, 64, 8, 160, 1, 0);
    time_case(2, 2, 64, 8, 160, 1, 0);
    time_case(2, 4, 1024, 8, 80, 1, 0);
    time_case(1, 2, 4096, 8, 64, 1, 0);
    time_case(1, 2, 4096, 8, 128, 1, 0);
  }
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
