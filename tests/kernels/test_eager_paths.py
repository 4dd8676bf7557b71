"""Eager calls of the fused ops skip their custom op's Python dispatch (jedi_kernels.ops.eager_call): without
autograd the kernel launcher is called directly, with autograd an autograd.Function carries the custom op's saved
tensors and backward. Both must give what the custom op gives, bit for bit (the same kernels run), and the custom op
must still run for tensor subclasses (a tracer's fake or functional tensors) and while compiling."""
from __future__ import annotations

import pytest
import torch

import jedi_kernels as jk
from jedi_kernels.ops import eager_call
from jedi_kernels.ops import geglu as geglu_ops
from jedi_kernels.ops import group_norm as gn_ops
from jedi_kernels.ops import layer_norm as ln_ops
from jedi_kernels.ops import set_attention as sa
from jedi_kernels.ops import residual_add as ra_ops
from jedi_kernels.ops import upsample_conv as up_ops

BACKENDS = ["torch"] + (["triton"] if jk.available_backends()["triton"] else [])
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


class Sub(torch.Tensor):
    """Stands in for a tracer's tensor subclass; logs the torch functions and ops called on it."""

    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_eager_call_modes(monkeypatch):
    x = torch.randn(3)
    p = torch.nn.Parameter(torch.randn(3))
    assert eager_call(x, None) == "direct"
    assert eager_call(x, p) == "function"
    with torch.no_grad():
        assert eager_call(x, p) == "direct"
    with torch.inference_mode():
        assert eager_call(torch.randn(3)) == "direct"
    assert eager_call(x.as_subclass(Sub)) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert eager_call(x) is None


# each case: (inputs, the public op, the custom op, the eager Function, (module, launcher name), the op's name)
def _gn_case(backend):
    x = torch.randn(2, 8, 5, 6, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    w, b = (torch.randn(8, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return ((x, w, b),
            lambda x, w, b: jk.group_norm(x, 4, w, b, 1e-5, silu=True, backend=backend),
            lambda x, w, b: torch.ops.jedi.group_norm(x, 4, w, b, 1e-5, True, backend),
            gn_ops._GroupNormEager, (gn_ops, "_fwd_body"), "jedi.group_norm")


def _gn_shift_case(backend):
    x = torch.randn(2, 8, 5, 6, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    w, b = (torch.randn(8, device=DEVICE, dtype=DTYPE) for _ in range(2))
    sh = torch.randn(2, 8, device=DEVICE, dtype=DTYPE)
    return ((x, w, b, sh),
            lambda x, w, b, sh: jk.group_norm(x, 4, w, b, 1e-5, silu=True, shift=sh, backend=backend),
            lambda x, w, b, sh: torch.ops.jedi.group_norm(x, 4, w, b, 1e-5, True, backend, sh),
            gn_ops._GroupNormEager, (gn_ops, "_fwd_body"), "jedi.group_norm")


def _geglu_case(backend):
    h = torch.randn(2, 7, 48, device=DEVICE, dtype=DTYPE)
    return ((h,), lambda h: jk.geglu(h, backend=backend), lambda h: torch.ops.jedi.geglu(h, backend),
            geglu_ops._GegluEager, (geglu_ops, "_fwd_body"), "jedi.geglu")


def _ln_case(backend):
    x, r = (torch.randn(2, 7, 48, device=DEVICE, dtype=DTYPE) for _ in range(2))
    w, b = (torch.randn(48, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return ((x, r, w, b), lambda x, r, w, b: jk.add_layer_norm(x, r, w, b, backend=backend)[1],
            lambda x, r, w, b: torch.ops.jedi.add_layer_norm(x, r, w, b, 1e-5, backend)[1],
            ln_ops._AddLayerNormEager, (ln_ops, "_fwd_body"), "jedi.add_layer_norm")


def _attn_case(backend):
    q, k, v = (torch.randn(4, 9, 2 * 16, device=DEVICE, dtype=DTYPE) for _ in range(3))
    return ((q, k, v), lambda q, k, v: jk.set_attention(q, k, v, 2, 2, backend=backend),
            lambda q, k, v: torch.ops.jedi.set_attention_fwd(q, k, v, 2, 2, 16**-0.5, None, backend)[0],
            sa._SetAttentionEager, (sa, "_fwd_body"), "jedi.set_attention_fwd")


def _residual_add_case(backend):
    x, r = (torch.randn(2, 6, 3, 4, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
            for _ in range(2))
    b = torch.randn(6, device=DEVICE, dtype=DTYPE)
    return ((x, r, b), lambda x, r, b: jk.residual_add(x, r, b, backend=backend),
            lambda x, r, b: torch.ops.jedi.residual_add(x, r, b, backend),
            ra_ops._ResidualAddEager, (ra_ops, "_fwd_body"), "jedi.residual_add")


def _upsample_case(backend):
    x = torch.randn(2, 6, 3, 4, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    w = torch.randn(5, 6, 3, 3, device=DEVICE, dtype=DTYPE).to(memory_format=torch.channels_last)
    b = torch.randn(5, device=DEVICE, dtype=DTYPE)

    def op(x, w, b):
        z = torch.nn.functional.conv2d(x, up_ops.fold_weight(w), None, padding=1)
        return torch.ops.jedi.upsample_interleave(z, b, backend)

    return ((x, w, b), lambda x, w, b: jk.upsample_conv2d(x, w, b, backend=backend), op,
            up_ops._InterleaveEager, (up_ops, "_fwd_body"), "jedi.upsample_interleave")


CASES = [(_gn_case, b) for b in BACKENDS] + [(_gn_shift_case, b) for b in BACKENDS] + \
    [(_geglu_case, b) for b in BACKENDS] + [(_ln_case, b) for b in BACKENDS] + \
    [(_residual_add_case, b) for b in BACKENDS] + \
    ([(_attn_case, "triton"), (_upsample_case, "triton")] if "triton" in BACKENDS else [])


@pytest.mark.parametrize("case, backend", CASES, ids=[f"{c.__name__[1:-5]}-{b}" for c, b in CASES])
def test_eager_paths_equal_the_custom_op(monkeypatch, case, backend):
    inputs, public, op, function, (module, body_name), op_name = case(backend)
    # autograd: the Function path, same output and gradients as the op
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out_a, out_b = public(*a), op(*b)
    assert type(out_a.grad_fn).__name__ == function.__name__ + "Backward"
    gy = torch.randn_like(out_a)
    out_a.backward(gy)
    out_b.backward(gy)
    assert torch.equal(out_a, out_b)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)
    # no autograd: the launcher itself, no graph node, same output
    calls = []
    real = getattr(module, body_name)
    monkeypatch.setattr(module, body_name, lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        out_c = public(*a)
    assert calls and out_c.grad_fn is None and torch.equal(out_c, out_a.detach())

    # a tensor subclass keeps the custom op, with autograd or without
    def refuse(*args):
        raise AssertionError("a tensor subclass took the autograd.Function path")

    monkeypatch.setattr(function, "apply", refuse)
    for grad in (False, True):
        Sub.seen.clear()
        subs = [t.detach().as_subclass(Sub).requires_grad_(grad) for t in inputs]
        out_d = public(*subs)
        assert any(op_name in f for f in Sub.seen), f"{op_name} was not called: {Sub.seen[-5:]}"
        assert torch.equal(out_d.detach().as_subclass(torch.Tensor), out_a.detach())
