"""jedi.metrics with tiny random CLIP / DINO models: known answers (identical images -> 1), the averaging rules on
hand-made embeddings, preprocessing, masking, the evaluate driver and the ``jedi eval`` CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel  # noqa: E402

from jedi.metrics import (CLIP_MEAN, CLIP_STD, ClipScorer, DinoScorer, apply_mask, eval_main, evaluate,  # noqa: E402
                          image_score, mean_pairwise_cosine, preprocess, text_score)


def write_tokenizer(path):
    """A tiny byte-level BPE vocabulary in CLIP's format (every byte and its word-final form, two merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["d o", "do g</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("clip_tok"))


@pytest.fixture(scope="module")
def clip(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    return ClipScorer(CLIPModel(cfg), tok)


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(1)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=37)
    return DinoScorer(ViTModel(cfg, add_pooling_layer=False))


def img(seed, size=(40, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---- averaging rules ----------------------------------------------------------------------------------------------
def test_mean_pairwise_cosine_known_answers():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert mean_pairwise_cosine(torch.stack([e1, e2]), e1[None]) == pytest.approx(0.5)
    assert mean_pairwise_cosine(torch.stack([e1, -e1]), torch.stack([e1, e1 + e2 * 0])) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.zeros(0, 2), e1[None])


def test_image_score_averages_pairs_then_choices():
    """Choice A (two images) scores 0.5 against the real set, choice B (one image) scores 1: the average over
    choices is 0.75, not the pooled mean over the three images (2/3)."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    real = torch.stack([e1, e1])
    choice_a = torch.stack([e1, e2])  # pairs: 1, 1, 0, 0 -> 0.5
    choice_b = e1[None]  # pairs: 1, 1 -> 1
    assert image_score([choice_a, choice_b], real) == pytest.approx(0.75)
    assert image_score([torch.cat([choice_a, choice_b])], real) == pytest.approx(2 / 3)
    # CLIP-T: each choice against its own prompt
    assert text_score([choice_a, choice_b], [e2, e1]) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="one prompt embedding per choice"):
        text_score([choice_a], [e1, e2])


# ---- preprocessing / masks ----------------------------------------------------------------------------------------
def test_preprocess_resizes_shorter_side_crops_and_normalizes():
    mean_rgb = tuple(round(m * 255) for m in CLIP_MEAN)
    x = preprocess([Image.new("RGB", (64, 32), mean_rgb), Image.new("L", (20, 50), 0)], resize=32, crop=32,
                   mean=CLIP_MEAN, std=CLIP_STD)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[0].abs().max() < 0.01  # the mean colour normalizes to ~0
    assert torch.allclose(x[1, 0], torch.full((32, 32), -CLIP_MEAN[0] / CLIP_STD[0]))
    # center crop: a wide image whose centre is white and edges black keeps only the white centre
    wide = Image.new("RGB", (96, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (32, 0, 64, 32))
    y = preprocess([wide], resize=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(y, torch.ones_like(y), atol=0.02)
    with pytest.raises(TypeError):
        preprocess([np.zeros((4, 4, 3))], resize=4, crop=4, mean=CLIP_MEAN, std=CLIP_STD)


def test_apply_mask():
    im = Image.new("RGB", (4, 4), (10, 20, 30))
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    out = np.asarray(apply_mask(im, m, fill=(255, 0, 0)))
    assert (out[1:3, 1:3] == (10, 20, 30)).all() and (out[0, 0] == (255, 0, 0)).all()
    small = Image.fromarray((m[::2, ::2] * 255).astype(np.uint8))  # 2x2 mask, resized (nearest) to 4x4
    assert apply_mask(im, small).size == (4, 4)
    with pytest.raises(ValueError, match="mask must be"):
        apply_mask(im, np.zeros((4, 4, 3)))


# ---- models --------------------------------------------------------------------------------------------------------
def test_identical_images_score_one(clip, dino):
    a = img(0)
    s = evaluate([[a]], [a.copy()], "a dog", clip=clip, dino=dino)
    assert s["clip_i"] == pytest.approx(1.0, abs=1e-6) and s["dino"] == pytest.approx(1.0, abs=1e-6)
    assert -1 <= s["clip_t"] <= 1 and "mclip_i" not in s
    e = clip.embed_images([a, img(1)])
    assert e.shape == (2, 16) and torch.allclose(e.norm(dim=-1), torch.ones(2))
    assert dino.embed_images([a]).shape == (1, 32)
    t = clip.embed_texts(["a dog", "a cat on a mat"])
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])


def test_evaluate_masked_variants_with_a_segmenter(clip, dino):
    calls = []

    def segmenter(im):
        calls.append(im.size)
        m = np.zeros(im.size[::-1], bool)
        m[8:24, 8:24] = True
        return m

    gen = [[img(1), img(2)], [img(3)]]
    real = [img(4), img(5)]
    s = evaluate(gen, real, ["p one", "p two"], clip=clip, dino=dino, segmenter=segmenter)
    assert set(s) >= {"clip_t", "clip_i", "mclip_i", "dino", "mdino"} and s["n_choices"] == 2
    assert len(calls) == 5  # every image segmented once, reused for both models
    # same background everywhere + different subjects: masking changes the score
    assert s["mclip_i"] != pytest.approx(s["clip_i"])
    # masks given for every image: no segmenter needed; a missing one without segmenter is an error
    ones = np.ones((32, 40), bool)
    s2 = evaluate(gen, real, None, dino=dino, generated_masks=[[ones, ones], [ones]], real_masks=[ones, ones])
    assert s2["mdino"] == pytest.approx(s2["dino"], abs=1e-6) and "clip_t" not in s2
    with pytest.raises(ValueError, match="mask for every image"):
        evaluate(gen, real, dino=dino, generated_masks=[[ones, None], [ones]], real_masks=[ones, ones])
    with pytest.raises(ValueError, match="mirror"):
        evaluate(gen, real, dino=dino, generated_masks=[[ones], [ones]], real_masks=[ones, ones])
    with pytest.raises(ValueError, match="one prompt per choice"):
        evaluate(gen, real, ["only one"], clip=clip)


def test_eval_cli(clip, dino, tok_dir, tmp_path, capsys):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    dino.model.save_pretrained(tmp_path / "dino")
    for c, seeds in (("choice0", (1, 2)), ("choice1", (3,))):
        (tmp_path / "gen" / c).mkdir(parents=True)
        (tmp_path / "gen" / c / "prompt.txt").write_text(f"a dog {c}")
        (tmp_path / "gmask" / c).mkdir(parents=True)
        for s in seeds:
            img(s).save(tmp_path / "gen" / c / f"{s}.png")
            Image.new("L", (40, 32), 255).save(tmp_path / "gmask" / c / f"{s}.png")
    (tmp_path / "real").mkdir()
    (tmp_path / "rmask").mkdir()
    for s in (4, 5):
        img(s).save(tmp_path / "real" / f"{s}.jpg", quality=95)
        Image.new("L", (40, 32), 255).save(tmp_path / "rmask" / f"{s}.png")
    rc = eval_main(["--generated", str(tmp_path / "gen"), "--real", str(tmp_path / "real"), "--clip",
                    str(tmp_path / "clip"), "--dino", str(tmp_path / "dino"), "--generated-masks",
                    str(tmp_path / "gmask"), "--real-masks", str(tmp_path / "rmask"), "--out",
                    str(tmp_path / "m.json"), "--device", "cpu"])
    assert rc == 0
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["n_choices"] == 2 and scores["n_generated"] == 3 and scores["n_real"] == 2
    assert scores["mdino"] == pytest.approx(scores["dino"], abs=1e-6)  # all-white masks keep every pixel
    assert set(scores) >= {"clip_t", "clip_i", "mclip_i", "dino", "mdino"}
    capsys.readouterr()
    assert eval_main(["--generated", str(tmp_path / "gen"), "--real", str(tmp_path / "real")]) == 2
    assert "--clip" in capsys.readouterr().err
    assert eval_main(["--generated", str(tmp_path / "gen"), "--real", str(tmp_path / "real"),
                      "--dino", str(tmp_path / "nope")]) == 2
