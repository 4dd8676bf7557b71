"""Loading Stable Diffusion v1 UNet weights into :class:`jedi.JeDiUNet`, and exporting them.

Layouts read (detected from the keys):

* ``ldm``: an LDM single-file checkpoint (``sd-v1-4.ckpt``, ``v1-5-pruned-emaonly.safetensors``,
  ``sd-v1-5-inpainting.ckpt``): UNet keys under ``model.diffusion_model.``; VAE, text encoder, schedule buffers are
  ignored. ``use_ema=True`` reads the EMA copy instead: LitEma stores each parameter under ``model_ema.`` with the
  dots of ``diffusion_model.<name>`` removed (``model_ema.diffusion_modelinput_blocks00weight``).
* ``ldm_unet``: a bare LDM UNet dict (``input_blocks.0.0.weight``, ...), e.g. :func:`to_ldm_state_dict` with
  ``prefix=""`` or ``JeDiUNet.state_dict()``.
* ``diffusers``: ``UNet2DConditionModel`` (``conv_in.weight``, ``down_blocks.0.resnets.0.conv1.weight``, ...), renamed
  by a map built from the model's config (levels, res blocks, attention levels), so any SD-v1-shaped config works.

conv_in: JeDi's input channels are (x_t, masked x0, mask) = 2C+1. A C-channel conv_in (SD v1.x) is widened, its C
latent channels copied and the C+1 new ones zeroed, so the loaded UNet starts as SD on x_t. A 2C+1-channel conv_in
is either SD-inpainting's (x_t, mask, masked image), permuted to JeDi's order, or already JeDi's: ``conv_in_order``
says which; ``"auto"`` reads it as JeDi's only when the dict carries :data:`MARKER_KEY`, which this module's
exporters write.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from jedi.config import UNetConfig

__all__ = ["load_unet_weights", "to_diffusers_state_dict", "to_ldm_state_dict", "LoadReport", "MARKER_KEY",
           "diffusers_key_map", "ldm_to_diffusers_key"]

MARKER_KEY = "jedi.conv_in_order"
"""Key the exporters add: an int8 tensor giving each conv_in channel's role (0 x_t, 1 masked x0, 2 mask). Its
presence tells ``conv_in_order="auto"`` that a 2C+1-channel conv_in is already in JeDi's order."""

