"""Set attention with the queries of some images of each set (``q_positions``), ``take_set_positions`` and
``SetAttention(q_positions=...)``: each must equal the full computation restricted to those images."""
from __future__ import annotations

import pytest
import torch

import jedi_kernels as jk
from jedi_kernels.testing import assert_close_verbose


def _qkv(B, G, L, H, D, dtype=torch.float64, fused=False):
    N = B * G
    if fused:  # views of one fused projection: row stride 3*H*D
        qkv = torch.randn(N, L, 3 * H * D, dtype=dtype)
        return qkv.chunk(3, dim=-1)
    return tuple(torch.randn(N, L, H * D, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("B, G, L, H, D, positions", [
    (2, 2, 16, 2, 8, (1,)),
    (1, 3, 7, 1, 40, (0, 2)),
    (3, 4, 5, 4, 16, (1, 2, 3)),
    (2, 5, 9, 2, 24, (4,)),
])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_equals_the_reference_at_those_positions(B, G, L, H, D, positions, masked, fused):
    q, k, v = _qkv(B, G, L, H, D, fused=fused)
    set_mask = None
    if masked:
        set_mask = torch.rand(G, G) < 0.5
        set_mask |= torch.eye(G, dtype=torch.bool)
    scale = 0.3
    ref = jk.set_attention_reference(q, k, v, G, H, scale=scale, set_mask=set_mask)
    qk = jk.take_set_positions(q, G, positions)
    out = jk.set_attention(qk, k, v, G, H, scale=scale, set_mask=set_mask, q_positions=positions)
    assert out.shape == (B * len(positions), L, H * D)
    assert_close_verbose(out, jk.take_set_positions(ref, G, positions), atol=1e-12, name="out")


def test_default_scale_and_every_position():
    q, k, v = _qkv(2, 3, 6, 2, 8)
    ref = jk.set_attention_reference(q, k, v, 3, 2)
    assert_close_verbose(jk.set_attention(q, k, v, 3, 2, q_positions=(0, 1, 2)), ref, atol=1e-12, name="all")
    out = jk.set_attention(jk.take_set_positions(q, 3, (1,)), k, v, 3, 2, q_positions=[1])
    assert_close_verbose(out, jk.take_set_positions(ref, 3, (1,)), atol=1e-12, name="default scale")


def test_gradients():
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 3, 4, 2, 4))
    pos = (1, 2)
    torch.autograd.gradcheck(
        lambda q, k, v: jk.set_attention(jk.take_set_positions(q, 3, pos), k, v, 3, 2, q_positions=pos), (q, k, v))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("positions", [(1,), (0, 2), (1, 2), (3,)])
def test_take_set_positions(fmt, positions):
    x = torch.randn(8, 5, 3, 2).contiguous(memory_format=fmt)  # B 2, G 4
    out = jk.take_set_positions(x, 4, positions)
    want = torch.cat([x[b * 4 + p:b * 4 + p + 1] for b in range(2) for p in positions])
    assert torch.equal(out, want)
    assert out.is_contiguous(memory_format=fmt) and out.data_ptr() != x.data_ptr()
    assert jk.take_set_positions(x, 4, range(4)) is x  # every position: nothing to take
    x.requires_grad_(True)
    jk.take_set_positions(x, 4, positions).sum().backward()
    hit = torch.zeros(8, dtype=torch.bool)
    for b in range(2):
        for p in positions:
            hit[b * 4 + p] = True
    assert (x.grad[hit] == 1).all() and (x.grad[~hit] == 0).all()


@pytest.mark.parametrize("bad, err, match", [
    ((), ValueError, "at least one"), ((4,), ValueError, "increasing"), ((2, 1), ValueError, "increasing"),
    ((0, 0), ValueError, "increasing"), ((False,), TypeError, "ints"), (2, TypeError, "sequence"),
    (torch.tensor([1]), TypeError, "sequence"),
])
def test_bad_positions(bad, err, match):
    x = torch.randn(8, 3)
    with pytest.raises(err, match=match):
        jk.take_set_positions(x, 4, bad)
    with pytest.raises(err, match=match):
        jk.check_set_positions(bad, 4)
    q, k, v = _qkv(2, 4, 3, 1, 8)
    with pytest.raises(err, match=match):
        jk.set_attention(q[:2], k, v, 4, 1, q_positions=bad)


def test_errors_name_the_problem():
    q, k, v = _qkv(2, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of set_size"):
        jk.take_set_positions(torch.randn(5, 2), 3, (1,))
    with pytest.raises(ValueError, match=r"q must have shape \(B\*1"):
        jk.set_attention(q, k, v, 3, 2, q_positions=(1,))  # q of every image
    with pytest.raises(ValueError, match="backend 'torch'"):
        jk.set_attention(q[:2], k, v, 3, 2, q_positions=(1,), backend="triton")
    with pytest.raises(ValueError, match="backend 'torch'"):
        jk.set_attention(q[:2], k, v, 3, 2, q_positions=(1,), backend="cuda")
    with pytest.raises(ValueError, match="k's shape"):
        jk.set_attention(q[:2], k, v[:, :3], 3, 2, q_positions=(1,))
    with pytest.raises(TypeError, match="dtype"):
        jk.set_attention(q[:2].float(), k, v, 3, 2, q_positions=(1,))
    with pytest.raises(ValueError, match="allow no image"):
        jk.set_attention(q[:2], k, v, 3, 2, q_positions=(1,), set_mask=torch.zeros(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_module_q_positions(fuse_qkv):
    torch.manual_seed(0)
    m = jk.SetAttention(32, heads=4, dim_head=8, fuse_qkv=fuse_qkv, backend="triton").double()
    x = torch.randn(6, 5, 32, dtype=torch.float64)  # B 2, G 3
    m.backend = "torch"  # the full reference call; the subset runs on SDPA whatever the backend
    full = m(x, 3)
    m.backend = "triton"
    out = m(x, 3, q_positions=(0, 2))
    assert_close_verbose(out, jk.take_set_positions(full, 3, (0, 2)), atol=1e-12, name="module")
    with pytest.raises(ValueError, match="x must have shape"):
        m(x[0], 3, q_positions=(0,))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_take_set_positions_copies_once(fmt):
    """Consecutive positions: one allocation in the output's format and one copy (no second pass to change the
    layout); every position separately otherwise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, 5, 3, 2).contiguous(memory_format=fmt)
    for positions, copies in (((1, 2), 1), ((0, 2), 2)):
        with Ops() as ops:
            jk.take_set_positions(x, 4, positions)
        assert ops.names.count("copy_") == copies, ops.names
        assert not {"clone", "contiguous", "_to_copy"} & set(ops.names), ops.names
