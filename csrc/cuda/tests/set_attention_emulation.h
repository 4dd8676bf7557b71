// CPU emulation of the CUDA features the set-attention kernels use, so that the kernels' OWN source
// (set_attention_kernels.cuh, set_attention_bwd_aux.cuh) runs on a machine without a GPU. Included in place of the
// CUDA headers when JEDI_SET_ATTN_EMULATE is defined (CPU tests only; never in the extension build).
//
// Model: one CTA at a time; every CUDA thread is a fiber on one OS thread, switched at barriers (warps advance at
// random relative speeds, so a missing __syncthreads lets one warp overtake another). Warp-collective instructions
// (ldmatrix, mma.sync, shfl) rendezvous the 32 lanes of a warp at a barrier, exchange operands and compute each
// lane's result from the PTX ISA's fragment layouts, so fragment/address bugs in the kernels show up as wrong
// numbers; a collective in divergent code is reported as a deadlock. Warpgroup MMAs (sm_90a wgmma) rendezvous the 128
// threads of a warpgroup, decode their shared-memory descriptors (no-swizzle layouts) and run at issue or only at the
// wgmma.wait_group that retires them (g_wgmma_at_wait); a kernel may not exit with one in flight. __syncthreads is a CTA-wide barrier. cp.async
// copies are performed either at issue or only at cp.async.wait_group (both orders are legal on hardware), so a read
// before the wait sees stale data. Shared memory is filled with NaN bytes before each CTA, so a read of an unwritten
// location poisons the result; ldmatrix and cp.async check their shared-memory bounds, cp.async its global source
// against the registered input buffers, and a kernel may not exit with copies in flight.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <utility>
#include <type_traits>
#include <vector>

#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll
// The kernels store 16-bit tiles through 32/128-bit pointers (as CUDA code does); keep GCC from exploiting the
// aliasing rules across those accesses.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-strict-aliasing")
#endif

// ---- qualifiers and runtime types --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

typedef int cudaError_t;
typedef struct CUstream_st* cudaStream_t;

struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 threadIdx;  // switched by the fiber scheduler
inline EmuDim3 blockIdx, blockDim, gridDim;

// ---- 16-bit floats (round-to-nearest-even conversions, as the CUDA intrinsics) ---------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace jedi_emu {

inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xFFu, mant = x & 0x7FFFFFu;
  if (exp == 0xFF) return static_cast<uint16_t>(sign | 0x7C00u | (mant ? 0x200u : 0u));
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 0x1F) return static_cast<uint16_t>(sign | 0x7C00u);
  if (e <= 0) {  // half subnormal (or zero)
    if (e < -10) return static_cast<uint16_t>(sign);
    const uint32_t m = mant | 0x800000u;
    const int shift = 14 - e;
    uint32_t hm = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (hm & 1u))) ++hm;
    return static_cast<uint16_t>(sign | hm);
  }
  uint32_t out = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) ++out;  // a carry rounds up into the exponent (to inf)
  return static_cast<uint16_t>(out);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t x;
  if (exp == 0x1F) {
    x = sign | 0x7F800000u | (mant << 13);
  } else if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  } else {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7FC0u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace jedi_emu

inline __half __float2half_rn(float f) { return __half{jedi_emu::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return jedi_emu::half_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{jedi_emu::float_to_bf16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return jedi_emu::bf16_bits_to_float(b.bits); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }

// ---- threads, barriers, warp rendezvous ---------------------------------------------------------------------------
namespace jedi_emu {

[[noreturn]] inline void fail(const char* what, long long a = 0, long long b = 0) {
  std::fprintf(stderr, "EMULATION CHECK FAILED: %s (%lld, %lld)\n", what, a, b);
  std::fflush(stderr);
  std::abort();
}

void yield();  // back to the scheduler (defined below)
void wait_on(const unsigned* gen, unsigned seen);  // yield until *gen != seen
inline uint64_t g_progress = 0;  // completed barriers: the scheduler's deadlock detector watches it

// n participants; the last arrival releases the others (who yield to the scheduler until then)
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const unsigned g = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      ++g_progress;
      return;
    }
    wait_on(&gen_, g);
  }

 private:
  int n_, count_ = 0;
  unsigned gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  uint32_t u[32][8];
  float f[32][4];
};

// One wgmma.mma_async of a warpgroup, as issued: descriptors, and where each of the 128 threads keeps its A fragment
// (register operand) and its accumulators. Executed at issue or at the wgmma.wait_group that retires its group.
struct WgmmaOp {
  bool a_regs;      // A from registers (else the shared-memory descriptor da)
  bool b_mn_major;  // B MN-major (imm-trans-b = 1)
  bool bf16;
  int n;
  uint64_t da, db;
  int scale_d;
  float* d[128];
  const uint32_t* a[128];
};

// A warpgroup: 4 consecutive warps. wgmma instructions rendezvous its 128 threads (they are warpgroup-collective).
struct WarpGroup {
  Barrier bar{128};
  uint64_t da[128], db[128];
  int scale_d[128];
  float* d[128];
  const uint32_t* a[128];
  std::vector<WgmmaOp> open;                   // issued since the last commit_group
  std::vector<std::vector<WgmmaOp>> groups;    // committed, oldest first, not yet executed
};

struct Cta {
  explicit Cta(int threads) : bar(threads) {
    if (threads % 32 != 0) fail("CTA size must be whole warps", threads);
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp);
    for (int w = 0; w < threads / 128; ++w) wgs.emplace_back(new WarpGroup);
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<WarpGroup>> wgs;
};

inline Cta* g_cta = nullptr;
inline bool g_cp_async_at_wait = true;  // true: copies land at cp.async.wait_group; false: at issue
// true: a wgmma reads its operands and writes its accumulators at the wgmma.wait_group that retires it (so a kernel
// that touches them, or overwrites the shared tiles, before that wait gets wrong numbers); false: at issue
inline bool g_wgmma_at_wait = true;
constexpr int kMaxThreads = 1024;
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};
inline std::vector<PendingCopy> g_pending[kMaxThreads];  // per CUDA thread
inline std::vector<PendingCopy>& pending() { return g_pending[threadIdx.x]; }
inline int64_t g_smem_limit = 0;  // dynamic shared memory bytes of the running kernel
struct Range {
  const unsigned char* lo;
  const unsigned char* hi;
};
inline std::vector<Range> g_inputs;  // global buffers cp.async may read

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline Warp& warp() { return *g_cta->warps[threadIdx.x / 32]; }

constexpr int64_t kSmemCapacity = 256 * 1024;

}  // namespace jedi_emu

inline void __syncthreads() { jedi_emu::g_cta->bar.wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) jedi_emu::fail("only full-warp shuffles are emulated");
  jedi_emu::Warp& w = jedi_emu::warp();
  const int l = jedi_emu::lane();
  w.f[l][0] = v;
  w.bar.wait();
  const float r = w.f[l ^ lane_mask][0];
  w.bar.wait();
  return r;
}

// Lane src_lane's v for every lane (the int form: the kernels broadcast warp-uniform indices with it).
inline int __shfl_sync(unsigned mask, int v, int src_lane) {
  if (mask != 0xffffffffu) jedi_emu::fail("only full-warp shuffles are emulated");
  jedi_emu::Warp& w = jedi_emu::warp();
  const int l = jedi_emu::lane();
  std::memcpy(&w.f[l][0], &v, sizeof v);  // bit-exact through the float slot
  w.bar.wait();
  int r;
  std::memcpy(&r, &w.f[src_lane & 31][0], sizeof r);
  w.bar.wait();
  return r;
}