LDM_PREFIX = "model.diffusion_model."
_EMA_PREFIX = "model_ema."
_CONV_IN = "input_blocks.0.0.weight"
_RESNET_RENAMES = {  # LDM ResBlock -> diffusers ResnetBlock2D
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


@dataclass
class LoadReport:
    """What :func:`load_unet_weights` did.

    Attributes:
        layout: "ldm", "ldm_unet" or "diffusers".
        conv_in: "as-is", "widened C->2C+1 (new channels zero)" or "permuted inpaint->jedi".
        ignored: number of source keys not belonging to the (selected) UNet weights (VAE, text encoder, schedule
            buffers, the unused EMA or non-EMA copy, the marker).
        use_ema: whether the EMA weights were read.
        missing, unexpected: UNet keys absent from / unknown to the source (empty unless ``strict=False``).
    """

    layout: str
    conv_in: str
    ignored: int
    use_ema: bool
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# ---- key maps ------------------------------------------------------------------------------------------------------
def _block_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """LDM module prefix -> diffusers module prefix, for every block of an SD-v1-shaped UNet."""
    m = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "middle_block.0.": "mid_block.resnets.0.",
        "middle_block.1.": "mid_block.attentions.0.",
        "middle_block.2.": "mid_block.resnets.1.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
    }
    n, i = cfg.num_res_blocks, 1
    for level in range(cfg.levels):
        for j in range(n):
            m[f"input_blocks.{i}.0."] = f"down_blocks.{level}.resnets.{j}."
            if cfg.has_attention(level):
                m[f"input_blocks.{i}.1."] = f"down_blocks.{level}.attentions.{j}."
            i += 1
        if level != cfg.levels - 1:
            m[f"input_blocks.{i}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
            i += 1
    i = 0
    for up, level in enumerate(reversed(range(cfg.levels))):
        for j in range(n + 1):
            m[f"output_blocks.{i}.0."] = f"up_blocks.{up}.resnets.{j}."
            k = 1
            if cfg.has_attention(level):
                m[f"output_blocks.{i}.1."] = f"up_blocks.{up}.attentions.{j}."
                k = 2
            if level and j == n:
                m[f"output_blocks.{i}.{k}.conv."] = f"up_blocks.{up}.upsamplers.0.conv."
            i += 1
    return m


def ldm_to_diffusers_key(key: str, prefixes: dict[str, str]) -> str | None:
    """Diffusers name of one LDM UNet key (None when the key is not part of the structure)."""
    parts = key.split(".")
    for depth in (4, 3, 2):
        p = ".".join(parts[:depth]) + "."
        if p in prefixes:
            rest = key[len(p):]
            if ".resnets." in prefixes[p]:
                for old, new in _RESNET_RENAMES.items():
                    if rest.startswith(old):
                        return prefixes[p] + new + rest[len(old):]
            return prefixes[p] + rest
    return None


def diffusers_key_map(unet: nn.Module) -> dict[str, str]:
    """{LDM key: diffusers key} for every entry of ``unet.state_dict()``."""
    prefixes = _block_prefixes(unet.config)
    out = {}
    for k in unet.state_dict():
        d = ldm_to_diffusers_key(k, prefixes)
        if d is None:  # a structural bug, not a user error
            raise RuntimeError(f"no diffusers name for {k}")
        out[k] = d
    return out


def _ema_key_map(keys) -> dict[str, str]:
    """{EMA key: LDM key}: LitEma drops every dot of ``diffusion_model.<key>``."""
    out: dict[str, str] = {}
    for k in keys:
        e = _EMA_PREFIX + ("diffusion_model." + k).replace(".", "")
        if e in out:
            raise RuntimeError(f"EMA names of {out[e]} and {k} collide")
        out[e] = k
    return out


# ---- sources -------------------------------------------------------------------------------------------------------
def _read(source) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        sd = source
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{str(source)!r} is not an existing file or folder (hub ids are not resolved: download the weights "
                f"and pass their path)"
            )
        if path.is_dir():
            for sub in ("", "unet"):
                for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
                    if (path / sub / name).is_file():
                        path = path / sub / name
                        break
                if path.is_file():
                    break
            else:
                raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model.safetensors/.bin (nor in unet/)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        elif path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{path} holds objects besides tensors, which weights_only loading refuses ({e}). If you trust "
                    f"the file, load it with torch.load(weights_only=False) and pass the dict."
                ) from None
        else:
            raise ValueError(f"unknown weight file type {path.suffix!r}: use .safetensors, .ckpt, .bin, .pt or .pth")
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return sd


def _detect(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith((LDM_PREFIX, _EMA_PREFIX + "diffusion_model")) for k in keys):
        return "ldm"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.",
                         "diffusion_model.input_blocks.")) for k in keys):
        return "ldm_unet"
    if any(k.startswith(("conv_in.", "down_blocks.", "mid_block.", "up_blocks.", "time_embedding.")) for k in keys):
        return "diffusers"
    raise ValueError(f"unrecognized state dict layout (first keys: {keys[:5]}): expected LDM "
                     f"('model.diffusion_model.*' or 'input_blocks.*') or diffusers ('conv_in.*', 'down_blocks.*')")


