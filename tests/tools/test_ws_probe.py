"""tools/ws_probe.py and the compile-only paths it uses (``_set_attn_fwd_ws(..., compile_only=True)``,
``set_attn_fwd_gluon(..., compile_only=True)``), without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the probe really runs")
def test_probe_says_it_has_nothing_to_probe(tmp_path):
    out = tmp_path / "ws.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "ws_probe.py"), "--json", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "needs an sm_90+ CUDA GPU" in p.stdout
    assert json.loads(out.read_text()) == {"skipped": "needs an sm_90+ CUDA GPU"}


def _run_with_stand_in_driver(script: str) -> None:
    """Run ``script`` in a fresh process without the interpreter (it installs the stand-in driver itself) and expect
    it to print "compiled"; skip if this Triton's internals are not the ones the stand-in patches."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if p.returncode != 0 and "internals" in p.stderr:
        pytest.skip(f"Triton internals differ from the ones the stand-in driver patches: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("compiled"), p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the probe really runs")
def test_gluon_probe_says_it_has_nothing_to_probe(tmp_path):
    out = tmp_path / "gluon.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "ws_probe.py"), "--kernel", "gluon", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert json.loads(out.read_text()) == {"skipped": "needs Gluon and an sm_90 CUDA GPU"}


GLUON_HOST_PATH = """
import sys
sys.path.insert(0, "tools")
import host_overhead
host_overhead._install_stand_in_driver()  # Triton compiles for sm_90; launches are no-ops
import torch
from jedi_kernels.ops import set_attention as sa
from jedi_kernels.ops import set_attention_gluon as sg
B, G, L, H, D = 1, 2, 200, 2, 40
q, k, v = torch.randn(B * G, L, 3 * H * D, dtype=torch.bfloat16).split(H * D, dim=-1)  # fused-qkv views
compiled = []
for kernel in (sg._set_attn_fwd_gluon_kernel, sg._set_attn_fwd_gluon_ws_kernel):  # CTA-wide, warp-specialized
    kernel.warmup = (lambda warmup: lambda *a, **kw: compiled.append(warmup(*a, **kw)))(kernel.warmup)
for variant in sorted(sg.CONFIGS):
    for mask in (None, torch.tensor([[True, False], [True, True]])):
        out, lse, lst, cnt = sa._fwd_buffers(q, B, G, L, H, D, None)
        if mask is not None:
            lst, cnt = torch.zeros(G, G, dtype=torch.int32), torch.ones(G, dtype=torch.int32)
        args = (q, k, v, B, G, L, H, D, D ** -0.5, mask, out, lse, lst, cnt, variant)
        sg.set_attn_fwd_gluon(*args, compile_only=True)
        sg.set_attn_fwd_gluon(*args)  # the launch path: argument binding, descriptors, the (no-op) launch
assert len(compiled) == 2 * len(sg.CONFIGS) and all("cubin" in c.asm for c in compiled), compiled
print("compiled", len(compiled))
"""


def test_gluon_host_path_compiles_and_launches():
    """The Gluon forward's launcher end to end short of the GPU: descriptors of fused-qkv views, every config, with
    and without a mask, compiled for sm_90 through Triton's own launch path (a stand-in driver, as
    tools/host_overhead.py uses), and launched as a no-op."""
    from jedi_kernels.ops import set_attention_gluon as sg

    if not sg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    _run_with_stand_in_driver(GLUON_HOST_PATH)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the probe really runs")
def test_gluon_bwd_probe_says_it_has_nothing_to_probe(tmp_path):
    out = tmp_path / "gluon_bwd.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "ws_probe.py"), "--kernel", "gluon-bwd", "--json",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert "gluon_bwd_probe skipped" in p.stdout
    assert json.loads(out.read_text()) == {"skipped": "needs Gluon and an sm_90 CUDA GPU"}


GLUON_BWD_HOST_PATH = """
import sys
sys.path.insert(0, "tools")
import host_overhead
host_overhead._install_stand_in_driver()  # Triton compiles for sm_90; launches are no-ops
import torch
from jedi_kernels.ops import set_attention_gluon_bwd as gb
compiled = []
kernel = gb._set_attn_bwd_gluon_kernel
kernel.warmup = (lambda warmup: lambda *a, **kw: compiled.append(warmup(*a, **kw)))(kernel.warmup)
n = 0
for B, G, L, H, D in ((1, 2, 200, 2, 40), (1, 3, 97, 2, 80), (2, 2, 64, 3, 24)):
    qkv = torch.randn(B * G, L, 3 * H * D, dtype=torch.bfloat16)
    q, k, v = qkv.split(H * D, dim=-1)  # fused-qkv views
    do = torch.randn(B * G, L, H * D, dtype=torch.bfloat16)
    lse, delta = torch.zeros(B, H, G * L), torch.zeros(B, H, G * L)
    for variant in sorted(gb.BWD_CONFIGS):
        if D > gb.BWD_CONFIGS[variant]["MAX_HEAD_DIM"]:
            continue
        for masked in (False, True):
            lst, cnt = (lse, lse)  # dummies: never read without a mask
            if masked:  # the transposed lists as set_attn_bwd passes them: views at offsets G*G*4 and G*4 bytes of
                # (2, G, G) and (2, G) buffers, 16-byte aligned only for some G (Triton compiles both variants)
                lst, cnt = torch.zeros(2, G, G, dtype=torch.int32)[1], torch.ones(2, G, dtype=torch.int32)[1]
            dk, dv, dq = torch.empty_like(do), torch.empty_like(do), torch.zeros(do.shape)
            args = (do, q, k, v, lse, delta, B, G, L, H, D, D ** -0.5, masked, lst, cnt, dk, dv, dq, variant)
            gb.set_attn_bwd_gluon(*args, compile_only=True)
            gb.set_attn_bwd_gluon(*args)  # the launch path: argument binding, descriptors, the (no-op) launch
            n += 1
assert len(compiled) == n and all("cubin" in c.asm for c in compiled), compiled
print("compiled", len(compiled))
"""


