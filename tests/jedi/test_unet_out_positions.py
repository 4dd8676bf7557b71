"""JeDiUNet(out_positions=...): the eps of some images of each set only, with the other images run only as far as the
last joint self-attention needs them. The result must equal the full forward's eps at those positions; the pruned
layers must really run on fewer images."""
from __future__ import annotations

import pytest
import torch

from jedi import JeDiUNet, UNetConfig
from jedi.runtime import GraphedUNet
from jedi.sampling import personalize
from jedi.testing import randomize_weights_ as randomize_
from jedi.unet import SpatialTransformer, TransformerBlock
from jedi_kernels.testing import assert_close_verbose

# the default tiny UNet prunes in its last output block; with attention only at level 1, the pruning happens in the
# middle of the decoder and the level-0 blocks after it take the kept images of their encoder skips
CONFIGS = {
    "tiny": dict(),
    "attention_at_level_1": dict(channel_mult=(1, 2), attention_resolutions=(2,)),
}


def _unet(name: str, dtype=torch.float64, **kw) -> JeDiUNet:
    torch.manual_seed(0)
    cfg = UNetConfig.tiny(attn_backend="torch", **CONFIGS[name], **kw)
    return randomize_(JeDiUNet(cfg)).to(dtype).eval()


def _inputs(cfg: UNetConfig, B: int, G: int, R: int, dtype=torch.float64, hw: int = 16) -> dict:
    N, C = B * G, cfg.out_channels
    return dict(
        x_t=torch.randn(N, C, hw, hw, dtype=dtype),
        timesteps=torch.randint(0, 1000, (N,)),
        context=torch.randn(N, 7, cfg.context_dim, dtype=dtype),
        x0=torch.randn(N, C, hw, hw, dtype=dtype),
        ng_mask=torch.tensor(([False] * R + [True] * (G - R)) * B),
        set_size=G,
    )


def _at(eps: torch.Tensor, G: int, positions) -> torch.Tensor:
    """The full forward's eps at ``positions`` of every set, set-major."""
    e = eps.view(-1, G, *eps.shape[1:])[:, list(positions)]
    return e.reshape(-1, *eps.shape[1:])


def _set_levers(unet: JeDiUNet, fused: bool) -> None:
    unet.set_fused_ops(fused)
    unet.set_fuse_qkv(fused)
    unet.set_fuse_context_kv(fused)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("G, positions", [(2, (1,)), (3, (1, 2)), (3, (0, 2)), (4, (3,)), (4, (0,))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "levers"])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_full_forward_at_those_positions(config, G, positions, layout, fused, masked):
    unet = _unet(config)
    _set_levers(unet, fused)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    B = 2
    inp = _inputs(unet.config, B, G, R=1)
    inp["x_t"] = inp["x_t"].contiguous(memory_format=fmt)
    set_mask = None
    if masked:  # image 0 sees itself only, the others see everything: the kept rows must be the right ones
        set_mask = torch.ones(G, G, dtype=torch.bool)
        set_mask[0, 1:] = False
    with torch.no_grad():
        full = unet(**inp, set_mask=set_mask)
        part = unet(**inp, set_mask=set_mask, out_positions=positions)
    assert part.shape == (B * len(positions), *full.shape[1:])
    assert_close_verbose(part, _at(full, G, positions), atol=1e-12, name="eps at out_positions")
    if layout == "channels_last":
        assert part.is_contiguous(memory_format=torch.channels_last)


def test_the_mask_matters_for_the_kept_rows():
    """A mask that changes the kept image's attention changes its eps: the comparison above is not vacuous."""
    unet = _unet("tiny")
    inp = _inputs(unet.config, 1, 3, R=1)
    set_mask = torch.ones(3, 3, dtype=torch.bool)
    set_mask[2, 0] = False  # the kept image 2 no longer sees the reference
    with torch.no_grad():
        a = unet(**inp, out_positions=(2,))
        b = unet(**inp, set_mask=set_mask, out_positions=(2,))
    assert (a - b).abs().max() > 1e-6


