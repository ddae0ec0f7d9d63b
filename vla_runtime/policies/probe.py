"""What does a policy look at? Input-swap probes on recorded demos.

A closed-loop success rate says *that* a policy fails, not *why*. The swap probe asks which input a policy's
prediction comes from: for demo frames i = 1..N at step t it builds the observation of frame i (its images,
proprio state and instruction) and a *swapped* one with the images of another demo j of the same task (state and
instruction of i), and compares the policy's predicted motion over the next `horizon` actions, summed per action
dimension, with what the expert did next in demo i and in demo j:

- ``r_own``: correlation of the prediction on the true observation with the expert's motion (how well it predicts);
- ``r_images``: correlation of the swapped prediction with demo j's motion (the prediction follows the images);
- ``r_state``: correlation of the swapped prediction with demo i's motion (it follows the proprio state);
- ``mean_abs_change``: mean |own - swapped| prediction, next to ``expert_std`` (the spread across demos).

A dimension whose ``r_state`` is high and ``r_images`` low is predicted from the state alone: the policy does not
see what the images say about it (VLA.md "Session 10": the shift-augmented Lift VLA predicted its lateral motion
from the arm's position; one trained without the augmentation from the wrist image). Works for any `Policy`.

`vla-runtime probe --policy vla:vla_lift_parallel --data DIR --step 15` (held-out demos, never trained on).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation, Policy
from vla_runtime.train.demos import Demo, list_demos, read_demo


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r, None when either side is constant (no variation to explain)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sa, sb = a.std(), b.std()
    if len(a) < 3 or sa < 1e-9 or sb < 1e-9:
        return None
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def swap_pairs(tasks: Sequence[str]) -> list[tuple[int, int]]:
    """(i, j) pairs: j is another demo of i's task (rotated within each task, so every demo is an image source
    exactly once); demos whose task has no other demo are left out."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        groups[t].append(i)
    pairs = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        k = max(1, len(idx) // 3)  # rotate by a third of the group, not 1: neighbours (adjacent seeds) can be alike
        pairs += [(i, idx[(n + k) % len(idx)]) for n, i in enumerate(idx)]
    return sorted(pairs)


def _obs(d: Demo, t: int, images_from: Demo | None = None) -> Observation:
    src = images_from if images_from is not None else d
    return Observation(images={c: src.images[c][t] for c in src.images}, state=d.states[t],
                       instruction=d.instruction, stamp=0.0, step=t)


def _motion(policy: Policy, obs: Observation, horizon: int, dims: Sequence[int]) -> np.ndarray:
    policy.reset(obs.instruction)  # no history across probes: every prediction is a first step
    a = np.asarray(policy.act(obs).actions, np.float64)
    return a[:horizon][:, list(dims)].sum(0)


def swap_probe(policy: Policy, demos: Sequence[Demo], step: int = 15, horizon: int | None = None,
               dims: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """Run the swap probe (module docstring) at frame `step` of each demo; returns per-dimension statistics."""
    cams = tuple(policy.spec.cameras)
    horizon = int(horizon or policy.spec.chunk_size)
    if horizon < 1 or horizon > policy.spec.chunk_size:
        raise UserError(f"horizon must be in [1, {policy.spec.chunk_size}] (the policy's chunk), got {horizon}")
    usable = [d for d in demos if len(d) >= step + horizon]
    if len(usable) < 3:
        raise UserError(f"the swap probe needs >= 3 demos at least {step + horizon} steps long, got {len(usable)} "
                        f"of {len(demos)}")
    for d in usable:
        missing = [c for c in cams if c not in d.images]
        if missing:
            raise UserError(f"demo {d.task} seed {d.seed} lacks cameras {missing} the policy needs")
        if max(dims) >= d.actions.shape[1]:
            raise UserError(f"dims {list(dims)} out of range for {d.actions.shape[1]}-dim actions")
    pairs = swap_pairs([d.task for d in usable])
    if len(pairs) < 3:
        raise UserError("the swap probe needs >= 3 demos sharing a task with another demo")
    def truth(d: Demo) -> np.ndarray:  # what the expert did next
        return d.actions[step:step + horizon][:, list(dims)].sum(0).astype(np.float64)

    own_a = np.array([_motion(policy, _obs(usable[i], step), horizon, dims) for i, _ in pairs])
    swapped = np.array([_motion(policy, _obs(usable[i], step, images_from=usable[j]), horizon, dims)
                        for i, j in pairs])
    true_i = np.array([truth(usable[i]) for i, _ in pairs])
    true_j = np.array([truth(usable[j]) for _, j in pairs])
    per_dim = {}
    for k, d in enumerate(dims):
        per_dim[int(d)] = {
            "r_own": _corr(own_a[:, k], true_i[:, k]),
            "r_images": _corr(swapped[:, k], true_j[:, k]),
            "r_state": _corr(swapped[:, k], true_i[:, k]),
            "mean_abs_change": float(np.abs(own_a[:, k] - swapped[:, k]).mean()),
            "expert_std": float(true_i[:, k].std()),
        }
    return {"step": step, "horizon": horizon, "pairs": len(pairs), "demos": len(usable), "dims": per_dim}


def format_probe(res: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "   -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.2f}"

    lines = [f"swap probe at step {res['step']}, motion over {res['horizon']} actions, {res['pairs']} pairs",
             "dim  r_own  r_images  r_state  |own-swapped|  expert std"]
    for d, s in res["dims"].items():
        lines.append(f"{d:<4} {f(s['r_own'])}  {f(s['r_images'])}     {f(s['r_state'])}    "
                     f"{s['mean_abs_change']:9.3f}      {s['expert_std']:.3f}")
    return "\n".join(lines)


def load_probe_demos(data_dir: str | Path, cameras: Sequence[str], episodes: int, step: int) -> list[Demo]:
    """`episodes` demos spread over the directory (0: all), images read only up to frame `step` (all the probe
    looks at; a whole episode's frames would be most of the I/O)."""
    files = list_demos(data_dir)
    if episodes > 0 and len(files) > episodes:  # spread over the directory (tasks are contiguous in file order)
        files = [files[int(k)] for k in np.linspace(0, len(files) - 1, episodes).round()]
    return [read_demo(p, cameras=list(cameras), image_frames=slice(0, step + 1)) for p in files]
