"""Noise schedule and samplers. Samplers are strategies over one unchanged denoiser `model_fn(x_t, t) -> out`.

Indexing: noise level t in 0..T, with alpha_bar[0] = 1 (t = 0 is the clean sample) and t = 1..T the levels the
denoiser is trained on. With that convention every sampler ends by stepping to level 0, a warm start noised
to level 0 is returned unchanged, and DDIM with k = T and eta = 1 *is* DDPM (same posterior, same noise draws).

All schedule math runs in fp32 whatever dtype the denoiser computes in (bf16 on CPU): the x0 / epsilon
conversions divide by sqrt(alpha_bar) which is ~0.03 at t = T, where bf16's 3 significant digits would leak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from vla_runtime.policies.diffusion.configuration import ScheduleConfig

ModelFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t (B, H, A) fp32, level t) -> eps or x0 (fp32)


class NoiseSchedule:
    """Squared-cosine alpha_bar (Nichol & Dhariwal 2021) with betas capped at 0.999, as diffusers'
    `squaredcos_cap_v2`, shifted so that index 0 is the clean sample."""

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        T = cfg.num_train_timesteps
        self.T = T

        def f(i: float) -> float:
            return math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas]).float()  # (T+1,) beta[0] = 0
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), abar]).float()  # (T+1,) abar[0] = 1

    # -- forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t an int or (B,) long tensor."""
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def _ab(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(t, int):
            return self.alpha_bar[t].to(like.device)
        return self.alpha_bar.to(like.device)[t].reshape(-1, *([1] * (like.dim() - 1)))

    # -- what the network predicts -> (x0, eps), consistent with x_t
    def x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the network output at level t into (x0, eps) with x_t = sqrt(ab) x0 + sqrt(1-ab) eps exactly.

        x0 is clipped to [-1, 1] (normalised actions live there) and eps recomputed from the clipped x0, so
        DDIM's and DDPM's updates agree (they both assume that identity)."""
        ab = self.alpha_bar[t]
        out = out.float()
        if self.cfg.prediction_type == "epsilon":
            x0 = (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
        else:
            x0 = out
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return x0, eps

    # -- reverse steps
    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t: int, s: int, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """Generalised DDIM (Song et al. 2021, eq. 12) from level t to level s < t."""
        ab_t, ab_s = self.alpha_bar[t], self.alpha_bar[s]
        var = eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        var = var.clamp(min=0.0)
        x = ab_s.sqrt() * x0 + (1 - ab_s - var).clamp(min=0.0).sqrt() * eps
        if eta > 0 and noise is not None and float(var) > 0:
            x = x + var.sqrt() * noise
        return x

    def ddpm_step(self, x0: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor | None) -> torch.Tensor:
        """Ancestral DDPM step t -> t-1 from the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7)."""
        beta, ab_t, ab_s = self.betas[t], self.alpha_bar[t], self.alpha_bar[t - 1]
        mean = ab_s.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t) * x_t
        var = (1 - ab_s) / (1 - ab_t) * beta
        if noise is not None and float(var) > 0:
            mean = mean + var.sqrt() * noise
        return mean


def ddim_timesteps(k: int, t_start: int) -> list[int]:
    """k evenly spaced levels from t_start down (t_start, ..., > 0), followed by the clean level 0.

    k > t_start is capped (there are only t_start distinct levels); k = t_start = T lists every level."""
    k = max(0, min(int(k), int(t_start)))
    if k == 0:
        return [0]
    ts = sorted({int(round(t_start * (k - i) / k)) for i in range(k)}, reverse=True)
    return [t for t in ts if t > 0] + [0]


def _randn(shape: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def denoise(model_fn: ModelFn, sched: NoiseSchedule, x: torch.Tensor, levels: list[int], eta: float = 0.0,
            gen: torch.Generator | None = None, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Run DDIM from x at levels[0] through levels[1:] (ending at 0). Returns (x0, denoiser calls).

    prefix (B, L, A): actions already committed for the chunk's first L steps (async inference: they execute
    while this chunk is being computed). Inpainting by x0 replacement: each step's clean estimate takes the
    prefix in its first L rows, so the denoiser sees, and the rest of the chunk continues from, the actions
    the robot will really execute (the idea of real-time chunking, Black et al. 2025, in its simplest form).
    The result's first L rows equal the prefix."""
    calls = 0
    for t, s in zip(levels[:-1], levels[1:]):
        x0, eps = sched.x0_eps(model_fn(x, t), x, t)
        calls += 1
        x0 = with_prefix(x0, prefix)
        noise = _randn(x.shape, gen) if eta > 0 else None
        x = sched.ddim_step(x0, eps, t, s, eta, noise)
    return with_prefix(x, prefix), calls


