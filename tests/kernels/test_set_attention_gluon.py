"""The Gluon Hopper forward of the set attention (``jedi_kernels/ops/set_attention_gluon.py``, opt-in
``JEDI_TRITON_FWD_GLUON=<config>``).

Gluon has no interpreter mode, so the CPU tests compile the kernel for sm_90 (Triton's own ptxas) and check what must
hold before a GPU ever runs it: every config compiles for every head-dim class, dtype and masking path without
register spills, within sm_90's shared memory, without ptxas serializing the warpgroup MMAs (warning C7514); and its
main loop has the schedule it was written for (the softmax's exponentials between the wait for S_t and the wait for
the P·V product); and every config's kernel code, run by the CPU emulator of tests/kernels/gluon_emu.py (products
retiring lazily at their waits, TMA copies landing early or late, mbarrier phases checked, configs 5 and 6's
partitions as threads), gives out and lse within the flash rule. The GPU tests (``gpu`` + ``gluon``) judge out, lse
and the grads of the backward on its lse by the flash rule against the float64 reference.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import gluon_emu  # (tests/kernels, on sys.path as the test files are)
import pytest
import torch

import jedi_kernels as jk
from jedi_kernels.ops import set_attention as sa
from jedi_kernels.ops import set_attention_gluon as sg

needs_gluon = pytest.mark.skipif(not sg.HAVE_GLUON, reason="this Triton has no Gluon")


def _bin(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(_bin("ptxas")), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """The kernel's SASS instructions as (address, opcode and operands)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_bin("cuobjdump")), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def _loops(sass: list[tuple[int, str]]) -> list[list[str]]:
    """For each backward branch, the instructions from its target to it (loop bodies, and the spans jumped back over
    by out-of-line code)."""
    out = []
    for addr, ins in sass:
        m = re.match(r"(@!?U?P\w+ )?BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(2), 16) < addr:
            out.append([s for a, s in sass if int(m.group(2), 16) <= a <= addr])
    return out


# Gluon kernels compile only in a process without TRITON_INTERPRET (under it, Gluon's own helpers such as gl.max are
# interpreter functions, which its compiler rejects), so one subprocess compiles every case for the module.
_CASES = [(v, d, dt, m, e) for v in sorted(sg.CONFIGS) for d in (8, 40, 64, 80, 128) for dt in ("float16", "bfloat16")
          for m, e in ((False, True), (True, False))]
_COMPILE_ALL = """
import json, sys, torch
from importlib import import_module
from pathlib import Path
compile_fn = getattr(import_module(sys.argv[3]), sys.argv[4])
out = Path(sys.argv[1])
for n, (v, d, dt, m, e) in enumerate(json.loads(sys.argv[2])):
    k = compile_fn(90, d, getattr(torch, dt), v, m, e)
    (out / f"{n}.ptx").write_text(k.asm["ptx"])
    (out / f"{n}.cubin").write_bytes(k.asm["cubin"])
    (out / f"{n}.json").write_text(json.dumps({"shared": k.metadata.shared}))
"""


def compile_all(out: Path, module: str, fn: str, cases: list) -> dict:
    """{case: (ptx, cubin, shared bytes)}: ``module.fn(90, head_dim, dtype, config, masked, even)`` for every case
    (config, head dim, dtype name, masked, even), compiled for sm_90 in one subprocess without the interpreter, in a
    fresh Triton cache under ``out`` (a warm cache would hide a compile error)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", _COMPILE_ALL, str(out), json.dumps(cases), module, fn],
                       capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return {case: ((out / f"{n}.ptx").read_text(), (out / f"{n}.cubin").read_bytes(),
                   json.loads((out / f"{n}.json").read_text())["shared"]) for n, case in enumerate(cases)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{case: (ptx, cubin, shared bytes)} for every case of _CASES, compiled for sm_90 in a fresh Triton cache."""
    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    return compile_all(tmp_path_factory.mktemp("gluon"), "jedi_kernels.ops.set_attention_gluon", "compile_for",
                       _CASES)


@needs_gluon
@pytest.mark.parametrize("case", _CASES, ids=[f"cfg{v}-d{d}-{dt}-{'mask+tail' if m else 'full'}"
                                             for v, d, dt, m, e in _CASES])
def test_compiles_for_sm90_without_spills(compiled, case):
    """Every config, head-dim class (column chunks of 16, 32 + 16, 64, 64 + 16, 128; config 4: 16, 64, 64, 128, 128),
    dtype, and the masked path with key tails compile for sm_90: no spills, shared memory within one block's sm_90
    limit, and no wgmma serialization (C7514)."""
    ptx, _, shared = compiled[case]
    report = _ptxas_report(ptx)
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and spills.groups() == ("0", "0"), report
    assert regs <= 255 and shared <= 232448, (regs, shared)
    assert "C7514" not in report, report


@needs_gluon
@pytest.mark.parametrize("head_dim", [40, 80])
@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
def test_softmax_runs_while_the_pv_product_is_in_flight(compiled, variant, head_dim):
    """The main loop (SD's cases: head dim 40 or 80, bf16, whole tiles) issues S_t = Q K_tᵀ (64 x BLOCK_N MMAs, one
    k-step per 16 columns of the chunks: 32 + 16 or 64 + 16, or the padded chunk) and O += P V (BLOCK_N/16 k-steps of
    64 x D0 plus 64 x D1), waits for S_t alone (DEPBAR.LE: the P·V groups still in flight), computes the BLOCK_N/2
    exponentials of this thread's scores, and only then waits for the P·V product (DEPBAR.LE 0). ptxas moved a wait
    placed after the softmax up into it when both shared a basic block; this pins the schedule."""
    cfg = sg.config(variant, head_dim)
    d0, d1 = sg._chunks(head_dim, cfg["SPLIT"])
    # S = Q Kᵀ reads both operands from shared memory; P V takes P from registers and V transposed (MN-major)
    qk = re.compile(rf"HGMMA\.64x{cfg['BLOCK_N']}x16\.F32\.BF16 R\d+, gdesc")
    widths = "|".join(str(w) for w in (d0, d1) if w)
    pv = re.compile(rf"HGMMA\.64x({widths})x16\.F32\.BF16 R\d+, R\d+, gdesc\[\w+\]\.tnspB")
    loops = [b for b in _loops(_sass(compiled[(variant, head_dim, "bfloat16", False, True)][1]))
             if any(qk.match(s) for s in b) and any(pv.match(s) for s in b)]
    assert loops, "no loop holds both products"
    # the main loop is the shortest such span (the others are jumps back from the out-of-line mbarrier retry loops)
    body = min(loops, key=len)
    text = [s.split()[0] + (" " + s.split()[-1] if "DEPBAR" in s else "") for s in body]
    groups = 2 if d1 else 1  # one committed group per column chunk
    assert sum(bool(qk.match(s)) for s in body) == (d0 + d1) // 16
    assert sum(bool(pv.match(s)) for s in body) == groups * cfg["BLOCK_N"] // 16
    last_pv = max(i for i, s in enumerate(body) if pv.match(s))
    wait_s = next(i for i, s in enumerate(body) if f"DEPBAR.LE gsb0, 0x{groups}" in s)
    assert wait_s > last_pv, text
    wait0 = next(i for i in range(wait_s, len(body)) if "DEPBAR.LE gsb0, 0x0" in body[i])
    exps = sum(s.startswith("MUFU.EX2") for s in body[wait_s:wait0])
    assert exps >= cfg["BLOCK_N"] // 2, (exps, text[wait_s:wait0 + 1])
    # no wait before the one for S_t (the products issued back to back)
    assert not any("DEPBAR" in s for s in body[:wait_s]), text


@needs_gluon
@pytest.mark.parametrize("head_dim", [40, 80])
def test_warp_specialized_consumers_never_wait_for_each_other(compiled, head_dim):
    """Config 5 (warp-specialized): each consumer warpgroup's main loop synchronizes only its own 128 threads (named
    barriers) and releases ring buffers by an mbarrier arrive, where the CTA-wide config 1 runs CTA barriers every
    tile; the ring's ``empty`` barriers expect one arrive per consumer warpgroup; the consumers get 232 registers
    each (setmaxnreg) and the producer warpgroup the rest."""
    def main_loop(variant):
        qk = re.compile(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, gdesc")
        sass = _sass(compiled[(variant, head_dim, "bfloat16", False, True)][1])
        return min((b for b in _loops(sass) if any(qk.match(s) for s in b)), key=len)

    def barriers(body):
        return [s for s in body if s.startswith("BAR.")]

    cta_wide = [b for b in barriers(main_loop(1)) if "," not in b]  # BAR.SYNC 0x0: every thread of the CTA
    assert cta_wide, barriers(main_loop(1))  # (the check below can tell the two kinds apart)
    ws = main_loop(5)
    assert barriers(ws) and all(re.fullmatch(r"BAR\.SYNC\.DEFER_BLOCKING 0x[1-9a-f], 0x80", b) for b in barriers(ws)), \
        barriers(ws)
    assert sum(s.startswith("SYNCS.ARRIVE") for s in ws) == 1  # the release of buffer t-1
    ptx = compiled[(5, head_dim, "bfloat16", False, True)][0]
    stages = sg.config(5, head_dim)["NUM_STAGES"]
    assert len(re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], 2;", ptx)) == stages  # empty: 2 arrivals
    assert len(re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], 1;", ptx)) == stages + 1  # full, Q
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", ptx)
    assert ".reqntid 384" in ptx  # 4 producer + 2 x 4 consumer warps


@needs_gluon
@pytest.mark.parametrize("head_dim", [40, 80])
def test_ping_pong_consumers_take_turns_issuing(compiled, head_dim):
    """Config 6 (config 5 with FlashAttention-3's ping-pong): in each consumer's main loop the products are issued
    only after two mbarrier waits (the tile's data, then this warpgroup's turn), and the turn passes to the other
    warpgroup (one mbarrier arrive) right after the P·V product is issued, before the wait for S_t, so the other
    warpgroup's products queue behind these while this one runs its softmax. Config 5 has no such arrive. (The
    emulator checks the protocol itself: phases, no hang; a wrong parity or a missing first arrive fails there.)"""
    qk = re.compile(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, gdesc")
    pv = re.compile(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, R\d+, gdesc\[\w+\]\.tnspB")

    def main_loop(variant):
        sass = _sass(compiled[(variant, head_dim, "bfloat16", False, True)][1])
        return min((b for b in _loops(sass) if any(qk.match(s) for s in b)), key=len)

    def around_issue(body):
        first = next(i for i, s in enumerate(body) if qk.match(s))
        last_pv = max(i for i, s in enumerate(body) if pv.match(s))
        wait_s = next(i for i in range(last_pv, len(body)) if "DEPBAR.LE gsb0" in body[i])
        waits = sum("SYNCS.PHASECHK" in s for s in body[:first])
        arrives = sum("SYNCS.ARRIVE" in s for s in body[last_pv:wait_s])
        return waits, arrives

    assert around_issue(main_loop(6)) == (2, 1), main_loop(6)
    assert around_issue(main_loop(5)) == (1, 0), main_loop(5)
    ptx = compiled[(6, head_dim, "bfloat16", False, True)][0]
    stages = sg.config(6, head_dim)["NUM_STAGES"]
    assert len(re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], 1;", ptx)) == stages + 3  # full, Q, 2 turns


def test_head_dim_chunks():
    """The split: 40 -> 32 + 16 (not 64); one chunk where two would not be narrower than the head dim rounded up to a
    power of two, and always one without SPLIT."""
    assert sg._chunks(40) == (32, 16) and sg._chunks(48) == (32, 16)
    assert sg._chunks(24) == (32, 0) and sg._chunks(56) == (64, 0) and sg._chunks(64) == (64, 0)
    assert sg._chunks(8) == (16, 0) and sg._chunks(16) == (16, 0)
    assert sg._chunks(80) == (64, 16) and sg._chunks(96) == (64, 32) and sg._chunks(112) == (128, 0)
    assert sg._chunks(40, split=False) == (64, 0) and sg._chunks(80, split=False) == (128, 0)
    assert sg.config(1, 40)["BLOCK_N"] == 128 and sg.config(1, 80)["BLOCK_N"] == 64  # d > 64: 64 keys


def test_variant_switch(monkeypatch):
    """JEDI_TRITON_FWD_GLUON: unset or 0 is off, a config number selects it, anything else is an error naming the
    variable and the allowed values."""
    monkeypatch.delenv("JEDI_TRITON_FWD_GLUON", raising=False)
    assert sg.gluon_fwd_variant() == 0
    for v in sg.CONFIGS:
        monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(v))
        assert sg.gluon_fwd_variant() == v
    for bad in ("yes", "9", "-1"):
        monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", bad)
        with pytest.raises(ValueError, match=f"JEDI_TRITON_FWD_GLUON must be 0 or one of .*, got '{re.escape(bad)}'"):
            sg.gluon_fwd_variant()


def test_checked_configs(monkeypatch):
    """JEDI_GLUON_CONFIGS narrows the configs the GPU tests and sweep rows exercise (gpu_check.sh sets it to the ones
    the probe found agreeing); unset or empty means all; anything else is a clear error."""
    monkeypatch.delenv("JEDI_GLUON_CONFIGS", raising=False)
    assert sg.checked_configs() == sorted(sg.CONFIGS)
    for raw, want in (("4", [4]), ("4,1", [1, 4]), (" 2 , 3 ,", [2, 3]), ("", sorted(sg.CONFIGS))):
        monkeypatch.setenv("JEDI_GLUON_CONFIGS", raw)
        assert sg.checked_configs() == want
    for bad in ("9", "one", "1,x", ","):
        monkeypatch.setenv("JEDI_GLUON_CONFIGS", bad)
        with pytest.raises(ValueError, match="JEDI_GLUON_CONFIGS must be a comma-separated list"):
            sg.checked_configs()


def test_not_taken_where_it_cannot_run(monkeypatch):
    """Off sm_90 (here: the CPU) the switch changes nothing: the pointer kernel runs and gives the reference's
    result."""
    from jedi_kernels import reference

    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", "1")
    calls = []
    monkeypatch.setattr(sa, "set_attn_fwd_gluon", lambda *a, **kw: calls.append(a))
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(2, 9, 2 * 40, device=dev, dtype=dtype) for _ in range(3))
    out, _ = sa.set_attn_fwd(q, k, v, 2, 2, -(40**-0.5))  # a negative scale: never the Gluon kernel
    ref = reference.set_attention_reference(q.double(), k.double(), v.double(), 2, 2, -(40**-0.5))
    torch.testing.assert_close(out.double(), ref, atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=0)
    assert calls == []
    assert not sg.gluon_fwd_ok(q, k, v, 40, 40**-0.5) or dev.type == "cuda"
    assert not sg.gluon_fwd_ok(q, k, v, 160, 160**-0.5)  # head dim > 128
    assert not sg.gluon_fwd_ok(q, k, v, 40, 0.0)
    assert not sg.gluon_fwd_ok(*(t.float() for t in (q, k, v)), 40, 40**-0.5)  # float32
    empty = torch.empty(0, 9, 2 * 40, device=dev, dtype=torch.bfloat16)
    assert not sg.gluon_fwd_ok(empty, empty, empty, 40, 40**-0.5)  # no TMA descriptor has a zero dim


def test_head_dim_a_multiple_of_8(monkeypatch):
    """The descriptors view q, k, v as (N·L, H, D): the head stride D·2 bytes must be a multiple of 16, so a head dim
    that is not a multiple of 8 never takes the Gluon kernels (the rest of the check stood in for an sm_90 device)."""
    import types

    from jedi_kernels.ops import set_attention_gluon_bwd as gb

    t = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(sg, "tma_rows_ok", lambda *a: True)
    monkeypatch.setattr(gb, "tma_rows_ok", lambda *a: True)
    assert sg.gluon_fwd_ok(t, t, t, 40, 0.1) and gb.gluon_bwd_ok(t, t, t, t, 40, 1)
    for d in (12, 36, 44):
        assert not sg.gluon_fwd_ok(t, t, t, d, 0.1)
        assert not gb.gluon_bwd_ok(t, t, t, t, d, 1)


def test_tma_rows_ok():
    """What a 2-D TMA descriptor over the (N*L, C) rows needs of each of q, k, v: not empty, evenly spaced rows
    (contiguous, or views of one fused qkv projection), unit last stride, 16-byte aligned base and row stride."""
    from jedi_kernels.ops import tma_rows_ok

    x = torch.randn(4, 33, 3 * 80, dtype=torch.bfloat16)
    q, k, v = x.split(80, dim=-1)
    assert tma_rows_ok(x) and tma_rows_ok(q, k, v)  # row stride 480 B, bases 0 / 160 / 320 B
    assert not tma_rows_ok(torch.empty(0, 33, 80, dtype=torch.bfloat16))
    assert not tma_rows_ok(q, torch.empty(4, 0, 80, dtype=torch.bfloat16), v)
    assert not tma_rows_ok(x[:, :, 1:81])  # base 2 B past a 16-byte boundary
    assert not tma_rows_ok(torch.randn(4, 33, 36, dtype=torch.bfloat16))  # rows of 72 B
    assert not tma_rows_ok(x[:, :20, :80])  # images 33 rows apart, 20 rows each: not one evenly spaced matrix
    assert tma_rows_ok(x[:1, :20, :80])  # one image: its rows are evenly spaced
    assert not tma_rows_ok(x[:, :, :80].transpose(0, 1))  # last stride 1 but rows of an image not consecutive
    assert not tma_rows_ok(torch.randn(4, 33, 80, dtype=torch.bfloat16)[:, :, ::2])  # last stride 2
    assert not tma_rows_ok(torch.randn(1, 1, 80, dtype=torch.bfloat16).expand(4, 33, 80))  # one row, stride 0
    assert tma_rows_ok(torch.randn(1, 1, 80, dtype=torch.bfloat16))  # a single row


# ----------------------------------------------------------------------------------------------------------------------
# The CTA-wide kernel itself on the CPU, through tests/kernels/gluon_emu.py (its Python source with Gluon's builtins
# emulated: products retire lazily at their waits, TMA copies land at issue or only at the barrier wait, mbarrier
# phases and byte counts checked; configs 5 and 6's partitions as threads synchronized by the mbarriers alone).
# ----------------------------------------------------------------------------------------------------------------------

_EMU_CASES = [  # (B, G, L, H, D, mask): key tiles beyond the ring (4 buffers), so buffers are refilled
    (1, 3, 300, 2, 40, "oneway"),  # 32 + 16 (8 columns past the head: TMA zeros), key tails, the image lists
    (2, 2, 260, 3, 24, "jedi"),  # one 32-column chunk, 8 columns past the head dim (zero fill), two sets
    (1, 1, 1, 2, 8, "full"),  # one row
    (1, 2, 256, 1, 80, "full"),  # 64 + 16 (the second chunk 8 columns past the head dim), whole tiles
    (1, 2, 70, 1, 128, "blockdiag"),  # one 128-column chunk
]


def _key_tiles(variant: int, G: int, L: int, D: int, mask: str) -> int:
    """The most key tiles one program of ``variant`` loops over on an emulated case."""
    from test_set_attention import _masks

    m = _masks(mask, G)
    images = G if m is None else int(m.sum(dim=1).max())
    return images * -(-L // sg.config(variant, D)["BLOCK_N"])


@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
def test_emulated_cases_refill_the_ring(variant):
    """Every config refills its ring on the emulated cases at SD's head dims 40 and 80 (more key tiles per program
    than stages): a config change that gives the ring more stages must not quietly leave the refill path untested."""
    stages = sg.config(variant, 40)["NUM_STAGES"]
    for d in (40, 80):
        tiles = [_key_tiles(variant, G, L, D, mask) for B, G, L, H, D, mask in _EMU_CASES if D == d]
        assert max(tiles) > stages, (d, tiles, stages)


@pytest.mark.parametrize("tma_lands", ["issue", "wait"])
@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
@pytest.mark.parametrize("B, G, L, H, D, mask", _EMU_CASES, ids=[f"G{c[1]}-L{c[2]}-d{c[4]}-{c[5]}" for c in _EMU_CASES])
def test_emulated_kernel(monkeypatch, variant, tma_lands, B, G, L, H, D, mask):
    """The Gluon forward kernels' own code (the CTA-wide one, and the warp-specialized one for configs 5 and 6),
    emulated on the CPU: out and lse by the flash rule against the float64 reference (fp16 inputs as views of one fused
    projection, through the real host code: descriptors, lists)."""
    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    from test_set_attention import _inputs, _masks, _ref_fwd_bwd

    from jedi_kernels.testing import assert_flash_rule

    monkeypatch.setattr(sa, "gluon_fwd_ok", lambda *a: True)
    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(variant))
    set_mask = _masks(mask, G)
    _, (q, k, v) = _inputs(B, G, L, H, D, torch.float16, torch.device("cpu"), fused=True)
    with gluon_emu.emulated(sg, sg._kernel_of(sg.CONFIGS[variant]).__name__, tma_lands) as runs:
        out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, set_mask)
    assert len(runs) == 1
    do = torch.zeros_like(q)
    ref64 = _ref_fwd_bwd(q, k, v, do, G, H, D**-0.5, set_mask, torch.float64)
    same = _ref_fwd_bwd(q, k, v, do, G, H, D**-0.5, set_mask, torch.float16)
    assert_flash_rule(out, same[0], ref64[0], f"out config {variant}")
    assert_flash_rule(lse, same[1], ref64[1], f"lse config {variant}")


def _inf_in_head_1(G, L, H, D, dtype, device):
    """q, k, v as views of one fused projection (1 set of G images, H heads of D), every head but head 0 all Inf."""
    from test_set_attention import _inputs

    _, (q, k, v) = _inputs(1, G, L, H, D, dtype, device, fused=True)
    for t in (q, k, v):
        t[..., D:] = float("inf")  # (views of the projection)
    return q, k, v


def _check_head_0(q, k, v, out, lse, G, D, label):
    """Head 0's out and lse finite and by the flash rule against the reference of head 0 alone."""
    from test_set_attention import _ref_fwd_bwd

    from jedi_kernels.testing import assert_flash_rule

    q0, k0, v0 = (t[..., :D] for t in (q, k, v))
    do = torch.zeros_like(q0)
    ref64 = _ref_fwd_bwd(q0, k0, v0, do, G, 1, D**-0.5, None, torch.float64)
    same = _ref_fwd_bwd(q0, k0, v0, do, G, 1, D**-0.5, None, q.dtype)
    assert torch.isfinite(out[..., :D]).all() and torch.isfinite(lse[:, 0]).all(), label
    assert_flash_rule(out[..., :D], same[0], ref64[0], f"head 0's out, {label}")
    assert_flash_rule(lse[:, :1], same[1], ref64[1], f"head 0's lse, {label}")


@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
def test_emulated_never_reads_another_heads_columns(monkeypatch, variant):
    """Head 1 of q, k and v all Inf: head 0's out and lse are still right. The descriptors end at the head dim, so the
    columns a chunk has past it (d 40: 40..47 of 32 + 16; config 4: 40..63) are TMA's zero fill, never head 1's; the
    2-D boxes before them read head 1's first columns into head 0's padding, where 0 · Inf reached head 0's scores.
    (Head 1's own P is NaN, Inf - Inf: the emulator's check for unwritten shared memory is off.)"""
    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(sa, "gluon_fwd_ok", lambda *a: True)
    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(variant))
    G, L, H, D = 2, 130, 2, 40
    q, k, v = _inf_in_head_1(G, L, H, D, torch.float16, torch.device("cpu"))
    with gluon_emu.emulated(sg, sg._kernel_of(sg.CONFIGS[variant]).__name__, nan_ok=True) as runs:
        out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None)
    assert len(runs) == 1
    _check_head_0(q, k, v, out, lse, G, D, f"config {variant}")


