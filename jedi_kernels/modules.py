"""Drop-in torch modules built on the fused kernels."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from jedi_kernels.functional import check_set_positions, set_attention, take_set_positions

__all__ = ["SetAttention", "DerivedWeights", "out_bias_foldable", "out_without_bias"]


def _tensors(value) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


def _version(p: torch.Tensor):
    try:
        return p._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _stamp(params) -> tuple:
    """What tells a parameter changed: its identity, storage address, in-place version, shape and dtype."""
    return tuple((id(p), p.data_ptr(), _version(p), tuple(p.shape), p.dtype) for p in params)


def _stamp_or_none(params: Callable):
    try:
        return _stamp(params())
    except Exception:  # noqa: BLE001 (a module the entry read is gone: changed)
        return None


class DerivedWeights:
    """Tensors computed from parameters only (a fused q/k/v weight, concatenated projections, folded kernels), made
    once per *frozen scope* instead of once per forward.

    Outside a scope :meth:`get` returns ``fn()`` (what the modules computed before: always current). Inside
    (``with derived.frozen():``, e.g. one sampling run, where no weight changes), the first ``get`` of a key stores
    ``fn()``'s tensors and later ones return them. Entering a scope recomputes every stored tensor into its own
    storage, so CUDA graphs captured inside an earlier scope read current values in the next one; :meth:`refresh`
    does the same on demand (``jedi.CUDAGraphRunner`` calls it before replaying such a graph outside any scope).
    Leaving a scope without an exception checks
    that no parameter a stored tensor came from changed inside it (RuntimeError: outputs computed after the change
    used the old values). A change through ``p.data`` (which has no version counter) escapes that check: do not
    modify weights inside a scope.

    Gradients, torch.compile tracing and autocast always get ``fn()``: the stored tensors hold no autograd history
    and the compiler folds what it can itself.
    """

    def __init__(self):
        self._entries: dict = {}  # key -> [fn, tensors (tuple), params fn, stamp, fn returns a tuple]
        self._depth = 0

    def __getstate__(self) -> dict:
        """A cache: pickling or deep-copying a model carries none of it (its entries hold functions)."""
        return {"_entries": {}, "_depth": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def active(self) -> bool:
        """Inside a frozen scope."""
        return self._depth > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key, fn: Callable, params: Callable):
        """``fn()`` (a tensor or a tuple of tensors computed from the tensors ``params()`` returns), stored for the
        scope when frozen. Both are called again on every refresh and check: let them read the modules' current
        attributes (a replaced layer is then seen), not tensors captured once."""
        # (is_compiling first: a traced forward must not read _depth, or the compiler would guard on it)
        if (torch.compiler.is_compiling() or self._depth == 0 or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn()
        entry = self._entries.get(key)
        if entry is None:
            value = fn()
            self._entries[key] = [fn, _tensors(value), params, _stamp(params()), isinstance(value, (tuple, list))]
            return value
        return tuple(entry[1]) if entry[4] else entry[1][0]

    def refresh(self) -> None:
        """Recompute every stored tensor in place (a new tensor only where its shape, dtype, layout or device
        changed, e.g. after ``.to()``: graphs captured before that need a reset anyway)."""
        with torch.no_grad():
            for key, entry in list(self._entries.items()):
                try:
                    fresh = _tensors(entry[0]())
                except Exception:  # noqa: BLE001 (its modules changed shape or kind: a forward makes a new entry)
                    del self._entries[key]
                    continue
                old = entry[1]
                if len(fresh) == len(old) and all(
                        f.shape == o.shape and f.dtype == o.dtype and f.device == o.device and f.stride() == o.stride()
                        for f, o in zip(fresh, old)):
                    for f, o in zip(fresh, old):
                        o.copy_(f)
                else:
                    entry[1] = fresh
                entry[3] = _stamp(entry[2]())

    def clear(self) -> None:
        """Drop every stored tensor (outside a scope)."""
        if self._depth:
            raise RuntimeError("DerivedWeights.clear() inside a frozen scope")
        self._entries.clear()

    @contextlib.contextmanager
    def frozen(self) -> Iterator["DerivedWeights"]:
        """The scope (re-entrant: only the outermost entry refreshes and the outermost exit checks)."""
        if self._depth == 0:
            self.refresh()
        self._depth += 1
        try:
            yield self
        except BaseException:  # the body's error goes on unmasked (no check)
            self._depth -= 1
            raise
        else:
            self._depth -= 1
            if self._depth == 0:
                changed = [k for k, e in self._entries.items() if _stamp_or_none(e[2]) != e[3]]
                if changed:
                    self.refresh()
                    raise RuntimeError(
                        f"parameters changed inside a frozen-weights scope ({len(changed)} derived tensors affected, "
                        f"e.g. {changed[0]!r}): outputs computed after the change used the old values. Change "
                        f"weights outside the scope (the stored tensors are refreshed now).")


def out_bias_foldable(to_out: nn.Module) -> bool:
    """An attention's out-projection (SD's ``to_out``: ``nn.Sequential(nn.Linear, nn.Dropout)``) whose bias a caller
    may add elsewhere (``forward(..., out_bias=False)``): a plain ``nn.Linear`` with a bias, then dropout that does
    nothing (p = 0 or eval mode), nothing else."""
    if not isinstance(to_out, nn.Sequential) or len(to_out) not in (1, 2):
        return False
    lin = to_out[0]
    if type(lin) is not nn.Linear or lin.bias is None:
        return False
    return len(to_out) == 1 or (type(to_out[1]) is nn.Dropout and (to_out[1].p == 0 or not to_out[1].training))


def out_without_bias(to_out: nn.Module):
    """``to_out`` as a function of o without its Linear's bias (see :func:`out_bias_foldable`)."""
    if not out_bias_foldable(to_out):
        raise ValueError("out_bias=False needs to_out = nn.Sequential(nn.Linear with a bias, nn.Dropout that does "
                         f"nothing); got {to_out!r}")
    weight = to_out[0].weight
    return lambda o: torch.nn.functional.linear(o, weight)


