"""End-to-end JeDi personalization: reference images + prompt -> new images of the same subject.

    pipe = JeDiPipeline.from_single_file("v1-5-pruned-emaonly.safetensors", tokenizer_path="clip-tokenizer/")
    pipe = JeDiPipeline.from_folder("stable-diffusion-v1-5/")          # diffusers layout
    images = pipe(references=[Image.open("dog.png")], prompt="a dog on the beach", num_images=4, seed=0)

Parts: :class:`jedi.JeDiUNet`, :class:`jedi.vae.AutoencoderKL`, transformers' ``CLIPTextModel`` + ``CLIPTokenizer``
(SD v1's ViT-L/14 text tower, 77 tokens, ``last_hidden_state``) and :func:`jedi.sampling.personalize`. Everything is
read from local paths (hub ids are never resolved: ``local_files_only``). ``jedi sample`` is :func:`sample_main`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from jedi.config import UNetConfig
from jedi.sampling import SAMPLERS, STRATEGIES, personalize
from jedi.schedule import NoiseSchedule
from jedi.vae import AutoencoderKL, VAEConfig, load_vae_weights, to_diffusers_vae_state_dict

__all__ = ["JeDiPipeline", "clip_vit_l14_text_config", "load_text_encoder_weights", "unet_config_from_diffusers",
           "unet_config_to_diffusers", "vae_config_from_diffusers", "vae_config_to_diffusers", "load_images",
           "make_grid", "sample_main", "build_sample_parser"]

LDM_TEXT_PREFIX = "cond_stage_model.transformer."


# ---- configs --------------------------------------------------------------------------------------------------------
def clip_vit_l14_text_config(**overrides):
    """transformers ``CLIPTextConfig`` of OpenAI CLIP ViT-L/14's text tower (SD v1's text encoder, 123 M params)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                    projection_dim=768, layer_norm_eps=1e-5, bos_token_id=49406,
                                    eos_token_id=49407, pad_token_id=1), **overrides})