def _to_ldm_names(sd: dict, layout: str, unet: nn.Module, use_ema: bool) -> tuple[dict, list[str], int]:
    """(UNet tensors under LDM names, unknown UNet-looking keys, number of ignored keys)."""
    ours = list(unet.state_dict())
    out, unexpected, ignored = {}, [], 0
    if layout == "ldm" and use_ema:
        ema = _ema_key_map(ours)
        if not any(k.startswith(_EMA_PREFIX + "diffusion_model") for k in sd):
            raise ValueError("use_ema=True but the checkpoint holds no 'model_ema.*' weights")
        for k, v in sd.items():
            if k in ema:
                out[ema[k]] = v
            elif k.startswith(_EMA_PREFIX + "diffusion_model"):
                unexpected.append(k)
            else:
                ignored += 1  # model.diffusion_model.* (the non-EMA copy), VAE, text encoder, decay, ...
    elif layout == "ldm":
        for k, v in sd.items():
            if k.startswith(LDM_PREFIX):
                out[k[len(LDM_PREFIX):]] = v
            else:
                ignored += 1
    elif layout == "ldm_unet":
        for k, v in sd.items():
            out[k.removeprefix("diffusion_model.")] = v
    else:
        inverse = {d: k for k, d in diffusers_key_map(unet).items()}
        for k, v in sd.items():
            if k in inverse:
                out[inverse[k]] = v
            else:
                unexpected.append(k)
    if MARKER_KEY in out:
        del out[MARKER_KEY]
        ignored += 1
    if MARKER_KEY in unexpected:
        unexpected.remove(MARKER_KEY)
        ignored += 1
    known = set(ours)
    unexpected += [k for k in out if k not in known]
    for k in unexpected:
        out.pop(k, None)
    return out, unexpected, ignored


def _convert_conv_in(w: torch.Tensor, in_channels: int, order: str) -> tuple[torch.Tensor, str]:
    """conv_in weight (C_out, C_src, 3, 3) -> (C_out, in_channels, 3, 3) in JeDi's channel order."""
    c_src = w.shape[1]
    C = (in_channels - 1) // 2
    if c_src == in_channels:
        if order == "inpaint" and in_channels == 2 * C + 1:
            # SD-inpainting (x_t, mask, masked) -> JeDi (x_t, masked, mask)
            new = torch.cat([w[:, :C], w[:, C + 1:], w[:, C:C + 1]], dim=1)
            return new, "permuted inpaint->jedi"
        return w, "as-is"
    if in_channels == 2 * C + 1 and c_src == C:
        new = torch.zeros(w.shape[0], in_channels, *w.shape[2:], dtype=w.dtype, device=w.device)
        new[:, :C] = w
        return new, f"widened {C}->{in_channels} (new channels zero)"
    raise ValueError(f"conv_in weight has {c_src} input channels; this UNet takes in_channels={in_channels} "
                     f"(loadable: {in_channels}, or {C} when in_channels = 2C+1)")


def _listing(keys: list[str]) -> str:
    head = ", ".join(keys[:20])
    return f"{len(keys)} keys: {head}" + (", ..." if len(keys) > 20 else "")


