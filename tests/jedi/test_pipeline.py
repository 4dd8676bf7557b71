"""jedi.pipeline with tiny random parts: shapes, determinism, references untouched, image modes/sizes, loading from
an LDM single file and a diffusers-layout folder, the ``jedi sample`` CLI, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from jedi import JeDiUNet, UNetConfig  # noqa: E402
from jedi.pipeline import (JeDiPipeline, fast_tip, load_images, sample_main, unet_config_from_diffusers,  # noqa: E402
                           unet_config_to_diffusers)
from jedi.vae import AutoencoderKL, VAEConfig  # noqa: E402
from jedi.weights import to_ldm_state_dict  # noqa: E402
from jedi.testing import randomize_weights_ as randomize_

SIZE = 16  # pixels: tiny VAE (2x) * tiny UNet (4x) needs multiples of 8


def write_tokenizer(path):
    """A tiny byte-level BPE vocabulary in CLIP's format (every byte, its word-final form, a few merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["d o", "do g</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def pipe(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    torch.manual_seed(0)
    unet = randomize_(JeDiUNet(UNetConfig.tiny()), 1)
    vae = randomize_(AutoencoderKL(VAEConfig.tiny()), 2)
    text = randomize_(CLIPTextModel(text_config(tok)), 3)
    return JeDiPipeline(unet, vae, text, tok, default_size=SIZE)


def refs(n=2, size=(SIZE, SIZE), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        out.append(Image.fromarray(arr).convert(mode))
    return out


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_shapes_and_only_generated_images(pipe):
    out = pipe(refs(2), ["a dog", "a cat"], num_images=2, steps=1, progress=False)
    assert len(out) == 4 and all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in out)
    images, lat = pipe(refs(1), "a dog", num_images=3, steps=1, progress=False, return_latents=True)
    assert len(images) == 3 and lat.shape == (1, 3, 4, SIZE // 2, SIZE // 2)


def test_determinism_and_references_untouched(pipe):
    r = refs(2)
    before = pixels(r)
    kw = dict(num_images=2, steps=2, strategy="text_first", l1=2.0, l2=4.0, sampler="dpmpp_2m", progress=False)
    a = pixels(pipe(r, "a dog", seed=5, **kw))
    b = pixels(pipe(r, "a dog", seed=5, **kw))
    c = pixels(pipe(r, "a dog", seed=6, **kw))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(pixels(r), before)
    # the references condition the output
    assert not np.array_equal(a, pixels(pipe(refs(2, seed=9), "a dog", seed=5, **kw)))


def test_any_mode_and_size_is_converted(pipe):
    mixed = [refs(1, mode="RGBA")[0], refs(1, size=(20, 12), mode="L")[0], refs(1, mode="P")[0],
             refs(1, size=(9, 30), mode="RGB")[0]]
    out = pipe(mixed, "a cat", num_images=1, steps=1, progress=False)
    assert out[0].size == (SIZE, SIZE)
    x = load_images(mixed, 24, 8)
    assert x.shape == (4, 3, 8, 24) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # alpha is composited on white
    assert torch.equal(load_images([transparent], 8, 8), torch.ones(1, 3, 8, 8))


@pytest.mark.parametrize("call, exc, match", [
    (lambda p: p([], "a dog", steps=1), ValueError, "at least one"),
    (lambda p: p(refs(1), [], steps=1), ValueError, "prompt"),
    (lambda p: p(refs(1), "a dog", height=12, width=16, steps=1), ValueError, "multiples of 8"),
    (lambda p: p([np.zeros((16, 16, 3))], "a dog", steps=1), TypeError, "PIL images"),
    (lambda p: p(refs(1), "a dog", steps=1, strategy="mix"), ValueError, "strategy"),
    (lambda p: p(refs(1), "a dog", steps=1, num_images=0), ValueError, "num_targets"),
])
def test_bad_inputs(pipe, call, exc, match):
    with pytest.raises(exc, match=match):
        call(pipe)


def _ldm_single_file(pipe, path):
    from safetensors.torch import save_file

    sd = dict(to_ldm_state_dict(pipe.unet))
    sd.update({"first_stage_model." + k: v for k, v in pipe.vae.state_dict().items()})
    text = pipe.text_encoder.state_dict()
    sd.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]  # old ckpts
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path))


def test_from_single_file_reproduces_the_pipeline(pipe, tok_dir, tmp_path):
    ckpt = tmp_path / "jedi.safetensors"
    _ldm_single_file(pipe, ckpt)
    loaded = JeDiPipeline.from_single_file(ckpt, tokenizer_path=tok_dir, unet_config=UNetConfig.tiny(),
                                           vae_config=VAEConfig.tiny(), text_config=text_config(pipe.tokenizer),
                                           default_size=SIZE)
    kw = dict(num_images=1, steps=2, seed=3, progress=False)
    assert np.array_equal(pixels(loaded(refs(1), "a dog", **kw)), pixels(pipe(refs(1), "a dog", **kw)))
    with pytest.raises(ValueError, match="tokenizer folder is required"):
        JeDiPipeline.from_single_file(ckpt)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        JeDiPipeline.from_single_file(ckpt, tokenizer_path=tmp_path / "nowhere")


