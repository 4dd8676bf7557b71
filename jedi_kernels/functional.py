"""Public functional API: ``set_attention``, ``prepare_inputs``, ``sample_ng_mask``."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from jedi_kernels import dispatch
from jedi_kernels.backends import available_backends, cpu_ext_ok, cuda_ok, triton_ok
from jedi_kernels.ops import memory_format_of

__all__ = ["set_attention", "prepare_inputs", "sample_ng_mask", "group_norm", "geglu", "linear_geglu",
           "add_layer_norm", "upsample_conv2d", "residual_add", "take_set_positions", "check_set_positions"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _can_sync(t: torch.Tensor) -> bool:
    """Data-dependent checks need a device sync: skip them while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


# Facts about recently seen set_masks, so a model that passes the same mask to every attention layer pays for the
# data-dependent checks (a device->host copy, i.e. a sync) once, not once per layer. Keyed by tensor identity and its
# in-place version counter; weak references, a handful of entries.
_MASK_CACHE: list[tuple[weakref.ref, int, dict]] = []
_MASK_CACHE_SIZE = 8


def _mask_facts(set_mask: torch.Tensor) -> dict | None:
    """{"empty_rows": [...], "identity": bool, "full": bool} of a (G, G) bool mask, cached; None where a sync is not
    allowed: always while compiling (no Python-state lookups for dynamo to guard on) and while capturing a CUDA graph,
    even for a cached mask (a graph replays whatever a fact selected, but the mask may change in place between
    replays: CUDAGraphRunner's static buffers do)."""
    if not _can_sync(set_mask):
        return None
    for ref, version, facts in _MASK_CACHE:
        if ref() is set_mask and version == set_mask._version:
            return facts
    host = set_mask.detach().cpu()  # G*G bools: one small copy, the only sync
    G = host.shape[0]
    facts = {
        "empty_rows": (~host.any(dim=1)).nonzero().flatten().tolist(),
        "identity": bool(torch.equal(host, torch.eye(G, dtype=torch.bool))),
        "full": bool(host.all()),
        "moved": {},  # device -> copy of the mask there
    }
    _MASK_CACHE[:] = [e for e in _MASK_CACHE if e[0]() is not None][-(_MASK_CACHE_SIZE - 1):]
    _MASK_CACHE.append((weakref.ref(set_mask), set_mask._version, facts))
    return facts


def _check_set_mask(set_mask, set_size: int, device: torch.device) -> tuple[torch.Tensor | None, dict | None]:
    """Validate set_mask; returns (the mask on ``device`` or None, its cached facts or None)."""
    if set_mask is None:
        return None, None
    if not isinstance(set_mask, torch.Tensor):
        raise TypeError(f"set_mask must be a bool tensor of shape ({set_size}, {set_size}) or None, got {type(set_mask)}")
    if set_mask.dtype != torch.bool:
        raise TypeError(f"set_mask must have dtype torch.bool, got {set_mask.dtype}")
    if tuple(set_mask.shape) != (set_size, set_size):
        raise ValueError(
            f"set_mask must have shape (set_size, set_size) = ({set_size}, {set_size}), got {tuple(set_mask.shape)}"
        )
    facts = _mask_facts(set_mask)
    if facts is not None and facts["empty_rows"]:
        raise ValueError(f"set_mask rows {facts['empty_rows']} allow no image: every query image must attend at least "
                         f"one image")
    if set_mask.device == device:
        return set_mask, facts
    if facts is None or torch.compiler.is_compiling():
        return set_mask.to(device=device), facts
    moved = facts["moved"].get(device)
    if moved is None:
        moved = facts["moved"][device] = set_mask.to(device=device)
    return moved, facts


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must have ``ref``'s shape, dtype and device (ValueError, TypeError, ValueError naming both)."""
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    _check_dtype_device(name, t, ref_name, ref)


def _check_dtype_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must have ``ref``'s dtype (TypeError) and device (ValueError), whatever its shape."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_bias(bias, size: int, dim: str, x: torch.Tensor) -> None:
    """``bias`` None or a (size,) tensor of x's dtype on its device (``dim`` names the size in the message)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias)}")
    if bias.shape != (size,):
        raise ValueError(f"bias must have shape ({dim},) = ({size},), got {tuple(bias.shape)}")
    _check_dtype_device("bias", bias, "x", x)


def _check_rows(x: torch.Tensor, dim: str) -> int:
    """``x`` (a tensor) must be float16/bfloat16/float32/float64 of shape (..., dim) with dim > 0 (TypeError,
    ValueError); returns that last dim."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., {dim}) with {dim} > 0, got {tuple(x.shape)}")
    return x.shape[-1]