def unet_config_from_diffusers(d: dict, **overrides) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` config.json (SD v1-shaped) -> :class:`UNetConfig` with JeDi's 2C+1 inputs.

    ``attention_head_dim`` is read as diffusers' SD configs mean it (a head count; a per-level list of counts is
    turned into a fixed head dim). A 4-channel (SD) or 9-channel (SD-inpainting / JeDi) ``in_channels`` both give
    in_channels = 2 * out_channels + 1; the weight loader widens or permutes conv_in.

    Raises:
        ValueError: an architecture the JeDi UNet does not implement (class/addition embeddings, another mid block).
    """
    for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim"):
        if d.get(key) is not None:
            raise ValueError(f"unet config: {key}={d[key]!r} is not supported (SD v1-shaped UNets only)")
    if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unet config: mid_block_type={d['mid_block_type']!r} is not supported")
    boc = list(d["block_out_channels"])
    c0 = boc[0]
    if any(b % c0 for b in boc):
        raise ValueError(f"unet config: block_out_channels {boc} are not multiples of the first")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * (len(boc) - 1) + ["DownBlock2D"]))
    attn = tuple(2**i for i, t in reversed(list(enumerate(down))) if "CrossAttn" in t)  # LDM yaml order: (4, 2, 1)
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    head_kw: dict = {}
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) == 1:
            head_kw["num_heads"] = int(heads[0])
        else:
            dims = {b // h for b, h in zip(boc, heads)}
            if len(dims) != 1:
                raise ValueError(f"unet config: heads {heads} give no common head dim over widths {boc}")
            head_kw["num_head_channels"] = dims.pop()
    else:
        head_kw["num_heads"] = int(heads)
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ValueError(f"unet config: per-level transformer_layers_per_block {depth} is not supported")
        depth = depth[0]
    out_c = int(d.get("out_channels", 4))
    kw = dict(in_channels=2 * out_c + 1, out_channels=out_c, model_channels=c0,
              channel_mult=tuple(b // c0 for b in boc), num_res_blocks=int(d.get("layers_per_block", 2)),
              attention_resolutions=attn, context_dim=int(d.get("cross_attention_dim", 768)),
              transformer_depth=int(depth), use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
              **head_kw)
    kw.update(overrides)
    return UNetConfig(**kw)


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """:class:`UNetConfig` -> a diffusers ``UNet2DConditionModel`` config dict (``in_channels`` kept at 2C+1)."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [cfg.has_attention(i) for i in range(cfg.levels)]
    heads = [cfg.heads_and_dim(w)[0] for w in widths]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # diffusers' SD v1 meaning: heads
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_in_transformer, "norm_num_groups": 32, "norm_eps": 1e-5,
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
        "center_input_sample": False,
    }


def vae_config_from_diffusers(d: dict, **overrides) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` config.json -> :class:`VAEConfig`.

    Raises:
        ValueError: VAEs this module does not implement (no quant convs, shift_factor, another norm grouping).
    """
    if d.get("shift_factor") is not None or d.get("use_quant_conv", True) is False or \
            d.get("use_post_quant_conv", True) is False or d.get("norm_num_groups", 32) != 32:
        raise ValueError("vae config: only SD v1/v2-style AutoencoderKL (quant convs, GroupNorm(32), no "
                         "shift_factor) is supported")
    boc = list(d["block_out_channels"])
    latent = int(d.get("latent_channels", 4))
    kw = dict(ch=boc[0], ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=int(d.get("layers_per_block", 2)),
              in_channels=int(d.get("in_channels", 3)), out_ch=int(d.get("out_channels", 3)), z_channels=latent,
              embed_dim=latent, scale_factor=float(d.get("scaling_factor", 0.18215)))
    kw.update(overrides)
    return VAEConfig(**kw)


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """:class:`VAEConfig` -> a diffusers ``AutoencoderKL`` config dict."""
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "latent_channels": cfg.z_channels, "norm_num_groups": 32, "act_fn": "silu",
            "scaling_factor": cfg.scale_factor}


def load_text_encoder_weights(text_encoder, sd: dict, *, prefix: str = LDM_TEXT_PREFIX) -> None:
    """Load CLIP text weights from an LDM single file (``cond_stage_model.transformer.*``) into a ``CLIPTextModel``.

    Works whether the checkpoint (or the installed transformers) names keys ``text_model.embeddings...`` or
    ``embeddings...``; the ``position_ids`` buffer some checkpoints carry is dropped.

    Raises:
        ValueError: no text-encoder keys, or keys/shapes that do not match the model.
    """
    src = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not src:
        raise ValueError(f"no text-encoder weights under {prefix!r} in the checkpoint")
    src = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in src.items()
           if not k.endswith("position_ids")}
    target = text_encoder.state_dict()
    wrap = next(iter(target)).startswith("text_model.")
    src = {("text_model." + k if wrap else k): v for k, v in src.items()}
    missing = [k for k in target if k not in src]
    unexpected = [k for k in src if k not in target]
    bad = [k for k in src if k in target and src[k].shape != target[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"text encoder weights do not match the CLIPTextModel: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {bad[:5]}")
    meta = any(t.is_meta for t in target.values())
    text_encoder.load_state_dict(src, strict=True, assign=meta)


# ---- images ---------------------------------------------------------------------------------------------------------
def _to_rgb(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        with Image.open(img) as im:
            img = im.copy()
    if not isinstance(img, Image.Image):
        raise TypeError(f"references must be PIL images or image paths, got {type(img).__name__}")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels hold arbitrary colour: composite on white rather than keep it
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_images(images: Sequence, width: int, height: int) -> torch.Tensor:
    """PIL images (any mode) or paths -> (N, 3, height, width) float32 in [-1, 1].

    Each image is converted to RGB (alpha composited on white), scaled to cover (width, height) keeping its aspect
    ratio (bicubic) and center-cropped.

    Raises:
        TypeError: an item is neither a PIL image nor a path. ValueError: an empty image.
    """
    out = []
    for img in images:
        img = _to_rgb(img)
        if img.width == 0 or img.height == 0:
            raise ValueError("references must not be empty images")
        img = ImageOps.fit(img, (width, height), method=Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB PIL images (clamped, rounded)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(rows: list[list[Image.Image]], gap: int = 4) -> Image.Image:
    """Paste rows of same-size images into one white-gapped grid (rows may differ in length)."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, len(rows) * h + (len(rows) - 1) * gap), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (j * (w + gap), i * (h + gap)))
    return grid


