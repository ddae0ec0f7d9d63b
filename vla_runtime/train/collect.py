"""Collect scripted-expert demonstrations into per-episode HDF5 files, in parallel worker processes.

Seeds: demos use seeds from `seed` upward (default 100000, far from evaluation seeds 0-999) and, on LIBERO,
freshly sampled placements (init_state=None), never the benchmark init states. Every attempted seed is logged to
`attempts.jsonl` (success or not), so a resumed run neither repeats a recorded demo nor retries a failed seed.
Workers are spawned (not forked: MuJoCo/EGL contexts and torch threads do not survive fork), each builds its env
once per task and writes its own files atomically.

Takeover demos (`takeover=POLICY`, HG-DAgger style): a learned policy drives the episode for a random number of
steps, then the scripted expert takes over from wherever the policy left the robot and its actions are recorded
from that state on. Behaviour cloning only sees the expert's own states; these demos add the states the policy
itself reaches (a gripper beside the cube, a missed grasp) with the expert's recovery from them, and, because the
gripper starts anywhere relative to the object, they cannot be fitted from proprio alone.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.errors import UserError
from vla_runtime.train.demos import Demo, write_demo

DEFAULT_DEMO_SEED = 100_000


@dataclass(frozen=True)
class CollectConfig:
    env: str
    episodes: int  # successful demos per task
    out: Path
    seed: int = DEFAULT_DEMO_SEED
    workers: int = 1
    image_size: int = 128
    cameras: tuple[str, ...] = ()
    max_attempts_factor: float = 2.0  # give up on a task after episodes * factor attempts
    tasks: tuple[str, ...] = ()
    takeover: str = ""  # policy name (e.g. vla:vla_lift_parallel): record expert takeovers from its states
    takeover_after: tuple[int, int] = (10, 120)  # the policy drives a uniform number of steps in [lo, hi]

    def __post_init__(self) -> None:
        lo, hi = self.takeover_after
        if not 0 <= lo <= hi:
            raise UserError(f"takeover_after must be 0 <= lo <= hi, got {self.takeover_after}")


def _attempted(out: Path) -> dict[tuple[str, int], bool]:
    done: dict[tuple[str, int], bool] = {}
    p = out / "attempts.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
                done[(r["task"], int(r["seed"]))] = bool(r["success"])
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def record_expert(env: Any, spec: EpisodeSpec, obs: Any, max_steps: int) -> tuple[Demo | None, int]:
    """A fresh scripted expert acts from `obs` until success, the env's end or `max_steps`; returns (the recorded
    demo if it succeeded, steps taken)."""
    from vla_runtime.policies.scripted import make_expert

    expert = make_expert(spec.task)
    imgs: dict[str, list[np.ndarray]] = {c: [] for c in obs.images}
    states, actions = [], []
    for _ in range(max_steps):
        a = np.asarray(expert(obs), dtype=np.float32)
        for c, im in obs.images.items():
            imgs[c].append(im)
        states.append(obs.state)
        actions.append(a)
        res = env.step(a)
        obs = res.obs
        if res.success:
            demo = Demo(env=env.spec.name, task=spec.task, instruction=obs.instruction, seed=spec.seed,
                        actions=np.stack(actions), states=np.stack(states),
                        images={c: np.stack(v) for c, v in imgs.items()}, control_hz=env.spec.control_hz)
            return demo, len(actions)
        if res.done:
            break
    return None, len(actions)


def rollout_demo(env: Any, spec: EpisodeSpec) -> tuple[Demo | None, int]:
    """Run the scripted expert for `spec`; returns (demo if successful, steps)."""
    obs = env.reset(spec)
    return record_expert(env, spec, obs, env.task_info(spec.task).max_steps)


def takeover_switch_step(seed: int, after: tuple[int, int]) -> int:
    """The step at which the expert takes over for demo `seed` (deterministic, so resumed runs agree)."""
    return int(np.random.default_rng([seed, 7]).integers(after[0], after[1] + 1))


def rollout_takeover(env: Any, spec: EpisodeSpec, policy: Any, switch: int) -> tuple[Demo | None, int, dict[str, Any]]:
    """`policy` drives `switch` steps (executing `n_action_steps` of each chunk), then a fresh scripted expert
    takes over; the demo holds only the expert's part. Returns (demo if the expert succeeded, total steps, info).
    No demo when the policy itself succeeds or the episode ends before the switch."""
    obs = env.reset(spec)
    policy.reset(obs.instruction)
    queue: list[np.ndarray] = []
    t = 0
    while t < switch:
        if not queue:
            chunk = policy.act(obs)
            queue = list(chunk.actions[: policy.spec.n_action_steps])
        res = env.step(queue.pop(0))
        obs, t = res.obs, t + 1
        if res.success or res.done:
            return None, t, {"switch": switch, "policy_success": bool(res.success)}
    demo, n = record_expert(env, spec, obs, env.task_info(spec.task).max_steps)  # the env's limit ends it first
    return demo, t + n, {"switch": switch, "expert_steps": n}


def _worker(wid: int, cfg: CollectConfig, jobs: list[tuple[str, int]], q: Any, max_steps: int | None) -> None:
    """max_steps: the env's episode limit when it must differ from the task's own (takeover runs)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vla_runtime.envs import make_env

    parent = os.getppid()
    policy = None
    cameras, image_size = cfg.cameras or None, cfg.image_size
    if cfg.takeover:
        import torch

        from vla_runtime.policies import make_policy

        torch.set_num_threads(1)
        policy = make_policy(cfg.takeover, env_name=cfg.env)
        cameras, image_size = policy.spec.cameras or cameras, policy.spec.image_size
    env = make_env(cfg.env, cameras=cameras, image_size=image_size, render=True,
                   **({"max_steps": max_steps} if max_steps is not None else {}))
    try:
        for task, seed in jobs:
            if os.getppid() != parent:  # the coordinator was killed: do not keep collecting as an orphan
                return
            spec = EpisodeSpec(env=env.spec.name, task=task, index=0, seed=seed, init_state=None)
            t0 = time.perf_counter()
            info: dict[str, Any] = {}
            try:
                if policy is not None:
                    demo, steps, info = rollout_takeover(env, spec, policy,
                                                         takeover_switch_step(seed, cfg.takeover_after))
                else:
                    demo, steps = rollout_demo(env, spec)
            except Exception as e:  # noqa: BLE001 - a sim crash on one seed: report it, keep collecting
                q.put(("attempt", {"task": task, "seed": seed, "success": False, "error": f"{type(e).__name__}: {e}"}))
                continue
            if demo is not None:
                write_demo(cfg.out, demo)
            q.put(("attempt", {"task": task, "seed": seed, "success": demo is not None, "steps": steps,
                               "seconds": round(time.perf_counter() - t0, 2), "worker": wid, **info}))
    finally:
        env.close()
        q.put(("exit", wid))