def test_gluon_bwd_host_path_compiles_and_launches():
    """The Gluon backward's launcher end to end short of the GPU: per-chunk descriptors of fused-qkv views (d 40:
    32 + 16 columns, d 80: 64 + 16, d 24: one 32-column chunk), every config that takes the head dim, with and
    without a mask, compiled for sm_90 through Triton's launch path (stand-in driver) and launched as a no-op."""
    from jedi_kernels.ops import set_attention_gluon_bwd as gb

    if not gb.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    _run_with_stand_in_driver(GLUON_BWD_HOST_PATH)


COMPILE_ONLY = """
import sys
sys.path.insert(0, "tools")
import host_overhead
host_overhead._install_stand_in_driver()  # Triton compiles for sm_90; nothing launches
import torch
from jedi_kernels.ops import set_attention as sa
B, G, L, H, D = 1, 2, 200, 2, 40
q, k, v = torch.randn(B * G, L, 3 * H * D, dtype=torch.bfloat16).split(H * D, dim=-1)
launched, compiled = [], []
kernel = sa._set_attn_fwd_ws_kernel
kernel.__class__.__getitem__ = lambda self, grid: (lambda *a, **kw: launched.append(grid))
warmup = kernel.warmup
kernel.warmup = lambda *a, **kw: compiled.append(warmup(*a, **kw))
assert sa._set_attn_fwd_ws(q, k, v, B, G, L, H, D, D ** -0.5, None, None, compile_only=True) is None
assert launched == [], launched
assert len(compiled) == 1 and "cubin" in compiled[0].asm, compiled  # compiled to sm_90 machine code
print("compiled", sorted(compiled[0].asm))
"""


def test_compile_only_compiles_without_launching():
    """The probe's first step: the warp-specialized kernel compiles for sm_90 (a stand-in driver, as
    tools/host_overhead.py uses) and nothing is launched."""
    pytest.importorskip("triton")
    _run_with_stand_in_driver(COMPILE_ONLY)


# ----------------------------------------------------------------------------------------------------------------------
# Dry runs of the Gluon probes on the CPU: the probes' own Python (shapes, mask lists, delta, argument order, the
# agreement checks, the JSON) with the Gluon kernels replaced by float64 reference stand-ins that check what they are
# given. A probe is the first thing a GPU run executes for these kernels; a slip in its glue would cost that run.
# ----------------------------------------------------------------------------------------------------------------------


