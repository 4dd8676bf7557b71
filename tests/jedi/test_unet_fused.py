"""JeDiUNet with the fused ops (GroupNorm+SiLU, GEGLU; issue 9): same outputs and grads as the unfused model, same
state dict, switchable both ways, compiles, and (GPU) the fully optimized fp16 step stays within 1e-2 of fp32."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jedi_kernels as jk
from jedi import JeDiUNet, UNetConfig
from jedi.testing import randomize_weights_
from jedi.unet import GEGLU, GroupNorm32
from jedi_kernels.testing import assert_close_verbose

HAS_TRITON = jk.available_backends()["triton"]
FUSED_BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def _inputs(cfg, N=4, hw=8, M=5, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ng = torch.tensor([False, True] * (N // 2))
    return dict(
        x_t=torch.randn(N, cfg.out_channels, hw, hw, generator=g).to(device, dtype),
        timesteps=torch.randint(0, 1000, (N,), generator=g).to(device),
        context=torch.randn(N, M, cfg.context_dim, generator=g).to(device, dtype),
        x0=torch.randn(N, cfg.out_channels, hw, hw, generator=g).to(device, dtype),
        ng_mask=ng.to(device),
    )


def _pair(cfg=None):
    """An unfused model and a fused copy with the same weights."""
    cfg = cfg or UNetConfig.tiny()
    torch.manual_seed(0)
    base = randomize_weights_(JeDiUNet(cfg)).eval()
    fused = JeDiUNet(dataclasses.replace(cfg))
    fused.load_state_dict(base.state_dict())
    return base, fused.eval()


def _count(unet, kind):
    return sum(isinstance(m, kind) for m in unet.modules())


def _train_each(models, inp, weight=None):
    """Each model in training mode: one forward and the backward of ``(out * weight).sum()`` (``out.square().sum()``
    without a weight); returns the detached outputs."""
    outs = []
    for m in models:
        m.train()
        out = m(**inp, set_size=2)
        (out * weight if weight is not None else out.square()).sum().backward()
        outs.append(out.detach())
    return outs


def _assert_same_grads(base, other, rel):
    """Every parameter's gradient of ``other`` equals ``base``'s within ``rel`` of its size (at least 1)."""
    gb = dict(base.named_parameters())
    for name, p in other.named_parameters():
        ref = gb[name].grad
        assert_close_verbose(p.grad, ref, atol=rel * max(1.0, float(ref.abs().max())), name=f"grad {name}")


def test_switch_keeps_state_dict_and_swaps_only_silus():
    base, fused = _pair()
    n_silu = _count(base, nn.SiLU)
    fused.set_fused_ops(True)
    assert list(fused.state_dict()) == list(base.state_dict())
    assert fused.config.fused_ops
    assert all(m.fused for m in fused.modules() if isinstance(m, (GroupNorm32, GEGLU)))
    # every GroupNorm followed by a SiLU absorbed it: ResBlock in/out layers and the output head
    silu_norms = sum(m.silu for m in fused.modules() if isinstance(m, GroupNorm32))
    assert silu_norms > 0 and _count(fused, nn.SiLU) == n_silu - silu_norms
    fused.set_fused_ops(False)
    assert _count(fused, nn.SiLU) == n_silu and not fused.config.fused_ops
    assert not any(m.fused or m.silu for m in fused.modules() if isinstance(m, GroupNorm32))


def test_config_flag_builds_fused():
    unet = JeDiUNet(UNetConfig.tiny(fused_ops=True))
    assert all(m.fused for m in unet.modules() if isinstance(m, GroupNorm32))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_forward_matches_unfused(backend, channels_last):
    base, fused = _pair()
    fused.set_fused_ops(True, backend=backend)
    inp = _inputs(base.config, N=2)  # one set of two: every block type, half the interpreter time of N=4
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
                   x0=inp["x0"].to(memory_format=torch.channels_last))
    with torch.no_grad():
        ref = base(**inp, set_size=2)
        out = fused(**inp, set_size=2)
    assert ref.abs().max() > 0.1  # randomized weights: the comparison is not of zeros
    assert_close_verbose(out, ref, atol=2e-5 * float(ref.abs().max()), name=f"fused[{backend}] eps")


def test_fused_set_back_is_bitwise_unfused():
    base, fused = _pair()
    inp = _inputs(base.config)
    fused.set_fused_ops(True, backend="torch")
    fused.set_fused_ops(False)
    with torch.no_grad():
        assert torch.equal(fused(**inp, set_size=2), base(**inp, set_size=2))


def test_fused_norm_under_autograd_only_with_triton(monkeypatch):
    """With the torch backend the fused GroupNorm runs when no gradient is needed; under autograd the norm takes
    torch's native path (the torch backend's backward is a chain of ops). GEGLU stays fused either way."""
    import jedi.unet as unet_mod

    calls = {"group_norm": 0, "geglu": 0}
    for name in calls:
        real = getattr(jk, name)
        monkeypatch.setattr(unet_mod.jk, name,
                            lambda *a, _real=real, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _real(*a, **kw))
    base, fused = _pair(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1,)))
    fused.set_fused_ops(True, backend="torch")
    inp = _inputs(base.config, N=2)
    with torch.no_grad():
        fused(**inp, set_size=2)
    n_norms = _count(fused, GroupNorm32)
    assert calls["group_norm"] == n_norms and calls["geglu"] == _count(fused, GEGLU)
    calls.update(group_norm=0, geglu=0)
    fused(**inp, set_size=2).sum().backward()
    assert calls["group_norm"] == 0 and calls["geglu"] == _count(fused, GEGLU)


def test_fused_add_layer_norm_in_inference_only(monkeypatch):
    """Each transformer block's three LayerNorms (two of them with the residual add before) go through
    jk.add_layer_norm in inference; under autograd, autocast and while compiling the block keeps torch's LayerNorms."""
    import jedi.unet as unet_mod
    from jedi.unet import TransformerBlock

    calls = []
    real = jk.add_layer_norm
    monkeypatch.setattr(unet_mod.jk, "add_layer_norm", lambda *a, **kw: calls.append(a[1] is None) or real(*a, **kw))
    base, fused = _pair(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1,)))
    fused.set_fused_ops(True, backend="torch")
    inp = _inputs(base.config, N=2)
    with torch.no_grad():
        out, ref = fused(**inp, set_size=2), base(**inp, set_size=2)
    n_blocks = _count(fused, TransformerBlock)
    assert n_blocks > 0 and len(calls) == 3 * n_blocks and sum(calls) == n_blocks  # one plain norm per block
    assert_close_verbose(out, ref, atol=2e-5 * float(ref.abs().max()), name="fused add + LayerNorm")
    calls.clear()
    fused(**inp, set_size=2).sum().backward()
    assert calls == []
    # autocast may hand the adds sub-layer outputs in another dtype than the residual stream: torch's ops then, even
    # where the norms' parameters are in x's dtype; so are parameters in another dtype
    block = next(m for m in fused.modules() if isinstance(m, TransformerBlock))
    x = torch.randn(2, 4, block.norm1.normalized_shape[0])
    with torch.no_grad():
        assert block._run_fused_ln(x) and not block._run_fused_ln(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not block._run_fused_ln(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        fused(**inp, set_size=2)
    assert calls == []
    fused.set_fused_ops(False)
    assert not any(m.fused_ln for m in fused.modules() if isinstance(m, TransformerBlock))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_gradients_match_unfused(backend):
    """Training through the fused ops (Triton: GroupNorm and GEGLU backward kernels) gives the unfused grads."""
    base, fused = _pair(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1,)))
    fused.set_fused_ops(True, backend=backend)
    inp = _inputs(base.config, N=2)
    _train_each((base, fused), inp, torch.linspace(-1, 1, inp["x_t"].numel()).view_as(inp["x_t"]))
    _assert_same_grads(base, fused, 1e-5)


