"""Which kernel backends this install can run, and why not when it cannot."""
from __future__ import annotations

import functools
import os

import torch

from jedi_kernels import _ext


_ENV = os.environ
_ENV_DATA = getattr(_ENV, "_data", None)
_ENV_KEYS: dict[str, object] = {}


def env_get(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)`` at ≈ 1/10 of its cost: the kernel switches read per eager call (several per
    set-attention call, ≈ 0.7 µs each through ``os.environ`` on the CI machine's CPU) look the encoded name up in
    ``os.environ``'s own table, the one ``os.environ[...] = ...``, ``del`` and ``monkeypatch.setenv`` update. Falls
    back to ``os.environ.get`` where that table is not a dict."""
    data = _ENV_DATA
    if type(data) is not dict:
        return _ENV.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _ENV.encodekey(name)
    v = data.get(key)
    return default if v is None else _ENV.decodevalue(v)


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton is not importable ({e})"
    return True, ""


def _has_cuda_kernel(op: str) -> bool:
    return _ext.cuda_built() and torch._C._dispatch_has_kernel_for_dispatch_key(f"jedi::{op}", "CUDA")


@torch._dynamo.assume_constant_result
def flags() -> tuple[bool, bool, bool, bool]:
    """(triton importable, TRITON_INTERPRET=1, cpu_ext loaded, cuda kernels built): constants to torch.compile, so
    backend resolution inside a compiled region never graph-breaks."""
    return _triton_import()[0], triton_interpreting(), _ext.ext_loaded(), _ext.cuda_built()


@torch._dynamo.assume_constant_result
def cuda_attention_built() -> bool:
    """The CUDA set-attention kernels are registered (a build may leave them out: JEDI_CUDA_EXCLUDE)."""
    return _has_cuda_kernel("set_attention_fwd_ext")


def triton_ok(device: torch.device) -> bool:
    """Triton kernels can run on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    has_triton, interp, _, _ = flags()
    if not has_triton:
        return False
    if device.type == "cuda":
        return not interp
    return device.type == "cpu" and interp


def cuda_ok(device: torch.device, attention: bool = False) -> bool:
    """The compiled CUDA kernels (the set-attention ones when ``attention``) can run on tensors of ``device``."""
    _, _, ext, cuda_built = flags()
    ok = device.type == "cuda" and ext and cuda_built
    return ok and (cuda_attention_built() if attention else True)


def cpu_ext_ok(device: torch.device) -> bool:
    """The compiled CPU kernels can run on tensors of ``device``."""
    return device.type == "cpu" and flags()[2]


def available_backends() -> dict:
    """Report the kernel backends of this install.

    Returns:
        dict with bool entries ``triton``, ``cuda`` (CUDA kernels built and a GPU visible), ``cuda_attention`` (the
        CUDA set-attention kernels among them), ``cpu_ext``, ``torch`` (always True) and
        ``triton_interpreter``, plus ``reasons``: {backend: why it is unavailable} for each False backend.
    """
    reasons: dict[str, str] = {}
    has_triton, why = _triton_import()
    gpu = torch.cuda.is_available()
    interp = triton_interpreting()
    triton_usable = has_triton and (gpu or interp)
    if not has_triton:
        reasons["triton"] = why
    elif not triton_usable:
        reasons["triton"] = "no CUDA device and TRITON_INTERPRET is not 1 (set it to run Triton kernels on the CPU)"
    cpu_ext = _ext.ext_loaded()
    if not cpu_ext:
        reasons["cpu_ext"] = _ext.ext_reason() or "jedi_kernels._C is not loaded"
    cuda = cpu_ext and _ext.cuda_built() and gpu
    if not cuda:
        if not cpu_ext:
            reasons["cuda"] = reasons["cpu_ext"]
        elif not _ext.cuda_built():
            reasons["cuda"] = "jedi_kernels._C was built without CUDA (CPU torch or no CUDA toolkit at build time)"
        else:
            reasons["cuda"] = "no CUDA device is visible"
    cuda_attn = cuda and _has_cuda_kernel("set_attention_fwd_ext")
    if cuda and not cuda_attn:
        reasons["cuda_attention"] = "jedi_kernels._C was built without the CUDA set-attention kernels"
    return {
        "triton": triton_usable,
        "cuda": cuda,
        "cuda_attention": cuda_attn,
        "cpu_ext": cpu_ext,
        "torch": True,
        "triton_interpreter": interp,
        "reasons": reasons,
    }
