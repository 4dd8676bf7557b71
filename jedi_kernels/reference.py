"""Plain-PyTorch references of every op in :mod:`jedi_kernels`.

These are the ground truth of the test-suite (run in float64), the CPU fallback of the functional API and the
"eager torch" peer of the benchmarks. They favour clarity over speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "linear_geglu_reference",
    "set_attention_reference",
    "prepare_inputs_reference",
    "set_mask_to_dense",
    "group_norm_reference",
    "geglu_reference",
    "add_layer_norm_reference",
    "upsample_conv2d_reference",
    "residual_add_reference",
]


def set_mask_to_dense(set_mask: torch.Tensor, L: int) -> torch.Tensor:
    """Expand a (G, G) image-level mask to the (G·L, G·L) token-level mask the reference applies."""
    # (G, G) -> (G*L, G*L): every token of image i sees every token of image j iff set_mask[i, j]
    return set_mask.repeat_interleave(L, dim=0).repeat_interleave(L, dim=1)


def set_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float | None = None,
    set_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Joint self-attention over all images of a set, written out in plain PyTorch.

    Args:
        q, k, v: (N, L, H*D) with N = B*G (G = ``set_size``), any float dtype; the math runs in that dtype.
        set_size: G, images per set.
        heads: H.
        scale: softmax scale, default D**-0.5.
        set_mask: optional bool (G, G); ``set_mask[i, j]`` lets queries of image i attend keys of image j.

    Returns:
        (N, L, H*D) in q's dtype: for each set, softmax(q k^T * scale) v over all G*L keys of the set.
    """
    N, L, HD = q.shape
    G, H = set_size, heads
    B, D = N // G, HD // H
    if scale is None:
        scale = D**-0.5

    def split(x: torch.Tensor) -> torch.Tensor:
        # (N, L, H*D) -> (B, G*L, H, D) -> (B, H, G*L, D)
        return x.reshape(B, G * L, H, D).transpose(1, 2)

    qh, kh, vh = split(q), split(k), split(v)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, G*L, G*L)
    if set_mask is not None:
        dense = set_mask_to_dense(set_mask.to(device=q.device, dtype=torch.bool), L)
        s = s.masked_fill(~dense, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vh)  # (B, H, G*L, D)
    # (B, H, G*L, D) -> (B, G*L, H, D) -> (N, L, H*D)
    return o.transpose(1, 2).reshape(N, L, HD)


