"""Backend choice for ``backend="auto"``.

The choice is data: ``SET_ATTENTION_TABLE`` maps (device kind, dtype, head dim, masked) to the backend that measured
fastest there. It is read from ``dispatch_table.json`` beside this file, which ``benchmarks/make_dispatch_table.py``
writes from a GPU sweep (``benchmarks/attention_sweep.py``): an entry exists only where our kernel beat every torch SDPA
backend on every measured row of its class. Where no measurement says ours wins, auto uses torch SDPA, so auto is never
slower than SDPA's best backend by construction. ``JEDI_BACKEND`` (triton|cuda|torch) overrides everything.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from jedi_kernels.backends import cpu_ext_ok, cuda_ok, triton_ok

BACKENDS = ("auto", "triton", "cuda", "torch")
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def load_table(path: str | os.PathLike | None = None) -> dict[tuple[str, torch.dtype, int, bool], str]:
    """Read a dispatch table file: ``{"set_attention": [{"device": "sm90", "dtype": "bfloat16", "head_dim": 40,
    "masked": false, "backend": "triton", ...evidence}]}`` -> {(device, dtype, head_dim, masked): backend}.

    A missing or malformed file warns and gives an empty table (auto = torch SDPA): a bad table must never break
    ``import jedi_kernels`` or pick a backend it cannot justify.
    """
    path = Path(path) if path is not None else TABLE_PATH
    try:
        entries = json.loads(path.read_text())["set_attention"]
        table = {}
        for e in entries:
            backend = e["backend"]
            if backend not in ("triton", "cuda", "torch"):
                raise ValueError(f"unknown backend {backend!r}")
            table[(str(e["device"]), _DTYPES[e["dtype"]], int(e["head_dim"]), bool(e["masked"]))] = backend
        return table
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"jedi_kernels: ignoring the dispatch table {path} ({type(e).__name__}: {e}); "
                      f"backend='auto' uses torch SDPA", stacklevel=2)
        return {}


# (device kind, dtype, head_dim, masked) -> backend, measured (see load_table)
SET_ATTENTION_TABLE: dict[tuple[str, torch.dtype, int, bool], str] = load_table()


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
    """Resolve ``backend="auto"`` of the fused norm/activation ops (group_norm, geglu, add_layer_norm): Triton on CUDA
    (the fused kernel moves strictly fewer bytes than torch's separate norm, add, activation and cast passes), torch
    elsewhere."""
    if x.device.type == "cuda" and triton_ok(x.device):
        return "triton"
    return "torch"
