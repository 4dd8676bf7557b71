"""Static instruction mix of the set-attention forward's main loop, compiled for sm_90 without a GPU.

    python tools/sass_loop_mix.py [--arch 90] [--cuda]
    python tools/sass_loop_mix.py --wgmma     # the Hopper (sm_90a) CUDA forward's variants

Compiles ``_set_attn_fwd_kernel`` (bf16, SD's head dims 40/80/160, the default GPU config of each class) with the
variants of its per-element work (``SCALE_POS``: scale folded into one FFMA; ``ROWSUM_DOT``: row sums on the tensor
cores), disassembles the cubin with the cuobjdump that ships with Triton and counts the SASS opcodes of the main loop
(the longest backward branch): instructions per warp and 128x64 tile, MUFU (exp2), FP32-pipe ops, HGMMA, SHFL.

``--cuda`` adds the CUDA C++ forward instances (nvcc, the flags of torch's extension build) per 1024 score elements
next to the Triton kernel's production variant, so the two designs (wgmma vs mma.sync) compare per unit of work.

This is a static proxy, not a timing: it tells how many issue slots, exp-unit and FP32 operations one tile costs, the
quantities that bound the loop at small head dims (at d = 40 a warp's tile needs ~8 clocks of the exp unit per MUFU
instruction and one issue slot per instruction, against ~384 clocks of tensor-core work). GPU timings decide.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FP32_PIPE = ("FMUL", "FADD", "FFMA", "FMNMX", "F2FP", "FSEL", "FSETP")
# what torch's extension build passes to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS, less the constexpr flag)
NVCC_TORCH_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")


def compile_fwd(D: int, arch: int, *, dtype: str = "bf16", **switches):
    """The forward kernel for head dim D with its class's default GPU config; ``switches`` override constexprs."""
    return compile_kernel("fwd", D, arch, dtype=dtype, **switches)[0]


def compile_kernel(kind: str, D: int, arch: int, *, dtype: str = "bf16", config=None, odd_ints: tuple = (),
                   **switches):
    """(compiled kernel, its config) of the Triton set-attention kernel ``kind`` ("fwd", "dkdv", "dq") for head dim D
    with its class's default GPU config (or ``config``: a triton.Config); ``switches`` override constexprs. Pointers
    and strides get Triton's divisibility-by-16 specialization, except the int arguments named in ``odd_ints``
    (values a launch would not see divisible by 16). The head dim is always split into chunks (D0, D1): at D <= 64 the
    production forward pads instead (``_FWD_PAD_UP_TO``; pass ``D0=64, D1=16, HAS_D1=False`` for it at d 40: 254
    registers where the chunked kernel takes 182)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from jedi_kernels.ops import set_attention as sa

    D0, D1 = sa.head_dim_chunks(D, True)
    kernel, configs = {"fwd": (sa._set_attn_fwd_kernel, sa._FWD_CONFIGS),
                       "dkdv": (sa._set_attn_bwd_dkdv_kernel, sa._DKDV_CONFIGS),
                       "dq": (sa._set_attn_bwd_dq_kernel, sa._DQ_CONFIGS)}[kind]
    cfg = config or configs[sa._dclass(D0, D1, None)][0]
    fn = kernel
    while not hasattr(fn, "params"):
        fn = fn.fn
    values = dict(HEAD_DIM=D, D0=D0, D1=max(D1, 16), HAS_D1=D1 > 0, HAS_MASK=False, COUNT_TILES=False,
                  DOT_F32=False, PREC="tf32", EVEN_N=True, EVEN_M=True, SCALE_POS=True, ROWSUM_DOT=False,
                  FUSED_DQ=False, KV_LINEAR=True, Q_LINEAR=True,  # contiguous / fused-qkv inputs: one base per set
                  **cfg.kwargs)
    values.update(switches)
    sig, const = {}, {}
    for p in fn.params:
        if p.is_constexpr:  # a constexpr this table does not set keeps the kernel's default (e.g. ROW_ALIGN)
            sig[p.name], const[p.name] = "constexpr", values[p.name] if p.name in values else p.default
        elif p.name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"):
            sig[p.name] = "*" + dtype
        elif p.name in ("Lse", "Delta", "DQacc"):
            sig[p.name] = "*fp32"
        elif p.name in ("ImgList", "ImgCount", "TileCount"):
            sig[p.name] = "*i32"
        elif p.name in ("qk_scale_log2", "scale"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or (p.name.startswith("stride") and p.name not in odd_ints)}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return compiled, cfg


def _sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin (the cuobjdump that ships with Triton)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loop_mix(kernel) -> tuple[collections.Counter, int]:
    """(opcode counts, instruction count) of the Triton kernel's main loop: the span of its longest backward branch."""
    return sass_loop_mix(_sass(kernel.asm["cubin"]))


