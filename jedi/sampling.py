"""Samplers for SD v1's discrete schedule and JeDi personalization (inpainting of image sets with image guidance).

Two solvers share one signature (k-diffusion style)::

    x = sample_ddim(model_fn, x, schedule, timesteps, eta=0.0, generator=g)     # model_fn(x_t, t) -> eps
    x = sample_dpmpp_2m(model_fn, x, schedule, timesteps, generator=g)

``timesteps`` is a descending sequence of training timesteps (``uniform_timesteps(50)`` for CompVis' DDIM spacing);
the last step always lands on the clean image (abar = 1), so an exact eps model recovers x0 exactly.

:func:`personalize` runs JeDi personalization: each set holds R given references (mask 0, x0 = their latents) and K
images to generate (mask 1, x0 = 0). At every step the references' x_t is re-noised from their clean latents with
noise drawn once per run, all guidance branches of all sets go through ONE UNet call, and the branches are combined
with the seed's image guidance (:func:`guided_eps`).

Dimension letters: B sets, R references per set, K images to generate per set, G = R + K, C latent channels.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from jedi.schedule import NoiseSchedule

__all__ = ["uniform_timesteps", "sample_ddim", "sample_dpmpp_2m", "SAMPLERS", "guided_eps", "STRATEGIES",
           "guidance_branches", "personalize"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- timesteps ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _default_schedule() -> NoiseSchedule:
    """SD v1's schedule for the calls that pass none, one shared object (never modified here): its device copy
    (``NoiseSchedule.alphas_cumprod_on``) is then made once per process, not once per call (a pageable host-to-device
    copy, which waits for the GPU: one of the two syncs per ``personalize`` call the H200 showed, 2026-11-28)."""
    return NoiseSchedule.scaled_linear()


def uniform_timesteps(steps: int, num_train_steps: int = 1000) -> list[int]:
    """CompVis DDIM "uniform" spacing (ldm ``make_ddim_timesteps``): ``arange(0, T, T // steps) + 1``, descending.

    As in LDM, ``steps`` that do not divide T give a few more timesteps (steps=7 gives 8); an entry equal to T (which
    LDM would index out of range, e.g. steps=3) is dropped.

    Args:
        steps: requested number of sampling steps, 1 <= steps <= T.
        num_train_steps: T of the training schedule (1000 for SD).

    Returns:
        Descending list of int timesteps in [1, T) (SD, 50 steps: 981, 961, ..., 1).

    Raises:
        ValueError: steps outside [1, T].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be an int in [1, {num_train_steps}], got {steps!r}")
    c = num_train_steps // steps
    return [t + 1 for t in range(0, num_train_steps, c) if t + 1 < num_train_steps][::-1]


def _check(x, schedule: NoiseSchedule, timesteps, eta: float) -> list[int]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:8]}...")
    if ts[-1] < 0 or ts[0] >= schedule.num_steps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps}), got [{ts[-1]}, {ts[0]}]")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return ts


def _abar(schedule: NoiseSchedule, t: int | None) -> float:
    # None = past the last step: the clean image (abar = 1), as k-diffusion's final sigma = 0
    return 1.0 if t is None else float(schedule.alphas_cumprod[t])


