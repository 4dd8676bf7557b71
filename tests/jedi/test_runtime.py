"""jedi.runtime.CUDAGraphRunner: refuses CPU models clearly; on a GPU, replays equal eager forwards."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jedi import CUDAGraphRunner, JeDiUNet, UNetConfig
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
    runner.clone = False
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
