// Float64 reference of set attention, forward and backward, for the C++ tests of the CUDA kernels (plain C++:
// shared by the GPU check and the CPU emulation test). Inputs are the kernels' rounded values as floats, laid out
// (N, L, H*D) contiguous; the mask is (G, G) row-major uint8 or empty (= full).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace jedi_test {

struct AttnRef {
  std::vector<double> out, lse, dq, dk, dv;  // (N, L, H*D) / lse (B, H, G*L)
};

template <typename F>
inline void parallel_for(int64_t n, F f) {
  const int nt = static_cast<int>(std::max(1u, std::min(32u, std::thread::hardware_concurrency())));
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t)
    th.emplace_back([&, t] {
      for (int64_t i = t; i < n; i += nt) f(i);
    });
  for (auto& x : th) x.join();
}

inline AttnRef attention_reference(int64_t B, int64_t G, int64_t L, int64_t H, int64_t D, double scale,
                                   const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, const std::vector<float>& dout,
                                   const std::vector<uint8_t>& mask) {
  const int64_t HD = H * D, S = G * L, N = B * G;
  AttnRef r;
  r.out.assign(N * L * HD, 0);
  r.lse.assign(B * H * S, 0);
  r.dq.assign(N * L * HD, 0);
  r.dk.assign(N * L * HD, 0);
  r.dv.assign(N * L * HD, 0);
  auto row = [&](int64_t b, int64_t t) { return (b * G + t / L) * L + t % L; };  // set token -> tensor row
  auto allowed = [&](int64_t ti, int64_t tj) { return mask.empty() || mask[(ti / L) * G + tj / L] != 0; };
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    std::vector<double> P(S * S, 0.0), dS(S * S, 0.0);
    parallel_for(S, [&](int64_t i) {  // rows: P, lse, out, dS, dq
      const int64_t ri = row(b, i);
      double mx = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        if (!allowed(i, j)) continue;
        const int64_t rj = row(b, j);
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<double>(q[ri * HD + h * D + d]) * k[rj * HD + h * D + d];
        P[i * S + j] = s * scale;
        mx = std::max(mx, s * scale);
      }
      double sum = 0;
      for (int64_t j = 0; j < S; ++j) sum += allowed(i, j) ? std::exp(P[i * S + j] - mx) : 0.0;
      for (int64_t j = 0; j < S; ++j) P[i * S + j] = allowed(i, j) ? std::exp(P[i * S + j] - mx) / sum : 0.0;
      r.lse[bh * S + i] = mx + std::log(sum);
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t j = 0; j < S; ++j) o += P[i * S + j] * v[row(b, j) * HD + h * D + d];
        r.out[ri * HD + h * D + d] = o;
      }
      // dP_ij = dO_i . v_j, delta_i = sum_j P_ij dP_ij, dS = P (dP - delta)
      double delta = 0;
      std::vector<double> dP(S, 0.0);
      for (int64_t j = 0; j < S; ++j) {
        if (!allowed(i, j)) continue;
        double s = 0;
        for (int64_t d = 0; d < D; ++d)
          s += static_cast<double>(dout[ri * HD + h * D + d]) * v[row(b, j) * HD + h * D + d];
        dP[j] = s;
        delta += P[i * S + j] * s;
      }
      for (int64_t j = 0; j < S; ++j) dS[i * S + j] = P[i * S + j] * (dP[j] - delta);
      for (int64_t d = 0; d < D; ++d) {
        double g = 0;
        for (int64_t j = 0; j < S; ++j) g += dS[i * S + j] * k[row(b, j) * HD + h * D + d];
        r.dq[ri * HD + h * D + d] = g * scale;
      }
    });
    parallel_for(S, [&](int64_t j) {  // columns: dk, dv
      const int64_t rj = row(b, j);
      for (int64_t d = 0; d < D; ++d) {
        double gk = 0, gv = 0;
        for (int64_t i = 0; i < S; ++i) {
          gk += dS[i * S + j] * q[row(b, i) * HD + h * D + d];
          gv += P[i * S + j] * dout[row(b, i) * HD + h * D + d];
        }
        r.dk[rj * HD + h * D + d] = gk * scale;
        r.dv[rj * HD + h * D + d] = gv;
      }
    });
  }
  return r;
}

// masks used by the tests: 0 none (empty), 1 block-diagonal, 2 one-way (image i sees image 0 and itself),
// 3 the last image attended by nobody (its dk, dv must be exact zeros) while its own queries see image 0 only.
inline std::vector<uint8_t> make_mask(int64_t G, int kind) {
  if (kind == 0) return {};
  std::vector<uint8_t> m(G * G, 1);
  for (int64_t i = 0; i < G; ++i)
    for (int64_t j = 0; j < G; ++j) {
      if (kind == 1) m[i * G + j] = i == j;
      if (kind == 2) m[i * G + j] = (j == 0 || i == j);
      if (kind == 3) m[i * G + j] = G == 1 || (j != G - 1 && (i != G - 1 || j == 0));
    }
  return m;
}

struct Err {
  double max_err = 0, max_ref = 0;
  int64_t nonfinite = 0, where = -1;
};
inline Err compare(const std::vector<double>& got, const std::vector<double>& ref) {
  Err e;
  for (size_t i = 0; i < ref.size(); ++i) {
    e.max_ref = std::max(e.max_ref, std::fabs(ref[i]));
    if (!std::isfinite(got[i])) {
      if (e.nonfinite++ == 0) e.where = static_cast<int64_t>(i);
      continue;
    }
    const double d = std::fabs(got[i] - ref[i]);
    if (d > e.max_err) {
      e.max_err = d;
      if (e.nonfinite == 0) e.where = static_cast<int64_t>(i);
    }
  }
  return e;
}

}  // namespace jedi_test
