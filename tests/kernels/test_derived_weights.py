"""jedi_kernels.modules.DerivedWeights: weight-derived tensors made once per frozen scope (e.g. a sampling run)
instead of once per forward, refreshed in place on every entry, checked on exit; and SetAttention's fused q/k/v
weight through it."""
import copy
import pickle

import pytest
import torch
from torch import nn

import jedi_kernels as jk
from jedi_kernels.modules import DerivedWeights


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4, bias=False), nn.Linear(3, 2, bias=False)
        self.calls = 0

    def fused(self):
        self.calls += 1
        return torch.cat([self.a.weight, self.b.weight])

    def params(self):
        return (self.a.weight, self.b.weight)


def test_outside_a_scope_every_get_computes():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad():
        assert torch.equal(d.get("k", m.fused, m.params), m.fused())
        d.get("k", m.fused, m.params)
    assert m.calls == 3 and len(d) == 0 and not d.active


def test_inside_a_scope_once_then_refreshed_in_place_on_entry():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad():
        with d.frozen():
            assert d.active
            first = d.get("k", m.fused, m.params)
            assert d.get("k", m.fused, m.params) is first and m.calls == 1
            with d.frozen():  # re-entrant: no refresh, no check
                assert d.get("k", m.fused, m.params) is first and m.calls == 1
        m.a.weight.mul_(2)  # outside: allowed
        storage = first.data_ptr()
        with d.frozen():  # the entry refreshes in place: a graph captured before reads the new values
            again = d.get("k", m.fused, m.params)
            assert again.data_ptr() == storage and torch.equal(again, m.fused())


def test_grad_mode_always_computes():
    d, m = DerivedWeights(), _Lin()
    with d.frozen():
        t = d.get("k", m.fused, m.params)
        assert t.requires_grad and len(d) == 0  # nothing stored: the caller needs its autograd history


def test_a_change_inside_the_scope_raises_on_exit_and_refreshes():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="parameters changed inside a frozen-weights scope"):
            with d.frozen():
                d.get("k", m.fused, m.params)
                m.b.weight.add_(1)
        with d.frozen():
            assert torch.equal(d.get("k", m.fused, m.params), m.fused())
        with pytest.raises(RuntimeError, match="changed inside"):
            with d.frozen():
                d.get("k", m.fused, m.params)
                m.a.weight = nn.Parameter(torch.randn(4, 3))  # replaced, not written: the identity changed


def test_an_entry_whose_modules_changed_kind_is_dropped_on_refresh():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad():
        with d.frozen():
            d.get("k", m.fused, m.params)
        m.a = nn.Identity()  # no .weight any more: its fn raises
        with d.frozen():
            assert len(d) == 0


def test_pickle_and_deepcopy_carry_no_entries():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad(), d.frozen():
        d.get("k", m.fused, m.params)
    assert len(d) == 1
    assert len(pickle.loads(pickle.dumps(d))) == 0 and len(copy.deepcopy(d)) == 0
    d.clear()
    assert len(d) == 0
    with d.frozen(), pytest.raises(RuntimeError, match="inside a frozen scope"):
        d.clear()


def test_set_attention_fused_qkv_weight_once_per_scope(monkeypatch):
    """A SetAttention with fuse_qkv and a DerivedWeights concatenates its weights once in a frozen scope (the
    outputs are bitwise those of the unfrozen module), and again after a weight update between scopes."""
    torch.manual_seed(0)
    att = jk.SetAttention(16, heads=2, dim_head=8, fuse_qkv=True, backend="torch").double()
    att.derived = DerivedWeights()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    cats = []
    real = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = att(x, set_size=2)
        n0 = len(cats)
        with att.derived.frozen():
            outs = [att(x, set_size=2) for _ in range(3)]
        assert len(cats) - n0 == 1 and all(torch.equal(o, ref) for o in outs)
    monkeypatch.undo()
    with torch.no_grad():
        att.to_k.weight.mul_(0.5)  # between scopes
        fresh = jk.SetAttention(16, heads=2, dim_head=8, fuse_qkv=True, backend="torch").double()
        fresh.load_state_dict(att.state_dict())
        with att.derived.frozen():
            out = att(x, set_size=2)
        assert torch.equal(out, fresh(x, set_size=2)) and not torch.equal(out, ref)


def test_an_error_inside_the_scope_is_not_masked_and_the_scope_closes():
    d, m = DerivedWeights(), _Lin()
    with torch.no_grad():
        with pytest.raises(KeyError):
            with d.frozen():
                d.get("k", m.fused, m.params)
                m.a.weight.add_(1)  # a change too: the body's error still comes out, not the check's
                raise KeyError("body")
    assert not d.active


def test_inference_tensors_have_no_version_but_work():
    with torch.inference_mode():
        m = _Lin()
        d = DerivedWeights()
        with d.frozen():
            t = d.get("k", m.fused, m.params)
            assert d.get("k", m.fused, m.params) is t
