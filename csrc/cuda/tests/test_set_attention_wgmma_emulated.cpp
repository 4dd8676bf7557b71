// CPU test of the Hopper (wgmma) set-attention forward's own source (set_attention_wgmma.cuh) under
// tests/set_attention_emulation.h: warpgroup MMAs computed from the shared-memory descriptors and register fragments
// as the PTX ISA lays them out, executed either at issue or only at the wgmma.wait_group that retires them (so reading
// an accumulator, reusing a fragment or overwriting a shared tile too early gives wrong numbers), cp.async landing
// early or late, NaN-filled shared memory, random warp speeds. Outputs are poisoned and fenced by canaries, and
// compared with the float64 reference.
//   g++ -std=c++17 -O2 -pthread -I csrc/cuda csrc/cuda/tests/test_set_attention_wgmma_emulated.cpp -o t && ./t
// What this cannot check: that the PTX ISA's layouts are read right (the emulation and the kernel share that
// reading), wgmma's fp32 accumulation order, or anything about speed. The GPU tests do (tests/kernels/, -m gpu).
#define JEDI_SET_ATTN_EMULATE 1

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

#include "set_attention_wgmma.cuh"
#include "tests/emulated_case.h"
#include "tests/set_attention_reference.h"

using namespace jedi::set_attn;
using namespace jedi_emu_test;

namespace {

int g_pass = 0, g_fail = 0;

struct Case {
  int64_t B, G, L, H;
  int mask;     // jedi_test::make_mask kind
  int layout;   // 0 contiguous, 1 fused qkv view, 2 padded strides, 3 different strides for q, k and v
  float scale;  // 0: D^-0.5
  bool cp_late, wgmma_late;
};

template <typename T, int kBlockN, int kWG = 2, int kD = 40>
void run_case(const Case& c) {
  const auto t0 = std::chrono::steady_clock::now();
  constexpr int64_t D = kD;
  const int64_t B = c.B, G = c.G, L = c.L, H = c.H, HD = H * D, N = B * G, S = G * L;
  const float scale = c.scale != 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(D));
  std::mt19937 rng(static_cast<uint32_t>(B * 7 + G * 131 + L * 17 + c.mask * 11 + c.layout + kBlockN));
  Inputs<T> in(N, L, HD, c.layout, rng);
  const std::vector<float> dof(N * L * HD, 0.f);
  const std::vector<uint8_t> mask = jedi_test::make_mask(G, c.mask);
  Buf<uint16_t> out(N * L * HD, 0xFFFF, kCanary16);
  Buf<float> lse(B * H * S, std::nanf(""), 1234.5f);

  jedi_emu::g_inputs = {{in.begin(), in.end()}};
  jedi_emu::g_cp_async_at_wait = c.cp_late;
  jedi_emu::g_wgmma_at_wait = c.wgmma_late;
  const jedi::SetAttnParams p = in.fwd_params(out.data(), lse.data(), mask, B, G, L, H, D, scale);

  using Tr = WgFwdTraits<T, wgmma_dk(kD), kD, kBlockN, kWG>;
  const Grid3 g = fwd_grid(B, G, L, H, Tr::kBlockM);
  jedi_emu::launch(EmuDim3{unsigned(g.x), unsigned(g.y), unsigned(g.z)}, Tr::kThreads, Tr::kSmemBytes,
                   [&] { set_attn_fwd_wgmma_kernel<T, wgmma_dk(kD), kD, kBlockN, kWG>(p); });