def test_fused_compile_fullgraph():
    """The fused ops are custom ops: no graph break (their Triton path compiles in tests/kernels/)."""
    torch._dynamo.reset()
    base, fused = _pair(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1,)))
    fused.set_fused_ops(True, backend="torch")
    inp = _inputs(base.config)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close_verbose(compiled(**inp, set_size=2), fused(**inp, set_size=2), atol=1e-5, name="compiled fused")


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend must be auto|triton|torch"):
        JeDiUNet(UNetConfig.tiny()).set_fused_ops(True, backend="cuda")


@pytest.mark.gpu
def test_gpu_optimized_fp16_step_within_1e2_of_fp32():
    """Issue 9's precision rule at SD v1 size: every lever on (fused ops with folded biases, channels-last, fused
    q/k/v and context k/v, Triton attention), fp16, against the fp32 UNet on the same inputs: relative error of the
    step output <= 1e-2. Then the context k/v switch alone: the cross-attentions read strided views of one GEMM's
    output through SDPA (cuDNN on the H100), which must give what per-block projections give."""
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = JeDiUNet(UNetConfig.sd_v1())
    ref = randomize_weights_(ref.to_empty(device="cuda")).eval()
    fast = JeDiUNet(UNetConfig.sd_v1())
    fast.load_state_dict(ref.state_dict())
    fast = fast.cuda().half().to(memory_format=torch.channels_last).eval()
    fast.set_fused_ops(True)
    fast.set_fuse_qkv(True)
    fast.set_fuse_context_kv(True)
    if HAS_TRITON:
        fast.set_attn_backend("triton")
    inp = _inputs(ref.config, N=4, hw=64, M=77, device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            want = ref(**inp, set_size=2).float()
            half = {k: v.half().to(memory_format=torch.channels_last) if v.dim() == 4 else
                    (v.half() if v.is_floating_point() else v) for k, v in inp.items()}
            got = fast(**half, set_size=2).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rel = float((got - want).norm() / want.norm())
    assert torch.isfinite(got).all() and rel <= 1e-2, f"relative error {rel:.3g} of the fp16 optimized step"
    fast.set_attn_backend("auto")
    with torch.no_grad():
        fused_kv = fast(**half, set_size=2).float()
        fast.set_fuse_context_kv(False)
        per_block = fast(**half, set_size=2).float()
    rel_kv = float((fused_kv - per_block).norm() / per_block.norm())
    assert rel_kv <= 5e-3, f"context k/v in one GEMM vs per block: relative difference {rel_kv:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_half_group_norm32_is_one_native_op_as_precise_as_the_fp32_round_trip(dtype, channels_last):
    """Unfused GroupNorm32 on half inputs with half parameters: torch's GroupNorm alone (it accumulates in float32
    and rounds once), not LDM's round trip through float32 (casts of x, weight, bias and back: five ops). The values
    agree with the round trip to one half ulp, the error against float64 is the round trip's, and layout is kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    norm = GroupNorm32(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(2, 32, 9, 7) * 3 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        y = norm(x)
    kernels = [n for n in ops.names if "detach" not in n]  # autograd's detaches of the parameters launch nothing
    assert len(kernels) == 1 and "group_norm" in kernels[0], ops.names
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    w, b = norm.weight.float(), norm.bias.float()
    trip = torch.nn.functional.group_norm(x.float(), 8, w, b, 1e-6).to(dtype)
    ref = torch.nn.functional.group_norm(x.double(), 8, w.double(), b.double(), 1e-6)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
    assert ((y.double() - trip.double()).abs() <= ulp).all()
    assert (y.double() - ref).abs().max() <= 1.01 * (trip.double() - ref).abs().max() + 1e-12
    norm.fp32_round_trip = True  # the switch step_levers.py times the old default with: LDM's round trip again
    with Ops() as ops:
        y_trip = norm(x)
    assert len([n for n in ops.names if "detach" not in n]) > 1 and torch.equal(y_trip, trip)


# ---- fold_bias: conv biases applied in the adds / GEMMs after the convs (part of set_fused_ops) ----------------------
def _fold_only(unet, enabled=True):
    """Turn on fold_bias alone (set_fused_ops turns it on with the fused kernels)."""
    from jedi.unet import ResBlock, SpatialTransformer

    for m in unet.modules():
        if isinstance(m, (ResBlock, SpatialTransformer)):
            m.fold_bias = enabled
    return unet


def _fold_pair(channels_last):
    base, folded = _pair()  # UNetConfig.tiny: 1x1 skip convs, identity skips, 1x1 proj_in/proj_out, up/down convs
    base, folded = base.double(), _fold_only(folded.double())
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    if channels_last:
        base, folded = (m.to(memory_format=torch.channels_last) for m in (base, folded))
        inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
                   x0=inp["x0"].to(memory_format=torch.channels_last))
    return base, folded, inp


def test_set_fused_ops_switches_fold_bias():
    from jedi.unet import ResBlock, SpatialTransformer

    unet = JeDiUNet(UNetConfig.tiny())
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    assert blocks and not any(m.fold_bias for m in blocks)
    unet.set_fused_ops(True, backend="torch")
    assert all(m.fold_bias for m in blocks)
    unet.set_fused_ops(False)
    assert not any(m.fold_bias for m in blocks)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fold_bias_same_sums_and_grads_float64(channels_last):
    """Folding the biases reorders sums only: float64 outputs and every parameter's gradient agree to rounding."""
    base, folded, inp = _fold_pair(channels_last)
    w = torch.linspace(-1, 1, inp["x_t"].numel(), dtype=torch.float64).view(inp["x_t"].shape)
    outs = _train_each((base, folded), inp, w)
    assert outs[0].abs().max() > 0.1
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="folded output")
    if channels_last:
        assert outs[1].is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad is not None for p in folded.parameters())
    _assert_same_grads(base, folded, 1e-11)


