"""One module per op: Triton kernels, launchers and the torch custom-op registration (docs/CONTRACT.md)."""
from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call(*tensors) -> str | None:
    """How an op wrapper may run on these inputs (None entries are skipped) without its custom op's Python dispatch
    layers, which cost more than a small kernel's launch (on the CI machine's CPU, a no-op stand-in through
    ``torch.library.custom_op``: ≈ 15 µs a call without autograd, ≈ 50 µs with it):

    - "direct": plain tensors, not compiling, and no autograd graph to record (grad mode off or no input requiring
      grad): call the kernel launcher itself;
    - "function": the same, but recording autograd: an ``autograd.Function`` with the custom op's saved tensors and
      backward (≈ 6 µs);
    - None: compiling, or a tensor subclass (a tracer's fake or functional tensors): use the custom op, which they
      need (its fake kernel, its registration for the compiler)."""
    if torch.compiler.is_compiling():
        return None
    live = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN for t in live):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in live):
        return "function"
    return "direct"


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout an op keeps (the rule the C++ kernels share): NHWC-contiguous and not also NCHW-contiguous stays
    channels-last; everything else is NCHW."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: ``triton.cdiv`` on the host, without its constexpr-function wrapper (≈ 1.5 µs a call
    on the CI machine's CPU, several per launch)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): ``triton.next_power_of_2`` on the host, without its wrapper."""
    return 1 << (x - 1).bit_length() if x > 1 else 1


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """t (..., W) as an (R, W) view with unit last-dim stride, for the row-wise kernels (GEGLU, add + LayerNorm);
    copied only when the leading dims have no single row stride (e.g. a transposed view) or the last dim is strided."""
    W = t.shape[-1]
    if t.stride(-1) == 1 or W == 1:
        try:
            return t.view(-1, W)  # (..., W) -> (R, W) whenever the leading dims flatten into one row stride
        except RuntimeError:
            pass
    return t.contiguous().view(-1, W)


def rows_stride(t: torch.Tensor) -> int | None:
    """The stride between consecutive rows of ``t`` (N, L, C) seen as an (N·L, C) matrix, or None when the rows of
    different images are not evenly spaced (no 2-D TMA descriptor covers them). Contiguous tensors and views of a
    fused qkv projection qualify."""
    N, L, _ = t.shape
    if L > 1:
        return t.stride(1) if (N == 1 or t.stride(0) == L * t.stride(1)) else None
    return t.stride(0) if N > 1 else t.shape[2]


def tma_rows_ok(*tensors: torch.Tensor) -> bool:
    """Whether a 2-D TMA descriptor over the (N·L, C) rows can cover each tensor: not empty (a descriptor's dims
    must be positive; the pointer kernels simply launch no programs), evenly spaced distinct rows
    (:func:`rows_stride`; not the stride-0 rows of an expanded tensor), unit last stride, a 16-byte aligned base and
    a 16-byte aligned row stride."""
    for t in tensors:
        if t.numel() == 0:
            return False
        rs = rows_stride(t)
        if t.stride(2) != 1 or not rs or (rs * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True
