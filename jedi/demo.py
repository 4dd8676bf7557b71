"""``jedi demo``: train a tiny JeDi on synthetic same-subject sets on the CPU, then personalize unseen subjects.

1. Write a synthetic dataset of ``train_sets`` subjects (``jedi.synthetic``).
2. Train a tiny JeDi UNet on it with the real training loop (``jedi.train.train``), pixel space (``PixelLatent``),
   16 px. Deviations from SD-v1 training, all needed to learn from scratch in minutes on a CPU: v-prediction with
   the v loss (eps-prediction from scratch never learns the high-noise steps where the reference matters), caption
   dropout 0.5, and joint attention at 8x8/4x4 only (UNetConfig.tiny(attention_resolutions=(2, 4))).
3. For K held-out subjects (never in training), give ONE reference image per set and generate the other G-1
   images with DDIM (``jedi.schedule.ddim_sample``, image guidance 3); the baseline is the same sampler, same
   seeds, with the reference nulled (ng_mask = 1 for all images, x0 = 0; guidance then changes nothing). Both use
   the empty caption, so any identity in the output can only come from the reference image.
4. Score identity preservation: nearest-subject retrieval of every generated image among the K held-out subjects
   with a fixed hand-made feature (``subject_feature``); chance is 1/K.

Outputs in ``--out``: ``grid.png`` (one row per held-out subject: reference | JeDi generations | baseline
generations), ``metrics.json``, ``data/`` (the training sets) and ``run/`` (checkpoints, log.csv).
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jedi.schedule import NoiseSchedule, ddim_sample
from jedi.synthetic import PALETTE, make_scene, make_subject, render, write_synthetic_dataset
from jedi.train import PixelLatent, TrainConfig, ema_model, train

__all__ = ["DemoConfig", "subject_feature", "retrieval_accuracy", "run_demo", "personalize"]

_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # (P, 3)


@dataclass
class DemoConfig:
    """Sizes and recipe of the demo (about 7 min on 2 CPU cores); ``quick()`` is the seconds-long smoke test."""

    train_sets: int = 1024
    set_size: int = 3
    resolution: int = 16
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    p_drop_text: float = 0.5  # caption dropout; the demo samples with the empty caption, so it must be trained
    timestep_power: float = 1.0  # > 1 favours high-noise timesteps in training (see TrainConfig)
    # from scratch, eps-prediction never learns the high-noise steps where identity comes from the reference (its
    # x0 estimate there is 15x its eps error); v-prediction with the v loss does (see TrainConfig.prediction)
    loss_weighting: str = "v"
    prediction: str = "v"
    ckpt_every: int = 0
    # tiny with joint attention at 8x8 and 4x4 only (not 16x16): 2x faster on CPU, same identity transfer
    unet: dict = dataclasses.field(default_factory=lambda: {"attention_resolutions": [2, 4]})
    heldout: int = 8  # K subjects never seen in training
    reps: int = 4  # sets sampled per held-out subject (each: 1 reference + G-1 generated)
    sample_steps: int = 25
    image_guidance: float = 3.0  # JeDi image guidance scale at sampling (1 = none); the baseline is unaffected
    clip_x0: float | None = 1.0  # pixel space: predicted x0 clamped to [-1, 1] while sampling
    proto_renders: int = 16  # real renders per subject that define its retrieval prototype
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "cpu"  # the demo is a CPU story; "cuda" works too

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A smoke-test configuration (seconds on 2 cores): metrics are not meaningful at this size."""
        return cls(train_sets=16, steps=8, batch_size=2, warmup_steps=2, heldout=3, reps=1, sample_steps=3,
                   proto_renders=4, image_guidance=2.0)