# ---- pipeline -------------------------------------------------------------------------------------------------------
class JeDiPipeline:
    """Reference images + prompt(s) -> personalized images with a JeDi UNet, SD's VAE and CLIP text encoder.

    Args:
        unet: :class:`jedi.JeDiUNet`.
        vae: :class:`jedi.vae.AutoencoderKL` (kept in float32: SD's VAE overflows in fp16).
        text_encoder: transformers ``CLIPTextModel`` whose hidden size is the UNet's context_dim.
        tokenizer: transformers ``CLIPTokenizer``.
        schedule: training schedule (default SD v1's scaled-linear).
        default_size: image side used when ``__call__`` gets no height/width (512 for SD v1).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: NoiseSchedule | None = None, *,
                 default_size: int = 512):
        if text_encoder.config.hidden_size != unet.config.context_dim:
            raise ValueError(f"text encoder width {text_encoder.config.hidden_size} != UNet context_dim "
                             f"{unet.config.context_dim}")
        if vae.config.embed_dim != unet.config.out_channels:
            raise ValueError(f"VAE latent channels {vae.config.embed_dim} != UNet out_channels "
                             f"{unet.config.out_channels}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet.eval(), vae.eval(), text_encoder.eval(), tokenizer
        self.schedule = schedule or NoiseSchedule.scaled_linear()
        self.default_size = default_size
        self.graphed = None  # jedi.runtime.GraphedUNet once optimize(cuda_graph=True) ran
        self.compiled = None  # torch.compile(unet) once optimize(compile=True) ran

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "JeDiPipeline":
        """Move all parts to ``device``; cast the UNet and text encoder to ``dtype`` (the VAE stays float32)."""
        self.unet.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        self.vae.to(device=device)
        if self.graphed is not None:  # captured graphs read the old parameter buffers
            self.graphed = None if self.device.type != "cuda" else type(self.graphed)(self._step_module())
        return self

    def optimize(self, *, channels_last: bool = True, fused_ops: bool = True, fuse_qkv: bool = True,
                 fuse_context_kv: bool = True, fuse_ff: bool = False, cuda_graph: bool | None = None,
                 compile: bool = False) -> "JeDiPipeline":
        """Switch the UNet to the fast inference configuration (issue 9's levers); the weights stay the same.

        Args:
            channels_last: store the UNet's conv weights channels-last (NHWC convolutions, no layout transforms).
            fused_ops: GroupNorm(+SiLU), GEGLU and the transformer blocks' residual add + LayerNorm through
                jedi_kernels' fused kernels, the convs' biases folded into the adds and GEMMs after them, and each
                Upsample as a sub-pixel convolution (``JeDiUNet.set_fused_ops``).
            fuse_qkv: every self-attention's q/k/v projections as one GEMM.
            fuse_context_kv: every cross-attention's keys and values of the text context in one GEMM for the whole
                UNet (``JeDiUNet.set_fuse_context_kv``).
            fuse_ff: every feed-forward's input projection and GEGLU as one kernel (``JeDiUNet.set_fuse_ff``; CUDA).
                Off by default until a GPU run measures it faster than cuBLAS + the fused GEGLU.
            cuda_graph: replay each denoising step as a CUDA graph (:class:`jedi.runtime.GraphedUNet`; captured at
                the first step of each new batch shape). Default: on when the pipeline is on a CUDA device.
            compile: run the UNet through ``torch.compile`` (default mode; inside the CUDA graph when there is one).
                The first step then compiles, about a minute for SD v1 on an H100; afterwards a JeDi step (set size
                2, CFG, 512 px) took 11.67 ms instead of 12.87 with the graph alone (benchmarks/README.md, Table 6).
                Worth it for many sampling calls in one process, not for one.

        Returns:
            self. ``optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False,
            cuda_graph=False)`` undoes it.

        Raises:
            ValueError: ``cuda_graph=True`` while the pipeline is not on a CUDA device.
        """
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the pipeline on a CUDA device, it is on {self.device}")
        self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.unet.set_fused_ops(fused_ops)
        self.unet.set_fuse_qkv(fuse_qkv)
        self.unet.set_fuse_context_kv(fuse_context_kv)
        self.unet.set_fuse_ff(fuse_ff)
        self.compiled = torch.compile(self.unet) if compile else None
        from jedi.runtime import GraphedUNet

        self.graphed = GraphedUNet(self._step_module()) if cuda_graph else None
        return self

    @property
    def step_unet(self):
        """What a denoising step calls: the CUDA-graph replayer, else the compiled UNet, else the UNet."""
        if self.graphed is not None:
            return self.graphed
        return self._step_module()

    def _step_module(self):
        # (not ``self.compiled or self.unet``: a compiled module's truth value asks the UNet for its len(), a TypeError)
        return self.compiled if self.compiled is not None else self.unet

    @property
    def factor(self) -> int:
        """Pixels per latent step times the UNet's downsampling: image sides must be multiples of this."""
        return self.vae.config.downsample * 2 ** (self.unet.config.levels - 1)

    # ---- building blocks ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, T, context_dim) CLIP ``last_hidden_state`` (T = max_position_embeddings, 77 for SD),
        padded to max_length and truncated, in the UNet's dtype."""
        T = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=T, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state.to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence, width: int, height: int) -> torch.Tensor:
        """Images -> (N, 4, height/8, width/8) float32 scaled latents (posterior mean).

        float32 whatever the UNet's dtype: the sampler's state stays float32 and the UNet casts its inputs (its
        eps comes back in float32), so fp16/bf16 UNets do not round the DDIM / DPM-Solver updates."""
        x = load_images(images, width, height).to(self.device)
        return self.vae.encode(x.to(next(self.vae.parameters()).dtype)).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """(N, 4, h, w) scaled latents -> N RGB PIL images."""
        return _to_pil(self.vae.decode(latents.to(next(self.vae.parameters()).dtype)))

    @torch.no_grad()
    def __call__(self, references: Sequence, prompt: str | Sequence[str], *, num_images: int = 1, steps: int = 50,
                 strategy: str = "joint", l1: float = 7.5, l2: float | None = None, seed: int = 0,
                 sampler: str = "ddim", eta: float = 0.0, negative_prompt: str = "", height: int | None = None,
                 width: int | None = None, progress: bool = True, return_latents: bool = False):
        """Generate ``num_images`` images per prompt showing the references' subject.

        Args:
            references: R >= 1 PIL images (any mode: converted to RGB, alpha on white) or paths; each is scaled to
                cover (width, height) and center-cropped, so any size works.
            prompt: one prompt or a list of B prompts (B sets, each with the same references).
            num_images: K images generated per prompt.
            steps, sampler, strategy, l1, l2, eta: see :func:`jedi.sampling.personalize`.
            seed: seeds one torch.Generator for all noise: same seed, same images.
            negative_prompt: text of the null (unconditional) branch ("" as in SD's CFG).
            height, width: output size, multiples of :attr:`factor` (64 for SD v1); default ``default_size``.
            progress: tqdm bar.
            return_latents: also return the (B, K, 4, h, w) latents.

        Returns:
            B*K PIL images (prompt-major), the generated images only; ``(images, latents)`` with return_latents.

        Raises:
            ValueError: no references, an empty prompt list, a size not a multiple of :attr:`factor`, bad sampling
                arguments. TypeError: a reference that is neither an image nor a path.
        """
        if isinstance(references, (Image.Image, str, Path)):
            references = [references]
        references = list(references)
        if not references:
            raise ValueError("references must hold at least one image (JeDi personalizes from reference images)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if strategy not in STRATEGIES or sampler not in SAMPLERS:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)} and sampler one of {sorted(SAMPLERS)}, "
                             f"got {strategy!r}, {sampler!r}")
        height, width = height or self.default_size, width or self.default_size
        f = self.factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (VAE x UNet downsampling), got "
                             f"{height}x{width}")
        refs = self.encode_images(references, width, height)  # (R, 4, h, w)
        ctx = self.encode_prompt(prompts)  # (B, T, D)
        null = self.encode_prompt([negative_prompt])  # (1, T, D)
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        lat = personalize(self.step_unet, refs, ctx, null, num_targets=num_images, steps=steps,
                          sampler=sampler, strategy=strategy, l1=l1, l2=l2, eta=eta, generator=gen,
                          schedule=self.schedule, progress=progress)
        images = self.decode_latents(lat.flatten(0, 1))
        return (images, lat) if return_latents else images

    # ---- loading / saving --------------------------------------------------------------------------------------
    @classmethod
    def from_single_file(cls, path, *, tokenizer_path=None, use_ema: bool = False, device=None,
                         dtype: torch.dtype | None = None, unet_config: UNetConfig | None = None,
                         vae_config: VAEConfig | None = None, text_config=None, conv_in_order: str = "auto",
                         default_size: int = 512) -> "JeDiPipeline":
        """Build from an SD v1.x LDM single file (``.ckpt`` / ``.safetensors``) and a local CLIP tokenizer folder.

        Reads ``model.diffusion_model.*`` (UNet; SD's 4-channel conv_in is widened to JeDi's 9, see
        :func:`jedi.load_unet_weights`), ``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*``
        (CLIP ViT-L/14 text encoder). Tokenizer files are not in the checkpoint: ``tokenizer_path`` is a folder
        with ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``), e.g. the ``tokenizer/`` folder of a diffusers
        SD v1 copy or of ``openai/clip-vit-large-patch14``.

        Args:
            path: the checkpoint file.
            tokenizer_path: the tokenizer folder (required).
            use_ema: read the UNet's ``model_ema.*`` copy.
            device, dtype: where to put the pipeline (UNet and text encoder cast to dtype; the VAE stays float32).
            unet_config, vae_config, text_config: other architectures (default SD v1 / kl-f8 / ViT-L/14 text).
            conv_in_order: see :func:`jedi.load_unet_weights`.
            default_size: see :class:`JeDiPipeline`.

        Raises:
            ValueError: no tokenizer_path, or weights that do not match. FileNotFoundError: missing files.
        """
        from transformers import CLIPTextModel

        from jedi.unet import JeDiUNet
        from jedi.vae import _read
        from jedi.weights import load_unet_weights

        tokenizer = _load_tokenizer(tokenizer_path)
        sd = _read(path)
        with torch.device("meta"):  # the UNet materializes from the checkpoint's tensors, no second copy
            unet = JeDiUNet(unet_config or UNetConfig.sd_v1())
        load_unet_weights(unet, sd, use_ema=use_ema, conv_in_order=conv_in_order)
        vae = AutoencoderKL(vae_config or VAEConfig.sd_v1())
        load_vae_weights(vae, sd)
        text = CLIPTextModel(text_config or clip_vit_l14_text_config())
        load_text_encoder_weights(text, sd)
        del sd
        return cls(unet, vae, text, tokenizer, default_size=default_size).to(device, dtype)

    @classmethod
    def from_folder(cls, path, *, device=None, dtype: torch.dtype | None = None, conv_in_order: str = "auto",
                    default_size: int | None = None) -> "JeDiPipeline":
        """Build from a local diffusers-layout folder: ``unet/``, ``vae/`` (config.json + diffusion_pytorch_model
        .safetensors/.bin), ``text_encoder/``, ``tokenizer/`` and optionally ``scheduler/scheduler_config.json``.

        Our UNet and VAE are built from the configs (:func:`unet_config_from_diffusers`,
        :func:`vae_config_from_diffusers`); the text encoder and tokenizer load with transformers
        (``local_files_only=True``). ``default_size`` defaults to the VAE config's ``sample_size`` (512 for SD v1).

        Raises:
            FileNotFoundError: a missing folder or file. ValueError: an unsupported architecture or scheduler.
        """
        from transformers import CLIPTextModel

        from jedi.unet import JeDiUNet
        from jedi.weights import load_unet_weights

        root = Path(path)
        for sub in ("unet", "vae", "text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: {sub}/ is missing (hub ids are "
                                        f"not resolved; pass a local path)")
        unet_cfg = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
        vae_json = _read_json(root / "vae" / "config.json")
        with torch.device("meta"):
            unet = JeDiUNet(unet_cfg)
        load_unet_weights(unet, root / "unet", conv_in_order=conv_in_order)
        vae = AutoencoderKL(vae_config_from_diffusers(vae_json))
        load_vae_weights(vae, root / "vae")
        text = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True)
        tokenizer = _load_tokenizer(root / "tokenizer")
        schedule = None
        sched = root / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            schedule = _schedule_from_diffusers(_read_json(sched))
        size = default_size or int(vae_json.get("sample_size", 512))
        return cls(unet, vae, text, tokenizer, schedule, default_size=size).to(device, dtype)

    def save_folder(self, path) -> Path:
        """Write the pipeline as a diffusers-layout folder that :meth:`from_folder` reads back (safetensors).

        The UNet is saved with JeDi's 9-channel conv_in and the :data:`jedi.weights.MARKER_KEY` entry, so it loads
        back in JeDi's channel order.
        """
        from safetensors.torch import save_file

        from jedi.weights import to_diffusers_state_dict

        root = Path(path)
        for sub, cfg, sd in (("unet", unet_config_to_diffusers(self.unet.config), to_diffusers_state_dict(self.unet)),
                             ("vae", {**vae_config_to_diffusers(self.vae.config), "sample_size": self.default_size},
                              to_diffusers_vae_state_dict(self.vae))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / "config.json").write_text(json.dumps(cfg, indent=2))
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                      str(root / sub / "diffusion_pytorch_model.safetensors"))
        self.text_encoder.save_pretrained(str(root / "text_encoder"))
        self.tokenizer.save_pretrained(str(root / "tokenizer"))
        betas = self.schedule.betas
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "num_train_timesteps": len(betas),
             "beta_start": float(betas[0]), "beta_end": float(betas[-1]), "prediction_type": "epsilon"}, indent=2))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "JeDiPipeline"}, indent=2))
        return root


