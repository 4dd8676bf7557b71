"""Image-set data: the seed's format, get_group_data, collate, bad files, latent cache."""
import numpy as np
import pytest
import torch
from PIL import Image

from jedi.data import SPLIT, ImageSetDataset, cache_latents, collate_sets, get_group_data, write_image_set


def _rand_images(g, side, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(g)]


def test_get_group_data_layout():
    B, G, C, W = 2, 3, 3, 4
    img = torch.randn(B, C, G * W, W)
    txt = [SPLIT.join(f"set{b} img{i}" for i in range(G)) for b in range(B)]
    images, caps, g = get_group_data(img, txt)
    assert g == G and images.shape == (B * G, C, W, W)
    for b in range(B):
        for i in range(G):
            torch.testing.assert_close(images[b * G + i], img[b, :, i * W:(i + 1) * W], rtol=0, atol=0)
            assert caps[b * G + i] == f"set{b} img{i}"


@pytest.mark.parametrize("shape,txt,match", [
    ((1, 3, 10, 4), ["a"], "multiple of its width"),
    ((1, 3, 8, 4), ["a", "b"], "one caption string per set"),
    ((1, 3, 8, 4), ["only one"], "1 captions for 2 images"),
    ((3, 8, 4), ["a"], "shape"),
])
def test_get_group_data_errors(shape, txt, match):
    with pytest.raises(ValueError, match=match):
        get_group_data(torch.zeros(shape), txt)


def test_write_read_roundtrip(tmp_path):
    imgs = _rand_images(3, 8)
    caps = ["one", "two", "three"]
    png, txt = write_image_set(imgs, caps, tmp_path / "s0.whatever")
    assert png.name == "s0.png" and txt.read_text() == f"one {SPLIT} two {SPLIT} three"
    assert Image.open(png).size == (8, 24)
    ds = ImageSetDataset(tmp_path, 8)
    x, t = ds[0]
    assert x.shape == (3, 24, 8) and x.dtype == torch.float32 and t == txt.read_text()
    expected = torch.from_numpy(np.concatenate(imgs)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    images, caps2, g = collate_sets([ds[0], ds[0]])
    assert images.shape == (6, 3, 8, 8) and caps2 == caps * 2 and g == 3


def test_resize_and_tensor_input(tmp_path):
    write_image_set(torch.rand(2, 3, 16, 16) * 2 - 1, ["a", "b"], tmp_path / "t")
    x, _ = ImageSetDataset(tmp_path, 8)[0]
    assert x.shape == (3, 16, 8) and x.min() >= -1 and x.max() <= 1


def test_mixed_set_sizes_rejected_in_batch(tmp_path):
    write_image_set(_rand_images(2, 8), ["a", "b"], tmp_path / "g2")
    write_image_set(_rand_images(3, 8), ["a", "b", "c"], tmp_path / "g3")
    ds = ImageSetDataset(tmp_path, 8)
    assert sorted(ds.set_sizes) == [2, 3]
    with pytest.raises(ValueError, match="mixes set sizes"):
        collate_sets([ds[0], ds[1]])
    assert collate_sets([ds[0]])[2] in (2, 3)  # batch_size 1 works for mixed data


def _bad_files(root):
    Image.fromarray(np.zeros((10, 4, 3), np.uint8)).save(root / "bad_height.png")
    (root / "bad_height.txt").write_text("a")
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(root / "bad_count.png")
    (root / "bad_count.txt").write_text("only one caption")
    (root / "bad_bytes.png").write_bytes(b"this is not an image")
    (root / "bad_bytes.txt").write_text(f"a {SPLIT} b")


@pytest.mark.parametrize("name,match", [("bad_height", "not a multiple"), ("bad_count", "1 captions for a set of 2"),
                                        ("bad_bytes", "unreadable image")])
def test_bad_files_raise_naming_file(tmp_path, name, match):
    _bad_files(tmp_path)
    for other in ("bad_height", "bad_count", "bad_bytes"):
        if other != name:
            (tmp_path / f"{other}.png").unlink()
    with pytest.raises(ValueError, match=match) as e:
        ImageSetDataset(tmp_path, 4)
    assert name in str(e.value)


def test_skip_bad_warns_once(tmp_path):
    _bad_files(tmp_path)
    write_image_set(_rand_images(2, 4), ["a", "b"], tmp_path / "good")
    (tmp_path / "nocaption.png").write_bytes((tmp_path / "good.png").read_bytes())
    with pytest.warns(UserWarning, match="skipped 4 bad set") as rec:
        ds = ImageSetDataset(tmp_path, 4, skip_bad=True)
    assert len(rec) == 1 and len(ds) == 1 and len(ds.bad) == 4


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no valid image sets"):
        ImageSetDataset(tmp_path, 4)


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match="G captions"):
        write_image_set(_rand_images(2, 4), ["a"], tmp_path / "x")
    with pytest.raises(ValueError, match="must not contain"):
        write_image_set(_rand_images(1, 4), [f"a {SPLIT} b"], tmp_path / "x")
    with pytest.raises(ValueError, match="square"):
        write_image_set([np.zeros((4, 5, 3), np.uint8)], ["a"], tmp_path / "x")


def test_latent_cache(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for i in range(2):
        write_image_set(_rand_images(2, 8, seed=i), [f"a{i}", f"b{i}"], data / f"s{i}")
    ds = ImageSetDataset(data, 8)
    enc_img = lambda x: torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1]], 1), 2)  # (G, 4, 4, 4)
    enc_txt = lambda caps: torch.stack([torch.full((5, 6), float(len(c))) for c in caps])  # (G, 5, 6)
    assert cache_latents(ds, cache, enc_img, enc_txt) == 2
    cds = ImageSetDataset(data, 8, latent_cache=cache)
    lat, txt, ctx = cds[1]
    assert lat.shape == (4, 8, 4) and ctx.shape == (2, 5, 6) and txt == ds[1][1]
    assert cds.null_context.shape == (1, 5, 6) and float(cds.null_context.max()) == 0.0
    images, caps, g = get_group_data(ds[1][0][None], [ds[1][1]])
    torch.testing.assert_close(get_group_data(lat[None], [txt])[0], enc_img(images))
    batch = collate_sets([cds[0], cds[1]])
    assert len(batch) == 4 and batch[0].shape == (4, 4, 4, 4) and batch[3].shape == (4, 5, 6)
    (cache / "s1.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks 1 set"):
        ImageSetDataset(data, 8, latent_cache=cache)
