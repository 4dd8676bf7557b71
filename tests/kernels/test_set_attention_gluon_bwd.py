"""The Gluon Hopper backward of the set attention (``jedi_kernels/ops/set_attention_gluon_bwd.py``, opt-in
``JEDI_TRITON_BWD_GLUON=<config>``): dK, dV and dQ (float32 atomics) in one kernel.

Gluon has no interpreter mode. The CPU tests compile the kernel for sm_90 and check what must hold before a GPU runs
it: every config compiles for every head-dim class, dtype and masking/tail path without register spills, within
sm_90's shared memory, and without ptxas serializing the warpgroup MMAs (warning C7514, which an accumulator in flight
across the loop's back edge causes); the main loop has the schedule it was written for; and the kernel's own code,
run by the CPU emulator of tests/kernels/gluon_emu.py (products retiring lazily at their waits, TMA copies landing
early or late, mbarrier phases checked), gives dq, dk, dv within the flash rule. The GPU tests (``gpu`` + ``gluon``)
judge the compiled kernel the same way.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import gluon_emu  # (tests/kernels, on sys.path as the test files are)
import pytest
import torch

from jedi_kernels.ops import set_attention as sa
from jedi_kernels.ops import set_attention_gluon_bwd as gb
from test_set_attention_gluon import _loops, _ptxas_report, _sass, compile_all

needs_gluon = pytest.mark.skipif(not gb.HAVE_GLUON, reason="this Triton has no Gluon")

# (config, head dim, dtype, masked, even L): head dims 8 (one 16-column chunk, 8 zeroed), 24 (32, 8 zeroed), 40
# (32 + 16, 8 zeroed), 64, 72 (64 + 16, 8 zeroed), 80 (64 + 16), each up to the config's limit
_CASES = [(v, d, dt, m, e) for v in sorted(gb.BWD_CONFIGS) for d in (8, 24, 40, 64, 72, 80)
          if d <= gb.BWD_CONFIGS[v]["MAX_HEAD_DIM"] for dt in ("float16", "bfloat16")
          for m, e in ((False, True), (True, False))]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{case: (ptx, cubin, shared bytes)} for every case of _CASES, compiled for sm_90 in a fresh Triton cache."""
    if not gb.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    return compile_all(tmp_path_factory.mktemp("gluon_bwd"), "jedi_kernels.ops.set_attention_gluon_bwd",
                       "compile_bwd_for", _CASES)


@needs_gluon
@pytest.mark.parametrize("case", _CASES, ids=[f"cfg{v}-d{d}-{dt}-{'mask+tails' if m else 'full'}"
                                             for v, d, dt, m, e in _CASES])
def test_compiles_for_sm90_without_spills(compiled, case):
    """No spills, shared memory within one block's sm_90 limit, no wgmma serialization (C7514)."""
    ptx, _, shared = compiled[case]
    report = _ptxas_report(ptx)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and spills.groups() == ("0", "0"), report
    assert shared <= 232448, shared
    assert "C7514" not in report, report


def _events(body: list[str]) -> str:
    """A loop body's SASS as a string of events, runs collapsed: M mbarrier wait, r warpgroup MMA with its A operand
    in registers, h with A transposed from shared memory (dQ), H both from shared memory (Sᵀ, dPᵀ), W<n> wait until
    at most n MMA groups are in flight, R float32 reduction to global memory, E exp2, S shared store, B CTA barrier,
    T TMA load."""
    ev = []
    for ins in body:
        ins = re.sub(r"^@!?U?P\w+ ", "", ins)
        if ins.startswith("HGMMA"):
            e = "h" if "tnspA" in ins else ("r" if re.match(r"HGMMA\.\S+ R\d+, R\d+", ins) else "H")
        elif ins.startswith("WARPGROUP.DEPBAR"):
            e = "W" + str(int(ins.split(",")[-1].strip(), 16))
        elif ins.startswith("REDG"):
            e = "R"
        elif ins.startswith("MUFU.EX2"):
            e = "E"
        elif ins.startswith("STS"):
            e = "S"
        elif ins.startswith("BAR.SYNC"):
            e = "B"
        elif ins.startswith("UTMALDG"):
            e = "T"
        elif ins.startswith("SYNCS.PHASECHK"):
            e = "M"
        else:
            continue
        if not ev or ev[-1] != e:
            ev.append(e)
    return " ".join(ev)


