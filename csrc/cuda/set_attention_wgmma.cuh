// Set-wise flash attention forward for Hopper (sm_90a): warpgroup MMAs (wgmma.mma_async) with the softmax of one key
// tile overlapping the P V product of the previous one (FlashAttention-3's intra-warpgroup pipelining). Same
// semantics, layouts, set structure, masks and outputs as set_attn_fwd_kernel (set_attention_kernels.cuh). Head dims 40
// (the default on sm_90 since the H200 run of 2026-11-28: variant 1), 80 and 160 (opt-in, JEDI_CUDA_FWD_WGMMA=1..5,
// the tile shapes, until a GPU run has timed them).
//
// Why: the mma.sync forward cannot keep the tensor cores busy while its exponentials run (ptxas serializes the two
// inside a warp; the H100 measured 0.811 ms at d 40 against cuDNN's 0.603), and Triton 3.6 waits for every wgmma
// right after issuing it (benchmarks/README.md, "Why the Triton forward cannot overlap"). Here each warpgroup issues
// S_t = Q K_t^T and O += P_{t-1} V_{t-1} back to back, waits for S_t only, and runs S_t's softmax while the P V
// product is still on the tensor cores; O is rescaled after that product completes.
//
// Shared-memory operands use the no-swizzle ("interleave") canonical layouts of the PTX ISA: a tile of R rows x C
// columns (16-bit elements) is stored chunk-major, element (r, c) at byte (c / 8) * 16 R + 16 r + 2 (c % 8), i.e. 8x8
// core matrices of 128 contiguous bytes. The same bytes serve as a K-major operand (Q as A, K as B of Q K^T: rows are
// M/N, columns K; leading byte offset = the chunk stride 16 R, stride byte offset = 128) and as an MN-major one (V as
// B of P V: rows are K, columns N; leading byte offset = 128, stride byte offset = 16 R). cp.async writes each
// 16-byte chunk straight to its place; nothing is transposed.
//
// Register layouts (PTX ISA, wgmma .m64nNk16, f32 accumulators; warp w of the warpgroup owns rows 16w..16w+15,
// g = lane / 4, c = lane % 4): accumulator element i sits at row 16w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2c +
// (i % 2): per 8-column chunk exactly the mma.sync m16n8 C layout, so a 16-key slice of S packed to 16 bits is the A
// fragment (four registers, mma.sync's A layout) of the P V wgmma.
//
// Built for sm_90a only (`9.0a` in TORCH_CUDA_ARCH_LIST: setup.py turns 9.0 into 9.0a); elsewhere the kernel body
// is empty and the launcher refuses to run it (set_attention_wgmma_runnable).
#pragma once

#include <type_traits>

#include "set_attention.cuh"
#include "set_attention_device.cuh"
#include "set_attention_tiles.cuh"

#if !defined(JEDI_SET_ATTN_EMULATE) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JEDI_WGMMA_DEVICE 1  // this compilation pass emits the real kernel
#endif
#if defined(JEDI_SET_ATTN_EMULATE) || defined(JEDI_WGMMA_DEVICE)
#define JEDI_WGMMA_BODY 1
#endif

namespace jedi {
namespace set_attn {

// ---- shared-memory matrix descriptors (no swizzle) ------------------------------------------------------------------
// bits 0-13: start address >> 4; 16-29: leading dimension byte offset >> 4; 32-45: stride dimension byte offset >> 4;
// 49-51: base offset (0: no swizzle); 62-63: swizzle mode (0: none).
JEDI_HD constexpr uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32);
}

#if !defined(JEDI_SET_ATTN_EMULATE)
// ---- PTX wrappers (sm_90a) ----------------------------------------------------------------------------------------
#if defined(JEDI_WGMMA_DEVICE)
// Registers written by ordinary instructions become visible to the next wgmma (accumulators, A fragments).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written through the generic proxy (cp.async, st.shared) becomes visible to wgmma (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#else
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
#endif
// Keeps the compiler from moving reads/writes of an accumulator across wgmma issue and wait (CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Accumulator operand lists: "+f"(d[0]), ..., "+f"(d[K - 1]).
#define JEDI_WGMMA_D8(i)                                                                                              \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]),         \
      "+f"(d[i + 7])
