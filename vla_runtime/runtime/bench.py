"""`vla-runtime bench NAME`: a technique against its baseline, in one process, on the same seeds.

Every benchmark writes `OUT/bench.json`:
  {"bench", "env", "episodes", "seeds", "machine", "baseline",
   "methods": [{"name", "success_pct", "success_ci95", "latency_ms_p50", "latency_ms_p95", "ratio_to_baseline", ...}]}
with ratio_to_baseline = baseline p50 latency / method p50 latency (> 1 is faster); each non-baseline method also
carries `paired` (its success against the baseline's on the same episodes: counts, exact McNemar p, Newcombe's
paired 95 % interval; runtime/compare.py), and the report `outcomes` (per method, 0/1 in episode order) with
`episode_keys`. Episode-level results of each method go to OUT/<method>/episodes.jsonl (+ eval_info.json) exactly
as `vla-runtime eval` writes them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vla_runtime.errors import UserError
from vla_runtime.runtime.compare import paired_stats
from vla_runtime.runtime.evaluate import EvalConfig, aggregate, episode_record, machine_info
from vla_runtime.runtime.loop import LoopConfig, run_episode
from vla_runtime.runtime.metrics import percentiles, wilson_ci


@dataclass
class Method:
    """One arm of a comparison: a policy (+ sampler / accelerations) and a loop configuration."""

    name: str
    policy: str
    sampler: str | None = None
    accel: tuple[str, ...] = ()
    loop: LoopConfig = field(default_factory=LoopConfig)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)


def compare_methods(bench: str, env_name: str, methods: list[Method], episodes: int, seed: int,
                    out: Path | None, baseline: str | None = None, device: str = "cpu",
                    extra_fields: Callable[[Method, list[dict[str, Any]]], dict[str, Any]] | None = None,
                    tasks: list[str] | None = None, progress: bool = True,
                    finalize: Callable[[dict[str, Any]], None] | None = None,
                    policies: dict[str, Any] | None = None,
                    episode_extra: Callable[[Method, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every method on the same episode specs (one env, reused) and write bench.json.

    `finalize(report)` may add fields computed across methods before the report is written and printed.
    `policies` (by method name) replaces building each method's policy from its name (e.g. wrapped policies);
    `episode_extra(method, policy)` is merged into each episode's record right after the episode."""
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy

    if not methods:
        raise UserError("no methods to compare")
    baseline = baseline or methods[0].name
    if policies is None:
        policies = {m.name: make_policy(m.policy, env_name=env_name, device=device, accel=m.accel,
                                        sampler=m.sampler, **m.policy_kwargs) for m in methods}
    cams = tuple(sorted({c for p in policies.values() for c in p.spec.cameras}))
    size = max((p.spec.image_size for p in policies.values() if p.spec.cameras), default=128)
    env = make_env(env_name, cameras=cams or None, image_size=size, render=bool(cams))
    results: list[dict[str, Any]] = []
    try:
        specs = env.episode_specs(seed, episodes, tasks)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(specs) * len(methods), desc=f"bench {bench}", unit="ep")
        per_method: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
        # Interleave methods per spec so slow drift of the machine (thermal, other load) hits all arms alike.
        for spec in specs:
            for m in methods:
                r = run_episode(env, policies[m.name], spec, m.loop)
                rec = episode_record(r, m.policy)
                rec["method"] = m.name
                if episode_extra is not None:
                    rec.update(episode_extra(m, policies[m.name]))
                per_method[m.name].append(rec)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        env.close()
    for m in methods:
        recs = per_method[m.name]
        agg = aggregate(recs)["aggregated"]
        inf = [x for r in recs for x in r["inference_ms"]]
        p = percentiles(inf)
        cpu = percentiles([x for r in recs for x in r.get("inference_cpu_ms", [])])
        row = {"name": m.name, "policy": m.policy, "sampler": m.sampler, "accel": list(m.accel),
               "loop": dataclasses.asdict(m.loop), "episodes": agg["episodes"],
               "success_pct": agg["success_pct"], "success_ci95": agg["success_ci95"],
               "latency_ms_p50": p["p50"], "latency_ms_p95": p["p95"], "latency_ms_p99": p["p99"],
               "cpu_ms_p50": cpu["p50"], "deadline_misses": agg["deadline_misses"], "reaction_ms_mean": agg["reaction_ms_mean"],
               "event_reaction_ms_mean": agg.get("event_reaction_ms_mean"), "stall_ticks": agg.get("stall_ticks"),
               "loop_hz": agg["loop_hz"]}
        for k, v in agg.items():
            if k.startswith("mean_"):
                row[k] = v
        if extra_fields is not None:
            row.update(extra_fields(m, recs))
        results.append(row)
        if out is not None:
            d = Path(out) / m.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = next(r for r in results if r["name"] == baseline)
    for r in results:
        r["ratio_to_baseline"] = (round(base["latency_ms_p50"] / r["latency_ms_p50"], 3)
                                  if base["latency_ms_p50"] and r["latency_ms_p50"] else None)
        # the same ratio in CPU time: what an idle machine would show when the wall ratio is blurred by other load
        r["cpu_ratio_to_baseline"] = (round(base["cpu_ms_p50"] / r["cpu_ms_p50"], 3)
                                      if base.get("cpu_ms_p50") and r.get("cpu_ms_p50") else None)
    # paired view: every arm ran the same specs in the same order, so episode i of each arm is one pair
    outcomes = {m.name: [int(bool(rec.get("success"))) for rec in per_method[m.name]] for m in methods}
    for r in results:
        if r["name"] != baseline:
            r["paired"] = paired_stats(outcomes[baseline], outcomes[r["name"]])
    report = {"bench": bench, "env": env_name, "episodes": len(specs), "episodes_per_task": episodes,
              "seeds": sorted({s.seed for s in specs}), "init_states": sorted({s.init_state for s in specs
                                                                               if s.init_state is not None}),
              "machine": machine_info(), "baseline": baseline, "methods": results,
              "episode_keys": [rec.get("key") for rec in per_method[baseline]], "outcomes": outcomes,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if finalize is not None:
        finalize(report)
    write_bench(report, out)
    print(format_bench(report))
    return report


def write_bench(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))