def _conv_calls(unet, inp):
    """(kernel size, has bias) of every aten.convolution and the number of addmm calls, in one no-grad forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    convs, addmm = [], [0]

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                convs.append((tuple(args[1].shape[2:]), args[2] is not None))
            elif func is torch.ops.aten.addmm.default:
                addmm[0] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        unet(**inp, set_size=2)
    return convs, addmm[0]


def test_fold_bias_moves_biases_out_of_convolutions():
    """Channels-last, with fold_bias: no 1x1 convolution is left (skip, proj_in, proj_out run as addmm with the
    bias), conv1 of every ResBlock and conv2 of every ResBlock with a skip conv run without bias; only conv_in,
    the down/up-sampling convs, conv_out and conv2 of identity-skip ResBlocks keep theirs. NCHW: the same, except
    that the 1x1 convs stay convolutions (skip convs with the folded bias)."""
    from jedi.unet import ResBlock, SpatialTransformer

    base, folded, inp = _fold_pair(channels_last=True)
    res = [m for m in folded.modules() if isinstance(m, ResBlock)]
    n_skip = sum(isinstance(m.skip_connection, nn.Conv2d) for m in res)
    n_st = _count(folded, SpatialTransformer)
    assert 0 < n_skip < len(res) and n_st > 0
    convs_ref, addmm_ref = _conv_calls(base, inp)
    convs, addmm = _conv_calls(folded, inp)
    n_1x1 = sum(k == (1, 1) for k, _ in convs_ref)
    assert n_1x1 == n_skip + 2 * n_st and all(b for _, b in convs_ref)
    assert all(k == (3, 3) for k, _ in convs)
    assert len(convs) == len(convs_ref) - n_1x1 and addmm == addmm_ref + n_1x1
    assert sum(not b for _, b in convs) == len(res) + n_skip  # conv1 everywhere, conv2 beside a skip conv
    with torch.no_grad():
        assert_close_verbose(folded(**inp, set_size=2), base(**inp, set_size=2), atol=1e-12, name="folded")
    base, folded, inp = _fold_pair(channels_last=False)
    convs, addmm = _conv_calls(folded, inp)
    assert len(convs) == len(convs_ref) and addmm == addmm_ref
    assert sum(not b for _, b in convs) == len(res) + n_skip


def test_fold_bias_leaves_wrapped_convs_alone():
    """A conv that is not a plain nn.Conv2d (a subclass, e.g. a LoRA wrapper) keeps its own forward, bias and all:
    its block takes the unfolded path."""
    from jedi.unet import ResBlock

    class Spy(nn.Conv2d):
        calls = 0

        def forward(self, x):
            Spy.calls += 1
            return super().forward(x)

    base, folded, inp = _fold_pair(channels_last=True)
    block = next(m for m in folded.modules() if isinstance(m, ResBlock))
    old = block.in_layers[2]
    spy = Spy(old.in_channels, old.out_channels, 3, padding=1).double()
    spy.load_state_dict(old.state_dict())
    block.in_layers[2] = spy
    with torch.no_grad():
        out, ref = folded(**inp, set_size=2), base(**inp, set_size=2)
    assert Spy.calls == 1
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="with a wrapped conv")


def test_fold_bias_time_embedding_enters_the_fused_norm(monkeypatch):
    """With the fused ops, every ResBlock's second norm gets its time embedding + conv1 bias as the kernel's shift
    (no pass over h for the sum); the output equals the unfused model's."""
    import jedi.unet as unet_mod
    from jedi.unet import ResBlock

    shifts = []
    real = jk.group_norm
    monkeypatch.setattr(unet_mod.jk, "group_norm",
                        lambda *a, **kw: shifts.append(kw.get("shift") is not None) or real(*a, **kw))
    base, fused = _pair()
    fused.set_fused_ops(True, backend="torch")
    inp = _inputs(base.config, N=2)
    with torch.no_grad():
        out, ref = fused(**inp, set_size=2), base(**inp, set_size=2)
    assert sum(shifts) == _count(fused, ResBlock) and len(shifts) == _count(fused, GroupNorm32)
    assert_close_verbose(out, ref, atol=2e-5 * float(ref.abs().max()), name="shift in the fused norm")


# ---- fuse_context_kv: every cross-attention's keys and values of the context in one GEMM ----------------------------
def _kv_pair(**cfg_overrides):
    base, fused = _pair(UNetConfig.tiny(**cfg_overrides))
    base, fused = base.double(), fused.double()
    fused.set_fuse_context_kv(True)
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    return base, fused, inp


def test_fuse_context_kv_same_outputs_and_grads_one_gemm():
    from jedi.unet import CrossAttention

    base, fused, inp = _kv_pair()
    assert fused.config.fuse_context_kv and list(fused.state_dict()) == list(base.state_dict())
    attns = [m for m in fused.modules() if isinstance(m, CrossAttention)]
    assert len(attns) > 1 and sorted(m.kv_index for m in attns) == list(range(len(attns)))
    calls = []
    hooks = [lin.register_forward_hook(lambda *a: calls.append(1)) for m in attns for lin in (m.to_k, m.to_v)]
    outs = _train_each((base, fused), inp,
                       torch.linspace(-1, 1, inp["x_t"].numel(), dtype=torch.float64).view(inp["x_t"].shape))
    with torch.no_grad():
        fused(**inp, set_size=2)
    assert calls == []  # the fused model's to_k/to_v modules never run, with autograd or without
    for h in hooks:
        h.remove()
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="fused context kv")
    _assert_same_grads(base, fused, 1e-11)
    fused.set_fuse_context_kv(False)
    assert not fused.config.fuse_context_kv
    with torch.no_grad():
        assert torch.equal(fused(**inp, set_size=2), base(**inp, set_size=2))