inline bool __any_sync(unsigned mask, bool pred) {
  if (mask != 0xffffffffu) jedi_emu::fail("only full-warp votes are emulated");
  jedi_emu::Warp& w = jedi_emu::warp();
  const int l = jedi_emu::lane();
  w.f[l][0] = pred ? 1.f : 0.f;
  w.bar.wait();
  bool any = false;
  for (int i = 0; i < 32; ++i) any = any || w.f[i][0] != 0.f;
  w.bar.wait();
  return any;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

// ---- the kernels' device primitives ------------------------------------------------------------------------------
namespace jedi {
namespace set_attn {

// dynamic shared memory of the running CTA (the kernels' `extern __shared__ ... smem_raw[]` binds to it)
alignas(128) inline unsigned char smem_raw[jedi_emu::kSmemCapacity];

inline uint32_t smem_u32(const void* p) {
  const auto off = static_cast<const unsigned char*>(p) - smem_raw;
  if (off < 0 || off >= jedi_emu::g_smem_limit) jedi_emu::fail("shared-memory address out of range", off);
  return static_cast<uint32_t>(off);
}

inline void cp_async16(void* smem, const void* gmem) {
  const auto off = static_cast<unsigned char*>(smem) - smem_raw;
  if (off < 0 || off + 16 > jedi_emu::g_smem_limit || off % 16) jedi_emu::fail("cp.async destination", off);
  const auto* g = static_cast<const unsigned char*>(gmem);
  bool ok = false;
  for (const auto& r : jedi_emu::g_inputs) ok = ok || (g >= r.lo && g + 16 <= r.hi);
  if (!ok || reinterpret_cast<uintptr_t>(g) % 16) jedi_emu::fail("cp.async source outside the inputs or unaligned");
  if (jedi_emu::g_cp_async_at_wait)
    jedi_emu::pending().push_back({smem, gmem, 16});
  else
    std::memcpy(smem, gmem, 16);
}
// src-size 0 (!full): 16 zero bytes land like a copy would (at issue or at the wait); gmem is neither read nor
// checked (on hardware it may point past the tensor).
inline void cp_async16_zfill(void* smem, const void* gmem, bool full) {
  if (full) return cp_async16(smem, gmem);
  static const unsigned char kZeros[16] = {};
  const auto off = static_cast<unsigned char*>(smem) - smem_raw;
  if (off < 0 || off + 16 > jedi_emu::g_smem_limit || off % 16) jedi_emu::fail("cp.async destination", off);
  if (jedi_emu::g_cp_async_at_wait)
    jedi_emu::pending().push_back({smem, kZeros, 16});
  else
    std::memset(smem, 0, 16);
}
// 4 bytes, src-size 4 or 0 (zero-filled; the source then neither read nor checked); both 4-byte aligned.
inline void cp_async4_zfill(void* smem, const void* gmem, bool full) {
  static const unsigned char kZeros[4] = {};
  const auto off = static_cast<unsigned char*>(smem) - smem_raw;
  if (off < 0 || off + 4 > jedi_emu::g_smem_limit || off % 4) jedi_emu::fail("cp.async destination", off);
  if (full) {
    const auto* g = static_cast<const unsigned char*>(gmem);
    bool ok = false;
    for (const auto& r : jedi_emu::g_inputs) ok = ok || (g >= r.lo && g + 4 <= r.hi);
    if (!ok || reinterpret_cast<uintptr_t>(g) % 4) jedi_emu::fail("cp.async source outside the inputs or unaligned");
  }
  if (jedi_emu::g_cp_async_at_wait)
    jedi_emu::pending().push_back({smem, full ? gmem : kZeros, 4});
  else
    std::memcpy(smem, full ? gmem : kZeros, 4);
}
inline void cp_async_commit() {}
inline float fast_exp2(float x) { return exp2f(x); }
inline void cp_async_wait_all() {
  for (auto& c : jedi_emu::pending()) std::memcpy(c.dst, c.src, c.bytes);
  jedi_emu::pending().clear();
}

inline uint16_t smem_b16(uint32_t addr) {
  if (addr % 2 || static_cast<int64_t>(addr) + 2 > jedi_emu::g_smem_limit) jedi_emu::fail("ldmatrix read", addr);
  uint16_t v;
  std::memcpy(&v, smem_raw + addr, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l gets,
// of each matrix, row l/4 columns 2(l%4), 2(l%4)+1 (or, with .trans, column l/4 rows 2(l%4), 2(l%4)+1).
inline void ldsm_x4_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  jedi_emu::Warp& w = jedi_emu::warp();
  const int l = jedi_emu::lane();
  if (addr % 16) jedi_emu::fail("ldmatrix row address not 16-byte aligned", addr);
  w.u[l][0] = addr;
  w.bar.wait();
  const int g = l / 4, c = l % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row = w.u[8 * j + g][0];
      lo = smem_b16(row + 4 * c);
      hi = smem_b16(row + 4 * c + 2);
    } else {
      lo = smem_b16(w.u[8 * j + 2 * c][0] + 2 * g);
      hi = smem_b16(w.u[8 * j + 2 * c + 1][0] + 2 * g);
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w.bar.wait();
}
inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { ldsm_x4_impl(r, addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldsm_x4_impl(r, addr, true); }

template <typename T>
inline float emu_to_float(uint16_t bits);
template <>
inline float emu_to_float<__half>(uint16_t bits) {
  return jedi_emu::half_bits_to_float(bits);
}
template <>
inline float emu_to_float<__nv_bfloat16>(uint16_t bits) {
  return jedi_emu::bf16_bits_to_float(bits);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with the PTX fragment layouts
// (g = lane/4, c = lane%4): A reg i holds (row g + 8*(i%2), cols 2c + 8*(i/2) + {0,1}); B reg i holds
// (rows k = 2c + 8*i + {0,1}, col n = g); C/D element i holds (row g + 8*(i/2), col 2c + i%2).
template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  jedi_emu::Warp& w = jedi_emu::warp();
  const int l = jedi_emu::lane();
  for (int i = 0; i < 4; ++i) w.u[l][i] = a[i];
  w.u[l][4] = b0;
  w.u[l][5] = b1;
  for (int i = 0; i < 4; ++i) w.f[l][i] = d[i];
  w.bar.wait();
  float A[16][16], B[16][8], C[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, c = t % 4;
    for (int i = 0; i < 4; ++i)
      for (int e = 0; e < 2; ++e) {
        A[g + 8 * (i % 2)][2 * c + 8 * (i / 2) + e] = emu_to_float<T>(static_cast<uint16_t>(w.u[t][i] >> (16 * e)));
      }
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < 2; ++e)
        B[2 * c + 8 * i + e][g] = emu_to_float<T>(static_cast<uint16_t>(w.u[t][4 + i] >> (16 * e)));
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * c + i % 2] = w.f[t][i];
  }
  const int g = l / 4, c = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
    d[i] = acc;
  }
  w.bar.wait();
}

// ---- warpgroup MMA (sm_90a wgmma), shared-memory descriptors without swizzle --------------------------------------
// The PTX ISA's canonical no-swizzle layouts, 16-bit elements, byte address of element (row r of M/N, column k of K)
// from the descriptor's start address, leading (LBO) and stride (SBO) byte offsets:
//   K-major:   start + (r / 8) SBO + (r % 8) 16 + (k / 8) LBO + (k % 8) 2    (8x8 core matrices of 8 rows x 16 B)
//   MN-major:  start + (r / 8) SBO + (r % 8) 2  + (k / 8) LBO + (k % 8) 16
inline uint32_t wgmma_desc_addr(uint64_t desc, int r, int k, bool mn_major) {
  if ((desc >> 62) != 0) jedi_emu::fail("wgmma descriptor: only the no-swizzle layout is emulated");
  if (((desc >> 49) & 7u) != 0) jedi_emu::fail("wgmma descriptor: base offset must be 0 without swizzle");
  constexpr uint64_t kReserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52);
  if ((desc & kReserved) != 0) jedi_emu::fail("wgmma descriptor: reserved bits set");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  return mn_major ? start + (r / 8) * sbo + (r % 8) * 2 + (k / 8) * lbo + (k % 8) * 16
                  : start + (r / 8) * sbo + (r % 8) * 16 + (k / 8) * lbo + (k % 8) * 2;
}

inline float emu_b16(uint16_t bits, bool bf16) {
  return bf16 ? jedi_emu::bf16_bits_to_float(bits) : jedi_emu::half_bits_to_float(bits);
}

// D (64 x n) = A (64 x 16) B (16 x n) + (scale_d ? D : 0). Register layouts (warp w of the warpgroup, g = lane / 4,
// c = lane % 4): A register i holds row 16w + g + 8 (i % 2), columns 2c + 8 (i / 2) + {0, 1}; accumulator element
// i holds row 16w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2c + (i % 2).
inline void wgmma_execute(const jedi_emu::WgmmaOp& op) {
  float A[64][16], B[16][256];
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < 16; ++k)
      if (!op.a_regs) A[m][k] = emu_b16(smem_b16(wgmma_desc_addr(op.da, m, k, false)), op.bf16);
  if (op.a_regs) {
    for (int t = 0; t < 128; ++t) {
      const int w = t / 32, g = (t % 32) / 4, c = t % 4;
      for (int i = 0; i < 4; ++i)
        for (int e = 0; e < 2; ++e)
          A[16 * w + g + 8 * (i % 2)][2 * c + 8 * (i / 2) + e] =
              emu_b16(static_cast<uint16_t>(op.a[t][i] >> (16 * e)), op.bf16);
    }
  }
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < op.n; ++n) B[k][n] = emu_b16(smem_b16(wgmma_desc_addr(op.db, n, k, op.b_mn_major)), op.bf16);
  for (int t = 0; t < 128; ++t) {
    const int w = t / 32, g = (t % 32) / 4, c = t % 4;
    for (int i = 0; i < op.n / 2; ++i) {
      const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * c + (i % 2);
      float acc = op.scale_d ? op.d[t][i] : 0.f;
      for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
      op.d[t][i] = acc;
    }
  }
}

