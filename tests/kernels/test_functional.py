"""jedi_kernels.set_attention: the API contract (validation, torch backend semantics) and available_backends."""
import subprocess
import sys

import pytest
import torch

import jedi_kernels as jk
from jedi_kernels.reference import set_attention_reference
from jedi_kernels.testing import assert_close_verbose, assert_flash_rule


def _qkv(N=4, L=9, H=2, D=8, dtype=torch.float32, requires_grad=False):
    return [torch.randn(N, L, H * D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def test_reference_ng1_is_plain_attention():
    q, k, v = _qkv(N=3, L=7, H=2, D=8, dtype=torch.float64)
    out = set_attention_reference(q, k, v, 1, 2)
    # plain per-image multi-head attention
    qh, kh, vh = (t.view(3, 7, 2, 8).transpose(1, 2) for t in (q, k, v))
    plain = torch.softmax(qh @ kh.transpose(-1, -2) / 8**0.5, -1) @ vh
    assert_close_verbose(out, plain.transpose(1, 2).reshape(3, 7, 16), atol=1e-12)


def test_reference_joint_is_concatenated_sequence():
    """Set attention with G images == attention over the G*L tokens of the concatenated set."""
    q, k, v = _qkv(N=6, L=5, H=2, D=8, dtype=torch.float64)
    out = set_attention_reference(q, k, v, 3, 2)
    cat = [t.reshape(2, 15, 16) for t in (q, k, v)]  # (B, G*L, H*D) == seed's (b, ng*l, c)
    out_cat = set_attention_reference(*cat, 1, 2)
    assert_close_verbose(out, out_cat.reshape(6, 5, 16), atol=1e-12)


@pytest.mark.parametrize("mask_kind", [None, "full", "diag", "oneway"])
@pytest.mark.parametrize("G,L,H,D", [(1, 17, 2, 40), (2, 9, 2, 8), (3, 16, 4, 24), (5, 4, 1, 80)])
def test_torch_backend_matches_reference(mask_kind, G, L, H, D):
    N = 2 * G
    q, k, v = _qkv(N, L, H, D, requires_grad=True)
    mask = None
    if mask_kind == "full":
        mask = torch.ones(G, G, dtype=torch.bool)
    elif mask_kind == "diag":
        mask = torch.eye(G, dtype=torch.bool)
    elif mask_kind == "oneway":  # image 0 is the reference: it attends only itself; others attend everything
        mask = torch.ones(G, G, dtype=torch.bool)
        mask[0, 1:] = False
    out = jk.set_attention(q, k, v, G, H, set_mask=mask, backend="torch")
    ref64 = set_attention_reference(*(t.double() for t in (q, k, v)), G, H, set_mask=mask)
    ref32 = set_attention_reference(q, k, v, G, H, set_mask=mask)
    assert_flash_rule(out, ref32, ref64, "out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    grads64 = torch.autograd.grad(set_attention_reference(qd, kd, vd, G, H, set_mask=mask), (qd, kd, vd), g.double())
    grads32 = torch.autograd.grad(ref32, (q, k, v), g)
    for name, a, b32, b64 in zip("qkv", grads, grads32, grads64):
        assert_flash_rule(a, b32, b64, f"d{name}")


def test_fused_qkv_views_and_module():
    torch.manual_seed(1)
    attn = jk.SetAttention(32, heads=4, dim_head=8)
    fused = jk.SetAttention(32, heads=4, dim_head=8, fuse_qkv=True)
    fused.load_state_dict(attn.state_dict())
    assert set(attn.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    x = torch.randn(4, 10, 32)
    assert_close_verbose(fused(x, 2), attn(x, 2), atol=1e-5)
    # the module's result is the reference on the projections
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    ref = attn.to_out(set_attention_reference(q, k, v, 2, 4))
    assert_close_verbose(attn(x, 2), ref, atol=1e-5)


def test_default_scale_and_custom_scale():
    q, k, v = _qkv(dtype=torch.float64)
    assert_close_verbose(jk.set_attention(q, k, v, 2, 2, backend="torch"), set_attention_reference(q, k, v, 2, 2),
                         atol=1e-12)
    assert_close_verbose(jk.set_attention(q, k, v, 2, 2, scale=0.3, backend="torch"),
                         set_attention_reference(q, k, v, 2, 2, scale=0.3), atol=1e-12)


def test_auto_on_cpu_runs_torch(monkeypatch):
    q, k, v = _qkv()
    out = jk.set_attention(q, k, v, 2, 2)
    assert_close_verbose(out, set_attention_reference(q, k, v, 2, 2), atol=1e-5)
    monkeypatch.setenv("JEDI_BACKEND", "bogus")
    with pytest.raises(ValueError, match="JEDI_BACKEND"):
        jk.set_attention(q, k, v, 2, 2)


def test_compile_fullgraph_torch_backend():
    q, k, v = _qkv(requires_grad=True)
    f = torch.compile(lambda a, b, c: jk.set_attention(a, b, c, 2, 2, backend="torch"), fullgraph=True,
                      backend="aot_eager")
    out = f(q, k, v)
    assert_close_verbose(out, set_attention_reference(q, k, v, 2, 2), atol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


BAD = [
    (dict(q=torch.randn(4, 9)), ValueError, r"q must have shape \(N, L, heads\*head_dim\)"),
    (dict(k=torch.randn(4, 9, 15)), ValueError, "k must have q's shape"),
    (dict(v=torch.randn(4, 9, 16, dtype=torch.float64)), TypeError, "v must have q's dtype"),
    (dict(q=torch.randint(0, 3, (4, 9, 16))), TypeError, "q must be float16, bfloat16, float32 or float64"),
    (dict(q="x"), TypeError, "q must be a torch.Tensor"),
    (dict(set_size=3), ValueError, "must be a multiple of set_size"),
    (dict(set_size=0), ValueError, "set_size must be a positive int"),
    (dict(heads=3), ValueError, "must be heads \\* head_dim"),
    (dict(heads=2.0), ValueError, "heads must be a positive int"),
    (dict(q=torch.randn(0, 9, 16), k=torch.randn(0, 9, 16), v=torch.randn(0, 9, 16)), ValueError, "non-empty"),
    (dict(set_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"set_mask must have shape \(set_size, set_size\)"),
    (dict(set_mask=torch.ones(2, 2)), TypeError, "set_mask must have dtype torch.bool"),
    (dict(set_mask=torch.tensor([[True, False], [False, False]])), ValueError, r"set_mask rows \[1\] allow no image"),
    (dict(set_mask=[[True]]), TypeError, "set_mask must be a bool tensor"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(backend="flash"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), TypeError, "backend='cuda' needs q, k, v in float16 or bfloat16, got torch.float32"),
    (dict(backend="cuda", **{n: torch.randn(4, 9, 16).half() for n in "qkv"}), ValueError,
     "backend='cuda' is unavailable"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD)
def test_bad_inputs(kwargs, exc, match):
    args = dict(q=torch.randn(4, 9, 16), k=torch.randn(4, 9, 16), v=torch.randn(4, 9, 16), set_size=2, heads=2)
    args.update(kwargs)
    q, k, v, G, H = (args.pop(n) for n in ("q", "k", "v", "set_size", "heads"))
    with pytest.raises(exc, match=match):
        jk.set_attention(q, k, v, G, H, **args)


def test_available_backends_reports_reasons():
    avail = jk.available_backends()
    for key in ("triton", "cuda", "cpu_ext", "torch", "reasons"):
        assert key in avail
    assert avail["torch"] is True
    for name in ("triton", "cuda", "cpu_ext"):
        if not avail[name]:
            assert avail["reasons"][name], name


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_survives_missing_extension():
    """JEDI_SKIP_EXT=1 (or a missing _C) falls back: import works, ops run on torch/Triton, reasons say why."""
    code = (
        "import torch, jedi_kernels as jk\n"
        "a = jk.available_backends(); assert not a['cpu_ext'] and 'JEDI_SKIP_EXT' in a['reasons']['cpu_ext'], a\n"
        "x = torch.randn(2, 4, 3, 3); m = torch.tensor([1., 0.])\n"
        "assert torch.equal(jk.prepare_inputs(x, x, m), jk.prepare_inputs_reference(x, x, m))\n"
        "print('ok')\n"
    )
    r = _run(code, {"JEDI_SKIP_EXT": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_stale_extension_warns_once_and_falls_back(tmp_path):
    """An _C that fails to load (ABI-stale: ImportError with undefined symbols) warns once, never breaks import."""
    pkg = tmp_path / "shadow"
    pkg.mkdir()
    code = (
        "import sys, types, warnings, importlib.abc, importlib.machinery\n"
        "class Stale(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'jedi_kernels._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c104cuda9SomethingE')\n"
        "sys.meta_path.insert(0, Stale())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import jedi_kernels as jk\n"
        "msgs = [str(x.message) for x in w if 'jedi_kernels' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'undefined symbol' in msgs[0], msgs\n"
        "assert not jk.available_backends()['cpu_ext']\n"
        "print('ok')\n"
    )
    r = _run(code, {})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_set_mask_checks_run_once_per_mask_and_again_after_an_inplace_edit(monkeypatch):
    """A UNet passes one mask to every attention layer: its data-dependent checks (a device sync on GPU) must run once,
    and again only if the mask changes in place."""
    from jedi_kernels import functional

    q, k, v = (torch.randn(4, 9, 16) for _ in range(3))
    mask = torch.tensor([[True, False], [True, True]])
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **kw: copies.append(t.shape) or real_cpu(t, *a, **kw))
    for _ in range(5):
        out = jk.set_attention(q, k, v, 2, 2, set_mask=mask, backend="torch")
    assert len(copies) == 1
    assert_close_verbose(out, set_attention_reference(q, k, v, 2, 2, set_mask=mask), atol=1e-5, name="cached mask")
    mask[1] = False  # in place: the version counter moves, the checks run again and catch the empty row
    with pytest.raises(ValueError, match=r"set_mask rows \[1\] allow no image"):
        jk.set_attention(q, k, v, 2, 2, set_mask=mask, backend="torch")
    assert len(copies) == 2
    eye = torch.eye(2, dtype=torch.bool)  # identity facts come from the cache too: per-image attention
    assert_close_verbose(jk.set_attention(q, k, v, 2, 2, set_mask=eye, backend="torch"),
                         set_attention_reference(q, k, v, 1, 2), atol=1e-5, name="identity mask")
    assert functional._mask_facts(eye)["identity"] and len(functional._MASK_CACHE) <= functional._MASK_CACHE_SIZE


@pytest.mark.parametrize("kind", ["full", "identity", "oneway"])
def test_full_and_identity_masks_run_unmasked(monkeypatch, kind):
    """Exact rewrites from the cached mask facts: an all-True mask is full joint attention (no mask), the identity
    (block-diagonal) is per-image attention (sets of one); any other mask reaches the kernel as is. Inside a CUDA graph
    capture or a compile (no facts, stood in for by ``_can_sync`` = False) nothing is rewritten, even for a mask whose
    facts are cached: a replay must follow in-place edits of the mask."""
    from jedi_kernels import functional

    G = 3
    mask = {"full": torch.ones(G, G, dtype=torch.bool), "identity": torch.eye(G, dtype=torch.bool),
            "oneway": torch.zeros(G, G, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)}[kind]
    q, k, v = (torch.randn(2 * G, 9, 16) for _ in range(3))
    calls = []
    real = functional._sdpa_set_attention
    monkeypatch.setattr(functional, "_sdpa_set_attention",
                        lambda q, k, v, g, h, s, m: calls.append((g, m)) or real(q, k, v, g, h, s, m))
    out = jk.set_attention(q, k, v, G, 2, set_mask=mask, backend="torch")
    assert_close_verbose(out, set_attention_reference(q, k, v, G, 2, set_mask=mask), atol=1e-5, name=kind)
    g, m = calls[-1]
    expected = {"full": (G, None), "identity": (1, None), "oneway": (G, mask)}[kind]
    assert g == expected[0] and (m is None) == (expected[1] is None)
    monkeypatch.setattr(functional, "_can_sync", lambda t: False)
    assert functional._mask_facts(mask) is None
    out = jk.set_attention(q, k, v, G, 2, set_mask=mask, backend="torch")
    assert calls[-1][0] == G and calls[-1][1] is mask
    assert_close_verbose(out, set_attention_reference(q, k, v, G, 2, set_mask=mask), atol=1e-5, name=kind + " graph")