def load_unet_weights(unet: nn.Module, source, *, use_ema: bool = False, strict: bool = True,
                      conv_in_order: str = "auto") -> LoadReport:
    """Load SD v1 UNet weights (LDM or diffusers layout) into a :class:`jedi.JeDiUNet`, in place.

    Args:
        unet: the target JeDiUNet. A model on the meta device (``with torch.device("meta")``) is materialized by
            assignment (no second copy in memory); otherwise weights are copied into its parameters, keeping their
            device and dtype (sources are cast to each parameter's dtype).
        source: a state dict, or a path: ``.safetensors`` (safetensors), ``.ckpt``/``.bin``/``.pt``/``.pth``
            (``torch.load(weights_only=True)``; a top-level ``"state_dict"`` is unwrapped), or a diffusers folder
            holding ``[unet/]diffusion_pytorch_model.{safetensors,bin}``. Hub ids are not resolved.
        use_ema: read the ``model_ema.*`` weights of an LDM checkpoint instead of ``model.diffusion_model.*``.
        strict: raise on missing or unexpected UNet keys (else load the rest and list them in the report).
        conv_in_order: "auto" (a 2C+1-channel conv_in is SD-inpainting's unless the dict carries
            :data:`MARKER_KEY`), "inpaint" (x_t, mask, masked) or "jedi" (x_t, masked x0, mask).

    Returns:
        :class:`LoadReport`.

    Raises:
        FileNotFoundError: a path that does not exist (e.g. a hub id).
        ValueError: unknown layout or file type, missing/unexpected keys (first 20 listed, with counts), shape
            mismatches, an unconvertible conv_in, ``use_ema=True`` without EMA weights, a bad ``conv_in_order``.
    """
    if conv_in_order not in ("auto", "inpaint", "jedi"):
        raise ValueError(f"conv_in_order must be 'auto', 'inpaint' or 'jedi', got {conv_in_order!r}")
    sd = _read(source)
    layout = _detect(sd)
    if conv_in_order == "auto":
        conv_in_order = "jedi" if MARKER_KEY in sd else "inpaint"
    if use_ema and layout != "ldm":
        raise ValueError(f"use_ema=True needs an LDM checkpoint with model_ema.* weights; this is a {layout} dict")
    new, unexpected, ignored = _to_ldm_names(sd, layout, unet, use_ema)
    conv_in = "as-is"
    if _CONV_IN in new:
        new[_CONV_IN], conv_in = _convert_conv_in(new[_CONV_IN], unet.config.in_channels, conv_in_order)

    target = unet.state_dict()
    missing = [k for k in target if k not in new]
    if strict and (missing or unexpected):
        msg = []
        if missing:
            msg.append(f"missing {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected {_listing(unexpected)}")
        raise ValueError(f"{layout} state dict does not match the UNet: " + "; ".join(msg))
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in new.items() if v.shape != target[k].shape]
    if bad:
        raise ValueError(f"shape mismatch (source vs UNet) in {len(bad)} keys: " + "; ".join(bad[:20]))

    meta = any(p.is_meta for p in target.values())
    for k, v in new.items():
        t = target[k]
        new[k] = v.to(dtype=t.dtype) if meta else v.to(dtype=t.dtype, device=t.device)
    unet.load_state_dict(new, strict=False, assign=meta)
    return LoadReport(layout, conv_in, ignored, use_ema, missing, unexpected)


# ---- export --------------------------------------------------------------------------------------------------------
def _marker(unet: nn.Module) -> dict[str, torch.Tensor]:
    cfg = unet.config
    C = (cfg.in_channels - 1) // 2
    if cfg.in_channels != 2 * C + 1 or C < 1:
        return {}
    roles = [0] * C + [1] * C + [2]
    return {MARKER_KEY: torch.tensor(roles, dtype=torch.int8)}


def to_ldm_state_dict(unet: nn.Module, *, prefix: str = LDM_PREFIX, marker: bool = True) -> dict[str, torch.Tensor]:
    """The UNet's weights in LDM layout, ``prefix + <LDM name>`` (default ``model.diffusion_model.``; ``""`` for a
    bare UNet dict), plus :data:`MARKER_KEY` when ``marker`` and the conv_in is JeDi's 2C+1 channels.

    Tensors share storage with the model (like ``state_dict()``); save with ``safetensors.torch.save_file``.
    """
    out = {prefix + k: v for k, v in unet.state_dict().items()}
    return {**out, **_marker(unet)} if marker else out


def to_diffusers_state_dict(unet: nn.Module, *, marker: bool = True) -> dict[str, torch.Tensor]:
    """The UNet's weights in diffusers ``UNet2DConditionModel`` layout (``conv_in.weight``, ``down_blocks.*``, ...),
    plus :data:`MARKER_KEY` when ``marker`` and the conv_in is JeDi's 2C+1 channels (diffusers itself reports the
    marker as an unexpected key and ignores it; pass ``marker=False`` to leave it out).

    Tensors share storage with the model. ``load_unet_weights`` of the result gives back identical tensors.
    """
    sd = unet.state_dict()
    out = {d: sd[k] for k, d in diffusers_key_map(unet).items()}
    return {**out, **_marker(unet)} if marker else out
