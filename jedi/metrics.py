"""Personalization metrics of the seed: CLIP-T, CLIP-I, DINO and their subject-masked variants MCLIP-I, MDINO.

* CLIP-T: cosine between each generated image's CLIP image embedding and its prompt's CLIP text embedding.
* CLIP-I / DINO: cosine between generated and real images of the subject (CLIP ViT-B/32 image embeddings / DINO
  ViT-S/16 CLS tokens), averaged over all (generated, real) pairs, then over all choices of input image(s).
* MCLIP-I / MDINO: the same on subject-masked images (background replaced by a fill colour), so that copying the
  reference's background does not score; masks come from the user or a pluggable segmenter callable.

Models load with transformers from local folders (``CLIPModel`` + ``CLIPTokenizer``; ``ViTModel``), e.g. copies of
``openai/clip-vit-base-patch32`` and ``facebook/dino-vits16``.

Preprocessing (torch + PIL, no image processor files needed):

* CLIP: RGB, resize the shorter side to S = ``vision_config.image_size`` (224) with bicubic, center-crop S x S,
  scale to [0, 1], normalize with mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258,
  0.27577711) (OpenAI CLIP's).
* DINO: RGB, resize the shorter side to round(S * 256 / 224) (256 for S = 224) with bicubic, center-crop S x S,
  [0, 1], normalize with ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (DINO's eval transform).

``jedi eval`` is :func:`eval_main`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "preprocess", "ClipScorer", "DinoScorer",
           "mean_pairwise_cosine", "image_score", "text_score", "apply_mask", "evaluate", "eval_main",
           "build_eval_parser"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Segmenter = Callable[[Image.Image], "Image.Image | np.ndarray"]


# ---- preprocessing --------------------------------------------------------------------------------------------------
def _rgb(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        with Image.open(img) as im:
            img = im.copy()
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(img).__name__}")
    return img.convert("RGB")


def preprocess(images: Sequence, *, resize: int, crop: int, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """PIL images (or paths) -> (N, 3, crop, crop) float32, normalized.

    Each image: RGB; shorter side resized to ``resize`` (bicubic, aspect kept); center crop ``crop``; [0, 1];
    ``(x - mean) / std`` per channel.

    Raises:
        ValueError: no images. TypeError: an item that is neither a PIL image nor a path.
    """
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    out = []
    for img in images:
        img = _rgb(img)
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    x = torch.stack(out).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor, >= 5 a ModelOutput with them as pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP image and text embeddings (L2-normalized) for CLIP-T / CLIP-I.

    Args:
        model: transformers ``CLIPModel`` (ViT-B/32 for the seed's numbers).
        tokenizer: the matching ``CLIPTokenizer`` (needed for text embeddings only).
        batch_size: images per forward.
    """

    def __init__(self, model, tokenizer=None, *, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.size = int(model.config.vision_config.image_size)

    @classmethod
    def from_folder(cls, path, *, device=None, **kw) -> "ClipScorer":
        """Load ``CLIPModel`` + ``CLIPTokenizer`` from a local folder (``local_files_only``)."""
        from transformers import CLIPModel, CLIPTokenizer

        p = _local_dir(path, "CLIP")
        return cls(CLIPModel.from_pretrained(str(p), local_files_only=True).to(device),
                   CLIPTokenizer.from_pretrained(str(p), local_files_only=True), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """N images -> (N, projection_dim) float32 unit vectors (CLIP preprocessing, see module doc)."""
        return _embed_batched(
            images, self.batch_size, self.device,
            lambda ims: preprocess(ims, resize=self.size, crop=self.size, mean=CLIP_MEAN, std=CLIP_STD),
            lambda x: _features(self.model.get_image_features(pixel_values=x)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings -> (N, projection_dim) float32 unit vectors (tokens truncated to the model's context length)."""
        if self.tokenizer is None:
            raise ValueError("ClipScorer needs a tokenizer for text embeddings")
        T = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=T, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc.input_ids.to(self.device),
                                           attention_mask=enc.attention_mask.to(self.device))
        return F.normalize(_features(out).float(), dim=-1).cpu()


class DinoScorer:
    """DINO ViT CLS embeddings (L2-normalized) for the DINO metric.

    Args:
        model: transformers ``ViTModel`` (DINO ViT-S/16 for the seed's numbers); the CLS token of
            ``last_hidden_state`` is the embedding (no pooler).
        batch_size: images per forward.
    """

    def __init__(self, model, *, batch_size: int = 32):
        self.model, self.batch_size = model.eval(), batch_size
        self.size = int(model.config.image_size)

    @classmethod
    def from_folder(cls, path, *, device=None, **kw) -> "DinoScorer":
        """Load a ``ViTModel`` from a local folder (``local_files_only``, no pooling layer)."""
        from transformers import ViTModel

        p = _local_dir(path, "DINO")
        return cls(ViTModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False).to(device), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """N images -> (N, hidden_size) float32 unit vectors (DINO preprocessing, see module doc)."""
        return _embed_batched(
            images, self.batch_size, self.device,
            lambda ims: preprocess(ims, resize=round(self.size * 256 / 224), crop=self.size, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD),
            lambda x: self.model(pixel_values=x).last_hidden_state[:, 0])


def _embed_batched(images: Sequence, batch_size: int, device, prep, forward) -> torch.Tensor:
    """Embed images in batches: ``prep`` (PIL list -> (n, 3, S, S)), ``forward`` (pixels -> (n, E)); returns the
    (N, E) float32 L2-normalized embeddings on the CPU."""
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(forward(prep(images[i:i + batch_size]).to(device)).float())
    return F.normalize(torch.cat(outs), dim=-1).cpu()


def _local_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} model folder {p} does not exist (hub ids are not resolved: download the "
                                f"weights and pass their folder)")
    return p


# ---- scores ---------------------------------------------------------------------------------------------------------
def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all (row of a, row of b) pairs.

    Args:
        a: (n, d), b: (m, d) float embeddings (normalized here).

    Returns:
        mean_{i,j} cos(a_i, b_j) as a Python float.

    Raises:
        ValueError: empty inputs or different widths.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need non-empty (n, d) and (m, d) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean())


def image_score(generated: Sequence[torch.Tensor], real: torch.Tensor) -> float:
    """CLIP-I / DINO averaging: pair-wise against all real images of the subject, then over the input choices.

    Args:
        generated: one (n_c, d) embedding tensor per choice of input image(s) c (the images generated from it).
        real: (m, d) embeddings of all real images of the subject.

    Returns:
        ``mean_c mean_{i, j} cos(generated[c]_i, real_j)``: every choice weighs the same, whatever its n_c.
    """
    if len(generated) == 0:
        raise ValueError("image_score needs at least one choice of input image")
    return float(np.mean([mean_pairwise_cosine(g, real) for g in generated]))


def text_score(generated: Sequence[torch.Tensor], prompts: Sequence[torch.Tensor]) -> float:
    """CLIP-T averaging: each generated image against its own prompt, mean per choice, then over choices.

    Args:
        generated: one (n_c, d) image-embedding tensor per choice c.
        prompts: one (d,) or (1, d) text embedding per choice (the prompt its images were generated with).

    Returns:
        ``mean_c mean_i cos(generated[c]_i, prompt_c)``.
    """
    if len(generated) == 0 or len(generated) != len(prompts):
        raise ValueError(f"need one prompt embedding per choice, got {len(generated)} choices and {len(prompts)}")
    return float(np.mean([mean_pairwise_cosine(g, p.reshape(1, -1)) for g, p in zip(generated, prompts)]))


def apply_mask(image, mask, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Keep the subject, replace the background by ``fill``.

    Args:
        image: PIL image or path.
        mask: PIL image (any mode; converted to L) or (H, W) array, nonzero/True = subject; resized (nearest) to the
            image if sizes differ.
        fill: RGB background colour (default black).

    Returns:
        RGB PIL image of the image's size.
    """
    img = _rgb(image)
    if isinstance(mask, (str, Path)):
        with Image.open(mask) as m:
            mask = m.copy()
    if isinstance(mask, Image.Image):
        m = mask.convert("L")
    else:
        arr = np.asarray(mask)
        if arr.ndim != 2:
            raise ValueError(f"mask must be (H, W), got shape {arr.shape}")
        m = Image.fromarray(((arr > 0) * 255).astype(np.uint8))
    if m.size != img.size:
        m = m.resize(img.size, Image.Resampling.NEAREST)
    keep = np.asarray(m) > 127
    out = np.asarray(img).copy()
    out[~keep] = fill
    return Image.fromarray(out)


@dataclass
class _Masks:
    generated: list | None
    real: list | None


def evaluate(generated: Sequence[Sequence], real: Sequence, prompts: str | Sequence[str] | None = None, *,
             clip: ClipScorer | None = None, dino: DinoScorer | None = None,
             generated_masks: Sequence[Sequence] | None = None, real_masks: Sequence | None = None,
             segmenter: Segmenter | None = None, fill=(0, 0, 0)) -> dict[str, float]:
    """Score the images generated for one subject.

    Args:
        generated: one list of images per choice of input image(s) (PIL images or paths).
        real: all real images of the subject.
        prompts: the prompt of every choice (one string for all); needed for CLIP-T.
        clip: :class:`ClipScorer` for clip_t / clip_i / mclip_i (None: skipped).
        dino: :class:`DinoScorer` for dino / mdino (None: skipped).
        generated_masks, real_masks: subject masks mirroring ``generated`` / ``real`` (see :func:`apply_mask`).
        segmenter: ``segmenter(image) -> mask``, used for every image whose mask is not given.
        fill: background colour of masked images.

    Returns:
        {"clip_t", "clip_i", "mclip_i", "dino", "mdino", "n_generated", "n_real", "n_choices"}: the keys whose
        scorer (and, for the M-variants, masks or segmenter) are available.

    Raises:
        ValueError: empty inputs, mismatched mask lists, CLIP-T without prompts.
    """
    generated = [list(g) for g in generated]
    real = list(real)
    if not generated or any(not g for g in generated) or not real:
        raise ValueError("need at least one choice with generated images and at least one real image")
    out: dict[str, float] = {"n_choices": len(generated), "n_generated": sum(map(len, generated)),
                             "n_real": len(real)}
    sizes = [len(g) for g in generated]

    def split(emb: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(emb, sizes))

    flat = [im for g in generated for im in g]
    masked = None
    if generated_masks is not None or real_masks is not None or segmenter is not None:
        gm = [m for ms in generated_masks for m in ms] if generated_masks is not None else [None] * len(flat)
        rm = list(real_masks) if real_masks is not None else [None] * len(real)
        if len(gm) != len(flat) or len(rm) != len(real):
            raise ValueError(f"masks must mirror the images: {len(gm)} generated masks for {len(flat)} images, "
                             f"{len(rm)} real masks for {len(real)} images")
        if segmenter is None and (any(m is None for m in gm) or any(m is None for m in rm)):
            raise ValueError("masked metrics need a mask for every image (or a segmenter for the missing ones)")

        def mask_all(images, masks):
            return [apply_mask(im, m if m is not None else segmenter(_rgb(im)), fill) for im, m in zip(images, masks)]

        masked = _Masks(mask_all(flat, gm), mask_all(real, rm))
    if clip is not None:
        g = clip.embed_images(flat)
        out["clip_i"] = image_score(split(g), clip.embed_images(real))
        if prompts is not None:
            ps = [prompts] * len(generated) if isinstance(prompts, str) else list(prompts)
            if len(ps) != len(generated):
                raise ValueError(f"need one prompt per choice: {len(ps)} prompts for {len(generated)} choices")
            out["clip_t"] = text_score(split(g), list(clip.embed_texts(ps)))
        if masked is not None:
            out["mclip_i"] = image_score(split(clip.embed_images(masked.generated)), clip.embed_images(masked.real))
    if dino is not None:
        out["dino"] = image_score(split(dino.embed_images(flat)), dino.embed_images(real))
        if masked is not None:
            out["mdino"] = image_score(split(dino.embed_images(masked.generated)), dino.embed_images(masked.real))
    return out


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _mask_for(mask_root: Path | None, rel: Path) -> Path | None:
    """The mask of image ``rel`` under ``mask_root``: same relative folder and stem, any image extension."""
    if mask_root is None:
        return None
    folder = mask_root / rel.parent
    for ext in IMAGE_EXTS:
        if (folder / (rel.stem + ext)).is_file():
            return folder / (rel.stem + ext)
    return None


def _load_callable(spec: str):
    mod, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--segmenter must be module:function, got {spec!r}")
    return getattr(importlib.import_module(mod), attr)


def build_eval_parser(prog: str = "jedi eval") -> argparse.ArgumentParser:
    """argparse parser of ``jedi eval``."""
    p = argparse.ArgumentParser(prog=prog, description="CLIP-T, CLIP-I, DINO (and MCLIP-I, MDINO) of one subject")
    p.add_argument("--generated", required=True,
                   help="folder of generated images, or of subfolders (one per choice of input image); a "
                        "prompt.txt in a folder gives its prompt")
    p.add_argument("--real", required=True, help="folder of all real images of the subject")
    p.add_argument("--prompt", help="prompt of the generated images (a folder's prompt.txt overrides it)")
    p.add_argument("--clip", help="local CLIPModel + tokenizer folder (e.g. clip-vit-base-patch32)")
    p.add_argument("--dino", help="local ViTModel folder (e.g. dino-vits16)")
    p.add_argument("--generated-masks", help="masks mirroring --generated (same relative paths and stems)")
    p.add_argument("--real-masks", help="masks mirroring --real")
    p.add_argument("--segmenter", help="module:function, image -> mask, for images without a mask file")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    """``jedi eval``: print (and optionally write) the metrics as JSON. Returns 0, or 2 on a user error."""
    args = build_eval_parser().parse_args(argv)
    try:
        if not args.clip and not args.dino:
            raise ValueError("pass --clip and/or --dino model folders")
        gen_root, real_root = Path(args.generated), Path(args.real)
        for p in (gen_root, real_root):
            if not p.is_dir():
                raise FileNotFoundError(f"{p} is not a folder")
        subdirs = sorted(d for d in gen_root.iterdir() if d.is_dir())
        choices = subdirs if subdirs else [gen_root]
        generated, prompts, gmasks = [], [], []
        gm_root = Path(args.generated_masks) if args.generated_masks else None
        for c in choices:
            ims = _images_in(c)
            if not ims:
                raise ValueError(f"{c} holds no images ({', '.join(IMAGE_EXTS)})")
            generated.append(ims)
            txt = c / "prompt.txt"
            prompts.append(txt.read_text().strip() if txt.is_file() else args.prompt)
            gmasks.append([_mask_for(gm_root, p.relative_to(gen_root)) for p in ims])
        real = _images_in(real_root)
        rm_root = Path(args.real_masks) if args.real_masks else None
        rmasks = [_mask_for(rm_root, p.relative_to(real_root)) for p in real]
        segmenter = _load_callable(args.segmenter) if args.segmenter else None
        use_masks = gm_root is not None or rm_root is not None or segmenter is not None
        clip = ClipScorer.from_folder(args.clip, device=args.device) if args.clip else None
        dino = DinoScorer.from_folder(args.dino, device=args.device) if args.dino else None
        scores = evaluate(generated, real, prompts if all(p is not None for p in prompts) else None, clip=clip,
                          dino=dino, generated_masks=gmasks if use_masks else None,
                          real_masks=rmasks if use_masks else None, segmenter=segmenter)
    except (ValueError, FileNotFoundError, OSError, ImportError, AttributeError) as e:
        print(f"jedi eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