def _check_qkv_tensors(q, k, v) -> None:
    """q, k, v: 3-D float tensors (TypeError / ValueError naming the argument)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, L, heads*head_dim), got {type(t)}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (N, L, heads*head_dim) (3 dims), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_set_size_heads(set_size, heads) -> None:
    if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1:
        raise ValueError(f"set_size must be a positive int, got {set_size!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")


def _check_qkv(q, k, v, set_size, heads) -> tuple[int, int, int, int, int]:
    _check_qkv_tensors(q, k, v)
    for name, t in (("k", k), ("v", v)):
        _check_like(name, t, "q", q)
    _check_set_size_heads(set_size, heads)
    N, L, HD = q.shape
    if N == 0 or L == 0 or HD == 0:
        raise ValueError(f"q must be non-empty (N, L, heads*head_dim), got {tuple(q.shape)}")
    if N % set_size:
        raise ValueError(f"q.shape[0] = N = {N} must be a multiple of set_size = {set_size} (N = B * set_size)")
    if HD % heads:
        raise ValueError(f"q.shape[-1] = {HD} must be heads * head_dim with heads = {heads}")
    return N // set_size, set_size, L, heads, HD // heads


def check_set_positions(positions, set_size: int) -> tuple[int, ...] | None:
    """Validate image positions within a set of ``set_size`` images; returns them as a tuple, or None when they are
    every position (``range(set_size)``: nothing to select).

    Args:
        positions: a non-empty sequence of ints (tuple, list or range), strictly increasing, each in
            ``[0, set_size)``.
        set_size: G (int >= 1).

    Raises:
        TypeError: not a sequence of ints (a tensor, a bool, a str).
        ValueError: empty, out of range, repeated or not increasing.
    """
    if isinstance(positions, (str, bytes, torch.Tensor)) or not hasattr(positions, "__len__"):
        raise TypeError(f"positions must be a sequence of ints (tuple, list or range), got {type(positions)}")
    pos = tuple(positions)
    if any(isinstance(p, bool) or not isinstance(p, int) for p in pos):
        raise TypeError(f"positions must hold ints, got {pos!r}")
    if not pos:
        raise ValueError("positions must name at least one image of each set")
    if any(p < 0 or p >= set_size for p in pos) or any(a >= b for a, b in zip(pos, pos[1:])):
        raise ValueError(f"positions must be strictly increasing ints in [0, set_size = {set_size}), got {pos!r}")
    return None if len(pos) == set_size else pos


def take_set_positions(t: torch.Tensor, set_size: int, positions) -> torch.Tensor:
    """The images at ``positions`` of every set: ``t`` (B*G, ...) -> (B*K, ...), set-major like ``t``.

    The result is a new dense tensor in ``t``'s memory format (a channels-last 4-D input gives a channels-last
    output), so convolutions and GEMMs downstream see the layout they would have seen; it is differentiable. No index
    tensor is built, so it runs inside a CUDA graph capture and under torch.compile.

    Args:
        t: (N, ...) with N = B * set_size, any dtype and device.
        set_size: G.
        positions: K positions within a set, strictly increasing in [0, G) (see :func:`check_set_positions`).

    Returns:
        (B * K, ...) tensor.

    Raises:
        ValueError: N not a multiple of set_size, or bad positions (TypeError for a non-sequence).
    """
    if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1:
        raise ValueError(f"set_size must be a positive int, got {set_size!r}")
    if t.dim() == 0 or t.shape[0] % set_size:
        raise ValueError(f"t.shape[0] must be a multiple of set_size = {set_size}, got shape {tuple(t.shape)}")
    pos = check_set_positions(positions, set_size)
    if pos is None:
        return t
    B, G, K, rest = t.shape[0] // set_size, set_size, len(pos), t.shape[1:]
    src = t.view(B, G, *rest)
    fmt = torch.channels_last if (t.dim() == 4 and not t.is_contiguous()
                                  and t.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    out = torch.empty((B * K, *rest), dtype=t.dtype, device=t.device, memory_format=fmt)
    dst = out.view(B, K, *rest)
    if pos[-1] - pos[0] == K - 1:  # consecutive (the usual case: the targets after the references): one copy
        dst.copy_(src[:, pos[0]:pos[0] + K])
    else:
        for j, p in enumerate(pos):
            dst[:, j].copy_(src[:, p])
    return out


def _set_attention_query_subset(q, k, v, set_size, heads, positions, scale, set_mask, backend):
    """``set_attention`` with queries of some positions only: torch SDPA on (B, H, K*L, D) queries against the
    (B, H, G*L, D) keys of each set; a set_mask keeps the rows of those positions (a dense (K*L, G*L) token mask).
    ``backend="auto"`` means SDPA here whatever ``JEDI_BACKEND`` says (the override names a kernel for the plain
    call, which this is not)."""
    _check_qkv_tensors(q, k, v)
    _check_like("v", v, "k", k)
    _check_dtype_device("q", q, "k", k)
    _check_set_size_heads(set_size, heads)
    pos = check_set_positions(positions, set_size)
    if pos is None:  # every position: the plain call
        return set_attention(q, k, v, set_size, heads, scale=scale, set_mask=set_mask, backend=backend)
    N, L, HD = k.shape
    if N == 0 or L == 0 or HD == 0 or N % set_size or HD % heads:
        raise ValueError(f"k must be (B*set_size, L, heads*head_dim), non-empty, with set_size = {set_size} and "
                         f"heads = {heads}; got {tuple(k.shape)}")
    B, G, K, H, D = N // set_size, set_size, len(pos), heads, HD // heads
    if tuple(q.shape) != (B * K, L, HD):
        raise ValueError(f"with q_positions of {K} image(s) per set, q must have shape (B*{K}, L, heads*head_dim) = "
                         f"{(B * K, L, HD)}, got {tuple(q.shape)}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    if backend in ("triton", "cuda"):
        raise ValueError(f"q_positions runs on backend 'torch' (SDPA) only: the {backend} kernels take one query "
                         f"image per key image; pass backend='auto' or 'torch'")
    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale)}")
    set_mask, _ = _check_set_mask(set_mask, G, q.device)
    return _sdpa_set_attention(q, k, v, G, H, float(scale), set_mask, pos)


def _sdpa_set_attention(q, k, v, set_size, heads, scale, set_mask, positions=None):
    """Backend "torch": torch SDPA on a (B, H, G*L, D) view, a set_mask as a dense (G*L, G*L) token mask. With
    ``positions`` (K of them) q holds only those images of each set: (B, H, K*L, D) queries, the mask's rows of
    those positions ((K*L, G*L))."""
    N, L, HD = k.shape
    G, H = set_size, heads
    D = HD // H
    B = N // G

    def heads_first(x):
        # (B*n, L, H*D) -> (B, n*L, H, D) -> (B, H, n*L, D)
        return x.reshape(B, -1, H, D).transpose(1, 2)

    attn_mask = None
    if set_mask is not None:
        rows = set_mask if positions is None else torch.stack([set_mask[p] for p in positions])  # no index tensor
        # (G, G) -> (G*L, G*L) token mask; dense, but only on this fallback path
        attn_mask = rows.repeat_interleave(L, 0).repeat_interleave(L, 1)
    o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=attn_mask, scale=scale)
    # (B, H, n*L, D) -> (B, n*L, H, D) -> (B*n, L, H*D)
    return o.transpose(1, 2).reshape(q.shape[0], L, HD)


def set_attention(q, k, v, set_size, heads, *, scale=None, set_mask=None, backend="auto", q_positions=None):
    """Set-wise (joint) self-attention over all images of each set, read from the projection layout.

    Each set of ``set_size`` consecutive images attends jointly: queries of every image see the keys of every image
    of its set (``softmax(q k^T * scale) v`` over ``set_size * L`` keys), which is JeDi's joint self-attention.

    Args:
        q, k, v: (N, L, heads*head_dim), N = B * set_size; float16/bfloat16 (GPU kernels), float32/float64; same
            shape, dtype and device. Any strides (views of one fused qkv projection work); a non-unit last-dim
            stride is copied once.
        set_size: G, number of images per set (int >= 1).
        heads: H, number of attention heads (int >= 1, divides the last dim).
        scale: softmax scale (float), default head_dim ** -0.5.
        set_mask: optional bool (G, G); ``set_mask[i, j]`` = queries of image i may attend keys of image j. None means
            full joint attention. Every row must allow at least one image.
        backend: "auto" (fastest correct backend for device/dtype/shape; ``JEDI_BACKEND`` overrides),
            "triton", "cuda" or "torch" (torch SDPA). Kernel variants from the environment:
            ``JEDI_TRITON_AUTOTUNE=0`` (read at import: Triton runs its default configs only), and, read per call,
            ``JEDI_ATTN_ROWSUM=dot|fadd`` (Triton forward row sums),
            ``JEDI_TRITON_FWD_GLUON=1|2|3|4|5|6`` (Triton forward at head dims <= 128 on compute capability 9.0: the
            Gluon Hopper kernel, warpgroup MMAs with the softmax overlapping the P V product; correct on the H200,
            not faster than the default there; 6 untimed),
            ``JEDI_TRITON_FWD_WS=1`` (Triton forward at head dims <= 64 on sm_90: TMA loads, warp-specialized;
            experimental: its first GPU tests did not finish, see tools/ws_probe.py),
            ``JEDI_TRITON_BWD_DQ=atomic|kernel`` (Triton backward: dQ by a second kernel, the default since the H100
            measured it faster, or by float32 atomics from the dK/dV kernel; deterministic mode always takes the
            kernel), ``JEDI_TRITON_BWD_GLUON=1|2`` (Triton backward at head dims <= 80 / 64 on compute capability
            9.0: one Gluon Hopper kernel for dK, dV and dQ by float32 atomics; not in deterministic mode; slower
            than the default on the H200), ``JEDI_CUDA_FWD_ROW_BLOCKS=1|2`` (CUDA forward: 16 or 32 query rows
            per warp; 32 by default at head dims <= 80, and at 160 for sets of more than 1024 keys on compute
            capability >= 9.0),
            ``JEDI_CUDA_FWD_STAGES=1|2`` (CUDA forward at head dims <= 80: FlashAttention-2's loop, the default, or
            the software-pipelined one that computes the next key tile's scores during this tile's softmax),
            ``JEDI_CUDA_FWD_WGMMA=0..5`` (CUDA forward at head dims 40, 80 and 160 on compute capability 9.0: the
            Hopper kernel's variant, warpgroup MMAs with the softmax overlapping the P V product, keys per tile x
            warpgroups per CTA 64x2, 128x2, 128x3, 128x1, 64x1 (at 80: 1, 2 and 5; at 160: 1); unset: variant 1 at
            head dim 40, 1.10-1.15x faster than the mma.sync kernel on the H200, unless one of the two switches above
            asks for an mma.sync instance, and the mma.sync kernel at 80 and 160 (their Hopper instances, variants 1-2
            at 80 and 1 at 160, are untimed); 0: the mma.sync kernel; other devices and head dims always run the
            mma.sync kernels),
            ``JEDI_CUDA_FWD_SPLITS=0..8`` (CUDA forward, FlashAttention-2's split-KV: 0, the keys of each query
            tile are split over several CTAs, with float32 partial results merged by a second kernel, only where the
            grid fills less than 80 % of one wave; unset or 1: never, the default, since the automatic count lost on
            every shape it splits on the H200; S: S splits; the one-stage mma.sync kernel with its default rows per
            warp only, not the Hopper one),
            ``JEDI_CUDA_BWD_KEY_BLOCKS=1|2`` (CUDA backward: 16 or 32 keys per warp) and ``JEDI_CUDA_BWD_WARPS=4|8``
            (CUDA backward at head dims 72-80: 64 or 128 keys per CTA; 128, the default, timed faster; at 136-160:
            4 warps, the default, or 8 on the same 64 keys, two per 16 keys on alternate query passes, untimed),
            ``JEDI_CUDA_BWD_SPLIT=1`` (CUDA backward split in two kernels: dK/dV without the dQ step, then dQ over
            the query tiles, no float32 atomics and no dQ workspace; opt-in, untimed).
        q_positions: optional positions (strictly increasing ints in [0, set_size)) of the images whose queries q
            holds: q is then (B*K, L, heads*head_dim), the K images at those positions of each set, while k and v
            hold every image (N, L, heads*head_dim); the result is those K images' outputs. For a model that needs
            only some images' outputs after its last joint attention (JeDi's sampler: the targets, not the
            references). Runs on torch SDPA (backend "auto" or "torch"; "triton" and "cuda" raise). None (or every
            position): the plain call.

    Returns:
        (N, L, heads*head_dim) tensor in q's dtype, contiguous, ready for the out-projection ((B*K, L,
        heads*head_dim) with q_positions). Differentiable w.r.t. q, k and v on every backend.

    Raises:
        TypeError: non-tensor inputs, non-float or mismatched dtypes, non-bool set_mask.
        ValueError: wrong ranks/shapes, N not divisible by set_size, heads not dividing the last dim, empty inputs,
            mismatched devices, bad set_mask shape or a set_mask row allowing nothing, unknown or unavailable backend,
            a head_dim the backend does not support.
    (TypeError also for backend="cuda" with float32/float64 inputs: the CUDA kernels are fp16/bf16 only.)
    """
    if q_positions is not None:
        return _set_attention_query_subset(q, k, v, set_size, heads, q_positions, scale, set_mask, backend)
    B, G, L, H, D = _check_qkv(q, k, v, set_size, heads)
    if scale is None:
        scale = D**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale)}")
    scale = float(scale)
    set_mask, facts = _check_set_mask(set_mask, G, q.device)
    if set_mask is not None and facts is not None:
        # exact rewrites of two common masks (known from the cached facts, i.e. eagerly, never inside a graph):
        # all True is full joint attention; the identity (block-diagonal) is per-image attention, sets of one image
        if facts["full"]:
            set_mask = None
        elif facts["identity"]:
            G, set_mask = 1, None
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = dispatch.env_backend() or "auto"
    if backend == "auto":
        backend = dispatch.choose_set_attention_backend(q, heads, set_mask is not None)
    if backend == "torch":
        return _sdpa_set_attention(q, k, v, G, H, scale, set_mask)
    if backend == "triton" and not triton_ok(q.device):
        raise ValueError(
            f"backend='triton' cannot run on {q.device}: {available_backends()['reasons'].get('triton', 'needs a CUDA device')}"
        )
    if backend == "cuda":  # what the C++ glue would reject, named here (its TORCH_CHECKs are the second line)
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"backend='cuda' needs q, k, v in float16 or bfloat16, got {q.dtype}")
        if D % 8 or not 8 <= D <= 256:
            raise ValueError(f"backend='cuda' supports head_dim = q.shape[-1] / heads a multiple of 8 in [8, 256], "
                             f"got {D}")
    if backend == "cuda" and not cuda_ok(q.device, attention=True):
        reasons = available_backends()["reasons"]
        reason = reasons.get("cuda", reasons.get("cuda_attention", "q is not on a CUDA device"))
        raise ValueError(f"backend='cuda' is unavailable: {reason}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    from jedi_kernels.ops.set_attention import set_attention_op

    return set_attention_op(q, k, v, G, H, scale, set_mask, backend)


def prepare_inputs(x_t, x0, ng_mask, *, backend="auto"):
    """JeDi's UNet input in one fused pass: ``cat(x_t, x0 * (1 - m), m)``, m = ng_mask broadcast over (H, W).

    Reference images (m = 0) keep their clean content in the middle channels; images to generate (m = 1) get zeros.

    Args:
        x_t: (N, C, H, W) noisy latents, float16/bfloat16/float32/float64, contiguous or channels-last.
        x0: (N, C, H, W) clean latents, same dtype and device as x_t.
        ng_mask: (N,) bool or float {0, 1}: 1 = image to generate, 0 = reference.
        backend: "auto" (CUDA kernel, else Triton on GPU; CPU C++ kernel on CPU; else torch), "cuda", "triton",
            "cpu" or "torch".

    Returns:
        (N, 2C+1, H, W) in x_t's dtype, in x_t's memory format (channels-last in, channels-last out).
        Differentiable w.r.t. x_t and x0 (not ng_mask).

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes, bad ng_mask dtype.
        ValueError: wrong shapes, mismatched devices, empty tensors, unknown or unavailable backend.
    """
    for name, t in (("x_t", x_t), ("x0", x0), ("ng_mask", ng_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t)}")
    if x_t.dim() != 4:
        raise ValueError(f"x_t must have shape (N, C, H, W), got {tuple(x_t.shape)}")
    if x_t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x_t must be a float tensor, got {x_t.dtype}")
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 must have x_t's shape {tuple(x_t.shape)}, got {tuple(x0.shape)}")
    if x0.dtype != x_t.dtype:
        raise TypeError(f"x0 must have x_t's dtype {x_t.dtype}, got {x0.dtype}")
    N = x_t.shape[0]
    if ng_mask.shape != (N,):
        raise ValueError(f"ng_mask must have shape (N,) = ({N},), got {tuple(ng_mask.shape)}")
    if ng_mask.dtype != torch.bool and not ng_mask.dtype.is_floating_point:
        raise TypeError(f"ng_mask must be bool or float (0/1), got {ng_mask.dtype}")
    for name, t in (("x0", x0), ("ng_mask", ng_mask)):
        if t.device != x_t.device:
            raise ValueError(f"{name} must be on x_t's device {x_t.device}, got {t.device}")
    if x_t.numel() == 0:
        raise ValueError(f"x_t must be non-empty, got shape {tuple(x_t.shape)}")
    choices = ("auto", "cuda", "triton", "cpu", "torch")
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        backend = dispatch.choose_prepare_backend(x_t)
    if backend == "cuda" and not cuda_ok(x_t.device):
        reason = available_backends()["reasons"].get("cuda", "x_t is not on a CUDA device")
        raise ValueError(f"backend='cuda' is unavailable: {reason}")
    if backend == "cpu" and not cpu_ext_ok(x_t.device):
        reason = available_backends()["reasons"].get("cpu_ext", "x_t is not on the CPU")
        raise ValueError(f"backend='cpu' is unavailable: {reason}")
    if backend == "triton" and not triton_ok(x_t.device):
        reason = available_backends()["reasons"].get("triton", "needs a CUDA device")
        raise ValueError(f"backend='triton' cannot run on {x_t.device}: {reason}")
    # the mask travels as x_t's dtype: one code path per kernel, exact for {0, 1}
    m = ng_mask.to(x_t.dtype)
    if backend in ("cpu", "cuda") and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x_t.requires_grad or x0.requires_grad)
    ):
        # eager inference: the compiled kernel straight through the C++ dispatcher (the Python custom-op layer costs
        # ~20 us a call, more than the kernel at typical latent sizes); same kernel, same result
        return torch.ops.jedi.prepare_inputs_ext(x_t, x0, m)
    from jedi_kernels.ops.prepare_inputs import prepare_inputs_op

    return prepare_inputs_op(x_t, x0, m, backend)


def _check_affine_eps(x: torch.Tensor, C: int, weight, bias, eps, *, same_dtype: bool,
                      names: tuple[str, str] = ("weight", "bias")) -> None:
    """The norms' shared checks: weight and bias (or the two vectors ``names`` calls so) None or (C,) float tensors on
    x's device (in x's dtype when ``same_dtype``), eps a non-negative number."""
    for name, t in zip(names, (weight, bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or (same_dtype and t.dtype != x.dtype):
            want = f"a tensor of x's dtype {x.dtype}" if same_dtype else f"a float tensor of shape (C,) = ({C},)"
            got = t.dtype if isinstance(t, torch.Tensor) else type(t)
            raise TypeError(f"{name} must be {want} or None, got {got}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must have shape (C,) = ({C},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _elementwise_backend(backend: str, x: torch.Tensor) -> str:
    """Resolve the backend of the fused elementwise/normalization ops (group_norm, geglu, add_layer_norm)."""
    choices = ("auto", "triton", "torch")
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        return dispatch.choose_fused_backend(x)
    if backend == "triton" and not triton_ok(x.device):
        reason = available_backends()["reasons"].get("triton", "needs a CUDA device")
        raise ValueError(f"backend='triton' cannot run on {x.device}: {reason}")
    return backend


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=False, shift=None, concat=None,
               backend="auto"):
    """GroupNorm, optionally fused with the SiLU that follows it in SD's ResBlocks, in two passes over x.

    Normalization math is float32 for half inputs (LDM's GroupNorm32) and the result is rounded once; a channels-last
    input is read and written channels-last (the Triton kernel splits each group's reduction over many programs, so
    N * num_groups groups still fill the GPU).

    Args:
        x: (N, C, H, W) float16/bfloat16/float32/float64, contiguous or channels-last; C divisible by num_groups.
        num_groups: G_n, number of channel groups (32 in SD).
        weight, bias: optional (C,) float tensors on x's device (any float dtype; used in float32).
        eps: variance epsilon (SD: 1e-5 in ResBlocks, 1e-6 in SpatialTransformer).
        silu: apply ``y * sigmoid(y)`` to the normalized, affine output.
        shift: optional (N, C) float tensor on x's device, added to x before the norm (broadcast over H, W; in the
            math dtype, unrounded): ``group_norm(x + shift[:, :, None, None])`` without materializing the sum. A
            ResBlock's time embedding (+ its first conv's bias) goes here. No extra pass and no per-element work
            (it moves each channel's mean).
        concat: optional (N, C2, H, W) tensor of x's dtype on its device: normalize ``cat([x, concat], dim=1)``
            (C = C1 + C2 channels; weight, bias and shift are then (C,) / (N, C)) without writing the
            concatenation: the Triton kernels read both inputs in place in inference (no autograd, not compiling;
            SD's decoder ResBlocks normalize the skip concatenation), other calls concatenate first.
        backend: "auto" (Triton on CUDA, see ``dispatch.choose_fused_backend``; torch elsewhere), "triton" or
            "torch" (``reference.group_norm_reference``).

    Returns:
        (N, C, H, W) in x's dtype and memory format (C = C1 + C2 with ``concat``). Differentiable w.r.t. x, weight,
        bias, shift and concat.

    Raises:
        TypeError: non-tensor or non-float x / weight / bias / shift.
        ValueError: wrong shapes, C not divisible by num_groups, mismatched devices, empty x, bad backend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x)}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if concat is not None:
        if not isinstance(concat, torch.Tensor):
            raise TypeError(f"concat must be a torch.Tensor of shape (N, C2, H, W) or None, got {type(concat)}")
        if concat.dim() != 4 or concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
            raise ValueError(f"concat must have shape (N, C2, H, W) = ({x.shape[0]}, C2, {x.shape[2]}, "
                             f"{x.shape[3]}), got {tuple(concat.shape)}")
        _check_dtype_device("concat", concat, "x", x)
        C += concat.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing C = {C}, got {num_groups!r}")
    _check_affine_eps(x, C, weight, bias, eps, same_dtype=False)
    if shift is not None:
        if not isinstance(shift, torch.Tensor) or shift.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"shift must be a float tensor of shape (N, C), got "
                            f"{shift.dtype if isinstance(shift, torch.Tensor) else type(shift)}")
        if tuple(shift.shape) != (x.shape[0], C):
            raise ValueError(f"shift must have shape (N, C) = {(x.shape[0], C)}, got {tuple(shift.shape)}")
        if shift.device != x.device:
            raise ValueError(f"shift is on {shift.device}, x on {x.device}")
    backend = _elementwise_backend(backend, x)
    from jedi_kernels.ops import group_norm as ops

    # eager calls skip the custom op's dispatch layers (~15-50 us a call, x 61 norms per UNet step): group_norm_op
    return ops.group_norm_op(x, num_groups, weight, bias, float(eps), bool(silu), backend, shift, concat)