def _nvcc_sass(src: Path, arch: int | str, extra: tuple[str, ...] = (), ptxas_log: list | None = None) -> str:
    """SASS of one csrc/cuda source compiled to a cubin with nvcc as torch's extension build compiles it (``arch``:
    90, or "90a" for the arch-specific target); ``ptxas_log`` (a list) receives ptxas's -v output. Without a log,
    one compile per (source and its modification time, arch, flags) and process: a report reads several kernels of
    one file (the backward's: each instance with and without its dQ step, and the dQ kernel)."""
    if ptxas_log is None:
        return _nvcc_sass_cached(Path(src), src.stat().st_mtime_ns, arch, tuple(extra))
    return _nvcc_sass_build(src, arch, extra, ptxas_log)


@functools.lru_cache(maxsize=16)
def _nvcc_sass_cached(src: Path, mtime_ns: int, arch: int | str, extra: tuple[str, ...]) -> str:
    return _nvcc_sass_build(src, arch, extra, None)


def _nvcc_sass_build(src: Path, arch: int | str, extra: tuple[str, ...], ptxas_log: list | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        verbose = ("-Xptxas=-v",) if ptxas_log is not None else ()
        res = subprocess.run(["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'cuda'}",
                              "-cubin", f"-arch=sm_{arch}", *NVCC_TORCH_FLAGS, *extra, *verbose, "-o", str(out),
                              str(src)], check=True, capture_output=True, text=True)
        if ptxas_log is not None:
            ptxas_log.append(res.stdout + res.stderr)
        return _sass(out.read_bytes())


# the Hopper forward's variants (keys per tile, warpgroups) and those compiled for each head dim, as
# csrc/cuda/set_attention_wgmma.cuh defines them (jedi_kernels/cuda_variants.py, checked against the header)
from jedi_kernels.cuda_variants import WGMMA_COMPILED, WGMMA_VARIANTS  # noqa: E402


@functools.lru_cache(maxsize=3)
def _wgmma_build(D: int = 40) -> tuple[str, str]:
    """(SASS, ptxas -v log) of set_attention_fwd_wgmma_hdim<D>.cu for sm_90a, as setup.py builds it (one compile)."""
    log: list = []
    sass = _nvcc_sass(ROOT / "csrc" / "cuda" / f"set_attention_fwd_wgmma_hdim{D}.cu", "90a", ("-DJEDI_SM90A",), log)
    return sass, log[0]


def cuda_wgmma_fwd_sass(variant: int, dtype: str = "bf16", D: int = 40) -> tuple[str, dict]:
    """(SASS, {"registers": ptxas's count, "spills": its spill-store bytes, "warnings": its C75xx lines about the
    function}) of the Hopper forward's ``variant`` at head dim ``D`` (set_attention_fwd_wgmma_hdim<D>.cu, sm_90a) for
    ``dtype``."""
    block_n, wg = WGMMA_VARIANTS[variant]
    sass, log = _wgmma_build(D)
    dk = (D + 15) // 16 * 16
    want = "set_attn_fwd_wgmma_kernelI" + ("13__nv_bfloat16" if dtype == "bf16" else "6__half") + \
        f"Li{dk}ELi{D}ELi{block_n}ELi{wg}E"
    # ptxas -v: "Compiling entry function '<name>'" ... "Used N registers" for each function in turn
    fn_log = re.findall(r"Compiling entry function '([^']+)'.*?\n(?:.*\n)*?.*?(\d+) bytes spill stores.*?\n"
                        r".*?Used (\d+) registers", log)
    found = [(int(spill), int(n)) for name, spill, n in fn_log if want in name]
    warnings = [line for line in log.splitlines() if want in line and re.search(r"\(C75\d\d\)", line)]
    for blk in re.split(r"\n\s*Function : ", sass)[1:]:
        if want in blk.split("\n", 1)[0]:
            return blk, dict(registers=found[0][1] if found else None, spills=found[0][0] if found else None,
                             warnings=warnings)
    raise LookupError(f"no set_attn_fwd_wgmma_kernel variant {variant} {dtype}")


def wgmma_overlap(sass: str) -> dict:
    """What the Hopper forward's steady loop (its longest backward branch) does between issuing its warpgroup MMAs
    and waiting for them: the HGMMAs issued before the first wait, the MUFU (exponentials) between the wait for S
    (``WARPGROUP.DEPBAR.LE gsb0, 0x1``) and the wait for the P V product (``0x0``): the softmax that overlaps the
    tensor cores, and the MUFU after that wait (the rescale's, or exponentials ptxas sank past it)."""
    body = _loop_body(sass)
    state, out = "issue", dict(hgmma=0, mufu_overlapped=0, mufu_after=0, waits=[])
    for _, op, rest in body:
        if op == "HGMMA" and state == "issue":
            out["hgmma"] += 1
        elif op == "WARPGROUP" and "DEPBAR" in rest:
            out["waits"].append(re.search(r"gsb0,\s*(0x[0-9a-f]+)", rest).group(1))
            state = "overlap" if state == "issue" else "after"
        elif op == "MUFU" and state == "overlap":
            out["mufu_overlapped"] += 1
        elif op == "MUFU" and state == "after":
            out["mufu_after"] += 1
    return out


def cuda_fwd_sass(D: int, arch: int, dtype: str = "bf16", row_blocks: int = 1, stages: int = 1) -> str:
    """SASS of the CUDA C++ forward instance serving head dim D (csrc/cuda/set_attention_fwd_hdim<D>.cu), compiled
    with nvcc as torch's extension build compiles it; only the ``dtype`` instantiation's function with ``row_blocks``
    m16 row blocks per warp and the one-stage (``set_attn_fwd_kernel``) or two-stage (``set_attn_fwd_pipe_kernel``,
    whose main loop spans two key tiles: it is unrolled by two) loop."""
    src = ROOT / "csrc" / "cuda" / f"set_attention_fwd_hdim{D}.cu"
    sass = _nvcc_sass(src, arch)
    want = ("13__nv_bfloat16" if dtype == "bf16" else "6__half") + "Li"
    kernel = "set_attn_fwd_pipe_kernel" if stages == 2 else "set_attn_fwd_kernel"
    blocks = re.split(r"\n\s*Function : ", sass)
    for blk in blocks[1:]:
        name = blk.split("\n", 1)[0]
        args = re.search(kernel + r"I(\w+?)Li(\d+)ELi(\d+)E", name)
        split = re.search(kernel + r"I\w+?Li\d+ELi\d+ELb1E", name)  # the key-split instance: not the default loop
        if args and not split and name.split(kernel + "I", 1)[-1].startswith(want) and int(args.group(3)) == row_blocks:
            return blk
    raise LookupError(f"no {kernel} for D={D} {dtype} row_blocks={row_blocks} in {src.name}")


def cuda_bwd_sass(D: int, arch: int, dtype: str = "bf16", key_blocks: int = 1, warps: int = 4,
                  with_dq: bool = True) -> str:
    """SASS of the CUDA C++ backward main kernel serving head dim D (csrc/cuda/set_attention_bwd_hdim<D>.cu), the
    ``dtype`` instantiation with ``key_blocks`` m16 key blocks per warp and ``warps`` warps per CTA; ``with_dq``
    False: the split backward's dK/dV kernel (the kWithDq = false instance)."""
    sass = _nvcc_sass(ROOT / "csrc" / "cuda" / f"set_attention_bwd_hdim{D}.cu", arch)
    want = "set_attn_bwd_kernelI" + ("13__nv_bfloat16" if dtype == "bf16" else "6__half")
    for blk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = blk.split("\n", 1)[0]
        args = re.search(r"set_attn_bwd_kernelI\w+?Li(\d+)ELi(\d+)ELi(\d+)ELb([01])E", name)
        if (want in name and args and int(args.group(2)) == key_blocks and int(args.group(3)) == warps
                and args.group(4) == ("1" if with_dq else "0")):
            return blk
    raise LookupError(f"no backward kernel for D={D} {dtype} key_blocks={key_blocks} warps={warps} with_dq={with_dq}")


def cuda_bwd_dq_mix(D: int, arch: int, dtype: str = "bf16") -> tuple[collections.Counter, float]:
    """(opcode counts, instructions) per 1024 scores of the split backward's dQ kernel serving head dim D (its key-tile
    loop: 16 query rows x block_n keys per warp and trip; block_n from set_attn::bwd_dq_config, 64 up to 96, else
    32)."""
    sass = _nvcc_sass(ROOT / "csrc" / "cuda" / f"set_attention_bwd_hdim{D}.cu", arch)
    want = "set_attn_bwd_dq_kernelI" + ("13__nv_bfloat16" if dtype == "bf16" else "6__half")
    for blk in re.split(r"\n\s*Function : ", sass)[1:]:
        if want in blk.split("\n", 1)[0]:
            ops, n = sass_loop_mix(blk)
            per = 1024 / (16 * (64 if D <= 96 else 32))
            return collections.Counter({o: v * per for o, v in ops.items()}), n * per
    raise LookupError(f"no dQ kernel for D={D} {dtype}")


def cuda_bwd_configs() -> dict[tuple[int, int, int], dict[str, int]]:
    """{(padded head dim, key blocks, warps): backward tile shape} as csrc/cuda/set_attention_plan.h computes it
    (compiled and run on the host, so the counts below scale by the kernel's real tiles): block_n, block_m, num_warps,
    chunk, sub_m, dq_groups, for SD's padded head dims 48 / 80 / 160 and every key-block and warp count compiled for
    them."""
    src = """#include <cstdio>
#include <initializer_list>
#include "set_attention_plan.h"
using namespace jedi::set_attn;
int main() {
  for (int kD : {48, 80, 160})
    for (int kb : {1, 2})
      for (int w : {4, 8})
        if (bwd_has_warps(kD, kb, w)) {
          const BwdConfig c = bwd_config(kD, kb, w);
          std::printf("%d %d %d %d %d %d %d %d %d\\n", kD, kb, w, c.block_n, c.block_m, c.num_warps, c.chunk,
                      c.sub_m, bwd_dq_groups(kD, kb, w));
        }
}
"""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "plan"
        subprocess.run(["g++", "-std=c++17", f"-I{ROOT / 'csrc' / 'cuda'}", "-x", "c++", "-", "-o", str(exe)],
                       input=src, text=True, check=True)
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    keys = ("block_n", "block_m", "num_warps", "chunk", "sub_m", "dq_groups")
    rows = [list(map(int, line.split())) for line in out.splitlines()]
    return {(r[0], r[1], r[2]): dict(zip(keys, r[3:])) for r in rows}


def dynamic_loop_mix(sass: str, mma_loop_trips) -> tuple[collections.Counter, float]:
    """(opcode counts, instruction count) one trip of the main loop issues when its inner loops with tensor-core
    instructions (the CUDA backward's register-pass and dQ loops) run ``mma_loop_trips`` trips: one number for every
    such loop, or one per loop in address order (their count must match); other inner loops (the tile walk's image
    skip, the lse/delta load) are counted once, tail regions included."""
    body = _loop_body(sass)
    lo = body[0][0]
    ops = collections.Counter(o for _, o, _ in body)
    inner_loops = []
    for a, op, rest in body:
        t = _branch_target(op, rest)
        if t is not None and lo < t < a:
            inner = [o for x, o, _ in body if t <= x <= a]
            if "HMMA" in inner:
                inner_loops.append(inner)
    trips = [mma_loop_trips] * len(inner_loops) if isinstance(mma_loop_trips, (int, float)) else list(mma_loop_trips)
    if len(trips) != len(inner_loops):
        raise ValueError(f"{len(inner_loops)} inner loops with MMAs, {len(trips)} trip counts given")
    for t, inner in zip(trips, inner_loops):
        ops.update({o: (t - 1) * c for o, c in collections.Counter(inner).items()})
    return ops, sum(ops.values())


def dynamic_loop_count(sass: str, mma_loop_trips) -> float:
    """Instructions of :func:`dynamic_loop_mix`."""
    return dynamic_loop_mix(sass, mma_loop_trips)[1]


def _loop_body(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, rest) of the main loop of SASS text: the span of its longest backward branch."""
    pat = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(.*)")
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(pat.match, sass.splitlines()) if m]
    span = None
    for addr, op, rest in instrs:
        target = _branch_target(op, rest)
        if target is not None and target < addr:
            if span is None or addr - target > span[1] - span[0]:
                span = (target, addr)
    return [i for i in instrs if span is None or span[0] <= i[0] <= span[1]]


def _branch_target(op: str, rest: str) -> int | None:
    target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", op + rest)
    return int(target.group(1), 16) if op == "BRA" and target else None


def sass_loop_mix(sass: str) -> tuple[collections.Counter, int]:
    """(opcode counts, instruction count) of the main loop of SASS text: the span of its longest backward branch."""
    body = [op for _, op, _ in _loop_body(sass)]
    return collections.Counter(body), len(body)


def full_tile_count(sass: str, *, skip_rescale: bool = False, skip_image_change: bool = False) -> int:
    """Instructions of the main loop that a full key tile issues: the loop minus the regions a forward branch skips
    when those regions are tail masking (at least half ISETP/FSEL/SEL: the CUDA kernel's last-tile-of-an-image
    code, which every other tile jumps over). ``skip_rescale`` also leaves out the lazy O/l rescale (a skipped
    region at least half FMUL/MUFU), i.e. the steady state once the running maxima have settled.
    ``skip_image_change`` also leaves out what only a walk's step into another image runs (once per image, not per
    tile): a skipped region without a tile copy (LDGSTS) that reads the set mask (an LDG: the search for the next
    allowed image) or locates the image's rows afresh (at least four 64-bit multiplies, IMAD.WIDE.U32)."""
    body = _loop_body(sass)
    skip_ops = [("ISETP", "FSEL", "SEL")] + ([("FMUL", "MUFU")] if skip_rescale else [])
    skipped: set[int] = set()
    for addr, op, rest in body:  # in address order: a branch inside a region already left out is not taken either
        target = _branch_target(op, rest)
        if target is None or target <= addr or addr in skipped:
            continue
        inside = [(o, r) for a, o, r in body if addr < a < target]
        region = [o for o, _ in inside]
        rare = skip_image_change and "LDGSTS" not in region and (  # a region with a tile's copy is not rare
            "LDG" in region or sum(o == "IMAD" and r.startswith(".WIDE.U32") for o, r in inside) >= 4)
        if region and (rare or any(sum(o in ops for o in region) * 2 >= len(region) for ops in skip_ops)):
            skipped.update(a for a, _, _ in body if addr < a < target)
    return sum(a not in skipped for a, _, _ in body)


