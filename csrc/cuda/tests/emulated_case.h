// Shared pieces of the emulated-kernel tests (test_set_attention_emulated.cpp, test_set_attention_wgmma_emulated.cpp):
// device-like buffers fenced by canaries, 16-bit conversions, and the q/k/v inputs of one case in one of three layouts
// with the forward's parameters. Include after tests/set_attention_emulation.h (JEDI_SET_ATTN_EMULATE).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "set_attention.cuh"

namespace jedi_emu_test {

template <typename T>
uint16_t to_bits(float x) {
  return std::is_same<T, __half>::value ? jedi_emu::float_to_half_bits(x) : jedi_emu::float_to_bf16_bits(x);
}
template <typename T>
float from_bits(uint16_t b) {
  return jedi::set_attn::emu_to_float<T>(b);
}

constexpr int kGuard = 64;  // canary elements on each side of every buffer
constexpr uint16_t kCanary16 = 0x7E7E;
inline float nan_f() { return std::nanf(""); }
inline float canary_f() { return 1234.5f; }

// a device-like buffer of E elements with canaries around it
template <typename E>
struct Buf {
  std::vector<E> mem;
  int64_t n;
  explicit Buf(int64_t n_, E poison, E canary) : mem(n_ + 2 * kGuard, canary), n(n_) {
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

// q, k, v of one case in one buffer (layout 0: three contiguous (N, L, H*D) tensors; 1: views of a fused
// (N, L, 3*H*D) projection; 2: rows of H*D + 24 elements, images of L + 3 rows; 3: a different padding for each of
// q, k and v (rows of H*D + 8w elements, images of L + w rows, w = 0, 1, 2), so a kernel that walks one tensor with
// another's strides fails), drawn from `rng` (padding too: finite noise), and their rounded values as floats,
// contiguous, for the reference.
template <typename T>
struct Inputs {
  int64_t sn[3] = {0, 0, 0}, sl[3] = {0, 0, 0}, off[3] = {0, 0, 0}, total = 0;
  Buf<uint16_t> qkv{0, 0, kCanary16};
  std::vector<float> qf, kf, vf;

  Inputs(int64_t N, int64_t L, int64_t HD, int layout, std::mt19937& rng) {
    if (layout == 1) {
      for (int w = 0; w < 3; ++w) {
        sl[w] = 3 * HD;
        sn[w] = L * sl[w];
        off[w] = w * HD;
      }
      total = N * L * 3 * HD;
    } else {
      for (int w = 0; w < 3; ++w) {
        sl[w] = layout == 2 ? HD + 24 : layout == 3 ? HD + 8 * w : HD;
        sn[w] = layout == 2 ? (L + 3) * sl[w] : layout == 3 ? (L + w) * sl[w] : L * HD;
        off[w] = total;
        total += N * sn[w];
      }
    }
    qkv = Buf<uint16_t>(total, 0, kCanary16);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int64_t i = 0; i < total; ++i) qkv.data()[i] = to_bits<T>(nd(rng));
    for (std::vector<float>* dst : {&qf, &kf, &vf}) dst->resize(N * L * HD);
    for (int w = 0; w < 3; ++w) {
      std::vector<float>& dst = w == 0 ? qf : w == 1 ? kf : vf;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t e = 0; e < HD; ++e)
            dst[(n * L + l) * HD + e] = from_bits<T>(qkv.data()[off[w] + n * sn[w] + l * sl[w] + e]);
    }
  }
  const unsigned char* begin() { return reinterpret_cast<const unsigned char*>(qkv.data()); }
  const unsigned char* end() { return reinterpret_cast<const unsigned char*>(qkv.data() + total); }

  // the forward's parameters for these inputs (instance switches left at 0)
  jedi::SetAttnParams fwd_params(void* out, float* lse, const std::vector<uint8_t>& mask, int64_t B, int64_t G,
                                 int64_t L, int64_t H, int64_t D, float scale) {
    jedi::SetAttnParams p{};
    p.q = qkv.data() + off[0];
    p.k = qkv.data() + off[1];
    p.v = qkv.data() + off[2];
    p.q_stride_n = sn[0];
    p.k_stride_n = sn[1];
    p.v_stride_n = sn[2];
    p.q_stride_l = sl[0];
    p.k_stride_l = sl[1];
    p.v_stride_l = sl[2];
    p.out = out;
    p.lse = lse;
    p.set_mask = mask.empty() ? nullptr : mask.data();
    p.B = B;
    p.G = G;
    p.L = L;
    p.H = H;
    p.D = D;
    p.scale = scale;
    return p;
  }
};

}  // namespace jedi_emu_test