  const jedi_test::AttnRef r = jedi_test::attention_reference(B, G, L, H, D, scale, in.qf, in.kf, in.vf, dof, mask);
  std::vector<double> out_d(out.n), lse_d(lse.data(), lse.data() + lse.n);
  for (int64_t i = 0; i < out.n; ++i) out_d[i] = from_bits<T>(out.data()[i]);
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  const jedi_test::Err eo = jedi_test::compare(out_d, r.out), el = jedi_test::compare(lse_d, r.lse);
  const double lim_o = (bf ? 2.5e-2 : 4e-3) * std::max(1.0, eo.max_ref), lim_l = 2e-3 * std::max(1.0, el.max_ref);
  const bool canaries = out.canaries_ok(kCanary16) && lse.canaries_ok(1234.5f) && in.qkv.canaries_ok(kCanary16);
  const bool ok = canaries && eo.nonfinite == 0 && el.nonfinite == 0 && eo.max_err <= lim_o && el.max_err <= lim_l;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s wgmma fwd D=%d keys/tile=%d warpgroups=%d %s B=%lld G=%lld L=%lld H=%lld mask=%d layout=%d "
              "scale=%.3f cp.async %s wgmma %s (%.1fs): out %.1e/%.0e (%lld nonfinite) lse %.1e/%.0e "
              "(%lld nonfinite)%s\n",
              ok ? "PASS" : "FAIL", kD, kBlockN, kWG, bf ? "bf16" : "fp16", (long long)B, (long long)G, (long long)L,
              (long long)H, c.mask, c.layout, scale, c.cp_late ? "late" : "early",
              c.wgmma_late ? "at wait" : "at issue",
              secs, eo.max_err, lim_o, (long long)eo.nonfinite, el.max_err, lim_l, (long long)el.nonfinite,
              canaries ? "" : " CANARY OVERWRITTEN");
  std::fflush(stdout);
  (ok ? g_pass : g_fail)++;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  // partial last tiles (L % 64 != 0), several key tiles per image (odd and even walks: the K/V stages alternate),
  // two query tiles per image (L > 128), masks (block-diagonal, one-way, a never-attended image), fused-qkv and
  // padded strides, q, k and v each with strides of their own (the copies step K and V tiles separately), negative
  // scale (Q negated in shared memory), a large scale (the running max moves mid-row); every variant (64 x 2,
  // 128 x 2, 128 x 3, 128 x 1, 64 x 1 keys x warpgroups)
  run_case<__half, 64>({1, 2, 97, 2, 0, 1, 0.f, true, true});
  run_case<__nv_bfloat16, 64>({1, 2, 97, 1, 2, 0, 0.f, false, false});
  run_case<__half, 128>({1, 2, 97, 1, 0, 2, -0.3f, true, true});
  run_case<__nv_bfloat16, 128>({1, 3, 70, 1, 3, 1, 3.f, true, false});
  run_case<__half, 64>({1, 3, 70, 1, 0, 0, 3.f, false, true});
  run_case<__half, 64>({1, 2, 150, 1, 1, 2, -2.f, true, true});
  run_case<__half, 128, 3>({1, 2, 230, 1, 0, 1, 0.f, true, true});       // three warpgroups: two query tiles
  run_case<__nv_bfloat16, 128, 3>({1, 3, 70, 2, 2, 2, -3.f, false, true});
  run_case<__nv_bfloat16, 64>({1, 3, 150, 1, 2, 3, 0.f, true, true});    // three tiles per image, one allowed skipped
  run_case<__half, 128>({2, 2, 300, 1, 0, 3, 0.f, false, true});
  // one warpgroup per CTA (variants 4 and 5): 64-row query tiles, so L 97 is two tiles per image, the second a tail
  run_case<__nv_bfloat16, 128, 1>({1, 2, 97, 2, 2, 3, -0.7f, true, true});
  run_case<__half, 64, 1>({1, 3, 150, 1, 3, 1, 3.f, false, true});
  // head dims 80 and 160 (Q K^T over 5 / 10 k16 steps, P V over 88 / 168 columns): the variants compiled for them
  // (wgmma_variant_compiled)
  run_case<__nv_bfloat16, 64, 2, 80>({1, 2, 97, 2, 2, 1, 0.f, true, true});
  run_case<__half, 128, 2, 80>({1, 3, 70, 1, 0, 3, -0.5f, false, true});
  run_case<__half, 64, 1, 80>({1, 3, 130, 1, 1, 2, 0.f, false, true});  // one warpgroup per CTA at head dim 80
  run_case<__half, 64, 2, 160>({1, 2, 33, 1, 0, 2, 0.f, true, false});
  run_case<__nv_bfloat16, 64, 2, 160>({1, 2, 150, 1, 3, 1, 2.f, true, true});
  if (!quick) {
    run_case<__nv_bfloat16, 64>({2, 2, 64, 1, 3, 0, 0.f, true, true});   // whole tiles only
    run_case<__half, 128>({1, 2, 130, 1, 2, 1, 0.f, false, true});       // two query tiles, a one-row tail
    run_case<__half, 64>({2, 5, 1, 1, 2, 1, 0.f, true, true});           // one token per image: every tile a tail
    run_case<__nv_bfloat16, 128>({1, 1, 200, 2, 0, 0, 0.5f, true, true});  // set size 1
    run_case<__half, 128, 1>({2, 2, 64, 1, 1, 2, 0.f, false, false});     // one whole query tile per image
    run_case<__nv_bfloat16, 64, 1>({1, 5, 1, 1, 0, 0, 0.f, true, true});  // one token per image
  }
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
