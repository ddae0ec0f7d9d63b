"""`vla-runtime bench step`: STEP warm start against DDIM(k) / DDPM / predictor-only, same checkpoint, same seeds.

Methods (the denoiser is the same network in every arm; only the sampling strategy changes):
  ddim10 (baseline), ddim2, step2, step4, predictor (ablation: warm start, no refinement), ddpm (opt-in: 100
  denoiser calls per chunk make it ~10x slower than ddim10).
Per method, besides success and latency, bench.json gets the per-chunk split (encoder / sampler / predictor ms)
and the mean denoiser calls, warm-start and perturbation rates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vla_runtime.errors import UserError

DEFAULT_METHODS = ("ddim10", "ddim2", "step2", "step4", "predictor")


def _split_fields(_m: Any, recs: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [r.get("accel", {}) for r in recs if "error" not in r]
    out: dict[str, Any] = {}
    for k in ("mean_denoise_steps", "mean_warm_start", "mean_perturbed", "mean_encoder_ms", "mean_sampler_ms",
              "mean_predictor_ms", "mean_action_speed"):
        vals = [a[k] for a in acc if k in a]
        if vals:
            out[k] = round(float(np.mean(vals)), 3)
    return out


def bench_step(env: str = "robosuite:Lift", policy: str = "", episodes: int = 10, seed: int = 5000,
               out: Path | None = None, methods: tuple[str, ...] = DEFAULT_METHODS,
               **policy_kwargs: Any) -> dict[str, Any]:
    """Run each sampler of `methods` on the same episodes of `env` with the diffusion checkpoint `policy`.

    policy: "diffusion:<shipped name or dir>" (or a bare checkpoint directory). The first method is the
    baseline that `ratio_to_baseline` divides by."""
    from vla_runtime.runtime.bench import Method, compare_methods
    from vla_runtime.runtime.loop import LoopConfig

    if not policy:
        from vla_runtime.policies import list_policies

        learned = [p for p in list_policies() if p.startswith("diffusion:")]
        want = f"diffusion:diffusion_{env.partition(':')[2].lower()}"
        if want in learned:
            policy = want
        elif learned:
            policy = learned[0]
        else:
            raise UserError("bench step needs a diffusion checkpoint: --policy diffusion:<checkpoint dir>")
    if not policy.startswith("diffusion:"):
        policy = f"diffusion:{policy}"
    if not methods:
        raise UserError("bench step: no methods")
    arms = [Method(name=m, policy=policy, sampler=m, loop=LoopConfig(clock="unpaced", mode="sync"),
                   policy_kwargs=dict(policy_kwargs)) for m in methods]
    return compare_methods("step", env, arms, episodes, seed, out, baseline=methods[0], extra_fields=_split_fields)
