"""JeDiUNet: structure (names, parameter counts), forward semantics, equivalence with diffusers, dtypes, memory
formats, gradient checkpointing, torch.compile, input validation, UNetConfig."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jedi import JeDiUNet, UNetConfig, load_unet_weights
from jedi.unet import ResBlock, SpatialTransformer, TransformerBlock, timestep_embedding
from jedi_kernels import prepare_inputs_reference
from jedi_kernels.testing import assert_close_verbose
from jedi.testing import randomize_weights_ as randomize_

SD_V1_PARAMS_4CH = 859_520_964  # SD v1.4/1.5 UNet (diffusers' UNet2DConditionModel agrees)
CONV_IN_DELTA_9CH = 5 * 320 * 3 * 3  # five more input channels of the 320-wide 3x3 conv_in


def make_inputs(cfg: UNetConfig, N: int = 2, hw: int = 16, M: int = 7, dtype=torch.float32, generate=None):
    """Random forward inputs: x_t, timesteps, context, x0, ng_mask (first image references, the rest generated)."""
    C = cfg.out_channels
    ng_mask = torch.ones(N, dtype=torch.bool) if generate is None else generate
    if generate is None:
        ng_mask[0] = False
    return dict(
        x_t=torch.randn(N, C, hw, hw, dtype=dtype),
        timesteps=torch.randint(0, 1000, (N,)),
        context=torch.randn(N, M, cfg.context_dim, dtype=dtype),
        x0=torch.randn(N, C, hw, hw, dtype=dtype),
        ng_mask=ng_mask,
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(JeDiUNet(UNetConfig.tiny())).eval()


# ---- structure --------------------------------------------------------------------------------------------------
def test_sd_v1_parameter_count():
    with torch.device("meta"):
        unet9 = JeDiUNet(UNetConfig.sd_v1())
        unet4 = JeDiUNet(UNetConfig.sd_v1(in_channels=4))
    assert sum(p.numel() for p in unet4.parameters()) == SD_V1_PARAMS_4CH
    assert sum(p.numel() for p in unet9.parameters()) == SD_V1_PARAMS_4CH + CONV_IN_DELTA_9CH == 859_535_364
    assert len(unet9.state_dict()) == 686


def test_sd_v1_ldm_names():
    with torch.device("meta"):
        sd = JeDiUNet(UNetConfig.sd_v1()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 9, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.0.weight": (320,),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.7.1.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.transformer_blocks.0.attn1.to_k.weight": (1280, 1280),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, f"{k}: {shapes.get(k)} != {shape}"
    assert not any("attentions" in k or "resnets" in k for k in shapes)


def test_sd_v1_structure_facts():
    with torch.device("meta"):
        unet = JeDiUNet(UNetConfig.sd_v1())
    attn1 = [m.attn1 for m in unet.modules() if isinstance(m, TransformerBlock)]
    assert len(attn1) == 16 and {a.heads for a in attn1} == {8} and {a.dim_head for a in attn1} == {40, 80, 160}
    assert all(m.num_groups == 32 for m in unet.modules() if isinstance(m, nn.GroupNorm))
    st_eps = {m.norm.eps for m in unet.modules() if isinstance(m, SpatialTransformer)}
    rb_eps = {n.eps for m in unet.modules() if isinstance(m, ResBlock) for n in (m.in_layers[0], m.out_layers[0])}
    assert st_eps == {1e-6} and rb_eps == {1e-5} and unet.out[0].eps == 1e-5
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12


def test_timestep_embedding_cos_first():
    t = torch.tensor([0, 1, 10, 999])
    e = timestep_embedding(t, 320)
    half = 160
    freqs = torch.tensor([10000 ** (-k / half) for k in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    assert_close_verbose(e, torch.cat([args.cos(), args.sin()], -1), atol=2e-4, name="embedding")
    assert e.dtype == torch.float32 and torch.all(e[0, :half] == 1) and torch.all(e[0, half:] == 0)


# ---- forward semantics ------------------------------------------------------------------------------------------
def test_forward_shape_and_dtype(tiny):
    inp = make_inputs(tiny.config, N=4)
    with torch.no_grad():
        eps = tiny(**inp, set_size=2)
    assert eps.shape == (4, 4, 16, 16) and eps.dtype == torch.float32 and torch.isfinite(eps).all()


def test_fresh_model_starts_at_zero():
    """LDM's init: every residual branch and the output conv start at zero."""
    unet = JeDiUNet(UNetConfig.tiny())
    with torch.no_grad():
        eps = unet(**make_inputs(unet.config), set_size=2)
    assert torch.all(eps == 0)


