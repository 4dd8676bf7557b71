"""JeDiUNet forward per denoising step.

CPU: the tiny config (so ``pytest benchmarks --benchmark-only`` has CPU content). GPU (``-m gpu``): SD v1 at 512 px
(64x64 latents), fp16, set size 2 with a classifier-free-guidance batch (N = 4: two sets, cond + uncond), eager vs
``CUDAGraphRunner`` vs diffusers' UNet2DConditionModel with a joint-attention processor (same weights) when diffusers
is importable. GPU times are CUDA-event medians (ms), recorded in ``extra_info`` with the card and versions. Random
weights: timing does not depend on them.
"""
from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from common import env_info

from jedi import CUDAGraphRunner, JeDiUNet, UNetConfig, to_diffusers_state_dict

G, N, HW, M = 2, 4, 64, 77  # set size, images (2 sets: CFG cond + uncond), latent side (512 px), CLIP tokens


def _inputs(cfg: UNetConfig, n: int, hw: int, m: int, device, dtype) -> dict:
    return dict(
        x_t=torch.randn(n, cfg.out_channels, hw, hw, device=device, dtype=dtype),
        timesteps=torch.full((n,), 500, device=device),
        context=torch.randn(n, m, cfg.context_dim, device=device, dtype=dtype),
        x0=torch.randn(n, cfg.out_channels, hw, hw, device=device, dtype=dtype),
        ng_mask=torch.tensor([False, True] * (n // 2), device=device),
    )


def test_unet_tiny_forward_cpu(benchmark):
    cfg = UNetConfig.tiny()
    unet = JeDiUNet(cfg).eval()
    inp = _inputs(cfg, 4, 16, 8, "cpu", torch.float32)
    with torch.no_grad():
        benchmark(lambda: unet(**inp, set_size=G))
    benchmark.extra_info.update(env_info("cpu"), config="tiny", shape="4x4x16x16", set_size=G, dtype="float32")


# ---- GPU ---------------------------------------------------------------------------------------------------------------
def _cuda_ms(fn, warmup: int = 3, iters: int = 15) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _run_gpu(benchmark, fn, name: str) -> None:
    torch.cuda.reset_peak_memory_stats()
    ms = _cuda_ms(fn)

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        env_info("cuda"), impl=name, config="sd_v1", dtype="float16", shape=f"{N}x4x{HW}x{HW}", set_size=G,
        context_len=M, ms=round(ms, 3), peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


@pytest.fixture(scope="module")
def sd_unet():
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = JeDiUNet(UNetConfig.sd_v1())
    unet = unet.to_empty(device="cuda")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    unet = unet.half().eval()
    return unet, _inputs(unet.config, N, HW, M, "cuda", torch.float16)


def _backend(unet, backend: str) -> None:
    import jedi_kernels as jk

    if backend == "triton" and not jk.available_backends()["triton"]:
        pytest.skip("triton backend unavailable")
    unet.set_attn_backend(backend)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["auto", "triton"])
def test_unet_sd_v1_fp16_eager(benchmark, sd_unet, attn):
    unet, inp = sd_unet
    _backend(unet, attn)
    with torch.no_grad():
        _run_gpu(benchmark, lambda: unet(**inp, set_size=G), f"jedi eager, attention {attn}")


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["auto", "triton"])
def test_unet_sd_v1_fp16_cuda_graph(benchmark, sd_unet, attn):
    unet, inp = sd_unet
    _backend(unet, attn)
    runner = CUDAGraphRunner(unet, dict(inp, set_size=G))
    _run_gpu(benchmark, lambda: runner(**inp, set_size=G), f"jedi CUDAGraphRunner, attention {attn}")


class _JointProcessor:
    """diffusers processor for attn1: joint SDPA over each set, (B*G, L, C) -> (B, G*L, C)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        n, L, C = hidden_states.shape
        H, b = attn.heads, n // G
        x = hidden_states.reshape(b, G * L, C)  # (N, L, C) -> (B, G*L, C)
        q, k, v = (t.view(b, G * L, H, -1).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, G * L, -1)  # (B, G*L, H*D)
        return attn.to_out[0](o).reshape(n, L, C)


@pytest.mark.gpu
def test_unet_sd_v1_fp16_diffusers_joint(benchmark, sd_unet):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, inp = sd_unet
    unet.set_attn_backend("auto")
    with torch.device("meta"):
        dm = diffusers.UNet2DConditionModel(in_channels=9, cross_attention_dim=768, attention_head_dim=8)
    dm = dm.to_empty(device="cuda").half().eval()
    dm.load_state_dict(to_diffusers_state_dict(unet, marker=False))
    dm.set_attn_processor({n: _JointProcessor() if n.endswith("attn1.processor") else AttnProcessor2_0()
                           for n in dm.attn_processors})
    m = inp["ng_mask"].to(torch.float16).view(N, 1, 1, 1)

    def fwd():
        x = torch.cat([inp["x_t"], inp["x0"] * (1 - m), m.expand(N, 1, HW, HW)], dim=1)
        return dm(x, inp["timesteps"], inp["context"]).sample

    with torch.no_grad():
        _run_gpu(benchmark, fwd, "diffusers + joint SDPA processor")
