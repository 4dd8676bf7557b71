"""GPU tests of the CUDA C++ set-attention kernels (backend="cuda"): forward, backward and lse against the float64
reference with flash-attention's 2x rule, every head-dim instance, odd shapes, set masks, fused-qkv views, CUDA graph
capture, and the argument checks of the extension ops. Skipped without a GPU or without the CUDA build of ``_C``.
"""
from __future__ import annotations

import pytest
import torch

import jedi_kernels as jk
from jedi_kernels import _ext, reference
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not jk.available_backends()["cuda_attention"],
        reason="needs a CUDA GPU and jedi_kernels._C built with the CUDA set-attention kernels: "
        + str(jk.available_backends()["reasons"].get("cuda") or jk.available_backends()["reasons"].get("cuda_attention")),
    ),
]

DTYPES = [torch.float16, torch.bfloat16]


def _mask(G: int, kind: str) -> torch.Tensor | None:
    """(G, G) bool set mask on the GPU: full (None), block-diagonal, or one-way (every image sees image 0)."""
    if kind == "full":
        return None
    m = torch.eye(G, dtype=torch.bool, device="cuda")
    if kind == "one_way":
        m[:, 0] = True
    return m


def _inputs(B, G, L, H, D, dtype, fused):
    N, HD = B * G, H * D
    if fused:
        # views of one (N, L, 3*H*D) projection: row stride 3*H*D, no copy
        qkv = torch.randn(N, L, 3 * HD, device="cuda", dtype=dtype, requires_grad=True)
        q, k, v = qkv.split(HD, dim=-1)
    else:
        q, k, v = (torch.randn(N, L, HD, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v


def _check(B, G, L, H, D, dtype, mask_kind="full", fused=False, scale=None):
    q, k, v = _inputs(B, G, L, H, D, dtype, fused)
    mask = _mask(G, mask_kind)
    grad_out = torch.randn(B * G, L, H * D, device="cuda", dtype=dtype)

    out = jk.set_attention(q, k, v, G, H, scale=scale, set_mask=mask, backend="cuda")
    assert out.shape == (B * G, L, H * D) and out.dtype == dtype and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = reference.set_attention_reference(*leaves, G, H, scale=scale, set_mask=mask)
        return o, torch.autograd.grad(o, leaves, grad_out.to(dt))

    ref64, grads64 = ref(torch.float64)
    same, grads_same = ref(dtype)
    tag = f"B={B} G={G} L={L} H={H} D={D} {dtype} mask={mask_kind} fused={fused}"
    assert_flash_rule(out, same, ref64, f"out [{tag}]")
    for name, ours, s, r in zip(("dq", "dk", "dv"), grads, grads_same, grads64):
        assert ours.shape == r.shape
        assert_flash_rule(ours, s, r, f"{name} [{tag}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [40, 80, 160, 64, 8, 24, 72, 256])
def test_head_dims(D, dtype):
    _check(2, 2, 97, 2, D, dtype)


@pytest.mark.parametrize(
    "G,L",
    [(1, 1), (5, 1), (1, 256), (2, 1024), (3, 17), (5, 64)],
    ids=["G1-L1", "G5-L1", "G1-L256", "G2-L1024", "G3-L17", "G5-L64"],
)
def test_set_and_image_sizes(G, L):
    _check(1, G, L, 2, 40, torch.bfloat16)


@pytest.mark.parametrize("mask_kind", ["full", "block_diag", "one_way"])
@pytest.mark.parametrize("D", [40, 160])
def test_set_masks(D, mask_kind):
    _check(2, 3, 64, 2, D, torch.float16, mask_kind=mask_kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_fused_qkv_views(dtype):
    _check(2, 2, 97, 4, 80, dtype, mask_kind="one_way", fused=True)
    _check(1, 5, 17, 8, 40, dtype, fused=True)


def _distinct_strides(B, G, L, H, D, dtype):
    """q contiguous; k the left columns of wider rows (row stride H*D + 16); v the first L rows of taller images (image
    stride (L + 5) * H*D): every tensor walked with another's strides would read the wrong rows."""
    N, HD = B * G, H * D
    q = torch.randn(N, L, HD, device="cuda", dtype=dtype)
    k = torch.randn(N, L, HD + 16, device="cuda", dtype=dtype)[..., :HD]
    v = torch.randn(N, L + 5, HD, device="cuda", dtype=dtype)[:, :L]
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("wgmma", ["", "0"], ids=["default", "mma_sync"])
@pytest.mark.parametrize("D", [40, 80, 160])
def test_distinct_strides_per_tensor(monkeypatch, D, wgmma):
    """The forwards step K and V tiles each with its own strides (set_attention_tiles.cuh: the next tile inside an image
    is kBlockN rows further on, a new image is located afresh); several tiles per image, a tail, and a mask that
    skips an image. At D = 40 on an H100/H200 the default forward is the Hopper (wgmma) one, JEDI_CUDA_FWD_WGMMA=0 the
    mma.sync one; elsewhere both runs take the mma.sync kernel."""
    if wgmma:
        monkeypatch.setenv("JEDI_CUDA_FWD_WGMMA", wgmma)
    else:
        monkeypatch.delenv("JEDI_CUDA_FWD_WGMMA", raising=False)
    B, G, L, H = 2, 3, 300, 2
    q, k, v = _distinct_strides(B, G, L, H, D, torch.bfloat16)
    mask = _mask(G, "one_way")
    mask[2, 1] = True  # image 2 sees images 0, 1 and 2; image 1 skips image 2
    grad_out = torch.randn(B * G, L, H * D, device="cuda", dtype=torch.bfloat16)
    out = jk.set_attention(q, k, v, G, H, set_mask=mask, backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = reference.set_attention_reference(*leaves, G, H, set_mask=mask)
        return o, torch.autograd.grad(o, leaves, grad_out.to(dt))

    (ref64, grads64), (same, grads_same) = ref(torch.float64), ref(torch.bfloat16)
    tag = f"D={D} wgmma={wgmma or 'default'} distinct strides"
    assert_flash_rule(out, same, ref64, f"out [{tag}]")
    for name, ours, s_, r in zip(("dq", "dk", "dv"), grads, grads_same, grads64):
        assert_flash_rule(ours, s_, r, f"{name} [{tag}]")


def test_explicit_scale():
    _check(1, 2, 97, 2, 40, torch.float16, scale=0.3)


@pytest.mark.parametrize("mask_kind", ["full", "one_way"])
def test_lse(mask_kind):
    ops = _ext.ext_ops()
    B, G, L, H, D = 2, 3, 97, 2, 80
    q, k, v = (t.detach() for t in _inputs(B, G, L, H, D, torch.bfloat16, fused=True))
    mask = _mask(G, mask_kind)
    out, lse = ops.set_attention_fwd_ext(q, k, v, G, H, D**-0.5, mask)
    assert lse.shape == (B, H, G * L) and lse.dtype == torch.float32
    want = reference.set_attention_lse_reference(q.double(), k.double(), G, H, set_mask=mask)
    # scores are exact fp32 dot products of the bf16 inputs: lse is accurate to fp32 rounding
    assert_close_verbose(lse, want, atol=1e-3, name="lse")
    ref = reference.set_attention_reference(q.double(), k.double(), v.double(), G, H, set_mask=mask)
    same = reference.set_attention_reference(q, k, v, G, H, set_mask=mask)
    assert_flash_rule(out, same, ref, "out (ext op)")


def test_cuda_graph_capture():
    ops = _ext.ext_ops()
    B, G, L, H, D = 1, 2, 97, 2, 40
    q, k, v = (torch.randn(B * G, L, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = _mask(G, "one_way")
    go = torch.randn_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        out, lse = ops.set_attention_fwd_ext(q, k, v, G, H, 0.2, mask)
        ops.set_attention_bwd_ext(go, q, k, v, out, lse, G, H, 0.2, mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = ops.set_attention_fwd_ext(q, k, v, G, H, 0.2, mask)
        dq, dk, dv = ops.set_attention_bwd_ext(go, q, k, v, out, lse, G, H, 0.2, mask)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    out2, lse2 = ops.set_attention_fwd_ext(q, k, v, G, H, 0.2, mask)
    grads2 = ops.set_attention_bwd_ext(go, q, k, v, out2, lse2, G, H, 0.2, mask)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse2, atol=0, rtol=0)
    for a, b in zip((dq, dk, dv), grads2):  # fp32 atomics into dq: order may differ by a rounding
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_bad_inputs_name_the_argument():
    ops = _ext.ext_ops()
    N, L, H, D = 4, 16, 2, 40
    q, k, v = (torch.randn(N, L, H * D, device="cuda", dtype=torch.float16) for _ in range(3))
    fwd = ops.set_attention_fwd_ext
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        fwd(q.float(), k.float(), v.float(), 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        fwd(q, k[:, :8], v, 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        fwd(q, k, v.bfloat16(), 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="set_size"):
        fwd(q, k, v, 3, H, 0.1, None)
    with pytest.raises(RuntimeError, match="heads"):
        fwd(q, k, v, 2, 3, 0.1, None)
    with pytest.raises(RuntimeError, match="head_dim"):
        fwd(q, k, v, 2, 4, 0.1, None)  # head_dim 20 is not a multiple of 8
    with pytest.raises(RuntimeError, match="q must have unit stride"):
        fwd(torch.randn(N, H * D, L, device="cuda", dtype=torch.float16).transpose(1, 2), k, v, 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="set_mask must have shape"):
        fwd(q, k, v, 2, H, 0.1, torch.ones(3, 3, dtype=torch.bool, device="cuda"))
    with pytest.raises(RuntimeError, match="set_mask must be a bool"):
        fwd(q, k, v, 2, H, 0.1, torch.ones(2, 2, device="cuda"))
    with pytest.raises(RuntimeError, match="set_mask must be on q's device"):
        fwd(q, k, v, 2, H, 0.1, torch.ones(2, 2, dtype=torch.bool))
    out, lse = fwd(q, k, v, 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.set_attention_bwd_ext(torch.randn_like(q), q, k, v, out, lse[:, :1], 2, H, 0.1, None)
    with pytest.raises(RuntimeError, match="grad_out must have q's shape"):
        ops.set_attention_bwd_ext(torch.randn_like(q)[:2], q, k, v, out, lse, 2, H, 0.1, None)
