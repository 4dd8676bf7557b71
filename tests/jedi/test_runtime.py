"""jedi.runtime.CUDAGraphRunner and GraphedUNet: refuse CPU models clearly; on a GPU, replays equal eager forwards.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import jedi.runtime as rt
from jedi import CUDAGraphRunner, GraphedUNet, JeDiUNet, UNetConfig
from jedi_kernels.testing import assert_close_verbose


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()))
    return model


def _inputs(N=4, hw=16, ctx=32, device="cpu", dtype=torch.float32):
    return dict(
        x_t=torch.randn(N, 4, hw, hw, device=device, dtype=dtype),
        timesteps=torch.randint(0, 1000, (N,), device=device),
        context=torch.randn(N, 7, ctx, device=device, dtype=dtype),
        x0=torch.randn(N, 4, hw, hw, device=device, dtype=dtype),
        ng_mask=torch.tensor([False, True] * (N // 2), device=device),
        set_size=2,
    )


def test_cpu_model_is_refused():
    unet = JeDiUNet(UNetConfig.tiny())
    with pytest.raises(RuntimeError, match="CUDA"):
        CUDAGraphRunner(unet, _inputs())


def test_call_copies_into_static_buffers_and_checks_inputs():
    """The replay-side logic, on the CPU with a stand-in graph (capture itself needs CUDA)."""
    runner = CUDAGraphRunner.__new__(CUDAGraphRunner)
    example = _inputs()
    runner.static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    runner.output = torch.zeros(4, 4, 16, 16)
    replays = []
    runner.graph = type("Graph", (), {"replay": lambda self: replays.append(1)})()
    runner.clone, runner.unet, runner.frozen_capture = False, nn.Linear(2, 2), False
    new = _inputs()
    assert runner(**new) is runner.output and replays == [1]
    assert torch.equal(runner.static["x_t"], new["x_t"]) and torch.equal(runner.static["ng_mask"], new["ng_mask"])
    runner.clone = True
    assert runner(**new) is not runner.output
    with pytest.raises(ValueError, match="x_t"):
        runner(**dict(new, x_t=torch.randn(4, 4, 8, 8)))
    with pytest.raises(ValueError, match="context"):
        runner(**dict(new, context=new["context"].double()))
    with pytest.raises(ValueError, match="set_size"):
        runner(**dict(new, set_size=4))
    with pytest.raises(ValueError, match="captured keys"):
        runner(**dict(new, set_mask=None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_equals_eager(dtype):
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).to("cuda", dtype).eval()
    example = _inputs(device="cuda", dtype=dtype)
    runner = CUDAGraphRunner(unet, example)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    outs = []
    for step in range(3):
        inp = _inputs(device="cuda", dtype=dtype)
        with torch.no_grad():
            ref = unet(**inp)
        out = runner(**inp)
        assert_close_verbose(out, ref, atol=tol, name=f"replay {step}")
        outs.append(out)
    assert outs[0] is outs[1]  # the static output buffer, overwritten by every call


@pytest.mark.gpu
def test_clone_channels_last_and_set_mask():
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).cuda().to(memory_format=torch.channels_last).eval()
    mask = torch.tensor([[True, False], [True, True]], device="cuda")
    example = dict(_inputs(device="cuda"), set_mask=mask)
    for k in ("x_t", "x0"):
        example[k] = example[k].to(memory_format=torch.channels_last)
    runner = CUDAGraphRunner(unet, example, clone=True)
    inp = dict(example, x_t=torch.randn_like(example["x_t"]))
    with torch.no_grad():
        ref = unet(**inp)
    a = runner(**inp)
    b = runner(**inp)
    assert a is not b
    assert_close_verbose(a, ref, atol=1e-4, name="channels-last replay")


@pytest.mark.gpu
def test_bad_calls_raise():
    unet = JeDiUNet(UNetConfig.tiny()).cuda().eval()
    example = _inputs(device="cuda")
    runner = CUDAGraphRunner(unet, example)
    with pytest.raises(ValueError, match="x_t"):
        runner(**dict(example, x_t=torch.randn(4, 4, 8, 8, device="cuda")))
    with pytest.raises(ValueError, match="set_size"):
        runner(**dict(example, set_size=4))
    with pytest.raises(ValueError, match="captured keys"):
        runner(**{k: v for k, v in example.items() if k != "x0"})
    with pytest.raises(ValueError, match="device"):
        CUDAGraphRunner(unet, dict(example, x0=example["x0"].cpu()))


def test_graphed_unet_refuses_cpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedUNet(JeDiUNet(UNetConfig.tiny()))


def test_graphed_unet_captures_per_signature(monkeypatch):
    """GraphedUNet's bookkeeping on the CPU, with a stand-in runner that runs the UNet eagerly: one capture per
    signature (tensor shapes/dtypes, other values), oldest dropped past max_graphs, Python timesteps as tensors,
    channels-last static buffers for a channels-last UNet, eager-equal outputs."""
    made = []

    class FakeRunner:
        def __init__(self, unet, example, *, warmup, clone):
            assert clone  # a multistep sampler keeps earlier eps: every call must return a fresh tensor
            self.unet, self.example = unet, example
            made.append(self)

        def __call__(self, **inputs):
            with torch.no_grad():
                return self.unet(**inputs)

    monkeypatch.setattr(rt, "CUDAGraphRunner", FakeRunner)
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).eval()
    g = GraphedUNet.__new__(GraphedUNet)  # __init__ insists on CUDA
    g.unet, g.max_graphs, g.warmup, g.runners, g.captures = unet, 2, 1, {}, 0

    a = _inputs()
    with torch.no_grad():
        want = unet(**a)
    x_t, t, ctx = a.pop("x_t"), a.pop("timesteps"), a.pop("context")
    assert_close_verbose(g(x_t, t, ctx, **a), want, atol=0, name="graphed output")
    g(torch.randn_like(x_t), torch.randint(0, 1000, (4,)), ctx, **a)  # new values, same signature
    assert g.captures == 1 and len(made) == 1
    g(x_t, 500, ctx, **a)  # a Python timestep becomes a 0-d tensor: a new (tensor) signature, then reused
    g(x_t, 20, ctx, **a)
    assert g.captures == 2 and made[-1].example["timesteps"].dim() == 0
    b = _inputs(N=2)
    g(b.pop("x_t"), b.pop("timesteps"), b.pop("context"), **b)  # another batch: third graph, the oldest goes
    assert g.captures == 3 and len(g.runners) == 2 and made[0] not in g.runners.values()
    g(x_t, t, ctx, **dict(a, set_size=4))  # a non-tensor value is part of the signature
    assert g.captures == 4
    with pytest.raises(ValueError, match="hashable"):
        g(x_t, t, ctx, **dict(a, set_mask=[[True]]))

    unet.to(memory_format=torch.channels_last)
    g.reset()
    g(x_t, t, ctx, **a)
    assert made[-1].example["x_t"].is_contiguous(memory_format=torch.channels_last)
    assert not made[-1].example["x_t"].is_contiguous()


@pytest.mark.gpu
def test_graphed_unet_replays_equal_eager():
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).cuda().eval()
    g = GraphedUNet(unet, max_graphs=1)
    outs = []
    for step in range(3):
        inp = _inputs(device="cuda")
        with torch.no_grad():
            ref = unet(**inp)
        x_t, t, ctx = inp.pop("x_t"), inp.pop("timesteps"), inp.pop("context")
        out = g(x_t, t, ctx, **inp)
        assert_close_verbose(out, ref, atol=1e-4, name=f"graphed step {step}")
        outs.append(out)
    assert g.captures == 1 and outs[0] is not outs[1]
    inp = _inputs(N=2, device="cuda")
    g(inp.pop("x_t"), inp.pop("timesteps"), inp.pop("context"), **inp)
    assert g.captures == 2 and len(g.runners) == 1
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedUNet(unet, max_graphs=0)


def test_refresh_derived_only_for_frozen_captures_outside_a_scope(monkeypatch):
    """The runners' rule before a replay (jedi.runtime.refresh_derived): a graph captured inside
    JeDiUNet.frozen_weights() gets the scope's stored tensors refreshed when replayed outside any scope, not inside
    one (the scope refreshed them on entry); a graph captured outside never (it derives them itself)."""
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).eval()
    unet.set_fused_ops(True, backend="torch")
    unet.set_fuse_qkv(True)
    refreshes = []
    real = unet.derived_weights.refresh
    monkeypatch.setattr(unet.derived_weights, "refresh", lambda: refreshes.append(1) or real())
    inp = _inputs()
    with torch.no_grad(), unet.frozen_weights():
        unet(**inp)
        assert not rt.refresh_derived(unet, frozen_capture=True)
    assert refreshes == [1] and len(unet.derived_weights) > 0  # the scope's entry only
    assert rt.refresh_derived(unet, frozen_capture=True) and refreshes == [1, 1]
    assert not rt.refresh_derived(unet, frozen_capture=False) and refreshes == [1, 1]
    assert not rt.refresh_derived(nn.Linear(2, 2), frozen_capture=True)


@pytest.mark.gpu
def test_gpu_graph_captured_frozen_sees_weight_updates():
    """A real graph captured inside frozen_weights() (fused ops, fused q/k/v and context k/v, channels-last fp16):
    equal to eager inside; after a weight update outside any scope, the replay (GraphedUNet refreshes first) and
    the replay inside a new scope (refreshed on entry) both equal the eager forward with the new weights."""
    unet = _randomize(JeDiUNet(UNetConfig.tiny())).cuda().half().eval().to(memory_format=torch.channels_last)
    unet.set_fused_ops(True)
    unet.set_fuse_qkv(True)
    unet.set_fuse_context_kv(True)
    g = GraphedUNet(unet, max_graphs=1)
    inp = _inputs(device="cuda", dtype=torch.float16)
    args = (inp.pop("x_t"), inp.pop("timesteps"), inp.pop("context"))
    with torch.no_grad():
        with unet.frozen_weights():
            out = g(*args, **inp)
            ref = unet(*args, **inp)
        tol = 2e-3 * float(ref.abs().max())
        assert_close_verbose(out, ref, atol=tol, name="frozen graph")
        for p in unet.parameters():
            p.mul_(1.05)
        new_ref = unet(*args, **inp)
        assert float((new_ref - ref).abs().max()) > 10 * tol  # the update shows
        assert_close_verbose(g(*args, **inp), new_ref, atol=tol, name="replay outside after an update")
        with unet.frozen_weights():
            assert_close_verbose(g(*args, **inp), new_ref, atol=tol, name="replay in a new scope")
    assert g.captures == 1
