"""Synthetic same-subject sets: determinism, format, captions, the CLI."""
import json
import random

import numpy as np
import pytest

from jedi.cli import main
from jedi.data import ImageSetDataset
from jedi.synthetic import BACKGROUNDS, SHAPES, TEXTURES, Scene, Subject, caption, make_scene, make_subject, render, \
    write_synthetic_dataset


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    write_synthetic_dataset(tmp_path / "a", 4, 3, 16, seed=5)
    write_synthetic_dataset(tmp_path / "b", 4, 3, 16, seed=5)
    write_synthetic_dataset(tmp_path / "c", 4, 3, 16, seed=6)
    a, b, c = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert a == b and len(a) == 9  # 4 png + 4 txt + subjects.json
    assert a != c


def test_format_readable(tmp_path):
    subs = write_synthetic_dataset(tmp_path, 3, 4, 12, seed=0)
    ds = ImageSetDataset(tmp_path, 12)
    assert len(ds) == 3 and ds.set_sizes == [4, 4, 4]
    x, txt = ds[0]
    assert x.shape == (3, 48, 12)
    caps = txt.split("<|split|>")
    assert len(caps) == 4 and all(caption(subs[0]) in c for c in caps)  # same subject in every image
    assert json.loads((tmp_path / "subjects.json").read_text())[0]["shape"] == subs[0].shape


def test_same_subject_different_scenes():
    rng = random.Random(0)
    s = make_subject(rng)
    scenes = [make_scene(rng, s) for _ in range(3)]
    imgs = [np.asarray(render(s, sc, 16)) for sc in scenes]
    assert imgs[0].shape == (16, 16, 3) and not np.array_equal(imgs[0], imgs[1])
    assert all(sc.background in BACKGROUNDS for sc in scenes)


def test_every_shape_and_texture_renders():
    for shape in SHAPES:
        for tex in TEXTURES:
            s = Subject(shape, tex, "red", "blue" if tex != "solid" else "red", "dot", "black")
            img = np.asarray(render(s, Scene(0.5, 0.5, 0.35, "grey"), 16))
            assert (np.abs(img.astype(int) - [195, 195, 195]).sum(-1) > 60).sum() > 10  # the subject is visible


def test_caption_text():
    s = Subject("star", "stripes", "red", "yellow", "dot", "blue")
    want = "a red and yellow striped star with a blue dot, on a beige background"
    assert caption(s, Scene(0.5, 0.5, 0.3, "beige")) == want
    assert caption(Subject("circle", "solid", "red", "red", "none", "red")) == "a red circle"


def test_errors(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, 0, 3, 16)
    with pytest.raises(ValueError, match="unknown shape"):
        render(Subject("blob", "solid", "red", "red", "none", "red"), Scene(0.5, 0.5, 0.3, "grey"), 8)


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--sets", "2", "--set-size", "2", "--resolution", "8",
                 "--seed", "3"]) == 0
    assert len(ImageSetDataset(tmp_path, 8)) == 2 and "wrote 2 sets" in capsys.readouterr().out