inline jedi_emu::WarpGroup& warpgroup() {
  if (static_cast<int>(threadIdx.x / 128) >= static_cast<int>(jedi_emu::g_cta->wgs.size()))
    jedi_emu::fail("wgmma outside a whole warpgroup", threadIdx.x);
  return *jedi_emu::g_cta->wgs[threadIdx.x / 128];
}

// Every thread of the warpgroup issues the instruction with its own registers; the descriptors and scale-d must
// agree across the warpgroup.
inline void wgmma_issue(bool a_regs, bool b_mn_major, bool bf16, int n, uint64_t da, const uint32_t* a, uint64_t db,
                        float* d, int scale_d) {
  jedi_emu::WarpGroup& wg = warpgroup();
  const int t = static_cast<int>(threadIdx.x % 128);
  wg.da[t] = da;
  wg.db[t] = db;
  wg.scale_d[t] = scale_d;
  wg.d[t] = d;
  wg.a[t] = a;
  wg.bar.wait();
  if (t == 0) {
    jedi_emu::WgmmaOp op{a_regs, b_mn_major, bf16, n, da, db, scale_d != 0, {}, {}};
    for (int i = 0; i < 128; ++i) {
      if (wg.db[i] != db || (!a_regs && wg.da[i] != da) || (wg.scale_d[i] != 0) != (scale_d != 0))
        jedi_emu::fail("wgmma operands differ across the warpgroup", i);
      op.d[i] = wg.d[i];
      op.a[i] = wg.a[i];
    }
    if (jedi_emu::g_wgmma_at_wait)
      wg.open.push_back(op);
    else
      wgmma_execute(op);
  }
  wg.bar.wait();
}

