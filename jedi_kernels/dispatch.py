"""Backend choice for ``backend="auto"``.

The choice is data: ``SET_ATTENTION_TABLE`` maps (device kind, dtype, head dim, masked) to the backend that measured
fastest there (see benchmarks/results/). Where no measurement says ours wins, auto uses torch SDPA, so auto is never
slower than SDPA's best backend by construction. ``JEDI_BACKEND`` (triton|cuda|torch) overrides everything.
"""
from __future__ import annotations

import os

import torch

from jedi_kernels.backends import cpu_ext_ok, cuda_ok, triton_ok

BACKENDS = ("auto", "triton", "cuda", "torch")

# (device kind, dtype, head_dim, masked) -> backend. Filled from GPU benchmark runs; entries are only added when
# the results file shows the kernel beating every SDPA backend on that shape class.
SET_ATTENTION_TABLE: dict[tuple[str, torch.dtype, int, bool], str] = {}


def env_backend() -> str | None:
    """The ``JEDI_BACKEND`` override, validated (None when unset)."""
    b = os.environ.get("JEDI_BACKEND")
    if not b:
        return None
    if b not in BACKENDS:
        raise ValueError(f"JEDI_BACKEND={b!r}: expected one of {BACKENDS}")
    return b


def device_kind(device: torch.device) -> str:
    """A coarse device class for the table: 'cpu', 'sm90', 'sm80', ... ."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def choose_set_attention_backend(q: torch.Tensor, heads: int, masked: bool) -> str:
    """Resolve ``backend="auto"`` for a set-attention call on q (N, L, H*D)."""
    D = q.shape[-1] // heads
    if q.device.type == "cpu":
        # CPU: SDPA's math/flash-cpu kernels; Triton runs only under the (slow) interpreter.
        return "torch"
    choice = SET_ATTENTION_TABLE.get((device_kind(q.device), q.dtype, D, masked), "torch")
    if choice == "triton" and not triton_ok(q.device):
        return "torch"
    if choice == "cuda" and not cuda_ok(q.device, attention=True):
        return "torch"
    return choice


def choose_prepare_backend(x: torch.Tensor) -> str:
    """Resolve the backend of ``prepare_inputs`` for tensors like x."""
    if cuda_ok(x.device):
        return "cuda"
    if x.device.type == "cuda" and triton_ok(x.device):
        return "triton"
    if cpu_ext_ok(x.device):
        return "cpu"
    return "torch"


def choose_fused_backend(x: torch.Tensor) -> str:
    """Resolve ``backend="auto"`` of the fused norm/activation ops (group_norm, geglu): Triton on CUDA (the fused
    kernel moves strictly fewer bytes than torch's separate norm, activation and cast passes), torch elsewhere."""
    if x.device.type == "cuda" and triton_ok(x.device):
        return "triton"
    return "torch"
