"""SD's feed-forward input projection and its GEGLU in one kernel: ``out = a * gelu(g)``, ``[a, g] = x Wᵀ + b``.

Unfused, the projection GEMM writes the (R, 2F) pre-activation and the GEGLU pass reads it back: at SD's 64x64 level
(UNet batch 4: R = 16384 tokens, F = 1280) that is 84 MB written and 84 MB read per transformer block, ≈ 56 µs at
3 TB/s, next to a 37 µs GEMM. Here each program computes the value and the gate columns of one output tile (two
accumulators over the same x tile), applies the bias and the exact (erf) gelu to the float32 accumulators, and writes
only the (R, F) output, rounded once. The values and gates are never rounded to the input dtype (the unfused path
rounds them on the GEMM's store), so the result is at least as accurate as the unfused one.

Inference only: the op has no backward. :func:`jedi_kernels.linear_geglu` sends calls that record autograd to the
unfused path (``F.linear`` and :func:`jedi_kernels.geglu`, both differentiable).

Backends: "triton" (this file; GPU, or CPU under TRITON_INTERPRET=1) and "torch" (``reference.linear_geglu_reference``:
``F.linear``, chunk, gelu, multiply in the input dtype). ``jedi::linear_geglu`` has a fake kernel, so it traces under
torch.compile and captures in CUDA graphs.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from jedi_kernels.backends import triton_interpreting
from jedi_kernels.ops import cdiv, eager_call, rows_view
from jedi_kernels.ops.fast_launch import launch
from jedi_kernels.reference import linear_geglu_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch backend still works
    triton = None

__all__ = ["linear_geglu_op", "linear_geglu_fwd"]

# The interpreter runs one small config (CPU tests); GPUs autotune over _CONFIGS, except in float32 (for tests: IEEE
# float32 dots run on the FMA units and need many registers; this tile compiles without spills for sm_90 and sm_80).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
_F32_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

if triton is not None:
    _C_SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))

    def _cfg(bm, bn, bk, w, s):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)

    # H100 first. Two float32 accumulators per output tile, so a BLOCK_M x BLOCK_N tile is a BLOCK_M x 2 BLOCK_N tile
    # of the projection GEMM. Shared memory per stage: (BLOCK_M + 2 BLOCK_N) x BLOCK_K half elements. sm_90 bf16/fp16
    # (tools/triton_aot_check.py --all-configs): 128 x 64 over 8 warps 156 registers, 96 KB; 64 x 128 over 4 warps
    # 254, 120 KB; 64 x 64 over 4 warps 153, 96 KB; 64 x 256 over 8 warps 255, 216 KB; none spills (128 x 128 over 8
    # warps spills 80 B: left out). SD's K (320, 640, 1280) are multiples of 64.
    _CONFIGS = [_cfg(128, 64, 64, 8, 3), _cfg(64, 128, 64, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(64, 256, 64, 8, 3)]

    @triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def _linear_geglu_kernel(
        X, W, Bias, Out,
        M, K, F,
        s_xm,  # x row stride (elements); the feature stride is 1
        s_wn,  # weight row stride; the K stride is 1
        s_om,  # out row stride
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, BF16_RNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """out[m, n] = (x[m] · W[n] + b[n]) * gelu(x[m] · W[F + n] + b[F + n]) for one (BLOCK_M, BLOCK_N) tile.

        The x tile is loaded once per K step for both products; the weight's value rows [n0, n0 + BLOCK_N) and gate
        rows [F + n0, ...) are two tiles of the same (2F, K) matrix. Accumulation, bias and gelu in float32.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < F
        x_ptrs = X + rm[:, None] * s_xm + rk[None, :]
        wa_ptrs = W + rn.to(tl.int64)[:, None] * s_wn + rk[None, :]
        wg_ptrs = wa_ptrs + tl.cast(F, tl.int64) * s_wn
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                wa = tl.load(wa_ptrs, mask=n_ok[:, None], other=0.0)
                wg = tl.load(wg_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = (k0 + rk) < K
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wa = tl.load(wa_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
                wa = wa.to(tl.float32)
                wg = wg.to(tl.float32)
            acc_a = tl.dot(x, tl.trans(wa), acc_a, input_precision=PREC)
            acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision=PREC)
            x_ptrs += BLOCK_K
            wa_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
        if HAS_BIAS:
            acc_a += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(Bias + F + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc_a * (0.5 * acc_g * (1.0 + tl.erf(acc_g * _C_SQRT1_2)))
        if BF16_RNE:  # the interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand (as the GPU)
            bits = out.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            res = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            res = out.to(Out.dtype.element_ty)
        tl.store(Out + rm[:, None] * s_om + rn[None, :], res, mask=m_ok[:, None] & n_ok[None, :])

    @functools.lru_cache(maxsize=None)
    def _tuned():
        """The autotuned kernel (one tuning per (M, K, F) and dtype)."""
        return triton.autotune(configs=_CONFIGS, key=["M", "K", "F"])(_linear_geglu_kernel)


def linear_geglu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     config: Optional[dict] = None) -> torch.Tensor:
    """Triton launcher.

    Args:
        x: (..., K) float16/bfloat16/float32 on a device Triton runs on (CUDA, or CPU under the interpreter); read in
            place when its leading dims flatten into one row stride with unit feature stride, else copied.
        weight: (2F, K), x's dtype and device (an ``nn.Linear(K, 2F)`` weight; copied if its K stride is not 1).
        bias: (2F,) or None.
        config: a fixed {BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages} instead of autotuning (benchmarks, tests).

    Returns:
        (..., F) contiguous in x's dtype.
    """
    F2, K = weight.shape
    F = F2 // 2
    out = torch.empty((*x.shape[:-1], F), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    x2 = rows_view(x)  # (M, K)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    b = bias.contiguous() if bias is not None else w  # dummy pointer when HAS_BIAS is False
    out2 = out.view(-1, F)
    M = x2.shape[0]
    interp = triton_interpreting()
    meta = dict(HAS_BIAS=bias is not None, DOT_F32=interp, PREC="ieee" if (interp or x.dtype == torch.float32)
                else "tf32", BF16_RNE=interp and x.dtype == torch.bfloat16)
    args = (x2, w, b, out2, M, K, F, x2.stride(0), w.stride(0), out2.stride(0))
    if config is None and (interp or x.dtype == torch.float32):
        config = _INTERPRETER_CONFIG if interp else _F32_CONFIG
    if config is not None:
        cfg = dict(config)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(F, cfg["BLOCK_N"]))
        launch(_linear_geglu_kernel, grid, *args, **meta, **cfg)
    else:
        launch(_tuned(), lambda c: (cdiv(M, c["BLOCK_M"]), cdiv(F, c["BLOCK_N"])), *args, **meta)
    return out


def _fwd_body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """What ``jedi::linear_geglu`` runs (and the eager path)."""
    if backend == "triton":
        return linear_geglu_fwd(x, weight, bias)
    return linear_geglu_reference(x, weight, bias).contiguous()


@torch.library.custom_op("jedi::linear_geglu", mutates_args=())
def _linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return _fwd_body(x, weight, bias, backend)


@_linear_geglu.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def linear_geglu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """The (forward-only) op behind ``jedi_kernels.linear_geglu``.

    Args:
        x, weight, bias: already validated (see :func:`jedi_kernels.linear_geglu`); no input records autograd.
        backend: "triton" or "torch" (already resolved).

    Returns:
        (..., F) contiguous in x's dtype. Eager calls on plain tensors run the launcher directly; under
        torch.compile and for tensor subclasses the call goes through ``jedi::linear_geglu``.
    """
    if eager_call(x, weight, bias) == "direct":
        return _fwd_body(x, weight, bias, backend)
    return torch.ops.jedi.linear_geglu(x, weight, bias, backend)
