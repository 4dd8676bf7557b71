"""Loading of the compiled extension ``jedi_kernels._C``.

torch is imported first (``_C`` links against libc10/libtorch). A missing or ABI-stale ``_C`` warns once and the
package falls back to Triton / the references: it never breaks ``import jedi_kernels``.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (must be loaded before _C: it provides libc10.so)

_C = None
_reason: str | None = None
_cuda_built = False


def _load() -> None:
    global _C, _reason, _cuda_built
    if os.environ.get("JEDI_SKIP_EXT") == "1":
        _reason = "JEDI_SKIP_EXT=1 was set: pure-Python install (Triton + reference)"
        return
    import importlib.util

    try:
        if importlib.util.find_spec("jedi_kernels._C") is None:
            _reason = "jedi_kernels._C is not built; build it with `pip install -e . --no-build-isolation`"
        else:
            from jedi_kernels import _C as mod  # type: ignore[attr-defined]
    except ImportError as e:  # built against another torch (undefined symbols) or otherwise broken
        _reason = (f"jedi_kernels._C could not be loaded ({e}); it is probably stale: rebuild with "
                   "`pip install -e . --no-build-isolation`")
    if _reason is not None:
        warnings.warn(f"jedi_kernels: {_reason}. Falling back to Triton / reference ops.", stacklevel=3)
        return
    _C = mod
    _cuda_built = bool(mod.with_cuda())


_load()


def ext_loaded() -> bool:
    """True when the compiled extension is importable and its ops are registered."""
    return _C is not None


def cuda_built() -> bool:
    """True when ``_C`` was built with the CUDA kernels."""
    return _cuda_built


def ext_reason() -> str | None:
    """Why ``_C`` is unavailable (None when it loaded)."""
    return _reason


def ext_ops():
    """``torch.ops.jedi`` when the extension is loaded, else None."""
    return torch.ops.jedi if _C is not None else None
