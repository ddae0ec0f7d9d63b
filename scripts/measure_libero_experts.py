"""Measure the scripted LIBERO experts: success per task on the benchmark init states, and step time.

Runs with render=False (privileged state only), episode i of task t with seed S+i and init state (S+i) mod 50
(the standard protocol). Results are appended to a JSON-lines file, one line per episode, so an interrupted
run resumes where it stopped (`--out` again). At the end a markdown table per task is printed.

    python scripts/measure_libero_experts.py --suites libero_object libero_spatial --episodes 50 \
        --out /tmp/logs/libero_experts.jsonl
    python scripts/measure_libero_experts.py --timing --out /tmp/logs/libero_timing.jsonl   # step time only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _episode(env, spec, expert_factory, trace: bool) -> dict:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    obs = env.reset(spec)
    t_reset = time.perf_counter() - t0
    expert = expert_factory(spec.task)
    max_steps = env.task_info(spec.task).max_steps
    success, steps, phases = False, 0, []
    t1 = time.perf_counter()
    for _ in range(max_steps):
        a = expert(obs)
        if trace and (not phases or phases[-1][0] != expert.phase):
            phases.append((expert.phase, steps))
        r = env.step(a)
        obs = r.obs
        steps += 1
        if r.done:
            success = r.success
            break
    dt = time.perf_counter() - t1
    out = {"key": spec.key(), "task": spec.task, "seed": spec.seed, "init_state": spec.init_state,
           "success": bool(success), "steps": steps, "reset_s": round(t_reset, 3),
           "step_ms": round(1e3 * dt / max(steps, 1), 2), "attempts": getattr(expert, "attempts", 0),
           "tight_grasps": getattr(expert, "tight_grasps", None), "slides": getattr(expert, "slides", None)}
    if trace:
        out["phases"] = phases
    return out


def measure_success(args: argparse.Namespace) -> None:
    from vla_runtime.envs import make_env
    from vla_runtime.policies.scripted.libero_experts import make_libero_expert

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["key"])
    for suite in args.suites:
        env = make_env(f"libero:{suite}", render=False)
        task_ids = [f"{suite}/{i}" for i in (args.tasks if args.tasks else range(10))]
        specs = {t: env.episode_specs(seed=args.seed, episodes=args.episodes, tasks=[t]) for t in task_ids}
        # blocks of `--block` episodes per task, task after task: every task has a similar count at any time
        # (a partial run is still a fair per-task table) while switching tasks (rebuilding the env) stays rare
        for start in range(0, args.episodes, args.block):
            for task in task_ids:
                for spec in specs[task][start:start + args.block]:
                    if spec.key() in done:
                        continue
                    rec = _episode(env, spec, make_libero_expert, args.trace)
                    with out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)
        env.close()
    print_table(out)


def print_table(path: Path) -> None:
    rows: dict[str, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "success" in r:
                rows[r["task"]].append(r)
    print("\n| task | episodes | success | success % | mean steps (successes) | step ms (no render) |")
    print("|---|---|---|---|---|---|")
    for task in sorted(rows, key=lambda t: (t.split("/")[0], int(t.split("/")[1]))):
        rs = rows[task]
        n = len(rs)
        k = sum(r["success"] for r in rs)
        st = [r["steps"] for r in rs if r["success"]]
        ms = np.mean([r["step_ms"] for r in rs])
        print(f"| {task} | {n} | {k} | {100 * k / n:.0f} | {np.mean(st) if st else float('nan'):.0f} | {ms:.1f} |")


def measure_timing(args: argparse.Namespace) -> None:
    """Step time with render=False vs two 128 px cameras, same task, same actions (no-ops + expert)."""
    from vla_runtime.envs import EpisodeSpec, make_env
    from vla_runtime.policies.scripted.libero_experts import make_libero_expert

    res = []
    for suite in args.suites:
        task = f"{suite}/{args.tasks[0] if args.tasks else 0}"
        for render in (False, True):
            env = make_env(f"libero:{task}", render=render, image_size=128)
            spec = EpisodeSpec(env.spec.name, task, 0, seed=args.seed, init_state=args.seed % 50)
            obs = env.reset(spec)
            expert = make_libero_expert(task)
            times = []
            for _ in range(args.timing_steps):
                a = expert(obs)
                t0 = time.perf_counter()
                r = env.step(a)
                times.append(time.perf_counter() - t0)
                obs = r.obs
                if r.done:
                    obs = env.reset(spec)
                    expert = make_libero_expert(task)
            env.close()
            t = np.array(times) * 1e3
            rec = {"suite": suite, "task": task, "cameras": list(env.spec.cameras), "image_size": 128,
                   "steps": len(t), "step_ms_p50": round(float(np.median(t)), 2),
                   "step_ms_mean": round(float(t.mean()), 2), "step_ms_p95": round(float(np.percentile(t, 95)), 2)}
            res.append(rec)
            print(json.dumps(rec), flush=True)
    with Path(args.out).open("a") as f:
        for r in res:
            f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="+", default=["libero_object", "libero_spatial"],
                    choices=["libero_object", "libero_spatial"])
    ap.add_argument("--tasks", nargs="*", type=int, default=None, help="task indices (default: all 10)")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task")
    ap.add_argument("--seed", type=int, default=0, help="episode i uses seed S+i, init state (S+i) mod 50")
    ap.add_argument("--out", default="/tmp/logs/libero_experts.jsonl", help="JSON-lines results (resumable)")
    ap.add_argument("--block", type=int, default=10, help="episodes per task before moving to the next task")
    ap.add_argument("--trace", action="store_true", help="record the expert's phase changes per episode")
    ap.add_argument("--timing", action="store_true", help="measure step time with/without cameras instead")
    ap.add_argument("--timing-steps", type=int, default=200)
    ap.add_argument("--table", action="store_true", help="only print the table of an existing --out file")
    args = ap.parse_args(argv)
    if args.episodes < 1 or args.block < 1:
        sys.exit("--episodes and --block must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.table:
        print_table(Path(args.out))
    elif args.timing:
        measure_timing(args)
    else:
        measure_success(args)


if __name__ == "__main__":
    main()
