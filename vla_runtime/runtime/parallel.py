"""Scale-out evaluation: episode specs run in local worker processes or as Ray actors, no episode lost.

The unit of work is an `EpisodeSpec`. Each worker builds the policy once and the env once (the env adapters
reuse their simulator per task), then runs the specs it is handed. Results stream into the same
episodes.jsonl as the single-process run (one fsync'ed line per episode, written only by the coordinator), and
eval_info.json is assembled from it the same way, so `--workers N` and `--ray` give the same report as a
single-process run on the same specs.

Failure model: a worker that dies (MuJoCo segfault, OOM kill, a lost Ray node) costs only its in-flight
episode. That spec is retried on a fresh worker up to `max_attempts` times, then recorded as an *error*
(never as a failed episode). `--resume` skips specs already recorded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from typing import Any

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.errors import UserError
from vla_runtime.runtime.evaluate import (
    EvalConfig,
    _progress,
    append_record,
    build_eval_info,
    check_compatible,
    episode_record,
    error_record,
    prepare_out_dir,
    save_video,
)

MAX_ATTEMPTS = 3


class EpisodeRunner:
    """Holds one policy and one env; runs specs. Used by local workers and Ray actors alike."""

    def __init__(self, cfg: EvalConfig) -> None:
        from vla_runtime.envs import make_env
        from vla_runtime.policies import make_policy

        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.policy = make_policy(cfg.policy, env_name=cfg.env, device=cfg.device, accel=cfg.accel,
                                  sampler=cfg.sampler, **cfg.policy_options)
        cams = self.policy.spec.cameras or None
        size = self.policy.spec.image_size if self.policy.spec.cameras else cfg.image_size
        self.env = make_env(cfg.env, cameras=cams, image_size=size,
                            render=bool(self.policy.spec.cameras) or cfg.video > 0, **cfg.env_kwargs())
        check_compatible(self.policy.spec, self.env.spec)

    def run(self, spec_dict: dict[str, Any], out_dir: str) -> dict[str, Any]:
        """Run one spec; returns its episodes.jsonl record (an error record if the episode raised)."""
        import dataclasses
        from pathlib import Path

        from vla_runtime.runtime.loop import run_episode

        spec = EpisodeSpec.from_dict(spec_dict)
        want_video = self.cfg.video > 0 and spec.index < self.cfg.video
        lc = self.cfg.loop if not want_video else dataclasses.replace(self.cfg.loop,
                                                                       record_camera=self.env.spec.cameras[0])
        try:
            result = run_episode(self.env, self.policy, spec, lc)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded as an error, never as a failure
            return error_record(spec, self.cfg.policy, e)
        if want_video and result.frames:
            tag = "success" if result.success else "failure"
            save_video(result.frames, Path(out_dir) / "videos" /
                       f"{spec.task.replace('/', '-')}__seed{spec.seed}__{tag}.mp4", self.env.spec.control_hz)
        rec = episode_record(result, self.cfg.policy)
        rec["worker_pid"] = os.getpid()
        return rec

    def close(self) -> None:
        self.env.close()


def _local_worker(wid: int, cfg: EvalConfig, out_dir: str, tasks: Any, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        runner = EpisodeRunner(cfg)
    except Exception as e:  # noqa: BLE001 - reported to the coordinator, which stops the run
        results.put(("fatal", wid, f"{type(e).__name__}: {e}"))
        return
    parent = os.getppid()
    try:
        while True:
            try:
                item = tasks.get(timeout=1.0)
            except queue_mod.Empty:
                if os.getppid() != parent:  # the coordinator was killed: an orphan must not keep running episodes
                    return
                continue
            if item is None:
                break
            results.put(("start", wid, item["key"]))
            try:
                rec = runner.run(item["spec"], out_dir)
            except UserError as e:
                results.put(("fatal", wid, str(e)))
                return
            results.put(("done", wid, rec))
    finally:
        runner.close()


def _specs_and_out(cfg: EvalConfig) -> tuple[list[EpisodeSpec], Any, set[str], float]:
    from vla_runtime.envs import make_env

    env = make_env(cfg.env, render=False, **cfg.env_kwargs())
    try:
        specs = env.episode_specs(cfg.seed, cfg.episodes, list(cfg.tasks) or None)
        hz = env.spec.control_hz
    finally:
        env.close()
    if not specs:
        raise UserError(f"no episodes selected in {cfg.env}")
    out, done = prepare_out_dir(cfg, specs)
    return specs, out, done, hz


def evaluate_parallel(cfg: EvalConfig, workers: int = 2, ray_address: str | None = None,
                      max_attempts: int = MAX_ATTEMPTS, progress: bool | None = None) -> dict[str, Any]:
    if cfg.episodes < 1:
        raise UserError("--episodes must be >= 1")
    if workers < 1:
        raise UserError("--workers must be >= 1")
    specs, out, done, hz = _specs_and_out(cfg)
    todo = [s for s in specs if s.key() not in done]
    show = sys.stderr.isatty() or bool(os.environ.get("VLA_PROGRESS")) if progress is None else progress
    t0 = time.perf_counter()
    if todo:
        if ray_address:
            _run_ray(cfg, todo, out, ray_address, workers, max_attempts, len(specs) - len(todo), len(specs), show)
        else:
            _run_local(cfg, todo, out, workers, max_attempts, len(specs) - len(todo), len(specs), show)
    wall = time.perf_counter() - t0
    par = {"workers": workers, "ray": ray_address, "wall_s": round(wall, 2), "episodes_run": len(todo),
           "episodes_per_hour_wall": round(3600 * len(todo) / wall, 1) if wall > 0 and todo else None}
    info = build_eval_info(out, cfg, specs, hz, extra={"parallel": par})
    info["out_dir"] = str(out)
    return info


def _run_local(cfg: EvalConfig, todo: list[EpisodeSpec], out: Any, workers: int, max_attempts: int,
               initial: int, total: int, show: bool) -> None:
    ctx = mp.get_context("spawn")
    tasks = ctx.Queue()
    results = ctx.Queue()
    for s in todo:
        tasks.put({"key": s.key(), "spec": s.to_dict()})
    by_key = {s.key(): s for s in todo}
    attempts = {s.key(): 0 for s in todo}
    procs: dict[int, Any] = {}
    inflight: dict[int, str | None] = {}
    per_worker: dict[int, int] = {}
    next_id = 0

    def spawn() -> None:
        nonlocal next_id
        wid = next_id
        next_id += 1
        p = ctx.Process(target=_local_worker, args=(wid, cfg, str(out), tasks, results), daemon=True)
        p.start()
        procs[wid] = p
        inflight[wid] = None
        per_worker[wid] = 0

    n = min(workers, len(todo))
    for _ in range(n):
        spawn()
    remaining = set(by_key)
    bar = _progress(total, initial, show, desc=f"{cfg.env} x{n} workers")
    t0 = time.perf_counter()
    try:
        while remaining:
            try:
                kind, wid, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                kind = None
            if kind == "fatal":
                raise UserError(f"worker {wid}: {payload}")
            if kind == "start":
                inflight[wid] = payload
                attempts[payload] += 1
            elif kind == "done":
                key = payload["key"]
                inflight[wid] = None
                if key in remaining:
                    if "error" in payload and attempts[key] < max_attempts:
                        tasks.put({"key": key, "spec": by_key[key].to_dict()})  # retry a raised episode
                    else:
                        payload["attempts"] = attempts[key]
                        append_record(out / "episodes.jsonl", payload)
                        remaining.discard(key)
                        per_worker[wid] += 1
                        bar.update(1)
                        el = time.perf_counter() - t0
                        bar.set_postfix_str(" ".join(f"w{w}:{c / el * 3600:.0f}/h" for w, c in per_worker.items()
                                                     if w in procs or c))
            # reap dead workers: their in-flight spec is retried (bounded), then recorded as an error
            for wid, p in list(procs.items()):
                if p.is_alive() or p.exitcode is None:
                    continue
                if inflight.get(wid) is None and p.exitcode == 0:
                    continue
                key = inflight.pop(wid, None)
                del procs[wid]
                if key is not None and key in remaining:
                    print(f"worker {wid} died (exit {p.exitcode}) during {key}; attempt {attempts[key]}/{max_attempts}",
                          file=sys.stderr)
                    if attempts[key] < max_attempts:
                        tasks.put({"key": key, "spec": by_key[key].to_dict()})
                    else:
                        append_record(out / "episodes.jsonl",
                                      error_record(by_key[key], cfg.policy,
                                                   RuntimeError(f"worker died (exit code {p.exitcode})"),
                                                   attempts[key]))
                        remaining.discard(key)
                        bar.update(1)
                if remaining and len(procs) < n:
                    spawn()
    finally:
        for _ in procs:
            tasks.put(None)
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        bar.close()


def _run_ray(cfg: EvalConfig, todo: list[EpisodeSpec], out: Any, address: str, workers: int, max_attempts: int,
             initial: int, total: int, show: bool) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)

    Actor = ray.remote(max_restarts=0, max_task_retries=0)(EpisodeRunner)
    by_key = {s.key(): s for s in todo}
    attempts = {k: 0 for k in by_key}
    pending = list(by_key)
    actors = [Actor.options(num_cpus=1).remote(cfg) for _ in range(min(workers, len(todo)))]
    running: dict[Any, tuple[Any, str]] = {}
    bar = _progress(total, initial, show, desc=f"{cfg.env} ray x{len(actors)}")
    idle = list(actors)
    try:
        while pending or running:
            while idle and pending:
                a = idle.pop()
                key = pending.pop(0)
                attempts[key] += 1
                running[a.run.remote(by_key[key].to_dict(), str(out))] = (a, key)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                a, key = running.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the actor (process/node) died: replace it
                    if attempts[key] < max_attempts:
                        pending.insert(0, key)
                    else:
                        append_record(out / "episodes.jsonl",
                                      error_record(by_key[key], cfg.policy, RuntimeError(f"actor died: {e}"),
                                                   attempts[key]))
                        bar.update(1)
                    idle.append(Actor.options(num_cpus=1).remote(cfg))
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if hasattr(e, "cause") else e
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise
                if "error" in rec and attempts[key] < max_attempts:
                    pending.insert(0, key)
                else:
                    rec["attempts"] = attempts[key]
                    append_record(out / "episodes.jsonl", rec)
                    bar.update(1)
                idle.append(a)
    finally:
        bar.close()
        for a in actors + idle:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already dead
                pass