def _read_json(p: Path) -> dict:
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing")
    return json.loads(p.read_text())


def _load_tokenizer(path):
    if path is None:
        raise ValueError("a CLIP tokenizer folder is required (tokenizer_path / --tokenizer): SD checkpoints do not "
                         "hold the tokenizer files. Use the tokenizer/ folder of a diffusers SD v1 copy or of "
                         "openai/clip-vit-large-patch14 (vocab.json + merges.txt)")
    p = Path(path)
    if not p.is_dir() or not ((p / "vocab.json").is_file() and (p / "merges.txt").is_file()
                              or (p / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"tokenizer folder {p} must exist and hold vocab.json + merges.txt (or "
                                f"tokenizer.json); hub ids are not resolved")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(p), local_files_only=True)


def _schedule_from_diffusers(d: dict) -> NoiseSchedule:
    if d.get("beta_schedule", "scaled_linear") != "scaled_linear" or d.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler: only scaled_linear betas with epsilon prediction (SD v1) are supported, got "
                         f"{d.get('beta_schedule')!r} / {d.get('prediction_type')!r}")
    return NoiseSchedule.scaled_linear(float(d.get("beta_start", 0.00085)), float(d.get("beta_end", 0.012)),
                                       int(d.get("num_train_timesteps", 1000)))