@needs_gluon
@pytest.mark.parametrize("variant, head_dim", [(1, 40), (1, 80), (1, 24), (2, 40)])
def test_each_tiles_work_runs_while_the_tensor_cores_do(compiled, variant, head_dim):
    """The main loop issues tile t−1's dK and dQ products and tile t's Sᵀ and dPᵀ back to back, then waits for the
    first two only (2 groups per product over two column chunks) and adds tile t−1's dQ by float32 reductions while
    Sᵀ and dPᵀ run; waits for Sᵀ alone and runs the exponentials while dPᵀ runs; issues dV += Pᵀ dO from registers;
    waits for dPᵀ alone; stores dS; and waits for everything only after the CTA barrier and the refill's TMA loads."""
    nch = 2 if gb.bwd_chunks(head_dim)[1] else 1
    _, cubin, _ = compiled[(variant, head_dim, "bfloat16", False, True)]
    loops = [body for body in _loops(_sass(cubin)) if any(i.startswith("REDG") for i in body)]
    assert loops, "no loop adds dQ"
    ev = _events(max(loops, key=len))
    main = rf"M r h H W{2 * nch} R W{nch} E r W{nch} (B )?S B T( B T)* W0"
    assert re.search(main, ev), ev
    # reductions of dQ sit between the dK/dQ wait and the Sᵀ wait, and the float32 reduction is paired (F32x2)
    assert all("F32x2" in i for i in max(loops, key=len) if i.startswith("REDG")), "dQ reductions are not paired"


def test_chunks():
    """Power-of-two column chunks of at least 16 covering the head, narrower than one padded chunk where two are."""
    assert gb.bwd_chunks(8) == (16, 0)
    assert gb.bwd_chunks(24) == (32, 0)
    assert gb.bwd_chunks(40) == (32, 16)
    assert gb.bwd_chunks(48) == (32, 16)
    assert gb.bwd_chunks(56) == (64, 0)
    assert gb.bwd_chunks(64) == (64, 0)
    assert gb.bwd_chunks(72) == (64, 16)
    assert gb.bwd_chunks(80) == (64, 16)
    for d in range(8, gb.MAX_HEAD_DIM + 1, 8):
        d0, d1 = gb.bwd_chunks(d)
        assert d0 + d1 >= d and d0 >= 16 and (d1 == 0 or d1 >= 16)
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0


def test_variant_switch(monkeypatch):
    monkeypatch.delenv("JEDI_TRITON_BWD_GLUON", raising=False)
    assert gb.gluon_bwd_variant() == 0
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", "2")
    assert gb.gluon_bwd_variant() == 2
    for bad in ("3", "x", "-1"):
        monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", bad)
        with pytest.raises(ValueError, match="JEDI_TRITON_BWD_GLUON"):
            gb.gluon_bwd_variant()


def test_checked_configs(monkeypatch):
    monkeypatch.delenv("JEDI_GLUON_BWD_CONFIGS", raising=False)
    assert gb.checked_bwd_configs() == sorted(gb.BWD_CONFIGS)
    monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", "2,1,2")
    assert gb.checked_bwd_configs() == [1, 2]
    monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", "0")  # the probe found none agreeing
    assert gb.checked_bwd_configs() == []
    for bad in ("7", "a", ","):
        monkeypatch.setenv("JEDI_GLUON_BWD_CONFIGS", bad)
        with pytest.raises(ValueError, match="JEDI_GLUON_BWD_CONFIGS"):
            gb.checked_bwd_configs()


def test_not_taken_where_it_cannot_run(monkeypatch):
    """On CPU tensors (and so under the interpreter) the switch changes nothing: the pointer kernels run."""
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", "1")
    q = torch.randn(2, 4, 40)
    assert not gb.gluon_bwd_ok(q, q, q, q, 40, 1)
    called = []
    monkeypatch.setattr(sa, "set_attn_bwd_gluon", lambda *a, **kw: called.append(a))
    from test_set_attention import _check_case

    _check_case(1, 2, 5, 1, 40, mask="oneway")
    assert not called


