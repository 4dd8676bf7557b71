"""jedi.weights: layouts (LDM single file, bare LDM UNet, diffusers), EMA names, conv_in conversion, file formats,
round trips, error reporting. SD v1 shapes are checked on the meta device (no 3.4 GB allocation)."""
from __future__ import annotations

import pytest
import torch

from jedi import (
    JeDiUNet,
    UNetConfig,
    load_unet_weights,
    to_diffusers_state_dict,
    to_ldm_state_dict,
)
from jedi.weights import MARKER_KEY
from jedi_kernels.testing import assert_equal_verbose


# ---- an independent description of SD v1's LDM keys --------------------------------------------------------------
def _resblock(p, cin, cout, emb=1280):
    d = {
        f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
        f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
        f"{p}.emb_layers.1.weight": (cout, emb), f"{p}.emb_layers.1.bias": (cout,),
        f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
        f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        d.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})
    return d


def _transformer(p, c, ctx=768):
    b = f"{p}.transformer_blocks.0"
    d = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.proj_in.weight": (c, c, 1, 1),
         f"{p}.proj_in.bias": (c,), f"{p}.proj_out.weight": (c, c, 1, 1), f"{p}.proj_out.bias": (c,)}
    for a, kv in (("attn1", c), ("attn2", ctx)):
        d.update({f"{b}.{a}.to_q.weight": (c, c), f"{b}.{a}.to_k.weight": (c, kv), f"{b}.{a}.to_v.weight": (c, kv),
                  f"{b}.{a}.to_out.0.weight": (c, c), f"{b}.{a}.to_out.0.bias": (c,)})
    for n in ("norm1", "norm2", "norm3"):
        d.update({f"{b}.{n}.weight": (c,), f"{b}.{n}.bias": (c,)})
    d.update({f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
              f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,)})
    return d