def test_set_size_makes_images_interact(tiny):
    """set_size=2: image 0's eps depends on image 1's input; set_size=1: it does not."""
    inp = make_inputs(tiny.config, N=2)
    other = dict(inp, x_t=inp["x_t"].clone())
    other["x_t"][1] += 1.0
    with torch.no_grad():
        for G, interacts in ((2, True), (1, False)):
            a = tiny(**inp, set_size=G)[0]
            b = tiny(**other, set_size=G)[0]
            assert bool((a - b).abs().max() > 1e-4) == interacts, f"set_size={G}"


def test_identity_set_mask_equals_set_size_1(tiny):
    inp = make_inputs(tiny.config, N=4)
    with torch.no_grad():
        single = tiny(**inp, set_size=1)
        masked = tiny(**inp, set_size=2, set_mask=torch.eye(2, dtype=torch.bool))
    assert_close_verbose(masked, single, atol=1e-5, name="eye set_mask vs set_size=1")


def test_ng_mask_hides_x0_of_generated_images(tiny):
    """Generated images (mask 1) never see x0; references (mask 0) do."""
    inp = make_inputs(tiny.config, N=2)
    other = dict(inp, x0=inp["x0"] + 1.0)
    with torch.no_grad():
        a = tiny(**inp, set_size=1)
        b = tiny(**other, set_size=1)
    assert torch.equal(a[1], b[1])  # image 1 is generated: its masked x0 is zero either way
    assert (a[0] - b[0]).abs().max() > 1e-4


def test_timesteps_scalar_and_vector_agree(tiny):
    inp = make_inputs(tiny.config, N=2)
    with torch.no_grad():
        ref = tiny(**dict(inp, timesteps=torch.tensor([321, 321])), set_size=2)
        for t in (torch.tensor(321), torch.tensor([321]), 321):
            assert_close_verbose(tiny(**dict(inp, timesteps=t), set_size=2), ref, atol=0, name=f"timesteps={t!r}")


def test_context_any_length(tiny):
    with torch.no_grad():
        for M in (1, 77, 80):
            assert tiny(**make_inputs(tiny.config, N=2, M=M), set_size=2).shape == (2, 4, 16, 16)


def test_non_square_and_larger_latents(tiny):
    inp = make_inputs(tiny.config, N=2)
    inp["x_t"] = torch.randn(2, 4, 12, 20)
    inp["x0"] = torch.randn(2, 4, 12, 20)
    with torch.no_grad():
        assert tiny(**inp, set_size=2).shape == (2, 4, 12, 20)


# ---- validation ---------------------------------------------------------------------------------------------------
def _bad_cases():
    return [
        ("x_t", lambda d: d.update(x_t=torch.randn(4, 4, 16))),
        ("x_t", lambda d: d.update(x_t=torch.randn(4, 3, 16, 16), x0=torch.randn(4, 3, 16, 16))),
        ("x_t", lambda d: d.update(x_t=torch.randn(4, 4, 18, 16), x0=torch.randn(4, 4, 18, 16))),
        ("x0", lambda d: d.update(x0=torch.randn(4, 4, 8, 8))),
        ("set_size", lambda d: d.update(set_size=3)),
        ("set_size", lambda d: d.update(set_size=0)),
        ("ng_mask", lambda d: d.update(ng_mask=torch.ones(3, dtype=torch.bool))),
        ("context", lambda d: d.update(context=torch.randn(4, 7, 31))),
        ("context", lambda d: d.update(context=torch.randn(2, 7, 32))),
        ("context", lambda d: d.update(context=torch.randn(4, 32))),
        ("timesteps", lambda d: d.update(timesteps=torch.zeros(3))),
        ("set_mask", lambda d: d.update(set_mask=torch.ones(3, 3, dtype=torch.bool))),
        ("set_mask", lambda d: d.update(set_mask=torch.tensor([[True, False], [False, False]]))),
    ]


@pytest.mark.parametrize("name,edit", _bad_cases(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_bad_cases())])
def test_bad_inputs_raise_value_error_naming_the_argument(tiny, name, edit):
    inp = dict(make_inputs(tiny.config, N=4), set_size=2)
    edit(inp)
    with pytest.raises(ValueError, match=name), torch.no_grad():
        tiny(**inp)


def test_four_channel_unet_refuses_forward():
    unet = JeDiUNet(UNetConfig.tiny(in_channels=4))
    with pytest.raises(ValueError, match="x_t"):
        unet(**make_inputs(unet.config), set_size=2)


# ---- dtypes, memory formats, checkpointing, compile -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_fp32_loosely(tiny, dtype):
    inp = make_inputs(tiny.config, N=4)
    low = JeDiUNet(tiny.config)
    low.load_state_dict(tiny.state_dict())
    low = low.to(dtype).eval()
    with torch.no_grad():
        ref = tiny(**inp, set_size=2)
        lo_inp = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inp.items()}
        out = low(**lo_inp, set_size=2)
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"{dtype}: relative error {err:.3g}"