# ---- identity feature -------------------------------------------------------------------------------------------
def subject_feature(img: np.ndarray) -> np.ndarray:
    """Fixed identity descriptor of one image: foreground palette-colour histogram + a shape descriptor.

    Foreground = pixels farther than 80 (RGB, 0-255) from the background colour, estimated as the median of the
    border pixels. Colour: fraction of foreground pixels nearest to each palette colour (P values). Shape:
    foreground fill ratio of its bounding box and the box's aspect ratio (both scale- and position-invariant).

    Args:
        img: (h, w, 3) uint8 image.

    Returns:
        (P + 2,) float32 feature; all zeros when no foreground is found.
    """
    x = img.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])  # (4*side, 3)
    bg = np.median(border, axis=0)
    fg = np.linalg.norm(x - bg, axis=-1) > 80.0  # (h, w)
    feat = np.zeros(len(_PALETTE_RGB) + 2, dtype=np.float32)
    if fg.sum() < 2:
        return feat
    px = x[fg]  # (n, 3)
    nearest = np.linalg.norm(px[:, None] - _PALETTE_RGB[None], axis=-1).argmin(1)
    feat[: len(_PALETTE_RGB)] = np.bincount(nearest, minlength=len(_PALETTE_RGB)) / len(px)
    ys, xs = np.nonzero(fg)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    feat[-2] = fg.sum() / (bh * bw)
    feat[-1] = min(bh, bw) / max(bh, bw)
    return feat


def retrieval_accuracy(feats: np.ndarray, labels: np.ndarray, prototypes: np.ndarray) -> float:
    """Fraction of images whose nearest prototype (L1) is their own subject.

    Args:
        feats: (n, F) features of images; labels: (n,) int subject index; prototypes: (K, F).
    """
    d = np.abs(feats[:, None] - prototypes[None]).sum(-1)  # (n, K)
    return float((d.argmin(1) == labels).mean()) if len(feats) else 0.0


# ---- demo steps -------------------------------------------------------------------------------------------------
def _heldout_subjects(k: int, seen: list, seed: int) -> list:
    """k distinct subjects that are not among the training subjects."""
    rng, seen, out = random.Random(seed + 7919), set(seen), []
    while len(out) < k:
        s = make_subject(rng)
        if s not in seen and s not in out:
            out.append(s)
    return out


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, h, w) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(127.5).sub(1)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [-1, 1] -> (h, w, 3) uint8."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()