#define JEDI_WGMMA_D24 JEDI_WGMMA_D8(0), JEDI_WGMMA_D8(8), JEDI_WGMMA_D8(16)
#define JEDI_WGMMA_D32 JEDI_WGMMA_D24, JEDI_WGMMA_D8(24)
#define JEDI_WGMMA_D64 JEDI_WGMMA_D32, JEDI_WGMMA_D8(32), JEDI_WGMMA_D8(40), JEDI_WGMMA_D8(48), JEDI_WGMMA_D8(56)
#define JEDI_WGMMA_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define JEDI_WGMMA_D44 JEDI_WGMMA_D32, JEDI_WGMMA_D8(32), JEDI_WGMMA_D4(40)
#define JEDI_WGMMA_D84 JEDI_WGMMA_D64, JEDI_WGMMA_D8(64), JEDI_WGMMA_D8(72), JEDI_WGMMA_D4(80)
// The instructions, TY = "f16" or "bf16" (operands: d, then a-desc / a registers, b-desc, scale-d).
#define JEDI_WGMMA_SS64(TY)                                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                           \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"                                           \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                    \
               "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                                        \
               : JEDI_WGMMA_D32                                                                                       \
               : "l"(da), "l"(db), "r"(scale_d))
#define JEDI_WGMMA_SS128(TY)                                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                           \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                          \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                     \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                    \
               "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                        \
               : JEDI_WGMMA_D64                                                                                       \
               : "l"(da), "l"(db), "r"(scale_d))
#define JEDI_WGMMA_RS48(TY)                                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %29, 0;\n"                                                           \
               "wgmma.mma_async.sync.aligned.m64n48k16.f32." TY "." TY " {"                                           \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
               "%16, %17, %18, %19, %20, %21, %22, %23}, "                                                            \
               "{%24, %25, %26, %27}, %28, p, 1, 1, 1;\n}\n"                                                          \
               : JEDI_WGMMA_D24                                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))
// The P V products of head dims 80 and 160: the values, then the ones column (88 and 168 columns).
#define JEDI_WGMMA_RS88(TY)                                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %49, 0;\n"                                                           \
               "wgmma.mma_async.sync.aligned.m64n88k16.f32." TY "." TY " {"                                           \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43}, "                                        \
               "{%44, %45, %46, %47}, %48, p, 1, 1, 1;\n}\n"                                                          \
               : JEDI_WGMMA_D44                                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))
#define JEDI_WGMMA_RS168(TY)                                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %89, 0;\n"                                                           \
               "wgmma.mma_async.sync.aligned.m64n168k16.f32." TY "." TY " {"                                          \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                     \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                     \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                     \
               "%80, %81, %82, %83}, "                                                                                \
               "{%84, %85, %86, %87}, %88, p, 1, 1, 1;\n}\n"                                                          \
               : JEDI_WGMMA_D84                                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))

// D (64 x N, f32) = A (64 x 16, shared, K-major) B (16 x N, shared, K-major) + (scale_d ? D : 0), one warpgroup.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_ss: instantiated for N = 64 and 128");
#if defined(JEDI_WGMMA_DEVICE)
  constexpr bool kHalf = std::is_same<T, __half>::value;
  if constexpr (N == 64) {
    if constexpr (kHalf) JEDI_WGMMA_SS64("f16"); else JEDI_WGMMA_SS64("bf16");
  } else {
    if constexpr (kHalf) JEDI_WGMMA_SS128("f16"); else JEDI_WGMMA_SS128("bf16");
  }
#endif
}