def test_folder_roundtrip_and_sample_cli(pipe, tmp_path, capsys):
    folder = pipe.save_folder(tmp_path / "model")
    loaded = JeDiPipeline.from_folder(folder)
    assert loaded.default_size == SIZE
    kw = dict(num_images=1, steps=2, seed=4, progress=False)
    assert np.array_equal(pixels(loaded(refs(1), "a cat", **kw)), pixels(pipe(refs(1), "a cat", **kw)))

    for i, im in enumerate(refs(2)):
        im.save(tmp_path / f"ref{i}.png")
    out = tmp_path / "out"
    rc = sample_main(["--refs", str(tmp_path / "ref0.png"), str(tmp_path / "ref1.png"), "--prompt", "a dog",
                      "--prompt", "a cat", "--ckpt", str(folder), "--out", str(out), "--num-images", "2",
                      "--steps", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0 and "--fast" not in capsys.readouterr().err  # the CUDA-graph tip is for CUDA devices only
    assert sorted(p.name for p in out.glob("*.png")) == ["00_00.png", "00_01.png", "01_00.png", "01_01.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (4 * SIZE + 3 * 4, 2 * SIZE + 4)
    rc = sample_main(["--refs", str(tmp_path / "ref0.png"), "--prompt", "x", "--ckpt", str(tmp_path / "missing.ckpt"),
                      "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_fast_tip_only_on_cuda():
    assert fast_tip("cpu") is None and fast_tip(torch.device("cpu")) is None
    for dev in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert "--fast" in fast_tip(dev) and "CUDA graph" in fast_tip(dev)


def _unet_state(pipe):
    fused = {m.fused for m in pipe.unet.modules() if hasattr(m, "fused")}
    qkv = {m.fuse_qkv for m in pipe.unet.modules() if hasattr(m, "fuse_qkv") and hasattr(m, "to_q")}
    qkv.add(pipe.unet.config.fuse_context_kv)  # the context k/v of all cross-attentions in one GEMM
    w = pipe.unet.input_blocks[0][0].weight
    return fused, qkv, w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_optimize_keeps_the_images_and_undoes(pipe, tmp_path):
    """optimize() on the CPU (channels-last, fused ops through their torch path with folded biases, fused q/k/v and
    context k/v; no CUDA graph) generates the same images; cuda_graph=True off the GPU is refused; optimize(all
    False) restores the plain model."""
    kw = dict(num_images=2, steps=2, seed=7, progress=False, return_latents=True)
    _, want = pipe(refs(2), "a dog", **kw)
    try:
        assert pipe.optimize() is pipe and pipe.graphed is None  # cuda_graph defaults to the device: CPU -> off
        assert _unet_state(pipe) == ({True}, {True}, True)
        _, got = pipe(refs(2), "a dog", **kw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="CUDA device"):
            pipe.optimize(cuda_graph=True)
        assert not pipe.unet.config.fuse_ff  # opt-in
        pipe.optimize(fuse_ff=True)
        assert pipe.unet.config.fuse_ff and all(m.fuse_linear for m in pipe.unet.modules() if hasattr(m, "fuse_linear"))
        _, got = pipe(refs(2), "a dog", **kw)  # on the CPU the feed-forward stays unfused: same images
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        pipe.optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False, cuda_graph=False)
    assert _unet_state(pipe) == ({False}, {False}, False) and not pipe.unet.config.fuse_ff
    _, again = pipe(refs(2), "a dog", **kw)
    assert torch.equal(again, want)

    folder = pipe.save_folder(tmp_path / "model")
    refs(1)[0].save(tmp_path / "ref.png")
    rc = sample_main(["--refs", str(tmp_path / "ref.png"), "--prompt", "a dog", "--ckpt", str(folder), "--out",
                      str(tmp_path / "out"), "--num-images", "1", "--steps", "1", "--device", "cpu", "--no-progress",
                      "--fast"])
    assert rc == 0 and (tmp_path / "out" / "00_00.png").is_file()


def test_optimize_compile_routes_every_step_through_the_compiled_unet(pipe, monkeypatch):
    """optimize(compile=True): the denoising steps call torch.compile's module (a counting stand-in here: inductor on
    the CPU takes minutes), the images are unchanged, and optimize() without it drops the compiled module."""
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a, **kw):
            calls.append(1)
            return self.m(*a, **kw)

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Counting(m))
    kw = dict(num_images=1, steps=2, seed=3, progress=False, return_latents=True)
    _, want = pipe(refs(1), "a dog", **kw)
    try:
        pipe.optimize(compile=True)
        assert isinstance(pipe.compiled, Counting) and pipe.step_unet is pipe.compiled and pipe.graphed is None
        _, got = pipe(refs(1), "a dog", **kw)
        assert len(calls) >= 2  # every step (guidance branches may share a call)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        pipe.optimize()
        assert pipe.compiled is None and pipe.step_unet is pipe.unet
    finally:
        pipe.optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False, cuda_graph=False)


def test_optimize_compile_graphs_the_compiled_module(pipe, monkeypatch):
    """optimize(compile=True) with a CUDA graph wraps the compiled module in the graph runner, and so does to() when
    it re-captures, without asking the module for its truth value: torch.compile's module answers bool() with
    len(), a TypeError for the UNet (it broke optimize on the H100 on 2026-11-27). CPU stand-ins for the compiled
    module, the graph runner and the device."""
    import jedi.runtime

    class Compiled(torch.nn.Module):  # like torch's OptimizedModule: no truth value
        def __init__(self, m):
            super().__init__()
            self.m = m

        def __len__(self):
            raise TypeError(f"{type(self.m).__name__} does not support len()")

    wrapped = []

    class Graphed:
        def __init__(self, m):
            wrapped.append(m)

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Compiled(m))
    monkeypatch.setattr(jedi.runtime, "GraphedUNet", Graphed)
    monkeypatch.setattr(JeDiPipeline, "device", property(lambda self: torch.device("cuda")))
    try:
        pipe.optimize(compile=True)
        assert isinstance(pipe.compiled, Compiled) and wrapped == [pipe.compiled]
        assert isinstance(pipe.graphed, Graphed) and pipe.step_unet is pipe.graphed
        pipe.to("cpu")  # captured graphs read the old buffers: a new runner over the same compiled module
        assert wrapped == [pipe.compiled, pipe.compiled]
    finally:
        pipe.optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False, cuda_graph=False)
    assert pipe.compiled is None and pipe.graphed is None


