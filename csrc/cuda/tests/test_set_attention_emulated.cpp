// CPU test of the CUDA set-attention kernels' own source (no GPU, no CUDA toolkit): the forward kernel, the backward
// preprocess, main and dQ-convert kernels run under tests/set_attention_emulation.h (lockstep warps, PTX-layout
// ldmatrix / mma.sync / shfl, cp.async landing late or early, NaN-filled shared memory, bounds checks) and are
// compared with a float64 reference from the same rounded inputs. Outputs and workspaces are poisoned with NaN and
// surrounded by canaries, so unwritten elements and out-of-bounds writes show.
//   g++ -std=c++17 -O2 -pthread -I csrc/cuda csrc/cuda/tests/test_set_attention_emulated.cpp -o t && ./t
// Covers every code path of the kernel templates (Q in registers / from shared memory, key tiles of 64 and 32,
// backward query tiles of 64 and 32, 16 or 32 keys per warp (one or two register passes per query tile), dQ units of
// one or several column groups, one to four dK/dV column chunks), both dtypes, partial tiles, masks (with a
// never-attended image), fused-qkv strides, padded strides, negative scale; and the split backward (dK/dV kernel
// without its dQ step, then the dQ kernel). Prints "N passed, M failed".
#define JEDI_SET_ATTN_EMULATE 1

#include <chrono>
#include <cstdio>
#include <random>
#include <string>

#include "set_attention_bwd_aux.cuh"
#include "set_attention_kernels.cuh"
#include "tests/emulated_case.h"
#include "tests/set_attention_reference.h"

using namespace jedi::set_attn;
using namespace jedi_emu_test;