def collect(cfg: CollectConfig, progress: bool = True) -> dict[str, Any]:
    """Collect until each task has `episodes` demos (or its attempt budget is spent). Resumable."""
    from vla_runtime.envs import make_env

    if cfg.episodes < 1:
        raise UserError("--episodes must be >= 1")
    if cfg.workers < 1:
        raise UserError("--workers must be >= 1")
    if cfg.takeover:  # fail here, with the policy's own error, rather than in every worker
        from vla_runtime.policies import make_policy

        make_policy(cfg.takeover, env_name=cfg.env)
    probe = make_env(cfg.env, render=False)
    tasks = [t.task for t in probe.tasks() if not cfg.tasks or t.task in cfg.tasks]
    # takeover: the expert gets the full episode length after the latest switch
    max_steps = max(t.max_steps for t in probe.tasks()) + cfg.takeover_after[1] if cfg.takeover else None
    probe.close()
    if not tasks:
        raise UserError(f"no tasks selected in {cfg.env}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each round schedules the seeds still needed (plus a margin for expected failures); when more seeds fail
    # than the margin covered, the next round schedules more, until every task has its demos or its budget is
    # spent. A round that records no attempt at all (workers dying) ends the run instead of looping.
    attempts = successes = 0
    while True:
        n_attempts, n_ok, have = _collect_round(cfg, tasks, out, progress, max_steps)
        attempts, successes = attempts + n_attempts, successes + n_ok
        short = {t: n for t, n in have.items() if n < cfg.episodes}
        if not short or n_attempts == 0:
            break
    return {"demos": have, "attempts": attempts, "successes": successes, "short": short, "out": str(out)}


def _schedule(cfg: CollectConfig, tasks: list[str], attempted: dict[tuple[str, int], bool]
              ) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """This round's (task, seed) jobs and the demos each task has. Each task gets its own seed range, so adding
    tasks later never changes another task's seeds. Beyond the seeds a task still needs, a few extra ones are
    scheduled for expected failures; they come after every task's needed seeds, so that a worker does not spend
    them on a task that already has its demos while another task waits (the coordinator stops the workers once
    every task is complete)."""
    budget = int(np.ceil(cfg.episodes * cfg.max_attempts_factor))
    needed: list[tuple[str, int]] = []
    extra: list[tuple[str, int]] = []
    have: dict[str, int] = {}
    for ti, task in enumerate(tasks):
        base = cfg.seed + ti * 10_000
        have[task] = sum(1 for (t, _s), ok in attempted.items() if t == task and ok)
        need = cfg.episodes - have[task]
        if need <= 0:
            continue
        tried = sum(1 for (t, _s) in attempted if t == task)
        seeds = [base + i for i in range(budget) if (task, base + i) not in attempted]
        n = max(0, min(len(seeds), budget - tried, int(need * 1.15) + 2))
        needed += [(task, s) for s in seeds[:min(n, need)]]
        extra += [(task, s) for s in seeds[min(n, need):n]]
    return needed + extra, have


def _collect_round(cfg: CollectConfig, tasks: list[str], out: Path, progress: bool,
                   max_steps: int | None) -> tuple[int, int, dict[str, int]]:
    """Schedule and run one round of seeds; returns (attempts, successes, demos per task)."""
    jobs, have = _schedule(cfg, tasks, _attempted(out))
    if not jobs:
        return 0, 0, have
    # Round-robin over workers; jobs stay in schedule order (each task's seeds contiguous within the needed and the
    # spare part), so a worker switches tasks rarely.
    shards: list[list[tuple[str, int]]] = [[] for _ in range(cfg.workers)]
    for i, job in enumerate(jobs):
        shards[i % cfg.workers].append(job)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(w, cfg, shard, q, max_steps), daemon=True) for w, shard in enumerate(shards) if shard]
    for p in procs:
        p.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.episodes * len(tasks), initial=sum(have.values()), desc=f"collect {cfg.env}", unit="demo")
    alive = len(procs)
    log = (out / "attempts.jsonl").open("a")
    n_attempts = n_ok = 0
    try:
        while alive:
            try:
                kind, payload = q.get(timeout=5.0)
            except Exception:  # queue.Empty: check for dead workers
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if kind == "exit":
                alive -= 1
                continue
            log.write(json.dumps(payload) + "\n")
            log.flush()
            n_attempts += 1
            if payload["success"]:
                have[payload["task"]] += 1
                n_ok += 1
                if bar is not None:
                    bar.update(1)
            if payload.get("error"):
                print(f"seed {payload['seed']} of {payload['task']} errored: {payload['error']}", file=sys.stderr)
            if all(have[t] >= cfg.episodes for t in tasks):
                break
    finally:
        log.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        if bar is not None:
            bar.close()
    return n_attempts, n_ok, have
