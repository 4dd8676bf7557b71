"""Triton set-wise flash attention (``jedi_kernels/ops/set_attention.py``) and its ``jedi::`` custom ops.

Every result is judged against the float64 reference with flash-attention's rule
``max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + 1e-5`` for out, dq, dk, dv (and lse). On CPU the kernels run
under ``TRITON_INTERPRET=1`` (tests/conftest.py) in float32 at <= 256 tokens per set; the GPU cases (marked ``gpu``)
run fp16/bf16 at Stable Diffusion's shapes, on backend "triton" and, where built, "cuda".
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import jedi_kernels as jk
from jedi_kernels import reference
from jedi_kernels.ops import set_attention as sa
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule

CPU = torch.device("cpu")

# The interpreter emits a numpy deprecation warning per scalar loop bound; it says nothing about our code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def _gpu_default_configs(monkeypatch):
    """GPU tests run each kernel's default config (first of its autotune list) instead of autotuning every shape: the
    suite stays within minutes. The benchmarks autotune over all configs and check their outputs against SDPA;
    JEDI_TEST_AUTOTUNE=1 autotunes here too."""
    monkeypatch.setattr(sa, "_AUTOTUNE", os.environ.get("JEDI_TEST_AUTOTUNE") == "1")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else CPU


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _one_way(G: int, refs: int) -> torch.Tensor:
    """Every image attends only the first ``refs`` images (reference images); later images get no queries' attention."""
    m = torch.zeros(G, G, dtype=torch.bool)
    m[:, :refs] = True
    return m


def _jedi_mask(G: int, refs: int) -> torch.Tensor:
    """JeDi-style: references attend references only, images to generate attend everything."""
    m = torch.ones(G, G, dtype=torch.bool)
    m[:refs, refs:] = False
    return m


def _masks(kind: str, G: int) -> torch.Tensor | None:
    if kind == "full":
        return None
    if kind == "blockdiag":
        return torch.eye(G, dtype=torch.bool)
    if kind == "oneway":
        return _one_way(G, max(1, G - 1))
    if kind == "jedi":
        return _jedi_mask(G, max(1, G // 2))
    if kind == "random":
        g = torch.Generator().manual_seed(G)
        m = torch.rand(G, G, generator=g) < 0.5
        m[torch.arange(G), (torch.arange(G) + 1) % G] = True  # every row allows >= 1 image, not always itself
        return m
    raise ValueError(kind)


def _inputs(B, G, L, H, D, dtype, device, fused=False):
    """Fresh random q, k, v (N, L, H*D); ``fused`` returns chunks of one (N, L, 3*H*D) projection (strided views)."""
    N, HD = B * G, H * D
    if fused:
        qkv = torch.randn(N, L, 3 * HD, device=device, dtype=dtype)
        return qkv, qkv.chunk(3, dim=-1)  # three (N, L, H*D) views with row stride 3*H*D
    return None, tuple(torch.randn(N, L, HD, device=device, dtype=dtype) for _ in range(3))


def _ref_fwd_bwd(q, k, v, do, G, H, scale, mask, dtype):
    """Reference out, lse, dq, dk, dv computed in ``dtype``; heads run one at a time to bound memory at large L."""
    N, L, HD = q.shape
    D = HD // H
    outs, lses, grads = [], [], ([], [], [])
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        qh, kh, vh = (t[..., sl].detach().to(dtype).requires_grad_() for t in (q, k, v))
        o = reference.set_attention_reference(qh, kh, vh, G, 1, scale, mask)
        o.backward(do[..., sl].to(dtype))
        outs.append(o.detach())
        lses.append(reference.set_attention_lse_reference(qh.detach(), kh.detach(), G, 1, scale, mask))
        for acc, t in zip(grads, (qh, kh, vh)):
            acc.append(t.grad)
    cat = lambda xs: torch.cat(xs, dim=-1)  # noqa: E731  (per-head (N, L, D) -> (N, L, H*D))
    return cat(outs), torch.cat(lses, dim=1), cat(grads[0]), cat(grads[1]), cat(grads[2])


def _check_case(B, G, L, H, D, *, dtype=torch.float32, device=None, mask="full", fused=False, backend="triton",
                launcher_kwargs=None):
    """Forward + backward of one case through the custom op (or the launchers with ``launcher_kwargs``), judged by
    the flash rule against the float64 reference for out, lse, dq, dk, dv."""
    device = device or _device()
    set_mask = _masks(mask, G) if isinstance(mask, str) else mask
    set_mask = None if set_mask is None else set_mask.to(device)
    scale = D**-0.5
    qkv, (q, k, v) = _inputs(B, G, L, H, D, dtype, device, fused)
    do = torch.randn(B * G, L, H * D, device=device, dtype=dtype)

    if launcher_kwargs is None:
        leaves = [qkv.requires_grad_()] if fused else [t.requires_grad_() for t in (q, k, v)]
        if fused:
            q, k, v = qkv.chunk(3, dim=-1)
        out, lse = torch.ops.jedi.set_attention_fwd(q, k, v, G, H, scale, set_mask, backend)
        out.backward(do)
        if fused:
            dq, dk, dv = leaves[0].grad.chunk(3, dim=-1)
        else:
            dq, dk, dv = (t.grad for t in leaves)
    else:
        out, lse = sa.set_attn_fwd(q, k, v, G, H, scale, set_mask, **launcher_kwargs)
        dq, dk, dv = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, scale, set_mask, **launcher_kwargs)

    assert out.shape == (B * G, L, H * D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, G * L) and lse.dtype == torch.float32
    ref64 = _ref_fwd_bwd(q, k, v, do, G, H, scale, set_mask, torch.float64)
    same = _ref_fwd_bwd(q, k, v, do, G, H, scale, set_mask, dtype)
    for name, ours, r_same, r64 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), same, ref64):
        assert_flash_rule(ours, r_same, r64, f"{name} [B={B} G={G} L={L} H={H} D={D} {dtype} mask={mask}]")
    return out, lse, (dq, dk, dv)


# ----------------------------------------------------------------------------------------------------------------------
# head-dim chunking rule
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "D, chunked, padded",
    [(40, (32, 16), (64, 0)), (80, (64, 16), (128, 0)), (160, (128, 32), (256, 0)), (8, (16, 0), (16, 0)),
     (24, (16, 16), (32, 0)), (72, (64, 16), (128, 0)), (64, (64, 0), (64, 0)), (256, (256, 0), (256, 0)),
     (248, (128, 128), (256, 0))],
)
def test_head_dim_chunks(D, chunked, padded):
    assert sa.head_dim_chunks(D, True) == chunked
    assert sa.head_dim_chunks(D, False) == padded
    d0, d1 = chunked
    assert d0 + d1 >= D and d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0


# ----------------------------------------------------------------------------------------------------------------------
# CPU (interpreter) cases: a covering set of head dims, set sizes, L and masks, not the full cross product
# ----------------------------------------------------------------------------------------------------------------------

CPU_CASES = [
    # B, G, L, H, D, mask
    (1, 2, 64, 2, 40, "full"),       # SD head dim 40 (32+16 chunks), two whole tiles per image
    (2, 3, 17, 2, 80, "full"),       # 80 = 64+16, L shorter than a tile
    (1, 1, 97, 2, 160, "full"),      # ng = 1, 160 = 128+32, L = 97: 3 tiles + a 1-token tail
    (1, 5, 17, 3, 8, "full"),        # ng = 5, tiny head dim padded to the 16-wide dot
    (1, 2, 97, 1, 24, "full"),       # 24 = 16+16 (last 8 masked)
    (2, 3, 1, 2, 72, "full"),        # L = 1, 72 = 64+16
    (1, 4, 64, 1, 40, "blockdiag"),  # block-diagonal: per-image attention
    (1, 3, 17, 2, 40, "oneway"),     # images attend the references only; image 2 gets dk = dv = 0
    (1, 5, 17, 1, 24, "random"),     # asymmetric mask
    (1, 2, 64, 2, 80, "jedi"),       # references attend references, targets attend all
    (1, 3, 33, 1, 160, "jedi"),
]