// D (64 x N, f32) = A (64 x 16, registers) B (16 x N, shared, MN-major) + (scale_d ? D : 0), one warpgroup.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_bt(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  static_assert(N == 48 || N == 88 || N == 168, "wgmma_rs_bt: instantiated for N = 48, 88 and 168");
#if defined(JEDI_WGMMA_DEVICE)
  constexpr bool kHalf = std::is_same<T, __half>::value;
  if constexpr (N == 48) {
    if constexpr (kHalf) JEDI_WGMMA_RS48("f16"); else JEDI_WGMMA_RS48("bf16");
  } else if constexpr (N == 88) {
    if constexpr (kHalf) JEDI_WGMMA_RS88("f16"); else JEDI_WGMMA_RS88("bf16");
  } else {
    if constexpr (kHalf) JEDI_WGMMA_RS168("f16"); else JEDI_WGMMA_RS168("bf16");
  }
#endif
}
#endif  // !JEDI_SET_ATTN_EMULATE

// ---- the kernel ---------------------------------------------------------------------------------------------------
// Instances: head dim 40 (the 5 joint layers of SD at 64x64): Q K^T over 48 columns (three k16 steps; columns 40-47
// zero-filled), P V over 48 (wgmma n48: the 40 values, then the ones column that sums P's rows); head dims 80 and 160
// (SD's 32x32 and 16x16 layers): Q K^T over 80 / 160 columns as they are, P V over 88 / 168. kBlockN keys per tile,
// kWG warpgroups of 64 query rows each per CTA.
template <typename T, int kDk, int kDv, int kBlockN, int kWG>
struct WgFwdTraits {
  using Elem = T;
  static constexpr int kBlockM = 64 * kWG;
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kQKSteps = kDk / 16;      // k16 steps of Q K^T
  static constexpr int kPVSteps = kBlockN / 16;  // k16 steps of P V
  static constexpr int kSAcc = kBlockN / 2;      // score accumulators per thread
  static constexpr int kDo = kDv + 8;            // P V columns: the values, then a ones column (row sums l)
  static constexpr int kOAcc = kDo / 2;          // output accumulators per thread
  static constexpr int kQCS = 16 * kBlockM;      // chunk strides (bytes) of the chunk-major tiles
  static constexpr int kKCS = 16 * kBlockN;
  static constexpr int kQBytes = kDk / 8 * kQCS;
  static constexpr int kKBytes = kDk / 8 * kKCS;
  static constexpr int kVBytes = kDo / 8 * kKCS;
  static constexpr int kSmemBytes = kQBytes + 2 * kKBytes + 2 * kVBytes;  // Q, two K stages, two V stages
  // CTAs per SM that the register budget is planned for (__launch_bounds__): at head dim 40 (kDo 48) two 2-warpgroup
  // CTAs of 64-key tiles (128 registers), and one-warpgroup CTAs four at a time with 64-key tiles (128 registers)
  // or three with 128-key tiles (168); at head dim 80 three one-warpgroup CTAs of 64-key tiles (168); elsewhere two
  // one-warpgroup CTAs or one larger one.
  static constexpr int kMinBlocks =
      kWG == 1 ? (kDo <= 48 ? (kBlockN <= 64 ? 4 : 3) : kDo <= 88 && kBlockN <= 64 ? 3 : 2)
               : (kWG == 2 && kBlockN <= 64 && kDo <= 48 ? 2 : 1);
  static_assert(kDk % 16 == 0 && kDv % 8 == 0 && kDv <= kDk && kDk - kDv < 16, "head dims of one instance");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA on sm_90");
  static_assert(kBlockN == 64 || kBlockN == 128, "key tiles of 64 or 128");
  static_assert(kWG >= 1 && kWG <= 3, "one to three warpgroups");
};