def geglu(h, *, backend="auto"):
    """SD's GEGLU activation in one pass: ``a * gelu(g)`` with ``[a, g] = h.chunk(2, -1)`` (exact erf gelu).

    Reads the (…, 2F) output of the feed-forward's ``proj`` Linear once and writes (…, F) once, instead of a chunk,
    a gelu and a multiply (three passes).

    Args:
        h: (..., 2F) float16/bfloat16/float32/float64 with unit last-dim stride; the first F features are the values,
            the last F the gates.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch" (``reference.geglu_reference``).

    Returns:
        (..., F) contiguous in h's dtype, differentiable w.r.t. h. Triton: math in float32 (float64 for float64),
        rounded once. torch: the reference's three ops, each in h's dtype (as an unfused model computes it).

    Raises:
        TypeError: non-tensor or non-float h.
        ValueError: h without dims, an odd or zero last dim, bad backend.
    """
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor of shape (..., 2F), got {type(h)}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if h.dim() == 0 or h.shape[-1] == 0 or h.shape[-1] % 2:
        raise ValueError(f"h must have shape (..., 2F) with an even, non-zero last dim, got {tuple(h.shape)}")
    backend = _elementwise_backend(backend, h)
    from jedi_kernels.ops import geglu as ops

    return ops.geglu_op(h, backend)  # eager calls skip the custom op's dispatch layers, as group_norm