@pytest.mark.parametrize("B, G, L, H, D, mask", CPU_CASES)
def test_set_attention_cpu_cases(B, G, L, H, D, mask):
    if _device().type != "cpu":
        pytest.skip("the CPU covering set runs under the interpreter; GPU cases are below")
    _check_case(B, G, L, H, D, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_cpu(dtype):
    """fp16/bf16 storage under the interpreter (dots run in fp32 there; the GPU runs them natively, tested below)."""
    if _device().type != "cpu":
        pytest.skip("GPU half-precision cases are below")
    _check_case(1, 2, 33, 2, 40, dtype=dtype, mask="jedi")


# ----------------------------------------------------------------------------------------------------------------------
# the TMA + warp-specialized forward (JEDI_TRITON_FWD_WS=1; the interpreter runs its descriptors on the CPU)
# ----------------------------------------------------------------------------------------------------------------------


def _spy_ws(monkeypatch) -> list:
    """Record every run of the TMA forward (so a test fails if the launcher silently falls back)."""
    calls, real = [], sa._set_attn_fwd_ws
    monkeypatch.setattr(sa, "_set_attn_fwd_ws", lambda *a, **kw: calls.append(a[3:8]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 2, 17, 2, 40, "full", False),  # a key tile past the image's last row: the next image's rows are masked
    (2, 3, 33, 1, 24, "blockdiag", False),
    (1, 2, 64, 2, 64, "oneway", True),  # views of one qkv projection: row stride 3*H*D
    (1, 4, 40, 3, 40, "jedi", True),  # the last head's box runs past H*D: zero-filled
    (1, 1, 1, 3, 8, "full", False),
    (3, 5, 7, 2, 16, "random", False),
])
def test_ws_forward(monkeypatch, B, G, L, H, D, mask, fused):
    """Forward (and the pointer backward on its lse) by the flash rule, with the TMA forward really taken."""
    if _device().type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward needs sm_90")
    monkeypatch.setenv("JEDI_TRITON_FWD_WS", "1")
    calls = _spy_ws(monkeypatch)
    dtype = torch.float32 if _device().type == "cpu" else torch.bfloat16
    _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused)
    assert calls == [(B, G, L, H, D)]


@pytest.mark.parametrize("mask", ["full", "oneway"])
def test_eager_path_equals_the_custom_op(mask, monkeypatch):
    """Eager calls go through _SetAttentionEager (no custom-op dispatch): the same kernels, so the same out and
    grads, bit for bit, as jedi::set_attention_fwd/bwd; tensor subclasses (here a tracer's fake tensors are stood in
    for by a subclass) keep the custom op."""
    B, G, L, H, D = 1, 2, 17, 2, 40
    dev = _device()
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    set_mask = _masks(mask, G)
    set_mask = None if set_mask is None else set_mask.to(dev)
    _, qkv = _inputs(B, G, L, H, D, dtype, dev)
    do = torch.randn_like(qkv[0])
    a = [t.clone().requires_grad_() for t in qkv]
    b = [t.clone().requires_grad_() for t in qkv]
    out_a = jk.set_attention(*a, G, H, set_mask=set_mask, backend="triton")
    assert type(out_a.grad_fn).__name__ == "_SetAttentionEagerBackward"
    out_a.backward(do)
    out_b = torch.ops.jedi.set_attention_fwd(*b, G, H, D**-0.5, set_mask, "triton")[0]
    out_b.backward(do)
    assert torch.equal(out_a, out_b)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)

    class Sub(torch.Tensor):
        pass

    def refuse(*args):
        raise AssertionError("a tensor subclass took the eager path")

    monkeypatch.setattr(sa._SetAttentionEager, "apply", refuse)
    out_c = jk.set_attention(*(t.detach().as_subclass(Sub) for t in qkv), G, H, set_mask=set_mask, backend="triton")
    assert torch.equal(out_c.as_subclass(torch.Tensor), out_a.detach())


def test_ws_forward_falls_back_where_it_cannot_run(monkeypatch):
    """Head dims over 64 and rows a 2-D descriptor cannot cover (unevenly spaced images, a misaligned base) take the
    pointer kernel, with the same result; a bad switch value is an error naming the variable."""
    monkeypatch.setenv("JEDI_TRITON_FWD_WS", "1")
    calls = _spy_ws(monkeypatch)
    dev = _device()
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    _check_case(1, 2, 9, 1, 72, dtype=dtype)  # head dim 72
    wide = torch.randn(4, 9, 2 * 40 + 8, device=dev, dtype=dtype)
    for q in (torch.randn(4, 12, 80, device=dev, dtype=dtype)[:, :9],  # images 12 rows apart, L = 9
              wide[..., 1:81]):  # base 1 element off the 16-byte alignment
        out, lse = sa.set_attn_fwd(q, q, q, 2, 2, 40**-0.5)
        ref = reference.set_attention_reference(*(q.double(),) * 3, 2, 2, 40**-0.5)
        torch.testing.assert_close(out.double(), ref, atol=5e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    assert calls == []
    monkeypatch.setenv("JEDI_TRITON_FWD_WS", "yes")
    with pytest.raises(ValueError, match="JEDI_TRITON_FWD_WS must be 0 or 1, got 'yes'"):
        jk.set_attention(*(torch.randn(2, 4, 16, device=dev, dtype=dtype),) * 3, 2, 2, backend="triton")


@pytest.mark.parametrize("mask", ["full", "oneway"])
@pytest.mark.parametrize("D, G, L", [(40, 2, 17), (72, 3, 33)])
def test_fused_qkv_strided_views(D, G, L, mask):
    """q, k, v as chunks of one (N, L, 3*H*D) projection: read through strides, gradients land in the fused grad."""
    if _device().type != "cpu":
        pytest.skip("GPU strided cases are below")
    _check_case(2, G, L, 2, D, mask=mask, fused=True)


def _check_row_layout(layout, device, dtype, L):
    """Forward + backward (Triton) of one image-row layout against the float64 reference (flash rule): images that
    are not consecutive row blocks (row slices of taller tensors: q, k, v and dO, or only k), or fused-qkv views."""
    B, G, H, D = 1, 3, 2, 24
    N, HD, scale = B * G, H * D, D**-0.5

    def rows_of_taller(t):  # (N, L, HD) values in an (N, L + 8, HD) buffer: stride(0) = (L + 8)·HD
        buf = torch.randn(N, L + 8, HD, device=device).to(dtype)
        buf[:, :L] = t
        return buf[:, :L]

    qkv, (q, k, v) = _inputs(B, G, L, H, D, dtype, device, fused=layout == "fused")
    do = torch.randn(N, L, HD, device=device).to(dtype)
    if layout == "padded_images":
        q, k, v, do = (rows_of_taller(t) for t in (q, k, v, do))
    elif layout == "padded_k_only":
        k = rows_of_taller(k)
    linear = {name: sa._rows_linear(t, L) for name, t in zip("qkvd", (q, k, v, do))}
    assert linear == {"padded_images": dict.fromkeys("qkvd", False), "fused": dict.fromkeys("qkvd", True),
                      "padded_k_only": {"q": True, "k": False, "v": True, "d": True}}[layout]
    out, lse = sa.set_attn_fwd(q, k, v, G, H, scale)
    grads = sa.set_attn_bwd(do, q, k, v, out, lse, G, H, scale)
    ref64 = _ref_fwd_bwd(q, k, v, do, G, H, scale, None, torch.float64)
    same = _ref_fwd_bwd(q, k, v, do, G, H, scale, None, dtype)
    for name, ours, r_same, r64 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), same, ref64):
        assert_flash_rule(ours, r_same, r64, f"{name} [{layout} {dtype} L={L}]")


@pytest.mark.parametrize("layout", ["padded_images", "padded_k_only", "fused"])
def test_image_row_layouts(layout):
    """The kernels address a set's tiles from one base when its images are consecutive L-row blocks (stride(0) ==
    L·stride(1): contiguous tensors, fused-qkv views) and per image otherwise. Here at whole tiles and no mask, where
    the one-base path would apply: L = 64 under the interpreter's 32-row tiles (test_image_row_layouts_gpu: L = 256
    for the GPU tiles)."""
    if _device().type != "cpu":
        pytest.skip("the interpreter's tile size makes L = 64 whole tiles; the GPU case is test_image_row_layouts_gpu")
    _check_row_layout(layout, "cpu", torch.float32, 64)