def test_fuse_context_kv_one_matmul_on_the_context():
    """Dispatch count: with the switch on, the context enters one matmul (of all blocks' weights) instead of two per
    cross-attention."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from jedi.unet import CrossAttention

    base, fused, inp = _kv_pair()
    n_attn = _count(fused, CrossAttention)

    def context_mms(unet):
        ctx = inp["context"]
        n = [0]

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                    a = args[1] if func is torch.ops.aten.addmm.default else args[0]
                    if a.shape[0] == ctx.shape[0] * ctx.shape[1] and a.shape[-1] == ctx.shape[-1]:
                        n[0] += 1
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Spy():
            unet(**inp, set_size=2)
        return n[0]

    assert context_mms(base) == 2 * n_attn and context_mms(fused) == 1


def test_fuse_context_kv_with_extra_context_and_wrapped_projection():
    """The ELITE-like extra projections stay per block; a block whose to_k is wrapped projects for itself."""
    from jedi.unet import CrossAttention

    base, fused, inp = _kv_pair(extra_context_dim=8)
    extra = torch.randn(2, 3, 8, dtype=torch.float64)
    attn = next(m for m in fused.modules() if isinstance(m, CrossAttention))

    class Wrapped(nn.Linear):
        calls = 0

        def forward(self, x):
            Wrapped.calls += 1
            return super().forward(x)

    wrapped = Wrapped(attn.to_k.in_features, attn.to_k.out_features, bias=False).double()
    wrapped.load_state_dict(attn.to_k.state_dict())
    attn.to_k = wrapped
    with torch.no_grad():
        out, ref = fused(**inp, set_size=2, extra_context=extra), base(**inp, set_size=2, extra_context=extra)
    assert Wrapped.calls == 1
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="fused kv, extra context, wrapped")


def test_fuse_context_kv_compiles_fullgraph():
    torch._dynamo.reset()
    base, fused = _pair(UNetConfig.tiny(channel_mult=(1, 2), attention_resolutions=(1, 2)))
    fused.set_fuse_context_kv(True)
    inp = _inputs(base.config)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close_verbose(compiled(**inp, set_size=2), base(**inp, set_size=2), atol=1e-5, name="compiled kv")


def test_config_flag_builds_fused_context_kv():
    unet = JeDiUNet(UNetConfig.tiny(fuse_context_kv=True))
    assert unet.config.fuse_context_kv and len(unet._kv_attns) > 1


def test_every_switch_in_float64_equals_the_plain_model():
    """Fused ops (torch backend: under autograd the norms take torch's path), folded biases, fused q/k/v and context
    k/v, gradient checkpointing, all at once, in float64 training: outputs and every gradient equal the plain model's
    to rounding. (Until 2026-11-27 GroupNorm32 computed float64 inputs in float32, as LDM's .float() does, which
    capped comparisons like this one at ~1e-7.)"""
    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend="torch")
    fast.set_fuse_qkv(True)
    fast.set_fuse_context_kv(True)
    fast.enable_gradient_checkpointing()
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2, hw=16).items()}
    outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="every switch, float64")
    _assert_same_grads(base, fast, 1e-11)


def test_time_embedding_shifts_in_one_gemm():
    """With the fused ops on, every ResBlock's second-norm shift (Linear(SiLU(emb)) + the emb_layers and conv1
    biases) comes from one GEMM of the UNet (TimeEmb): the blocks' emb_layers never run, the embedding enters 2
    matmuls (time_embed.2 and the shared one) instead of one per block + 1, the output equals the plain model's, and a
    block whose emb Linear is wrapped computes its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from jedi.unet import ResBlock

    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend="torch")
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    res = [m for m in fast.modules() if isinstance(m, ResBlock)]
    E = res[0].emb_layers[1].in_features
    calls = []
    hooks = [m.emb_layers.register_forward_hook(lambda *a: calls.append(1)) for m in res]

    def emb_matmuls(unet):
        n = [0]

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.addmm.default and tuple(args[1].shape) == (2, E):
                    n[0] += 1
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Spy():
            out = unet(**inp, set_size=2)
        return n[0], out

    n_fast, out = emb_matmuls(fast)
    assert calls == [] and n_fast == 2
    n_base, ref = emb_matmuls(base)
    assert n_base == len(res) + 1
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="time-embedding shifts in one GEMM")
    for h in hooks:
        h.remove()

    class Wrapped(nn.Linear):
        pass

    lin = res[0].emb_layers[1]
    wrapped = Wrapped(lin.in_features, lin.out_features).double()
    wrapped.load_state_dict(lin.state_dict())
    res[0].emb_layers[1] = wrapped
    with torch.no_grad():
        assert_close_verbose(fast(**inp, set_size=2), ref, atol=1e-12 * float(ref.abs().max()), name="one wrapped")
    assert emb_matmuls(fast)[0] == 3  # the wrapped block's own Linear beside the shared GEMM