# ---- solvers --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                eta: float = 0.0, generator: torch.Generator | None = None, callback=None,
                progress: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12; eta = 0 deterministic, 1 = DDPM-like).

    Args:
        model_fn: ``model_fn(x_t, t) -> eps``; x_t (N, ...) in x's dtype, t (N,) int64 on x's device; eps like x_t.
        x: (N, ...) float, the initial noise at ``timesteps[0]`` (standard normal for a full run).
        schedule: the training NoiseSchedule (abar in float64).
        timesteps: strictly descending ints in [0, T) (e.g. :func:`uniform_timesteps`). The step after the last
            goes to abar = 1, so the result is the final clean prediction (LDM stops at abar_0 = 0.99915 instead).
        eta: DDIM's stochasticity; sigma_t = eta * sqrt((1 - a_prev)/(1 - a_t)) * sqrt(1 - a_t/a_prev).
        generator: torch.Generator for the eta > 0 noise (on x's device).
        callback: called after each step with ``dict(x=, i=, t=, denoised=)``.
        progress: show a tqdm bar.

    Returns:
        (N, ...) x0 sample in x's dtype.

    Raises:
        TypeError: x not a float tensor. ValueError: empty/non-descending/out-of-range timesteps, eta < 0.
    """
    ts = _check(x, schedule, timesteps, eta)
    for i, t in enumerate(tqdm(ts, desc="DDIM", disable=not progress, leave=False)):
        a_t, a_prev = _abar(schedule, t), _abar(schedule, ts[i + 1] if i + 1 < len(ts) else None)
        eps = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).to(x.dtype)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(dict(x=x, i=i, t=t, denoised=x0))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                    eta: float = 0.0, generator: torch.Generator | None = None, callback=None,
                    progress: bool = True) -> torch.Tensor:
    """DPM-Solver++ 2M (Lu et al. 2022, "DPM-Solver++", Alg. 2: data prediction, multistep, second order).

    With lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar), h = lambda_next - lambda_t and
    r = h_prev / h: ``x_next = (sigma_next / sigma_t) x - alpha_next (e^{-h} - 1) D`` with
    ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev`` (D = x0_t on the first step). The last step lands on the clean image
    with the first-order update (x = x0_t), as k-diffusion and diffusers' ``lower_order_final``.

    Args:
        model_fn, x, schedule, timesteps, generator, callback, progress: as :func:`sample_ddim` (generator unused:
            the solver is deterministic).
        eta: must be 0 (this is the ODE solver; kept for the shared signature).

    Returns:
        (N, ...) x0 sample in x's dtype.

    Raises:
        TypeError, ValueError: as :func:`sample_ddim`; eta != 0.
    """
    ts = _check(x, schedule, timesteps, eta)
    if eta != 0:
        raise ValueError(f"sample_dpmpp_2m is deterministic: eta must be 0, got {eta} (use sample_ddim for eta > 0)")
    old_x0, h_prev = None, None
    for i, t in enumerate(tqdm(ts, desc="DPM-Solver++ 2M", disable=not progress, leave=False)):
        a_t = _abar(schedule, t)
        eps = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).to(x.dtype)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if i + 1 == len(ts):
            x = x0  # sigma_next = 0: lambda_next = inf, the update collapses to the data prediction
        else:
            a_n = _abar(schedule, ts[i + 1])
            lam_t, lam_n = 0.5 * math.log(a_t / (1 - a_t)), 0.5 * math.log(a_n / (1 - a_n))
            h = lam_n - lam_t
            if old_x0 is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = math.sqrt((1 - a_n) / (1 - a_t)) * x - math.sqrt(a_n) * math.expm1(-h) * d
            old_x0, h_prev = x0, h
        if callback is not None:
            callback(dict(x=x, i=i, t=t, denoised=x0))
    return x


SAMPLERS: dict[str, Callable] = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}
"""Sampler name -> function; every entry has the signature of :func:`sample_ddim`."""


# ---- image guidance -------------------------------------------------------------------------------------------------
def guided_eps(eps0: torch.Tensor, eps1: torch.Tensor, eps_full: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """The seed's image guidance (eq. 1): ``eps0 + l1 * (eps1 - eps0) + l2 * (eps_full - eps1)``.

    Args:
        eps0: (N, ...) prediction with text AND reference content null.
        eps1: (N, ...) prediction with one condition kept (references or text).
        eps_full: (N, ...) prediction with both conditions.
        l1, l2: guidance scales (l1 = l2 = s reduces to CFG ``eps0 + s (eps_full - eps0)``).

    Returns:
        (N, ...) guided eps in the inputs' dtype.
    """
    return eps0 + l1 * (eps1 - eps0) + l2 * (eps_full - eps1)


# Branches per strategy as (text kept, references kept), in batch order; the last is always the full condition.
STRATEGIES: dict[str, tuple[tuple[bool, bool], ...]] = {
    "joint": ((False, False), (True, True)),
    "text_only": ((False, True), (True, True)),
    "text_first": ((False, False), (False, True), (True, True)),
    "image_first": ((False, False), (True, False), (True, True)),
}


Branches = tuple[tuple[bool, bool], ...]


def guidance_branches(strategy: str, l1: float, l2: float | None = None) -> tuple[Branches, float, float]:
    """The UNet branches one guided step needs, and the scales.

    Args:
        strategy: one of :data:`STRATEGIES` (see :func:`personalize`).
        l1: first scale. l2: second scale (None: l1). "joint" and "text_only" use one scale s = l1 = l2.

    Returns:
        (branches, l1, l2): branches as (text kept, references kept) pairs in batch order. Redundant branches are
        dropped: with l1 = l2 the partial branch cancels out (eps1 has weight 0), and with a single scale of 1 only
        the full branch is left.

    Raises:
        ValueError: unknown strategy, or l1 != l2 for a one-scale strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    l1 = float(l1)
    l2 = l1 if l2 is None else float(l2)
    branches = STRATEGIES[strategy]
    if len(branches) == 2 and l1 != l2:
        raise ValueError(f"strategy {strategy!r} has one guidance scale s = l1 = l2; got l1={l1}, l2={l2}")
    if len(branches) == 3 and l1 == l2:
        branches = (branches[0], branches[2])  # eps1's weight l1 - l2 is zero
    if len(branches) == 2 and l1 == 1.0:
        branches = branches[-1:]  # eps0 + 1 * (eps_full - eps0) = eps_full
    return branches, l1, l2


