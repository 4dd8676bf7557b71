"""Image-set data in the JeDi seed's format.

An image set is ONE image file holding the G square images of one subject stacked vertically (height = G * width)
and ONE text file with the G captions separated by ``<|split|>``, sharing the file stem::

    root/cat_0001.png    (3, G*w, w)
    root/cat_0001.txt    "a cat on a sofa <|split|> a cat in the grass <|split|> ..."

``ImageSetDataset`` reads such a folder, ``collate_sets`` turns a batch of sets into the per-image batch the UNet
takes (``get_group_data``), ``write_image_set`` writes the format and ``cache_latents`` precomputes latents (and
optionally text embeddings) per set as safetensors.

Set sizes: a dataset may mix set sizes, but one batch may not (the joint attention reshapes N = B * G with one G);
use batch_size 1 for mixed data, or keep one set size per folder.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["SPLIT", "IMAGE_EXTS", "ImageSetDataset", "get_group_data", "collate_sets", "write_image_set",
           "cache_latents"]

SPLIT = "<|split|>"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _split_captions(txt: str) -> list[str]:
    return [c.strip() for c in txt.split(SPLIT)]


def _check_set(img_path: Path) -> tuple[int, str]:
    """Validate one set's files; returns (G, caption text). Raises ValueError naming the bad file."""
    txt_path = img_path.with_suffix(".txt")
    if not txt_path.is_file():
        raise ValueError(f"{img_path}: caption file {txt_path.name} is missing")
    try:
        with Image.open(img_path) as im:
            w, h = im.size
            im.verify()  # checks the container (PNG CRCs, ...) without a full decode
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{img_path}: unreadable image ({e})") from e
    if w == 0 or h % w:
        raise ValueError(f"{img_path}: height {h} is not a multiple of width {w} (a set stacks square images)")
    G = h // w
    txt = txt_path.read_text(encoding="utf-8")
    n = len(_split_captions(txt))
    if n != G:
        raise ValueError(f"{txt_path}: {n} captions for a set of {G} images (captions are split on {SPLIT!r})")
    return G, txt