def format_paired(p: dict[str, Any] | None) -> str:
    """'+4 pp [-5, +13] p=0.39' (success difference to the baseline on the same episodes, Newcombe paired 95 % CI,
    exact McNemar p), '-' for the baseline itself."""
    if not p:
        return "-"
    lo, hi = p["diff_ci95"]
    return f"{p['diff_pp']:+.0f} pp [{lo:+.0f}, {hi:+.0f}] p={p['mcnemar_p']:.2f}"


def format_bench(report: dict[str, Any]) -> str:
    rows = [("method", "success %", "95% CI", "vs base [paired CI] p", "p50 ms", "p95 ms", "ratio", "cpu ratio",
             "extra")]
    for m in report["methods"]:
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        ci = m.get("success_ci95") or [0, 0]
        shown = [k for k in m.get("_show", ()) if k in m]  # a bench's own columns first, then the policy means
        shown += [k for k in m if k.startswith("mean_") and k not in shown]
        extra = " ".join(f"{k}={m[k]}" for k in shown)
        rows.append((m["name"], f(m.get("success_pct")), f"[{ci[0]:.0f}, {ci[1]:.0f}]", format_paired(m.get("paired")),
                     f(m.get("latency_ms_p50")),
                     f(m.get("latency_ms_p95")), "-" if m.get("ratio_to_baseline") is None
                     else f"{m['ratio_to_baseline']:.2f}x",
                     "-" if m.get("cpu_ratio_to_baseline") is None else f"{m['cpu_ratio_to_baseline']:.2f}x",
                     extra[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = f"bench {report['bench']} on {report['env']}, {report['episodes']} episodes, baseline {report['baseline']}"
    return head + "\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks owned by the runtime itself


def bench_loop(env_name: str, episodes: int, seed: int, out: Path | None) -> dict[str, Any]:
    """Loop overhead: everything in a tick except the env step and the policy, p50/p99 (target p99 <= 1 ms)."""
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy

    env_name = env_name or "dummy:reach"
    env = make_env(env_name, render=False)
    pol = make_policy("scripted", env_name=env_name)
    methods = []
    try:
        for clock, mode in (("unpaced", "sync"), ("sim", "sync"), ("sim", "async")):
            cfg = LoopConfig(clock=clock, mode=mode)  # type: ignore[arg-type]
            ovh: list[float] = []
            steps = 0
            for spec in env.episode_specs(seed, episodes):
                r = run_episode(env, pol, spec, cfg)
                ovh += [t.overhead_ms for t in r.ticks]
                steps += r.steps
            p = percentiles(ovh, (50, 99, 99.9))
            methods.append({"name": f"{clock}-{mode}", "ticks": steps, "overhead_ms_p50": p["p50"],
                            "overhead_ms_p99": p["p99"], "overhead_ms_p99_9": p["p99_9"],
                            "overhead_ms_max": float(np.max(ovh)) if ovh else None})
    finally:
        env.close()
    report = {"bench": "loop", "env": env_name, "episodes": episodes, "seeds": list(range(seed, seed + episodes)),
              "machine": machine_info(), "baseline": "unpaced-sync", "methods": methods}
    write_bench(report, out)
    for m in methods:
        print(f"{m['name']:14s} ticks {m['ticks']:6d}  overhead p50 {m['overhead_ms_p50']:.3f} ms  "
              f"p99 {m['overhead_ms_p99']:.3f} ms  p99.9 {m['overhead_ms_p99_9']:.3f} ms  max {m['overhead_ms_max']:.3f} ms")
    return report


def bench_render(env_name: str, steps: int, out: Path | None) -> dict[str, Any]:
    """Env step time without cameras, with 2 x 128 px cameras (fast render settings on and off)."""
    from vla_runtime.envs import make_env

    env_name = env_name or "robosuite:Lift"
    methods = []
    for label, kw in (("no-render", dict(render=False)), ("render-fast", dict(render=True, fast_render=True)),
                      ("render-default", dict(render=True, fast_render=False))):
        env = make_env(env_name, **kw)
        try:
            spec = env.episode_specs(0, 1)[0]
            env.reset(spec)
            rng = np.random.default_rng(0)
            ts = []
            n = 0
            while n < steps:
                a = rng.uniform(-0.3, 0.3, env.spec.action_dim).astype(np.float32)
                t0 = time.perf_counter()
                res = env.step(a)
                ts.append((time.perf_counter() - t0) * 1e3)
                n += 1
                if res.done:
                    env.reset(spec)
            p = percentiles(ts)
            methods.append({"name": label, "steps": n, "step_ms_p50": p["p50"], "step_ms_p95": p["p95"],
                            "step_ms_mean": float(np.mean(ts))})
            print(f"{label:15s} step p50 {p['p50']:.1f} ms  p95 {p['p95']:.1f} ms")
        finally:
            env.close()
    report = {"bench": "render", "env": env_name, "episodes": 1, "seeds": [0], "machine": machine_info(),
              "baseline": "no-render", "methods": methods}
    write_bench(report, out)
    return report


def run_bench(name: str, *, env: str = "", policy: str = "", episodes: int = 5, seed: int = 0,
              out: Path | None = None, steps: int = 200, threads: int | None = None,
              sampler: str | None = None, n_action_steps: int | None = None,
              arms: Sequence[str] | None = None, hold_at: int = 32, cpu_paths: str = "auto",
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    if options and name not in ("specprune", "earlyexit"):
        raise UserError(f"bench {name} takes no --options (only specprune and earlyexit do)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if name == "loop":
        return bench_loop(env, episodes, seed, out)
    if name == "render":
        return bench_render(env, steps, out)
    if name == "async":
        return bench_async(env or "robosuite:Lift", policy, episodes, seed, out, sampler, n_action_steps, arms)
    if name == "step":
        from vla_runtime.policies.diffusion.bench import bench_step

        return bench_step(env=env or "robosuite:Lift", policy=policy, episodes=episodes, seed=seed, out=out)
    if name == "stall":
        from vla_runtime.policies.diffusion.bench import STALL_ARMS, bench_stall

        return bench_stall(env=env or "robosuite:Lift", policy=policy or "diffusion:diffusion_lift",
                           episodes=episodes, seed=seed, out=out, arms=tuple(arms) if arms else STALL_ARMS,
                           hold_at=hold_at)
    if name == "vla":
        from vla_runtime.policies.vla.bench import bench_vla

        return bench_vla(policy or None, steps=steps, out_dir=out, cpu_paths=cpu_paths)
    if name == "specprune":
        from vla_runtime.policies.vla.specprune import bench_specprune

        return bench_specprune(env=env or "libero:libero_object", policy=policy, episodes=episodes, seed=seed, out=out,
                               options=options, arms=list(arms) if arms else None)
    if name == "earlyexit":
        from vla_runtime.policies.vla.early_exit import bench_earlyexit

        return bench_earlyexit(env=env or "libero:libero_object", policy=policy, episodes=episodes, seed=seed, out=out,
                               arms=tuple(arms) if arms else None, options=options)
    if name == "bridge":
        from vla_runtime.bridges.bench import bench_bridge

        return bench_bridge(episodes=episodes, steps=steps, out_dir=str(out) if out else None)
    if name == "kernels":
        from vla_runtime.kernels.bench import bench_kernels

        res = bench_kernels()
        write_bench({"bench": "kernels", "machine": machine_info(), **res}, out)
        return res
    raise UserError(f"unknown bench {name!r}")


ASYNC_ARMS = ("sync", "async", "async-no-inpaint", "async-future-state", "async-back-to-back")


def bench_async(env_name: str, policy: str, episodes: int, seed: int, out: Path | None,
                sampler: str | None = None, n_action_steps: int | None = None,
                arms: Sequence[str] | None = None) -> dict[str, Any]:
    """Sync vs async inference on the simulated real-time clock, same seeds: async with the committed actions
    inpainted (default), without (ablation), future-state-aware (VLASH-style alignment), and back-to-back.

    `n_action_steps` sets the execution horizon of every arm (sync's reaction grows with it, about
    (n + 1) / 2 periods, while back-to-back async stays near one period); `arms` runs a subset (sync always runs:
    it is the baseline)."""
    if not policy:
        from vla_runtime.policies import list_policies

        learned = [p for p in list_policies() if p.startswith("diffusion:")]
        if not learned:
            raise UserError("bench async needs a learned policy: --policy diffusion:<checkpoint>")
        policy = learned[0]
    if n_action_steps is not None and n_action_steps < 1:
        raise UserError(f"--n-action-steps must be >= 1, got {n_action_steps}")
    wanted = set(arms or ASYNC_ARMS) | {"sync"}
    unknown = sorted(wanted - set(ASYNC_ARMS))
    if unknown:
        raise UserError(f"unknown async arm(s) {unknown}; choose from {list(ASYNC_ARMS)}")
    sim = dict(clock="sim", n_action_steps=n_action_steps)
    methods = [Method("sync", policy, sampler, loop=LoopConfig(mode="sync", **sim)),
               # adaptive trigger, each chunk aligned to its observation's tick (the due head dropped)
               Method("async", policy, sampler, loop=LoopConfig(mode="async", future_state=False, **sim)),
               Method("async-no-inpaint", policy, sampler, loop=LoopConfig(mode="async", future_state=False,
                                                                         pass_committed=False, **sim)),
               Method("async-future-state", policy, sampler, loop=LoopConfig(mode="async", future_state=True, **sim)),
               # replan back to back: the next inference starts as soon as the last one lands
               Method("async-back-to-back", policy, sampler, loop=LoopConfig(mode="async", future_state=False,
                                                                    async_trigger=10_000, **sim))]
    methods = [m for m in methods if m.name in wanted]

    def extra(m: Method, recs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"_show": ("event_reaction_ms_mean", "stall_ticks", "reaction_ratio_to_sync")}

    def reaction_ratios(report: dict[str, Any]) -> None:
        base = next(r for r in report["methods"] if r["name"] == "sync")
        for r in report["methods"]:
            b, x = base.get("event_reaction_ms_mean"), r.get("event_reaction_ms_mean")
            r["reaction_ratio_to_sync"] = round(b / x, 2) if b and x else None
            print(f"  {r['name']}: event reaction {x} ms ({r['reaction_ratio_to_sync']}x lower than sync), "
                  f"stall ticks {r.get('stall_ticks')}, deadline misses {r.get('deadline_misses')}")

    return compare_methods("async", env_name, methods, episodes, seed, out, baseline="sync", extra_fields=extra,
                           finalize=reaction_ratios)