// The head dims the wgmma forward serves, and the k16 extent of their Q K^T (40 -> 48, zero-filled; 80 and 160 as
// they are). Head dim 40 runs it by default on sm_90 (set_attention_glue.cpp), 80 and 160 only when
// JEDI_CUDA_FWD_WGMMA asks.
JEDI_HD constexpr bool wgmma_fwd_head_dim(int64_t D) { return D == 40 || D == 80 || D == 160; }
JEDI_HD constexpr int wgmma_dk(int D) { return (D + 15) / 16 * 16; }
// The variants compiled for a head dim: those sm_90a ptxas builds without spills (2026-11-28): at 40 all five, at 80
// the two-warpgroup ones (three warpgroups spill 36 bytes at 168 registers) and 64 x 1 (168 registers, three CTAs per
// SM: 12 warps where the others hold 8; 128 x 1 needs 254 and issues 216 per 1024 scores against 128 x 2's 188), at
// 160 variant 1 (226-228 registers; 128-key tiles spill 76 bytes at 255 with two warpgroups and 580 with one, three
// warpgroups serialize their MMAs, and 64 x 1 issues 317 per 1024 scores against 270 for the same 8 warps per SM).
// Elsewhere the request falls back to the mma.sync kernels, like the other instance switches.
JEDI_HD constexpr bool wgmma_variant_compiled(int64_t D, int variant) {
  return D == 40 ? variant >= 1 && variant <= 5 : D == 80 ? variant == 1 || variant == 2 || variant == 5
                                                 : D == 160 && variant == 1;
}
// Forward variants (SetAttnParams::fwd_wgmma), keys per tile x warpgroups (64 query rows each) per CTA:
//   1: 64 x 2 (two CTAs per SM: 128 registers), 2: 128 x 2 (one CTA per SM), 3: 128 x 3 (one CTA per SM),
//   4: 128 x 1 (three CTAs per SM: 168 registers; cuDNN's sm90 tile at d 40: 64 queries x 128 keys, one warpgroup),
//   5: 64 x 1 (four CTAs per SM: 128 registers).
// Per 1024 scores the steady loop issues ~236 (1), ~184 (2), ~178 (3), ~189 (4), ~248 (5) sm_90a instructions inside
// an image (the tile copies planned once per CTA, a 32-bit walk, descriptors in uniform registers; before: 341, 255,
// 237) against 32 exponentials x 8 clocks = 256 clocks of the exp unit: wider tiles spread the per-tile work (loads,
// barrier, descriptors) thinner (tools/sass_loop_mix.py --wgmma). On the H200 (before those counts) the variants
// ranked by resident warps per SM instead (16 / 8 / 12: 0.727 / 0.946 / 0.830 ms at L 4096, ng 2); 4 and 5 keep 12 and
// 16 in independent one-warpgroup CTAs, whose per-tile barrier holds only their own warpgroup.
constexpr int kWgmmaVariants = 5;
JEDI_HD constexpr int wgmma_variant_block_n(int variant) { return variant == 1 || variant == 5 ? 64 : 128; }
JEDI_HD constexpr int wgmma_variant_warpgroups(int variant) { return variant == 3 ? 3 : variant >= 4 ? 1 : 2; }

// Rows [row0, row0 + kRows) x columns [0, 8 kChunks) of one head of one image into a chunk-major tile (see the
// header comment); rows >= L and columns >= D are zero-filled. Used for the CTA's Q tile, loaded once; key tiles go
// through TileCopyPlan (set_attention_tiles.cuh), which does this per-chunk arithmetic once per CTA instead of per
// tile. Offsets inside the tile are 32-bit (the launcher checks kRows * stride_l fits).
template <typename T, int kRows, int kChunks, int kThreads>
__device__ __forceinline__ void wg_load_tile(unsigned char* s, const T* gt, int stride_l, int rows_in, int D,
                                             int tid) {
  constexpr int kTotal = kRows * kChunks;
#if defined(JEDI_WGMMA_DEVICE)
  // an opaque copy: without it ptxas recomputes the tile's 64-bit base (three multiplies) for every chunk
  asm("" : "+l"(gt));
#endif
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = it * kThreads + tid;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int r = i / kChunks, c = i % kChunks;  // consecutive threads: consecutive 16-byte chunks of a row
      cp_async16_zfill(s + c * (16 * kRows) + 16 * r, gt + (r * stride_l + c * 8), r < rows_in && c * 8 < D);
    }
  }
}