class SetAttention(nn.Module):
    """Joint self-attention over each set of images; a drop-in for Stable Diffusion's ``attn1``.

    Parameters carry SD's names (``to_q``, ``to_k``, ``to_v`` without bias, ``to_out.0`` Linear with bias), so LDM and
    diffusers state dicts load unchanged.

    Args:
        query_dim: C, channels of the tokens.
        heads: H.
        dim_head: D; inner dim is H*D.
        fuse_qkv: run the three projections as one GEMM (weights concatenated on the fly; state-dict names unchanged).
        backend: set_attention backend ("auto", "triton", "cuda", "torch").
    """

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, *, fuse_qkv: bool = False,
                 backend: str = "auto"):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        self.fuse_qkv, self.backend = fuse_qkv, backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    derived: DerivedWeights | None = None  # where fuse_qkv keeps its concatenated weight in a frozen scope

    def _proj_weights(self, name: str) -> tuple:
        return tuple(getattr(self, f"to_{c}").weight for c in name)

    def _fused_weight(self, name: str) -> torch.Tensor:
        """The weights of the projections ``name`` ("qkv" or "kv") concatenated: on every call, or once per scope
        with a frozen ``derived``."""
        if self.derived is None:
            return torch.cat(self._proj_weights(name), dim=0)
        return self.derived.get((name, id(self)), lambda: torch.cat(self._proj_weights(name), dim=0),
                                lambda: self._proj_weights(name))

    def forward(self, x: torch.Tensor, set_size: int, set_mask: torch.Tensor | None = None,
                q_positions=None, *, out_bias: bool = True) -> torch.Tensor:
        """x: (N, L, C) tokens, N = B * set_size. Returns (N, L, C).

        q_positions: optional positions of the images whose outputs are wanted (strictly increasing ints in
        [0, set_size)): their queries attend the keys and values of every image of their set, and the result is
        (B * K, L, C) for the K positions. Queries and the out-projection run on those images only (a model's last
        joint attention, when only some images' outputs are used); this runs on torch SDPA whatever ``backend`` is
        (see ``jedi_kernels.set_attention``).

        out_bias: False leaves ``to_out[0].bias`` out of the result (the caller adds it later, e.g. as the ``shift``
        of a fused ``add_layer_norm``, so the out-projection's GEMM runs without a bias epilogue). Only for a plain
        ``nn.Linear`` out-projection (a wrapped one, e.g. a LoRA layer, runs its own forward): ValueError otherwise.
        """
        if x.dim() != 3:
            raise ValueError(f"x must have shape (N, L, C), got {tuple(x.shape)}")
        out = self.to_out if out_bias else out_without_bias(self.to_out)
        if q_positions is not None and check_set_positions(q_positions, set_size) is not None:
            xq = take_set_positions(x, set_size, q_positions)
            q = self.to_q(xq)
            if self.fuse_qkv:
                w = self._fused_weight("kv")  # (2*H*D, C)
                k, v = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
            else:
                k, v = self.to_k(x), self.to_v(x)
            o = set_attention(q, k, v, set_size, self.heads, scale=self.scale, set_mask=set_mask, backend="torch",
                              q_positions=q_positions)
            return out(o)
        if self.fuse_qkv:
            w = self._fused_weight("qkv")  # (3*H*D, C)
            q, k, v = torch.nn.functional.linear(x, w).chunk(3, dim=-1)  # strided views of (N, L, 3*H*D)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        o = set_attention(q, k, v, set_size, self.heads, scale=self.scale, set_mask=set_mask, backend=self.backend)
        return out(o)
