"""Row strides that are 16-byte aligned but not multiples of 16 elements (one head of 40: H·D = 40; three: 120).

Triton specializes an int argument on divisibility by 16 only, so such strides compiled the pointer kernels to scalar
loads with another shared-memory plan, and on the H200 (2026-11-28) the dQ kernel's 128x64, 8-warp config read out of
bounds at B 1, G 5, L 200, H 1, D 40 (H 2 passed). The launchers now pass ROW_ALIGN (``set_attention._row_align``)
and the kernels rewrite each stride as ``(s // A) * A`` (``_row_aligned``), which the compiler's alignment analysis
reads: the kernels compile exactly as for strides divisible by 16. Checked here on the CPU by compiling for sm_90
(``sm90_codegen.py``), and on a GPU by running the failing shape through every config of every kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jedi_kernels.ops import set_attention as sa

CODEGEN = Path(__file__).with_name("sm90_codegen.py")

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _codegen(*launches) -> list[dict]:
    """sm90_codegen.py's summaries of the launches (kernel, BM, BN, warps, stages, row stride, ROW_ALIGN), compiled
    in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(x) for launch in launches for x in launch]
    proc = subprocess.run([sys.executable, str(CODEGEN), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, H, D, expect", [
    (torch.bfloat16, 8, 40, 1),  # SD: stride 320, a multiple of 16: Triton's own specialization, no rewrite
    (torch.bfloat16, 1, 40, 8),  # stride 40 = 80 bytes
    (torch.float16, 3, 40, 8),   # 120
    (torch.float32, 1, 40, 4),   # 160 bytes: 4 floats
    (torch.bfloat16, 1, 20, 1),  # 40 bytes: rows not 16-byte aligned, no claim
])
def test_row_align_of_contiguous_projections(dtype, H, D, expect):
    t = torch.zeros(2, 5, H * D, dtype=dtype)
    assert sa._row_align(t, t.clone()) == expect


def test_row_align_needs_every_base_aligned():
    qkv = torch.zeros(2, 5, 3 * 40, dtype=torch.bfloat16)
    q, k, v = qkv.chunk(3, dim=-1)  # row stride 120; k starts 80 bytes in, 16-byte aligned
    assert sa._row_align(q, k, v) == 8
    off = torch.zeros(2 * 5 * 120 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 120)  # base 2 bytes past an allocation
    assert sa._row_align(q, off) == 1


def test_launchers_pass_row_align(monkeypatch):
    """Forward, Delta and both backward kernels get the ROW_ALIGN of the tensors they read (float32 under the
    interpreter: 40 floats are 160 bytes, ROW_ALIGN 4), and the results still pass the flash rule."""
    from test_set_attention import _check_case  # pytest imports the test files by basename (no packages)

    seen = []
    real = sa.launch

    def spy(kernel, grid, *args, **meta):
        if "HEAD_DIM" in meta:  # the attention kernels (not the mask-list kernel, which reads no rows)
            seen.append(meta.get("ROW_ALIGN"))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(sa, "launch", spy)
    _check_case(1, 3, 37, 1, 40, dtype=torch.float32, mask="random")
    assert seen.count(4) == len(seen) == 4, seen  # forward, Delta, dK/dV, dQ
    seen.clear()
    _check_case(1, 2, 17, 2, 40, dtype=torch.float32)  # stride 80: no rewrite
    assert seen.count(1) == len(seen) == 4, seen


def test_row_aligned_strides_compile_as_multiples_of_16():
    """sm_90, bf16, head dim 40: a 40-element row stride with ROW_ALIGN 8 compiles to the same loads, cp.async
    pipelining and shared memory as an 80-element stride (divisible by 16), for each kernel's config that differed;
    without ROW_ALIGN the dQ kernel's faulting config compiles to scalar loads (what the H200 ran)."""
    dq, fwd, dkdv = ("dq", 128, 64, 8, 2), ("fwd", 128, 64, 4, 3), ("dkdv", 64, 64, 4, 3)
    out = _codegen(*[(*k, stride, align) for k in (dq, fwd, dkdv) for stride, align in ((40, 8), (80, 1))],
                   (*dq, 40, 1))
    for i, name in enumerate(("dq", "fwd", "dkdv")):
        hinted, div16 = out[2 * i], out[2 * i + 1]
        assert hinted == div16, f"{name}: stride 40 with ROW_ALIGN 8 {hinted} vs stride 80 {div16}"
        assert any(op.startswith("cp.async") for op in hinted["ops"]), f"{name}: not pipelined: {hinted}"
    scalar = out[-1]
    # (if a later Triton vectorizes a 40-element stride by itself, this fails: the rewrite is then unneeded)
    assert "ld.global.b16" in scalar["ops"] and scalar["shared"] != out[0]["shared"], scalar


def _configs(kind: str) -> list[dict]:
    lists = {"fwd": sa._FWD_CONFIGS, "dkdv": sa._DKDV_CONFIGS, "dq": sa._DQ_CONFIGS}[kind]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in lists["d64"]]


@pytest.mark.gpu
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("config", sorted({tuple(sorted(c.items())) for k in ("fwd", "dkdv", "dq")
                                           for c in _configs(k)}), ids=lambda c: "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**dict(c)))
def test_row_strides_not_multiples_of_16_every_config_gpu(H, config):
    """The H200's failing shape (and three heads: stride 120) through every d 40 config of the forward and both
    backward kernels (the GPU suites otherwise run the default config, which never faulted), judged by the flash
    rule. A fault here poisons the process: gpu_check.sh reruns failures one by one."""
    from test_set_attention import _check_case

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_case(1, 5, 200, H, 40, dtype=torch.bfloat16, device=torch.device("cuda"), mask="random",
                launcher_kwargs={"config": dict(config)})
