"""Drop-in torch modules built on the fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from jedi_kernels.functional import check_set_positions, set_attention, take_set_positions

__all__ = ["SetAttention", "out_bias_foldable", "out_without_bias"]


def out_bias_foldable(to_out: nn.Module) -> bool:
    """An attention's out-projection (SD's ``to_out``: ``nn.Sequential(nn.Linear, nn.Dropout)``) whose bias a caller
    may add elsewhere (``forward(..., out_bias=False)``): a plain ``nn.Linear`` with a bias, then dropout that does
    nothing (p = 0 or eval mode), nothing else."""
    if not isinstance(to_out, nn.Sequential) or len(to_out) not in (1, 2):
        return False
    lin = to_out[0]
    if type(lin) is not nn.Linear or lin.bias is None:
        return False
    return len(to_out) == 1 or (type(to_out[1]) is nn.Dropout and (to_out[1].p == 0 or not to_out[1].training))


def out_without_bias(to_out: nn.Module):
    """``to_out`` as a function of o without its Linear's bias (see :func:`out_bias_foldable`)."""
    if not out_bias_foldable(to_out):
        raise ValueError("out_bias=False needs to_out = nn.Sequential(nn.Linear with a bias, nn.Dropout that does "
                         f"nothing); got {to_out!r}")
    weight = to_out[0].weight
    return lambda o: torch.nn.functional.linear(o, weight)


class SetAttention(nn.Module):
    """Joint self-attention over each set of images; a drop-in for Stable Diffusion's ``attn1``.

    Parameters carry SD's names (``to_q``, ``to_k``, ``to_v`` without bias, ``to_out.0`` Linear with bias), so LDM and
    diffusers state dicts load unchanged.

    Args:
        query_dim: C, channels of the tokens.
        heads: H.
        dim_head: D; inner dim is H*D.
        fuse_qkv: run the three projections as one GEMM (weights concatenated on the fly; state-dict names unchanged).
        backend: set_attention backend ("auto", "triton", "cuda", "torch").
    """

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, *, fuse_qkv: bool = False,
                 backend: str = "auto"):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        self.fuse_qkv, self.backend = fuse_qkv, backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, set_size: int, set_mask: torch.Tensor | None = None,
                q_positions=None, *, out_bias: bool = True) -> torch.Tensor:
        """x: (N, L, C) tokens, N = B * set_size. Returns (N, L, C).

        q_positions: optional positions of the images whose outputs are wanted (strictly increasing ints in
        [0, set_size)): their queries attend the keys and values of every image of their set, and the result is
        (B * K, L, C) for the K positions. Queries and the out-projection run on those images only (a model's last
        joint attention, when only some images' outputs are used); this runs on torch SDPA whatever ``backend`` is
        (see ``jedi_kernels.set_attention``).

        out_bias: False leaves ``to_out[0].bias`` out of the result (the caller adds it later, e.g. as the ``shift``
        of a fused ``add_layer_norm``, so the out-projection's GEMM runs without a bias epilogue). Only for a plain
        ``nn.Linear`` out-projection (a wrapped one, e.g. a LoRA layer, runs its own forward): ValueError otherwise.
        """
        if x.dim() != 3:
            raise ValueError(f"x must have shape (N, L, C), got {tuple(x.shape)}")
        out = self.to_out if out_bias else out_without_bias(self.to_out)
        if q_positions is not None and check_set_positions(q_positions, set_size) is not None:
            xq = take_set_positions(x, set_size, q_positions)
            q = self.to_q(xq)
            if self.fuse_qkv:
                w = torch.cat([self.to_k.weight, self.to_v.weight], dim=0)  # (2*H*D, C)
                k, v = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
            else:
                k, v = self.to_k(x), self.to_v(x)
            o = set_attention(q, k, v, set_size, self.heads, scale=self.scale, set_mask=set_mask, backend="torch",
                              q_positions=q_positions)
            return out(o)
        if self.fuse_qkv:
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)  # (3*H*D, C)
            q, k, v = torch.nn.functional.linear(x, w).chunk(3, dim=-1)  # strided views of (N, L, 3*H*D)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        o = set_attention(q, k, v, set_size, self.heads, scale=self.scale, set_mask=set_mask, backend=self.backend)
        return out(o)
