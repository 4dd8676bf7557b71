"""Which kernel backends this install can run, and why not when it cannot."""
from __future__ import annotations

import functools
import os

import torch

from jedi_kernels import _ext


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


@torch._dynamo.assume_constant_result
def flags() -> tuple[bool, bool, bool, bool]:
    """(triton importable, TRITON_INTERPRET=1, cpu_ext loaded, cuda kernels built): constants to torch.compile, so
    backend resolution inside a compiled region never graph-breaks."""
    return _triton_import()[0], triton_interpreting(), _ext.ext_loaded(), _ext.cuda_built()


def triton_ok(device: torch.device) -> bool:
    """Triton kernels can run on tensors of ``device`` (CUDA, or CPU under the interpreter)."""
    has_triton, interp, _, _ = flags()
    if not has_triton:
        return False
    if device.type == "cuda":
        return not interp
    return device.type == "cpu" and interp


def cuda_ok(device: torch.device) -> bool:
    """The compiled CUDA kernels can run on tensors of ``device``."""
    _, _, ext, cuda_built = flags()
    return device.type == "cuda" and ext and cuda_built


def cpu_ext_ok(device: torch.device) -> bool:
    """The compiled CPU kernels can run on tensors of ``device``."""
    return device.type == "cpu" and flags()[2]


def available_backends() -> dict:
    """Report the kernel backends of this install.

    Returns:
        dict with bool entries ``triton``, ``cuda``, ``cpu_ext``, ``torch`` (always True) and
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
    return {
        "triton": triton_usable,
        "cuda": cuda,
        "cpu_ext": cpu_ext,
        "torch": True,
        "triton_interpreter": interp,
        "reasons": reasons,
    }
