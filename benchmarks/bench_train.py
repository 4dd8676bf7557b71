"""Training-step throughput (issue 6): JeDiUNet vs diffusers' UNet with a joint-attention processor, same batch,
same weights, same run.

Workload: SD v1 UNet, 512 px latents (64x64), set size 4, B = 2 sets (8 images), fp32 master weights with bf16
autocast, AdamW, eps-prediction MSE. Reported: images/s (= 8 / step time) and the ratio ours / diffusers.
Target >= 1.3x diffusers (anchor: MLPerf SD2 training on H100 ~ 110 images/s per GPU).
A CPU smoke case runs the same code on a tiny config so CI exercises it.
"""
from __future__ import annotations

import pytest
import torch

import table6 as t6
from common import env_info, gpu_time_ms

TRAIN = t6.Workload("train_ng4", "JeDi training, set size 4", in_channels=9, set_size=4, batch=8)
_RATES: dict[str, float] = {}


def _train_step(forward, params, inputs, device):
    """One optimizer step of eps-prediction MSE on ``forward()`` against a fixed random target."""
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(1)  # the same target for every implementation
    target = torch.randn(inputs["x_t"].shape, generator=g, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            eps = forward()
        loss = torch.nn.functional.mse_loss(eps.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _models(device, tiny):
    ours, inp = t6.build_ours(TRAIN, device=device, dtype=torch.float32, tiny=tiny)
    ours.train()
    kw = {k: v for k, v in inp.items() if k not in ("x_t", "timesteps", "context")}
    ours_fwd = lambda: ours(inp["x_t"], inp["timesteps"], inp["context"], **kw)  # noqa: E731
    return ours, inp, ours_fwd


def test_train_step_cpu_smoke(benchmark):
    """Tiny config on the CPU: both implementations take optimizer steps and agree on the first loss."""
    pytest.importorskip("diffusers")
    device = torch.device("cpu")
    ours, inp, ours_fwd = _models(device, tiny=True)
    dm, dstep = t6.build_diffusers(TRAIN, ours, inp)
    dm.train()
    ours_step = _train_step(ours_fwd, list(ours.parameters()), inp, device)
    diff_step = _train_step(dstep, list(dm.parameters()), inp, device)
    l_ours, l_diff = ours_step(), diff_step()
    assert abs(l_ours.item() - l_diff.item()) <= 1e-4 * max(1.0, abs(l_diff.item()))
    benchmark.pedantic(ours_step, rounds=2, iterations=1)
    benchmark.extra_info.update(env_info("cpu"), workload="tiny", loss_ours=l_ours.item(), loss_diffusers=l_diff.item())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["ours", "diffusers"])
def test_train_step_throughput_sd_v1(benchmark, impl):
    device = torch.device("cuda")
    ours, inp, ours_fwd = _models(device, tiny=False)
    if impl == "ours":
        model, fwd = ours, ours_fwd
    else:
        pytest.importorskip("diffusers")
        model, fwd = t6.build_diffusers(TRAIN, ours, inp)
        model.train()
        del ours, ours_fwd  # only diffusers' copy of the weights stays on the GPU
    step = _train_step(fwd, list(model.parameters()), inp, device)
    for _ in range(2):  # warm up (allocations, AdamW state)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = gpu_time_ms(step, warmup=1, rep_ms=1500)
    rate = TRAIN.batch / ms * 1e3
    _RATES[impl] = rate
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=3, iterations=1)
    benchmark.extra_info.update(env_info("cuda"), impl=impl, ms=ms, images_per_s=rate, batch=TRAIN.batch,
                                set_size=TRAIN.set_size, precision="bf16 autocast, fp32 AdamW",
                                peak_mem_GB=torch.cuda.max_memory_allocated() / 1e9)
    if impl == "diffusers" and "ours" in _RATES:
        benchmark.extra_info["ours_over_diffusers"] = _RATES["ours"] / rate