def sd_v1_ldm_shapes(in_channels=4) -> dict[str, tuple]:
    """SD v1's ``model.diffusion_model`` keys and shapes, written out from the CompVis block table."""
    d = {"time_embed.0.weight": (1280, 320), "time_embed.0.bias": (1280,), "time_embed.2.weight": (1280, 1280),
         "time_embed.2.bias": (1280,), "input_blocks.0.0.weight": (320, in_channels, 3, 3),
         "input_blocks.0.0.bias": (320,)}
    # input block i: (in, out, attention?) ; downsamples at 3, 6, 9
    table = {1: (320, 320, 1), 2: (320, 320, 1), 4: (320, 640, 1), 5: (640, 640, 1), 7: (640, 1280, 1),
             8: (1280, 1280, 1), 10: (1280, 1280, 0), 11: (1280, 1280, 0)}
    for i, (cin, cout, attn) in table.items():
        d.update(_resblock(f"input_blocks.{i}.0", cin, cout))
        if attn:
            d.update(_transformer(f"input_blocks.{i}.1", cout))
    for i, c in ((3, 320), (6, 640), (9, 1280)):
        d.update({f"input_blocks.{i}.0.op.weight": (c, c, 3, 3), f"input_blocks.{i}.0.op.bias": (c,)})
    d.update(_resblock("middle_block.0", 1280, 1280))
    d.update(_transformer("middle_block.1", 1280))
    d.update(_resblock("middle_block.2", 1280, 1280))
    # output block i: (in = h + skip, out, attention?, upsample?)
    table = {0: (2560, 1280, 0, 0), 1: (2560, 1280, 0, 0), 2: (2560, 1280, 0, 1), 3: (2560, 1280, 1, 0),
             4: (2560, 1280, 1, 0), 5: (1920, 1280, 1, 1), 6: (1920, 640, 1, 0), 7: (1280, 640, 1, 0),
             8: (960, 640, 1, 1), 9: (960, 320, 1, 0), 10: (640, 320, 1, 0), 11: (640, 320, 1, 0)}
    for i, (cin, cout, attn, up) in table.items():
        d.update(_resblock(f"output_blocks.{i}.0", cin, cout))
        if attn:
            d.update(_transformer(f"output_blocks.{i}.1", cout))
        if up:
            j = 2 if attn else 1
            d.update({f"output_blocks.{i}.{j}.conv.weight": (cout, cout, 3, 3), f"output_blocks.{i}.{j}.conv.bias": (cout,)})
    d.update({"out.0.weight": (320,), "out.0.bias": (320,), "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,)})
    return d


def meta_sd_v1():
    with torch.device("meta"):
        return JeDiUNet(UNetConfig.sd_v1())


def test_sd_v1_ldm_key_table_matches_the_model():
    table = sd_v1_ldm_shapes(in_channels=9)
    ours = {k: tuple(v.shape) for k, v in meta_sd_v1().state_dict().items()}
    assert set(table) == set(ours), f"only in table: {set(table) - set(ours)}; only in model: {set(ours) - set(table)}"
    assert {k: v for k, v in ours.items() if table[k] != v} == {}
    n = sum(torch.Size(s).numel() for s in sd_v1_ldm_shapes(in_channels=4).values())
    assert n == 859_520_964


def test_load_sd_v1_ldm_checkpoint_on_meta():
    """A full LDM single file (UNet + VAE + text encoder + schedule, EMA copy) with SD v1.4 shapes, all on meta."""
    ckpt = {"model.diffusion_model." + k: torch.empty(s, device="meta") for k, s in sd_v1_ldm_shapes().items()}
    ckpt.update({"first_stage_model.encoder.conv_in.weight": torch.empty(128, 3, 3, 3, device="meta"),
                 "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
                     torch.empty(49408, 768, device="meta"),
                 "betas": torch.empty(1000, device="meta"), "alphas_cumprod": torch.empty(1000, device="meta")})
    unet = meta_sd_v1()
    report = load_unet_weights(unet, ckpt)
    assert report.layout == "ldm" and report.ignored == 4 and report.conv_in.startswith("widened 4->9")
    assert unet.input_blocks[0][0].weight.shape == (320, 9, 3, 3)


def test_sd_v1_diffusers_names_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        dm = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD v1 defaults
    theirs = {k: tuple(v.shape) for k, v in dm.state_dict().items()}
    unet = meta_sd_v1()
    ours = {k: tuple(v.shape) for k, v in to_diffusers_state_dict(unet, marker=False).items()}
    assert set(ours) == set(theirs)
    assert {k for k in ours if ours[k] != theirs[k]} == {"conv_in.weight"}  # 9 vs 4 input channels
    report = load_unet_weights(unet, dm.state_dict())
    assert report.layout == "diffusers" and report.conv_in.startswith("widened")


# ---- tiny models with real values -----------------------------------------------------------------------------------
def random_ldm_unet_dict(cfg: UNetConfig, in_channels: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every key of a bare LDM UNet dict of ``cfg`` (conv_in optionally of another width)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in JeDiUNet(cfg).state_dict().items()}
    if in_channels is not None:
        shapes["input_blocks.0.0.weight"] = torch.Size((cfg.model_channels, in_channels, 3, 3))
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def assert_same_weights(unet, sd: dict[str, torch.Tensor]):
    ours = unet.state_dict()
    assert set(ours) == set(sd)
    for k in sd:
        assert_equal_verbose(ours[k], sd[k], name=k)


@pytest.fixture
def cfg():
    return UNetConfig.tiny()


def test_round_trip_ldm_ours_diffusers_ours(cfg):
    src = random_ldm_unet_dict(cfg)
    single_file = {"model.diffusion_model." + k: v for k, v in src.items()}
    a = JeDiUNet(cfg)
    r = load_unet_weights(a, single_file, conv_in_order="jedi")
    assert (r.layout, r.conv_in, r.ignored) == ("ldm", "as-is", 0)
    assert_same_weights(a, src)
    diff = to_diffusers_state_dict(a)
    assert MARKER_KEY in diff and "conv_in.weight" in diff and "down_blocks.0.resnets.0.conv1.weight" in diff
    b = JeDiUNet(cfg)
    r = load_unet_weights(b, diff)  # auto: the marker says JeDi order
    assert (r.layout, r.conv_in, r.ignored) == ("diffusers", "as-is", 1)
    assert_same_weights(b, src)
    c = JeDiUNet(cfg)
    load_unet_weights(c, to_ldm_state_dict(b))
    assert_same_weights(c, src)
    d = JeDiUNet(cfg)
    assert load_unet_weights(d, to_ldm_state_dict(b, prefix="")).layout == "ldm_unet"
    assert_same_weights(d, src)


def test_diffusers_names_generic_over_configs():
    """Name maps follow the config: other level counts, res blocks and attention levels still round-trip."""
    for cfg in (UNetConfig.tiny(num_res_blocks=2, attention_resolutions=(2, 4), channel_mult=(1, 1, 2)),
                UNetConfig.tiny(channel_mult=(1,), attention_resolutions=(1,)),
                UNetConfig.tiny(transformer_depth=2)):
        src = random_ldm_unet_dict(cfg)
        a = JeDiUNet(cfg)
        load_unet_weights(a, src, conv_in_order="jedi")
        b = JeDiUNet(cfg)
        load_unet_weights(b, to_diffusers_state_dict(a))
        assert_same_weights(b, src)


def test_conv_in_from_sd_v1_widened_with_zeros(cfg):
    src = random_ldm_unet_dict(cfg, in_channels=4)
    unet = JeDiUNet(cfg)
    assert load_unet_weights(unet, src).conv_in == "widened 4->9 (new channels zero)"
    w = unet.input_blocks[0][0].weight
    assert_equal_verbose(w[:, :4], src["input_blocks.0.0.weight"], name="latent channels")
    assert torch.all(w[:, 4:] == 0)


def test_conv_in_from_sd_inpainting_permuted(cfg):
    src = random_ldm_unet_dict(cfg, in_channels=9)
    old = src["input_blocks.0.0.weight"]  # (x_t 0:4, mask 4, masked 5:9)
    for order, expect in (("auto", "permuted inpaint->jedi"), ("inpaint", "permuted inpaint->jedi")):
        unet = JeDiUNet(cfg)
        assert load_unet_weights(unet, src, conv_in_order=order).conv_in == expect
        w = unet.input_blocks[0][0].weight
        assert_equal_verbose(w[:, 0:4], old[:, 0:4], name="x_t")
        assert_equal_verbose(w[:, 4:8], old[:, 5:9], name="masked x0")
        assert_equal_verbose(w[:, 8], old[:, 4], name="mask")
    unet = JeDiUNet(cfg)
    assert load_unet_weights(unet, src, conv_in_order="jedi").conv_in == "as-is"
    assert_equal_verbose(unet.input_blocks[0][0].weight, old, name="jedi order")
    with pytest.raises(ValueError, match="conv_in_order"):
        load_unet_weights(unet, src, conv_in_order="xyz")


def test_conv_in_of_another_width_raises(cfg):
    with pytest.raises(ValueError, match="conv_in"):
        load_unet_weights(JeDiUNet(cfg), random_ldm_unet_dict(cfg, in_channels=5))


def test_ema_weights(cfg):
    live, ema = random_ldm_unet_dict(cfg, seed=1), random_ldm_unet_dict(cfg, seed=2)
    ckpt = {"model.diffusion_model." + k: v for k, v in live.items()}
    # LitEma: buffer names are the parameter names of the DiffusionWrapper with every dot removed
    ckpt.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()})
    ckpt.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    assert "model_ema.diffusion_modelinput_blocks00weight" in ckpt
    unet = JeDiUNet(cfg)
    r = load_unet_weights(unet, ckpt, conv_in_order="jedi")
    assert not r.use_ema and r.ignored == len(ema) + 2
    assert_same_weights(unet, live)
    r = load_unet_weights(unet, ckpt, use_ema=True, conv_in_order="jedi")
    assert r.use_ema and r.ignored == len(live) + 2
    assert_same_weights(unet, ema)
    with pytest.raises(ValueError, match="model_ema"):
        load_unet_weights(unet, {"model.diffusion_model." + k: v for k, v in live.items()}, use_ema=True)
    with pytest.raises(ValueError, match="use_ema"):
        load_unet_weights(unet, live, use_ema=True)


