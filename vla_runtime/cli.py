"""`vla-runtime <verb>`: eval, collect, train, bench, list, robot, keys, probe.

Every verb is a typed function; tyro turns its signature and docstring into flags and help. A `UserError`
anywhere becomes one line on stderr and exit code 2: no traceback for bad input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from tyro.conf import Positional

from vla_runtime.errors import UserError

Clock = Literal["unpaced", "sim", "wall"]


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _json_options(text: str, flag: str) -> dict[str, Any]:
    """A JSON-object flag (empty string: none); anything else is a UserError saying why."""
    if not text.strip():
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(val, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"sigma_stall\": 0.5}}', got {text!r}")
    return val


def parse_policy_options(text: str) -> dict[str, Any]:
    """--policy-options: a JSON object (empty string: none); anything else is a UserError saying why."""
    return _json_options(text, "--policy-options")


def eval(  # noqa: A001 - the verb is `eval`
    env: str = "robosuite:Lift",
    policy: str = "diffusion:diffusion_lift",
    episodes: int = 10,
    seed: int = 0,
    out: Path | None = None,
    task: str = "",
    paced: bool = False,
    clock: Clock | None = None,
    mode: Literal["sync", "async"] = "sync",
    n_action_steps: int | None = None,
    async_trigger: int = 2,
    blend: Literal["latest", "weighted"] = "latest",
    future_state: bool = True,
    pass_committed: bool = True,
    video: int = 0,
    resume: bool = False,
    device: str = "cpu",
    accel: str = "",
    sampler: str | None = None,
    threads: int | None = None,
    workers: int = 1,
    ray: str | None = None,
    max_steps: int | None = None,
    keys: Path | None = None,
    policy_options: str = "",
) -> None:
    """Run closed-loop episodes of POLICY on ENV; write episodes.jsonl and eval_info.json to OUT.

    Args:
        env: robosuite:Lift|Stack|PickPlaceCan, libero:<suite> (all 10 tasks), libero:<suite>/<i>, remote:tcp://HOST:PORT.
        policy: scripted, diffusion:<shipped name or dir>, vla:<shipped name or dir> (see `vla-runtime list`).
        episodes: episodes per task.
        seed: first seed; robosuite episode i uses seed+i, LIBERO episode i uses init state (seed+i) mod 50.
        out: output directory (default outputs/eval-<time>).
        task: comma-separated task ids to restrict to (e.g. libero_object/3).
        paced: real-time control at the env rate in simulated time (same as --clock sim).
        clock: unpaced (as fast as possible), sim (real time, simulated clock), wall (real time, wall clock).
        mode: sync (infer when the chunk is used up) or async (infer the next chunk while executing).
        n_action_steps: actions executed per chunk (default: the policy's).
        async_trigger: async: start inferring when this many queued actions remain (raised to the expected
            latency + 1 automatically; >= the chunk size replans back to back, the lowest reaction latency).
        blend: how a new chunk merges with queued actions.
        future_state: async: condition on the state rolled forward over the inference latency.
        pass_committed: async without --future-state: give the policy the actions that execute while it infers
            (the diffusion policy inpaints them as its chunk's start).
        video: save mp4s of the first K episodes of each task (outcome in the file name).
        resume: continue a killed run in OUT, skipping recorded episodes.
        device: torch device for learned policies (cpu, cuda, cuda:1).
        accel: comma-separated accelerations for VLAs: specprune, earlyexit.
        sampler: diffusion sampler: ddpm, ddim<k>, step<k>, predictor.
        threads: torch intra-op threads.
        workers: run episodes in N local worker processes.
        ray: run episodes as Ray tasks: 'local' or a cluster address.
        max_steps: override the task's max steps.
        keys: remote envs: directory with CurveZMQ keys from `vla-runtime keys` (required off loopback).
        policy_options: JSON object of extra policy options, e.g. '{"sigma_stall": 0.5}' (diffusion sampler
            settings) or '{"accel_options": {"prune-fastv": {"budget": 0.25}}}' (VLA acceleration settings).
    """
    from vla_runtime.runtime.evaluate import EvalConfig, evaluate, format_table
    from vla_runtime.runtime.loop import LoopConfig

    clk: Clock = clock or ("sim" if paced else "unpaced")
    if mode == "async" and clk == "unpaced":
        raise UserError("--mode async needs a paced clock: add --paced (or --clock sim|wall)")
    loop = LoopConfig(clock=clk, mode=mode, n_action_steps=n_action_steps, async_trigger=async_trigger, blend=blend,
                      future_state=future_state, pass_committed=pass_committed, max_steps=max_steps)
    cfg = EvalConfig(env=env, policy=policy, episodes=episodes, seed=seed, out=out, tasks=_split(task), loop=loop,
                     video=video, resume=resume, device=device, accel=_split(accel), sampler=sampler,
                     threads=threads, keys_dir=str(keys) if keys else None,
                     policy_options=parse_policy_options(policy_options))
    if workers > 1 or ray:
        from vla_runtime.runtime.parallel import evaluate_parallel

        info = evaluate_parallel(cfg, workers=workers, ray_address=ray)
    else:
        info = evaluate(cfg, progress=sys.stderr.isatty() or bool(os.environ.get("VLA_PROGRESS")))
    print(format_table(info))
    agg, par = info["aggregated"], info.get("parallel") or {}
    rate = par.get("episodes_per_hour_wall") or agg.get("episodes_per_hour")
    where = f"{par['workers']} {'Ray actors' if par.get('ray') else 'workers'}" if par else "1 process"
    print(f"success {agg['success_pct']}% over {agg['episodes']} episodes; loop {agg['loop_hz']} Hz; "
          f"{rate} episodes/hour ({where}); results in {info['out_dir']}/eval_info.json")


def _int_pair(text: str, flag: str) -> tuple[int, int]:
    parts = _split(text)
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"{flag} wants two integers LO,HI, got {text!r}") from None
    return lo, hi


def collect(
    env: str,
    episodes: int,
    out: Path,
    seed: int = 100_000,
    workers: int = 1,
    image_size: int = 128,
    task: str = "",
    max_attempts_factor: float = 2.0,
    takeover: str = "",
    takeover_after: str = "10,120",
) -> None:
    """Record successful scripted-expert demos (images, state, actions, instruction, seed) as HDF5 files in OUT.

    Resumable: re-running the same command continues where it stopped. LIBERO demos use freshly sampled
    placements, never the benchmark init states.

    Args:
        env: env name, as for eval.
        episodes: successful demos wanted per task.
        out: directory for the demo files.
        seed: first seed (each task gets its own range seed + 10000 * task_index + i).
        workers: parallel worker processes.
        image_size: camera resolution.
        task: comma-separated task ids to restrict to.
        max_attempts_factor: give up on a task after episodes * factor attempts.
        takeover: a policy (e.g. vla:vla_lift_parallel) that drives each episode first; the expert takes over
            after a random number of steps and only its part is recorded (recovery demos from the policy's states).
        takeover_after: LO,HI: the policy drives a uniform number of steps in [LO, HI].
    """
    from vla_runtime.train.collect import CollectConfig
    from vla_runtime.train.collect import collect as run

    res = run(CollectConfig(env=env, episodes=episodes, out=out, seed=seed, workers=workers, image_size=image_size,
                            tasks=_split(task), max_attempts_factor=max_attempts_factor, takeover=takeover,
                            takeover_after=_int_pair(takeover_after, "--takeover-after")),
              progress=sys.stderr.isatty() or bool(os.environ.get("VLA_PROGRESS")))
    print(json.dumps(res, indent=1))
    if res.get("short"):
        print(f"warning: tasks short of {episodes} demos after the attempt budget: {res['short']}", file=sys.stderr)


def train(
    policy: Literal["diffusion", "vla", "exit-predictors"],
    out: Path,
    data: str = "",
    steps: int = 20_000,
    batch_size: int = 64,
    resume: bool = True,
    threads: int | None = None,
    mode: Literal["parallel", "ar"] = "parallel",
    checkpoint: str | None = None,
    device: str = "cpu",
    ema: float = 0.0,
    init_from: str | None = None,
    target_precision: float | None = None,
    max_chunks: int = 400,
    rollout_env: str | None = None,
    rollout_episodes: int = 20,
    rollout_seed: int = 100_000,
) -> None:
    """Train a policy on demo directories (comma-separated DATA) into OUT; resumable.

    Args:
        policy: diffusion, vla, or exit-predictors (early-exit predictors for a trained VLA CHECKPOINT).
        data: comma-separated demo directories.
        out: checkpoint directory.
        steps: optimisation steps.
        batch_size: batch size.
        resume: continue from OUT's last checkpoint if present.
        threads: torch intra-op threads.
        mode: vla decoding mode: parallel (OFT-style chunk, L1) or ar (OpenVLA-style action tokens).
        checkpoint: the VLA checkpoint to train exit predictors for.
        device: torch device.
        ema: vla: EMA decay of the weights saved as model.safetensors (e.g. 0.999; 0 = off; diffusion always
            keeps an EMA).
        init_from: start from this checkpoint (shipped name or dir) when OUT holds no training state; its
            weights and normalisation are kept, the optimiser starts fresh. vla: every weight that fits is copied,
            so an AR run can start from a parallel run's trunk (--mode ar --init-from vla_libero_object).
        target_precision: exit-predictors: each layer's threshold is the lowest whose exits are correct at this
            rate on held-out chunks (default 0.99 AR, 0.95 parallel); lower trades agreement for depth.
        max_chunks: exit-predictors: rollout chunks collected from the demos for training.
        rollout_env: exit-predictors: also let the VLA act in this env itself (closed loop) and train on the
            states it meets there (its own, as early exit meets them online); DATA may then be empty.
        rollout_episodes: exit-predictors: closed-loop episodes in ROLLOUT_ENV.
        rollout_seed: exit-predictors: first seed of those episodes (keep it clear of evaluation seeds).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    dirs = [Path(d) for d in _split(data)]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"demo directory {d} does not exist")
    if not dirs and not (policy == "exit-predictors" and rollout_env):
        raise UserError("--data is required (comma-separated demo directories)")
    if policy == "diffusion":
        from vla_runtime.train.train_diffusion import train_diffusion

        init = None
        if init_from:
            from vla_runtime.policies import resolve_checkpoint

            init = resolve_checkpoint(init_from)
        train_diffusion(dirs if len(dirs) > 1 else dirs[0], out, steps=steps, batch_size=batch_size, resume=resume,
                        init_from=init)
    elif policy == "vla":
        from vla_runtime.train.train_vla import train_vla

        init = None
        if init_from:
            from vla_runtime.policies import resolve_checkpoint

            init = resolve_checkpoint(init_from)
        train_vla(dirs, out, mode=mode, steps=steps, batch_size=batch_size, resume=resume, ema_decay=ema,
                  init_from=init)
    elif init_from:
        raise UserError("--init-from is for --policy diffusion or vla")
    else:
        if not checkpoint:
            raise UserError("--checkpoint is required for exit-predictors")
        from vla_runtime.policies.vla.early_exit import train_exit_predictors

        train_exit_predictors(checkpoint, dirs, out, device=device, target_precision=target_precision,
                              max_chunks=max_chunks, rollout_env=rollout_env, rollout_episodes=rollout_episodes,
                              rollout_seed=rollout_seed)


def probe(
    policy: str,
    data: Path,
    step: int = 15,
    episodes: int = 30,
    horizon: int | None = None,
    threads: int | None = 1,
    out: Path | None = None,
) -> None:
    """What a policy looks at: swap each demo frame's images with another demo's of the same task and see whether
    the predicted motion follows the images or the proprio state (r_images vs r_state per action dim).

    Args:
        policy: as for eval (vla:..., diffusion:...).
        data: demo directory (HDF5), ideally held out (never trained on).
        step: frame of each demo to probe.
        episodes: demos used (spread over the directory).
        horizon: actions summed into the predicted motion (default: the policy's chunk).
        threads: torch intra-op threads.
        out: write the statistics as JSON here.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    from vla_runtime.policies import make_policy
    from vla_runtime.policies.probe import format_probe, load_probe_demos, swap_probe

    pol = make_policy(policy)
    res = swap_probe(pol, load_probe_demos(data, pol.spec.cameras, episodes, step), step=step, horizon=horizon)
    print(format_probe(res))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"policy": policy, "data": str(data), **res}, indent=1))


def list_() -> None:
    """List envs and policies (shipped checkpoints included)."""
    from vla_runtime.envs import list_envs
    from vla_runtime.policies import list_policies

    print("envs:")
    for e in list_envs():
        print(f"  {e}")
    print("policies:")
    for p in list_policies():
        print(f"  {p}")


def robot(
    env: str,
    bind: str = "tcp://127.0.0.1:5555",
    keys: Path | None = None,
    lockstep: bool = False,
    max_action_age_ms: float = 500.0,
    image_size: int = 128,
    watchdog_periods: float = 2.0,
) -> None:
    """Start a robot agent backed by a simulator env; the runtime connects with --env remote:<bind address>.

    Args:
        env: simulator env name backing the agent (as for eval).
        bind: ZeroMQ address to bind (loopback by default; non-loopback requires --keys).
        keys: directory with CurveZMQ keys from `vla-runtime keys`.
        lockstep: advance the simulator one tick per received action (bit-identical to in-process eval).
        max_action_age_ms: actions older than this are dropped as stale.
        image_size: camera resolution the agent publishes.
        watchdog_periods: hold when no fresh action arrived for this many control periods.
    """
    from vla_runtime.bridges.agent import run_robot_agent

    run_robot_agent(env=env, bind=bind, keys_dir=str(keys) if keys else None, lockstep=lockstep,
                    max_action_age_ms=max_action_age_ms, image_size=image_size, watchdog_periods=watchdog_periods)


def keys(out: Path) -> None:
    """Generate CurveZMQ key pairs for the robot agent (server) and the runtime (client) in OUT."""
    from vla_runtime.bridges.keys import generate_keys

    print(json.dumps(generate_keys(str(out)), indent=1))


def bench(
    name: Positional[Literal["loop", "step", "vla", "specprune", "earlyexit", "bridge", "async", "kernels", "render", "stall"]],
    env: str = "",
    policy: str = "",
    episodes: int = 5,
    seed: int = 0,
    out: Path | None = None,
    steps: int = 200,
    threads: int | None = None,
    sampler: str = "",
    n_action_steps: int | None = None,
    arms: str = "",
    hold_at: int = 32,
    cpu_paths: Literal["auto", "stock", "both"] = "auto",
    options: str = "",
) -> None:
    """Benchmarks: each compares methods against a baseline in one process on the same seeds; writes OUT/bench.json.

    Args:
        name: which benchmark.
        env: env name (each benchmark has a default).
        policy: policy name (each benchmark has a default).
        episodes: episodes per method.
        seed: first seed.
        out: output directory for bench.json.
        steps: steps for micro-benchmarks.
        threads: torch intra-op threads.
        sampler: diffusion sampler for every arm of `bench async` (e.g. step2; default: the checkpoint's).
        n_action_steps: `bench async`: actions executed per chunk in every arm (default: the policy's).
        arms: `bench async`: comma-separated subset of sync, async, async-no-inpaint, async-future-state,
            async-back-to-back (sync always runs). `bench stall`: samplers, each optionally with -no-perturb
            (default step2,step2-no-perturb,ddim10). `bench earlyexit`: subset of full, earlyexit, specprune,
            specprune+earlyexit (full always runs). `bench specprune`: subset of specprune-static,
            specprune-dynamic, specprune-nocontroller, prune-random, prune-fastv, prune-framediff (no pruning and
            specprune always run).
        hold_at: `bench stall`: the robot is paused for one chunk at the first inference at or after this step.
        cpu_paths: `bench vla`: the CPU fast paths (lean layers, float32 AR decode steps): the policy default,
            stock (off), or both side by side.
        options: JSON settings for every arm of `bench specprune` (SpecPrune's, e.g. '{"budget_coarse": 0.04,
            "budget_fine": 0.04}'; the baselines get the matched budget) or `bench earlyexit` (early exit's, e.g.
            '{"kv_fill": "copy"}').
    """
    from vla_runtime.runtime.bench import run_bench

    res = run_bench(name, env=env, policy=policy, episodes=episodes, seed=seed, out=out, steps=steps,
                    threads=threads, sampler=sampler or None, n_action_steps=n_action_steps,
                    arms=[a.strip() for a in arms.split(",") if a.strip()] or None, hold_at=hold_at,
                    cpu_paths=cpu_paths, options=_json_options(options, "--options") if options else None)
    if isinstance(res.get("table"), str):
        print(res["table"])
    elif out is None and name not in ("step", "stall", "specprune", "earlyexit", "async"):  # those print a table
        print(json.dumps(res, indent=1, default=str)[:4000])


def compare(
    runs: Positional[list[str]],
    baseline: str | None = None,
    out: Path | None = None,
    per_task: bool = False,
) -> None:
    """Paired comparison of runs on the same episodes: success with the exact McNemar test and a paired 95 % CI
    for the difference, and latency ratios, each run against the baseline.

    Args:
        runs: run directories (`eval --out`), bench directories (each method becomes a run) or episodes.jsonl
            files; NAME=PATH names a run, and the same NAME given twice merges the parts of one arm (e.g. init
            states 0-4 and 5-9). The first run is the baseline unless --baseline names another.
        baseline: name of the baseline run.
        out: write the report as JSON here.
        per_task: also print successes per task for every run.
    """
    from vla_runtime.runtime.compare import compare_paths, format_compare, format_per_task

    report = compare_paths(runs, baseline=baseline, out=out)
    print(format_compare(report))
    if per_task:
        print(format_per_task(report))


def main(argv: list[str] | None = None) -> int:
    import tyro

    verbs = {"eval": eval, "collect": collect, "train": train, "bench": bench, "list": list_, "robot": robot,
             "keys": keys, "probe": probe, "compare": compare}
    try:
        tyro.extras.subcommand_cli_from_dict(verbs, prog="vla-runtime", args=argv,
                                             description="Real-time robot control runtime for VLAs and diffusion policies.")
    except UserError as e:
        print(f"vla-runtime: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vla-runtime: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