namespace {

int g_pass = 0, g_fail = 0;

struct Case {
  int64_t B, G, L, H, D;
  int mask;    // jedi_test::make_mask kind
  int layout;  // 0 contiguous, 1 fused qkv view, 2 padded strides, 3 different strides for q, k and v
  float scale;  // 0: D^-0.5
  bool cp_late = true;
  int splits = 1;  // > 1: the split forward (S CTAs per query tile, then the merge kernel)
  bool split_bwd = false;  // the split backward (dK/dV kernel without its dQ step, then the dQ kernel)
};

template <typename T, int kD, int kRB = fwd_default_row_blocks(kD), int kKB = bwd_default_key_blocks(kD),
          int kStages = 1, int kBwdWarps = bwd_default_warps(kD)>
void run_case(const Case& c) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t B = c.B, G = c.G, L = c.L, H = c.H, D = c.D, HD = H * D, N = B * G, S = G * L;
  const float scale = c.scale != 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(D));
  if (padded_head_dim(D) != kD) {
    std::printf("FAIL case D=%lld does not run on instance %d\n", (long long)D, kD);
    ++g_fail;
    return;
  }
  std::mt19937 rng(static_cast<uint32_t>(B * 7 + G * 131 + L * 17 + D * 3 + c.mask * 11 + c.layout));
  std::normal_distribution<float> nd(0.f, 1.f);

  Inputs<T> in(N, L, HD, c.layout, rng);
  std::vector<float> dof(N * L * HD);
  Buf<uint16_t> dout(N * L * HD, 0, kCanary16);
  for (int64_t i = 0; i < N * L * HD; ++i) {
    dout.data()[i] = to_bits<T>(nd(rng));
    dof[i] = from_bits<T>(dout.data()[i]);
  }
  std::vector<uint8_t> mask = jedi_test::make_mask(G, c.mask);

  const uint16_t nan16 = 0xFFFF;
  Buf<uint16_t> out(N * L * HD, nan16, kCanary16), dq(N * L * HD, nan16, kCanary16), dk(N * L * HD, nan16, kCanary16),
      dv(N * L * HD, nan16, kCanary16);
  Buf<float> lse(B * H * S, nan_f(), canary_f()), dq_acc(N * L * HD, nan_f(), canary_f()),
      delta(jedi::set_attn_delta_elems(B, G, L, H), nan_f(), canary_f());

  jedi_emu::g_inputs = {{in.begin(), in.end()},
                        {reinterpret_cast<const unsigned char*>(dout.data()),
                         reinterpret_cast<const unsigned char*>(dout.data() + N * L * HD)}};
  jedi_emu::g_cp_async_at_wait = c.cp_late;

  jedi::SetAttnParams fp = in.fwd_params(out.data(), lse.data(), mask, B, G, L, H, D, scale);

  using FT = FwdTraits<T, kD, kRB, kStages>;
  const Grid3 gf = fwd_grid(B, G, L, H, FT::kBlockM);
  const int NS = c.splits;
  Buf<float> out_acc(NS > 1 ? fwd_split_out_elems(B, G, L, H, D, NS) : 0, nan_f(), canary_f()),
      lse_acc(NS > 1 ? fwd_split_lse_elems(B, G, L, H, NS) : 0, nan_f(), canary_f());
  if (NS > 1) {
    if constexpr (kStages == 1 && fwd_has_splits(kD, kRB, 1)) {
      fp.fwd_splits = NS;
      fp.out_accum = out_acc.data();
      fp.lse_accum = lse_acc.data();
      jedi_emu::launch(EmuDim3{unsigned(gf.x * NS), unsigned(gf.y), unsigned(gf.z)}, FT::kThreads, FT::kSmemBytes,
                       [&] { set_attn_fwd_kernel<T, kD, kRB, true>(fp); });
      // (half of row_grid's y, as for the preprocess below: block rows walk two images of the grid-stride loop)
      const RowGrid mg = row_grid(N, L, H);
      jedi_emu::launch(EmuDim3{unsigned(mg.x), unsigned((mg.y + 1) / 2), 1}, kRowThreads, 0,
                       [&] { set_attn_fwd_combine_kernel<T>(fp); });
    } else {
      std::printf("FAIL case asks for %d splits of an instance without them\n", NS);
      ++g_fail;
      return;
    }
  } else {
    jedi_emu::launch(EmuDim3{unsigned(gf.x), unsigned(gf.y), unsigned(gf.z)}, FT::kThreads, FT::kSmemBytes, [&] {
      if constexpr (kStages == 2) {
        set_attn_fwd_pipe_kernel<T, kD, kRB>(fp);
      } else {
        set_attn_fwd_kernel<T, kD, kRB>(fp);
      }
    });
  }

  jedi::SetAttnBwdParams bp{};
  bp.q = fp.q;
  bp.k = fp.k;
  bp.v = fp.v;
  bp.out = out.data();
  bp.dout = dout.data();
  bp.q_stride_n = in.sn[0];
  bp.k_stride_n = in.sn[1];
  bp.v_stride_n = in.sn[2];
  bp.q_stride_l = in.sl[0];
  bp.k_stride_l = in.sl[1];
  bp.v_stride_l = in.sl[2];
  bp.o_stride_n = bp.do_stride_n = L * HD;
  bp.o_stride_l = bp.do_stride_l = HD;
  bp.lse = lse.data();
  bp.set_mask = fp.set_mask;
  bp.dq = dq.data();
  bp.dk = dk.data();
  bp.dv = dv.data();
  bp.dq_accum = c.split_bwd ? nullptr : dq_acc.data();  // the split backward has no dQ accumulator
  bp.bwd_split = c.split_bwd ? 1 : 0;
  bp.delta = delta.data();
  bp.B = B;
  bp.G = G;
  bp.L = L;
  bp.H = H;
  bp.D = D;
  bp.scale = scale;
  // the forward output is an input of the backward, and the preprocess kernel's delta and lse2 are the main kernel's
  jedi_emu::g_inputs.push_back({reinterpret_cast<const unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(out.data() + N * L * HD)});
  jedi_emu::g_inputs.push_back({reinterpret_cast<const unsigned char*>(delta.data()),
                                reinterpret_cast<const unsigned char*>(delta.data() + delta.n)});
  const int64_t rows = N * L * H;
  // (half of row_grid's y: each block row then walks two images of its grid-stride loop, which the launcher's
  // grid uses only past 65535 images)
  const RowGrid pg = row_grid(N, L, H);
  jedi_emu::launch(EmuDim3{unsigned(pg.x), unsigned((pg.y + 1) / 2), 1}, kRowThreads, 0,
                   [&] { set_attn_bwd_preprocess_kernel<T>(bp); });
  using BT = BwdTraits<T, kD, kKB, kBwdWarps>;
  const Grid3 gb = bwd_grid(B, G, L, H, BT::kBlockN, BT::kChunks);
  if (c.split_bwd) {
    jedi_emu::launch(EmuDim3{unsigned(gb.x), unsigned(gb.y), unsigned(gb.z)}, BT::kThreads, BT::kSmemBytes,
                     [&] { set_attn_bwd_kernel<T, kD, kKB, kBwdWarps, false>(bp); });
    using QT = DqTraits<T, kD>;
    const Grid3 gq = fwd_grid(B, G, L, H, QT::kBlockM);
    jedi_emu::launch(EmuDim3{unsigned(gq.x), unsigned(gq.y), unsigned(gq.z)}, QT::kThreads, QT::kSmemBytes,
                     [&] { set_attn_bwd_dq_kernel<T, kD>(bp); });
  } else {
    jedi_emu::launch(EmuDim3{unsigned(gb.x), unsigned(gb.y), unsigned(gb.z)}, BT::kThreads, BT::kSmemBytes,
                     [&] { set_attn_bwd_kernel<T, kD, kKB, kBwdWarps>(bp); });
    const int64_t n4 = rows * D / 4;
    jedi_emu::launch(EmuDim3{unsigned(std::min<int64_t>(ceil_div(n4, 256), 2)), 1, 1}, 256, 0,
                     [&] { set_attn_dq_convert_kernel<T>(dq_acc.data(), static_cast<T*>(bp.dq), n4, scale); });
  }

  // compare
  const jedi_test::AttnRef r = jedi_test::attention_reference(B, G, L, H, D, scale, in.qf, in.kf, in.vf, dof, mask);
  auto as_double = [&](Buf<uint16_t>& b) {
    std::vector<double> x(b.n);
    for (int64_t i = 0; i < b.n; ++i) x[i] = from_bits<T>(b.data()[i]);
    return x;
  };
  std::vector<double> lse_d(lse.data(), lse.data() + lse.n);
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  const double tol_o = bf ? 2.5e-2 : 4e-3, tol_g = bf ? 5e-2 : 1e-2;
  struct Item {
    const char* name;
    jedi_test::Err e;
    double tol;
  } items[] = {{"out", jedi_test::compare(as_double(out), r.out), tol_o},
               {"lse", jedi_test::compare(lse_d, r.lse), 2e-3},
               {"dq", jedi_test::compare(as_double(dq), r.dq), tol_g},
               {"dk", jedi_test::compare(as_double(dk), r.dk), tol_g},
               {"dv", jedi_test::compare(as_double(dv), r.dv), tol_g}};
  bool ok = out.canaries_ok(kCanary16) && dq.canaries_ok(kCanary16) && dk.canaries_ok(kCanary16) &&
            dv.canaries_ok(kCanary16) && lse.canaries_ok(canary_f()) && dq_acc.canaries_ok(canary_f()) &&
            delta.canaries_ok(canary_f()) && in.qkv.canaries_ok(kCanary16) && dout.canaries_ok(kCanary16) &&
            out_acc.canaries_ok(canary_f()) && lse_acc.canaries_ok(canary_f());
  std::string msg = ok ? "" : " CANARY OVERWRITTEN";
  // a key image nobody attends gets exact-zero dk, dv (either sign: a negative scale makes dk = scale * 0 = -0)
  if (c.mask == 3 && G > 1) {
    bool zero = true;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = ((b * G + G - 1) * L) * HD; i < ((b * G + G) * L) * HD; ++i)
        zero = zero && (dk.data()[i] & 0x7FFF) == 0 && (dv.data()[i] & 0x7FFF) == 0;
    if (!zero) msg += " NONZERO-dk/dv-of-unattended-image";
    ok = ok && zero;
  }
  char buf[256];
  for (auto& it : items) {
    const double lim = it.tol * std::max(1.0, it.e.max_ref);
    const bool good = it.e.nonfinite == 0 && it.e.max_err <= lim;
    ok = ok && good;
    std::snprintf(buf, sizeof(buf), " %s %.1e/%.0e%s", it.name, it.e.max_err, lim,
                  good ? "" : (it.e.nonfinite ? " NONFINITE" : " FAIL"));
    msg += buf;
    if (!good) {
      std::snprintf(buf, sizeof(buf), "[idx %lld, %lld nonfinite]", (long long)it.e.where,
                    (long long)it.e.nonfinite);
      msg += buf;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (NS > 1) {  // every split wrote its whole slice (rows < L, columns < D; no NaN poison left)
    bool all = true;
    for (int64_t i = 0; i < lse_acc.n; ++i) all = all && !std::isnan(lse_acc.data()[i]);
    for (int64_t i = 0; i < out_acc.n; ++i) all = all && !std::isnan(out_acc.data()[i]);
    if (!all) msg += " UNWRITTEN-split-workspace";
    ok = ok && all;
  }
  std::printf("%s splits=%d kD=%d rows/warp=%d stages=%d keys/warp=%d bwd warps=%d%s %s B=%lld G=%lld L=%lld H=%lld D=%lld mask=%d layout=%d scale=%.3f cp.async %s (%.1fs):%s\n",
              ok ? "PASS" : "FAIL", NS, kD, 16 * kRB, kStages, 16 * kKB, kBwdWarps, c.split_bwd ? " split" : "", bf ? "bf16" : "fp16", (long long)B, (long long)G, (long long)L, (long long)H,
              (long long)D, c.mask, c.layout, scale, c.cp_late ? "late" : "early", secs, msg.c_str());
  std::fflush(stdout);
  (ok ? g_pass : g_fail)++;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  // SD head dims: Q in registers (48; 80 with 16 rows per warp), Q from shared memory (80 with 32 rows per warp,
  // 160) + two dK/dV chunks (160); forward instances with 16 and 32 query rows per warp (1 and 2 row blocks)
  run_case<__half, 48>({1, 2, 97, 2, 40, 0, 1, 0.f, true});
  run_case<__nv_bfloat16, 48, 1>({1, 2, 97, 1, 40, 2, 0, 0.f, false});
  run_case<__nv_bfloat16, 48, 2, 1>({1, 2, 97, 1, 40, 2, 0, 0.f, false});  // backward with 16 keys per warp
  run_case<__nv_bfloat16, 160>({1, 3, 17, 1, 160, 2, 2, -0.1f, true});
  run_case<__half, 80, 1, 1, 1, 4>({1, 2, 33, 1, 72, 1, 0, 0.f, true});  // the 4-warp backward (not the default)
  run_case<__half, 80, 2>({1, 2, 33, 1, 72, 1, 0, 0.f, true});
  // a large scale spreads the scores over ~+-20 binary orders: later key tiles move the running max by more than
  // the lazy-rescale threshold, so O and l are rescaled mid-row (random scales keep the first tile's max)
  run_case<__half, 48>({1, 3, 70, 1, 40, 0, 0, 3.f, true});
  run_case<__nv_bfloat16, 48>({1, 2, 80, 1, 40, 1, 1, -0.3f, true});  // negative scale: K fragments kept in registers
  run_case<__nv_bfloat16, 80, 1, 1, 1, 4>({1, 3, 70, 1, 80, 0, 1, -2.5f, false});
  // the two-stage (software-pipelined) forward, 16 and 32 rows per warp: odd and even key-tile counts (the loop is
  // unrolled by two), tails, a rescale mid-row, masks with a never-attended image, negative scale, cp.async early
  run_case<__half, 48, 2, 2, 2>({1, 2, 97, 2, 40, 0, 1, 0.f, true});
  run_case<__nv_bfloat16, 48, 1, 2, 2>({1, 3, 70, 1, 40, 0, 0, 3.f, false});
  run_case<__nv_bfloat16, 80, 1, 1, 2>({1, 2, 33, 1, 72, 3, 2, -0.4f, true});
  // the 8-warp backward at padded head dim 80 (128 keys per CTA): partial key tiles, masks, negative scale
  run_case<__half, 80, 2, 1, 1, 8>({1, 2, 97, 1, 72, 0, 1, 0.f, true});
  run_case<__nv_bfloat16, 80, 2, 1, 1, 8>({1, 3, 70, 1, 80, 3, 2, -0.5f, false});
  run_case<__half, 48>({1, 3, 70, 1, 40, 2, 3, 0.f, true});  // q, k, v with strides of their own
  // 32 query rows per warp at head dim 160 (32-key tiles, Q from shared memory): several query and key tiles, tails,
  // masks with a never-attended image, a rescale mid-row, negative scale, padded columns (152), strides of their own
  run_case<__nv_bfloat16, 160, 2>({1, 2, 150, 1, 160, 3, 1, 3.f, true});
  run_case<__half, 160, 2>({1, 3, 70, 2, 152, 1, 3, -0.5f, false});
  // the query-split 8-warp backward at head dim 160 (two warps per 16 keys on alternate 16-query passes, their dK/dV
  // added in shared memory): key and query tails, several query tiles, masks, padded columns, negative scale
  run_case<__half, 160, 1, 1, 1, 8>({1, 2, 97, 1, 160, 0, 1, 0.f, true});
  run_case<__nv_bfloat16, 160, 1, 1, 1, 8>({1, 3, 70, 2, 152, 3, 2, -0.5f, false});
  // split forwards (S CTAs per query tile over runs of the allowed key tiles, then the merge): uneven runs, a run
  // crossing an image, masks (one-way: 1 of 3 images allowed, so a run may be empty; a never-attended image),
  // more splits than tiles, a rescale mid-run, negative scale, both dtypes, 16 and 32 rows per warp, d 160
  run_case<__half, 80>({1, 3, 97, 2, 72, 0, 1, 0.f, true, 2});
  run_case<__nv_bfloat16, 48>({1, 3, 70, 1, 40, 2, 0, 3.f, false, 3});
  run_case<__half, 48>({1, 2, 33, 1, 40, 3, 2, -0.5f, true, 8});
  run_case<__nv_bfloat16, 160>({1, 2, 70, 1, 152, 1, 3, 0.f, true, 4});
  // the split backward (dK/dV without the dQ step, then the dQ kernel over the query tiles): every SD instance (32
  // and 16 keys per warp at 48; the 8- and 4-warp CTAs at 80; the 4-warp and query-split CTAs at 160), key and query
  // tails, several query and key tiles, masks with a never-attended image and one-way ones, negative and large
  // scales, fused-qkv and padded strides, padded columns, both dtypes, cp.async early and late
  run_case<__half, 48>({1, 2, 97, 2, 40, 0, 1, 0.f, true, 1, true});
  run_case<__nv_bfloat16, 48, 2, 1>({1, 3, 70, 1, 40, 3, 2, -0.5f, false, 1, true});
  run_case<__nv_bfloat16, 80>({1, 2, 97, 1, 72, 2, 3, 3.f, true, 1, true});
  run_case<__half, 80, 2, 1, 1, 4>({1, 3, 70, 1, 80, 1, 0, -2.5f, false, 1, true});
  run_case<__nv_bfloat16, 160>({1, 2, 70, 1, 152, 3, 1, 0.f, true, 1, true});
  run_case<__half, 160, 1, 1, 1, 8>({1, 3, 33, 2, 160, 2, 2, -0.5f, false, 1, true});
  if (!quick) {
    run_case<__half, 48>({2, 2, 130, 1, 48, 2, 0, 2.f, true, 1, true});  // two query tiles per image, whole tiles
    run_case<__half, 32>({2, 5, 1, 1, 8, 2, 1, 0.f, true, 1, true});     // one token per image
    run_case<__nv_bfloat16, 64>({1, 3, 100, 1, 56, 1, 1, -0.2f, false, 1, true});
    run_case<__half, 128>({1, 2, 40, 1, 128, 3, 0, 0.f, true, 1, true});
    run_case<__nv_bfloat16, 256>({1, 2, 20, 1, 248, 0, 1, 0.f, true, 1, true});
    run_case<__half, 192>({1, 1, 37, 1, 176, 0, 2, 0.f, true, 1, true});
    run_case<__half, 80>({2, 4, 33, 1, 80, 2, 0, 2.5f, false, 5});
    run_case<__nv_bfloat16, 256>({1, 2, 40, 1, 248, 0, 1, 0.f, true, 3});
    run_case<__half, 32>({2, 5, 1, 1, 8, 2, 1, 0.f, true, 4});  // one token per image: every run a tail
    run_case<__half, 80, 2, 1, 1, 8>({2, 2, 130, 1, 80, 2, 0, 0.f, true});  // several query tiles, one-way mask
    run_case<__nv_bfloat16, 80, 1, 1, 1, 8>({1, 4, 33, 1, 64 + 8, 1, 1, 2.5f, true});  // block-diagonal, rescales
    run_case<__half, 48, 2, 2, 2>({1, 3, 64, 1, 48, 2, 2, 2.f, false});   // whole tiles only, one-way mask
    run_case<__half, 80, 1, 1, 2>({1, 2, 130, 1, 80, 1, 1, 0.f, true});   // block-diagonal
    run_case<__nv_bfloat16, 64, 2, 1, 2>({1, 3, 100, 1, 56, 3, 0, -2.5f, true});
    run_case<__half, 32, 1, 1, 2>({2, 5, 1, 1, 8, 2, 1, 0.f, false});     // one token per image: every tile a tail
    run_case<__half, 32, 2, 1, 2>({1, 1, 31, 1, 24, 0, 0, 0.f, true});    // a single key tile
    run_case<__half, 48>({1, 2, 130, 1, 48, 3, 2, 0.f, true});  // two query tiles per image, unattended image
    run_case<__half, 48, 1>({1, 2, 130, 1, 48, 3, 2, 0.f, true});
    run_case<__nv_bfloat16, 64, 2>({1, 3, 100, 1, 56, 1, 1, -0.2f, false});
    run_case<__half, 32, 1>({1, 2, 31, 1, 24, 0, 0, 0.f, true});
    run_case<__half, 256>({1, 2, 20, 1, 248, 0, 1, 0.f, true});  // key tiles of 32, four dK/dV chunks
    run_case<__nv_bfloat16, 128>({1, 2, 40, 1, 128, 3, 0, 0.f, false});  // backward query tiles of 32
    run_case<__half, 32>({2, 5, 1, 1, 8, 2, 1, 0.f, true});  // one token per image
    run_case<__nv_bfloat16, 192>({1, 1, 37, 1, 176, 0, 2, 0.f, true});
    run_case<__nv_bfloat16, 80, 2, 1, 1, 8>({1, 2, 97, 1, 80, 0, 3, 0.f, false});
    run_case<__half, 160, 1, 1, 1, 8>({2, 2, 130, 1, 160, 2, 0, 2.5f, true});  // one-way mask, rescales, 2 sets
    run_case<__nv_bfloat16, 160, 1, 1, 1, 8>({1, 4, 33, 1, 136, 1, 1, 0.f, true});  // block-diagonal, 136 columns
    run_case<__half, 160>({1, 2, 70, 1, 152, 3, 1, 0.f, false});  // one 160-column chunk, 8 of them padding
    run_case<__half, 160, 2>({2, 2, 64, 1, 160, 2, 0, 0.f, true});    // whole tiles only
    run_case<__nv_bfloat16, 160, 2>({2, 5, 1, 1, 160, 2, 2, 0.f, true});  // one token per image
  }
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
