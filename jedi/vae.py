"""Stable Diffusion's KL autoencoder (LDM ``AutoencoderKL``), lean, with LDM's module names.

    encoder.conv_in, encoder.down.{i}.block.{j}, encoder.down.{i}.downsample.conv, encoder.mid.{block_1,attn_1,block_2},
    encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv, decoder.conv_in, decoder.mid.*,
    decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out

``decoder.up`` is indexed by resolution level like the encoder (up.0 is the full-resolution level) although the
decoder runs it from the last level to the first: LDM builds it in reverse (``up.insert(0, ...)``), and so do we,
so LDM state dicts load verbatim (``first_stage_model.`` prefix). Diffusers' ``AutoencoderKL`` layout is converted by
:func:`load_vae_weights` / :func:`to_diffusers_vae_state_dict` (its ``decoder.up_blocks`` run in forward order,
``up_blocks.k`` = LDM ``up.{levels-1-k}``; its mid-block attention is Linear where LDM's is 1x1 conv).

Images are (N, 3, H, W) in [-1, 1]; latents are (N, 4, H/8, W/8) already multiplied by ``scale_factor`` (0.18215),
the space SD's UNet works in.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VAEConfig", "AutoencoderKL", "load_vae_weights", "to_diffusers_vae_state_dict", "vae_diffusers_key_map",
           "LDM_VAE_PREFIX"]

LDM_VAE_PREFIX = "first_stage_model."


@dataclass
class VAEConfig:
    """LDM ``first_stage_config.params.ddconfig`` (+ embed_dim and the latent scale).

    Attributes:
        ch: base width. ch_mult: width multiplier per level (downsampling factor 2**(levels-1)).
        num_res_blocks: ResnetBlocks per level (the decoder has one more).
        in_channels, out_ch: image channels. z_channels: latent channels of the encoder/decoder.
        embed_dim: latent channels after quant_conv (the UNet's C). double_z: the encoder predicts mean and logvar.
        scale_factor: latents = z * scale_factor (SD v1: 0.18215).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    scale_factor: float = 0.18215

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult) or self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig: need non-empty positive ch_mult and num_res_blocks >= 1, got {self}")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError(f"VAEConfig: every level width ch * mult must be a multiple of 32 (GroupNorm(32)), "
                             f"got ch={self.ch}, ch_mult={self.ch_mult}")

    @property
    def downsample(self) -> int:
        """Spatial factor between images and latents (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def sd_v1(cls, **overrides) -> "VAEConfig":
        """SD v1.x's autoencoder (kl-f8): 83.7 M parameters, 8x downsampling, 4 latent channels."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """Widths 32/64, one ResnetBlock per level, 2x downsampling: for CPU tests."""
        return cls(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1), **overrides})


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-conv2 + skip (``nin_shortcut`` 1x1 when widths differ); no time embedding."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (LDM's ``AttnBlock``)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        # (N, C, H, W) -> (N, 1, HW, C): one head over the HW tokens
        q, k, v = (f(h).flatten(2).transpose(1, 2).unsqueeze(1) for f in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(o.squeeze(1).transpose(1, 2).reshape(N, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after a (0, 1, 0, 1) zero pad (LDM's asymmetric padding, not padding=1)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(N, in_channels, H, W) -> (N, 2 z_channels, H/f, W/f) moments (mean, logvar) before quant_conv."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1])
                                         for j in range(cfg.num_res_blocks)])
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)
        c = widths[-1]
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(N, z_channels, h, w) -> (N, out_ch, h*f, w*f); ``up`` indexed by level, run from the deepest level up."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        ups = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(c if j == 0 else cout, cout)
                                         for j in range(cfg.num_res_blocks + 1)])
            c = cout
            if i != 0:
                level.upsample = Upsample(c)
            ups.insert(0, level)  # LDM's order: up[i] is level i
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's KL-regularized autoencoder (LDM ``AutoencoderKL``, names verbatim).

    Args:
        config: :class:`VAEConfig` (``VAEConfig.sd_v1()`` or ``VAEConfig.tiny()``).
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VAEConfig.sd_v1()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, each (N, embed_dim, H/f, W/f), unscaled; logvar clamped to [-30, 20]."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> scaled latents.

        Args:
            images: (N, 3, H, W) float in [-1, 1]; H, W divisible by ``config.downsample`` (8 for SD).
            sample: draw ``mean + std * noise`` from the posterior (with ``generator``) instead of its mean.
            generator: torch.Generator on the images' device (used only when ``sample``).

        Returns:
            (N, embed_dim, H/f, W/f) latents times ``scale_factor``, in the images' dtype.

        Raises:
            ValueError: wrong shape or a size not divisible by the downsampling factor.
        """
        f = self.config.downsample
        if (images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] % f
                or images.shape[-2] % f):
            raise ValueError(f"images must be (N, {self.config.in_channels}, H, W) with H, W divisible by {f}, got "
                             f"{tuple(images.shape)}")
        dt = self.quant_conv.weight.dtype
        mean, logvar = self.moments(images.to(dt))
        z = mean
        if sample:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                          dtype=mean.dtype)
        return (z * self.config.scale_factor).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, embed_dim, h, w) -> images (N, out_ch, h*f, w*f) in latents' dtype (not clamped)."""
        if latents.dim() != 4 or latents.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must be (N, {self.config.embed_dim}, h, w), got {tuple(latents.shape)}")
        dt = self.post_quant_conv.weight.dtype
        z = latents.to(dt) / self.config.scale_factor
        return self.decoder(self.post_quant_conv(z)).to(latents.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean: decode(encode(images))."""
        return self.decode(self.encode(images))


# ---- weight layouts -------------------------------------------------------------------------------------------------
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers < 0.14 names


def _diffusers_name(key: str, levels: int) -> str:
    """Diffusers AutoencoderKL name of one LDM VAE key (keys without an LDM-specific part map to themselves)."""
    p = key.split(".")
    if p[0] in ("encoder", "decoder"):
        part, rest = p[0], p[1:]
        if rest[0] in ("down", "up"):
            level, kind = int(rest[1]), rest[2]
            blk = "down_blocks" if rest[0] == "down" else "up_blocks"
            idx = level if rest[0] == "down" else levels - 1 - level
            if kind == "block":
                sub = _RESNET.get(rest[4], rest[4])
                return ".".join([part, blk, str(idx), "resnets", rest[3], sub, *rest[5:]])
            # downsample.conv / upsample.conv
            return ".".join([part, blk, str(idx), "downsamplers" if kind == "downsample" else "upsamplers", "0",
                             *rest[3:]])
        if rest[0] == "mid":
            if rest[1].startswith("block_"):
                n = int(rest[1][-1]) - 1
                return ".".join([part, "mid_block.resnets", str(n), _RESNET.get(rest[2], rest[2]), *rest[3:]])
            return ".".join([part, "mid_block.attentions.0", _ATTN[rest[2]], *rest[3:]])
        if rest[0] == "norm_out":
            return ".".join([part, "conv_norm_out", *rest[1:]])
    return key


def vae_diffusers_key_map(vae: AutoencoderKL) -> dict[str, str]:
    """{LDM key: diffusers key} for every entry of ``vae.state_dict()``."""
    levels = len(vae.config.ch_mult)
    return {k: _diffusers_name(k, levels) for k in vae.state_dict()}


def _is_attn_linear(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.split(".")[-2] in ("q", "k", "v", "proj_out") and \
        ldm_key.endswith("weight")


def to_diffusers_vae_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights in diffusers ``AutoencoderKL`` layout (attention q/k/v/out as Linear (C, C) weights)."""
    sd = vae.state_dict()
    out = {}
    for k, d in vae_diffusers_key_map(vae).items():
        out[d] = sd[k][:, :, 0, 0] if _is_attn_linear(k) else sd[k]  # (C, C, 1, 1) conv -> (C, C) Linear
    return out


def _read(source) -> dict:
    if isinstance(source, dict):
        sd = source
    else:
        path = Path(source)
        if path.is_dir():
            for sub in ("", "vae"):
                hits = [path / sub / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (path / sub / n).is_file()]
                if hits:
                    path = hits[0]
                    break
            else:
                raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model.safetensors/.bin (nor in vae/)")
        if not path.is_file():
            raise FileNotFoundError(f"{str(source)!r} is not an existing file or folder (hub ids are not resolved)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path} holds objects besides tensors, which weights_only loading refuses ({e}); "
                                 f"if you trust it, torch.load it yourself and pass the dict") from None
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return sd


def load_vae_weights(vae: AutoencoderKL, source, *, strict: bool = True) -> dict[str, list[str]]:
    """Load SD VAE weights (LDM or diffusers layout) into ``vae``, in place.

    Layouts (detected): an LDM single file (keys under ``first_stage_model.``; UNet, text encoder and the rest are
    ignored), a bare LDM VAE dict (``encoder.down.0.block.0.norm1.weight``, ...), or diffusers ``AutoencoderKL``
    (``encoder.down_blocks.0.resnets.0.norm1.weight``, ...; old ``query/key/value/proj_attn`` names too), whose
    Linear attention weights (C, C) become 1x1 convs (C, C, 1, 1).

    Args:
        vae: the target :class:`AutoencoderKL` (weights are copied, keeping its device and dtype).
        source: a state dict, or a path to ``.safetensors`` / ``.ckpt`` / ``.bin`` / ``.pt``, or a diffusers folder
            (``[vae/]diffusion_pytorch_model.*``). Local paths only.
        strict: raise on missing or unexpected VAE keys.

    Returns:
        ``{"missing": [...], "unexpected": [...]}`` (empty when strict).

    Raises:
        FileNotFoundError: no such file. ValueError: unknown layout, key or shape mismatches (strict).
    """
    sd = _read(source)
    if any(k.startswith(LDM_VAE_PREFIX) for k in sd):
        sd = {k[len(LDM_VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_VAE_PREFIX)}
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # training-only discriminator / LPIPS
    target = vae.state_dict()
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        inverse = {d: k for k, d in vae_diffusers_key_map(vae).items()}
        for new, old in _OLD_ATTN.items():
            inverse.update({d.replace("." + new + ".", "." + old + "."): k for d, k in list(inverse.items())
                            if "." + new + "." in d})
        new_sd, unexpected = {}, []
        for k, v in sd.items():
            if k in inverse:
                name = inverse[k]
                new_sd[name] = v.reshape(target[name].shape) if _is_attn_linear(name) else v
            else:
                unexpected.append(k)
        sd = new_sd
    elif any(k.startswith(("encoder.", "decoder.", "quant_conv.")) for k in sd):
        unexpected = [k for k in sd if k not in target]
    else:
        raise ValueError(f"unrecognized VAE state dict (first keys: {list(sd)[:5]}): expected LDM "
                         f"('first_stage_model.*' or 'encoder.down.*') or diffusers ('encoder.down_blocks.*')")
    missing = [k for k in target if k not in sd]
    if strict and (missing or unexpected):
        raise ValueError(f"VAE state dict does not match: missing {missing[:10]} ({len(missing)}), unexpected "
                         f"{unexpected[:10]} ({len(unexpected)})")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(t.shape)}" for k, t in target.items() if k in sd and
           sd[k].shape != t.shape]
    if bad:
        raise ValueError(f"VAE shape mismatch (source vs model) in {len(bad)} keys: " + "; ".join(bad[:10]))
    vae.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return {"missing": missing, "unexpected": unexpected}
