"""jedi.s3: similarity grouping (affinity, adjacency threshold edges, union-find components) on hand-made
embeddings, and the set-assembly driver with fake generators."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from jedi.s3 import (S3Set, UnionFind, adjacency, build_s3_sets, connected_components, cosine_affinity,
                     group_by_similarity, write_s3_sets)


def unit(deg: float) -> list[float]:
    """A 2-D unit vector at ``deg`` degrees: cos(angle between unit(a), unit(b)) = cos(a - b)."""
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def test_known_components():
    # 0, 1, 2 within 5 degrees (cos >= 0.996); 3, 4 near 90 degrees; 5 alone at 200 degrees
    emb = torch.tensor([unit(0), unit(3), unit(5), unit(90), unit(92), unit(200)])
    assert group_by_similarity(emb) == [[0, 1, 2], [3, 4]]
    assert group_by_similarity(emb, min_size=1) == [[0, 1, 2], [3, 4], [5]]
    assert group_by_similarity(emb, min_size=3) == [[0, 1, 2]]
    # order of the input does not change the partition, only the indices
    perm = [5, 3, 0, 4, 2, 1]
    assert group_by_similarity(emb[perm]) == [[1, 3], [2, 4, 5]]


def test_components_are_transitive_chains():
    """cos(0, 1) and cos(1, 2) >= 0.95 but cos(0, 2) < 0.95: one component through the chain."""
    emb = np.array([unit(0), unit(17), unit(34)])  # cos 17 deg = 0.956, cos 34 deg = 0.829
    aff = cosine_affinity(emb)
    assert aff[0, 2] < 0.95 <= aff[0, 1]
    assert group_by_similarity(emb) == [[0, 1, 2]]
    assert group_by_similarity(emb, threshold=0.96) == []


def test_threshold_edges():
    aff = np.array([[1.0, 0.95, 0.2], [0.95, 1.0, 0.9499999], [0.2, 0.9499999, 1.0]])
    assert connected_components(adjacency(aff, 0.95)) == [[0, 1], [2]]  # inclusive at exactly the threshold
    assert connected_components(adjacency(aff, 0.9499999)) == [[0, 1, 2]]
    assert connected_components(adjacency(aff, 1.0)) == [[0], [1], [2]]  # only self-similarity
    assert connected_components(adjacency(aff, -1.0)) == [[0, 1, 2]]
    # round-off asymmetry cannot make the graph directed
    asym = np.array([[1.0, 0.95], [0.9499999, 1.0]])
    assert adjacency(asym, 0.95).tolist() == [[True, True], [True, True]]
    # the diagonal is always set, even when a threshold above 1 round-off could miss it
    assert adjacency(np.array([[0.9999999]]), 1.0).tolist() == [[True]]
    for bad in (1.5, -2.0):
        with pytest.raises(ValueError, match="threshold"):
            adjacency(aff, bad)
    with pytest.raises(ValueError, match="square"):
        adjacency(np.zeros((2, 3)))


def test_affinity_and_bad_embeddings():
    aff = cosine_affinity(torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    assert aff.shape == (3, 3) and np.allclose(np.diag(aff), 1)
    assert aff[0, 1] == pytest.approx(0.0) and aff[0, 2] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="zero vector"):
        cosine_affinity(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        cosine_affinity(np.zeros(3))
    assert group_by_similarity(np.zeros((0, 4))) == []


def test_union_find_matches_a_reference_on_random_graphs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        adj = rng.random((n, n)) < 0.08
        adj = adj | adj.T
        np.fill_diagonal(adj, True)
        # reference: repeated boolean reachability (transitive closure)
        reach = adj.copy()
        for _ in range(n):
            reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
        want = sorted({tuple(np.nonzero(reach[i])[0].tolist()) for i in range(n)}, key=lambda c: c[0])
        assert [tuple(c) for c in connected_components(adj)] == want
    uf = UnionFind(4)
    uf.union(0, 1)
    uf.union(2, 3)
    uf.union(1, 0)
    assert uf.find(0) == uf.find(1) != uf.find(2) == uf.find(3)


# ---- the driver ----------------------------------------------------------------------------------------------------
COLOURS = [(200, 30, 30), (205, 32, 28), (198, 29, 33), (30, 30, 200)]  # three near-identical reds, one blue


def collage(prompt: str, seed: int) -> Image.Image:
    im = Image.new("RGB", (64, 16), (255, 255, 255))
    for i, c in enumerate(COLOURS):
        im.paste(c, (16 * i + 2, 2, 16 * i + 14, 14))
    return im


def test_build_s3_sets_groups_crops_and_assembles_sets(tmp_path):
    calls = {"describe": [], "t2i": [], "embed": 0, "segment": 0, "inpaint": 0}

    def describe(cat):
        calls["describe"].append(cat)
        return [f"photos of the same {cat}"]

    def t2i(prompt, seed):
        calls["t2i"].append((prompt, seed))
        return collage(prompt, seed)

    def detect(image, category):
        return [(16 * i + 2, 2, 16 * i + 14, 14) for i in range(4)] + [(5, 5, 5, 9)]  # + a degenerate box

    def embed(crops):
        calls["embed"] += 1
        return torch.from_numpy(np.stack([np.asarray(c, dtype=np.float64).mean((0, 1)) for c in crops]))

    def segment(crop):
        calls["segment"] += 1
        return np.ones(crop.size[::-1], bool)

    def inpaint(crop, mask, prompt):
        calls["inpaint"] += 1
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT), prompt + ", on a beach"

    sets = build_s3_sets(["mug", "bag"], describe=describe, text_to_image=t2i, detect=detect, embed=embed,
                         segment=segment, inpaint=inpaint, images_per_prompt=2, seed=10)
    assert calls["describe"] == ["mug", "bag"]
    assert calls["t2i"] == [("photos of the same mug", 10), ("photos of the same mug", 11),
                            ("photos of the same bag", 10), ("photos of the same bag", 11)]
    assert len(sets) == 4 and all(isinstance(s, S3Set) for s in sets)  # one red set per collage; blue is alone
    s = sets[0]
    assert s.category == "mug" and s.source == (0, [0, 1, 2]) and sets[3].source == (3, [0, 1, 2])
    assert [im.size for im in s.images] == [(12, 12)] * 3 and len(s.masks) == 3
    assert s.captions == ["photos of the same mug, on a beach"] * 3
    assert calls["embed"] == 4 and calls["segment"] == calls["inpaint"] == 12
    capped = build_s3_sets(["mug"], describe=describe, text_to_image=t2i, detect=detect, embed=embed,
                           max_set_size=2)
    assert [len(s.images) for s in capped] == [2] and capped[0].masks is None
    assert build_s3_sets(["mug"], describe=describe, text_to_image=t2i, detect=lambda im, c: [], embed=embed) == []
    with pytest.raises(ValueError, match="max_set_size"):
        build_s3_sets(["mug"], describe=describe, text_to_image=t2i, detect=detect, embed=embed, max_set_size=1)

    paths = write_s3_sets(sets[:2], tmp_path, resolution=8)
    assert [p.name for p in paths] == ["s3_00000.png", "s3_00001.png"]
    assert Image.open(paths[0]).size == (8, 24)
    assert paths[0].with_suffix(".txt").read_text().count("<|split|>") == 2