inline void wgmma_fence() {}
inline void fence_proxy_async() {}
inline void wgmma_fence_operand(float&) {}
inline void wgmma_fence_operand(uint32_t&) {}
inline void wgmma_commit() {
  jedi_emu::WarpGroup& wg = warpgroup();
  wg.bar.wait();
  if (threadIdx.x % 128 == 0) {
    wg.groups.push_back(std::move(wg.open));
    wg.open.clear();
  }
  wg.bar.wait();
}
template <int N>
inline void wgmma_wait() {
  jedi_emu::WarpGroup& wg = warpgroup();
  wg.bar.wait();
  if (threadIdx.x % 128 == 0) {
    while (static_cast<int>(wg.groups.size()) > N) {
      for (const auto& op : wg.groups.front()) wgmma_execute(op);
      wg.groups.erase(wg.groups.begin());
    }
  }
  wg.bar.wait();
}

template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  wgmma_issue(false, false, std::is_same<T, __nv_bfloat16>::value, N, da, nullptr, db, d, scale_d);
}
template <typename T, int N>
inline void wgmma_rs_bt(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  wgmma_issue(true, true, std::is_same<T, __nv_bfloat16>::value, N, 0, a, db, d, scale_d);
}

}  // namespace set_attn
}  // namespace jedi

// ---- launching -----------------------------------------------------------------------------------------------
namespace jedi_emu {

// Fibers (ucontext) play the CUDA threads of one CTA on this one OS thread: a thread runs until it waits at a
// barrier (warp collective or __syncthreads), then the scheduler resumes the next one, round-robin. Far cheaper than
// OS threads, and a CTA whose threads can never all meet (a barrier in divergent code) is reported as a deadlock.
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  const unsigned* wait_gen = nullptr;  // the barrier generation it waits to change (nullptr: runnable)
  unsigned wait_seen = 0;
};
inline ucontext_t g_sched;
inline std::vector<Fiber> g_fibers;
inline int g_current = -1;
inline const std::function<void(int)>* g_job = nullptr;
inline std::mt19937 g_rng(12345);  // scheduling noise, reproducible