def _gpu_tile_shapes():
    """Every distinct (BLOCK_M, BLOCK_N) of the GPU autotune lists (fwd, dK/dV, dQ; all head-dim classes)."""
    shapes = set()
    for table in (sa._FWD_CONFIGS, sa._DKDV_CONFIGS, sa._DQ_CONFIGS):
        for configs in table.values():
            shapes.update((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs)
    return sorted(shapes)


@pytest.mark.parametrize("block_m, block_n", _gpu_tile_shapes())
def test_every_gpu_tile_shape(block_m, block_n):
    """GPU tests run default configs only; here every tile shape the autotuner may pick runs forward + backward
    (both backward kernels) under the interpreter on images with tails (L = 97) and a mask."""
    if _device().type != "cpu":
        pytest.skip("runs the GPU tile shapes under the interpreter")
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    _check_case(1, 2, 97, 1, 40, mask="jedi", launcher_kwargs={"config": cfg})


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (autotune wrappers over several configs, EVEN_* heuristics, config-dependent grids),
    driven under the interpreter with a CPU timer standing in for the GPU benchmarker."""
    if _device().type != "cpu":
        pytest.skip("on a GPU every test takes this path")
    import time

    from triton.runtime.autotuner import Autotuner

    def cpu_bench(fn, quantiles=None):
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return [ms, ms, ms]

    monkeypatch.setattr(sa, "triton_interpreting", lambda: False)  # launch as on a GPU ...
    monkeypatch.setattr(sa, "_prec", lambda dtype: (True, "ieee"))  # ... but keep the interpreter's fp32 dots
    monkeypatch.setattr(sa, "_AUTOTUNE", True)
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: cpu_bench))
    monkeypatch.setattr(sa, "_FWD_CONFIGS", {"f32": [sa._cfg(32, 32, 4, 1), sa._cfg(16, 32, 4, 1)]})
    monkeypatch.setattr(sa, "_DKDV_CONFIGS", {"f32": [sa._cfg(16, 32, 4, 1), sa._cfg(32, 16, 4, 1)]})
    monkeypatch.setattr(sa, "_DQ_CONFIGS", {"f32": [sa._cfg(32, 16, 4, 1), sa._cfg(16, 16, 4, 1)]})
    sa._tuned.cache_clear()
    n_logged = len(sa.autotune_log())
    try:
        # dQ by atomics: every timed config adds into DQacc, so a result that survives autotuning shows the
        # accumulator is zeroed before the real run
        monkeypatch.setenv("JEDI_TRITON_BWD_DQ", "atomic")
        for L in (32, 20):  # EVEN and uneven tails
            _check_case(1, 2, L, 1, 24, mask="oneway", launcher_kwargs={})
        monkeypatch.setenv("JEDI_TRITON_BWD_DQ", "kernel")
        for L in (32, 20):
            _check_case(1, 2, L, 1, 24, mask="oneway", launcher_kwargs={})
        for kind in ("fwd", "dkdv_dq", "dkdv", "dq"):
            tuner = sa._tuned(kind, "f32", True)
            assert len(tuner.cache) == 2, f"{kind}: expected one tuned config per L, got {tuner.cache}"
        # every tuning is logged once, with the winner, the class default and each config's time
        log = sa.autotune_log()[n_logged:]
        assert sorted((e["kernel"], e["key"][2]) for e in log) == sorted(
            (kind, str(L)) for kind in ("fwd", "dkdv_dq", "dkdv", "dq") for L in (32, 20))
        names = {"fwd": {"32x32 w4 s1", "16x32 w4 s1"}, "dq": {"32x16 w4 s1", "16x16 w4 s1"}}
        for e in log:
            assert e["class"] == "f32" and set(e["ms"]) == names.get(e["kernel"], {"16x32 w4 s1", "32x16 w4 s1"})
            assert e["best"] in e["ms"] and e["ms"][e["best"]] == min(e["ms"].values())
            assert e["default"] == {"fwd": "32x32 w4 s1", "dq": "32x16 w4 s1"}.get(e["kernel"], "16x32 w4 s1")
        # a second launch of a tuned shape logs nothing
        _check_case(1, 2, 32, 1, 24, mask="oneway", launcher_kwargs={})
        assert len(sa.autotune_log()) == n_logged + len(log)
    finally:
        sa._tuned.cache_clear()


@pytest.mark.parametrize("D, chunk", [(40, False), (80, False), (40, True), (24, True)])
def test_non_default_head_dim_variant(D, chunk):
    """The variants the chunked-vs-padded benchmark times besides each default are correct too: padding at d 80
    (-> 128), chunks at d <= 64 (40 -> 32+16, 24 -> 16+16; the forward's default pads those), and the explicit
    padding at d 40 that the forward's default now takes."""
    if _device().type != "cpu":
        pytest.skip("GPU: benchmarked, not tested")
    _check_case(1, 2, 33, 2, D, mask="oneway", launcher_kwargs={"chunk_head_dim": chunk})


def test_ng1_equals_per_image_attention():
    """set_size = 1 is plain per-image attention (torch SDPA per image in float64)."""
    device = _device()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    N, L, H, D = 3, 33, 2, 40
    q, k, v = (torch.randn(N, L, H * D, device=device, dtype=dtype) for _ in range(3))
    out = jk.set_attention(q, k, v, 1, H, backend="triton")
    # (N, L, H*D) -> (N, H, L, D)
    heads = lambda x: x.double().reshape(N, L, H, D).transpose(1, 2)  # noqa: E731
    ref64 = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(N, L, H * D)
    same = reference.set_attention_reference(q, k, v, 1, H)
    assert_flash_rule(out, same, ref64, "ng=1 out vs per-image SDPA")


def test_block_diagonal_equals_ng1():
    """A block-diagonal mask over a set of G images gives exactly per-image attention (set_size 1) on the same rows."""
    device = _device()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    B, G, L, H, D = 1, 3, 33, 2, 40
    q, k, v = (torch.randn(B * G, L, H * D, device=device, dtype=dtype) for _ in range(3))
    diag = torch.eye(G, dtype=torch.bool, device=device)
    masked = jk.set_attention(q, k, v, G, H, set_mask=diag, backend="triton")
    per_image = jk.set_attention(q, k, v, 1, H, backend="triton")
    assert_close_verbose(masked, per_image, atol=1e-6 if dtype == torch.float32 else 2e-3, name="blockdiag vs ng=1")


# ----------------------------------------------------------------------------------------------------------------------
# masks really skip tiles; outputs are fully written
# ----------------------------------------------------------------------------------------------------------------------


def test_block_diagonal_mask_skips_tiles():
    """Count the key tiles each program's loop visits (an instrumented kernel variant): a block-diagonal mask over G
    images visits 1/G of full attention's tiles, a one-way mask refs/G."""
    device = _device()
    B, G, L, H, D = 1, 4, 64, 1, 40
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    q, k, v = (torch.randn(B * G, L, H * D, device=device) for _ in range(3))
    n_programs = G * math.ceil(L / 32) * B * H
    visited = {}
    for kind, mask in (("full", None), ("blockdiag", torch.eye(G, dtype=torch.bool)), ("oneway", _one_way(G, 1))):
        counter = torch.full((n_programs,), -1, dtype=torch.int32, device=device)
        mask = None if mask is None else mask.to(device)
        sa.set_attn_fwd(q, k, v, G, H, D**-0.5, mask, config=cfg, tile_counter=counter)
        assert (counter >= 0).all(), "every program must report its count"
        visited[kind] = int(counter.sum())
    tiles_per_image = math.ceil(L / 32)
    assert visited["full"] == n_programs * G * tiles_per_image
    assert visited["blockdiag"] * G == visited["full"]
    assert visited["oneway"] * G == visited["full"]


@pytest.mark.parametrize("G", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_mask_lists_match_a_python_loop(G, layout):
    """The image lists the kernels walk (one launch of ``_mask_lists_kernel``): per row, the allowed images ascending,
    then the forbidden ones; per column the same for the transposed mask; counts = allowed per row/column. Random
    masks, read through strides (a transposed view, a strided slice of a larger mask)."""
    device = _device()
    g = torch.Generator().manual_seed(1000 + G)
    dense = torch.rand(2 * G, 2 * G, generator=g) < 0.5
    mask = {"contiguous": dense[:G, :G].contiguous(), "transposed": dense[:G, :G].t(),
            "sliced": dense[::2, 1::2]}[layout].to(device)
    assert mask.shape == (G, G)
    host = mask.cpu()
    lists, counts = sa._mask_lists(mask, G, both=True)
    for t, m in enumerate((host, host.t())):
        for r in range(G):
            allowed = [j for j in range(G) if m[r, j]]
            forbidden = [j for j in range(G) if not m[r, j]]
            assert lists[t, r].tolist() == allowed + forbidden, (t, r)
            assert int(counts[t, r]) == len(allowed), (t, r)
    lst, cnt = sa._mask_lists(mask, G)
    assert torch.equal(lst, lists[0]) and torch.equal(cnt, counts[0])


def test_forbidden_images_are_never_read():
    """K/V of images no query may attend are NaN: nothing leaks into the outputs (their tiles are never loaded)."""
    device = _device()
    B, G, L, H, D = 1, 3, 17, 2, 40
    mask = _one_way(G, 2).to(device)  # image 2 is attended by nobody
    q, k, v = (torch.randn(B * G, L, H * D, device=device) for _ in range(3))
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[2], v_bad[2] = float("nan"), float("nan")
    out, lse = sa.set_attn_fwd(q, k_bad, v_bad, G, H, D**-0.5, mask)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = reference.set_attention_reference(q.double(), k.double(), v.double(), G, H, None, mask)
    assert_close_verbose(out, ref, atol=1e-5, name="out with NaN in forbidden images")
    do = torch.randn_like(out)
    dq, dk, dv = sa.set_attn_bwd(do, q, k_bad, v_bad, out, lse, G, H, D**-0.5, mask)
    assert torch.isfinite(dq).all()
    assert torch.isfinite(dk[:2]).all() and torch.isfinite(dv[:2]).all()


@pytest.mark.parametrize("mask", ["full", "oneway"])
def test_poisoned_outputs_are_fully_written(monkeypatch, mask):
    """Every output (and scratch) buffer is allocated poisoned (NaN; integer ones, the mask's image lists and counts,
    -12345): all of out, lse, dq, dk, dv must be overwritten — including dk = dv = 0 for an image nobody attends, and
    the tails of images whose L is not a tile multiple — and a list entry left unwritten would send a kernel to a
    wild image index."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -12345)

    monkeypatch.setattr(sa, "_empty", poisoned)
    out, lse, grads = _check_case(2, 3, 17, 2, 40, mask=mask)
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_lse_matches_reference():
    device = _device()
    B, G, L, H, D = 2, 3, 20, 2, 24
    q, k, v = (torch.randn(B * G, L, H * D, device=device) for _ in range(3))
    mask = _jedi_mask(G, 1).to(device)
    _, lse = torch.ops.jedi.set_attention_fwd(q, k, v, G, H, 0.3, mask, "triton")
    ref64 = reference.set_attention_lse_reference(q.double(), k.double(), G, H, 0.3, mask)
    same = reference.set_attention_lse_reference(q, k, G, H, 0.3, mask)
    assert_flash_rule(lse, same, ref64.double(), "lse")


# ----------------------------------------------------------------------------------------------------------------------
# custom-op contract: opcheck, torch.compile, autograd through jedi_kernels.set_attention
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_fwd(with_mask):
    device = _device()
    B, G, L, H, D = 1, 2, 8, 1, 16
    q, k, v = (torch.randn(B * G, L, H * D, device=device, requires_grad=True) for _ in range(3))
    mask = _jedi_mask(G, 1).to(device) if with_mask else None
    torch.library.opcheck(torch.ops.jedi.set_attention_fwd.default, (q, k, v, G, H, 0.25, mask, "triton"))


def test_opcheck_bwd():
    device = _device()
    B, G, L, H, D = 1, 2, 8, 1, 16
    q, k, v = (torch.randn(B * G, L, H * D, device=device) for _ in range(3))
    mask = _one_way(G, 1).to(device)
    out, lse = torch.ops.jedi.set_attention_fwd(q, k, v, G, H, 0.25, mask, "triton")
    do = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.jedi.set_attention_bwd.default, (do, q, k, v, out, lse, G, H, 0.25, mask, "triton")
    )


def test_fake_shapes():
    """register_fake gives out (N, L, H*D) in q's dtype and lse (B, H, G*L) float32 without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(6, 10, 48, dtype=torch.float16)
        out, lse = torch.ops.jedi.set_attention_fwd(q, q, q, 3, 2, 0.2, None, "triton")
        dq, dk, dv = torch.ops.jedi.set_attention_bwd(q, q, q, q, out, lse, 3, 2, 0.2, None, "triton")
    assert out.shape == (6, 10, 48) and out.dtype == torch.float16
    assert lse.shape == (2, 2, 30) and lse.dtype == torch.float32
    assert dq.shape == dk.shape == dv.shape == (6, 10, 48)


def test_torch_compile_fullgraph_fwd_bwd():
    """torch.compile(fullgraph=True) through the public API, forward and backward, equals eager."""
    device = _device()
    B, G, L, H, D = 1, 2, 17, 2, 40
    mask = _jedi_mask(G, 1).to(device)
    qkv = torch.randn(B * G, L, 3 * H * D, device=device, requires_grad=True)

    def f(x):
        q, k, v = x.chunk(3, dim=-1)
        return jk.set_attention(q, k, v, G, H, set_mask=mask, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    do = torch.randn(B * G, L, H * D, device=device)
    out_c = compiled(qkv)
    (g_c,) = torch.autograd.grad(out_c, qkv, do)
    out_e = f(qkv)
    (g_e,) = torch.autograd.grad(out_e, qkv, do)
    assert_close_verbose(out_c, out_e, atol=1e-6, name="compiled out")
    assert_close_verbose(g_c, g_e, atol=1e-6, name="compiled grad")


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-3])
def test_non_positive_and_tiny_scales(scale):
    """The forward folds a positive scale into one FFMA after the row max (max(c·s) = c·max(s) needs c > 0); zero and
    negative scales take the general path. Both against the reference."""
    device = _device()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    G, L, H, D = 2, 17, 2, 40
    q, k, v = (torch.randn(G, L, H * D, device=device, dtype=dtype) for _ in range(3))
    out = jk.set_attention(q, k, v, G, H, backend="triton", scale=scale)
    ref64 = reference.set_attention_reference(*(t.double() for t in (q, k, v)), G, H, scale=scale)
    same = reference.set_attention_reference(q, k, v, G, H, scale=scale)
    assert_flash_rule(out, same, ref64, f"out scale={scale}")


@pytest.mark.parametrize("mode", ["", "atomic", "kernel"])
@pytest.mark.parametrize("D, mask", [(40, "jedi"), (72, "oneway"), (160, "full")])
def test_backward_dq_by_atomics_or_kernel(monkeypatch, mode, D, mask):
    """dQ from the dK/dV programs by atomics (``JEDI_TRITON_BWD_DQ=atomic``) or by its own kernel (the default, and
    deterministic mode): both pass the flash rule, and the switch picks the path it names."""
    launched = []
    launch = sa._launch
    monkeypatch.setattr(sa, "_launch", lambda kind, *a: (launched.append(kind), launch(kind, *a))[1])
    monkeypatch.setenv("JEDI_TRITON_BWD_DQ", mode)
    device = _device()
    _check_case(1, 2, 33, 2, D, dtype=torch.float32 if device.type == "cpu" else torch.float16, mask=mask)
    atomic = mode == "atomic"
    assert launched[1:] == (["dkdv_dq"] if atomic else ["dkdv", "dq"]), launched


def test_backward_dq_deterministic_mode_takes_the_kernel(monkeypatch):
    launched = []
    launch = sa._launch
    monkeypatch.setattr(sa, "_launch", lambda kind, *a: (launched.append(kind), launch(kind, *a))[1])
    monkeypatch.setenv("JEDI_TRITON_BWD_DQ", "atomic")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_case(1, 2, 17, 1, 40, dtype=torch.float32 if _device().type == "cpu" else torch.float16)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert launched[1:] == ["dkdv", "dq"], launched


def test_backward_dq_bad_switch_value(monkeypatch):
    monkeypatch.setenv("JEDI_TRITON_BWD_DQ", "fused")
    q = torch.randn(2, 8, 16, device=_device(), requires_grad=True)
    out = jk.set_attention(q, q, q, 2, 1, backend="triton")
    with pytest.raises(ValueError, match="JEDI_TRITON_BWD_DQ must be 'atomic' or 'kernel', got 'fused'"):
        out.sum().backward()


@pytest.mark.parametrize("rowsum", ["dot", "fadd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowsum_on_tensor_cores_or_fadd(monkeypatch, rowsum, dtype):
    """Both ways of summing the softmax rows (P·1 on the tensor cores, or one FADD per element) pass the flash rule,
    forward and backward (the backward recomputes P from the forward's logsumexp)."""
    monkeypatch.setenv("JEDI_ATTN_ROWSUM", rowsum)
    device = _device()
    if device.type == "cuda" and dtype == torch.float32:
        dtype = torch.float16
    _check_case(1, 2, 33, 2, 40, dtype=dtype, mask="jedi")


def test_public_api_backward_matches_reference():
    """jedi_kernels.set_attention(..., backend="triton") is differentiable and matches the reference."""
    device = _device()
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    B, G, L, H, D = 1, 2, 24, 2, 40
    q, k, v = (torch.randn(B * G, L, H * D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = jk.set_attention(q, k, v, G, H, backend="triton", scale=0.2)
    do = torch.randn_like(out)
    out.backward(do)
    ref64 = _ref_fwd_bwd(q, k, v, do, G, H, 0.2, None, torch.float64)
    same = _ref_fwd_bwd(q, k, v, do, G, H, 0.2, None, dtype)
    for name, ours, r_same, r64 in zip(("out", "lse", "dq", "dk", "dv"), (out, None, q.grad, k.grad, v.grad), same,
                                       ref64):
        if ours is not None:
            assert_flash_rule(ours, r_same, r64, name)


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------


def _qkv(shape=(4, 8, 32), dtype=torch.float32):
    return tuple(torch.randn(*shape, device=_device(), dtype=dtype) for _ in range(3))


def test_float64_rejected_by_triton_backend():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        jk.set_attention(q, k, v, 2, 2, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        sa.set_attn_fwd(q, k, v, 2, 2, 0.25)


def test_head_dim_over_256_rejected():
    q, k, v = _qkv(shape=(2, 4, 264))
    with pytest.raises(ValueError, match="head_dim"):
        jk.set_attention(q, k, v, 2, 1, backend="triton")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"set_mask": torch.zeros(2, 2, dtype=torch.bool)}, ValueError, "set_mask"),
        ({"set_mask": torch.tensor([[True, False], [False, False]])}, ValueError, "set_mask"),
        ({"set_mask": torch.ones(3, 3, dtype=torch.bool)}, ValueError, "set_mask"),
        ({"set_mask": torch.ones(2, 2)}, TypeError, "set_mask"),
        ({"backend": "flash"}, ValueError, "backend"),
        ({"scale": "0.1"}, TypeError, "scale"),
    ],
)
def test_bad_mask_backend_scale(kwargs, exc, match):
    q, k, v = _qkv()
    if isinstance(kwargs.get("set_mask"), torch.Tensor):
        kwargs = dict(kwargs, set_mask=kwargs["set_mask"].to(q.device))
    kwargs.setdefault("backend", "triton")
    with pytest.raises(exc, match=match):
        jk.set_attention(q, k, v, 2, 2, **kwargs)


def test_bad_shapes_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="set_size"):
        jk.set_attention(q, k, v, 3, 2, backend="triton")  # N = 4 is not a multiple of 3
    with pytest.raises(ValueError, match="heads"):
        jk.set_attention(q, k, v, 2, 3, backend="triton")  # 32 is not 3 * head_dim
    with pytest.raises(ValueError, match="k must have"):
        jk.set_attention(q, k[:, :4], v, 2, 2, backend="triton")
    with pytest.raises(TypeError, match="v must have"):
        jk.set_attention(q, k, v.half(), 2, 2, backend="triton")
    with pytest.raises(ValueError, match="3 dims"):
        jk.set_attention(q[0], k[0], v[0], 1, 2, backend="triton")


@pytest.mark.parametrize("dtype, shape, heads, exc, match", [
    (torch.float32, (4, 8, 32), 2, TypeError, "backend='cuda' needs q, k, v in float16 or bfloat16"),
    (torch.float64, (4, 8, 32), 2, TypeError, "backend='cuda' needs q, k, v in float16 or bfloat16"),
    (torch.float16, (4, 8, 40), 2, ValueError, "multiple of 8 in \\[8, 256\\], got 20"),
    (torch.float16, (4, 8, 264), 1, ValueError, "multiple of 8 in \\[8, 256\\], got 264"),
])
def test_cuda_backend_rejects_in_python_what_its_glue_would(dtype, shape, heads, exc, match):
    """What the C++ glue's TORCH_CHECKs reject is rejected in Python first, on any machine: on the H100 of 2026-11-27
    a TORCH_CHECK of the device build segfaulted instead of raising (tools/ext_throw_probe.py)."""
    q, k, v = (torch.randn(*shape, device=_device()).to(dtype) for _ in range(3))
    with pytest.raises(exc, match=match):
        jk.set_attention(q, k, v, 2, heads, backend="cuda")


def test_cuda_backend_unavailable_is_rejected():
    if jk.available_backends()["cuda"] and _device().type == "cuda":
        pytest.skip("the CUDA extension is built here")
    q, k, v = _qkv(dtype=torch.float16)  # a dtype the CUDA kernels take: the refusal is about availability
    with pytest.raises(ValueError, match="backend='cuda' is unavailable"):
        jk.set_attention(q, k, v, 2, 2, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------------
# GPU: fp16/bf16 at Stable Diffusion's shapes, masks, strided views, CUDA graphs, backend "cuda"
# ----------------------------------------------------------------------------------------------------------------------


def _require_cuda_attention() -> None:
    if not jk.available_backends()["cuda_attention"]:
        pytest.skip("backend cuda: " + jk.available_backends()["reasons"].get("cuda_attention", "not built"))


def _gpu_backends():
    params = [pytest.param("triton", id="triton")]
    avail = jk.available_backends()
    why = avail["reasons"].get("cuda") or avail["reasons"].get("cuda_attention", "")
    params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not avail["cuda_attention"],
                                                                           reason=f"backend cuda: {why}")))
    return params