@pytest.mark.parametrize("mask", ["oneway", "random", "full"])
def test_set_attn_bwd_wiring(monkeypatch, mask):
    """set_attn_bwd's Gluon branch on the CPU with a float64 reference stand-in for the kernel (tests/tools'
    ``bwd_stand_in``, which checks the lse and Delta it gets and rebuilds the mask from the image lists it gets): the
    transposed lists, lse, Delta, the float32 dQ accumulator and its conversion reach the caller's grads correctly
    (flash rule against the float64 reference, through the custom op's autograd)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        from test_ws_probe import bwd_stand_in
    finally:
        sys.path.pop(0)
    from test_set_attention import _check_case

    seen = []
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", "1")
    monkeypatch.setattr(sa, "gluon_bwd_ok", lambda *a: True)
    monkeypatch.setattr(sa, "set_attn_bwd_gluon", bwd_stand_in(seen))
    _check_case(1, 3, 17, 2, 24, mask=mask, fused=True)
    assert [s[:7] for s in seen] == [(1, 3, 17, 2, 24, mask != "full", 1)]


# ----------------------------------------------------------------------------------------------------------------------
# The kernel itself on the CPU, through tests/kernels/gluon_emu.py (its Python source with Gluon's builtins emulated;
# products retire lazily at their waits, TMA copies land at issue or only at the barrier wait, mbarrier phases and
# byte counts checked): math, indexing, masking and the ring/barrier protocol, short of the compiler and of hazards
# between the warps of one program
# ----------------------------------------------------------------------------------------------------------------------

# (B, G, L, H, D, mask): every program of the first three visits more query tiles than the ring holds (4), so tiles
# are refilled; "orphan" leaves key image 2 without a query (dk = dv = 0 from a program that loops zero times)
_ORPHAN = torch.tensor([[True, False, False], [True, True, False], [True, True, False]])
_EMU_CASES = [
    (1, 3, 70, 2, 40, "full"),  # 32 + 16 columns (8 past the head dim), query and key tails
    (1, 3, 97, 1, 40, "orphan"),  # the transposed image lists
    (2, 2, 140, 3, 24, "jedi"),  # one 32-column chunk, 8 past the head dim (zero fill); two sets
    (1, 1, 1, 2, 8, "full"),  # one row: boxes past the tensor's end
    (1, 2, 128, 1, 80, "oneway"),  # 64 + 16 columns, whole tiles (EVEN_M, EVEN_N)
    (1, 2, 70, 1, 72, "full"),  # 64 + 16, 8 past the head dim
]


@pytest.mark.parametrize("tma_lands", ["issue", "wait"])
@pytest.mark.parametrize("variant", sorted(gb.BWD_CONFIGS))
@pytest.mark.parametrize("B, G, L, H, D, mask", _EMU_CASES, ids=[f"G{c[1]}-L{c[2]}-d{c[4]}-{c[5]}" for c in _EMU_CASES])
def test_emulated_kernel(monkeypatch, variant, tma_lands, B, G, L, H, D, mask):
    """The Gluon backward kernel's own code, emulated on the CPU (fp16 inputs, the flash rule for dq, dk, dv against
    the float64 reference, through the custom op's autograd and the real host code: descriptors, lists, Delta)."""
    if not gb.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    if D > gb.BWD_CONFIGS[variant]["MAX_HEAD_DIM"]:
        pytest.skip(f"config {variant} takes head dims <= {gb.BWD_CONFIGS[variant]['MAX_HEAD_DIM']}")
    from test_set_attention import _check_case

    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", str(variant))
    monkeypatch.setattr(sa, "gluon_bwd_ok", lambda *a: True)
    with gluon_emu.emulated(gb, "_set_attn_bwd_gluon_kernel", tma_lands) as runs:
        _check_case(B, G, L, H, D, dtype=torch.float16, mask=_ORPHAN if mask == "orphan" else mask, fused=True)
    assert len(runs) == 1


