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
#include "tests/set_attention_reference.h"

using namespace jedi::set_attn;

namespace {

int g_pass = 0, g_fail = 0;

template <typename T>
uint16_t to_bits(float x) {
  return std::is_same<T, __half>::value ? jedi_emu::float_to_half_bits(x) : jedi_emu::float_to_bf16_bits(x);
}
template <typename T>
float from_bits(uint16_t b) {
  return emu_to_float<T>(b);
}

constexpr int kGuard = 64;
constexpr uint16_t kCanary16 = 0x7E7E;

template <typename E>
struct Buf {
  std::vector<E> mem;
  int64_t n;
  Buf(int64_t n_, E poison, E canary) : mem(n_ + 2 * kGuard, canary), n(n_) {
    std::fill(mem.begin() + kGuard, mem.begin() + kGuard + n, poison);
  }
  E* data() { return mem.data() + kGuard; }
  bool canaries_ok(E canary) const {
    for (int i = 0; i < kGuard; ++i)
      if (std::memcmp(&mem[i], &canary, sizeof(E)) || std::memcmp(&mem[kGuard + n + i], &canary, sizeof(E)))
        return false;
    return true;
  }
};

struct Case {
  int64_t B, G, L, H;
  int mask;     // jedi_test::make_mask kind
  int layout;   // 0 contiguous, 1 fused qkv view, 2 padded strides
  float scale;  // 0: D^-0.5
  bool cp_late, wgmma_late;
};

template <typename T, int kBlockN, int kWG = 2>
void run_case(const Case& c) {
  const auto t0 = std::chrono::steady_clock::now();
  constexpr int64_t D = 40;
  const int64_t B = c.B, G = c.G, L = c.L, H = c.H, HD = H * D, N = B * G, S = G * L;
  const float scale = c.scale != 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(D));
  std::mt19937 rng(static_cast<uint32_t>(B * 7 + G * 131 + L * 17 + c.mask * 11 + c.layout + kBlockN));
  std::normal_distribution<float> nd(0.f, 1.f);

