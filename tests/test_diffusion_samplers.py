"""Sampler math: noise schedule, DDIM(k) vs DDPM, warm start, velocity-aware perturbation."""

from __future__ import annotations

import math

import pytest
import torch

from vla_runtime.errors import UserError
from vla_runtime.policies.diffusion.configuration import SamplerConfig, ScheduleConfig
from vla_runtime.policies.diffusion.samplers import (NoiseSchedule, action_speed, ddim_sample, ddim_timesteps,
                                                      ddpm_sample, denoise, perturb_warm_start, warm_start_sample)

torch.set_num_threads(1)


def sched(pred: str = "epsilon", T: int = 100, clip: bool = True) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(num_train_timesteps=T, prediction_type=pred, clip_sample=clip))


def toy_model(pred: str):
    """A deterministic, level-dependent, nonlinear stand-in for the denoiser."""
    w = torch.linspace(-0.5, 0.5, 7)

    def fn(x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(0.7 * x + w * math.sin(t / 7.0)) * (0.9 if pred == "epsilon" else 0.8)

    return fn


def oracle(s: NoiseSchedule, x0: torch.Tensor, pred: str):
    """A perfect denoiser for a single known target x0."""

    def fn(x: torch.Tensor, t: int) -> torch.Tensor:
        ab = s.alpha_bar[t]
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt() if pred == "epsilon" else x0.expand_as(x)

    return fn


def test_schedule_squared_cosine() -> None:
    s = sched()
    ab = s.alpha_bar
    assert ab.shape == (101,) and float(ab[0]) == 1.0
    assert torch.all(ab[1:] < ab[:-1]), "alpha_bar must strictly decrease"
    assert float(s.betas.max()) <= 0.999 + 1e-6
    f = lambda i: math.cos((i / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 50, 90):  # uncapped region: alpha_bar_t = f(t) / f(0)
        assert float(ab[t]) == pytest.approx(f(t) / f(0), rel=1e-5)
    assert float(ab[100]) < 1e-3  # the last level is (nearly) pure noise


def test_add_noise_levels() -> None:
    s = sched()
    x0, eps = torch.randn(4, 16, 7), torch.randn(4, 16, 7)
    assert torch.equal(s.add_noise(x0, eps, 0), x0)
    t = torch.tensor([0, 10, 50, 100])
    xt = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        ab = s.alpha_bar[ti]
        assert torch.allclose(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * eps[i])


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(10, 100) == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert ddim_timesteps(2, 100) == [100, 50, 0]
    assert ddim_timesteps(100, 100) == list(range(100, -1, -1))
    assert ddim_timesteps(2, 30) == [30, 15, 0]
    assert ddim_timesteps(50, 3) == [3, 2, 1, 0]  # k capped at the number of levels
    assert ddim_timesteps(0, 30) == [0]


@pytest.mark.parametrize("pred", ["epsilon", "sample"])
def test_ddim_full_eta1_equals_ddpm(pred: str) -> None:
    """DDIM with k = T and eta = 1 is DDPM's ancestral sampler: same trajectory for the same noise draws."""
    s = sched(pred)
    fn = toy_model(pred)
    a, calls_a = ddpm_sample(fn, s, (3, 16, 7), torch.Generator().manual_seed(5))
    b, calls_b = ddim_sample(fn, s, (3, 16, 7), k=100, eta=1.0, gen=torch.Generator().manual_seed(5))
    assert calls_a == calls_b == 100
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_ddim_step_matches_ddpm_posterior_per_step() -> None:
    """One DDIM(eta=1) step t -> t-1 has the DDPM posterior's mean and variance at every level."""
    s = sched()
    x0, xt = torch.rand(2, 16, 7) * 2 - 1, torch.randn(2, 16, 7)
    for t in (100, 60, 2):
        ab = s.alpha_bar[t]
        eps = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        z = torch.randn_like(xt)
        assert torch.allclose(s.ddim_step(x0, eps, t, t - 1, 1.0, z), s.ddpm_step(x0, xt, t, z), atol=1e-5)


@pytest.mark.parametrize("pred", ["epsilon", "sample"])
@pytest.mark.parametrize("k", [1, 2, 10, 100])
def test_ddim_with_oracle_recovers_target(pred: str, k: int) -> None:
    s = sched(pred)
    x0 = torch.rand(1, 16, 7) * 1.6 - 0.8
    out, calls = ddim_sample(oracle(s, x0, pred), s, (1, 16, 7), k=k, gen=torch.Generator().manual_seed(0))
    assert calls == k
    # k = 1 divides by sqrt(alpha_bar_T) ~ 0.02 in fp32: ~1e-4 rounding, hence the tolerance
    assert torch.allclose(out, x0, atol=1e-3)


def test_ddpm_with_oracle_recovers_target() -> None:
    s = sched()
    x0 = torch.rand(2, 16, 7) * 1.6 - 0.8
    out, _ = ddpm_sample(oracle(s, x0, "epsilon"), s, (2, 16, 7), torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddim_eta0_deterministic_given_xT() -> None:
    s = sched()
    fn = toy_model("epsilon")
    xT = torch.randn(2, 16, 7)
    a, _ = ddim_sample(fn, s, xT.shape, 10, 0.0, torch.Generator().manual_seed(1), x_T=xT)
    b, _ = ddim_sample(fn, s, xT.shape, 10, 0.0, torch.Generator().manual_seed(2), x_T=xT)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0 + 1e-6  # final x0 is clipped into the normalised box


def test_warm_start_t0_returns_warm_start() -> None:
    s = sched()
    calls = []
    fn = lambda x, t: calls.append(t) or torch.zeros_like(x)  # noqa: E731
    w = torch.rand(1, 16, 7) * 2 - 1
    out, n = warm_start_sample(fn, s, w, k=2, t_start=0, gen=torch.Generator().manual_seed(0))
    assert torch.equal(out, w) and n == 0 and calls == []
    out, n = warm_start_sample(fn, s, w, k=0, t_start=30, gen=torch.Generator().manual_seed(0))
    assert torch.equal(out, w) and n == 0


def test_warm_start_noises_to_t_start_and_refines() -> None:
    """The first denoiser input is q(x_t_start | warm); k calls at the shortened schedule's levels."""
    s = sched()
    seen: list[tuple[int, torch.Tensor]] = []
    w = torch.full((4000, 16, 7), 0.5)

    def fn(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append((t, x.clone()))
        return torch.zeros_like(x)

    warm_start_sample(fn, s, w, k=2, t_start=30, gen=torch.Generator().manual_seed(0))
    assert [t for t, _ in seen] == [30, 15]
    x = seen[0][1]
    ab = float(s.alpha_bar[30])
    assert float(x.mean()) == pytest.approx(0.5 * math.sqrt(ab), abs=5e-3)
    assert float(x.var()) == pytest.approx(1 - ab, rel=3e-2)
    # with a perfect denoiser for the warm start itself, the refinement returns it
    out, n = warm_start_sample(oracle(s, w[:1], "epsilon"), s, w[:1], k=4, t_start=40,
                               gen=torch.Generator().manual_seed(0))
    assert n == 4 and torch.allclose(out, w[:1], atol=1e-4)


def test_warm_start_noise_scale() -> None:
    s = sched()
    seen = []
    fn = lambda x, t: seen.append(x.clone()) or torch.zeros_like(x)  # noqa: E731
    w = torch.zeros(4000, 16, 7)
    warm_start_sample(fn, s, w, k=1, t_start=50, gen=torch.Generator().manual_seed(0), noise_scale=0.5)
    assert float(seen[0].std()) == pytest.approx(0.5 * math.sqrt(1 - float(s.alpha_bar[50])), rel=3e-2)


def test_denoise_counts_calls() -> None:
    s = sched()
    out, calls = denoise(toy_model("epsilon"), s, torch.randn(1, 16, 7), [30, 20, 10, 0])
    assert calls == 3 and out.shape == (1, 16, 7)


def test_velocity_aware_perturbation() -> None:
    moving = torch.zeros(8, 7)
    moving[:, 0] = 0.5
    assert action_speed(moving, 6) == pytest.approx(0.5)
    still = torch.zeros(8, 7)
    still[:, 6] = 1.0  # gripper command is not motion
    assert action_speed(still, 6) == 0.0
    assert action_speed(torch.zeros(0, 7), 6) == float("inf")  # nothing executed: not a stall
    w = torch.zeros(2000, 16, 7)
    assert perturb_warm_start(w, False, 0.1) is w
    p = perturb_warm_start(w, True, 0.1, torch.Generator().manual_seed(0))
    assert float(p.std()) == pytest.approx(0.1, rel=3e-2)
    assert perturb_warm_start(w, True, 0.0) is w


def test_sampler_config_parsing() -> None:
    assert SamplerConfig(name="ddim10").k == 10 and SamplerConfig(name="ddim10").kind == "ddim"
    assert SamplerConfig(name="step2").k == 2 and SamplerConfig(name="step2").kind == "step"
    assert SamplerConfig(name="ddpm").kind == "ddpm" and SamplerConfig(name="predictor").kind == "predictor"
    for bad in ("ddim", "ddim0", "step", "fast", "ddim-3"):
        with pytest.raises(UserError):
            SamplerConfig(name=bad)
    with pytest.raises(UserError):
        SamplerConfig(name="step2", sigma_stall=-1.0)


def coupled_model(pred: str = "epsilon"):
    """A denoiser whose output at each step depends on the chunk's first rows (so a prefix can steer the rest)."""

    def fn(x: torch.Tensor, t: int) -> torch.Tensor:
        head = x[:, :3].mean(dim=1, keepdim=True)  # (B, 1, A)
        return torch.tanh(0.5 * x + 0.8 * head)

    return fn


@pytest.mark.parametrize("k", [2, 10])
def test_inpainting_keeps_the_committed_prefix_and_conditions_the_rest(k: int) -> None:
    s = sched()
    fn = coupled_model()
    xT = torch.randn(1, 16, 7, generator=torch.Generator().manual_seed(3))
    prefix = torch.full((1, 3, 7), 0.6)
    free, _ = ddim_sample(fn, s, xT.shape, k, x_T=xT)
    inp, calls = ddim_sample(fn, s, xT.shape, k, x_T=xT, prefix=prefix)
    assert calls == k
    assert torch.equal(inp[:, :3], prefix)  # the committed actions come back exactly
    assert not torch.allclose(inp[:, 3:], free[:, 3:], atol=1e-3)  # and the rest was computed given them
    other, _ = ddim_sample(fn, s, xT.shape, k, x_T=xT, prefix=-prefix)
    assert not torch.allclose(other[:, 3:], inp[:, 3:], atol=1e-3)


def test_inpainting_with_an_oracle_and_warm_start() -> None:
    # a perfect denoiser for a target that already starts with the prefix: inpainting changes nothing
    s = sched()
    x0 = torch.rand(1, 16, 7) * 1.6 - 0.8
    out, _ = ddim_sample(oracle(s, x0, "epsilon"), s, (1, 16, 7), 10, gen=torch.Generator().manual_seed(0),
                         prefix=x0[:, :4])
    assert torch.allclose(out, x0, atol=1e-3)
    w = torch.zeros(1, 16, 7)
    pred_only, n = warm_start_sample(oracle(s, x0, "epsilon"), s, w, k=0, t_start=0, prefix=x0[:, :2])
    assert n == 0 and torch.equal(pred_only[:, :2], x0[:, :2]) and torch.equal(pred_only[:, 2:], w[:, 2:])
