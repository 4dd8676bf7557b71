"""tools/sass_loop_mix.py's SASS text analysis (loop span, tail/rescale regions, inner-loop trips) on synthetic
listings: the counts in benchmarks/README.md come from these functions."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "sass_loop_mix", Path(__file__).resolve().parents[2] / "tools" / "sass_loop_mix.py")
sass_loop_mix = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sass_loop_mix)


def _listing(ops: list[str]) -> str:
    """cuobjdump-style lines: /*addr*/ followed by the instruction, 16 bytes apart."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;  /* 0x0 */" for i, op in enumerate(ops))


def _program() -> tuple[str, dict]:
    ops = ["MOV R1, R2", "MOV R3, R4"]                      # prologue (0x00, 0x10)
    loop = len(ops)                                          # main loop starts at 0x20
    ops += ["HMMA.16816.F32.BF16 R0, R4, R8, R0", "MUFU.EX2 R1, R1", "ISETP.GT.AND P0, PT, R1, 0x3f, PT"]
    tail_branch = len(ops)
    ops += [None]                                            # @P0 BRA over the tail region
    tail = len(ops)
    ops += ["FSEL R1, R1, -INF, P1", "FSEL R2, R2, -INF, P2", "ISETP.GE.AND P1, PT, R5, R6, PT"]
    after_tail = len(ops)
    ops += ["VOTE.ANY R0, PT, P3"]
    resc_branch = len(ops)
    ops += [None]                                            # @!P4 BRA over the rescale region
    resc = len(ops)
    ops += ["FMUL R8, R8, R9", "FMUL R10, R10, R9", "MUFU.EX2 R9, R9"]
    after_resc = len(ops)
    inner = len(ops)                                         # inner loop: 3 instructions with an MMA
    ops += ["LDSM.16.MT88.4 R12, [R2]", "HMMA.16816.F32.BF16 R16, R12, R14, R16", None]
    ops += ["IADD3 R5, R5, 0x1, RZ", None]                   # back edge of the main loop
    ops += ["EXIT"]
    addr = lambda i: f"0x{16 * i:x}"                         # noqa: E731
    ops[tail_branch] = f"@P0 BRA {addr(after_tail)}"
    ops[resc_branch] = f"@!P4 BRA {addr(after_resc)}"
    ops[inner + 2] = f"@P5 BRA {addr(inner)}"
    ops[len(ops) - 2] = f"@!P6 BRA {addr(loop)}"
    sizes = dict(loop=len(ops) - 1 - loop, tail=after_tail - tail, rescale=after_resc - resc, inner=3)
    return _listing(ops), sizes


def test_loop_span_and_opcode_counts():
    sass, n = _program()
    ops, count = sass_loop_mix.sass_loop_mix(sass)
    assert count == n["loop"]  # from the main loop's first instruction to its back edge, prologue and EXIT out
    assert ops["HMMA"] == 2 and ops["MUFU"] == 2 and ops["FSEL"] == 2 and ops["BRA"] == 4 and "EXIT" not in ops


def test_full_tile_leaves_out_tail_masking_then_rescale():
    sass, n = _program()
    assert sass_loop_mix.full_tile_count(sass) == n["loop"] - n["tail"]
    assert sass_loop_mix.full_tile_count(sass, skip_rescale=True) == n["loop"] - n["tail"] - n["rescale"]


def _walk_program() -> tuple[str, dict]:
    """A loop whose step into another image (a mask-byte search, a 64-bit relocation) sits in regions that forward
    branches skip, next to the step inside an image (which a branch out of the search also jumps over) and a tile copy
    that is skipped when no tile is left."""
    ops = ["MOV R1, R2"]
    loop = len(ops)
    ops += ["MUFU.EX2 R1, R1", None]                          # @P0 BRA over the new-image path (to the step)
    search = len(ops)
    ops += ["VIADD R9, R9, 0x1", "ISETP.GE.AND P1, PT, R9, R8, PT", None]  # @P1 BRA out of the search, past the step
    probe = len(ops)
    ops += ["LDG.E.U8 R4, desc[UR4][R2.64]", "PRMT R4, R4, 0x9910, RZ", "IADD3 R2, P0, R2, 0x1, RZ", None]
    ops += ["IMAD.WIDE.U32 R8, R2, R3, R8"] * 4 + ["LEA R6, P0, R8, R6, 0x1", None]  # relocation, BRA past the step
    after_search = len(ops)
    ops += ["IMAD.WIDE R6, R7, 0x2, R6", "VIADD R10, R10, 0x1"]  # the step inside an image
    after_step = len(ops)
    ops += [None]                                             # @P2 BRA over the copy (no tile left)
    ops += ["IADD3 R6, P0, R6, R7, RZ", "LDGSTS.E.BYPASS.128 [R9], desc[UR4][R6.64], !P4"]
    after_copy = len(ops)
    ops += ["FFMA R1, R1, R2, R3", None, "EXIT"]              # back edge, then EXIT
    addr = lambda i: f"0x{16 * i:x}"                          # noqa: E731
    ops[search - 1] = f"@P0 BRA {addr(after_search)}"
    ops[probe - 1] = f"@P1 BRA {addr(after_step)}"
    ops[probe + 3] = f"@P3 BRA {addr(search)}"                # the search's back edge
    ops[after_search - 1] = f"BRA {addr(after_step)}"
    ops[after_step] = f"@P2 BRA {addr(after_copy)}"
    ops[after_copy + 1] = f"@!P5 BRA {addr(loop)}"
    sizes = dict(loop=after_copy + 2 - loop, new_image=after_search - search)
    return _listing(ops), sizes