def test_channels_last_matches_contiguous(tiny):
    inp = make_inputs(tiny.config, N=4)
    cl = JeDiUNet(tiny.config)
    cl.load_state_dict(tiny.state_dict())
    cl = cl.to(memory_format=torch.channels_last).eval()
    cl_inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
                  x0=inp["x0"].to(memory_format=torch.channels_last))
    with torch.no_grad():
        ref = tiny(**inp, set_size=2)
        out = cl(**cl_inp, set_size=2)
    assert_close_verbose(out, ref, atol=1e-5, name="channels-last")


def _grads(unet, inp, checkpointing: bool):
    unet.zero_grad(set_to_none=True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    x_t = inp["x_t"].clone().requires_grad_(True)
    eps = unet(**dict(inp, x_t=x_t), set_size=2)
    (eps * torch.linspace(-1, 1, eps.numel()).view_as(eps)).sum().backward()
    unet.disable_gradient_checkpointing()
    return x_t.grad, {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_gradient_checkpointing_gives_the_same_grads():
    unet = randomize_(JeDiUNet(UNetConfig.tiny())).train()
    inp = make_inputs(unet.config, N=2)
    gx_ref, g_ref = _grads(unet, inp, False)
    gx, g = _grads(unet, inp, True)
    assert_close_verbose(gx, gx_ref, atol=1e-6, name="dx_t")
    for n in g_ref:
        assert_close_verbose(g[n], g_ref[n], atol=1e-6, name=n)
    assert JeDiUNet(UNetConfig.tiny(use_checkpoint=True)).gradient_checkpointing


def test_torch_compile_fullgraph_aot_eager(tiny):
    torch._dynamo.reset()
    inp = make_inputs(tiny.config, N=4)
    compiled = torch.compile(tiny, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ref = tiny(**inp, set_size=2)
        out = compiled(**inp, set_size=2)
    assert_close_verbose(out, ref, atol=1e-5, name="compiled")


def test_torch_compile_fullgraph_training_step():
    torch._dynamo.reset()
    # two levels keep tracing short; every block type (attention, down/upsampling, skips) is still there
    unet = randomize_(JeDiUNet(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1,)))).train()
    inp = make_inputs(unet.config, N=2)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    compiled(**inp, set_size=2, set_mask=torch.tensor([[True, False], [True, True]])).square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


# ---- equivalence with diffusers --------------------------------------------------------------------------------------
def diffusers_unet(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel with the architecture of ``cfg`` (SD v1 block types)."""
    diffusers = pytest.importorskip("diffusers")
    levels = range(cfg.levels)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(m * cfg.model_channels for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if cfg.has_attention(i) else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if cfg.has_attention(i) else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' SD v1 configs pass the head COUNT under this name
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


class JointAttnProcessor:
    """diffusers attention processor for attn1 running JeDi's joint attention: (B*G, L, C) -> (B, G*L, C)."""

    def __init__(self, set_size: int, set_mask=None):
        self.set_size, self.set_mask = set_size, set_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None, "install on attn1 (self-attention) only"
        N, L, C = hidden_states.shape
        G, H = self.set_size, attn.heads
        B = N // G
        x = hidden_states.reshape(B, G * L, C)  # (N, L, C) -> (B, G*L, C)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        D = q.shape[-1] // H
        q, k, v = (t.view(B, G * L, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, G*L, D)
        mask = None
        if self.set_mask is not None:  # (G, G) -> (G*L, G*L)
            mask = self.set_mask.repeat_interleave(L, 0).repeat_interleave(L, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, G * L, H * D)  # (B, H, G*L, D) -> (B, G*L, H*D)
        o = attn.to_out[1](attn.to_out[0](o))
        return o.reshape(N, L, C)  # (B, G*L, C) -> (N, L, C)


def set_joint_processors(dm, set_size: int, set_mask=None):
    from diffusers.models.attention_processor import AttnProcessor2_0

    dm.set_attn_processor({
        name: JointAttnProcessor(set_size, set_mask) if name.endswith("attn1.processor") else AttnProcessor2_0()
        for name in dm.attn_processors
    })


@pytest.fixture(scope="module")
def pair():
    """(diffusers UNet with random weights, JeDiUNet loaded from its state dict)."""
    cfg = UNetConfig.tiny()
    dm = randomize_(diffusers_unet(cfg), seed=1).eval()
    unet = JeDiUNet(cfg).eval()
    report = load_unet_weights(unet, dm.state_dict(), conv_in_order="jedi")
    assert report.layout == "diffusers" and report.conv_in == "as-is"
    return dm, unet


@pytest.mark.parametrize(
    "G,set_mask",
    [(1, None), (2, None), (2, [[True, False], [True, True]]), (4, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])],
    ids=["set_size1", "joint2", "joint2-mask", "joint4-mask"],
)
def test_matches_diffusers(pair, G, set_mask):
    dm, unet = pair
    if set_mask is not None:
        set_mask = torch.tensor(set_mask, dtype=torch.bool)
    N = 4
    inp = make_inputs(unet.config, N=N, M=77, generate=torch.tensor([False, True, True, False]))
    set_joint_processors(dm, G, set_mask)
    with torch.no_grad():
        ref = dm(prepare_inputs_reference(inp["x_t"], inp["x0"], inp["ng_mask"]), inp["timesteps"],
                 inp["context"]).sample
        out = unet(**inp, set_size=G, set_mask=set_mask)
    assert ref.abs().max() > 0.1  # a meaningful comparison
    assert_close_verbose(out, ref, atol=1e-4, name=f"JeDiUNet vs diffusers (G={G})")


def test_timestep_embedding_matches_diffusers():
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 3, 500, 999])
    ref = emb.get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert_close_verbose(timestep_embedding(t, 320), ref, atol=1e-6, name="timestep embedding")


