"""Helpers shared by the model tests and benchmarks."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["randomize_weights_"]


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with non-zero random values with unit-scale activations, in place; returns ``model``.

    Matrices and conv kernels get N(0, 1/fan_in), normalization weights 1 + N(0, 0.01), everything else (biases,
    1-d parameters) N(0, 0.01). LDM zero-inits the last layer of every residual branch, which would hide most of a
    network from an equivalence check; timing does not depend on the values. Draws on the model's device from one
    seeded generator, so equal architectures get equal weights.
    """
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules()
                    if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None}
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
        if p.dim() > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif id(p) in norm_weights:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model