# ---- personalization ------------------------------------------------------------------------------------------------
def takes_out_positions(unet) -> bool:
    """Whether ``unet(...)`` accepts the ``out_positions`` keyword: the signature of a module's ``forward`` (or of a
    plain callable) has a parameter of that name or ``**kwargs``. Wrappers are looked through: torch.compile's
    (``_orig_mod``) and :class:`jedi.GraphedUNet` (``.unet``, which it calls with every keyword). Callables whose
    signature cannot be read count as not taking it."""
    unet = _unwrap(unet)
    fn = unet.forward if isinstance(unet, torch.nn.Module) else unet
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "out_positions" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _unwrap(unet):
    """The module behind torch.compile's (``_orig_mod``) and :class:`jedi.GraphedUNet`'s (``.unet``) wrappers."""
    for _ in range(8):  # unwrap (bounded: a wrapper that wraps itself must not loop)
        if getattr(unet, "_orig_mod", None) is not None:
            unet = unet._orig_mod
        elif not isinstance(unet, torch.nn.Module) and isinstance(getattr(unet, "unet", None), torch.nn.Module):
            unet = unet.unet
        else:
            break
    return unet


def frozen_weights_of(unet):
    """``JeDiUNet.frozen_weights()`` of the UNet behind ``unet`` (wrappers looked through), a do-nothing context for
    any other callable: a sampling run's weights do not change, so what every step derives from them is made once."""
    fn = getattr(_unwrap(unet), "frozen_weights", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def _as_sets(t: torch.Tensor, B: int, name: str, dims: int) -> torch.Tensor:
    """(…) or (1, …) or (B, …) with ``dims`` trailing dims -> (B, …)."""
    if t.dim() == dims:
        t = t.unsqueeze(0)
    if t.dim() != dims + 1 or t.shape[0] not in (1, B):
        raise ValueError(f"{name} must have {dims} dims, or {dims + 1} with a leading 1 or B = {B}; got "
                         f"{tuple(t.shape)}")
    return t.expand(B, *t.shape[1:])


@torch.no_grad()
def personalize(unet, refs_latents: torch.Tensor, context: torch.Tensor, null_context: torch.Tensor, *,
                num_targets: int = 1, steps: int = 50, sampler: str = "ddim", strategy: str = "joint",
                l1: float = 7.5, l2: float | None = None, eta: float = 0.0,
                generator: torch.Generator | None = None, schedule: NoiseSchedule | None = None,
                timesteps: Sequence[int] | None = None, set_mask: torch.Tensor | None = None, callback=None,
                progress: bool = True) -> torch.Tensor:
    """Generate K images per set that share the subject of the R reference images (JeDi personalization).

    Each set is ``[R references (mask 0, x0 = their latents), K targets (mask 1, x0 = 0)]``, G = R + K images,
    denoised jointly. The references are not sampled: at each step their x_t is ``q_sample(x0_ref, t, n_ref)`` with
    ``n_ref`` drawn once per run. The sampler only sees the targets.

    Guidance (seed eq. 1, :func:`guided_eps`) with eps0 = text null and reference content null (the references'
    masked-x0 channels zeroed, mask kept; their re-noised x_t is the same in every branch) and eps_full = both kept.
    ``strategy``:

    * "joint": eps0 and eps_full only, one scale s = l1 = l2: ``eps0 + s (eps_full - eps0)``.
    * "text_only": references kept in every branch; standard CFG on the text with s = l1 = l2.
    * "text_first": eps1 from image conditioning (references kept, text null); l1 scales the references, l2 the
      text on top of them.
    * "image_first": eps1 from text conditioning (text kept, references null); l1 scales the text, l2 the
      references on top of it.

    These names follow the seed's code; its paper's Table 2 names the two orders the other way round.

    All branches of all sets run as ONE UNet call per step: the batch is branch-major,
    ``(branches, B, G) -> N = branches * B * G`` with ``set_size = G``. Branches with zero weight are skipped
    (l1 = l2 cancels eps1; a single scale of 1 leaves eps_full alone), see :func:`guidance_branches`.

    The run executes inside the UNet's ``frozen_weights()`` scope (a JeDiUNet, also behind torch.compile or
    :class:`jedi.GraphedUNet`): what every step derives from the weights is made once. Do not change the weights
    from ``callback``: leaving the scope raises RuntimeError if they changed.

    Args:
        unet: ``unet(x_t, t, context, *, x0, ng_mask, set_size, set_mask, out_positions) -> eps`` (JeDiUNet),
            returning the eps of the images at ``out_positions`` (the K targets, ``range(R, G)``) of each set. A
            UNet whose signature has no ``out_positions`` (nor ``**kwargs``) is called without it and must return
            every image's eps (N, C, h, w).
        refs_latents: (R, C, h, w) references shared by all sets, or (B, R, C, h, w) per set (1 broadcasts);
            VAE latents (scaled by 0.18215), float. Never modified.
        context: (B, M, D) text embedding per set (B prompts); its dtype/device are the UNet's input's.
        null_context: (M, D), (1, M, D) or (B, M, D) embedding of the empty (or negative) prompt.
        num_targets: K >= 1 images to generate per set.
        steps: sampling steps (CompVis uniform spacing, :func:`uniform_timesteps`), unless ``timesteps`` is given.
        sampler: "ddim" or "dpmpp_2m" (:data:`SAMPLERS`).
        strategy: "joint", "text_only", "text_first" or "image_first".
        l1, l2: guidance scales (l2 None: l1); one-scale strategies require l1 = l2.
        eta: DDIM eta (0 for dpmpp_2m).
        generator: torch.Generator on the latents' device. Draw order: the targets' initial noise (B*K, C, h, w),
            then the references' fixed noise (B*R, C, h, w), then any eta noise.
        schedule: the training schedule (default SD v1's scaled-linear).
        timesteps: explicit descending timesteps (overrides ``steps``).
        set_mask: optional (G, G) bool joint-attention mask, passed to the UNet.
        callback, progress: passed to the sampler (callback sees the targets only).

    Returns:
        (B, K, C, h, w) generated latents in refs_latents' dtype.

    Raises:
        ValueError: no references, num_targets < 1, unknown strategy/sampler, shape mismatches, l1 != l2 for a
            one-scale strategy.
    """
    if not isinstance(refs_latents, torch.Tensor) or refs_latents.dim() not in (4, 5):
        got = tuple(refs_latents.shape) if isinstance(refs_latents, torch.Tensor) else type(refs_latents)
        raise ValueError(f"refs_latents must be a (R, C, h, w) or (B, R, C, h, w) tensor, got {got}")
    if refs_latents.shape[-4] == 0:
        raise ValueError("refs_latents holds no references (R = 0): personalization needs at least one")
    if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 1:
        raise ValueError(f"num_targets must be an int >= 1, got {num_targets!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    branches, l1, l2 = guidance_branches(strategy, l1, l2)
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        raise ValueError(f"context must be a (B, M, D) tensor, got "
                         f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context)}")
    B, M, D = context.shape
    null_context = _as_sets(null_context.to(context), B, "null_context", 2)
    if null_context.shape[1:] != (M, D):
        raise ValueError(f"null_context must have (M, D) = ({M}, {D}) like context, got {tuple(null_context.shape)}")
    refs = _as_sets(refs_latents, B, "refs_latents", 4)  # (B, R, C, h, w), a view: never written
    _, R, C, h, w = refs.shape
    K, G, nb = num_targets, refs.shape[1] + num_targets, len(branches)
    schedule = schedule or _default_schedule()
    ts = list(timesteps) if timesteps is not None else uniform_timesteps(steps, schedule.num_steps)
    dev, dt = refs.device, refs.dtype

    x = torch.randn((B * K, C, h, w), generator=generator, device=dev, dtype=dt)
    ref_noise = torch.randn((B * R, C, h, w), generator=generator, device=dev, dtype=dt)
    refs_flat = refs.reshape(B * R, C, h, w)  # copies when broadcast; never aliased for writing

    # Per-branch inputs that do not change over the run: x0 (references or zeros), context, mask.
    zeros_t = torch.zeros(B, K, C, h, w, device=dev, dtype=dt)
    x0_set = torch.cat([refs, zeros_t], dim=1)  # (B, G, C, h, w)
    x0_all = torch.stack([x0_set if keep_ref else torch.zeros_like(x0_set) for _, keep_ref in branches])
    x0_all = x0_all.reshape(nb * B * G, C, h, w)  # (nb, B, G, ...) -> (N, ...)
    ctx = torch.stack([context if keep_txt else null_context for keep_txt, _ in branches])  # (nb, B, M, D)
    ctx_all = ctx.unsqueeze(2).expand(nb, B, G, M, D).reshape(nb * B * G, M, D)
    ng_mask = (torch.arange(G, device=dev) >= R).repeat(nb * B)  # (N,); made on the device: no host copy to wait on
    targets = tuple(range(R, G))  # positions of the targets in each set
    prune = takes_out_positions(unet)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = t[:1]
        # (the sampler checked its timesteps: no read-back of t, which would make the host wait for the GPU)
        xt_ref = schedule.q_sample(refs_flat, t0.expand(B * R), ref_noise, check_range=False).view(B, R, C, h, w)
        xt_set = torch.cat([xt_ref, x_t.view(B, K, C, h, w)], dim=1)  # (B, G, C, h, w)
        xt_all = xt_set.unsqueeze(0).expand(nb, B, G, C, h, w).reshape(nb * B * G, C, h, w)
        args = (xt_all, t0.expand(nb * B * G), ctx_all)
        kw = dict(x0=x0_all, ng_mask=ng_mask, set_size=G, set_mask=set_mask)
        if prune:
            # out_positions: the UNet runs the references only as far as its last joint attention needs them and
            # returns the targets' eps alone (nb * B * K images, set-major)
            eps = unet(*args, **kw, out_positions=targets).view(nb, B * K, C, h, w)
        else:  # a UNet without out_positions: every image's eps, then the targets'
            eps = unet(*args, **kw).view(nb, B, G, C, h, w)[:, :, R:].reshape(nb, B * K, C, h, w)
        if nb == 1:
            return eps[0]
        if nb == 2:
            return guided_eps(eps[0], eps[1], eps[1], l1, l1)
        return guided_eps(eps[0], eps[1], eps[2], l1, l2)

    with frozen_weights_of(unet):  # the weight-derived tensors once per run (JeDiUNet.frozen_weights)
        out = SAMPLERS[sampler](model_fn, x, schedule, ts, eta=eta, generator=generator, callback=callback,
                                progress=progress)
    return out.view(B, K, C, h, w)