# ---- config -------------------------------------------------------------------------------------------------------
V1_YAML = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
{extra}
"""


def test_config_from_yaml(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "v1-inference.yaml"
    path.write_text(V1_YAML.format(in_channels=4, extra=""))
    cfg = UNetConfig.from_yaml(path)
    assert cfg.in_channels == 4  # nothing forced
    assert not cfg.use_checkpoint  # LDM's training flag is recorded, not applied
    assert cfg.extra == {"image_size": 32, "use_spatial_transformer": True, "use_checkpoint": True, "legacy": False}
    assert UNetConfig.from_yaml(path, in_channels=9) == UNetConfig.sd_v1()
    assert UNetConfig.from_yaml(path, in_channels=9, use_checkpoint=True).use_checkpoint
    path.write_text(V1_YAML.format(in_channels=9, extra="        some_new_key: 3"))
    with pytest.warns(UserWarning, match="some_new_key"):
        assert UNetConfig.from_yaml(path).in_channels == 9
    path.write_text(V1_YAML.format(in_channels=9, extra="        use_scale_shift_norm: True"))
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        UNetConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError):
        UNetConfig.from_yaml(tmp_path / "nope.yaml")


def test_config_validation():
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetConfig(model_channels=48)
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        UNetConfig.tiny(attn_backend="cudnn")
    cfg = UNetConfig.sd_v1()
    assert [cfg.heads_and_dim(c) for c in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
    assert UNetConfig.sd_v1(num_head_channels=64).heads_and_dim(320) == (5, 64)


def test_linear_projection_variant():
    """SD v2-style Linear proj_in/proj_out (use_linear_in_transformer) builds and runs."""
    unet = randomize_(JeDiUNet(UNetConfig.tiny(use_linear_in_transformer=True))).eval()
    assert unet.input_blocks[1][1].proj_in.weight.shape == (32, 32)
    with torch.no_grad():
        assert torch.isfinite(unet(**make_inputs(unet.config), set_size=2)).all()


# ---- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_sd_v1_fp16_forward(backend):
    """SD v1 at 512 px (64x64 latents), fp16, set size 2 with a CFG batch: finite, and the Triton attention backend
    agrees with torch SDPA."""
    import jedi_kernels as jk

    if backend == "triton" and not jk.available_backends()["triton"]:
        pytest.skip("triton backend unavailable")
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = JeDiUNet(UNetConfig.sd_v1())
    unet = randomize_(unet.to_empty(device="cuda")).half().eval()
    inp = {k: v.cuda() for k, v in make_inputs(unet.config, N=4, hw=64, M=77, dtype=torch.float16).items()}
    with torch.no_grad():
        ref = unet(**inp, set_size=2)
        unet.set_attn_backend(backend)
        out = unet(**inp, set_size=2)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 2e-2, f"relative error {err:.3g}"


@pytest.mark.gpu
def test_gpu_tiny_matches_cpu(tiny):
    inp = make_inputs(tiny.config, N=4)
    gpu = JeDiUNet(tiny.config)
    gpu.load_state_dict(tiny.state_dict())
    gpu = gpu.cuda().eval()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = tiny(**inp, set_size=2)
            out = gpu(**{k: v.cuda() for k, v in inp.items()}, set_size=2).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert_close_verbose(out, ref, atol=1e-4, name="cuda vs cpu (fp32, no tf32)")