def _grads_with_inf_in_head_1(G, L, H, D, dtype, device, emulate: bool):
    """q, k, v (views of one fused projection) and do with every head but head 0 all Inf, the pointer forward, and
    the backward with the Gluon switch as set (emulated on the CPU when ``emulate``): (q, k, v, do, (dq, dk, dv))."""
    import contextlib

    from test_set_attention import _inputs

    _, (q, k, v) = _inputs(1, G, L, H, D, dtype, device, fused=True)
    do = torch.randn_like(q)
    for t in (q, k, v, do):
        t[..., D:] = float("inf")
    out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5, None)  # the pointer forward: heads apart by masks
    # head 1's own programs store NaN into dS on purpose: the emulator's check for unwritten shared memory is off
    ctx = gluon_emu.emulated(gb, "_set_attn_bwd_gluon_kernel", nan_ok=True) if emulate else contextlib.nullcontext([0])
    with ctx as runs:
        grads = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5, None)
    assert len(runs) == 1
    return q, k, v, do, grads


def _check_head_0(q, k, v, do, grads, G, D, label):
    """Head 0's dq, dk, dv finite and by the flash rule against the reference of head 0 alone."""
    from test_set_attention import _ref_fwd_bwd

    from jedi_kernels.testing import assert_flash_rule

    q0, k0, v0, do0 = (t[..., :D] for t in (q, k, v, do))
    ref64 = _ref_fwd_bwd(q0, k0, v0, do0, G, 1, D**-0.5, None, torch.float64)
    same = _ref_fwd_bwd(q0, k0, v0, do0, G, 1, D**-0.5, None, q.dtype)
    for name, g, s16, s64 in zip(("dq", "dk", "dv"), grads, same[2:], ref64[2:]):
        assert torch.isfinite(g[..., :D]).all(), (name, label)
        assert_flash_rule(g[..., :D], s16, s64, f"head 0's {name}, {label}")


@pytest.mark.parametrize("variant", sorted(gb.BWD_CONFIGS))
def test_emulated_never_reads_another_heads_columns(monkeypatch, variant):
    """Head 1 of q, k, v and do all Inf: head 0's dq, dk and dv are still right (the descriptors end at the head dim:
    the columns 40..47 of the 32 + 16 chunks are TMA's zero fill, never head 1's first 8; before them, K and V's were
    zeroed, and 0 · Inf in Q's and dO's reached head 0)."""
    if not gb.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", str(variant))
    monkeypatch.setattr(sa, "gluon_bwd_ok", lambda *a: True)
    G, L, H, D = 2, 70, 2, 40
    q, k, v, do, grads = _grads_with_inf_in_head_1(G, L, H, D, torch.float16, torch.device("cpu"), emulate=True)
    _check_head_0(q, k, v, do, grads, G, D, f"config {variant}")


# ----------------------------------------------------------------------------------------------------------------------
# GPU (sm_90): correctness by the flash rule
# ----------------------------------------------------------------------------------------------------------------------


def _spy(monkeypatch) -> list:
    """Record (B, G, L, H, D) of every call of the Gluon backward's launcher (which still runs)."""
    calls, real = [], sa.set_attn_bwd_gluon
    monkeypatch.setattr(sa, "set_attn_bwd_gluon", lambda *a, **kw: calls.append(a[6:11]) or real(*a, **kw))
    return calls


def _require_sm90():
    if not gb.HAVE_GLUON or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon backward runs on sm_90 only")
    if os.environ.get("JEDI_TEST_GLUON") != "1":
        pytest.skip("experimental Gluon backward: JEDI_TEST_GLUON=1 runs it (gpu_check.sh sets it once "
                    "tools/ws_probe.py --kernel gluon-bwd finished: a kernel that never ends must not take the test "
                    "step)")