def test_skip_biases_in_one_foreach_add():
    """With the fused ops on, the skip-path bias of every ResBlock with a 1x1 skip conv (its bias + conv2's) comes
    from one _foreach_add in the UNet (TimeEmb.skip_biases) instead of one tiny add per block; outputs and all
    gradients equal the plain model's in float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from jedi.unet import ResBlock

    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend="torch")
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    n_skip = sum(isinstance(m, ResBlock) and not isinstance(m.skip_connection, nn.Identity) for m in fast.modules())
    assert n_skip >= 2

    def bias_adds(unet):
        seen = {"add": 0, "foreach": []}

        class Spy(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.add.Tensor and all(
                        isinstance(a, torch.Tensor) and a.dim() == 1 for a in args[:2]):
                    seen["add"] += 1
                if func is torch.ops.aten._foreach_add.List:
                    seen["foreach"].append(len(args[0]))
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Spy():
            unet(**inp, set_size=2)
        return seen

    seen = bias_adds(fast)
    assert seen["add"] == 0 and n_skip in seen["foreach"], seen
    assert bias_adds(base)["add"] == 0  # the plain model adds no biases by hand
    outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="skip biases, float64")
    _assert_same_grads(base, fast, 1e-11)


# ---- fuse_ff: each feed-forward's projection + GEGLU as one kernel (jedi_kernels.linear_geglu) ----------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fuse_ff_one_kernel_same_outputs(monkeypatch, backend):
    """set_fuse_ff: every GEGLU's projection and activation go through one linear_geglu call (the proj Linear never
    runs on its own) in inference, with the plain model's outputs; the state dict and config record it; off again,
    the calls stop. Backend "triton" runs the kernel under the interpreter on CPU."""
    base, fast = _pair()
    fast.set_fused_ops(True, backend=backend)
    fast.set_fuse_ff(True)
    assert fast.config.fuse_ff and list(fast.state_dict()) == list(base.state_dict())
    n_ff = _count(fast, GEGLU)
    calls, proj_runs = [], []
    real = jk.linear_geglu
    monkeypatch.setattr(jk, "linear_geglu", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    hooks = [m.proj.register_forward_hook(lambda *a: proj_runs.append(1)) for m in fast.modules()
             if isinstance(m, GEGLU)]
    inp = _inputs(base.config)
    with torch.no_grad():
        ref = base(**inp, set_size=2)
        out = fast(**inp, set_size=2)
    assert calls == [backend] * n_ff and proj_runs == []
    assert_close_verbose(out, ref, atol=2e-5 * float(ref.abs().max()), name=f"fuse_ff[{backend}]")
    fast.set_fuse_ff(False)
    calls.clear()
    with torch.no_grad():
        fast(**inp, set_size=2)
    assert calls == [] and len(proj_runs) == n_ff and not fast.config.fuse_ff
    for h in hooks:
        h.remove()


def test_fuse_ff_training_and_wrapped_proj_take_the_unfused_path():
    """With fuse_ff on, training (autograd recording) gets the plain model's gradients in float64, and a GEGLU whose
    proj is wrapped (e.g. LoRA) keeps its own forward; the default backend on CPU is the unfused path."""
    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fuse_ff(True)
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="fuse_ff training")
    _assert_same_grads(base, fast, 1e-11)
    geglu = next(m for m in fast.modules() if isinstance(m, GEGLU))
    assert geglu._linear_backend(torch.zeros(1, dtype=torch.float32)) is None  # CPU, backend auto: unfused

    class Wrapped(nn.Linear):
        pass

    wrapped = Wrapped(geglu.proj.in_features, geglu.proj.out_features)
    geglu.proj = wrapped
    geglu.backend = "triton"
    assert geglu._linear_backend(torch.zeros(1)) is None


def test_fuse_ff_from_config():
    cfg = dataclasses.replace(UNetConfig.tiny(), fuse_ff=True)
    unet = JeDiUNet(cfg)
    assert all(m.fuse_linear for m in unet.modules() if isinstance(m, GEGLU))


# ---- fold_linear_bias: the out-projections' and feed-forward output's biases in the add + LayerNorms ---------------
def _ln_pair(dtype=torch.float64):
    """The plain model and one with every fused op (torch backend), in ``dtype``, and inputs for one set of two."""
    base, fast = _pair()
    base, fast = base.to(dtype), fast.to(dtype)
    fast.set_fused_ops(True, backend="torch")
    inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    return base, fast, inp


def _linear_calls(monkeypatch, unet, inp, **kw):
    """Counts of the aten GEMM ops one no-grad forward dispatches, and of the tensor adds it makes outside
    jk.add_layer_norm (whose torch backend is made of adds)."""
    import jedi.unet as unet_mod
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"addmm": 0, "addmm_": 0, "mm": 0, "add": 0}
    ops = {torch.ops.aten.addmm.default: "addmm", torch.ops.aten.addmm_.default: "addmm_",
           torch.ops.aten.mm.default: "mm"}
    inside = [0]
    real = jk.add_layer_norm

    def ln(*a, **k):
        inside[0] += 1
        try:
            return real(*a, **k)
        finally:
            inside[0] -= 1

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                counts[ops[func]] += 1
            elif (func is torch.ops.aten.add.Tensor and not inside[0]
                  and all(isinstance(a, torch.Tensor) for a in args[:2])):
                counts["add"] += 1
            return func(*args, **(kwargs or {}))

    with monkeypatch.context() as mp:
        mp.setattr(unet_mod.jk, "add_layer_norm", ln)
        with torch.no_grad(), Spy():
            unet(**inp, set_size=2, **kw)
    return counts


def test_set_fused_ops_switches_fold_linear_bias():
    from jedi.unet import TransformerBlock

    unet = JeDiUNet(UNetConfig.tiny())
    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
    assert blocks and not any(m.fold_linear_bias for m in blocks)
    unet.set_fused_ops(True, backend="torch")
    assert all(m.fold_linear_bias and m.fused_ln for m in blocks)
    unet.set_fused_ops(False)
    assert not any(m.fold_linear_bias for m in blocks)


@pytest.mark.parametrize("out_positions", [None, (1,)], ids=["all", "targets"])
def test_fold_linear_bias_float64_equals_plain_and_moves_the_biases(monkeypatch, out_positions):
    """In float64 inference the folded biases give the plain model's output to rounding (also with the targets-only
    forward, whose last joint attention runs on some images); per transformer block the two out-projections run
    as mm instead of addmm (their biases go into the next add + LayerNorm as its shift), the feed-forward output as
    an in-place addmm_ into the sum the third add + LayerNorm wrote with its bias in it (sum_shift), and the
    residual add after the feed-forward is gone."""
    import jedi.unet as unet_mod
    from jedi.unet import TransformerBlock

    base, fast, inp = _ln_pair()
    kw = {} if out_positions is None else dict(out_positions=out_positions)
    n_blocks = _count(fast, TransformerBlock)
    ln_calls = []
    real = jk.add_layer_norm
    monkeypatch.setattr(unet_mod.jk, "add_layer_norm", lambda *a, **k: ln_calls.append(
        (k.get("shift") is not None, k.get("sum_shift") is not None)) or real(*a, **k))
    with torch.no_grad():
        ref, out = base(**inp, set_size=2, **kw), fast(**inp, set_size=2, **kw)
    assert ref.abs().max() > 0.1
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="fold_linear_bias float64")
    assert ln_calls == [(False, False), (True, False), (True, True)] * n_blocks
    monkeypatch.undo()
    folded = _linear_calls(monkeypatch, fast, inp, **kw)
    for m in fast.modules():
        if isinstance(m, TransformerBlock):
            m.fold_linear_bias = False
    unfolded = _linear_calls(monkeypatch, fast, inp, **kw)
    assert folded["addmm"] == unfolded["addmm"] - 3 * n_blocks
    assert folded["mm"] == unfolded["mm"] + 2 * n_blocks
    assert folded["addmm_"] == unfolded["addmm_"] + n_blocks
    assert folded["add"] == unfolded["add"] - n_blocks
    with torch.no_grad():
        assert_close_verbose(fast(**inp, set_size=2, **kw), ref, atol=1e-12 * float(ref.abs().max()), name="off")


def test_fold_linear_bias_leaves_wrapped_layers_and_training_alone():
    """A wrapped out-projection (a subclass of nn.Linear, e.g. LoRA), a wrapped feed-forward output or attention
    module keeps its own forward with its bias, the rest of the block still folds, and the output is the plain
    model's; under autograd nothing folds (the block takes torch's LayerNorms) and the gradients are the plain
    model's."""
    from jedi.unet import TransformerBlock

    class Wrapped(nn.Linear):
        calls = 0

        def forward(self, x):
            Wrapped.calls += 1
            return super().forward(x)

    def wrap(lin):
        w = Wrapped(lin.in_features, lin.out_features).double()
        w.load_state_dict(lin.state_dict())
        return w

    base, fast, inp = _ln_pair()
    blocks = [m for m in fast.modules() if isinstance(m, TransformerBlock)]
    blocks[0].attn1.to_out[0] = wrap(blocks[0].attn1.to_out[0])
    blocks[0].attn2.to_out[0] = wrap(blocks[0].attn2.to_out[0])
    blocks[-1].ff.net[2] = wrap(blocks[-1].ff.net[2])
    x = torch.zeros(1, dtype=torch.float64)
    assert blocks[0]._folded_biases(x)[:2] == (None, None) and blocks[0]._folded_biases(x)[2] is not None
    assert blocks[-1]._folded_biases(x)[2] is None
    with torch.no_grad():
        ref, out = base(**inp, set_size=2), fast(**inp, set_size=2)
    assert Wrapped.calls == 3
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="wrapped layers")
    outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="training")
    _assert_same_grads(base, fast, 1e-11)

    class FFWrapper(nn.Module):  # a wrapped feed-forward without FeedForward's .net: its block adds its output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h):
            return self.inner(h)

    base.eval()
    fast.eval()
    middle = blocks[1]
    middle.ff = FFWrapper(middle.ff)
    assert middle._folded_biases(x)[2] is None and middle._folded_biases(x)[0] is not None
    with torch.no_grad():
        ref, out = base(**inp, set_size=2), fast(**inp, set_size=2)
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="wrapped feed-forward")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fold_linear_bias_triton_float32_matches_unfused(channels_last):
    """The folded biases through the Triton add + LayerNorm (interpreter on CPU) in float32: the plain model's
    output within float32 rounding."""
    base, fast = _pair()
    fast.set_fused_ops(True, backend="triton")
    inp = _inputs(base.config, N=2)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
                   x0=inp["x0"].to(memory_format=torch.channels_last))
    with torch.no_grad():
        ref, out = base(**inp, set_size=2), fast(**inp, set_size=2)
    assert_close_verbose(out, ref, atol=2e-5 * float(ref.abs().max()), name="fold_linear_bias triton")