def test_inside_an_image_leaves_out_the_walks_step_into_another_image_only():
    sass, n = _walk_program()
    assert sass_loop_mix.full_tile_count(sass) == n["loop"]
    # the new-image path goes; the step inside an image stays although a branch out of the search jumps over it (that
    # branch lies in a region already left out), and so does the copy region (its LDGSTS runs every tile)
    assert sass_loop_mix.full_tile_count(sass, skip_image_change=True) == n["loop"] - n["new_image"]


def test_triton_forward_compiles_with_the_kernels_own_defaults():
    """compile_fwd sets only the constexprs its table knows; the others (ROW_ALIGN, added later) keep the kernel's
    defaults instead of failing the tool's --cuda / default report."""
    pytest.importorskip("triton")
    # in a process of its own: under TRITON_INTERPRET (this suite's default) the kernels cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; sys.path.insert(0, 'tools'); import sass_loop_mix as s; "
            "ops, n = s.loop_mix(s.compile_fwd(40, 90)); print(n, ops['MUFU'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    n, mufu = map(int, res.stdout.split())
    assert n > 0 and mufu > 0


def test_dynamic_count_multiplies_the_inner_mma_loop():
    sass, n = _program()
    assert sass_loop_mix.dynamic_loop_count(sass, 1) == n["loop"]
    assert sass_loop_mix.dynamic_loop_count(sass, 5) == n["loop"] + 4 * n["inner"]


def test_dynamic_mix_takes_one_trip_count_per_inner_mma_loop():
    sass, n = _program()
    ops, count = sass_loop_mix.dynamic_loop_mix(sass, [3])
    assert count == n["loop"] + 2 * n["inner"]
    assert ops["HMMA"] == 1 + 3 and ops["LDSM"] == 3 and ops["MUFU"] == 2  # the inner loop's opcodes, three times
    with pytest.raises(ValueError, match="1 inner loops with MMAs, 2 trip counts"):
        sass_loop_mix.dynamic_loop_mix(sass, [3, 2])


def _can_compile_sm90a() -> bool:
    import shutil
    try:
        import triton
    except ImportError:
        return False
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return shutil.which("nvcc") is not None and cuobjdump.exists()


@pytest.mark.skipif(not _can_compile_sm90a(), reason="needs nvcc and Triton's cuobjdump")
@pytest.mark.parametrize("D, variant", [(D, v) for D, vs in sass_loop_mix.WGMMA_COMPILED.items() for v in vs])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_wgmma_forward_schedule(D, variant, dtype):
    """The Hopper forward's point, checked in its sm_90a SASS at every compiled head dim and variant: in the steady
    loop every exponential of the tile runs between the wait for S = Q K^T and the wait for the P V product (so the
    softmax overlaps the tensor cores), ptxas neither serialized the warpgroup MMAs nor patched fences in
    (C7514/C7517/C7519) nor spilled, the registers fit the CTAs per SM the variant is built for, and a full tile stays
    near the exp unit's 256 clocks per 1024 scores."""
    block_n, wg = sass_loop_mix.WGMMA_VARIANTS[variant]
    sass, info = sass_loop_mix.cuda_wgmma_fwd_sass(variant, dtype, D)
    assert info["warnings"] == [] and info["spills"] == 0
    ov = sass_loop_mix.wgmma_overlap(sass)
    assert ov["waits"][0] == "0x1" and set(ov["waits"][1:]) == {"0x0"}  # the last wait stands in both arms of a branch
    assert ov["hgmma"] == (D + 15) // 16 + block_n // 16  # Q K^T (k16 steps over the padded head dim), then P V
    assert ov["mufu_overlapped"] == block_n // 2      # each thread's exponentials of the tile (64 x block_n / 128)
    # the CTAs per SM each variant is built for (WgFwdTraits::kMinBlocks) must fit the 64 K registers, allocated in
    # multiples of 8 per thread: head dim 40, 64 x 2: 2 CTAs (<= 128); 128 x 1: 3 (<= 168); 64 x 1: 4 (<= 128); head dim
    # 80, 64 x 1: 3 (<= 168); one CTA of 3 warpgroups <= 168
    ctas = {(40, 64, 2): 2, (40, 128, 1): 3, (40, 64, 1): 4, (80, 64, 1): 3}.get((D, block_n, wg), 2 if wg == 1 else 1)
    assert info["registers"] <= min(255, 65536 // (ctas * 128 * wg) // 8 * 8)
    per_1024 = sass_loop_mix.full_tile_count(sass, skip_rescale=True) * 1024 / (16 * block_n)
    assert per_1024 <= (330 if block_n == 64 else 240)
    # a tile inside an image: the copies planned once per CTA (TileCopyPlan), the walk in 32-bit ints with pointers
    # stepped (KeyWalk), descriptors in uniform registers (2026-11-28, head dim 40: 236 / 184 / 178 / 189 / 248 per
    # 1024 scores; 341 / 255 / 237 before; 80: 252 / 188 / 256; 160: 270)
    inside = sass_loop_mix.full_tile_count(sass, skip_rescale=True, skip_image_change=True) * 1024 / (16 * block_n)
    assert inside <= ({40: 250, 80: 265, 160: 285}[D] if block_n == 64 else 200)