@pytest.mark.gpu
@pytest.mark.gluon
@pytest.mark.parametrize("variant", sorted(gb.BWD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (2, 2, 1024, 2, 40, "full", True),  # SD's 64x64 level, as views of one qkv projection
    (1, 3, 97, 2, 40, "oneway", False),  # query and key tails: the next image's rows are masked
    (1, 2, 256, 2, 64, "blockdiag", False),
    (2, 2, 65, 3, 24, "jedi", True),  # a 32-column chunk, 8 columns past the head dim: zero-filled
    (1, 1, 1, 2, 8, "full", False),  # one row: the boxes run past the tensor's end
    (1, 5, 200, 1, 40, "random", False),  # key images no query attends: dk = dv = 0
    (2, 2, 1024, 2, 80, "full", True),  # SD's 32x32 level: 64 + 16 columns
    (1, 3, 70, 2, 72, "oneway", False),
])
def test_gluon_backward_gpu(monkeypatch, variant, B, G, L, H, D, mask, fused, dtype):
    """out, lse (pointer forward), dq, dk, dv (Gluon backward) by the flash rule; the Gluon kernel really ran."""
    from test_set_attention import _check_case

    _require_sm90()
    if variant not in gb.checked_bwd_configs():
        pytest.skip(f"config {variant} is not in JEDI_GLUON_BWD_CONFIGS={os.environ.get('JEDI_GLUON_BWD_CONFIGS')} "
                    f"(the probe found it disagreeing with the split kernels: see gluon_bwd_probe.log)")
    if D > gb.BWD_CONFIGS[variant]["MAX_HEAD_DIM"]:
        pytest.skip(f"config {variant} takes head dims <= {gb.BWD_CONFIGS[variant]['MAX_HEAD_DIM']}")
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", str(variant))
    calls = _spy(monkeypatch)
    _check_case(B, G, L, H, D, dtype=dtype, device=torch.device("cuda"), mask=mask, fused=fused)
    assert calls == [(B, G, L, H, D)]


@pytest.mark.gpu
@pytest.mark.gluon
@pytest.mark.parametrize("variant", sorted(gb.BWD_CONFIGS))
def test_gluon_backward_never_reads_another_heads_columns(monkeypatch, variant):
    """The emulated test of the same name on the hardware: TMA's out-of-bounds zero fill past the head dim of the
    (N·L, H, D) descriptors, with head 1 all Inf (bf16, SD's d 40, the Gluon kernel really ran)."""
    _require_sm90()
    if variant not in gb.checked_bwd_configs():
        pytest.skip(f"config {variant} is not in JEDI_GLUON_BWD_CONFIGS={os.environ.get('JEDI_GLUON_BWD_CONFIGS')}")
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", str(variant))
    calls = _spy(monkeypatch)
    G, L, H, D = 2, 1024, 2, 40  # (the specialization of the SD case above: no extra compile in a capped step)
    q, k, v, do, grads = _grads_with_inf_in_head_1(G, L, H, D, torch.bfloat16, torch.device("cuda"), emulate=False)
    assert calls == [(1, G, L, H, D)]
    _check_head_0(q, k, v, do, grads, G, D, f"config {variant}")


@pytest.mark.gpu
@pytest.mark.gluon
def test_gluon_backward_cuda_graph(monkeypatch):
    """Capturable (descriptors are rebuilt per call, the float32 dQ buffer is allocated and zeroed inside the
    capture): replays of a captured backward give the eager result on new inputs copied into the same buffers (dk and
    dv bit for bit; dq up to the float32 atomics' order)."""
    _require_sm90()
    configs = gb.checked_bwd_configs()
    if not configs:
        pytest.skip("JEDI_GLUON_BWD_CONFIGS=0: the probe found no config agreeing")
    monkeypatch.setenv("JEDI_TRITON_BWD_GLUON", str(configs[0]))
    G, H, D = 2, 2, 40
    q, k, v, do = (torch.randn(4, 256, H * D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = sa.set_attn_fwd(q, k, v, G, H, D**-0.5)
    sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        grads = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5)
    for t in (q, k, v, do):
        t.copy_(torch.randn_like(t))
    o2, l2 = sa.set_attn_fwd(q, k, v, G, H, D**-0.5)
    out.copy_(o2)
    lse.copy_(l2)
    g.replay()
    torch.cuda.synchronize()
    eager = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, D**-0.5)
    assert torch.equal(grads[1], eager[1]) and torch.equal(grads[2], eager[2])
    torch.testing.assert_close(grads[0], eager[0], atol=1e-2, rtol=1e-2)