// One CTA: query rows [m0, m0 + 64 kWG) of image i of set b, head h; warpgroup w owns rows m0 + 64w ... + 63. The
// online softmax is set_attn_fwd_kernel's (log2 units, lazy rescaling by kLazyRescaleLog2); the row sums l come
// from the P V product itself, through a column of ones after V's values. Iteration t (key tile t of the walk):
//   1. waits for K_t and V_{t-1} (one CTA barrier), starts the copies of V_t and K_{t+1} into the buffers iteration
//      t-1 was done with (K and V double-buffered);
//   2. issues S_t = Q K_t^T (wgmma, shared x shared), then O += P_{t-1} V_{t-1} (wgmma, P from registers), and waits
//      for S_t only;
//   3. runs the softmax of S_t (row maxima, exponentials) while the P V product runs;
//   4. waits for it, rescales O (l with it) if a running max moved, and packs P_t into A fragments.
// After the walk one more P V adds the last tile.
template <typename T, int kDk, int kDv, int kBlockN, int kWG>
__global__ void __launch_bounds__(WgFwdTraits<T, kDk, kDv, kBlockN, kWG>::kThreads,
                                  WgFwdTraits<T, kDk, kDv, kBlockN, kWG>::kMinBlocks)
    set_attn_fwd_wgmma_kernel(const SetAttnParams p) {
#if defined(JEDI_WGMMA_BODY)
  using Tr = WgFwdTraits<T, kDk, kDv, kBlockN, kWG>;
  constexpr int kBlockM = Tr::kBlockM, kThreads = Tr::kThreads;
  constexpr int kSAcc = Tr::kSAcc, kOAcc = Tr::kOAcc;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* sQ = smem_raw;
  unsigned char* sK = sQ + Tr::kQBytes;        // stage s at sK + s * kKBytes
  unsigned char* sV = sK + 2 * Tr::kKBytes;    // stage s at sV + s * kVBytes

  const int tid = threadIdx.x, warp = (tid % 128) / 32, lane = tid % 32;
  // the warpgroup, broadcast from lane 0 so that ptxas knows it is warp-uniform: the descriptors built from it then
  // live in uniform registers instead of moving there (R2UR) before every wgmma
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int64_t G = p.G, L = p.L;
  const int D = static_cast<int>(p.D);
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t m_tiles = ceil_div(L, kBlockM);
  const TileCoord qc = tile_coord(blockIdx.x, m_tiles, kBlockM);

  const T* q_tile = static_cast<const T*>(p.q) + tensor_row(b, G, qc.image) * p.q_stride_n + h * D;
  const uint8_t* mask_row = p.set_mask != nullptr ? p.set_mask + qc.image * G : nullptr;
  KeyWalk<T, kBlockN> kw(p, b, h, mask_row);  // the walk's tile and where it lies (set_attention_tiles.cuh)
  TileCopyPlan<kBlockN, kDv / 8, kThreads, 0> tile_copy;  // chunk-major tiles
  tile_copy.init(tid, p.k_stride_l, p.v_stride_l, D);
  const int q_sl = static_cast<int>(p.q_stride_l);
  // Q and K: columns kDv..kDk-1 (the k16 padding of Q K^T, 40..47 at head dim 40) are zeros written once here and
  // never copied over; only the kDv / 8 chunks that can hold data are loaded
  if constexpr (kDk > kDv) {
    for (int i = tid; i < (kDk - kDv) / 8 * (kBlockM + 2 * kBlockN); i += kThreads) {
      const int r = i % (kBlockM + 2 * kBlockN), c = kDv / 8 + i / (kBlockM + 2 * kBlockN);
      unsigned char* dst = r < kBlockM ? sQ + c * Tr::kQCS + 16 * r
                                       : sK + (r - kBlockM) / kBlockN * Tr::kKBytes + c * Tr::kKCS +
                                             16 * ((r - kBlockM) % kBlockN);
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  // V: the chunk after the values holds (1, 0, ..., 0) in every key row, so O's column kDv accumulates the row sums
  // of P on the tensor cores (as rounded for the product) instead of 32 FADDs per 1024 scores
  {
    const uint4 ones = make_uint4(pack2<T>(1.f, 0.f), 0u, 0u, 0u);
    for (int i = tid; i < 2 * kBlockN; i += kThreads)
      *reinterpret_cast<uint4*>(sV + i / kBlockN * Tr::kVBytes + kDv / 8 * Tr::kKCS + 16 * (i % kBlockN)) = ones;
  }
  wg_load_tile<T, kBlockM, kDv / 8, kThreads>(sQ, q_tile + qc.row0 * p.q_stride_l, q_sl,
                                               L - qc.row0 < kBlockM ? static_cast<int>(L - qc.row0) : kBlockM, D,
                                               tid);
  if (!kw.done()) tile_copy.copy(sK, kw.k, tile_copy.koff, kw.rows);
  cp_async_commit();

  const float sl = fabsf(p.scale) * kLog2e;
  // Descriptors of the first k16 step of each operand (stage 0); the others add their byte offset >> 4 to the start
  // address field (no carry out of it: shared addresses stay below 256 KB).
  const uint64_t dQ = wgmma_desc(smem_u32(sQ) + wg * 64 * 16, Tr::kQCS, 128);  // this warpgroup's 64 rows
  const uint64_t dK = wgmma_desc(smem_u32(sK), Tr::kKCS, 128);
  const uint64_t dV = wgmma_desc(smem_u32(sV), 128, Tr::kKCS);

  float acc_o[kOAcc];
#pragma unroll
  for (int i = 0; i < kOAcc; ++i) acc_o[i] = 0.f;
  float acc_s[kSAcc];
  uint32_t p_frag[Tr::kPVSteps][4];
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp's 16 (log2 units)

  // 1. K_t and V_{t-1} (Q on the first trip) landed and are visible to the tensor cores, for every thread; every
  //    warpgroup is done with iteration t-1's buffers. Then the copies of V_t and K_{t+1} (the walk's next tile) start.
  //    The walk moves on to tile t+1 in place; `rows` keeps tile t's rows for its softmax.
  int rows = 0;
  auto next_tile = [&](int t) {
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    const int st = t & 1;
    tile_copy.copy(sV + st * Tr::kVBytes, kw.v, tile_copy.voff, kw.rows);
    rows = kw.rows;
    kw.advance();
    if (!kw.done()) tile_copy.copy(sK + (st ^ 1) * Tr::kKBytes, kw.k, tile_copy.koff, kw.rows);
    cp_async_commit();
  };
  auto issue_qk = [&](int st) {
#pragma unroll
    for (int s = 0; s < Tr::kQKSteps; ++s) {
      wgmma_ss<T, kBlockN>(acc_s, dQ + ((2 * s * Tr::kQCS) >> 4),
                           dK + st * (Tr::kKBytes >> 4) + ((2 * s * Tr::kKCS) >> 4), s > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int st) {
#pragma unroll
    for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
      wgmma_rs_bt<T, Tr::kDo>(acc_o, p_frag[kk], dV + st * (Tr::kVBytes >> 4) + kk * (256 >> 4), 1);
    }
    wgmma_commit();
  };
  auto fence_s = [&] {
#pragma unroll
    for (int i = 0; i < kSAcc; ++i) wgmma_fence_operand(acc_s[i]);
  };
  auto fence_o = [&] {
#pragma unroll
    for (int i = 0; i < kOAcc; ++i) wgmma_fence_operand(acc_o[i]);
  };
  // 3. softmax of S_t in place (P_t = 2^(c s - m), fp32), the running maxima moved lazily (m_prev: the old ones).
  //    True when a row of this lane moved.
  float m_prev[2], m_use[2];
  auto softmax = [&]() -> bool {
    const int valid_keys = rows;  // > 0; < kBlockN only in an image's last tile
    const bool tail = valid_keys < kBlockN;
    if (tail) {
#pragma unroll
      for (int i = 0; i < kSAcc; ++i)
        if (8 * (i / 4) + 2 * (lane % 4) + (i % 2) >= valid_keys) acc_s[i] = -INFINITY;
    }
    bool moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kSAcc; ++i)
        if ((i / 2) % 2 == r) mx = fmaxf(mx, acc_s[i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mx2 = mx * sl;
      m_prev[r] = row_max[r];
      if (mx2 > row_max[r] + kLazyRescaleLog2) {  // -inf + threshold = -inf: the first finite max always moves it
        row_max[r] = mx2;
        moved = true;
      }
      m_use[r] = row_max[r] == -INFINITY ? 0.f : row_max[r];  // nothing allowed yet: exp2 stays finite
    }
#pragma unroll
    for (int i = 0; i < kSAcc; ++i) acc_s[i] = fast_exp2(fmaf(acc_s[i], sl, -m_use[(i / 2) % 2]));
    if (tail) {  // exact zeros also when scale == 0 (0 * -inf = NaN)
#pragma unroll
      for (int i = 0; i < kSAcc; ++i)
        if (8 * (i / 4) + 2 * (lane % 4) + (i % 2) >= valid_keys) acc_s[i] = 0.f;
    }
    return moved;
  };
  // 4. O (with l in its ones column) follows a moved running max (2^(m_prev - m): 1 for rows that did not move; called
  //    when some row of the warp moved, a warp-uniform vote); P_t packed to 16 bits as the A fragments of its P V
  //    product.
  auto rescale_o = [&] {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float corr = fast_exp2(m_prev[r] - m_use[r]);  // 0 for a row's first finite max (O, l still 0)
#pragma unroll
      for (int i = 0; i < kOAcc; ++i)
        if ((i / 2) % 2 == r) acc_o[i] *= corr;
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < Tr::kPVSteps; ++kk) {
      p_frag[kk][0] = pack2<T>(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
      p_frag[kk][1] = pack2<T>(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
      p_frag[kk][2] = pack2<T>(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
      p_frag[kk][3] = pack2<T>(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
    }
  };

  // The first tile (no P V product yet), then the steady loop, whose wgmmas are all issued unconditionally (a P V
  // product issued under `if (t > 0)` made ptxas serialize every wgmma, warning C7514), then the last tile's P V.
  if (!kw.done()) {
    next_tile(0);
    if (p.scale < 0.f) {  // a negative scale runs as (-q) k^T |scale|: flip Q's sign bits once
      uint32_t* q32 = reinterpret_cast<uint32_t*>(sQ);
      for (int i = tid; i < Tr::kQBytes / 4; i += kThreads) q32[i] ^= kSignBits;
      fence_proxy_async();
      __syncthreads();
    }
    fence_s();
    wgmma_fence();
    issue_qk(0);
    wgmma_wait<0>();
    fence_s();
    if (__any_sync(0xffffffffu, softmax())) rescale_o();
    pack_p();
    int t = 1;
    while (!kw.done()) {
      next_tile(t);
      const int st = t & 1;
      fence_s();
      fence_o();
      wgmma_fence();
      issue_qk(st);      // S_t = Q K_t^T
      issue_pv(st ^ 1);  // O += P_{t-1} V_{t-1}
      wgmma_wait<1>();   // S_t done; the P V product may still run ...
      fence_s();
      const bool moved = softmax();  // ... during the softmax
      fence_s();
      // The wait for the P V product stands in both arms of the rescale branch: ptxas hoists a wait that follows
      // straight-line code up to the previous one (and the exponentials would then run after it, serialized behind
      // the tensor cores), but not above a branch (tests/tools/test_sass_loop_mix.py checks the schedule).
      if (__any_sync(0xffffffffu, moved)) {
        wgmma_wait<0>();
        fence_o();
        rescale_o();
      } else {
        wgmma_wait<0>();
        fence_o();
      }
      pack_p();
      ++t;
    }
    cp_async_wait_all();  // V of the last tile
    fence_proxy_async();
    __syncthreads();
    fence_o();
    wgmma_fence();
    issue_pv((t - 1) & 1);
    wgmma_wait<0>();
    fence_o();
  }
  cp_async_wait_all();  // a CTA that visited no key tile still has its Q copy in flight

  // normalize and write rows < L, columns < D, and lse
  T* out = static_cast<T*>(p.out);
  const int64_t H = p.H, HD = H * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // l: column kDv of O, held by the quad's first lane (the quad's other columns there are zeros)
    float sum = acc_o[4 * (kDv / 8) + 2 * r] + acc_o[4 * (kDv / 8) + 2 * r + 1];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float lse = sum > 0.f ? row_max[r] * kLn2 + logf(sum) : -INFINITY;
    const int64_t pos = qc.row0 + wg * 64 + warp * 16 + lane / 4 + 8 * r;
    if (pos < L) {
      T* orow = out + (tensor_row(b, G, qc.image) * L + pos) * HD + h * D;
#pragma unroll
      for (int j = 0; j < kDv / 8; ++j) {
        const int col = 8 * j + 2 * (lane % 4);
        if (col < D)
          *reinterpret_cast<uint32_t*>(orow + col) =
              pack2<T>(acc_o[4 * j + 2 * r] * inv, acc_o[4 * j + 2 * r + 1] * inv);
      }
      if (lane % 4 == 0) p.lse[lse_index(b, h, qc.image, pos, H, G, L)] = lse;
    }
  }
#endif  // JEDI_WGMMA_BODY
}

#if !defined(JEDI_SET_ATTN_EMULATE)
template <typename T, int kD, int kBlockN, int kWG>
cudaError_t run_fwd_wgmma_instance(const SetAttnParams& p, cudaStream_t stream) {
  using Tr = WgFwdTraits<T, wgmma_dk(kD), kD, kBlockN, kWG>;
  const Grid3 g = fwd_grid(p.B, p.G, p.L, p.H, Tr::kBlockM);
  if (g.x > INT_MAX || g.y > 65535 || g.z > 65535) return cudaErrorInvalidValue;
  auto kernel = set_attn_fwd_wgmma_kernel<T, wgmma_dk(kD), kD, kBlockN, kWG>;
  if (Tr::kSmemBytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z)), Tr::kThreads,
           Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Head dim kD's instances, by variant (p.fwd_wgmma) and dtype (0 = float16, 1 = bfloat16); explicitly instantiated in
// set_attention_fwd_wgmma_hdim<kD>.cu.
template <int kD>
cudaError_t run_fwd_wgmma_hdim(const SetAttnParams& p, int dtype, cudaStream_t stream) {
  auto run = [&](auto elem) -> cudaError_t {
    using T = decltype(elem);
    if constexpr (wgmma_variant_compiled(kD, 1))
      if (p.fwd_wgmma == 1) return run_fwd_wgmma_instance<T, kD, 64, 2>(p, stream);
    if constexpr (wgmma_variant_compiled(kD, 2))
      if (p.fwd_wgmma == 2) return run_fwd_wgmma_instance<T, kD, 128, 2>(p, stream);
    if constexpr (wgmma_variant_compiled(kD, 3))
      if (p.fwd_wgmma == 3) return run_fwd_wgmma_instance<T, kD, 128, 3>(p, stream);
    if constexpr (wgmma_variant_compiled(kD, 4))
      if (p.fwd_wgmma == 4) return run_fwd_wgmma_instance<T, kD, 128, 1>(p, stream);
    if constexpr (wgmma_variant_compiled(kD, 5))
      if (p.fwd_wgmma == 5) return run_fwd_wgmma_instance<T, kD, 64, 1>(p, stream);
    return cudaErrorInvalidValue;
  };
  return dtype == 0 ? run(__half{}) : run(__nv_bfloat16{});
}
#endif

}  // namespace set_attn
}  // namespace jedi