GPU_CASES = [
    # B, G, L, H, D, mask, fused
    (1, 1, 4096, 2, 40, "full", False),
    (1, 2, 4096, 2, 40, "full", True),
    (1, 2, 1024, 2, 80, "full", False),
    (1, 4, 1024, 2, 80, "blockdiag", False),
    (2, 4, 256, 2, 160, "jedi", True),
    (2, 4, 64, 2, 160, "full", False),
    (1, 3, 256, 2, 160, "oneway", False),
    (2, 3, 97, 2, 72, "random", True),
    (1, 1, 1, 1, 40, "full", False),  # G = L = H = 1: Triton specializes these ints as constants
    (3, 5, 17, 1, 8, "full", False),
    (1, 2, 64, 3, 256, "jedi", False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded_images", "padded_k_only", "fused"])
def test_image_row_layouts_gpu(layout):
    """test_image_row_layouts on the GPU's autotuned tiles (L = 256: whole tiles for every config), fp16."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_row_layout(layout, "cuda", torch.float16, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", GPU_CASES)
def test_set_attention_gpu(B, G, L, H, D, mask, fused, dtype, backend):
    _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("row_blocks", ["1", "2"], ids=["16rows", "32rows"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 2, 4096, 2, 40, "full", True),
    (1, 4, 1024, 2, 80, "blockdiag", False),
    (2, 3, 97, 2, 72, "random", True),
    (1, 2, 130, 1, 64, "oneway", False),
    (3, 5, 17, 1, 8, "full", False),
])
@pytest.mark.parametrize("stages", ["1", "2"], ids=["1stage", "2stages"])
def test_cuda_forward_instances(monkeypatch, row_blocks, stages, B, G, L, H, D, mask, fused):
    """Every CUDA forward instance (16 or 32 query rows per warp, JEDI_CUDA_FWD_ROW_BLOCKS; FlashAttention-2's loop
    or the software-pipelined one, JEDI_CUDA_FWD_STAGES; padded head dims <= 64 have all four, 80 three, others fall
    back to what they have) passes the 2x rule, forward and backward."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_FWD_ROW_BLOCKS", row_blocks)
    monkeypatch.setenv("JEDI_CUDA_FWD_STAGES", stages)
    # (JEDI_CUDA_FWD_WGMMA unset: the default at d 40 on sm_90 is the wgmma kernel, but an instance switch asks for
    # an mma.sync instance, and that wins)
    monkeypatch.delenv("JEDI_CUDA_FWD_WGMMA", raising=False)
    _check_case(B, G, L, H, D, dtype=torch.bfloat16, mask=mask, fused=fused, backend="cuda")
    # the switch really picks the loop: two stages are compiled for every head dim here (<= 80), with 32 rows per
    # warp up to 64 (an explicit 32-row request at 72/80 keeps one stage)
    pipelined = stages == "2" and (row_blocks == "1" or D <= 64)
    _, (q, k, v) = _inputs(1, G, L, H, D, torch.bfloat16, torch.device("cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        jk.set_attention(q, k, v, G, H, backend="cuda")
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
    assert names and all(("pipe_kernel" in n) == pipelined for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("row_blocks", ["1", "2"], ids=["16rows", "32rows"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 4, 256, 2, 160, "full", True),      # SD's 16x16 level at set size 4: issue 4's full-wave forward miss
    (2, 3, 97, 1, 152, "random", False),    # partial query and 32-key tiles, padded columns, a mask
    (1, 8, 64, 1, 160, "blockdiag", False),
])
def test_cuda_forward_32_rows_per_warp_at_d160(monkeypatch, row_blocks, B, G, L, H, D, mask, fused):
    """JEDI_CUDA_FWD_ROW_BLOCKS=2 at head dim 160 (32 query rows per warp, 32-key tiles; opt-in, built for sm_90 on)
    passes the 2x rule forward and backward; the profiler shows the 32-row instance ran on compute capability >= 9.0
    and the 16-row one before it (where the 32-row instance has no body)."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_FWD_ROW_BLOCKS", row_blocks)
    monkeypatch.delenv("JEDI_CUDA_FWD_WGMMA", raising=False)
    _check_case(B, G, L, H, D, dtype=torch.bfloat16, mask=mask, fused=fused, backend="cuda")
    _check_case(B, G, L, H, D, dtype=torch.float16, mask=mask, fused=fused, backend="cuda")
    _, (q, k, v) = _inputs(1, G, L, H, D, torch.bfloat16, torch.device("cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        jk.set_attention(q, k, v, G, H, backend="cuda")
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "set_attn_fwd_kernel" in e.name}
    rb = 2 if row_blocks == "2" and torch.cuda.get_device_capability()[0] >= 9 else 1
    # the kernel's template arguments (T, kD, kRB, kSplit) end its demangled name: "..., 160, 2, false>"
    assert names and all(re.search(rf"160,\s*(\(int\))?{rb},", n) for n in names), names


@pytest.mark.gpu
def test_cuda_forward_rows_per_warp_at_d160_by_set_size(monkeypatch):
    """Unasked (JEDI_CUDA_FWD_ROW_BLOCKS unset), the d 160 forward takes 32 query rows per warp for sets of more than
    1024 keys (L 256, set size 8: 0.144 against 0.198 ms on the H200) and 16 at or below it, where 32 lost or tied;
    devices before compute capability 9.0 always run 16. Out by the 2x rule."""
    _require_cuda_attention()
    for name in ("JEDI_CUDA_FWD_ROW_BLOCKS", "JEDI_CUDA_FWD_WGMMA", "JEDI_CUDA_FWD_STAGES"):
        monkeypatch.delenv(name, raising=False)
    for (G, L), big in (((8, 256), True), ((4, 256), False), ((2, 64), False)):
        q, k, v = (torch.randn(G, L, 2 * 160, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = jk.set_attention(q, k, v, G, 2, backend="cuda")
            torch.cuda.synchronize()
        names = {e.name for e in prof.events() if "set_attn_fwd_kernel" in e.name}
        rb = 2 if big and torch.cuda.get_device_capability()[0] >= 9 else 1
        assert names and all(re.search(rf"160,\s*(\(int\))?{rb},", n) for n in names), (G, L, names)
        ref64 = reference.set_attention_reference(*(t.double() for t in (q, k, v)), G, 2)
        same = reference.set_attention_reference(q, k, v, G, 2)
        assert_flash_rule(out, same, ref64, f"out G={G} L={L}")


@pytest.mark.gpu
@pytest.mark.parametrize("splits", ["1", "2", "3", "8"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (2, 1, 1024, 2, 80, "full", True),    # SD's 32x32 level at set size 1: the shape the automatic count splits
    (2, 3, 97, 2, 72, "random", False),   # partial tiles, a mask: runs of unequal length, some empty
    (1, 4, 130, 1, 40, "oneway", True),   # one allowed image of 4
    (1, 2, 256, 2, 160, "blockdiag", False),
    (1, 2, 33, 1, 40, "full", False),     # 8 splits of 2 key tiles: 6 empty runs
])
def test_cuda_forward_key_splits(monkeypatch, splits, B, G, L, H, D, mask, fused):
    """The split forward (JEDI_CUDA_FWD_SPLITS=S: S CTAs per query tile over runs of its allowed key tiles, float32
    partial results merged by a second kernel; FlashAttention-2's split-KV for grids too small to fill the GPU)
    passes the 2x rule for out and lse (and the backward, which reads the merged lse), in both dtypes; the profiler
    shows the merge kernel ran exactly when S > 1. JEDI_CUDA_FWD_WGMMA=0 keeps the d 40 case on the mma.sync kernel
    (the Hopper forward has no splits)."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_FWD_SPLITS", splits)
    monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", "0")
    for dtype in (torch.bfloat16, torch.float16):
        _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused, backend="cuda")
    _, (q, k, v) = _inputs(B, G, L, H, D, torch.float16, torch.device("cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        jk.set_attention(q, k, v, G, H, backend="cuda")
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
    merged = any("combine" in n for n in names)
    assert names and merged == (splits != "1"), names


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [None, "0", "1"], ids=["unset", "auto", "off"])
def test_cuda_forward_splits_small_grids_only_when_asked(monkeypatch, setting):
    """With 0 the CUDA forward splits the keys where the grid fills less than 80 % of one wave: d 80, L 1024, one
    image per set, B 2, H 8 is 128 CTAs of 16 key tiles with room for two per SM (on an A100, H100 and H200), so it
    splits; the UNet's 64x64 layer (d 40, L 4096, set size 2: 1024 CTAs) does not. Unset (the default: the automatic
    count lost on the H200) or "1" never splits. Out by the 2x rule either way."""
    _require_cuda_attention()
    if setting is None:
        monkeypatch.delenv("JEDI_CUDA_FWD_SPLITS", raising=False)
    else:
        monkeypatch.setenv("JEDI_CUDA_FWD_SPLITS", setting)
    monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", "0")
    for (B, G, L, H, D), small in (((2, 1, 1024, 8, 80), True), ((2, 2, 4096, 8, 40), False)):
        q, k, v = (torch.randn(B * G, L, H * D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = jk.set_attention(q, k, v, G, H, backend="cuda")
            torch.cuda.synchronize()
        names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
        assert names and any("combine" in n for n in names) == (small and setting == "0"), (B, G, L, H, D, names)
        if small:
            ref64 = reference.set_attention_reference(*(t.double() for t in (q, k, v)), G, H)
            same = reference.set_attention_reference(q, k, v, G, H)
            assert_flash_rule(out, same, ref64, f"out splits={setting}")


@pytest.mark.gpu
def test_cuda_forward_splits_env_is_checked(monkeypatch):
    """A malformed JEDI_CUDA_FWD_SPLITS is an error naming the variable, not a silent default."""
    _require_cuda_attention()
    q = torch.randn(2, 64, 80, device="cuda", dtype=torch.float16)
    for bad in ("9", "two", "-1"):
        monkeypatch.setenv("JEDI_CUDA_FWD_SPLITS", bad)
        with pytest.raises(RuntimeError, match="JEDI_CUDA_FWD_SPLITS"):
            jk.set_attention(q, q, q, 2, 1, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("key_blocks", ["1", "2"], ids=["16keys", "32keys"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 2, 4096, 2, 40, "full", True),
    (2, 3, 97, 2, 40, "random", True),        # partial query and key tiles, masked
    (1, 2, 130, 1, 48, "oneway", False),      # a 2-key tail tile
    (3, 5, 17, 1, 8, "full", False),          # padded to 32
    (1, 4, 1024, 2, 80, "blockdiag", False),  # one instance only: the switch falls back to it
])
def test_cuda_backward_instances(monkeypatch, key_blocks, B, G, L, H, D, mask, fused):
    """Both CUDA backward instances (16 or 32 keys per warp, JEDI_CUDA_BWD_KEY_BLOCKS; padded head dims <= 48 have
    both) pass the 2x rule for dq, dk, dv."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_BWD_KEY_BLOCKS", key_blocks)
    _check_case(B, G, L, H, D, dtype=torch.bfloat16, mask=mask, fused=fused, backend="cuda")


def _cuda_bwd_kernel_names(G, L, H, D) -> set[str]:
    """The names of the CUDA kernels one fp16 CUDA-backend backward of a (1, G, L, H, D) case launches (profiler),
    with the instance switches as the environment has them."""
    _, (q, k, v) = _inputs(1, G, L, H, D, torch.float16, torch.device("cuda"))
    q.requires_grad_()
    out = jk.set_attention(q, k, v, G, H, backend="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "set_attn" in e.name}


@pytest.mark.gpu
@pytest.mark.parametrize("warps", ["0", "4", "8"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 2, 1024, 2, 80, "full", True),
    (2, 3, 97, 2, 72, "random", False),   # partial key tiles of 128, masked
    (1, 4, 130, 1, 80, "oneway", True),
    (1, 2, 64, 1, 40, "full", False),     # no 8-warp instance at 48: the switch falls back
    (1, 2, 256, 2, 160, "full", True),    # SD's 16x16 level: the query-split CTA at 160
    (1, 3, 97, 1, 152, "random", False),  # its key and query tails, padded columns, a mask
])
def test_cuda_backward_warps(monkeypatch, warps, B, G, L, H, D, mask, fused):
    """Both CUDA backward CTA shapes at padded head dims 80 and 160 (JEDI_CUDA_BWD_WARPS 4 or 8; 0 = the default:
    8 at 80 since the H100 timed it, 4 at 160, where 8 is the query-split CTA) pass the 2x rule for dq, dk, dv, in
    both dtypes; the profiler shows which instance ran."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_BWD_WARPS", warps)
    for dtype in (torch.bfloat16, torch.float16):
        _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused, backend="cuda")
    names = {n for n in _cuda_bwd_kernel_names(G, L, H, D) if "set_attn_bwd_kernel" in n}
    # the kernel's template arguments (T, kD, kKB, kNW, kWithDq) end its demangled name: "..., 80, 1, 8, true>" for
    # the 8-warp CTA
    wide = (warps in ("0", "8") and 64 < D <= 80) or (warps == "8" and D > 128)
    assert names and all(bool(re.search(r",\s*(\(int\))?1,\s*(\(int\))?8,\s*(true|\(bool\)1)>", n)) == wide
                         for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("B, G, L, H, D, mask, fused, warps", [
    (1, 2, 4096, 2, 40, "full", True, "0"),    # SD's 64x64 level (32 keys per warp in the dK/dV kernel)
    (2, 3, 97, 2, 40, "random", False, "0"),   # partial query and key tiles, masked
    (1, 2, 1024, 2, 80, "full", True, "0"),    # SD's 32x32 level: the 8-warp dK/dV CTA
    (1, 4, 130, 1, 72, "oneway", False, "4"),  # the 4-warp one, a mask, padded columns
    (1, 2, 256, 2, 160, "full", True, "0"),    # SD's 16x16 level: 32-key tiles in the dQ kernel
    (1, 3, 97, 1, 152, "random", False, "8"),  # the query-split dK/dV CTA, tails, padded columns
    (2, 2, 33, 1, 256, "blockdiag", False, "0"),  # a generic instance
])
def test_cuda_backward_split(monkeypatch, B, G, L, H, D, mask, fused, warps):
    """The split CUDA backward (JEDI_CUDA_BWD_SPLIT=1: the dK/dV kernel without its dQ step, then the dQ kernel; no
    dQ accumulator, no conversion kernel) passes the 2x rule for dq, dk, dv in both dtypes, with each dK/dV CTA
    shape; the profiler shows the dQ kernel and the dK/dV instance without dQ ran, and no conversion kernel."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_BWD_SPLIT", "1")
    monkeypatch.setenv("JEDI_CUDA_BWD_WARPS", warps)
    for dtype in (torch.bfloat16, torch.float16):
        _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused, backend="cuda")
    names = _cuda_bwd_kernel_names(G, L, H, D)
    assert any("set_attn_bwd_dq_kernel" in n for n in names), names
    assert not any("dq_convert" in n for n in names), names
    # the main kernel's last template argument (kWithDq) is false: "..., false>" in its demangled name
    main = [n for n in names if "set_attn_bwd_kernel" in n]
    assert main and all(re.search(r"(false|\(bool\)0)>", n) for n in main), main


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["1", "2", "3", "4", "5"], ids=["64x2", "128x2", "128x3", "128x1", "64x1"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (1, 2, 4096, 2, 40, "full", True),   # SD's 64x64 level, views of one qkv projection
    (2, 3, 97, 2, 40, "random", False),  # partial query and key tiles, masked
    (1, 2, 230, 1, 40, "oneway", True),  # two query tiles of 128, a 38-row tail; a 102-key tail tile
    (2, 4, 64, 1, 40, "blockdiag", False),
    (1, 1, 200, 2, 40, "full", False),   # set size 1
    (1, 2, 1024, 2, 80, "full", True),   # SD's 32x32 level (variants 1, 2, 5; 3 and 4 fall back)
    (2, 3, 97, 1, 80, "random", False),
    (1, 8, 256, 2, 160, "full", True),   # SD's 16x16 level at set size 8 (variant 1; 2 and 3 fall back)
    (1, 3, 150, 1, 160, "oneway", False),
    (1, 2, 97, 1, 72, "full", False),    # no Hopper instance at 72: the switch falls back to mma.sync
])
def test_cuda_wgmma_forward(monkeypatch, variant, B, G, L, H, D, mask, fused):
    """The Hopper forward (JEDI_CUDA_FWD_WGMMA=1..5: warpgroup MMAs, the softmax overlapping the P V product) passes
    the 2x rule for out and lse (and the backward on its lse) in both dtypes; the profiler shows it ran, with the
    variant's tile shape, on a compute-capability-9.0 device at the head dims and variants compiled for it (40: all;
    80: 64 x 2, 128 x 2 and 64 x 1; 160: 64 x 2), and that other devices, head dims and variants fell back to the mma.sync
    kernels."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", variant)
    for dtype in (torch.bfloat16, torch.float16):
        _check_case(B, G, L, H, D, dtype=dtype, mask=mask, fused=fused, backend="cuda")
    _, (q, k, v) = _inputs(1, G, L, H, D, torch.float16, torch.device("cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        jk.set_attention(q, k, v, G, H, backend="cuda")
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
    compiled = {40: "12345", 80: "125", 160: "1"}.get(D, "")
    hopper = torch.cuda.get_device_capability() == (9, 0) and variant in compiled
    assert names and all(("wgmma" in n) == hopper for n in names), names
    if hopper:  # template arguments (T, kDk, kDv, kBlockN, kWG) end the demangled name: "..., 48, 40, 128, 3>"
        block_n, wg = {"1": (64, 2), "2": (128, 2), "3": (128, 3), "4": (128, 1), "5": (64, 1)}[variant]
        dk = (D + 15) // 16 * 16
        assert all(re.search(rf"{dk},\s*(\(int\))?{D},\s*(\(int\))?{block_n},\s*(\(int\))?{wg}>", n)
                   for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 80])
@pytest.mark.parametrize("setting", [None, "", "0"], ids=["unset", "empty", "off"])
def test_cuda_forward_default_is_wgmma_64x2_at_d40_on_hopper(monkeypatch, setting, D):
    """With JEDI_CUDA_FWD_WGMMA unset or empty the CUDA forward runs the Hopper kernel's variant 1 (64 keys x 2
    warpgroups: the H200 sweep's fastest, x1.10-1.15 of mma.sync) at head dim 40 on a compute-capability-9.0 device,
    and the mma.sync kernel elsewhere; "0" keeps the mma.sync kernel. Out by the 2x rule either way."""
    _require_cuda_attention()
    if setting is None:
        monkeypatch.delenv("JEDI_CUDA_FWD_WGMMA", raising=False)
    else:
        monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", setting)
    G, L, H = 2, 200, 2
    q, k, v = (torch.randn(G, L, H * D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = jk.set_attention(q, k, v, G, H, backend="cuda")
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
    hopper = torch.cuda.get_device_capability() == (9, 0) and D == 40 and setting != "0"
    assert names and all(("wgmma" in n) == hopper for n in names), names
    if hopper:
        assert all(re.search(r"48,\s*(\(int\))?40,\s*(\(int\))?64,\s*(\(int\))?2>", n) for n in names), names
    ref64 = reference.set_attention_reference(*(t.double() for t in (q, k, v)), G, H)
    assert_flash_rule(out, reference.set_attention_reference(q, k, v, G, H), ref64, f"out default D={D} {setting}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["1", "3", "4"], ids=["64x2", "128x3", "128x1"])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-3])
def test_cuda_wgmma_forward_non_positive_and_tiny_scales(monkeypatch, variant, scale):
    """The Hopper forward's other scale paths on the device (only its CPU emulation covered them): a negative scale
    flips Q's signs in shared memory, zero makes every score 0 (uniform weights), a tiny one nearly so; out by the 2x
    rule against the reference, with a tail tile (L 97)."""
    _require_cuda_attention()
    monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", variant)
    G, L, H, D = 2, 97, 2, 40
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(G, L, H * D, device="cuda", dtype=dtype) for _ in range(3))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = jk.set_attention(q, k, v, G, H, backend="cuda", scale=scale)
            torch.cuda.synchronize()
        names = {e.name for e in prof.events() if "set_attn_fwd" in e.name}
        assert names and all(("wgmma" in n) == (torch.cuda.get_device_capability() == (9, 0)) for n in names), names
        ref64 = reference.set_attention_reference(*(t.double() for t in (q, k, v)), G, H, scale=scale)
        same = reference.set_attention_reference(q, k, v, G, H, scale=scale)
        assert_flash_rule(out, same, ref64, f"out wgmma {variant} scale={scale} {dtype}")


@pytest.mark.gpu
@pytest.mark.ws
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B, G, L, H, D, mask, fused", [
    (2, 2, 1024, 2, 40, "full", True),  # SD's 64x64 level, as views of one qkv projection
    (1, 3, 97, 2, 40, "oneway", False),
    (1, 2, 256, 2, 64, "blockdiag", False),
    (2, 2, 65, 2, 24, "jedi", True),
])
def test_ws_forward_gpu(monkeypatch, B, G, L, H, D, mask, fused, dtype):
    """The TMA + warp-specialized forward on sm_90 (JEDI_TRITON_FWD_WS=1): out, lse and the grads of the pointer
    backward on its lse, by the flash rule; the TMA kernel really ran. Opt-in (JEDI_TEST_WS=1): on its first GPU run
    (H100, 2026-11-27) none of these finished in time, so a plain ``pytest -m gpu`` must not hang on them;
    gpu_check.sh sets it once tools/ws_probe.py has finished."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward needs sm_90")
    if os.environ.get("JEDI_TEST_WS") != "1":
        pytest.skip("experimental TMA forward: JEDI_TEST_WS=1 runs it (tools/ws_probe.py first: it may not finish)")
    monkeypatch.setenv("JEDI_TRITON_FWD_WS", "1")
    calls = _spy_ws(monkeypatch)
    _check_case(B, G, L, H, D, dtype=dtype, device=torch.device("cuda"), mask=mask, fused=fused)
    assert calls == [(B, G, L, H, D)]


@pytest.mark.parametrize("switch", ["JEDI_CUDA_FWD_ROW_BLOCKS", "JEDI_CUDA_FWD_STAGES", "JEDI_CUDA_BWD_KEY_BLOCKS",
                                    "JEDI_CUDA_BWD_WARPS", "JEDI_CUDA_FWD_WGMMA", "JEDI_CUDA_BWD_SPLIT"])
def test_cuda_instance_switch_bad_value(monkeypatch, switch):
    """A bad value of a CUDA instance switch is an error naming the variable, from the pass that reads it."""
    _require_cuda_attention()
    _, (q, k, v) = _inputs(1, 2, 16, 1, 40, torch.float16, torch.device("cuda"))
    q.requires_grad_()
    monkeypatch.setenv(switch, "6" if switch == "JEDI_CUDA_FWD_WGMMA" else "3")
    allowed = {"JEDI_CUDA_BWD_WARPS": "0, 4 or 8", "JEDI_CUDA_FWD_WGMMA": "0, 1, 2, 3, 4 or 5",
               "JEDI_CUDA_BWD_SPLIT": "0 or 1"}.get(switch, "0, 1 or 2")
    bad = pytest.raises(RuntimeError, match=f"{switch} must be {allowed}")
    if switch.startswith("JEDI_CUDA_FWD"):
        with bad:
            jk.set_attention(q, k, v, 2, 1, backend="cuda")
    else:
        out = jk.set_attention(q, k, v, 2, 1, backend="cuda")  # the forward does not read the backward's switch
        with bad:
            out.backward(torch.ones_like(out))


@pytest.mark.gpu
def test_set_attention_gpu_fp32():
    _check_case(1, 2, 128, 2, 40, dtype=torch.float32, mask="jedi")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_cuda_graph_capture_replay(backend):
    """Forward and backward launches capture into a CUDA graph (no host syncs, no data-dependent allocation); a replay
    on new inputs equals an eager run bit for bit, except dq: both backends add it up with float32 atomics, whose order
    varies from run to run (H100, 2026-11-27: one fp16 ulp apart), so dq must agree to two fp16 ulps. The mask is
    changed in place before the replay too: its image lists are computed inside the graph, not frozen at capture."""
    device = torch.device("cuda")
    B, G, L, H, D = 2, 2, 256, 2, 80
    mask = _jedi_mask(G, 1).to(device)
    scale = D**-0.5
    static = [torch.randn(B * G, L, H * D, device=device, dtype=torch.float16) for _ in range(4)]  # q, k, v, do

    def step():
        q, k, v, do = static
        out, lse = torch.ops.jedi.set_attention_fwd(q, k, v, G, H, scale, mask, backend)
        return (out, lse, *torch.ops.jedi.set_attention_bwd(do, q, k, v, out, lse, G, H, scale, mask, backend))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile and autotune outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in static:
        t.copy_(torch.randn_like(t))
    mask.copy_(_one_way(G, 1).to(device))  # a different pattern: the lists must follow it
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for name, c, e in zip(("out", "lse", "dq", "dk", "dv"), captured, eager):
        if name == "dq":
            torch.testing.assert_close(c, e, rtol=2**-9, atol=2**-20, msg=lambda m: f"dq: graph replay vs eager: {m}")
        else:
            assert torch.equal(c, e), f"{name}: graph replay differs from eager"