def wgmma_report() -> None:
    """Print the Hopper forward's static loop figures (``--wgmma``), head dims 40, 80 and 160."""
    for D in (40, 80, 160):
        print(f"sm_90a, csrc/cuda/set_attention_fwd_wgmma_hdim{D}.cu, per 1024 score elements (one warp's 16 rows x "
              f"64 keys)")
        for variant in WGMMA_COMPILED[D]:
            block_n, wg = WGMMA_VARIANTS[variant]
            for dtype in ("fp16", "bf16"):
                sass, info = cuda_wgmma_fwd_sass(variant, dtype, D)
                ops, n = sass_loop_mix(sass)
                k = 1024 / (16 * block_n)
                ov = wgmma_overlap(sass)
                steady = full_tile_count(sass, skip_rescale=True) * k
                inside = full_tile_count(sass, skip_rescale=True, skip_image_change=True) * k
                print(f"  variant {variant} ({block_n} keys x {wg} warpgroups) {dtype}: loop {n * k:4.0f}, full tile "
                      f"{full_tile_count(sass) * k:4.0f}, without rescale {steady:4.0f}, inside an image "
                      f"{inside:4.0f}  MUFU {ops['MUFU'] * k:3.0f}  HGMMA {ops['HGMMA'] * k:4.1f}  exponentials "
                      f"overlapping P V {ov['mufu_overlapped'] * k:3.0f}  waits {'/'.join(ov['waits'])}  registers "
                      f"{info['registers']}  spills {info['spills']}"
                      f"{'  PTXAS: ' + '; '.join(info['warnings']) if info['warnings'] else ''}")


