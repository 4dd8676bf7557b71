"""JeDi training loop: joint-image denoising of same-subject sets with random reference masking.

Per micro-batch (``jedi_loss``): sets -> images (``get_group_data``) -> latents; one timestep per set (or per image);
``x_t = q_sample(x0, t, eps)`` for every image; ``ng_mask`` marks each image to generate with probability 0.5
(the rest are clean references); for guidance training the caption is dropped (-> "") and, independently, the
reference content is dropped (masked-x0 channels zero for the whole set), each per set; loss = eps-prediction MSE
on all images (or only the generated ones). Options for from-scratch models: ``prediction="v"`` (the UNet predicts
v; the Denoiser still returns eps) and ``loss_weighting="v"`` (the v-prediction loss), which learn the high-noise
steps where a reference carries the subject's identity; SD v1 finetuning keeps the defaults (eps, plain MSE).

Reproducibility and resume: every random draw of a micro-step comes from a generator seeded by
``(seed, micro-step index)`` and is drawn for the *global* batch, each process taking the rows of its own sets; the
data order is a seeded per-epoch permutation (``DistributedSampler``) that can skip the batches already consumed.
So a run resumed from a checkpoint, or split across processes, sees exactly the same data, noise and masks.

Tiny-model latent space (``PixelLatent``): no VAE; the "latent" of an RGB image in [-1, 1] is the image itself,
optionally average-pooled by ``latent_downsample``, plus a 4th channel holding its luminance (mean of RGB), so
the tiny UNet keeps SD's 4 latent channels. Decoding takes the 3 RGB channels (upsampled). For Stable Diffusion pass
``encode=`` a VAE encoder callable (latents already scaled by 0.18215) or use a latent cache.

Distributed: launch with ``torchrun --nproc_per_node P -m jedi.cli train ...`` (env:// init; gloo on CPU, nccl on
CUDA). ``batch_size`` is per process; the global batch is ``P * batch_size`` sets.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from jedi.data import ImageSetDataset, collate_sets
from jedi.schedule import NoiseSchedule
from jedi.text import TextConditioner, TextConfig

__all__ = ["TrainConfig", "load_config", "apply_overrides", "PixelLatent", "Denoiser", "EMA", "build_model",
           "draw_randoms", "jedi_loss", "train", "TrainResult", "latest_checkpoint", "load_checkpoint", "load_model",
           "ema_model"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML files and ``key=value`` overrides map onto these fields.

    Dict fields (``unet``, ``text``) hold overrides of ``UNetConfig.<unet_preset>()`` / ``TextConfig()`` and take
    dotted keys on the command line (``unet.model_channels=64``).
    """

    data: str = ""  # folder of image sets (jedi.data format)
    out: str = "runs/jedi"  # checkpoints/, log.csv, tensorboard/
    resolution: int = 16  # side of each image in pixels
    latent_downsample: int = 1  # PixelLatent pooling factor (tiny models)
    latent_cache: str | None = None  # folder written by jedi.data.cache_latents
    unet_preset: str = "tiny"  # "tiny" | "sd_v1"
    unet: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # vocab_size, max_len (context_dim follows the UNet)
    batch_size: int = 4  # sets per process per micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    ema_decay: float = 0.999  # 0 = no EMA
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (fp16 only on CUDA, with GradScaler)
    grad_checkpointing: bool = False
    timestep_per: str = "set"  # "set" | "image"
    timestep_power: float = 1.0  # t = floor(T * (1 - u**p)), u ~ U[0, 1): 1 = uniform, > 1 favours high noise
    p_mask: float = 0.5  # probability an image is to be generated (ng_mask = 1)
    p_drop_text: float = 0.1  # per set: caption -> "" (classifier-free guidance)
    p_drop_ref: float = 0.1  # per set: reference content -> 0 (image guidance)
    loss_on: str = "all"  # "all" | "masked"
    loss_weighting: str = "eps"  # "eps": plain eps MSE (SD); "v": eps MSE / abar_t, i.e. the v-prediction loss
    prediction: str = "eps"  # UNet output: "eps" (SD v1) | "v" (see Denoiser); the loss always sees eps
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # also at the last step; 0 = only at the last step
    keep_checkpoints: int = 2  # most recent checkpoints kept (0 = all)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    progress: bool = True
    skip_bad: bool = False

    def __post_init__(self):
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        checks = [
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no|bf16|fp16"),
            (self.timestep_per in ("set", "image"), "timestep_per must be set|image"),
            (self.loss_on in ("all", "masked"), "loss_on must be all|masked"),
            (self.loss_weighting in ("eps", "v"), "loss_weighting must be eps|v"),
            (self.prediction in ("eps", "v"), "prediction must be eps|v"),
            (self.unet_preset in ("tiny", "sd_v1"), "unet_preset must be tiny|sd_v1"),
            (self.batch_size >= 1 and self.grad_accum >= 1 and self.max_steps >= 1,
             "batch_size, grad_accum and max_steps must be >= 1"),
            (all(0.0 <= p <= 1.0 for p in (self.p_mask, self.p_drop_text, self.p_drop_ref)),
             "p_mask, p_drop_text and p_drop_ref must be in [0, 1]"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.timestep_power > 0, "timestep_power must be > 0"),
            (self.log_every >= 1 and self.ckpt_every >= 0, "log_every must be >= 1 and ckpt_every >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")


# ---- config files and overrides (yaml.safe_load only: no exec/eval) ---------------------------------------------
def _coerce(name: str, value, current):
    """Check/convert an override value against the field's current value type."""
    if isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(current, bool):
            raise ValueError(f"{name} must be true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, (int, str)):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ValueError(f"{name} expects float, got {value!r}") from None
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if current is not None and value is not None and not isinstance(value, type(current)):
        raise ValueError(f"{name} expects {type(current).__name__}, got {value!r}")
    return value


def apply_overrides(cfg: TrainConfig, overrides: dict | list[str]) -> TrainConfig:
    """Return a copy of ``cfg`` with overrides applied.

    Args:
        cfg: base config.
        overrides: a dict (from YAML) or a list of ``"key=value"`` strings (values parsed with ``yaml.safe_load``:
            ``lr=3e-4``, ``unet.channel_mult=[1,2]``, ``latent_cache=null``). Dotted keys set entries of dict fields.

    Returns:
        A new TrainConfig (validated).

    Raises:
        ValueError: unknown key, malformed ``key=value``, or a value of the wrong type.
    """
    import yaml

    if isinstance(overrides, (list, tuple)):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        overrides = pairs
    d = dataclasses.asdict(cfg)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        top, _, sub = key.partition(".")
        if top not in names:
            raise ValueError(f"unknown TrainConfig key {top!r}; known: {sorted(names)}")
        if sub:
            if not isinstance(d[top], dict):
                raise ValueError(f"{top} is not a dict field; {key!r} cannot be dotted")
            d[top] = {**d[top], sub: value}
        elif isinstance(d[top], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{top} expects a mapping, got {value!r}")
            d[top] = {**d[top], **value}
        else:
            d[top] = _coerce(top, value, d[top])
    return TrainConfig(**d)


def load_config(path=None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from an optional YAML file (a flat mapping of fields), then ``key=value`` overrides.

    Raises:
        FileNotFoundError: no such file. ValueError: the YAML is not a mapping, or bad keys/values.
    """
    import yaml

    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no config file at {p}")
        doc = yaml.safe_load(p.read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{p} must hold a mapping of TrainConfig fields")
        cfg = apply_overrides(cfg, doc)
    return apply_overrides(cfg, overrides or [])


# ---- model pieces -----------------------------------------------------------------------------------------------
class PixelLatent:
    """The tiny models' latent space: RGB (average-pooled by ``downsample``) + luminance -> 4 channels.

    An honest stand-in for SD's VAE at CPU scale: linear, fixed, exactly invertible on the RGB channels.
    """

    channels = 4

    def __init__(self, downsample: int = 1):
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/f, W/f) float32 (RGB, luminance)."""
        x = images.float()
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return torch.cat([x, x.mean(1, keepdim=True)], dim=1)

    __call__ = encode

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) -> (N, 3, h*f, w*f) RGB clamped to [-1, 1] (the luminance channel is dropped)."""
        x = latents[:, :3].float()
        if self.downsample > 1:
            x = F.interpolate(x, scale_factor=self.downsample, mode="nearest")
        return x.clamp(-1, 1)


class Denoiser(nn.Module):
    """UNet + (optional) learned text conditioner, trained together (one module for DDP and checkpoints).

    Whatever the UNet's parameterization, the Denoiser returns eps, so the loss and every sampler see one interface.

    Args:
        unet: ``unet(x_t, t, context, *, x0, ng_mask, set_size) -> out`` (JeDiUNet).
        text: TextConditioner, or None when contexts come precomputed (latent cache with a frozen encoder).
        prediction: what the UNet outputs: "eps" (SD v1) or "v" (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans
            & Ho 2022; SD 2.x). A from-scratch model learns high-noise steps far better with "v": eps is then
            ``sqrt(abar) v + sqrt(1 - abar) x_t``, a skip path that the network no longer has to reproduce exactly.
        alphas_cumprod: (T,) schedule, needed for "v".
    """

    def __init__(self, unet: nn.Module, text: nn.Module | None, prediction: str = "eps",
                 alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be eps|v, got {prediction!r}")
        self.unet, self.text, self.prediction = unet, text, prediction
        if alphas_cumprod is None:
            alphas_cumprod = NoiseSchedule.scaled_linear().alphas_cumprod
        # not persistent: checkpoints keep the UNet's own parameter names only
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def eps(self, x_t, t, context, *, x0, ng_mask, set_size):
        """eps (N, C, h, w) from the UNet's output; the ``unet`` callable of ``ddim_sample``."""
        out = self.unet(x_t, t, context, x0=x0, ng_mask=ng_mask, set_size=set_size)
        if self.prediction == "eps":
            return out
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(out.dtype)  # (N, 1, 1, 1)
        return a.sqrt() * out + (1 - a).sqrt() * x_t

    def forward(self, x_t, t, captions=None, *, x0, ng_mask, set_size, context=None):
        """eps (N, C, h, w) for x_t, x0 (N, C, h, w), t (N,), ng_mask (N,) and captions (N strings) or context."""
        if context is None:
            if self.text is None:
                raise ValueError("Denoiser has no text conditioner: pass context (N, T, D)")
            context = self.text(captions)
        return self.eps(x_t, t, context, x0=x0, ng_mask=ng_mask, set_size=set_size)


def build_model(cfg: TrainConfig, *, text: bool = True) -> Denoiser:
    """Build the JeDiUNet of ``cfg.unet_preset`` (+ ``cfg.unet`` overrides) and a TextConditioner sized to it."""
    from jedi.config import UNetConfig
    from jedi.unet import JeDiUNet

    over = dict(cfg.unet)
    if cfg.grad_checkpointing and "use_checkpoint" in {f.name for f in dataclasses.fields(UNetConfig)}:
        over["use_checkpoint"] = True
    ucfg = getattr(UNetConfig, cfg.unet_preset)(**over)
    unet = JeDiUNet(ucfg)
    tc = TextConditioner(TextConfig(**{**cfg.text, "context_dim": ucfg.context_dim})) if text else None
    return Denoiser(unet, tc, cfg.prediction)


class EMA:
    """Exponential moving average of a module's float parameters (decay warmed up as (1+k)/(10+k))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current parameters in after optimizer step ``step`` (1-based)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite model parameters with the EMA weights."""
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.shadow[k])


# ---- one training step ------------------------------------------------------------------------------------------
def draw_randoms(gen: torch.Generator, n_sets: int, G: int, latent_shape, cfg: TrainConfig,
                 num_timesteps: int = 1000) -> dict:
    """All random draws of one micro-step for the *global* batch of ``n_sets`` sets (rows b*G + i).

    Args:
        gen: CPU generator (seeded per micro-step).
        n_sets: global number of sets.
        G: set size.
        latent_shape: (C, h, w) of one latent.
        cfg: p_mask, p_drop_text, p_drop_ref, timestep_per, timestep_power.

    Returns:
        dict of CPU tensors: t (N,) int64, noise (N, C, h, w), ng_mask (N,) bool, drop_text (N,) bool,
        drop_ref (N,) bool, N = n_sets * G; set-level draws repeated over the G images of each set.
    """
    from jedi_kernels import sample_ng_mask

    N = n_sets * G
    per_set = lambda x: x.repeat_interleave(G)  # (B,) -> (B*G,)
    n_t = n_sets if cfg.timestep_per == "set" else N
    if cfg.timestep_power == 1.0:
        t = torch.randint(0, num_timesteps, (n_t,), generator=gen)
    else:  # identity must come from the references mainly at high noise (low noise: x_t shows the subject)
        u = torch.rand(n_t, generator=gen, dtype=torch.float64)
        t = (num_timesteps * (1 - u**cfg.timestep_power)).long().clamp_(0, num_timesteps - 1)
    if cfg.timestep_per == "set":
        t = per_set(t)
    return dict(
        t=t,
        noise=torch.randn((N, *latent_shape), generator=gen),
        ng_mask=sample_ng_mask(N, G, gen, p=cfg.p_mask),
        drop_text=per_set(torch.rand(n_sets, generator=gen) < cfg.p_drop_text),
        drop_ref=per_set(torch.rand(n_sets, generator=gen) < cfg.p_drop_ref),
    )


def jedi_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, captions, G: int, rnd: dict, cfg: TrainConfig,
              context: torch.Tensor | None = None, null_context: torch.Tensor | None = None):
    """JeDi's denoising loss on one local batch, as a *sum* over images (the caller normalizes).

    Args:
        model: Denoiser (or DDP around one).
        schedule: NoiseSchedule.
        x0: (N, C, h, w) clean latents, N = B*G.
        captions: list of N strings (ignored when context is given).
        G: set size.
        rnd: this batch's rows of ``draw_randoms`` (on x0's device).
        cfg: loss_on, loss_weighting.
        context: optional precomputed (N, T, D) text context; dropped rows take ``null_context`` (1, T, D).

    Returns:
        (loss_sum, weight_sum): scalar float32 sum of per-image MSE times its weight (1, or ng_mask when
        loss_on == "masked"), and the sum of weights.
    """
    mask = rnd["ng_mask"]
    x_t = schedule.q_sample(x0, rnd["t"], rnd["noise"])
    # image guidance training: the set's reference content is dropped (masked-x0 channels -> 0), mask kept
    x0_in = torch.where(rnd["drop_ref"].view(-1, 1, 1, 1), torch.zeros_like(x0), x0)
    if context is None:
        captions = ["" if d else c for c, d in zip(captions, rnd["drop_text"].tolist())]
    else:
        context = torch.where(rnd["drop_text"].view(-1, 1, 1), null_context.to(context), context)
    eps = model(x_t, rnd["t"], captions, x0=x0_in, ng_mask=mask, set_size=G, context=context)
    per_image = F.mse_loss(eps.float(), rnd["noise"].float(), reduction="none").flatten(1).mean(1)  # (N,)
    if cfg.loss_weighting == "v":
        # |v err|^2 = |eps err|^2 / abar_t = (1 + 1/SNR) |eps err|^2: plain eps-MSE weights x0 errors by SNR, which
        # all but ignores the high-noise steps where the references are the only source of the subject's identity
        per_image = per_image / schedule.alphas_cumprod_on(per_image.device)[rnd["t"]].float()
    w = mask.float() if cfg.loss_on == "masked" else torch.ones_like(per_image)
    return (per_image * w).sum(), w.sum()


# ---- checkpoints ------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, ema: EMA | None, state: dict, keep: int) -> Path:
    """Write ``ckpt_root/step_XXXXXXX/`` (model.safetensors, ema.safetensors, state.pt) atomically.

    The folder is filled under a temporary name and renamed into place, then ``latest`` is replaced; a process
    killed at any point leaves the previous checkpoint and ``latest`` intact.
    """
    from safetensors.torch import save_file

    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write(ckpt_root / "latest", lambda p: p.write_text(final.name))
    if keep > 0:
        for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder under ``out/checkpoints`` (via ``latest``), or None."""
    root = Path(out) / "checkpoints"
    f = root / "latest"
    if f.is_file() and (root / f.read_text().strip() / "state.pt").is_file():
        return root / f.read_text().strip()
    done = sorted(p for p in root.glob("step_*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(path, model: nn.Module | None = None, *, ema: bool = False) -> dict:
    """Load a checkpoint folder's weights into ``model`` (EMA weights when ``ema``) and return its state dict.

    Raises:
        FileNotFoundError: no checkpoint there (or no EMA weights when asked for).
    """
    from safetensors.torch import load_file

    path = Path(path)
    f = path / ("ema.safetensors" if ema else "model.safetensors")
    if not f.is_file():
        raise FileNotFoundError(f"no {f.name} in {path}")
    if model is not None:
        sd = load_file(str(f))
        if ema:
            model.load_state_dict({**model.state_dict(), **sd})
        else:
            model.load_state_dict(sd)
    return torch.load(path / "state.pt", weights_only=False)


# ---- logging ----------------------------------------------------------------------------------------------------
_CSV_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"]


class _Logger:
    """CSV log (flushed per row, so a killed run keeps its rows) and TensorBoard when installed."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = out / "log.csv"
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:  # drop rows a killed run wrote after its last checkpoint
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            _atomic_write(self.path, lambda p: self._write_rows(p, rows))
        elif not self.path.is_file() or resume_step is None:
            self._write_rows(self.path, [])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed: logging to %s only", self.path)

    @staticmethod
    def _write_rows(path: Path, rows: list[dict]) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=_CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- the loop ---------------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded permutation per epoch) that can skip the first ``skip`` batches of an epoch."""

    def __init__(self, dataset, batch_size: int, **kw):
        super().__init__(dataset, **kw)
        self.batch_size, self.skip = batch_size, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip * self.batch_size:])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip * self.batch_size)


@dataclass
class TrainResult:
    """What ``train`` hands back: the trained Denoiser (unwrapped), its EMA, per-step losses, last checkpoint."""

    model: Denoiser
    ema: EMA | None
    losses: dict[int, float]
    checkpoint: Path | None
    wall_s: float


def _dist_env() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    d = torch.device(cfg.device)
    if d.type == "cuda" and (world > 1 or d.index is None):
        d = torch.device(f"cuda:{local_rank}")
    return d


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision=fp16 needs CUDA (use bf16 on CPU)")
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(cfg: TrainConfig, *, model: Denoiser | None = None, encode=None, resume: bool = False,
          dataset=None) -> TrainResult:
    """Run (or resume) a JeDi training run; see the module docstring for what one step does.

    Args:
        cfg: TrainConfig.
        model: optional Denoiser to train (default: ``build_model(cfg)``); on resume it must match the checkpoint.
        encode: latent encoder callable (N, 3, H, W) in [-1, 1] -> (N, C, h, w); default ``PixelLatent``.
            Unused with a latent cache.
        resume: continue from the newest checkpoint in ``cfg.out/checkpoints`` (starts fresh if there is none).
        dataset: optional dataset (default: ``ImageSetDataset(cfg.data, cfg.resolution, ...)``).

    Returns:
        TrainResult (on every rank; checkpoints and logs are written by rank 0).

    Raises:
        ValueError: bad config, empty dataset, fewer sets than one global batch, fp16 on CPU, checkpoints of an
            earlier run in ``cfg.out`` without ``resume``.
    """
    rank, world, local_rank = _dist_env()
    owns_group = world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, model, encode, resume, dataset, rank, world, local_rank)
    finally:  # leave the process as we found it (tests and notebooks call train() repeatedly)
        torch.use_deterministic_algorithms(was_deterministic)
        if owns_group:
            torch.distributed.destroy_process_group()


def _train(cfg, model, encode, resume, dataset, rank, world, local_rank) -> TrainResult:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = _device(cfg, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.manual_seed(cfg.seed)  # model init: identical on every rank
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    if dataset is None:
        dataset = ImageSetDataset(cfg.data, cfg.resolution, skip_bad=cfg.skip_bad, latent_cache=cfg.latent_cache)
    global_sets = cfg.batch_size * world
    if len(dataset) < global_sets:
        raise ValueError(f"dataset has {len(dataset)} sets, fewer than one global batch ({global_sets})")
    encode = encode or PixelLatent(cfg.latent_downsample)
    null_context = getattr(dataset, "null_context", None)  # set when a latent cache holds text contexts
    if model is None:
        model = build_model(cfg, text=null_context is None)
    model.to(device)
    if cfg.grad_checkpointing and hasattr(model.unet, "enable_gradient_checkpointing"):
        model.unet.enable_gradient_checkpointing()
    schedule = NoiseSchedule.scaled_linear()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and device.type == "cuda")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None  # shadow lives on the model's device

    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    step = 0
    ckpt = latest_checkpoint(out) if resume else None
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} holds checkpoints of an earlier run: pass resume=True (--resume) or a new out folder")
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)
        if ema is not None:
            from safetensors.torch import load_file

            ema.shadow = {k: v.to(device) for k, v in load_file(str(ckpt / "ema.safetensors")).items()}
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step = state["step"]
        changed = [k for k in ("batch_size", "grad_accum", "seed", "data", "timestep_per", "p_mask")
                   if state["config"].get(k) != getattr(cfg, k)]
        if changed:
            log.warning("resuming %s with changed %s: the run will not match an uninterrupted one", ckpt, changed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp_step_*"):  # leftovers of a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    logger = _Logger(out, step if resume else None) if rank == 0 else None

    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = ResumableSampler(dataset, cfg.batch_size, num_replicas=world, rank=rank, shuffle=True,
                               seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_sets,
                        num_workers=cfg.num_workers, drop_last=True)
    per_epoch = len(dataset) // world // cfg.batch_size  # micro-batches per epoch (per process)
    micro = step * cfg.grad_accum  # micro-batches consumed so far
    losses: dict[int, float] = {}
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress or rank != 0, desc="train",
                dynamic_ncols=True)
    model.train()
    acc_loss, t_log, imgs = 0.0, time.perf_counter(), 0
    while step < cfg.max_steps:
        sampler.set_epoch(micro // per_epoch)
        sampler.skip = micro % per_epoch
        for batch in loader:
            images, captions, G = batch[0], batch[1], batch[2]
            context = batch[3].to(device) if len(batch) > 3 else None
            with torch.no_grad():
                x0 = images.to(device) if cfg.latent_cache else encode(images.to(device)).float()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro)
            rnd_all = draw_randoms(gen, global_sets, G, x0.shape[1:], cfg, schedule.num_steps)
            # this process's sets are global positions j*world + rank (DistributedSampler interleaves ranks)
            rows = ((torch.arange(cfg.batch_size) * world + rank)[:, None] * G + torch.arange(G)).flatten()
            rnd = {k: v[rows].to(device) for k, v in rnd_all.items()}
            w_all = rnd_all["ng_mask"].float().sum() if cfg.loss_on == "masked" else float(rnd_all["t"].numel())
            denom = max(float(w_all), 1.0)
            last_micro = (micro + 1) % cfg.grad_accum == 0
            sync = contextlib.nullcontext() if (last_micro or world == 1) else ddp.no_sync()
            with sync:
                with _autocast(cfg, device):
                    loss_sum, _ = jedi_loss(ddp, schedule, x0, captions, G, rnd, cfg, context, null_context)
                # DDP averages gradients over ranks, so world * local_sum / global_weight gives the global mean
                scaler.scale(loss_sum * (world / denom / cfg.grad_accum)).backward()
            acc_loss += float(loss_sum.detach()) / denom / cfg.grad_accum
            imgs += images.shape[0] * world
            micro += 1
            if not last_micro:
                continue
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
            if world > 1:
                t = torch.tensor([acc_loss], device=device)
                torch.distributed.all_reduce(t)
                acc_loss = float(t)
            losses[step] = acc_loss
            pbar.update(1)
            pbar.set_postfix(loss=f"{acc_loss:.4f}")
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.perf_counter()
                logger.log(dict(step=step, loss=repr(acc_loss), lr=sched.get_last_lr()[0], grad_norm=float(gnorm),
                                images_per_s=round(imgs / max(now - t_log, 1e-9), 2),
                                elapsed_s=round(now - t_start, 2)))
                t_log, imgs = now, 0
            acc_loss = 0.0
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps:
                if rank == 0:
                    state = dict(step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                 scaler=scaler.state_dict(), rng=_rng_state(), config=dataclasses.asdict(cfg))
                    ckpt = save_checkpoint(ckpt_root, step, model, ema, state, cfg.keep_checkpoints)
                if world > 1:
                    torch.distributed.barrier()
            if step >= cfg.max_steps:
                break
    pbar.close()
    if logger is not None:
        logger.close()
    return TrainResult(model=model, ema=ema, losses=losses, checkpoint=ckpt, wall_s=time.perf_counter() - t_start)


def load_model(path, *, ema: bool = True, device="cpu") -> Denoiser:
    """Rebuild the Denoiser of a checkpoint folder from its saved TrainConfig and load its (EMA) weights.

    Returns:
        Denoiser in eval mode on ``device``. EMA weights when ``ema`` and the run kept an EMA, else the raw ones.
    """
    state = torch.load(Path(path) / "state.pt", weights_only=False)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg, text="text.token_emb.weight" in _keys(Path(path) / "model.safetensors"))
    load_checkpoint(path, model, ema=ema and (Path(path) / "ema.safetensors").is_file())
    return model.to(device).eval()


def _keys(f: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        return set(h.keys())


def ema_model(result: TrainResult) -> Denoiser:
    """A copy of the trained Denoiser carrying the EMA weights (the model itself when EMA is off), in eval mode."""
    m = copy.deepcopy(result.model)
    if result.ema is not None:
        result.ema.copy_to(m)
    return m.eval()
