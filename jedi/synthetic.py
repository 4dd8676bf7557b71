"""Procedural same-subject image sets: a tiny, deterministic stand-in for JeDi's S^3 dataset.

A *subject* is a composite object (shape, texture, 2-3 saturated colours, a small detail); a *scene* places it at
some position and scale on a pale background tint. Every image of a set shows the same subject in a
different scene, and its caption names both ("a red and yellow striped star with a blue dot, on a pale green
background").
Everything is drawn with Pillow at 4x supersampling from ``random.Random(seed)``, so the same seed gives the same
bytes.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from jedi.data import write_image_set

__all__ = ["PALETTE", "BACKGROUNDS", "SHAPES", "TEXTURES", "DETAILS", "Subject", "Scene", "make_subject",
           "make_scene", "render", "caption", "write_synthetic_dataset"]

# saturated subject colours and pale background tints: the subject, not the backdrop, carries an image's identity
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "brown": (130, 80, 40), "black": (25, 25, 25),
    "cyan": (40, 200, 210), "pink": (240, 120, 180),
}
BACKGROUNDS = {
    "white": (245, 245, 245), "grey": (195, 195, 195), "pale blue": (200, 220, 245), "pale green": (205, 235, 205),
    "pale yellow": (245, 240, 200), "pale pink": (245, 215, 225), "beige": (230, 215, 190),
    "lavender": (220, 210, 240),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
TEXTURES = ("solid", "stripes", "dots", "checker")
DETAILS = ("dot", "ring", "none")
_TEXTURE_WORD = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
_SS = 4  # supersampling factor: shapes are drawn at 4x and downsampled (anti-aliasing)


@dataclass(frozen=True)
class Subject:
    """Identity of a subject: what stays fixed across the images of a set."""

    shape: str
    texture: str
    color: str  # body colour
    color2: str  # texture colour (== color for solid)
    detail: str
    detail_color: str


@dataclass(frozen=True)
class Scene:
    """Per-image placement: centre (fractions of the side), size (radius as a fraction of the side), background."""

    cx: float
    cy: float
    scale: float
    background: str


def make_subject(rng: random.Random) -> Subject:
    """Draw a random subject (2-3 distinct palette colours) from ``rng``."""
    shape, texture, detail = rng.choice(SHAPES), rng.choice(TEXTURES), rng.choice(DETAILS)
    c = rng.sample(sorted(PALETTE), 3)
    return Subject(shape, texture, c[0], c[0] if texture == "solid" else c[1], detail,
                   c[2] if detail != "none" else c[0])


def make_scene(rng: random.Random, subject: Subject) -> Scene:
    """Draw a random scene for ``subject``: a pale background tint, position and scale."""
    bg = rng.choice(sorted(BACKGROUNDS))
    # object-centric like S^3: the subject fills much of the frame (radius 0.3-0.45 of the side) and stays inside it
    scale = rng.uniform(0.3, 0.45)
    return Scene(rng.uniform(scale, 1 - scale), rng.uniform(scale, 1 - scale), scale, bg)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius r around (cx, cy), in pixels (circle handled by the caller)."""
    def ring(n, radii, start=-90.0):
        return [(cx + radii[i % len(radii)] * r * math.cos(math.radians(start + 360.0 * i / n)),
                 cy + radii[i % len(radii)] * r * math.sin(math.radians(start + 360.0 * i / n))) for i in range(n)]

    if shape == "square":
        return ring(4, [1.0], start=45.0)
    if shape == "triangle":
        return ring(3, [1.0])
    if shape == "star":
        return ring(10, [1.0, 0.45])
    if shape == "diamond":
        return ring(4, [1.0])
    if shape == "hexagon":
        return ring(6, [1.0], start=0.0)
    if shape == "cross":
        a, b = 0.35 * r, r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
               (-a, -a)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")


