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