def with_prefix(x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, A) with its first rows replaced by prefix (B, L, A) (a copy; x itself when prefix is None)."""
    if prefix is None:
        return x
    n = min(prefix.shape[1], x.shape[1])
    out = x.clone()
    out[:, :n] = prefix[:, :n].to(out)
    return out


def ddpm_sample(model_fn: ModelFn, sched: NoiseSchedule, shape: Sequence[int],
                gen: torch.Generator | None = None, x_T: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Full ancestral sampling over all T levels. Noise draw order: x_T, then one draw per step t = T..2
    (the step to level 0 has zero variance and draws nothing) - the same order `denoise(..., eta=1)` uses."""
    x = _randn(shape, gen) if x_T is None else x_T.float()
    for t in range(sched.T, 0, -1):
        x0, _ = sched.x0_eps(model_fn(x, t), x, t)
        noise = _randn(x.shape, gen) if t > 1 else None
        x = sched.ddpm_step(x0, x, t, noise)
    return x, sched.T


def ddim_sample(model_fn: ModelFn, sched: NoiseSchedule, shape: Sequence[int], k: int, eta: float = 0.0,
                gen: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """DDIM(k) from pure noise at level T (prefix: committed first actions, see `denoise`)."""
    x = _randn(shape, gen) if x_T is None else x_T.float()
    return denoise(model_fn, sched, x, ddim_timesteps(k, sched.T), eta, gen, prefix)


def warm_start_sample(model_fn: ModelFn, sched: NoiseSchedule, x_warm: torch.Tensor, k: int, t_start: int,
                      eta: float = 0.0, gen: torch.Generator | None = None,
                      noise_scale: float = 1.0, prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """STEP: noise the predicted chunk to level t_start, then k DDIM steps down to 0.

    t_start = 0 (or k = 0) returns the warm start unchanged with no denoiser call: the 'predictor only' case.
    noise_scale scales the forward noise (STEP's sigma_scale; 1 = the exact forward process)."""
    if t_start <= 0 or k <= 0:
        return with_prefix(x_warm.float().clone(), prefix), 0
    ab = sched.alpha_bar[t_start]
    z = _randn(x_warm.shape, gen)
    x = ab.sqrt() * x_warm.float() + noise_scale * (1 - ab).sqrt() * z
    return denoise(model_fn, sched, x, ddim_timesteps(k, t_start), eta, gen, prefix)


def action_speed(executed: torch.Tensor, dims: int) -> float:
    """Mean commanded motion per step over the executed actions (N, A) (env units, first `dims` dims).

    With delta (velocity-like) OSC actions the action itself is the end-effector velocity, so this is the
    |dA| STEP measures on absolute action sequences."""
    if executed.numel() == 0:
        return float("inf")
    return float(executed[:, :dims].float().norm(dim=-1).mean())


def perturb_warm_start(x_warm: torch.Tensor, stalled: bool, sigma_stall: float,
                       gen: torch.Generator | None = None) -> torch.Tensor:
    """Velocity-aware perturbation: on a stall, add N(0, sigma_stall^2) so the refined chunk can leave the
    fixed point the predictor (which extrapolates the previous, motionless plan) would otherwise keep."""
    if not stalled or sigma_stall <= 0:
        return x_warm
    return x_warm + sigma_stall * _randn(x_warm.shape, gen)