# ---- CLI ------------------------------------------------------------------------------------------------------------
def build_sample_parser(prog: str = "jedi sample") -> argparse.ArgumentParser:
    """argparse parser of ``jedi sample``."""
    p = argparse.ArgumentParser(prog=prog, description="Personalize: generate new images of the references' subject")
    p.add_argument("--refs", nargs="+", required=True, help="reference image files (one subject)")
    p.add_argument("--prompt", action="append", required=True,
                   help="text prompt; repeat for several prompts (one set each)")
    p.add_argument("--ckpt", required=True, help="SD v1.x / JeDi single file (.ckpt/.safetensors) or diffusers folder")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json + merges.txt); needed with a single file")
    p.add_argument("--out", required=True, help="output folder (<prompt>_<k>.png and grid.png)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="joint")
    p.add_argument("--l1", type=float, default=7.5, help="guidance scale (the only one for joint/text_only)")
    p.add_argument("--l2", type=float, help="second guidance scale (text_first/image_first; default --l1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side in pixels (default 512 / the folder's sample_size)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--use-ema", action="store_true", help="single file: read the UNet's EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="UNet/text encoder dtype (default fp16 on CUDA, else fp32; the VAE stays fp32)")
    p.add_argument("--fast", action="store_true",
                   help="fast inference configuration (JeDiPipeline.optimize): channels-last, fused GroupNorm/GEGLU/"
                        "add+LayerNorm and QKV kernels, and on CUDA one CUDA graph replay per step")
    p.add_argument("--no-progress", action="store_true")
    return p


def fast_tip(device) -> str | None:
    """The hint ``jedi sample`` prints on a CUDA device without ``--fast`` (None elsewhere: on the CPU ``--fast`` only
    changes memory formats and fused ops, no CUDA graph)."""
    if not str(device).startswith("cuda"):
        return None
    return ("jedi sample: tip: --fast replays each denoising step as a CUDA graph with the fused kernels: about 11.6 "
            "instead of 25 ms per SD v1 JeDi step on an H100 (benchmarks/README.md, issue 9's ladder)")


def sample_main(argv: list[str] | None = None) -> int:
    """``jedi sample``: write the generated images and a grid (references + generations, one row per prompt).

    Returns:
        0 on success, 2 on a user error (message on stderr).
    """
    args = build_sample_parser().parse_args(argv)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every step runs the same conv shapes: time cuDNN's algorithms once
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if str(args.device).startswith("cuda") else "fp32")]
    try:
        ckpt = Path(args.ckpt)
        if ckpt.is_dir():
            pipe = JeDiPipeline.from_folder(ckpt, device=args.device, dtype=dtype)
        else:
            if not ckpt.is_file():
                raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
            pipe = JeDiPipeline.from_single_file(ckpt, tokenizer_path=args.tokenizer, use_ema=args.use_ema,
                                                 device=args.device, dtype=dtype)
        if args.fast:
            pipe.optimize()
        elif (tip := fast_tip(args.device)) is not None:
            print(tip, file=sys.stderr)
        images = pipe(args.refs, args.prompt, num_images=args.num_images, steps=args.steps, strategy=args.strategy,
                      l1=args.l1, l2=args.l2, seed=args.seed, sampler=args.sampler, eta=args.eta,
                      negative_prompt=args.negative_prompt, height=args.size, width=args.size,
                      progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TypeError, OSError) as e:
        print(f"jedi sample: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    K = args.num_images
    size = images[0].size
    refs = [r.resize(size, Image.Resampling.BICUBIC) for r in (ImageOps.fit(_to_rgb(x), size) for x in args.refs)]
    rows = []
    for b in range(len(args.prompt)):
        gen = images[b * K:(b + 1) * K]
        for k, im in enumerate(gen):
            im.save(out / f"{b:02d}_{k:02d}.png")
        rows.append(refs + gen)
    make_grid(rows).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps({f"{b:02d}": p for b, p in enumerate(args.prompt)}, indent=2))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0