def bwd_report(arch: int) -> None:
    """Print the backward comparison (``--bwd``)."""
    # Triton: dK/dV kernel (BLOCK_N keys x BLOCK_M queries per iteration) + dQ kernel (BLOCK_M queries x BLOCK_N
    # keys); CUDA: one kernel, a warp owns 16 or 32 keys (register passes over each query tile), dQ by atomics once
    # per query tile

    print(f"backward, per 1024 score elements (one warp's work), sm_{arch}, bf16: Triton dK/dV kernel with dQ by "
          f"atomics, or dK/dV + dQ kernels (2k), vs CUDA C++ (csrc/cuda/set_attention_bwd_hdim<D>.cu with 16 or 32 "
          f"keys per warp, inner loops at their trip counts); * = Triton's default")
    cfgs = cuda_bwd_configs()
    from jedi_kernels.ops import set_attention as sa

    for D in (40, 80, 160):
        # Triton: the dK/dV kernel with dQ by atomics (FUSED_DQ, the default up to 96 padded columns) and the two
        # kernels (dK/dV, then dQ recomputing S, P and dP)
        rows = []
        for label, kinds in (("triton", (("dkdv", True),)), ("triton 2k", (("dkdv", False), ("dq", False)))):
            total = collections.Counter()
            n_total = 0.0
            for kind, fused in kinds:
                kernel, cfg = compile_kernel(kind, D, arch, FUSED_DQ=fused)
                ops, n = loop_mix(kernel)
                k = 1024 / (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / cfg.num_warps)
                total.update({o: c * k for o, c in ops.items()})
                n_total += n * k
            default = sa._fused_dq(*sa.head_dim_chunks(D, True)) == (label == "triton")
            rows.append((label + (" *" if default else ""), total, n_total))
        kD = {40: 48, 80: 80, 160: 160}[D]
        # the split backward's dQ kernel (one loop trip per key tile of a warp's 16 query rows)
        dq_ops, dq_n = cuda_bwd_dq_mix(D, arch)
        for kb, warps in ((1, 4), (2, 4), (1, 8)):
            c = cfgs.get((kD, kb, warps))
            if c is None:
                continue
            # inner loops with MMAs in address order: the register passes over a query tile (a loop only when a
            # tile takes more than one), then the dQ step's (slab, column groups) units over the warps
            units = (c["block_m"] // 16) * (c["chunk"] // 16 // c["dq_groups"])
            passes = c["block_m"] // c["sub_m"]
            trips = ([passes] if passes > 1 else []) + [units / c["num_warps"]]
            ops, n = dynamic_loop_mix(cuda_bwd_sass(D, arch, key_blocks=kb, warps=warps), trips)
            # a warp's share of one query tile: 16 kb keys x block_m queries, once per column chunk (each chunk's
            # CTA recomputes S and dP)
            per_1024 = 1024 / (16 * kb * c["block_m"]) * (kD // c["chunk"])
            rows.append((f"cuda {16 * kb}k" + (" 8w" if warps == 8 else ""),
                         collections.Counter({o: v * per_1024 for o, v in ops.items()}), n * per_1024))
            # the split backward (JEDI_CUDA_BWD_SPLIT=1): this instance without its dQ step, plus the dQ kernel
            ops_s, n_s = dynamic_loop_mix(cuda_bwd_sass(D, arch, key_blocks=kb, warps=warps, with_dq=False),
                                          [passes] if passes > 1 else [])
            total = collections.Counter({o: v * per_1024 for o, v in ops_s.items()})
            total.update(dq_ops)
            rows.append((f"cuda {16 * kb}k" + (" 8w" if warps == 8 else "") + " split", total,
                         n_s * per_1024 + dq_n))
        for name, ops, n in rows:
            fp32 = sum(ops[o] for o in FP32_PIPE)
            mma = ops["HGMMA"] + ops["HMMA"]
            print(f"  D={D:3d} {name:16s} instructions {n:6.0f}  MUFU {ops['MUFU']:5.0f}  FP32 {fp32:5.0f}  "
                  f"MMA {mma:4.0f} ({'HGMMA' if ops['HGMMA'] else 'HMMA'})  "
                  f"LDSM {ops['LDSM']:4.0f}  atomics {ops['REDG'] + ops['RED']:3.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--bwd", action="store_true", help="the backward instead: Triton (dK/dV kernel with dQ by "
                    "atomics, or dK/dV + dQ kernels) vs the CUDA C++ backward instances, fused and split (needs "
                    "nvcc), per score element")
    ap.add_argument("--cuda", action="store_true", help="also the CUDA C++ forward instances (needs nvcc), per score "
                    "element next to the Triton kernel's best variant")
    ap.add_argument("--wgmma", action="store_true", help="the Hopper (wgmma, sm_90a) forward's variants instead: "
                    "instructions per 1024 scores and which exponentials overlap the P V product (needs nvcc)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    if args.bwd:
        bwd_report(args.arch)
        return 0
    if args.wgmma:
        wgmma_report()
        return 0
    variants = (("unfused scale, FADD row sums", dict(SCALE_POS=False, ROWSUM_DOT=False)),
                ("FFMA scale, FADD row sums", dict(SCALE_POS=True, ROWSUM_DOT=False)),
                ("FFMA scale, row sums by P.1", dict(SCALE_POS=True, ROWSUM_DOT=True)))
    print(f"sm_{args.arch}, bf16, per warp and key tile of the forward's main loop")
    for D in (40, 80, 160):
        for label, sw in variants:
            ops, n = loop_mix(compile_fwd(D, args.arch, **sw))
            fp32 = sum(ops[o] for o in FP32_PIPE)
            print(f"  D={D:3d} {label:30s} instructions {n:4d}  MUFU {ops['MUFU']:3d}  FP32 {fp32:4d}  "
                  f"HGMMA {ops['HGMMA']:3d}  SHFL {ops['SHFL']:3d}")
    if args.cuda:
        # per score element of a warp's share of one key tile: Triton's tile is BLOCK_M x BLOCK_N over num_warps
        # warps; the CUDA kernel's warp owns 16 x row_blocks query rows x 64 keys (mma.sync m16n8k16); "full tile"
        # leaves out the tail masking only an image's last key tile runs, "without rescale" also the lazy O/l
        # rescale that tiles skip once the running maxima have settled
        from jedi_kernels.ops import set_attention as sa

        print(f"per 1024 score elements (one warp's work), sm_{args.arch}, bf16: Triton (FFMA scale, P.1 row sums) "
              f"vs CUDA C++ (csrc/cuda/set_attention_fwd_hdim<D>.cu, mma.sync)")
        for D in (40, 80, 160):
            D0, D1 = sa.head_dim_chunks(D, True)
            cfg = sa._FWD_CONFIGS[sa._dclass(D0, D1, None)][0]
            per_warp = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / cfg.num_warps
            tri = loop_mix(compile_fwd(D, args.arch, SCALE_POS=True, ROWSUM_DOT=D <= 64))
            rows = [("triton", *tri, tri[1], tri[1], tri[1], per_warp)]
            for stages in (1, 2):
                for rb in (1, 2):
                    try:
                        sass = cuda_fwd_sass(D, args.arch, row_blocks=rb, stages=stages)
                    except LookupError:  # no such instance (fwd_has_row_blocks, fwd_has_stages)
                        continue
                    # keys per loop trip (set_attention_plan.h, fwd_config): 64-key tiles, except 32 rows per warp
                    # at head dims above 80 (32-key tiles) and the two-stage loop's two tiles (32 keys each at 32
                    # rows per warp)
                    keys = (32 if rb == 2 and D > 80 else 64) if stages == 1 else 2 * (32 if rb == 2 else 64)
                    rows.append((f"cuda {16 * rb}r{' 2st' if stages == 2 else ''}", *sass_loop_mix(sass),
                                 full_tile_count(sass), full_tile_count(sass, skip_rescale=True),
                                 full_tile_count(sass, skip_rescale=True, skip_image_change=True), 16 * rb * keys))
            for name, ops, n, full, steady, inside, elems in rows:
                k = 1024 / elems
                fp32 = sum(ops[o] for o in FP32_PIPE)
                mma = ops["HGMMA"] + ops["HMMA"]
                print(f"  D={D:3d} {name:10s} instructions {n * k:6.0f} (full tile {full * k:4.0f}, "
                      f"without rescale {steady * k:4.0f}, inside an image {inside * k:4.0f})  "
                      f"MUFU {ops['MUFU'] * k:5.0f}  "
                      f"FP32 {fp32 * k:5.0f}  MMA {mma * k:4.0f} ({'HGMMA' if ops['HGMMA'] else 'HMMA'})  "
                      f"SHFL {ops['SHFL'] * k:4.0f}  LDSM {ops['LDSM'] * k:4.0f}  BAR {ops['BAR'] * k:3.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