# ----------------------------------------------------------------------------------------------------------------------
# GPU (sm_90): correctness by the flash rule, as the other forwards
# ----------------------------------------------------------------------------------------------------------------------


def _spy(monkeypatch) -> list:
    calls, real = [], sa.set_attn_fwd_gluon
    monkeypatch.setattr(sa, "set_attn_fwd_gluon", lambda *a, **kw: calls.append(a[3:8] + (a[-1],)) or real(*a, **kw))
    return calls


def _require_sm90():
    if not sg.HAVE_GLUON or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward runs on sm_90 only")
    if os.environ.get("JEDI_TEST_GLUON") != "1":
        pytest.skip("experimental Gluon forward: JEDI_TEST_GLUON=1 runs it (gpu_check.sh sets it once "
                    "tools/ws_probe.py --kernel gluon finished: a kernel that never ends must not take the test step)")


@pytest.mark.gpu
@pytest.mark.gluon
@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (2, 2, 1024, 2, 40, "full", True),  # SD's 64x64 level, as views of one qkv projection
    (1, 3, 97, 2, 40, "oneway", False),  # key tails: the next image's rows are masked
    (1, 2, 256, 2, 64, "blockdiag", False),
    (2, 2, 65, 3, 24, "jedi", True),  # one 32-column chunk, 8 columns past the head dim: zero-filled
    (1, 1, 1, 2, 8, "full", False),  # one row: the box runs past the tensor's end
    (1, 5, 200, 1, 40, "random", False),
    (2, 2, 1024, 2, 80, "full", True),  # SD's 32x32 level: 64 + 16 columns
    (1, 3, 70, 2, 72, "oneway", False),
    (1, 2, 64, 2, 128, "jedi", True),
])
def test_gluon_forward_gpu(monkeypatch, variant, B, G, L, H, D, mask, fused, dtype):
    """out, lse, and the grads of the pointer backward on its lse, by the flash rule; the Gluon kernel really ran."""
    from test_set_attention import _check_case  # pytest imports the test files by basename (no packages)

    _require_sm90()
    if variant not in sg.checked_configs():
        pytest.skip(f"config {variant} is not in JEDI_GLUON_CONFIGS={os.environ.get('JEDI_GLUON_CONFIGS')} (the "
                    f"probe found it disagreeing with the pointer kernel: see gluon_probe.log)")
    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(variant))
    calls = _spy(monkeypatch)
    _check_case(B, G, L, H, D, dtype=dtype, device=torch.device("cuda"), mask=mask, fused=fused)
    assert calls == [(B, G, L, H, D, variant)]