def test_missing_and_unexpected_keys(cfg):
    src = random_ldm_unet_dict(cfg)
    del src["out.2.bias"], src["middle_block.1.proj_in.weight"]
    src["input_blocks.1.0.foo.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 2 keys: .*out\.2\.bias.*unexpected 1 keys: input_blocks\.1\.0\.foo"):
        load_unet_weights(JeDiUNet(cfg), src, conv_in_order="jedi")
    unet = JeDiUNet(cfg)
    before = unet.out[2].bias.clone()
    r = load_unet_weights(unet, src, strict=False, conv_in_order="jedi")
    assert sorted(r.missing) == ["middle_block.1.proj_in.weight", "out.2.bias"]
    assert r.unexpected == ["input_blocks.1.0.foo.weight"]
    assert torch.equal(unet.out[2].bias, before)
    assert torch.equal(unet.out[2].weight, src["out.2.weight"])


def test_many_missing_keys_are_listed_with_counts(cfg):
    src = random_ldm_unet_dict(cfg)
    n = len(src)
    diffusers_like = {"conv_in.weight": src["input_blocks.0.0.weight"], "bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=rf"missing {n - 1} keys: .*, \.\.\.; unexpected 1 keys: bogus\.weight"):
        load_unet_weights(JeDiUNet(cfg), diffusers_like)


def test_shape_mismatch_raises(cfg):
    src = random_ldm_unet_dict(cfg)
    src["out.2.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch .*out\.2\.weight"):
        load_unet_weights(JeDiUNet(cfg), src, conv_in_order="jedi")


def test_unknown_layout_raises(cfg):
    with pytest.raises(ValueError, match="layout"):
        load_unet_weights(JeDiUNet(cfg), {"encoder.weight": torch.zeros(1)})


def test_dtype_and_device_follow_the_unet(cfg):
    src = random_ldm_unet_dict(cfg)
    unet = JeDiUNet(cfg).to(torch.bfloat16)
    load_unet_weights(unet, {k: v.double() for k, v in src.items()}, conv_in_order="jedi")
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    assert torch.equal(unet.out[2].weight, src["out.2.weight"].bfloat16())


def test_meta_unet_is_materialized(cfg):
    src = random_ldm_unet_dict(cfg)
    with torch.device("meta"):
        unet = JeDiUNet(cfg)
    load_unet_weights(unet, src, conv_in_order="jedi")
    assert not any(p.is_meta for p in unet.parameters())
    assert all(p.requires_grad for p in unet.parameters())
    assert_same_weights(unet, src)


# ---- files -----------------------------------------------------------------------------------------------------------
def test_file_formats(cfg, tmp_path):
    from safetensors.torch import save_file

    src = random_ldm_unet_dict(cfg, in_channels=4)
    single = {"model.diffusion_model." + k: v for k, v in src.items()}
    save_file(single, tmp_path / "sd.safetensors")
    torch.save({"state_dict": single, "global_step": 470000}, tmp_path / "sd.ckpt")
    torch.save(src, tmp_path / "unet.pt")
    folder = tmp_path / "pipe" / "unet"
    folder.mkdir(parents=True)
    a = JeDiUNet(cfg)
    load_unet_weights(a, src)
    save_file(to_diffusers_state_dict(a), folder / "diffusion_pytorch_model.safetensors")  # 9 ch, with marker
    for source, layout, conv_in in ((tmp_path / "sd.safetensors", "ldm", "widened"),
                                    (str(tmp_path / "sd.ckpt"), "ldm", "widened"),
                                    (tmp_path / "unet.pt", "ldm_unet", "widened"),
                                    (tmp_path / "pipe", "diffusers", "as-is"), (folder, "diffusers", "as-is")):
        unet = JeDiUNet(cfg)
        r = load_unet_weights(unet, source)
        assert r.layout == layout and r.conv_in.startswith(conv_in), source
        assert_same_weights(unet, a.state_dict())


def test_hub_id_is_not_resolved(cfg):
    with pytest.raises(FileNotFoundError, match="hub ids are not resolved"):
        load_unet_weights(JeDiUNet(cfg), "runwayml/stable-diffusion-v1-5")


def test_unknown_suffix_and_pickles_refused(cfg, tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="file type"):
        load_unet_weights(JeDiUNet(cfg), tmp_path / "w.npz")
    torch.save({"state_dict": {}, "callback": _NotATensor()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        load_unet_weights(JeDiUNet(cfg), tmp_path / "evil.ckpt")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_unet_weights(JeDiUNet(cfg), tmp_path)


class _NotATensor:
    pass