def linear_geglu(x, weight, bias=None, *, backend="auto"):
    """SD's feed-forward input projection and GEGLU in one kernel: ``a * gelu(g)`` with ``[a, g] = x Wᵀ + b``.

    ``geglu(F.linear(x, weight, bias))`` without the (…, 2F) projection ever reaching memory: the Triton kernel keeps
    the value and gate tiles in its float32 accumulators, adds the bias, applies the exact (erf) gelu and writes the
    (…, F) output once. For inference: a call that records autograd (grad mode on and an input requiring grad) runs
    ``F.linear`` and :func:`geglu` instead, which are differentiable.

    Args:
        x: (..., K) float16/bfloat16/float32 tokens (float64 too on backend "torch" or when recording autograd; any
            leading strides, unit last-dim stride avoids a copy).
        weight: (2F, K) in x's dtype and on its device: the ``proj`` weight of SD's GEGLU (values first, then gates).
        bias: (2F,) in x's dtype and on its device, or None.
        backend: "auto" (today always "torch": the fused kernel becomes the default where a GPU run measures it faster
            than cuBLAS + :func:`geglu`; see benchmarks/README.md), "triton" or "torch"
            (``reference.linear_geglu_reference``).

    Returns:
        (..., F) contiguous in x's dtype. Triton: float32 accumulation and math, rounded once. torch: the projection
        rounded to x's dtype, then the activation in x's dtype (as an unfused model computes it).

    Raises:
        TypeError: non-tensor inputs, a dtype other than float16/bfloat16/float32/float64 (float64 without autograd
            on backend "torch" only), mismatched dtypes.
        ValueError: bad shapes, devices or backend.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x)} and {type(weight)}")
    K = _check_rows(x, "K")
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] == 0 or weight.shape[0] % 2:
        raise ValueError(f"weight must have shape (2F, K) = (2F, {K}) with an even, non-zero 2F, got "
                         f"{tuple(weight.shape)}")
    _check_dtype_device("weight", weight, "x", x)
    _check_bias(bias, weight.shape[0], "2F", x)
    # the fused ops' backend checks; "auto" is "torch" here until a GPU run measures the kernel faster
    backend = _elementwise_backend("torch" if backend == "auto" else backend, x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return geglu(F.linear(x, weight, bias), backend=backend)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("backend='triton' of linear_geglu takes float16, bfloat16 or float32 (float64 runs on "
                        "backend='torch')")
    from jedi_kernels.ops import linear_geglu as ops

    return ops.linear_geglu_op(x, weight, bias, backend)


def upsample_conv2d(x, weight, bias=None, *, folded_weight=None, backend="auto"):
    """SD's ``Upsample``: nearest 2x upsampling, then a 3x3 convolution with padding 1, as a sub-pixel convolution.

    The upsampled input is never made: its 3x3 taps that read the same input pixel are summed into four 2x2 kernels
    (one per output phase), which run as ONE convolution of x with 4 * C_out output channels (0.44x the FLOPs), and
    one pass interleaves the phases into the (2H, 2W) output and adds the bias (see
    :mod:`jedi_kernels.ops.upsample_conv`). Same sums, rounded in another order: each folded weight is a sum of up to
    four taps, rounded once to the weight's dtype.

    Args:
        x: (N, C_in, H, W) float16/bfloat16/float32/float64, any layout (channels-last stays channels-last).
        weight: (C_out, C_in, 3, 3) in x's dtype and on its device (an ``nn.Conv2d(C_in, C_out, 3, padding=1)``
            weight).
        bias: (C_out,) in x's dtype and on its device, or None.
        folded_weight: optional ``jedi_kernels.ops.upsample_conv.fold_weight(weight, memory format of x)``, computed
            once by a caller whose weight does not change (e.g. ``JeDiUNet.frozen_weights``); None folds on every
            call. The conv then reads it, not ``weight``: gradients reach ``weight`` only through it.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" (the sub-pixel convolution, its interleave in
            Triton) or "torch" (``reference.upsample_conv2d_reference``: interpolate, then conv2d; ignores
            ``folded_weight``).

    Returns:
        (N, C_out, 2H, 2W) in x's dtype and memory format; differentiable w.r.t. x, weight and bias.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes.
        ValueError: bad shapes, devices or backend.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x)} and {type(weight)}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (N, C_in, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    c_in = x.shape[1]
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3) or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (C_out, C_in, 3, 3) = (C_out, {c_in}, 3, 3), got "
                         f"{tuple(weight.shape)}")
    _check_dtype_device("weight", weight, "x", x)
    _check_bias(bias, weight.shape[0], "C_out", x)
    backend = _elementwise_backend(backend, x)
    if backend == "torch":
        from jedi_kernels.reference import upsample_conv2d_reference

        return upsample_conv2d_reference(x, weight, bias)
    from jedi_kernels.ops import upsample_conv as ops

    fmt = memory_format_of(x)
    if folded_weight is None:
        folded_weight = ops.fold_weight(weight, fmt)
    elif (not isinstance(folded_weight, torch.Tensor) or folded_weight.shape != (4 * weight.shape[0], c_in, 2, 2)
          or folded_weight.dtype != x.dtype or folded_weight.device != x.device):
        raise ValueError(f"folded_weight must be fold_weight(weight): a ({4 * weight.shape[0]}, {c_in}, 2, 2) tensor "
                         f"of x's dtype on its device, got "
                         f"{tuple(folded_weight.shape) if isinstance(folded_weight, torch.Tensor) else type(folded_weight)}")
    z = F.conv2d(x.contiguous(memory_format=fmt), folded_weight, None, padding=1)
    return ops.upsample_interleave_op(z, bias, backend)