@pytest.mark.gpu
@pytest.mark.gluon
@pytest.mark.parametrize("variant", sorted(sg.CONFIGS))
def test_gluon_forward_never_reads_another_heads_columns(monkeypatch, variant):
    """The emulated test of the same name on the hardware: TMA's out-of-bounds zero fill past the head dim of the
    (N·L, H, D) descriptors, with head 1 all Inf (bf16, SD's d 40, the Gluon kernel really ran)."""
    _require_sm90()
    if variant not in sg.checked_configs():
        pytest.skip(f"config {variant} is not in JEDI_GLUON_CONFIGS={os.environ.get('JEDI_GLUON_CONFIGS')}")
    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(variant))
    calls = _spy(monkeypatch)
    G, L, H, D = 2, 1024, 2, 40  # (the specialization of the SD case above: no extra compile in a capped step)
    q, k, v = _inf_in_head_1(G, L, H, D, torch.bfloat16, torch.device("cuda"))
    out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None)
    assert calls == [(1, G, L, H, D, variant)]
    _check_head_0(q, k, v, out, lse, G, D, f"config {variant}")


@pytest.mark.gpu
@pytest.mark.gluon
def test_gluon_forward_cuda_graph(monkeypatch):
    """Capturable: replays of a captured call give the eager result on new inputs copied into the same buffers."""
    _require_sm90()
    monkeypatch.setenv("JEDI_TRITON_FWD_GLUON", str(sg.checked_configs()[0]))
    q, k, v = (torch.randn(4, 256, 2 * 40, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    jk.set_attention(q, k, v, 2, 2, backend="triton")  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = jk.set_attention(q, k, v, 2, 2, backend="triton")
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, jk.set_attention(q, k, v, 2, 2, backend="triton"))
