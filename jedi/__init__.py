"""JeDi: joint-image diffusion on a Stable Diffusion v1 UNet, built on :mod:`jedi_kernels`.

    from jedi import JeDiUNet, UNetConfig, load_unet_weights
    unet = JeDiUNet(UNetConfig.sd_v1())
    load_unet_weights(unet, "v1-5-pruned-emaonly.safetensors")
    eps = unet(x_t, timesteps, context, x0=x0, ng_mask=ng_mask, set_size=ng)

Names resolve lazily, so ``import jedi`` (or ``import jedi.config``) does not import torch modules it does not use.
"""
from __future__ import annotations

import importlib

__all__ = ["JeDiUNet", "UNetConfig", "load_unet_weights", "to_diffusers_state_dict", "to_ldm_state_dict",
           "CUDAGraphRunner", "GraphedUNet"]

_WHERE = {
    "JeDiUNet": "jedi.unet",
    "UNetConfig": "jedi.config",
    "load_unet_weights": "jedi.weights",
    "to_diffusers_state_dict": "jedi.weights",
    "to_ldm_state_dict": "jedi.weights",
    "CUDAGraphRunner": "jedi.runtime",
    "GraphedUNet": "jedi.runtime",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'jedi' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