def _load_set(path: Path, G: int, resolution: int) -> torch.Tensor:
    """Decode a set image -> (3, G*res, res) float32 in [-1, 1], each member resized to res x res."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w = im.size[0]
        members = []
        for i in range(G):
            m = im.crop((0, i * w, w, (i + 1) * w))
            if w != resolution:
                m = m.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
            members.append(np.asarray(m))
    arr = np.concatenate(members, axis=0)  # (G*res, res, 3) uint8
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageSetDataset(Dataset):
    """Folder of image sets (image + same-stem .txt), one item per set.

    Args:
        root: folder with ``*.png|jpg|jpeg|webp`` set images and same-stem ``.txt`` caption files (not recursive).
        resolution: side of each member image after resizing (square members are resized, never cropped).
        skip_bad: False raises on the first bad set; True skips bad sets and reports them in one warning.
        latent_cache: folder written by ``cache_latents``; when given, items are read from it instead of images.

    Items:
        Without a cache: ``(image, captions)``: image (3, G*resolution, resolution) float32 in [-1, 1], captions the
        raw ``<|split|>``-joined string. With a cache: ``(latents, captions)`` with latents (C, G*h, w) (same
        vertical layout), or ``(latents, captions, context)`` with context (G, T, D) when the cache holds text
        embeddings.

    Attributes:
        set_sizes: list of G per item. bad: list of (path, reason) skipped. null_context: (1, T, D) context of the
        empty caption when the latent cache holds text contexts, else None.

    Raises:
        ValueError: root missing or empty; a bad set (height not a multiple of width, caption count != G,
            unreadable image, missing caption file), naming the file, unless skip_bad; cache entry missing.
    """

    def __init__(self, root, resolution: int, *, skip_bad: bool = False, latent_cache=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {self.root} is not a folder")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.latent_cache = Path(latent_cache) if latent_cache is not None else None
        self.paths, self.set_sizes, self.captions, self.bad = [], [], [], []
        for p in sorted(self.root.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            try:
                G, txt = _check_set(p)
            except ValueError as e:
                if not skip_bad:
                    raise
                self.bad.append((str(p), str(e)))
                continue
            self.paths.append(p)
            self.set_sizes.append(G)
            self.captions.append(txt)
        if self.bad:
            warnings.warn(f"ImageSetDataset({self.root}): skipped {len(self.bad)} bad set(s), first: {self.bad[0][1]}",
                          stacklevel=2)
        if not self.paths:
            raise ValueError(f"no valid image sets in {self.root} (expected {IMAGE_EXTS} + same-stem .txt)")
        self.null_context = None
        if self.latent_cache is not None:
            null = self.latent_cache / "_null_context.safetensors"
            if null.is_file():
                from safetensors.torch import load_file

                self.null_context = load_file(str(null))["context"]
            missing = [p.stem for p in self.paths if not (self.latent_cache / f"{p.stem}.safetensors").is_file()]
            if missing:
                raise ValueError(f"latent cache {self.latent_cache} lacks {len(missing)} set(s), e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.latent_cache is not None:
            from safetensors.torch import load_file

            d = load_file(str(self.latent_cache / f"{self.paths[i].stem}.safetensors"))
            lat = d["latents"]  # (G, C, h, w) -> (C, G*h, w), the image layout
            lat = lat.permute(1, 0, 2, 3).reshape(lat.shape[1], -1, lat.shape[3])
            if "context" in d:
                return lat, self.captions[i], d["context"]
            return lat, self.captions[i]
        return _load_set(self.paths[i], self.set_sizes[i], self.resolution), self.captions[i]


def get_group_data(img: torch.Tensor, txt: list[str]) -> tuple[torch.Tensor, list[str], int]:
    """Split a batch of vertically stacked sets into a batch of images (the seed's ``get_group_data``).

    Args:
        img: (B, C, G*w, w) tensor: B sets, each G square images stacked vertically.
        txt: list of B strings, each G captions joined by ``<|split|>``.

    Returns:
        (images, captions, G): images (B*G, C, w, w) with image i of set b at row b*G + i; captions the flat list of
        B*G captions in the same order; G the set size.

    Raises:
        ValueError: img is not 4-D, height not a multiple of width, len(txt) != B, or a caption count != G.
    """
    if img.dim() != 4:
        raise ValueError(f"img must have shape (B, C, G*w, w), got {tuple(img.shape)}")
    B, C, H, W = img.shape
    if W == 0 or H % W:
        raise ValueError(f"img height {H} must be a multiple of its width {W} (sets stack square images)")
    G = H // W
    if len(txt) != B:
        raise ValueError(f"txt must hold one caption string per set: {B} sets, got {len(txt)}")
    captions = []
    for b, t in enumerate(txt):
        caps = _split_captions(t)
        if len(caps) != G:
            raise ValueError(f"set {b}: {len(caps)} captions for {G} images (split on {SPLIT!r})")
        captions.extend(caps)
    # (B, C, G*w, w) -> (B, C, G, w, w) -> (B, G, C, w, w) -> (B*G, C, w, w)
    images = img.reshape(B, C, G, W, W).transpose(1, 2).reshape(B * G, C, W, W)
    return images, captions, G


def collate_sets(batch):
    """DataLoader collate: list of dataset items -> ``(images (B*G, C, w, w), captions (B*G,), G[, context])``.

    ``context`` (B*G, T, D) is appended when the items come from a latent cache with text embeddings.

    Raises:
        ValueError: the batch mixes set sizes (use batch_size=1 or one set size per dataset) or item kinds.
    """
    sizes = sorted({item[0].shape[1] // item[0].shape[2] for item in batch})
    if len(sizes) > 1:
        raise ValueError(f"a batch mixes set sizes {sizes}: JeDi's joint attention needs one set size per batch; "
                         "use batch_size=1 or one set size per dataset")
    if len({len(item) for item in batch}) > 1:
        raise ValueError("a batch mixes items with and without cached text context")
    images, captions, G = get_group_data(torch.stack([item[0] for item in batch]), [item[1] for item in batch])
    if len(batch[0]) == 3:
        return images, captions, G, torch.cat([item[2] for item in batch])  # (B*G, T, D)
    return images, captions, G


def _to_uint8(x) -> np.ndarray:
    """(3, h, w) float in [-1, 1] tensor or (h, w, 3) uint8 array/PIL image -> (h, w, 3) uint8."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    if isinstance(x, torch.Tensor):
        return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.asarray(x, dtype=np.uint8)


def write_image_set(images, captions: list[str], path) -> tuple[Path, Path]:
    """Write one set in the seed's format: ``<stem>.png`` (members stacked vertically) + ``<stem>.txt``.

    Args:
        images: G square images of one size: PIL images, (h, w, 3) uint8 arrays, or (3, h, w) float tensors in
            [-1, 1] (a (G, 3, h, w) tensor works too).
        captions: G strings (must not contain ``<|split|>``).
        path: output path; its suffix is replaced by .png / .txt. Parent folders are created.

    Returns:
        (png_path, txt_path).

    Raises:
        ValueError: len(images) != len(captions), empty set, non-square or mismatched image sizes, a caption
            containing the split token.
    """
    arrs = [_to_uint8(x) for x in images]
    if not arrs or len(arrs) != len(captions):
        raise ValueError(f"need G >= 1 images and G captions, got {len(arrs)} images and {len(captions)} captions")
    shape = arrs[0].shape
    if shape[0] != shape[1] or any(a.shape != shape for a in arrs):
        raise ValueError(f"images must be square and of one size, got {[a.shape for a in arrs]}")
    if any(SPLIT in c for c in captions):
        raise ValueError(f"captions must not contain {SPLIT!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, txt = path.with_suffix(".png"), path.with_suffix(".txt")
    Image.fromarray(np.concatenate(arrs, axis=0)).save(png)
    txt.write_text(f" {SPLIT} ".join(captions), encoding="utf-8")
    return png, txt


@torch.no_grad()
def cache_latents(dataset: ImageSetDataset, out_dir, encode_image, encode_text=None, *, device="cpu") -> int:
    """Precompute latents (and optionally text embeddings) per set: ``out_dir/<stem>.safetensors``.

    Each file holds ``latents`` (G, C, h, w) float32 and, with ``encode_text``, ``context`` (G, T, D) float32;
    ``_null_context.safetensors`` then holds the empty caption's context (1, T, D) for caption dropout.
    Only cache text embeddings of a frozen text encoder (CLIP); a learned conditioner must see raw captions.
    Files are written atomically (temp file + rename), so an interrupted run leaves no half file.

    Args:
        dataset: an ImageSetDataset without latent_cache.
        out_dir: output folder (created).
        encode_image: callable (G, 3, res, res) float in [-1, 1] -> (G, C, h, w) latents.
        encode_text: optional callable list[str] (G,) -> (G, T, D).
        device: where the encoders run.

    Returns:
        Number of sets written.
    """
    from safetensors.torch import save_file

    if dataset.latent_cache is not None:
        raise ValueError("cache_latents needs a dataset that reads images (latent_cache=None)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def put(d, dst):
        tmp = dst.with_suffix(".tmp")
        save_file(d, str(tmp))
        os.replace(tmp, dst)

    if encode_text is not None:
        put({"context": encode_text([""]).float().cpu().contiguous()}, out / "_null_context.safetensors")
    for i in range(len(dataset)):
        img, txt = dataset[i]
        images, caps, _ = get_group_data(img[None], [txt])
        d = {"latents": encode_image(images.to(device)).float().cpu().contiguous()}
        if encode_text is not None:
            d["context"] = encode_text(caps).float().cpu().contiguous()
        put(d, out / f"{dataset.paths[i].stem}.safetensors")
    return len(dataset)