def test_attention_out_bias_false():
    """SetAttention and CrossAttention with out_bias=False: the output without to_out's bias, exactly; ValueError
    when to_out is not a plain Linear with a bias."""
    from jedi.unet import CrossAttention

    torch.manual_seed(0)
    sa = jk.SetAttention(16, heads=2, dim_head=8).double()
    ca = CrossAttention(16, 12, 2, 8).double()
    x, ctx = torch.randn(4, 6, 16, dtype=torch.float64), torch.randn(4, 3, 12, dtype=torch.float64)
    for name, full, part, mod in (
            ("set", sa(x, 2), sa(x, 2, out_bias=False), sa),
            ("set positions", sa(x, 2, q_positions=(1,)), sa(x, 2, q_positions=(1,), out_bias=False), sa),
            ("cross", ca(x, ctx), ca(x, ctx, out_bias=False), ca)):
        assert_close_verbose(part + mod.to_out[0].bias, full, atol=1e-12, name=name)
    sa.to_out[0] = nn.Linear(16, 16, bias=False).double()
    with pytest.raises(ValueError, match="out_bias=False needs"):
        sa(x, 2, out_bias=False)


# ---- Upsample as a sub-pixel convolution (jk.upsample_conv2d) ------------------------------------------------------
def test_set_fused_ops_switches_subpixel_upsample():
    from jedi.unet import Upsample

    unet = JeDiUNet(UNetConfig.tiny())
    ups = [m for m in unet.modules() if isinstance(m, Upsample)]
    assert ups and not any(m.subpixel for m in ups)
    unet.set_fused_ops(True, backend="triton")
    assert all(m.subpixel and m.backend == "triton" for m in ups)
    unet.set_fused_ops(False)
    assert not any(m.subpixel for m in ups)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_subpixel_upsample_float64_equals_plain(monkeypatch, channels_last):
    """With the fused ops on the Triton backend every Upsample runs jk.upsample_conv2d (no upsampled tensor: no
    F.interpolate call) and the float64 output is the plain model's to rounding; a wrapped conv (a subclass, e.g.
    LoRA) keeps its own forward."""
    import jedi.unet as unet_mod
    from jedi.unet import Upsample

    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend="triton")
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
                   x0=inp["x0"].to(memory_format=torch.channels_last))
    calls = {"subpixel": 0, "interpolate": 0}
    real_sub, real_interp = jk.upsample_conv2d, F.interpolate

    def sub(*a, **k):
        calls["subpixel"] += 1
        return real_sub(*a, **k)

    def interp(*a, **k):
        calls["interpolate"] += 1
        return real_interp(*a, **k)

    monkeypatch.setattr(unet_mod.jk, "upsample_conv2d", sub)
    monkeypatch.setattr(unet_mod.F, "interpolate", interp)
    with torch.no_grad():
        ref, out = base(**inp, set_size=2), fast(**inp, set_size=2)
    n_up = _count(fast, Upsample)
    assert calls == {"subpixel": n_up, "interpolate": n_up}  # the plain model's calls only
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="subpixel upsample float64")

    class WrappedConv(nn.Conv2d):
        pass

    up = next(m for m in fast.modules() if isinstance(m, Upsample))
    wrapped = WrappedConv(up.conv.in_channels, up.conv.out_channels, 3, padding=1).double()
    wrapped.load_state_dict(up.conv.state_dict())
    up.conv = wrapped
    calls.update(subpixel=0, interpolate=0)
    with torch.no_grad():
        out = fast(**inp, set_size=2)
    assert calls == {"subpixel": n_up - 1, "interpolate": 1}
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name="wrapped upsample conv")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")
def test_subpixel_upsample_training_grads_equal_plain():
    """Under autograd the sub-pixel path stays on (it is differentiable: the fold, the conv and the interleave's
    adjoint): the Upsample convs' gradients, and all others, equal the plain model's in float64."""
    from jedi.unet import Upsample

    base, fast = _pair()
    base, fast = base.double(), fast.double()
    for m in fast.modules():
        if isinstance(m, Upsample):
            m.subpixel, m.backend = True, "triton"
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="training subpixel")
    _assert_same_grads(base, fast, 1e-11)