def _probe_module(monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import ws_probe
    finally:
        sys.path.pop(0)
    import triton.testing

    monkeypatch.setenv("JEDI_TRITON_AUTOTUNE", "0")  # (the backward probe sets it if unset: restored after the test)
    monkeypatch.setitem(ws_probe._TENSORS, "device", "cpu")
    monkeypatch.setitem(ws_probe._TENSORS, "dtype", "float32")  # (the interpreter's bf16 dot is wrong)
    monkeypatch.setattr(ws_probe, "_gluon_sm90", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(ws_probe, "_JSON", [None])
    return ws_probe


def _mask_of_lists(lst, cnt, G):
    """set_mask[i, j] from image lists: row r of ``lst`` lists cnt[r] images (the transposed lists: per key image j,
    the query images i)."""
    mask = torch.zeros(G, G, dtype=torch.bool)
    for j in range(G):
        for i in lst[j, : int(cnt[j])].tolist():
            mask[i, j] = True
    return mask


def _dense_attention_bwd(q, k, v, do, G, H, scale, mask):
    """out, lse (B, H, G·L), dq, dk, dv of the set attention in float64, written out densely (no autograd: the
    stand-in runs inside a custom op, below autograd)."""
    from jedi_kernels import reference

    N, L, HD = q.shape
    B, D = N // G, HD // H

    def heads(t):  # (N, L, H·D) -> (B, H, G·L, D)
        return t.double().reshape(B, G * L, H, D).transpose(1, 2)

    qh, kh, vh, doh = heads(q), heads(k), heads(v), heads(do)
    s = qh @ kh.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~reference.set_mask_to_dense(mask, L), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    out = p @ vh
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (doh * out).sum(-1, keepdim=True))

    def back(t):  # (B, H, G·L, D) -> (N, L, H·D)
        return t.transpose(1, 2).reshape(N, L, HD)

    dq, dk, dv = ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale, p.transpose(-1, -2) @ doh
    return back(out), lse, back(dq), back(dk), back(dv)


def bwd_stand_in(seen):
    """A stand-in for ``set_attn_bwd_gluon`` with its signature: checks lse and delta against the float64 reference
    and writes its dk, dv and dq (added to dq_acc) for the mask its image lists describe (the transposed lists)."""

    def run(do, q, k, v, lse, delta, B, G, L, H, D, scale, has_mask, img_list, img_count, dk, dv, dq_acc, variant,
            compile_only=False):
        seen.append((B, G, L, H, D, has_mask, variant, compile_only))
        if compile_only:
            return
        mask = _mask_of_lists(img_list, img_count, G) if has_mask else None
        out, ref_lse, dq, dk_, dv_ = _dense_attention_bwd(q, k, v, do, G, H, scale, mask)
        ref_delta = (out * do.double()).unflatten(-1, (H, D)).sum(-1)  # (N, L, H) -> (B, H, G·L)
        ref_delta = ref_delta.unflatten(0, (B, G)).permute(0, 3, 1, 2).reshape(B, H, G * L)
        assert lse.shape == delta.shape == (B, H, G * L)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(delta.double(), ref_delta, atol=1e-4, rtol=1e-4)
        dk.copy_(dk_)
        dv.copy_(dv_)
        dq_acc.add_(dq)

    return run


def test_gluon_bwd_probe_dry_run(monkeypatch, tmp_path):
    """The backward probe end to end on small shapes (tails, the masked case whose key image 2 no query attends)
    with the reference stand-in: every config agrees, config 2 skips d 80, the JSON holds what the log said."""
    from jedi_kernels.ops import set_attention_gluon_bwd as gb

    wp = _probe_module(monkeypatch)
    seen = []
    monkeypatch.setattr(gb, "set_attn_bwd_gluon", bwd_stand_in(seen))
    monkeypatch.setattr(gb, "gluon_bwd_ok", lambda *a: True)
    monkeypatch.setattr(wp, "_JSON", [str(tmp_path / "p.json")])
    report = {}
    rc = wp.probe_gluon_bwd(report, shapes=((1, 2, 20, 2, 40, False), (1, 3, 9, 1, 24, True),
                                            (1, 2, 5, 1, 80, False)))
    assert rc == 0, report
    assert report["configs_agreeing"] == [1, 2]
    assert json.loads((tmp_path / "p.json").read_text()) == report
    # each config: compile, run, then the timed kernel (stand-in do_bench: one call); config 2 stops at d 64
    runs = [s for s in seen if not s[-1]]
    assert {s[6] for s in runs} == {1, 2} and not any(s[4] == 80 and s[6] == 2 for s in seen)
    assert any(s[5] for s in runs)  # the masked case went through with its lists
    assert all(v["agree"] for k, v in report.items() if k.endswith("max_abs_diff"))
    assert "JEDI_TRITON_BWD_GLUON" not in os.environ


def test_gluon_bwd_probe_reports_a_wrong_kernel(monkeypatch):
    """A config whose dq is off is reported as disagreeing and left out of configs_agreeing (rc 1)."""
    from jedi_kernels.ops import set_attention_gluon_bwd as gb

    wp = _probe_module(monkeypatch)
    good = bwd_stand_in([])

    def bad(*a, **kw):
        good(*a, **kw)
        if a[-1] == 2 and not kw.get("compile_only"):
            a[17].mul_(1.1)  # dq_acc

    monkeypatch.setattr(gb, "set_attn_bwd_gluon", bad)
    monkeypatch.setattr(gb, "gluon_bwd_ok", lambda *a: True)
    report = {}
    assert wp.probe_gluon_bwd(report, shapes=((1, 2, 20, 2, 40, False),)) == 1
    assert report["configs_agreeing"] == [1]


def test_gluon_fwd_probe_dry_run(monkeypatch):
    """The forward probe's glue likewise, with a stand-in that writes the reference out and lse."""
    from jedi_kernels import reference
    from jedi_kernels.ops import set_attention_gluon as sg

    wp = _probe_module(monkeypatch)
    seen = []

    def fwd_stand_in(q, k, v, B, G, L, H, D, scale, set_mask, out, lse, img_list, img_count, variant,
                     compile_only=False):
        seen.append((B, G, L, H, D, variant, compile_only))
        if not compile_only:
            out.copy_(reference.set_attention_reference(q, k, v, G, H, scale, set_mask))
            lse.copy_(reference.set_attention_lse_reference(q, k, G, H, scale, set_mask))

    monkeypatch.setattr(sg, "set_attn_fwd_gluon", fwd_stand_in)
    monkeypatch.setattr(sg, "gluon_fwd_ok", lambda *a: True)
    report = {}
    assert wp.probe_gluon(report, shapes=((1, 2, 20, 2, 40), (1, 2, 9, 1, 80))) == 0, report
    assert report["configs_agreeing"] == sorted(sg.CONFIGS)
    assert {s[5] for s in seen} == set(sg.CONFIGS)
