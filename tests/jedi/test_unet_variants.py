"""JeDiUNet's two peer configurations (the Table 6 timing workloads): plain SD (``in_channels=4``: x_t alone) and
ELITE-like extra cross-attention context (``extra_context_dim``: every attn2 also attends to extra tokens through its
own key/value projections). Shapes, the attention maths against a hand-written reference, equivalence with diffusers,
weight loading, checkpointing, compile, and input validation."""
from __future__ import annotations

import math

import pytest
import torch

from jedi import JeDiUNet, UNetConfig, load_unet_weights, to_ldm_state_dict
from jedi.unet import CrossAttention
from jedi_kernels.testing import assert_close_verbose
from jedi.testing import randomize_weights_ as randomize_

E, T = 24, 5  # extra-context width and token count of the tiny ELITE-like variant


def sd_inputs(cfg: UNetConfig, N: int = 2, hw: int = 16, M: int = 7) -> dict:
    """Plain-SD forward inputs: x_t, timesteps, context."""
    return dict(x_t=torch.randn(N, cfg.out_channels, hw, hw), timesteps=torch.randint(0, 1000, (N,)),
                context=torch.randn(N, M, cfg.context_dim))


def jedi_inputs(cfg: UNetConfig, N: int = 4, hw: int = 16, M: int = 7) -> dict:
    """JeDi forward inputs: the plain ones + x0 and ng_mask (first image of each pair a reference)."""
    return dict(sd_inputs(cfg, N, hw, M), x0=torch.randn(N, cfg.out_channels, hw, hw),
                ng_mask=torch.tensor([False, True] * (N // 2)))


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return randomize_(JeDiUNet(UNetConfig.tiny(in_channels=4))).eval()


@pytest.fixture(scope="module")
def elite():
    """Plain SD + extra context (the ELITE-like workload)."""
    torch.manual_seed(0)
    return randomize_(JeDiUNet(UNetConfig.tiny(in_channels=4, extra_context_dim=E)), seed=2).eval()


# ---- extra context: parameters, shapes, maths --------------------------------------------------------------------
def test_extra_context_adds_two_projections_per_cross_attention(elite):
    attn2 = [m for m in elite.modules() if isinstance(m, CrossAttention)]
    assert attn2 and all(a.to_k_extra.weight.shape == (a.heads * a.dim_head, E) for a in attn2)
    assert all(a.to_k_extra.bias is None and a.to_v_extra.bias is None for a in attn2)
    names = [k for k in elite.state_dict() if "_extra" in k]
    assert len(names) == 2 * len(attn2) and all(".attn2.to_" in k for k in names)
    base = JeDiUNet(UNetConfig.tiny(in_channels=4))
    extra = sum(2 * E * a.heads * a.dim_head for a in attn2)
    assert sum(p.numel() for p in elite.parameters()) == sum(p.numel() for p in base.parameters()) + extra
    assert not any("_extra" in k for k in base.state_dict())


@pytest.mark.parametrize("in_channels,N,G", [(4, 2, 1), (9, 4, 2)], ids=["plain-sd", "jedi-ng2"])
def test_extra_context_forward_shapes(in_channels, N, G):
    unet = randomize_(JeDiUNet(UNetConfig.tiny(in_channels=in_channels, extra_context_dim=E))).eval()
    inp = sd_inputs(unet.config, N=N, hw=16) if in_channels == 4 else jedi_inputs(unet.config, N=N, hw=16)
    with torch.no_grad():
        out = unet(**inp, set_size=G, extra_context=torch.randn(N, T, E))
        text_only = unet(**inp, set_size=G)
    assert out.shape == (N, 4, 16, 16) and out.dtype == torch.float32
    assert (out - text_only).abs().max() > 1e-3  # the extra tokens reach the output


def _cross_attention_reference(attn: CrossAttention, x, context, extra) -> torch.Tensor:
    """float64 by hand: keys/values of the text and of the extra tokens concatenated, one softmax over both."""
    d = {k: v.double() for k, v in attn.state_dict().items()}
    x, context = x.double(), context.double()
    H, D = attn.heads, attn.dim_head
    k, v = context @ d["to_k.weight"].T, context @ d["to_v.weight"].T  # (N, M, H*D)
    if extra is not None:
        extra = extra.double()
        k = torch.cat([k, extra @ d["to_k_extra.weight"].T], 1)  # (N, M+T, H*D)
        v = torch.cat([v, extra @ d["to_v_extra.weight"].T], 1)
    q = x @ d["to_q.weight"].T
    N, L, _ = q.shape
    q, k, v = (t.reshape(N, t.shape[1], H, D).permute(0, 2, 1, 3) for t in (q, k, v))  # (N, H, *, D)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)  # (N, H, L, M+T)
    o = (p @ v).permute(0, 2, 1, 3).reshape(N, L, H * D)
    return o @ d["to_out.0.weight"].T + d["to_out.0.bias"]


@pytest.mark.parametrize("with_extra", [True, False], ids=["text+extra", "text-only"])
def test_cross_attention_matches_concatenated_kv_reference(with_extra):
    attn = randomize_(CrossAttention(32, 16, heads=2, dim_head=8, extra_context_dim=12)).eval()
    x, ctx, extra = torch.randn(3, 10, 32), torch.randn(3, 7, 16), torch.randn(3, 5, 12) * 3
    extra = extra if with_extra else None
    with torch.no_grad():
        out = attn(x, ctx, extra)
    assert_close_verbose(out, _cross_attention_reference(attn, x, ctx, extra), atol=1e-5, name="attn2 + extra")


def test_unet_without_extra_context_equals_the_base_unet(elite):
    """extra_context=None attends to the text alone: the base UNet with the same weights gives the same eps."""
    base = JeDiUNet(UNetConfig.tiny(in_channels=4)).eval()
    missing, unexpected = base.load_state_dict(elite.state_dict(), strict=False)
    assert not missing and all("_extra" in k for k in unexpected) and unexpected
    inp = sd_inputs(elite.config, N=2)
    with torch.no_grad():
        assert torch.equal(elite(**inp), base(**inp))


def test_extra_context_gradients_and_checkpointing_agree():
    cfg = UNetConfig.tiny(in_channels=4, extra_context_dim=E, channel_mult=(1, 2), attention_resolutions=(1,))
    unet = randomize_(JeDiUNet(cfg)).train()
    inp = sd_inputs(cfg, N=2, hw=8)
    extra = torch.randn(2, T, E, requires_grad=True)

    def grads():
        unet.zero_grad(set_to_none=True)
        extra.grad = None
        unet(**inp, extra_context=extra).square().mean().backward()
        return extra.grad.clone(), unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k_extra.weight.grad.clone()

    g_plain = grads()
    unet.enable_gradient_checkpointing()
    g_ckpt = grads()
    unet.disable_gradient_checkpointing()
    assert g_plain[0].abs().max() > 0 and g_plain[1].abs().max() > 0
    for a, b, name in zip(g_ckpt, g_plain, ("d extra_context", "d to_k_extra")):
        assert_close_verbose(a, b, atol=1e-6, name=f"{name} (checkpointed vs not)")


def test_torch_compile_fullgraph_plain_sd_with_extra_context():
    torch._dynamo.reset()
    cfg = UNetConfig.tiny(in_channels=4, extra_context_dim=E, channel_mult=(1, 2), attention_resolutions=(1,))
    unet = randomize_(JeDiUNet(cfg)).eval()
    inp = dict(sd_inputs(cfg, N=2, hw=8), extra_context=torch.randn(2, T, E))
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close_verbose(compiled(**inp), unet(**inp), atol=1e-5, name="compiled vs eager")


# ---- plain SD mode ---------------------------------------------------------------------------------------------------
def test_plain_sd_forward_shapes_and_defaults(plain):
    inp = sd_inputs(plain.config, N=3, hw=16)
    with torch.no_grad():
        out = plain(**inp)
        explicit = plain(**inp, x0=None, ng_mask=None, set_size=1)
    assert out.shape == (3, 4, 16, 16)
    assert torch.equal(out, explicit)
    # joint self-attention still works without the inpainting channels: the set shares attention
    inp2 = sd_inputs(plain.config, N=4, hw=16)
    with torch.no_grad():
        joint, alone = plain(**inp2, set_size=2), plain(**inp2, set_size=1)
    assert joint.shape == (4, 4, 16, 16) and (joint - alone).abs().max() > 1e-4


def test_plain_sd_matches_diffusers():
    """The 4-channel UNet loaded from a diffusers UNet2DConditionModel of the same tiny architecture gives its eps."""
    diffusers = pytest.importorskip("diffusers")
    from jedi.pipeline import unet_config_to_diffusers

    cfg = UNetConfig.tiny(in_channels=4)
    dm = randomize_(diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)), seed=3).eval()
    unet = JeDiUNet(cfg).eval()
    report = load_unet_weights(unet, dm.state_dict())
    assert report.layout == "diffusers" and report.conv_in == "as-is" and not report.missing
    inp = sd_inputs(cfg, N=2, hw=16, M=77)
    with torch.no_grad():
        ref = dm(inp["x_t"], inp["timesteps"], inp["context"]).sample
        out = unet(**inp)
    assert ref.abs().max() > 0.1  # a meaningful comparison
    assert_close_verbose(out, ref, atol=1e-4, name="plain-SD JeDiUNet vs diffusers")


# ---- weight loading ----------------------------------------------------------------------------------------------------
def test_sd_checkpoint_into_elite_like_reports_the_extra_projections_missing(plain, elite):
    target = JeDiUNet(UNetConfig.tiny(in_channels=4, extra_context_dim=E))
    extra_keys = sorted(k for k in target.state_dict() if "_extra" in k)
    with pytest.raises(ValueError, match="missing.*to_k_extra"):
        load_unet_weights(target, to_ldm_state_dict(plain))
    before = {k: target.state_dict()[k].clone() for k in extra_keys}
    report = load_unet_weights(target, to_ldm_state_dict(plain), strict=False)
    assert sorted(report.missing) == extra_keys and not report.unexpected
    sd = target.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())  # the extra projections keep their init
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
    # an ELITE-like checkpoint round-trips, extra projections included
    again = JeDiUNet(UNetConfig.tiny(in_channels=4, extra_context_dim=E))
    assert not load_unet_weights(again, to_ldm_state_dict(elite)).missing
    assert all(torch.equal(again.state_dict()[k], v) for k, v in elite.state_dict().items())