# ---- residual_add: the output convs' biases in the residual adds (jk.residual_add) ---------------------------------
def test_set_fused_ops_switches_residual_add():
    from jedi.unet import ResBlock, SpatialTransformer

    unet = JeDiUNet(UNetConfig.tiny())
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    assert blocks and not any(m.residual_add for m in blocks)
    unet.set_fused_ops(True, backend="triton")
    assert all(m.residual_add and m.fold_bias and m.add_backend == "triton" for m in blocks)
    unet.set_fused_ops(False)
    assert not any(m.residual_add for m in blocks)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_residual_add_moves_the_output_biases_into_the_adds(monkeypatch, backend):
    """Channels-last, fold_bias + residual_add: every ResBlock and SpatialTransformer ends in one jk.residual_add
    with its output bias; conv2 of every ResBlock (identity skips too) runs without bias, and the 1x1 skip and
    proj_out GEMMs as mm (no bias epilogue): only conv_in, the down/up-sampling convs and conv_out keep a bias. The
    float64 output equals the plain model's; in training every gradient does."""
    import jedi.unet as unet_mod
    from jedi.unet import ResBlock, SpatialTransformer

    base, folded, inp = _fold_pair(channels_last=True)
    for m in folded.modules():
        if isinstance(m, (ResBlock, SpatialTransformer)):
            m.residual_add, m.add_backend = True, backend
    res = [m for m in folded.modules() if isinstance(m, ResBlock)]
    n_skip = sum(isinstance(m.skip_connection, nn.Conv2d) for m in res)
    n_st = _count(folded, SpatialTransformer)
    convs_ref, addmm_ref = _conv_calls(base, inp)
    n_1x1 = sum(k == (1, 1) for k, _ in convs_ref)
    calls = []
    real = jk.residual_add
    monkeypatch.setattr(unet_mod.jk, "residual_add", lambda *a, **k: calls.append(a[2] is not None) or real(*a, **k))
    convs, addmm = _conv_calls(folded, inp)
    assert calls == [True] * (len(res) + n_st)
    assert all(k == (3, 3) for k, _ in convs) and len(convs) == len(convs_ref) - n_1x1
    assert sum(not b for _, b in convs) == 2 * len(res)  # conv1 and conv2 everywhere
    assert addmm == addmm_ref + n_1x1 - n_skip - n_st  # proj_in keeps its epilogue; skip and proj_out run as mm
    with torch.no_grad():
        ref, out = base(**inp, set_size=2), folded(**inp, set_size=2)
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name=f"residual_add[{backend}]")
    w = torch.linspace(-1, 1, inp["x_t"].numel(), dtype=torch.float64).view(inp["x_t"].shape)
    outs = _train_each((base, folded), inp, w)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="residual_add training")
    _assert_same_grads(base, folded, 1e-11)


def test_residual_add_stays_out_of_compile_and_autocast(monkeypatch):
    """Under torch.compile (inductor fuses the adds itself) and autocast (mixed dtypes) the blocks take the
    fold_bias path without jk.residual_add."""
    import jedi.unet as unet_mod
    from jedi.unet import ResBlock

    block = ResBlock(32, 16, 32).double()
    block.fold_bias = block.residual_add = True
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    assert unet_mod._residual_add_ok(block, x, block.out_layers[3].weight)
    assert not unet_mod._residual_add_ok(block, x.float(), block.out_layers[3].weight)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not unet_mod._residual_add_ok(block, x, block.out_layers[3].weight)
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not unet_mod._residual_add_ok(block, x, block.out_layers[3].weight)
    block.residual_add = False
    assert not unet_mod._residual_add_ok(block, x, block.out_layers[3].weight)