inline void yield() { swapcontext(&g_fibers[g_current].ctx, &g_sched); }
inline void wait_on(const unsigned* gen, unsigned seen) {
  Fiber& f = g_fibers[g_current];
  f.wait_gen = gen;
  f.wait_seen = seen;
  while (*gen == seen) yield();
  f.wait_gen = nullptr;
}

inline void fiber_entry(int id) {
  (*g_job)(id);
  g_fibers[id].done = true;  // returning resumes uc_link = the scheduler
}

inline void run_cta(int n, const std::function<void(int)>& job) {
  if (n > kMaxThreads) fail("CTA too large", n);
  constexpr size_t kStack = 256 * 1024;
  if (static_cast<int>(g_fibers.size()) < n) g_fibers.resize(n);
  g_job = &job;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    if (f.stack.empty()) f.stack.resize(kStack);
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 1, i);
  }
  // Each warp gets a random speed: a round runs its threads (each up to its next barrier) with that probability, so
  // warps drift apart between __syncthreads as on hardware, and a missing barrier lets one warp overtake another.
  const int warps = (n + 31) / 32;
  std::vector<double> speed(warps);
  for (auto& v : speed) v = 0.2 + 0.8 * static_cast<double>(g_rng() % 1000) / 1000.0;
  int alive = n, stuck_rounds = 0;
  // watchdog: the test's busiest CTA passes ~32 000 barriers (warp collectives included); a loop that never ends (a
  // tile walk that stops advancing) would spin forever between barriers that do complete, which the deadlock check
  // cannot see
  constexpr uint64_t kMaxBarriersPerCta = 2'000'000;
  const uint64_t start = g_progress;
  while (alive > 0) {
    const uint64_t before = g_progress;
    if (before - start > kMaxBarriersPerCta) fail("watchdog: a CTA passed too many barriers (an endless loop?)", alive);
    bool ran = false;
    for (int w = 0; w < warps; ++w) {
      if (static_cast<double>(g_rng() % 1000) / 1000.0 >= speed[w]) continue;
      for (int i = 32 * w; i < std::min(n, 32 * w + 32); ++i) {
        Fiber& f = g_fibers[i];
        if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.wait_seen)) continue;  // finished or blocked
        g_current = i;
        threadIdx = EmuDim3{static_cast<unsigned>(i), 0, 0};
        swapcontext(&g_sched, &f.ctx);
        ran = true;
        if (f.done) --alive;
      }
    }
    // nothing runnable anywhere and no barrier completing: the threads wait for each other forever
    bool runnable = false;
    for (int i = 0; i < n && !runnable; ++i)
      runnable = !g_fibers[i].done &&
                 (g_fibers[i].wait_gen == nullptr || *g_fibers[i].wait_gen != g_fibers[i].wait_seen);
    stuck_rounds = (!runnable && !ran && g_progress == before) ? stuck_rounds + 1 : 0;
    if (alive > 0 && !runnable && stuck_rounds > 0)
      fail("deadlock: threads wait at barriers the others never reach", alive);
  }
  g_current = -1;
}

// Run `body` (a call of a kernel) for every CTA of the grid, sequentially, each CTA with `threads` fibers.
template <typename F>
void launch(EmuDim3 grid, int threads, int64_t smem_bytes, F body) {
  if (smem_bytes > kSmemCapacity) fail("dynamic shared memory above the emulated capacity", smem_bytes);
  gridDim = grid;
  blockDim = EmuDim3{static_cast<unsigned>(threads), 1, 1};
  g_smem_limit = smem_bytes;
  const std::function<void(int)> job = [&body](int t) {
    body();
    if (!g_pending[t].empty()) fail("kernel exited with cp.async copies in flight", t);
  };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = EmuDim3{x, y, z};
        std::memset(jedi::set_attn::smem_raw, 0xFF, static_cast<size_t>(smem_bytes));  // NaN in fp16/bf16/fp32
        Cta cta(threads);
        g_cta = &cta;
        run_cta(threads, job);
        for (const auto& wg : cta.wgs)
          if (!wg->open.empty() || !wg->groups.empty()) fail("kernel exited with wgmma operations in flight");
        g_cta = nullptr;
      }
}

}  // namespace jedi_emu