def residual_add(x, residual, bias=None, *, backend="auto"):
    """``x + residual + bias[None, :, None, None]`` in one pass over (N, C, H, W) activations.

    SD's ResBlocks end in ``skip(x) + conv2(h)`` and its SpatialTransformers in ``x + proj_out(t)``: torch adds a
    cuDNN convolution's bias in a pass of its own, and cuBLASLt's bias epilogue can make a GEMM slower than without
    one. Run the conv / GEMM without its bias and hand the bias to this add instead.

    Args:
        x: (N, C, H, W) float16/bfloat16/float32/float64, any strides.
        residual: x's shape, dtype and device, any strides.
        bias: (C,) in x's dtype and on its device, or None.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" (one pass, float32 math rounded once) or
            "torch" (``reference.residual_add_reference``: two adds, each rounded).

    Returns:
        (N, C, H, W) in x's dtype and memory format (channels-last stays channels-last; other strides give NCHW);
        differentiable w.r.t. x, residual and bias.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes.
        ValueError: bad shapes, devices or backend.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(residual, torch.Tensor):
        raise TypeError(f"x and residual must be torch.Tensors, got {type(x)} and {type(residual)}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_dtype_device("residual", residual, "x", x)
    _check_bias(bias, x.shape[1], "C", x)
    backend = _elementwise_backend(backend, x)
    from jedi_kernels.ops import residual_add as ops

    return ops.residual_add_op(x, residual, bias, backend)


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, *, shift=None, sum_shift=None,
                   backend="auto"):
    """A residual add and the LayerNorm of its result in one pass: ``s = x + residual; n = layer_norm(s)``.

    SD's transformer blocks add each sub-layer's output to the tokens and normalize the sum for the next sub-layer;
    unfused that is an add (read two, write one) and a norm (read the sum again, write one).

    Args:
        x: (..., C) float16/bfloat16/float32/float64 tokens (any leading strides, unit last-dim stride preferred).
        residual: x's shape, dtype and device, or None: then a plain LayerNorm of x (s is x itself).
        weight, bias: optional (C,) LayerNorm affine parameters, x's dtype and device.
        eps: variance epsilon (>= 0).
        shift: optional (C,) vector in x's dtype, added to the sum before the norm: the bias of the layer that made
            ``residual``, which can then run without one (``t = x + residual + shift``).
        sum_shift: optional (C,) vector in x's dtype, added to the returned sum only, after the norm has read it: the
            bias of a later layer whose output will be added to the sum (``s = t + sum_shift``, ``n =
            layer_norm(t)``).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"
            (``reference.add_layer_norm_reference``: the adds and ``F.layer_norm``).

    Returns:
        (s, n), each x's shape and dtype, contiguous (s is x itself when residual, shift and sum_shift are None).
        t rounds the sum to x's dtype as torch's add does (x + residual + shift rounded once); n is computed from
        that t in float32 (float64 for float64 inputs) and rounded once, as torch's LayerNorm; s = t + sum_shift
        rounded once more. Differentiable w.r.t. x, residual, weight, bias, shift and sum_shift.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes.
        ValueError: x without dims, an empty last dim or one over 16384 on backend "triton", mismatched shapes or
            devices, a shift or sum_shift not of shape (C,), a negative eps, bad backend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., C), got {type(x)}")
    C = _check_rows(x, "C")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual)}")
        _check_like("residual", residual, "x", x)
    _check_affine_eps(x, C, weight, bias, eps, same_dtype=True)
    _check_affine_eps(x, C, shift, sum_shift, eps, same_dtype=True, names=("shift", "sum_shift"))
    backend = _elementwise_backend(backend, x)
    from jedi_kernels.ops import layer_norm as ops

    if backend == "triton" and C > ops.MAX_C:
        raise ValueError(f"backend='triton' normalizes rows of at most {ops.MAX_C} elements, got C = {C}; use "
                         f"backend='torch'")
    s, n = ops.add_layer_norm_op(x, residual, weight, bias, float(eps), backend, shift, sum_shift)
    return (x if residual is None and shift is None and sum_shift is None else s), n


def sample_ng_mask(n: int, set_size: int, generator: torch.Generator | None = None, *, p: float = 0.5,
                   device=None) -> torch.Tensor:
    """JeDi's training rule for which images of a set to generate: each image is masked with probability ``p``.

    Args:
        n: N, total images (B * set_size).
        set_size: G; n must be a multiple of it.
        generator: optional torch.Generator for reproducibility (its device is used when ``device`` is None).
        p: masking probability (default 0.5, the seed's rule).
        device: output device (default: the generator's, else CPU).

    Returns:
        (n,) bool tensor, True = image to generate (mask 1).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(set_size, bool) or not isinstance(set_size, int) or set_size < 1 or n % set_size:
        raise ValueError(f"set_size must be a positive int dividing n = {n}, got {set_size!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device) < p