def _texture(size: int, s: Subject, cx: float, cy: float, r: float) -> Image.Image:
    """Full-canvas texture layer in subject coordinates (period scales with r, so it moves with the subject)."""
    layer = Image.new("RGB", (size, size), PALETTE[s.color])
    if s.texture == "solid":
        return layer
    d, c2, p = ImageDraw.Draw(layer), PALETTE[s.color2], r / 2.0  # period: 4 bands across the subject
    x0, y0 = cx - r, cy - r
    n = 5
    for i in range(n):
        for j in range(n):
            bx, by = x0 + i * p, y0 + j * p
            if s.texture == "stripes" and i % 2 == 0:
                d.rectangle([bx, y0, bx + p / 2, y0 + 2 * r], fill=c2)
            elif s.texture == "dots":
                d.ellipse([bx + p * 0.25, by + p * 0.25, bx + p * 0.75, by + p * 0.75], fill=c2)
            elif s.texture == "checker" and (i + j) % 2 == 0:
                d.rectangle([bx, by, bx + p, by + p], fill=c2)
    return layer


def render(subject: Subject, scene: Scene, resolution: int) -> Image.Image:
    """Draw ``subject`` in ``scene`` as a ``resolution`` x ``resolution`` RGB PIL image (4x supersampled).

    Raises:
        ValueError: unknown shape or colour name, resolution < 1.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    size = resolution * _SS
    cx, cy, r = scene.cx * size, scene.cy * size, scene.scale * size
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    if subject.shape == "circle":
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        md.polygon(_polygon(subject.shape, cx, cy, r), fill=255)
    img.paste(_texture(size, subject, cx, cy, r), (0, 0), mask)
    d, dc = ImageDraw.Draw(img), PALETTE[subject.detail_color]
    if subject.detail == "dot":
        q = 0.28 * r
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=dc)
    elif subject.detail == "ring":
        q, w = 0.4 * r, max(1, int(0.12 * r))
        d.ellipse([cx - q, cy - q, cx + q, cy + q], outline=dc, width=w)
    return img.resize((resolution, resolution), Image.LANCZOS)


def caption(subject: Subject, scene: Scene | None = None) -> str:
    """Describe subject (and scene), e.g. "a red and yellow striped star with a blue dot, on a beige background"."""
    tex = _TEXTURE_WORD[subject.texture]
    colors = subject.color if subject.texture == "solid" else f"{subject.color} and {subject.color2}"
    words = ["a", colors] + ([tex] if tex else []) + [subject.shape]
    text = " ".join(words)
    if subject.detail != "none":
        text += f" with a {subject.detail_color} {subject.detail}"
    if scene is not None:
        text += f", on a {scene.background} background"
    return text


def write_synthetic_dataset(out, sets: int, set_size: int, resolution: int, seed: int = 0) -> list[Subject]:
    """Write ``sets`` synthetic same-subject sets in the seed's format (``set_00000.png`` + ``.txt``, ...).

    Also writes ``subjects.json`` (one subject per set, in file order) for evaluation. Deterministic: the same
    arguments give byte-identical files.

    Args:
        out: output folder (created).
        sets: number of sets (subjects) >= 1.
        set_size: G images per set >= 1.
        resolution: side of each image in pixels.
        seed: RNG seed.

    Returns:
        The list of subjects written, in file order.

    Raises:
        ValueError: non-positive sets, set_size or resolution.
    """
    if sets < 1 or set_size < 1 or resolution < 1:
        raise ValueError(f"sets, set_size and resolution must be positive, got {sets}, {set_size}, {resolution}")
    rng = random.Random(seed)
    out = Path(out)
    subjects = []
    for i in range(sets):
        subj = make_subject(rng)
        scenes = [make_scene(rng, subj) for _ in range(set_size)]
        write_image_set([render(subj, sc, resolution) for sc in scenes], [caption(subj, sc) for sc in scenes],
                        out / f"set_{i:05d}")
        subjects.append(subj)
    (out / "subjects.json").write_text(json.dumps([asdict(s) for s in subjects], indent=1, sort_keys=True))
    return subjects
