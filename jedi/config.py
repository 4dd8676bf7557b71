"""UNet hyper-parameters, named as in LDM's ``unet_config.params`` so a CompVis yaml maps verbatim."""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["UNetConfig"]

log = logging.getLogger(__name__)

# LDM yaml keys that describe nothing this model needs (or only the training run): read and dropped with a log note.
# use_checkpoint is among them: SD yamls set it for LDM's training memory; here checkpointing is opted into explicitly.
_IGNORED_KEYS = ("image_size", "legacy", "use_fp16", "use_checkpoint", "num_heads_upsample", "use_new_attention_order")
# LDM yaml keys that select a different architecture: accepted only with the SD v1 value, never ignored silently.
_FIXED_KEYS = {
    "use_spatial_transformer": True,
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "num_classes": None,
    "n_embed": None,
    "adm_in_channels": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
}


@dataclass
class UNetConfig:
    """Hyper-parameters of the SD v1 (CompVis ``openaimodel.UNetModel``) JeDi UNet.

    Fields carry LDM's names. JeDi's input is ``cat(x_t, masked x0, mask)``, so a JeDi UNet has ``in_channels =
    2 * out_channels + 1`` (9 for SD latents). ``in_channels == out_channels`` (4) is plain Stable Diffusion: the
    forward takes x_t alone (``x0=None, ng_mask=None``; see :meth:`jedi.JeDiUNet.forward`). Other values build but
    the forward raises.

    Attributes:
        in_channels: C_in of ``conv_in`` (9 for JeDi).
        out_channels: C of the predicted eps (4 for SD latents).
        model_channels: base width (320 for SD v1); the time embedding is 4x wider.
        channel_mult: width multiplier per resolution level (levels = len(channel_mult)).
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: downsampling factors (1, 2, 4, ...) whose levels get a SpatialTransformer.
        num_heads: H per SpatialTransformer (used when ``num_head_channels == -1``).
        num_head_channels: D per head instead of a fixed H (-1: use num_heads).
        context_dim: width of the text context the cross-attention reads (768 for CLIP ViT-L/14).
        transformer_depth: TransformerBlocks per SpatialTransformer.
        use_linear_in_transformer: proj_in/proj_out as Linear (SD v2) instead of 1x1 conv (SD v1).
        use_checkpoint: gradient checkpointing of every UNet block while grad is enabled (LDM's flag name).
        attn_backend: ``jedi_kernels.set_attention`` backend of every self-attention ("auto", "triton", "cuda",
            "torch").
        fuse_qkv: run each self-attention's q/k/v projections as one GEMM (same parameter names).
        fuse_context_kv: project the context to every cross-attention's keys and values in one GEMM (same parameter
            names); see :meth:`jedi.JeDiUNet.set_fuse_context_kv`.
        fuse_ff: run each feed-forward's input projection and its GEGLU as one kernel (``jedi_kernels.linear_geglu``;
            inference on CUDA, the unfused path elsewhere); see :meth:`jedi.JeDiUNet.set_fuse_ff`. Opt-in until a GPU
            run measures it faster than cuBLAS + the fused GEGLU.
        fused_ops: run every GroupNorm (with the SiLU that follows it in ResBlocks and the output head) and every
            GEGLU through the fused kernels ``jedi_kernels.group_norm`` / ``jedi_kernels.geglu`` (Triton on CUDA,
            torch ops elsewhere). Same parameters and names; see :meth:`jedi.JeDiUNet.set_fused_ops`.
        extra_context_dim: width of optional extra context tokens (None: none). When set, every cross-attention
            (``attn2``) gets its own key/value projections ``to_k_extra``/``to_v_extra`` (extra_context_dim -> H*D,
            no bias) and attends, in one softmax, to the text tokens and the extra tokens (``extra_context`` of the
            forward): ELITE's local mapping of image-patch features, in the "ELITE-like" benchmark workload
            (``benchmarks/table6.py``). The new parameters are absent from SD checkpoints: ``load_unet_weights``
            reports them as missing (ValueError when ``strict=True``; with ``strict=False`` they keep their init
            and are listed in ``LoadReport.missing``).
    """

    in_channels: int = 9
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    use_checkpoint: bool = False
    attn_backend: str = "auto"
    fuse_qkv: bool = False
    fuse_context_kv: bool = False
    fuse_ff: bool = False
    fused_ops: bool = False
    extra_context_dim: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # ignored yaml keys, for the record

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_heads",
                     "context_dim", "transformer_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be non-empty positive ints, got {self.channel_mult}")
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % 32:
                raise ValueError(f"UNetConfig: level {level} has {ch} channels; GroupNorm(32) needs a multiple of 32")
            if self.has_attention(level):
                self.heads_and_dim(ch)  # raises on a width the heads do not divide
        e = self.extra_context_dim
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise ValueError(f"UNetConfig.extra_context_dim must be None or a positive int, got {e!r}")
        if self.attn_backend not in ("auto", "triton", "cuda", "torch"):
            raise ValueError(f"UNetConfig.attn_backend must be auto|triton|cuda|torch, got {self.attn_backend!r}")

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        """Number of resolution levels; h and w must be divisible by ``2 ** (levels - 1)``."""
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def plain_sd(self) -> bool:
        """Whether this is a plain SD UNet (``in_channels == out_channels``: x_t is the whole input, no JeDi
        inpainting channels)."""
        return self.in_channels == self.out_channels

    def has_attention(self, level: int) -> bool:
        """Whether resolution ``level`` (downsampling factor 2**level) carries SpatialTransformers."""
        return 2**level in self.attention_resolutions

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """(H, D) of a SpatialTransformer of width ``channels`` (LDM's num_heads / num_head_channels rule)."""
        if self.num_head_channels == -1:
            H = self.num_heads
            if channels % H:
                raise ValueError(f"UNetConfig: num_heads={H} does not divide {channels} channels")
            return H, channels // H
        D = self.num_head_channels
        if D < 1 or channels % D:
            raise ValueError(f"UNetConfig: num_head_channels={D} does not divide {channels} channels")
        return channels // D, D

    # ---- presets ------------------------------------------------------------------------------------------------
    @classmethod
    def sd_v1(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion v1.x (``v1-inference.yaml``) with JeDi's 9 input channels."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """A 3-level, 1.5M-parameter UNet with SD v1's structure (attention on the upper levels, none at the
        bottom) for CPU tests: widths 32/64/64, 2 heads (D = 16/32), context 32, inputs (N, 4, 16, 16) or larger
        multiples of 4."""
        base = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                    num_heads=2, context_dim=32)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, params: dict, **overrides) -> "UNetConfig":
        """Build from an LDM ``unet_config.params`` dict.

        Keys that only describe the training run (``image_size``, ``legacy``, ``use_fp16``, ``use_checkpoint``, ...)
        are dropped with a log note and kept in ``config.extra`` (gradient checkpointing is opt-in: pass
        ``use_checkpoint=True`` or call ``enable_gradient_checkpointing()``). Keys that select another architecture
        (``use_scale_shift_norm: True``, ``dims: 3``, a list ``transformer_depth``, ...) raise ValueError; unknown
        keys warn. Nothing is forced: ``in_channels`` comes from the dict (SD v1 yamls say 4, JeDi needs 9: pass
        ``in_channels=9``).
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "use_checkpoint"}
        kwargs, extra, unknown = {}, {}, []
        for key, value in dict(params).items():
            if key in names:
                kwargs[key] = value
            elif key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise ValueError(f"unet_config.params.{key}={value!r} is not supported (SD v1 has "
                                     f"{_FIXED_KEYS[key]!r})")
                extra[key] = value
            elif key in _IGNORED_KEYS or (key == "dropout" and not value):
                extra[key] = value
            else:
                unknown.append(key)
                extra[key] = value
        if isinstance(kwargs.get("transformer_depth"), (list, tuple)):
            raise ValueError("unet_config.params.transformer_depth must be an int (per-level depths are SDXL's)")
        if isinstance(kwargs.get("context_dim"), (list, tuple)):
            raise ValueError("unet_config.params.context_dim must be an int")
        if extra:
            log.info("UNetConfig: ignoring LDM keys %s", sorted(extra))
        if unknown:
            warnings.warn(f"UNetConfig: unknown unet_config keys ignored: {sorted(unknown)}", stacklevel=3)
        kwargs.update(overrides)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "UNetConfig":
        """Read ``model.params.unet_config.params`` of an LDM inference yaml (e.g. ``v1-inference.yaml``).

        Args:
            path: the yaml file.
            **overrides: fields that replace the yaml's, e.g. ``in_channels=9`` for JeDi (SD v1 yamls say 4; the
                SD-inpainting yaml says 9).

        Raises:
            FileNotFoundError: no such file. ValueError: no ``unet_config`` or an unsupported architecture key.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no yaml at {path}")
        doc = yaml.safe_load(path.read_text())
        try:
            params = doc["model"]["params"]["unet_config"]["params"]
        except (KeyError, TypeError):
            raise ValueError(f"{path} has no model.params.unet_config.params section") from None
        return cls.from_dict(params, **overrides)
