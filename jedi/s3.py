"""S³ (Synthetic Same-Subject) image sets, the seed's Algorithm 1: generate, detect, crop, group by similarity.

The generators are pluggable callables (an LLM for descriptions, a text-to-image model prompted for photo collages
of one subject, an open-vocabulary detector, a segmenter, an inpainter for new backgrounds, an image embedder).
What is ours and tested is the grouping (Algorithm 1, lines 12-15) and the set assembly:

    embeddings of the object crops (CLIP image embeddings)
    -> cosine affinity matrix A (n x n)
    -> adjacency A >= threshold (0.95)
    -> connected components (union-find)
    -> image sets (components with at least ``min_set_size`` crops)

so two crops land in one set when a chain of near-duplicates links them, as in the seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["UnionFind", "cosine_affinity", "adjacency", "connected_components", "group_by_similarity", "S3Set",
           "build_s3_sets", "write_s3_sets"]


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]  # path halving keeps later finds near O(1)
            i = p[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def cosine_affinity(embeddings) -> np.ndarray:
    """(n, d) embeddings (tensor or array) -> (n, n) float64 cosine similarities (rows normalized first).

    Raises:
        ValueError: not 2-D, or a zero row (its direction is undefined).
    """
    e = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    e = e.detach().double().cpu()
    if e.dim() != 2:
        raise ValueError(f"embeddings must be (n, d), got {tuple(e.shape)}")
    if len(e) and (e.norm(dim=1) == 0).any():
        raise ValueError("embeddings contain a zero vector: its cosine similarity is undefined")
    e = F.normalize(e, dim=1)
    return (e @ e.T).numpy()


def adjacency(affinity: np.ndarray, threshold: float = 0.95) -> np.ndarray:
    """(n, n) affinity -> (n, n) bool adjacency ``affinity >= threshold`` (inclusive), made symmetric, with the
    diagonal set (every crop is its own neighbour, whatever the threshold).

    Raises:
        ValueError: not square, or a threshold outside [-1, 1].
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be square (n, n), got {a.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    adj = a >= threshold
    adj = adj | adj.T  # float round-off must not make "i ~ j" and "j ~ i" disagree
    np.fill_diagonal(adj, True)
    return adj


def connected_components(adj: np.ndarray) -> list[list[int]]:
    """Connected components of an undirected graph given as a (n, n) bool adjacency matrix.

    Returns:
        Components as ascending index lists, ordered by their smallest index.
    """
    adj = np.asarray(adj, dtype=bool)
    n = adj.shape[0]
    uf = UnionFind(n)
    for i, j in zip(*np.nonzero(np.triu(adj, k=1))):
        uf.union(int(i), int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def group_by_similarity(embeddings, threshold: float = 0.95, min_size: int = 2) -> list[list[int]]:
    """Algorithm 1, lines 12-15: cosine affinity -> adjacency at ``threshold`` -> connected components.

    Args:
        embeddings: (n, d) image embeddings of the object crops.
        threshold: cosine similarity at or above which two crops are linked (0.95 in the seed).
        min_size: smallest component kept as a set (a lone crop is no same-subject set).

    Returns:
        The kept components (ascending indices, ordered by smallest index).
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if len(embeddings) == 0:
        return []
    comps = connected_components(adjacency(cosine_affinity(embeddings), threshold))
    return [c for c in comps if len(c) >= min_size]


@dataclass
class S3Set:
    """One same-subject image set.

    Attributes:
        category: the object category it was generated for.
        prompt: the collage prompt of its source image.
        images: the set's images (PIL), crops or inpainted crops.
        captions: one caption per image (the prompt, or the inpainter's).
        masks: the segmenter's subject masks, when a segmenter was given.
        source: index of the generated source image, crop indices within it.
    """

    category: str
    prompt: str
    images: list
    captions: list[str]
    masks: list | None = None
    source: tuple[int, list[int]] = field(default=(0, []))


def build_s3_sets(categories: Sequence[str], *, describe: Callable[[str], list[str]],
                  text_to_image: Callable[[str, int], object], detect: Callable[[object, str], list],
                  embed: Callable[[list], object], segment: Callable[[object], object] | None = None,
                  inpaint: Callable[[object, object, str], tuple[object, str] | object] | None = None,
                  images_per_prompt: int = 1, threshold: float = 0.95, min_set_size: int = 2,
                  max_set_size: int | None = None, seed: int = 0) -> list[S3Set]:
    """Build S³ sets: for each category, an LLM describes subjects, a text-to-image model draws photo collages of
    one subject, a detector finds the object instances, and the crops are grouped by embedding similarity.

    Args:
        categories: object categories ("backpack", "dog", ...).
        describe: ``describe(category) -> [collage prompt, ...]`` (the LLM / GPT step), e.g. "photos of the same
            red vintage backpack in different scenes".
        text_to_image: ``text_to_image(prompt, seed) -> PIL image`` (a collage).
        detect: ``detect(image, category) -> [(left, top, right, bottom), ...]`` pixel boxes (open-vocabulary
            detector).
        embed: ``embed(list of PIL crops) -> (n, d)`` embeddings (CLIP image embeddings in the seed).
        segment: optional ``segment(crop) -> mask`` (subject masks kept with the set; given to ``inpaint``).
        inpaint: optional ``inpaint(crop, mask, prompt) -> image`` or ``(image, caption)``: re-generates each kept
            crop's background for diversity (after grouping, so grouping sees the original crops).
        images_per_prompt: collages drawn per prompt (seeds ``seed``, ``seed + 1``, ...).
        threshold, min_set_size: grouping (see :func:`group_by_similarity`); crops are grouped within each collage.
        max_set_size: keep at most this many images per set (the first ones), None = all.
        seed: first text-to-image seed.

    Returns:
        The :class:`S3Set` list, in category, prompt, collage, component order.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if max_set_size is not None and max_set_size < min_set_size:
        raise ValueError(f"max_set_size {max_set_size} < min_set_size {min_set_size}")
    sets: list[S3Set] = []
    source = 0
    for category in categories:
        for prompt in describe(category):
            for k in range(images_per_prompt):
                image = text_to_image(prompt, seed + k)
                crops = []
                for box in detect(image, category):
                    left, top, right, bottom = (int(round(v)) for v in box)
                    if right > left and bottom > top:  # degenerate boxes hold no object
                        crops.append(image.crop((left, top, right, bottom)))
                groups = group_by_similarity(embed(crops), threshold, min_set_size) if len(crops) else []
                for g in groups:
                    g = g[:max_set_size] if max_set_size else g
                    images = [crops[i] for i in g]
                    masks = [segment(im) for im in images] if segment is not None else None
                    captions = [prompt] * len(images)
                    if inpaint is not None:
                        for j, im in enumerate(images):
                            r = inpaint(im, masks[j] if masks else None, prompt)
                            images[j], captions[j] = r if isinstance(r, tuple) else (r, prompt)
                    sets.append(S3Set(category, prompt, images, captions, masks, (source, list(g))))
                source += 1
    return sets


def write_s3_sets(sets: Sequence[S3Set], out, resolution: int = 512) -> list[Path]:
    """Write sets in the training format of :mod:`jedi.data` (``s3_00000.png`` stacking the images, ``.txt``
    captions), each image resized to ``resolution`` squared (bicubic).

    Returns:
        The written .png paths.
    """
    from PIL import Image

    from jedi.data import write_image_set

    paths = []
    for i, s in enumerate(sets):
        ims = [im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC) for im in s.images]
        png, _ = write_image_set(ims, [c.replace("<|split|>", " ") for c in s.captions], Path(out) / f"s3_{i:05d}")
        paths.append(png)
    return paths