# ---- skip_cat: the decoder's skip concatenations never made -------------------------------------------------------
def _activation_cats(unet, inp):
    """The aten.cat calls of one no-grad forward whose output is a 4-D activation (the skip concatenations)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = [0]

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.cat.default and out.dim() == 4:
                n[0] += 1
            return out

    with torch.no_grad(), Spy():
        out = unet(**inp, set_size=2)
    return n[0], out


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_skip_cat_float64_equals_plain_without_concatenations(monkeypatch, backend):
    """Channels-last inference with every fused op: each decoder ResBlock gets a SkipCat, its first GroupNorm the
    two halves (concat=) and its skip conv two GEMMs; on the Triton backend no activation is concatenated at all
    (torch's backend concatenates inside the norm). The float64 output equals the plain model's; with grad on, or
    skip_cat off, the concatenations come back and the output is the same."""
    import jedi.unet as unet_mod
    from jedi.unet import ResBlock

    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend=backend)
    fast = fast.to(memory_format=torch.channels_last)
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
               x0=inp["x0"].to(memory_format=torch.channels_last))
    n_dec = len(fast.output_blocks)
    norms = []
    real = jk.group_norm
    monkeypatch.setattr(unet_mod.jk, "group_norm", lambda *a, **k: norms.append(k.get("concat") is not None)
                        or real(*a, **k))
    cats, out = _activation_cats(fast, inp)
    assert sum(norms) == n_dec
    assert cats == (0 if backend == "triton" else n_dec)
    with torch.no_grad():
        ref = base(**inp, set_size=2)
    assert_close_verbose(out, ref, atol=1e-12 * float(ref.abs().max()), name=f"skip_cat[{backend}]")
    for m in fast.modules():
        if isinstance(m, ResBlock):
            m.skip_cat = False
    norms.clear()
    cats_off, out_off = _activation_cats(fast, inp)
    assert sum(norms) == 0 and cats_off == n_dec
    assert_close_verbose(out_off, ref, atol=1e-12 * float(ref.abs().max()), name="skip_cat off")


def test_skip_cat_only_in_inference_and_materializes_for_others():
    """takes_skip_cat: off under autograd, for NCHW halves, a wrapped skip conv or an unfused norm; a SkipCat handed
    to a block that cannot take it is concatenated, so the output never changes."""
    from jedi.unet import Block, ResBlock, SkipCat

    block = ResBlock(64, 16, 32).double()
    block.fold_bias = block.skip_cat = True
    block.in_layers[0].fused = True
    h = torch.randn(2, 32, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    s = torch.randn(2, 32, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert not block.takes_skip_cat(h, s)  # grad mode on
    with torch.no_grad():
        assert block.takes_skip_cat(h, s)
        assert not block.takes_skip_cat(h.contiguous(), s)
        emb = torch.randn(2, 16, dtype=torch.float64)
        ref = block(torch.cat([h, s], dim=1), emb)
        assert_close_verbose(block(SkipCat(h, s), emb), ref, atol=1e-12, name="SkipCat")
        block.in_layers[0].fused = False
        assert not block.takes_skip_cat(h, s)
        assert_close_verbose(block(SkipCat(h, s), emb), ref, atol=1e-12, name="SkipCat materialized")
        seq = Block([nn.Identity()])
        assert torch.equal(seq(SkipCat(h, s), emb, None, 1), torch.cat([h, s], dim=1))


# ---- frozen_weights: the weight-derived tensors once per scope ----------------------------------------------------
def _frozen_pair(backend):
    base, fast = _pair()
    base, fast = base.double(), fast.double()
    fast.set_fused_ops(True, backend=backend)
    fast.set_fuse_qkv(True)
    fast.set_fuse_context_kv(True)
    fast = fast.to(memory_format=torch.channels_last)
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(base.config, N=2).items()}
    inp = dict(inp, x_t=inp["x_t"].to(memory_format=torch.channels_last),
               x0=inp["x0"].to(memory_format=torch.channels_last))
    return base, fast, inp


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_frozen_weights_same_outputs_derived_once(monkeypatch, backend):
    """Inside frozen_weights() the forward's weight-derived tensors are stored once (each self-attention's fused
    q/k/v weight, the context k/v weight, the time-embedding GEMM's weights and biases, and on the Triton backend
    each Upsample's folded kernels) and reused by later forwards: outputs bitwise equal to the unfrozen forward's;
    a weight update between two scopes is seen by the next."""
    from jedi.unet import Upsample
    from jedi_kernels.modules import SetAttention

    base, fast, inp = _frozen_pair(backend)
    with torch.no_grad():
        ref = fast(**inp, set_size=2)
        with fast.frozen_weights():
            outs = [fast(**inp, set_size=2) for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    n_up = _count(fast, Upsample) if backend == "triton" else 0
    assert len(fast.derived_weights) == _count(fast, SetAttention) + 2 + n_up
    assert_close_verbose(ref, base(**inp, set_size=2).detach(), atol=1e-12 * float(ref.abs().max()), name="vs plain")
    # stored tensors are not recomputed inside the scope: count the concatenations of a second forward
    cats = []
    real = torch.cat
    with torch.no_grad(), fast.frozen_weights():
        fast(**inp, set_size=2)
        monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(
            any(isinstance(t, nn.Parameter) for t in (a[0] if a else k["tensors"]))) or real(*a, **k))
        fast(**inp, set_size=2)
        monkeypatch.undo()
    assert cats and not any(cats)  # no parameter concatenated (the others are activations and embeddings)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(1.01)
        plain_new = JeDiUNet(fast.config).double()
        plain_new.load_state_dict(fast.state_dict())
        with fast.frozen_weights():
            after = fast(**inp, set_size=2)
        expect = plain_new.eval()(**inp, set_size=2)
    assert_close_verbose(after, expect, atol=1e-12 * float(expect.abs().max()), name="after an update")


def test_frozen_weights_catches_a_change_inside_and_leaves_training_alone():
    from jedi_kernels.modules import SetAttention

    base, fast, inp = _frozen_pair("torch")
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="parameters changed inside a frozen-weights scope"):
            with fast.frozen_weights():
                fast(**inp, set_size=2)
                attn = next(m for m in fast.modules() if isinstance(m, SetAttention))
                attn.to_q.weight.add_(0)  # any in-place write bumps the version
    fast.train()
    base.train()
    with fast.frozen_weights():  # grad on: nothing stored, gradients as without the scope
        outs = _train_each((base, fast), inp)
    assert_close_verbose(outs[1], outs[0], atol=1e-12 * float(outs[0].abs().max()), name="training in a scope")
    _assert_same_grads(base, fast, 1e-11)


def test_personalize_runs_in_a_frozen_scope(monkeypatch):
    """jedi.sampling.personalize enters the UNet's frozen_weights() for the run (looking through wrappers): its
    result is bitwise the one without the scope."""
    import contextlib

    import jedi.sampling as sampling

    _, fast, _ = _frozen_pair("torch")
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    ctx, null = (torch.randn(1, 5, fast.config.context_dim, generator=g, dtype=torch.float64) for _ in range(2))
    seen = []
    real = fast.frozen_weights

    def spy():
        seen.append(1)
        return real()

    monkeypatch.setattr(fast, "frozen_weights", spy)
    kw = dict(steps=2, progress=False)
    out = sampling.personalize(fast, refs, ctx, null, generator=torch.Generator().manual_seed(1), **kw)
    assert seen == [1] and len(fast.derived_weights) > 0 and not fast.derived_weights.active
    monkeypatch.setattr(sampling, "frozen_weights_of", lambda unet: contextlib.nullcontext())
    plain = sampling.personalize(fast, refs, ctx, null, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out, plain)