def test_every_position_is_the_plain_forward():
    unet = _unet("tiny")
    inp = _inputs(unet.config, 2, 2, R=1)
    with torch.no_grad():
        assert torch.equal(unet(**inp, out_positions=(0, 1)), unet(**inp))
        assert torch.equal(unet(**inp, out_positions=range(2)), unet(**inp))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_layers_after_the_last_joint_attention_run_on_the_kept_images_only(config):
    """Batch sizes seen by the last transformer block's projections and the output conv; everything before the last
    joint attention still runs on every image."""
    unet = _unet(config)
    B, G, positions = 2, 3, (2,)
    seen: dict[str, list[int]] = {}

    def record(name):
        return lambda m, a, o: seen.setdefault(name, []).append(a[0].shape[0])

    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
    last = blocks[-1]
    for name, mod in [("to_q", last.attn1.to_q), ("to_k", last.attn1.to_k), ("to_v", last.attn1.to_v),
                      ("ff", last.ff), ("attn2", last.attn2), ("out", unet.out), ("first_to_q", blocks[0].attn1.to_q),
                      ("conv_in", unet.input_blocks[0][0])]:
        mod.register_forward_hook(record(name))
    with torch.no_grad():
        unet(**_inputs(unet.config, B, G, R=2), out_positions=positions)
    N, Nk = B * G, B * len(positions)
    assert seen["to_q"] == [Nk] and seen["ff"] == [Nk] and seen["attn2"] == [Nk] and seen["out"] == [Nk]
    assert seen["to_k"] == [N] and seen["to_v"] == [N]  # the keys and values need every image
    assert seen["first_to_q"] == [N] and seen["conv_in"] == [N]


def test_the_pruned_layer_is_the_last_one_in_forward_order():
    """With attention only at level 1, the last joint attention is in the decoder's level-1 blocks: the level-0
    blocks after it (no attention) see the kept images, the level-1 blocks before it every image."""
    unet = _unet("attention_at_level_1")
    sts = [m for m in unet.output_blocks.modules() if isinstance(m, SpatialTransformer)]
    batches = []
    for st in sts:
        st.register_forward_hook(lambda m, a, o: batches.append((a[0].shape[0], o.shape[0])))
    level0 = unet.output_blocks[-1][0]  # the last ResBlock, level 0
    level0_in = []
    level0.register_forward_hook(lambda m, a, o: level0_in.append(a[0].shape[0]))
    with torch.no_grad():
        unet(**_inputs(unet.config, 2, 2, R=1), out_positions=(1,))
    assert batches[:-1] == [(4, 4)] * (len(sts) - 1) and batches[-1] == (4, 2)
    assert level0_in == [2]


