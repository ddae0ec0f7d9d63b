"""Measure the robosuite scripted experts and the adapter's step cost.

  python scripts/measure_robosuite_experts.py --out /tmp/robosuite_measure             # everything
  python scripts/measure_robosuite_experts.py --out DIR --parts experts --tasks Lift     # a subset

Parts (each result is written to DIR/<part>.json (experts: DIR/experts_<task>.json) as soon as it is done; a rerun skips finished parts, so the
job is resumable):
  experts  success of the scripted expert over --episodes episodes per task (seeds --seed ...), render off
  step     ms per env.step for Lift: no render, and 2 cameras x --size px with fast render on/off, plus the
           single settings (MSAA off only; shadows+reflections off only) to see what each one buys
  reset    soft (hard_reset=False, what the adapter uses) vs hard robosuite resets, render off and on
Run it with one thread: OMP_NUM_THREADS=1 (set below if unset).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from vla_runtime.envs.base import EpisodeSpec  # noqa: E402
from vla_runtime.envs.robosuite_env import TASKS, RobosuiteEnv  # noqa: E402
from vla_runtime.policies.scripted.robosuite_experts import make_robosuite_expert  # noqa: E402
from vla_runtime.runtime.metrics import wilson_ci as wilson  # noqa: E402


def run_experts(tasks: list[str], seed: int, episodes: int, noise: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in tasks:
        env = RobosuiteEnv(task, render=False)
        per_ep = []
        t_step = 0.0
        n_step = 0
        for i in range(episodes):
            s = seed + i
            obs = env.reset(EpisodeSpec(f"robosuite:{task}", task, i, s))
            expert = make_robosuite_expert(task, noise=noise, seed=s)
            for _ in range(env.task_info(task).max_steps):
                a = expert(obs)
                t0 = time.perf_counter()
                r = env.step(a)
                t_step += time.perf_counter() - t0
                n_step += 1
                obs = r.obs
                if r.done:
                    break
            per_ep.append({"seed": s, "success": bool(r.success), "steps": obs.step,
                           "final_phase": getattr(expert, "phase", "")})
            print(f"{task} seed {s}: {'ok ' if r.success else 'FAIL'} {obs.step} steps "
                  f"({getattr(expert, 'phase', '')})", flush=True)
        env.close()
        k = sum(e["success"] for e in per_ep)
        lens = [e["steps"] for e in per_ep if e["success"]]
        out[task] = {"success": k, "episodes": episodes, "success_pct": 100 * k / episodes,
                     "success_ci95": wilson(k, episodes), "max_steps": env.task_info(task).max_steps,
                     "steps_mean_success": float(np.mean(lens)) if lens else None,
                     "steps_max_success": int(max(lens)) if lens else None,
                     "step_ms_mean": 1000 * t_step / max(n_step, 1), "per_episode": per_ep}
        print(f"== {task}: {k}/{episodes} ({100 * k / episodes:.0f} %), mean steps {out[task]['steps_mean_success']}, "
              f"max {out[task]['steps_max_success']}, {out[task]['step_ms_mean']:.1f} ms/step", flush=True)
    return out


def _time_steps(env: RobosuiteEnv, seeds: list[int], max_steps: int) -> tuple[float, float, int, float, float]:
    """Expert-driven steps; returns (mean ms, p50 ms, n, mean pixel of the last frame: proves it rendered,
    process CPU ms per step: all threads, Mesa's llvmpipe workers included; steadier than wall time on a
    shared machine)."""
    times = []
    cpu = 0.0
    obs = None
    for s in seeds:
        obs = env.reset(EpisodeSpec(env.spec.name, env.task, 0, s))
        expert = make_robosuite_expert(env.task)
        for _ in range(max_steps):
            a = expert(obs)
            c0 = time.process_time()
            t0 = time.perf_counter()
            r = env.step(a)
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
            obs = r.obs
            if r.done:
                break
    ms = 1000 * np.asarray(times)
    pix = float(np.mean([im.mean() for im in obs.images.values()])) if obs is not None and obs.images else 0.0
    return float(ms.mean()), float(np.median(ms)), len(ms), pix, 1000 * cpu / len(ms)


def run_step(size: int, seeds: list[int], dump_dir: Path | None = None) -> dict[str, Any]:
    from vla_runtime.envs.render import prepare_robosuite_import

    prepare_robosuite_import()  # GL env vars before mujoco binds its GL backend
    import mujoco

    def only_msaa(sim: Any) -> None:
        sim.model._model.vis.quality.offsamples = 0
        ctx = sim._render_context_offscreen
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()

    def only_shadow_refl(sim: Any) -> None:
        sim.model._model.light_castshadow[:] = 0
        ctx = sim._render_context_offscreen
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    variants: list[tuple[str, dict[str, Any], Any]] = [
        ("no_render", {"render": False}, None),
        ("render_fast", {"render": True, "fast_render": True}, None),
        ("render_default", {"render": True, "fast_render": False}, None),
        ("render_msaa_off_only", {"render": True, "fast_render": False}, only_msaa),
        ("render_shadow_reflection_off_only", {"render": True, "fast_render": False}, only_shadow_refl),
    ]
    out: dict[str, Any] = {"task": "Lift", "cameras": ["agentview", "wrist"], "image_size": size,
                           "gl": os.environ.get("MUJOCO_GL")}
    for name, kw, tweak in variants:
        env = RobosuiteEnv("Lift", image_size=size, **kw)
        env.reset(EpisodeSpec("robosuite:Lift", "Lift", 0, seeds[0]))  # build + GL context
        if tweak is not None:
            tweak(env.sim)
        if kw.get("render"):
            ctx = env.sim._render_context_offscreen
            out.setdefault("settings", {})[name] = {
                "offsamples": int(ctx.con.offSamples),
                "shadow": int(ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW]),
                "reflection": int(ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION])}
        mean, p50, n, pix, cpu_ms = _time_steps(env, seeds, 60)
        if kw.get("render") and dump_dir is not None:
            from PIL import Image

            obs = env._observation(env._last_obs)
            Image.fromarray(np.concatenate([obs.images[c] for c in env.spec.cameras], 1)).save(
                dump_dir / f"frame_{name}.png")
        env.close()
        out[name] = {"ms_mean": mean, "ms_p50": p50, "cpu_ms_mean": cpu_ms, "steps": n,
                     "last_frame_mean_pixel": pix, "loadavg_1m": os.getloadavg()[0]}
        print(f"step {name}: {mean:.1f} ms mean, {p50:.1f} ms p50, {cpu_ms:.1f} CPU ms over {n} steps "
              f"(mean pixel {pix:.1f}, load {os.getloadavg()[0]:.1f})", flush=True)
    out["gl"] = os.environ.get("MUJOCO_GL")
    out["fast_speedup_p50"] = out["render_default"]["ms_p50"] / out["render_fast"]["ms_p50"]
    out["fast_speedup_cpu"] = out["render_default"]["cpu_ms_mean"] / out["render_fast"]["cpu_ms_mean"]
    return out


def run_reset(n: int) -> dict[str, Any]:
    from vla_runtime.envs.render import check_gl, import_robosuite

    out: dict[str, Any] = {}
    check_gl()
    suite = import_robosuite()
    from robosuite import load_controller_config

    for render in (False, True):
        for hard in (False, True):
            env = suite.make("Lift", robots="Panda", controller_configs=load_controller_config(
                default_controller="OSC_POSE"), has_renderer=False, has_offscreen_renderer=render,
                use_camera_obs=render, camera_names=["agentview", "robot0_eye_in_hand"], camera_heights=128,
                camera_widths=128, control_freq=20, hard_reset=hard, ignore_done=True)
            env.reset()
            ts = []
            for i in range(n):
                np.random.seed(i)
                t0 = time.perf_counter()
                env.reset()
                ts.append(time.perf_counter() - t0)
            env.close()
            key = f"{'hard' if hard else 'soft'}_{'render' if render else 'no_render'}"
            out[key] = {"ms_mean": 1000 * float(np.mean(ts)), "resets": n, "loadavg_1m": os.getloadavg()[0]}
            print(f"reset {key}: {out[key]['ms_mean']:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="experts,step,reset")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--force", action="store_true", help="redo parts that already have a result file")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
               "omp_threads": os.environ.get("OMP_NUM_THREADS"), "node": platform.node()}
    parts = []
    for part in args.parts.split(","):  # one result file per expert task: a rerun resumes at the next task
        parts += [f"experts_{t}" for t in args.tasks.split(",")] if part == "experts" else [part]
    for part in parts:
        path = args.out / f"{part}.json"
        if path.exists() and not args.force:
            print(f"{part}: already done ({path})")
            continue
        t0 = time.time()
        if part.startswith("experts_"):
            res = run_experts([part.removeprefix("experts_")], args.seed, args.episodes, args.noise)
        elif part == "step":
            res = run_step(args.size, [args.seed, args.seed + 1, args.seed + 2], args.out)
        elif part == "reset":
            res = run_reset(5)
        else:
            raise SystemExit(f"unknown part {part!r}; valid: experts, step, reset")
        res = {"part": part, "machine": machine, "wall_s": time.time() - t0, "args": vars(args) | {"out": str(args.out)},
               "results": res}
        path.write_text(json.dumps(res, indent=1))
        print(f"{part}: wrote {path}")


if __name__ == "__main__":
    main()