def set_attention_lse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    set_size: int,
    heads: int,
    scale: float | None = None,
    set_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row logsumexp (natural log) of the scaled scores: (B, H, G*L) float32, as the forward kernels save it."""
    N, L, HD = q.shape
    G, H = set_size, heads
    B, D = N // G, HD // H
    if scale is None:
        scale = D**-0.5
    qh = q.reshape(B, G * L, H, D).transpose(1, 2)
    kh = k.reshape(B, G * L, H, D).transpose(1, 2)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if set_mask is not None:
        s = s.masked_fill(~set_mask_to_dense(set_mask.to(device=q.device, dtype=torch.bool), L), float("-inf"))
    return torch.logsumexp(s, dim=-1).float()


def prepare_inputs_reference(x_t: torch.Tensor, x0: torch.Tensor, ng_mask: torch.Tensor) -> torch.Tensor:
    """JeDi's UNet input ``cat(x_t, x0 * (1 - m), m)`` with m = ng_mask broadcast over (H, W).

    Args:
        x_t, x0: (N, C, H, W) same dtype.
        ng_mask: (N,) bool or {0, 1} float: 1 = image to generate (content hidden), 0 = reference.

    Returns:
        (N, 2C+1, H, W) in x_t's dtype.
    """
    N, C, H, W = x_t.shape
    m = ng_mask.to(x_t.dtype).view(N, 1, 1, 1)
    return torch.cat([x_t, x0 * (1 - m), m.expand(N, 1, H, W)], dim=1)


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm (optionally followed by SiLU) as Stable Diffusion's ``GroupNorm32`` computes it.

    Args:
        x: (N, C, H, W) (or (N, C, *)) any float dtype, any memory format; C divisible by ``num_groups``.
        num_groups: number of channel groups (32 in SD).
        weight, bias: optional (C,) affine parameters.
        eps: variance epsilon.
        silu: apply ``y * sigmoid(y)`` after the affine.
        shift: optional (N, C), added to x (broadcast over the spatial dims) before the norm, in the math dtype:
            a ResBlock's time embedding (+ conv bias) folded into its second norm.

    Returns:
        x's shape and dtype. Half-precision inputs are normalized in float32 (LDM's GroupNorm32) and rounded once;
        float32/float64 inputs in their own precision.
    """
    math_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = weight.to(math_dtype) if weight is not None else None
    b = bias.to(math_dtype) if bias is not None else None
    xm = x.to(math_dtype)
    if shift is not None:
        xm = xm + shift.to(math_dtype).view(x.shape[:2] + (1,) * (x.dim() - 2))
    if x.numel() == x.shape[0] * num_groups:
        # one element per group: F.group_norm refuses it ("Expected more than 1 value per channel"), the formula
        # gives (x - mean) / sqrt(0 + eps) = 0, then the affine
        y = (xm - xm).reshape(xm.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * w.view(shape) if w is not None else y
        y = y + b.view(shape) if b is not None else y
    else:
        y = F.group_norm(xm, num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """SD's GEGLU activation on the output of its ``proj`` Linear: ``a * gelu(g)`` with ``[a, g] = h.chunk(2, -1)``.

    gelu is the exact (erf) one, as ``torch.nn.functional.gelu``'s default.

    Args:
        h: (..., 2F) any float dtype; the first F features are the values a, the last F the gates g.

    Returns:
        (..., F) in h's dtype, computed in h's dtype.
    """
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


def linear_geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SD's feed-forward input projection and its GEGLU, unfused: ``geglu_reference(F.linear(x, weight, bias))``.

    Args:
        x: (..., K) any float dtype. weight: (2F, K) (an ``nn.Linear(K, 2F)`` weight), x's dtype. bias: (2F,) or None.

    Returns:
        (..., F) in x's dtype: the projection rounded to x's dtype, then ``a * gelu(g)`` in x's dtype.
    """
    return geglu_reference(F.linear(x, weight, bias))


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    shift: torch.Tensor | None = None,
    sum_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the LayerNorm that reads its result, as SD's transformer blocks compute them unfused.

    Args:
        x: (..., C) any float dtype. residual: x's shape and dtype, or None (no add).
        weight, bias: optional (C,) affine parameters of the LayerNorm, x's dtype.
        eps: variance epsilon.
        shift: optional (C,) in x's dtype, the residual's bias: added to it first (as a GEMM's bias epilogue would),
            then the sum to x.
        sum_shift: optional (C,) in x's dtype, added to the returned sum only (the norm reads the sum without it).

    Returns:
        (s, n): t = x + (residual + shift) in x's dtype (x itself when both are None); n = layer_norm(t) over the last
        dim in x's dtype (torch's LayerNorm: float32 math for half inputs, one rounding); s = t + sum_shift (t without
        it).
    """
    add = residual if shift is None else (shift if residual is None else residual + shift)
    t = x if add is None else x + add
    n = F.layer_norm(t, (t.shape[-1],), weight, bias, eps)
    return (t if sum_shift is None else t + sum_shift), n


def upsample_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SD's ``Upsample`` (with its conv): nearest 2x upsampling, then a 3x3 convolution with padding 1.

    Args:
        x: (N, C_in, H, W) any float dtype. weight: (C_out, C_in, 3, 3), x's dtype. bias: (C_out,) or None.

    Returns:
        (N, C_out, 2H, 2W) in x's dtype: ``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias,
        padding=1)``.
    """
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def residual_add_reference(x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A residual add with a per-channel bias, as an unfused model computes it: ``x + residual`` and then the bias.

    Args:
        x, residual: (N, C, H, W), same dtype. bias: (C,) in x's dtype, or None.

    Returns:
        (N, C, H, W) in x's dtype, each add rounded to it.
    """
    out = x + residual
    return out if bias is None else out + bias[None, :, None, None]