# ---- validation ---------------------------------------------------------------------------------------------------------
def _bad_plain():
    return [
        ("x0", lambda d: d.update(x0=torch.randn(2, 4, 16, 16))),
        ("ng_mask", lambda d: d.update(ng_mask=torch.ones(2, dtype=torch.bool))),
        ("x_t", lambda d: d.update(x_t=torch.randn(2, 9, 16, 16))),
        ("set_size", lambda d: d.update(set_size=3)),
        ("extra_context", lambda d: d.update(extra_context=torch.randn(2, T, E + 1))),
        ("extra_context", lambda d: d.update(extra_context=torch.randn(1, T, E))),
        ("extra_context", lambda d: d.update(extra_context=torch.randn(2, 0, E))),
        ("extra_context", lambda d: d.update(extra_context=torch.randn(2, E))),
    ]


@pytest.mark.parametrize("name,edit", _bad_plain(), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_bad_plain())])
def test_bad_inputs_raise_value_error_naming_the_argument(elite, name, edit):
    inp = sd_inputs(elite.config, N=2)
    edit(inp)
    with pytest.raises(ValueError, match=name), torch.no_grad():
        elite(**inp)


def test_extra_context_without_extra_projections_raises(plain):
    with pytest.raises(ValueError, match="extra_context"), torch.no_grad():
        plain(**sd_inputs(plain.config), extra_context=torch.randn(2, T, E))
    attn = CrossAttention(32, 16, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="extra_context"):
        attn(torch.randn(1, 4, 32), torch.randn(1, 3, 16), torch.randn(1, 2, 16))


def test_jedi_unet_still_needs_x0_ng_mask_and_set_size():
    unet = JeDiUNet(UNetConfig.tiny()).eval()
    inp = jedi_inputs(unet.config)
    for name in ("x0", "ng_mask"):
        with pytest.raises(ValueError, match=name), torch.no_grad():
            unet(**{k: v for k, v in inp.items() if k != name}, set_size=2)
    with pytest.raises(ValueError, match="set_size"), torch.no_grad():
        unet(**inp)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "768"])
def test_config_rejects_bad_extra_context_dim(bad):
    with pytest.raises(ValueError, match="extra_context_dim"):
        UNetConfig.tiny(extra_context_dim=bad)