  int64_t sn, sl, off[3], total;
  if (c.layout == 1) {  // views of a fused (N, L, 3 HD) projection
    sl = 3 * HD;
    sn = L * sl;
    off[0] = 0;
    off[1] = HD;
    off[2] = 2 * HD;
    total = N * L * 3 * HD;
  } else if (c.layout == 2) {  // rows of HD + 24, images of L + 3 rows
    sl = HD + 24;
    sn = (L + 3) * sl;
    off[0] = 0;
    off[1] = N * sn;
    off[2] = 2 * N * sn;
    total = 3 * N * sn;
  } else {
    sl = HD;
    sn = L * HD;
    off[0] = 0;
    off[1] = N * L * HD;
    off[2] = 2 * N * L * HD;
    total = 3 * N * L * HD;
  }
  Buf<uint16_t> qkv(total, 0, kCanary16);
  for (int64_t i = 0; i < total; ++i) qkv.data()[i] = to_bits<T>(nd(rng));  // the padding holds finite noise
  std::vector<float> qf(N * L * HD), kf(N * L * HD), vf(N * L * HD), dof(N * L * HD, 0.f);
  for (int w = 0; w < 3; ++w) {
    std::vector<float>& dst = w == 0 ? qf : w == 1 ? kf : vf;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t e = 0; e < HD; ++e)
          dst[(n * L + l) * HD + e] = from_bits<T>(qkv.data()[off[w] + n * sn + l * sl + e]);
  }
  const std::vector<uint8_t> mask = jedi_test::make_mask(G, c.mask);
  Buf<uint16_t> out(N * L * HD, 0xFFFF, kCanary16);
  Buf<float> lse(B * H * S, std::nanf(""), 1234.5f);

  jedi_emu::g_inputs = {{reinterpret_cast<const unsigned char*>(qkv.data()),
                         reinterpret_cast<const unsigned char*>(qkv.data() + total)}};
  jedi_emu::g_cp_async_at_wait = c.cp_late;
  jedi_emu::g_wgmma_at_wait = c.wgmma_late;

  jedi::SetAttnParams p{};
  p.q = qkv.data() + off[0];
  p.k = qkv.data() + off[1];
  p.v = qkv.data() + off[2];
  p.q_stride_n = p.k_stride_n = p.v_stride_n = sn;
  p.q_stride_l = p.k_stride_l = p.v_stride_l = sl;
  p.out = out.data();
  p.lse = lse.data();
  p.set_mask = mask.empty() ? nullptr : mask.data();
  p.B = B;
  p.G = G;
  p.L = L;
  p.H = H;
  p.D = D;
  p.scale = scale;

  using Tr = WgFwdTraits<T, kWgmmaDk, kWgmmaDv, kBlockN, kWG>;
  const Grid3 g = fwd_grid(B, G, L, H, Tr::kBlockM);
  jedi_emu::launch(EmuDim3{unsigned(g.x), unsigned(g.y), unsigned(g.z)}, Tr::kThreads, Tr::kSmemBytes,
                   [&] { set_attn_fwd_wgmma_kernel<T, kWgmmaDk, kWgmmaDv, kBlockN, kWG>(p); });

  const jedi_test::AttnRef r = jedi_test::attention_reference(B, G, L, H, D, scale, qf, kf, vf, dof, mask);
  std::vector<double> out_d(out.n), lse_d(lse.data(), lse.data() + lse.n);
  for (int64_t i = 0; i < out.n; ++i) out_d[i] = from_bits<T>(out.data()[i]);
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  const jedi_test::Err eo = jedi_test::compare(out_d, r.out), el = jedi_test::compare(lse_d, r.lse);
  const double lim_o = (bf ? 2.5e-2 : 4e-3) * std::max(1.0, eo.max_ref), lim_l = 2e-3 * std::max(1.0, el.max_ref);
  const bool canaries = out.canaries_ok(kCanary16) && lse.canaries_ok(1234.5f) && qkv.canaries_ok(kCanary16);
  const bool ok = canaries && eo.nonfinite == 0 && el.nonfinite == 0 && eo.max_err <= lim_o && el.max_err <= lim_l;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s wgmma fwd keys/tile=%d warpgroups=%d %s B=%lld G=%lld L=%lld H=%lld mask=%d layout=%d "
              "scale=%.3f cp.async %s wgmma %s (%.1fs): out %.1e/%.0e (%lld nonfinite) lse %.1e/%.0e "
              "(%lld nonfinite)%s\n",
              ok ? "PASS" : "FAIL", kBlockN, kWG, bf ? "bf16" : "fp16", (long long)B, (long long)G, (long long)L,
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
  // padded strides, negative scale (Q negated in shared memory), a large scale (the running max moves mid-row);
  // every variant (64 x 2, 128 x 2, 128 x 3 keys x warpgroups)
  run_case<__half, 64>({1, 2, 97, 2, 0, 1, 0.f, true, true});
  run_case<__nv_bfloat16, 64>({1, 2, 97, 1, 2, 0, 0.f, false, false});
  run_case<__half, 128>({1, 2, 97, 1, 0, 2, -0.3f, true, true});
  run_case<__nv_bfloat16, 128>({1, 3, 70, 1, 3, 1, 3.f, true, false});
  run_case<__half, 64>({1, 3, 70, 1, 0, 0, 3.f, false, true});
  run_case<__half, 64>({1, 2, 150, 1, 1, 2, -2.f, true, true});
  run_case<__half, 128, 3>({1, 2, 230, 1, 0, 1, 0.f, true, true});       // three warpgroups: two query tiles
  run_case<__nv_bfloat16, 128, 3>({1, 3, 70, 2, 2, 2, -3.f, false, true});
  if (!quick) {
    run_case<__nv_bfloat16, 64>({2, 2, 64, 1, 3, 0, 0.f, true, true});   // whole tiles only
    run_case<__half, 128>({1, 2, 130, 1, 2, 1, 0.f, false, true});       // two query tiles, a one-row tail
    run_case<__half, 64>({2, 5, 1, 1, 2, 1, 0.f, true, true});           // one token per image: every tile a tail
    run_case<__nv_bfloat16, 128>({1, 1, 200, 2, 0, 0, 0.5f, true, true});  // set size 1
  }
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