def test_gradients_equal_the_full_forward_restricted_to_those_positions():
    unet = _unet("attention_at_level_1")
    unet.train()
    inp = _inputs(unet.config, 2, 3, R=1)
    x = inp.pop("x_t").requires_grad_(True)
    w = torch.randn(4, 4, 16, 16, dtype=torch.float64)

    def grads(out_positions):
        unet.zero_grad()
        x.grad = None
        eps = unet(x, **inp, out_positions=out_positions)
        if out_positions is None:
            eps = _at(eps, 3, (1, 2))
        (eps * w).sum().backward()
        return x.grad.clone(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    gx_ref, g_ref = grads(None)
    gx, g = grads((1, 2))
    assert_close_verbose(gx, gx_ref, atol=1e-12, name="dx_t")
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        assert_close_verbose(g[n], g_ref[n], atol=1e-11, name=n)


def test_gradient_checkpointing_with_out_positions():
    unet = _unet("tiny", use_checkpoint=True).train()
    inp = _inputs(unet.config, 1, 2, R=1)
    ref = _at(unet(**inp), 2, (1,))
    out = unet(**inp, out_positions=(1,))
    assert_close_verbose(out, ref, atol=1e-12, name="eps")
    out.sum().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("bad, err, match", [
    ((), ValueError, "at least one"),
    ((2,), ValueError, "strictly increasing"),
    ((1, 0), ValueError, "strictly increasing"),
    ((1, 1), ValueError, "strictly increasing"),
    ((-1,), ValueError, "strictly increasing"),
    ((True,), TypeError, "ints"),
    ((1.0,), TypeError, "ints"),
    (1, TypeError, "sequence"),
    ("1", TypeError, "sequence"),
    (torch.tensor([1]), TypeError, "sequence"),
])
def test_bad_out_positions_raise_naming_the_argument(bad, err, match):
    unet = _unet("tiny")
    with pytest.raises(err, match=f"out_positions: .*{match}"):
        unet(**_inputs(unet.config, 1, 2, R=1), out_positions=bad)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    unet = _unet("attention_at_level_1", dtype=torch.float32)
    _set_levers(unet, True)
    inp = _inputs(unet.config, 2, 2, R=1, dtype=torch.float32)
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ref = unet(**inp, out_positions=(1,))
        out = compiled(**inp, out_positions=(1,))
    assert_close_verbose(out, ref, atol=1e-5, name="compiled")


def test_personalize_gives_the_images_of_the_full_forward():
    """The sampler asks for the targets' eps only; a UNet that computes every image and drops the references gives
    the same latents."""
    unet = _unet("tiny", dtype=torch.float64)

    class Full(torch.nn.Module):  # the same UNet, ignoring out_positions: every image, then the targets
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, out_positions=None, set_size, **kw):
            return _at(self.inner(*a, set_size=set_size, **kw), set_size, out_positions)

    refs = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ctx, null = torch.randn(2, 3, 32, dtype=torch.float64), torch.zeros(3, 32, dtype=torch.float64)
    kw = dict(num_targets=2, steps=2, strategy="text_first", l1=2.0, l2=3.0, progress=False)
    a = personalize(unet, refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    b = personalize(Full(unet), refs, ctx, null, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 2, 4, 8, 8)
    assert_close_verbose(a, b, atol=1e-12, name="latents")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_optimized_graphed_step_with_out_positions():
    """SD v1-shaped half of the step on the GPU: every lever, CUDA graph, out_positions = the targets, against the
    same model's full forward (fp16; the attention of the pruned layer runs on SDPA with fewer queries)."""
    torch.manual_seed(0)
    cfg = UNetConfig.tiny(model_channels=64, channel_mult=(1, 2), attention_resolutions=(1, 2))
    unet = randomize_(JeDiUNet(cfg)).cuda().half().eval().to(memory_format=torch.channels_last)
    _set_levers(unet, True)
    inp = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
           for k, v in _inputs(cfg, 2, 2, R=1, dtype=torch.float16, hw=32).items()}
    with torch.no_grad():
        full = unet(**inp)
        graphed = GraphedUNet(unet)
        out = graphed(**inp, out_positions=(1,))
        again = graphed(**inp, out_positions=(1,))
    assert graphed.captures == 1 and torch.equal(out, again)
    ref = _at(full, 2, (1,)).float()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 5e-3, err


def test_few_copies_of_kept_images(monkeypatch):
    """What the pruning copies, with every lever on and the pruning in the last block (SD v1's case): the block's
    residual, its tokens, the queries' input, the context and one block's context keys/values; nothing for the
    blocks that do not run after it."""
    import jedi_kernels.functional as F
    import jedi_kernels.modules as M

    calls = []
    orig = F.take_set_positions

    def spy(t, set_size, positions):
        calls.append(tuple(t.shape))
        return orig(t, set_size, positions)

    monkeypatch.setattr(M, "take_set_positions", spy)
    monkeypatch.setattr("jedi.unet.jk.take_set_positions", spy)
    unet = _unet("tiny")
    _set_levers(unet, True)
    with torch.no_grad():
        unet(**_inputs(unet.config, 2, 2, R=1), out_positions=(1,))
    assert len(calls) == 5, calls


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "levers"])
def test_extra_context_is_taken_for_the_kept_images(fused):
    """The ELITE-like extra tokens of every cross-attention: the pruned block's attn2 must see the kept images' own."""
    unet = _unet("attention_at_level_1", extra_context_dim=24)
    _set_levers(unet, fused)
    inp = _inputs(unet.config, 2, 3, R=1)
    extra = torch.randn(6, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        full = unet(**inp, extra_context=extra)
        part = unet(**inp, extra_context=extra, out_positions=(1, 2))
        other = unet(**inp, extra_context=extra.flip(0), out_positions=(1, 2))
    assert_close_verbose(part, _at(full, 3, (1, 2)), atol=1e-12, name="eps")
    assert (other - part).abs().max() > 1e-6  # the extra tokens matter
