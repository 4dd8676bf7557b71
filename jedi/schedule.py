"""Noise schedule of Stable Diffusion v1 (scaled-linear betas) and a minimal DDIM sampler for JeDi sets.

The full sampler family (image guidance, other solvers) comes with ``jedi.sampling``; ``ddim_sample`` here is the
smallest correct one, enough for training previews and ``jedi demo``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["NoiseSchedule", "ddim_timesteps", "ddim_sample"]


@dataclass
class NoiseSchedule:
    """Discrete DDPM schedule: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, t in [0, num_steps).

    Attributes:
        betas: (T,) float64.
        alphas_cumprod: (T,) float64, abar_t = prod_{s <= t} (1 - beta_s).
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    # device -> (the alphas_cumprod it copies, its version, the copy): a sampling loop gathers abar on the GPU every
    # step, and a host-to-device copy from pageable memory waits for the stream (the loop could not run ahead)
    _copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000):
        """SD v1's schedule: betas linear in sqrt space from ``beta_start`` to ``beta_end`` over ``num_steps``."""
        if num_steps < 2 or not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need num_steps >= 2 and 0 < beta_start < beta_end < 1, got {num_steps}, "
                             f"{beta_start}, {beta_end}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        """T, the number of discrete training timesteps."""
        return self.betas.shape[0]

    def alphas_cumprod_on(self, device: torch.device | str) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied once per device (again after an in-place change)."""
        device = torch.device(device)
        a = self.alphas_cumprod
        if a.device == device:
            return a
        hit = self._copies.get(device)
        if hit is None or hit[0] is not a or hit[1] != a._version:
            hit = self._copies[device] = (a, a._version, a.to(device))
        return hit[2]

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # (N,) -> (N, 1, ..., 1) in like's dtype/device, gathered in float64 for accuracy
        a = self.alphas_cumprod_on(t.device)[t.long()]
        return a.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *, check_range: bool = True
                 ) -> torch.Tensor:
        """Forward diffusion: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

        Args:
            x0: (N, C, H, W) clean latents, float.
            t: (N,) int64 timesteps in [0, T).
            noise: like x0, standard normal.
            check_range: check that t lies in [0, T) (ValueError). On a GPU that reads t back, which waits for
                every queued kernel: a sampling loop whose timesteps are already checked passes False, so the host
                can queue the next step while the GPU runs this one.

        Returns:
            (N, C, H, W) x_t in x0's dtype.

        Raises:
            ValueError: t has the wrong shape or (check_range) is out of range; noise does not match x0.
        """
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape (N,) = ({x0.shape[0]},), got {tuple(t.shape)}")
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if check_range and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"t must lie in [0, {self.num_steps}), got [{int(t.min())}, {int(t.max())}]")
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(num_inference_steps: int, num_train_steps: int = 1000) -> list[int]:
    """Evenly spaced DDIM timesteps, descending, starting at T-1 ("trailing" spacing, Lin et al. 2024).

    Starting at the last training step matters: sampling starts from pure noise, which t = T-1 resembles best.
    """
    if not 1 <= num_inference_steps <= num_train_steps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_steps}], got {num_inference_steps}")
    step = num_train_steps / num_inference_steps
    return [round(num_train_steps - i * step) - 1 for i in range(num_inference_steps)]


@torch.no_grad()
def ddim_sample(unet, schedule: NoiseSchedule, context: torch.Tensor, *, x0: torch.Tensor, ng_mask: torch.Tensor,
                set_size: int, steps: int = 50, generator: torch.Generator | None = None,
                image_guidance: float = 1.0, clip_x0: float | None = None) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0) over JeDi sets; references re-noised with fixed noise each step.

    Reference images (mask 0) are not sampled: at every step their x_t is ``q_sample(x0_ref, t, n_ref)`` with one
    fixed noise draw ``n_ref``, so the joint attention sees a consistent noisy copy of the clean reference (JeDi's
    inpainting view). Images to generate (mask 1) start from pure noise and follow the DDIM update.

    Args:
        unet: callable ``unet(x_t, timesteps, context, *, x0, ng_mask, set_size) -> eps`` (JeDiUNet).
        schedule: the training NoiseSchedule.
        context: (N, T, context_dim) text conditioning, N = B * set_size.
        x0: (N, C, h, w) clean latents of the references (rows of images to generate are ignored).
        ng_mask: (N,) bool, True = generate.
        set_size: G.
        steps: number of DDIM steps (1..T).
        generator: torch.Generator for the initial noise (and the references' fixed noise).
        image_guidance: JeDi's image guidance scale l: ``eps = eps_null + l * (eps - eps_null)`` with eps_null the
            prediction with the reference content nulled (masked-x0 channels zero, mask kept; trained by
            ``p_drop_ref``). 1.0 = no guidance (one UNet call per step); otherwise both run as one 2N batch.
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] each step (and re-derive eps from it), as DDPM does
            for pixel-space models whose data lie in [-1, 1]; None for latent spaces (SD's VAE latents).

    Returns:
        (n_gen, C, h, w) the generated images only (rows where ng_mask is True, in order), x0's dtype.

    Raises:
        ValueError: shape mismatches.
    """
    N = x0.shape[0]
    if ng_mask.shape != (N,) or context.shape[0] != N or N % set_size:
        raise ValueError(f"need ng_mask (N,), context (N, T, D) with N = {N} divisible by set_size = {set_size}; "
                         f"got ng_mask {tuple(ng_mask.shape)}, context {tuple(context.shape)}")
    mask = ng_mask.bool().to(x0.device)
    m4 = mask.view(N, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    ref_noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x0_in = torch.where(m4, torch.zeros_like(x0), x0)  # the UNet never sees content of images to generate
    x = noise
    ts = ddim_timesteps(steps, schedule.num_steps)
    abar = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        tt = torch.full((N,), t, dtype=torch.long, device=x0.device)
        # references follow their fixed noisy path (ts are checked: no read-back of t, which would wait for the GPU)
        x = torch.where(m4, x, schedule.q_sample(x0, tt, ref_noise, check_range=False))
        if image_guidance == 1.0:
            eps = unet(x, tt, context, x0=x0_in, ng_mask=mask, set_size=set_size).to(x.dtype)
        else:  # (2N, ...): [with references | references nulled]; sets never straddle the halves (N % G == 0)
            e = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([context, context]),
                     x0=torch.cat([x0_in, torch.zeros_like(x0_in)]), ng_mask=torch.cat([mask, mask]),
                     set_size=set_size).to(x.dtype)
            eps = e[N:] + image_guidance * (e[:N] - e[N:])
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip_x0 is not None:
            pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
            eps = (x - a_t**0.5 * pred_x0) / (1 - a_t) ** 0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * eps
    return x[mask]