def _grid(rows: list[list[np.ndarray]], scale: int = 4, gap: int = 2) -> Image.Image:
    """Rows of equally sized (h, w, 3) images -> one image; a wider gap separates the three column groups."""
    h, w = rows[0][0].shape[:2]
    ncol = len(rows[0])
    canvas = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + 4 * gap, 3), 255, np.uint8)
    groups = [0] + [1] * ((ncol - 1) // 2) + [2] * ((ncol - 1) // 2)  # ref | generated | baseline
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = gap + r * (h + gap), gap + c * (w + gap) + 2 * gap * groups[c]
            canvas[y:y + h, x:x + w] = im
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def run_demo(out, cfg: DemoConfig | None = None, *, progress: bool = True) -> dict:
    """Run the whole demo (dataset, training, personalization, scoring) and write grid.png + metrics.json.

    Args:
        out: output folder (created).
        cfg: DemoConfig (default: the full demo).
        progress: tqdm bars for training and sampling.

    Returns:
        The metrics dict written to ``metrics.json``: jedi_accuracy, baseline_accuracy, chance, real_accuracy
        (retrieval accuracy of real renders: the feature's ceiling), K, n_generated, final_loss, timings, config.
    """
    cfg = cfg or DemoConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    G, R = cfg.set_size, cfg.resolution
    seen = write_synthetic_dataset(out / "data", cfg.train_sets, G, R, seed=cfg.seed)

    tcfg = TrainConfig(data=str(out / "data"), out=str(out / "run"), resolution=R, batch_size=cfg.batch_size,
                       max_steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay,
                       p_drop_text=cfg.p_drop_text, timestep_power=cfg.timestep_power, unet=dict(cfg.unet),
                       loss_weighting=cfg.loss_weighting, prediction=cfg.prediction,
                       seed=cfg.seed, log_every=max(1, cfg.steps // 100), ckpt_every=cfg.ckpt_every,
                       keep_checkpoints=0, progress=progress, device=cfg.device)
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo owns its run folder: a rerun starts fresh
    result = train(tcfg)
    t_train = time.perf_counter()
    metrics = personalize(ema_model(result), cfg, out, seen, progress=progress)
    tail = sorted(result.losses)[-max(1, cfg.steps // 20):]  # mean loss of the last 5% of steps
    metrics.update(final_loss=float(np.mean([result.losses[s] for s in tail])),
                   train_wall_s=round(t_train - t0, 2), total_wall_s=round(time.perf_counter() - t0, 2),
                   config=dataclasses.asdict(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def personalize(model, cfg: DemoConfig, out, seen: list, *, progress: bool = True) -> dict:
    """Personalize K held-out subjects with a trained Denoiser and score identity; writes ``out/grid.png``.

    Args:
        model: trained ``jedi.train.Denoiser`` (eval mode, on ``cfg.device``), pixel latent space.
        cfg: DemoConfig (heldout, reps, set_size, resolution, sample_steps, image_guidance, seed).
        out: output folder.
        seen: training subjects (held-out subjects are drawn outside them).

    Returns:
        dict with jedi_accuracy, baseline_accuracy, chance, real_accuracy, K, n_generated, sample_wall_s, notes.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    G, R = cfg.set_size, cfg.resolution
    subjects = _heldout_subjects(cfg.heldout, seen, cfg.seed)
    rng = random.Random(cfg.seed + 104729)
    refs, labels = [], []
    for k, s in enumerate(subjects):
        for _ in range(cfg.reps):
            refs.append(render(s, make_scene(rng, s), R))
            labels.append(k)
    B, dev = len(refs), torch.device(cfg.device)
    latent = PixelLatent(1)
    x0 = torch.zeros(B * G, latent.channels, R, R)
    x0[::G] = latent.encode(torch.stack([_to_tensor(im) for im in refs]))  # image 0 of every set is the reference
    mask = torch.ones(B * G, dtype=torch.bool)
    mask[::G] = False
    x0, mask = x0.to(dev), mask.to(dev)
    schedule = NoiseSchedule.scaled_linear()
    with torch.no_grad():
        context = model.text([""] * (B * G))  # null caption: identity may only come from the reference
    runs = {}
    for name, (m, x) in tqdm({"jedi": (mask, x0), "baseline": (torch.ones_like(mask), torch.zeros_like(x0))}.items(),
                             desc="sample", disable=not progress):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # same noise for both: only the reference differs
        y = ddim_sample(model.eps, schedule, context, x0=x, ng_mask=m, set_size=G, steps=cfg.sample_steps,
                        generator=gen, image_guidance=cfg.image_guidance, clip_x0=cfg.clip_x0)
        y = y.view(B, -1, *y.shape[1:])[:, -(G - 1):]  # (B, G-1, C, h, w): the slots generated in both runs
        runs[name] = [[_to_uint8(img) for img in latent.decode(s).cpu()] for s in y]

    # ---- identity retrieval ----
    proto_rng = random.Random(cfg.seed + 15485863)
    prototypes = np.stack([np.mean([subject_feature(np.asarray(render(s, make_scene(proto_rng, s), R)))
                                    for _ in range(cfg.proto_renders)], axis=0) for s in subjects])
    gen_labels = np.repeat(np.array(labels), G - 1)

    def acc(images):
        return retrieval_accuracy(np.stack([subject_feature(im) for im in images]), gen_labels, prototypes)

    real = [np.asarray(render(subjects[k], make_scene(proto_rng, subjects[k]), R))
            for k in labels for _ in range(G - 1)]
    rows = [[np.asarray(refs[b])] + runs["jedi"][b] + runs["baseline"][b] for b in range(B)]
    Path(out).mkdir(parents=True, exist_ok=True)
    _grid(rows).save(Path(out) / "grid.png")
    return dict(
        jedi_accuracy=acc([im for s in runs["jedi"] for im in s]),
        baseline_accuracy=acc([im for s in runs["baseline"] for im in s]),
        chance=1.0 / cfg.heldout,
        real_accuracy=acc(real),
        K=cfg.heldout,
        n_generated=int(len(gen_labels)),
        sample_wall_s=round(time.perf_counter() - t0, 2),
        feature="foreground palette-colour histogram (L1) + bbox fill ratio and aspect (jedi.demo.subject_feature)",
        prompt="empty caption for both runs; baseline = same sampler and noise, ng_mask=1 for all and x0=0",
    )