@pytest.mark.gpu
def test_optimize_compile_on_cuda_matches(pipe):
    """On a GPU: torch.compile inside the CUDA graph gives the plain pipeline's images."""
    kw = dict(num_images=2, steps=2, seed=9, progress=False, return_latents=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        pipe.to("cuda")
        _, want = pipe(refs(2), "a dog", **kw)
        pipe.optimize(compile=True)
        assert pipe.graphed is not None and pipe.graphed.unet is pipe.compiled
        _, got = pipe(refs(2), "a dog", **kw)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        pipe.optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False, cuda_graph=False)
        pipe.to("cpu")
        torch._dynamo.reset()


@pytest.mark.gpu
def test_optimize_on_cuda_replays_graphs_and_matches(pipe):
    """On a GPU: optimize() turns on the CUDA graph by default; the images match the plain fp32 pipeline's."""
    kw = dict(num_images=2, steps=3, seed=8, progress=False, return_latents=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # NCHW vs NHWC algorithms
    try:
        pipe.to("cuda")
        _, want = pipe(refs(2), "a dog", **kw)
        pipe.optimize()
        assert pipe.graphed is not None
        _, got = pipe(refs(2), "a dog", **kw)
        assert pipe.graphed.captures == 1  # one batch shape: one capture, replayed for every step
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        pipe.to("cpu")
        assert pipe.graphed is None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        pipe.optimize(channels_last=False, fused_ops=False, fuse_qkv=False, fuse_context_kv=False, cuda_graph=False)
        pipe.to("cpu")


def test_unet_config_diffusers_roundtrip():
    cfg = UNetConfig.sd_v1()
    d = unet_config_to_diffusers(cfg)
    assert d["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert d["attention_head_dim"] == 8 and d["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet_config_from_diffusers(d) == cfg
    assert unet_config_from_diffusers({**d, "in_channels": 4}).in_channels == 9  # SD's 4 channels -> JeDi's 9
    sd2 = unet_config_from_diffusers({**d, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True})
    assert sd2.num_head_channels == 64 and sd2.use_linear_in_transformer
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers({**d, "class_embed_type": "timestep"})
    diffusers = pytest.importorskip("diffusers")
    tiny = UNetConfig.tiny()
    ref = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(tiny))
    from jedi.weights import to_diffusers_state_dict

    ours = {k: v.shape for k, v in to_diffusers_state_dict(JeDiUNet(tiny), marker=False).items()}
    assert ours == {k: v.shape for k, v in ref.state_dict().items()}


def test_sd_v1_text_encoder_config():
    from jedi.pipeline import clip_vit_l14_text_config

    with torch.device("meta"):
        text = CLIPTextModel(clip_vit_l14_text_config())
    assert sum(p.numel() for p in text.parameters()) == 123_060_480  # CLIP ViT-L/14's text tower
    assert text.config.max_position_embeddings == 77 and text.config.hidden_size == 768
