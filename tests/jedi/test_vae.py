"""jedi.vae: LDM structure and names, equivalence with diffusers' AutoencoderKL, weight layouts, encode/decode."""
from __future__ import annotations

import pytest
import torch

from jedi.vae import AutoencoderKL, VAEConfig, load_vae_weights, to_diffusers_vae_state_dict
from jedi_kernels.testing import assert_close_verbose
from jedi.testing import randomize_weights_ as randomize_


@pytest.fixture(scope="module")
def tiny():
    return randomize_(AutoencoderKL(VAEConfig.tiny())).eval()


def test_sd_v1_structure_and_names():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd_v1())
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD v1's kl-f8 (diffusers counts the same)
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight",
              "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.bias",
              "quant_conv.weight", "post_quant_conv.weight", "decoder.up.3.upsample.conv.weight",
              "decoder.up.0.block.2.conv2.weight", "decoder.norm_out.weight"):
        assert k in sd, k
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    # LDM stores decoder.up by level: up.0 is full resolution (128 wide), up.3 the deepest (512 wide)
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert VAEConfig.sd_v1().downsample == 8 and VAEConfig.tiny().downsample == 2


def test_equivalence_with_diffusers(tiny):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32).eval()
    randomize_(ref, seed=1)
    ours = AutoencoderKL(VAEConfig.tiny()).eval()
    report = load_vae_weights(ours, ref.state_dict())
    assert report == {"missing": [], "unexpected": []}
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        mean_ref = ref.encode(x).latent_dist.mean
        mean = ours.encode(x) / ours.config.scale_factor
        assert_close_verbose(mean, mean_ref, atol=1e-4, name="posterior mean")
        z = torch.randn(2, 4, 8, 6)
        assert_close_verbose(ours.decode(z * 0.18215), ref.decode(z).sample, atol=1e-4, name="decode")
    # and back: our export loads into diffusers with identical tensors
    ref2 = diffusers.AutoencoderKL(**ref.config).eval()
    ref2.load_state_dict(to_diffusers_vae_state_dict(ours))
    for k, v in ref.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v), k


def test_ldm_single_file_layout_roundtrip(tiny, tmp_path):
    from safetensors.torch import save_file

    ckpt = {"first_stage_model." + k: v.clone() for k, v in tiny.state_dict().items()}
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts are ignored
    ckpt["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only
    save_file(ckpt, tmp_path / "sd.safetensors")
    vae = AutoencoderKL(VAEConfig.tiny())
    load_vae_weights(vae, tmp_path / "sd.safetensors")
    for k, v in tiny.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v), k
    # diffusers layout, including the pre-0.14 attention names (query/key/value/proj_attn)
    d = to_diffusers_vae_state_dict(tiny)
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in d.items()}
    for src in (d, old):
        vae = AutoencoderKL(VAEConfig.tiny())
        load_vae_weights(vae, src)
        for k, v in tiny.state_dict().items():
            assert torch.equal(vae.state_dict()[k], v), k


def test_encode_decode_shapes_sampling_and_dtype(tiny):
    x = torch.rand(3, 3, 8, 16) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(x)
        assert z.shape == (3, 4, 4, 8) and z.dtype == torch.float32
        s1 = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        s2 = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        assert torch.equal(s1, s2) and not torch.equal(s1, z)
        y = tiny.decode(z)
        assert y.shape == x.shape
        assert tiny.encode(x.double()).dtype == torch.float64  # computed in the weights' dtype, returned in x's
    sd = tiny.state_dict()
    assert sd["decoder.up.1.block.0.conv1.weight"].shape == (64, 64, 3, 3)  # deepest level first at run time
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tiny.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="unrecognized"):
        load_vae_weights(AutoencoderKL(VAEConfig.tiny()), {"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        load_vae_weights(AutoencoderKL(VAEConfig.tiny()), {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vae_weights(AutoencoderKL(VAEConfig.tiny(ch=64)), tiny.state_dict())
    with pytest.raises(FileNotFoundError):
        load_vae_weights(AutoencoderKL(VAEConfig.tiny()), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="multiple of 32"):
        VAEConfig(ch=40)
