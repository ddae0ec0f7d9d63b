"""Inference latency of a VLA with SpecPrune variants, on recorded observations, in one process (1 thread).

    python -m vla_runtime.policies.vla.specprune_latency --policy vla:<ckpt> [--frames F.npz] [--steps 40]
    python -m vla_runtime.policies.vla.specprune_latency --arch patch_size=8,hidden=512,layers=8   # random weights

Why: the closed-loop benchmark measures success and latency together but costs minutes per episode; this
isolates the speed-up (p50/p95 of `policy.act` and the decoder share) at several keep budgets, on the same
observation sequence for every variant (variants interleaved per observation, so machine drift hits all alike).
Observations come from `--frames` (an npz written by `record_frames`: a scripted-expert rollout with the
policy's cameras) or, without it, from the dummy env (latency does not depend on the image content: the
budgets fix the token counts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation


def record_frames(env_name: str, cameras: tuple[str, ...], image_size: int, steps: int, out: Path,
                  seed: int = 0, task: str | None = None) -> Path:
    """Roll out the scripted expert with rendering and save `steps` observations (images + state) to an npz."""
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy

    env = make_env(env_name, cameras=cameras, image_size=image_size, render=True)
    expert = make_policy("scripted", env_name=env_name)
    try:
        spec = env.episode_specs(seed, 1, [task] if task else None)[0]
        obs = env.reset(spec)
        expert.reset(obs.instruction)
        imgs: dict[str, list[np.ndarray]] = {c: [] for c in cameras}
        states, actions, queue = [], [], []
        for _ in range(steps):
            for c in cameras:
                imgs[c].append(obs.images[c])
            states.append(obs.state)
            if not queue:
                queue = list(expert.act(obs).actions)
            actions.append(queue.pop(0))
            res = env.step(actions[-1])
            obs = res.obs
            if res.done:
                break
    finally:
        env.close()
    np.savez_compressed(out, instruction=np.array(obs.instruction), states=np.stack(states),
                        actions=np.stack(actions),
                        **{f"img_{c}": np.stack(v) for c, v in imgs.items()})
    return out


def load_frames(path: Path | None, cameras: tuple[str, ...], image_size: int, steps: int
                ) -> tuple[list[Observation], np.ndarray | None]:
    """Observations (and the actions executed after each, when recorded)."""
    if path is None:
        from vla_runtime.envs.base import EpisodeSpec
        from vla_runtime.envs.dummy import DummyReachEnv

        env = DummyReachEnv(cameras=cameras, image_size=min(image_size, 64))
        obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
        out = []
        rng = np.random.default_rng(0)
        for _ in range(steps):
            out.append(obs)
            obs = env.step(rng.uniform(-0.3, 0.3, 7).astype(np.float32)).obs
        return out, None
    d = np.load(path)
    missing = [c for c in cameras if f"img_{c}" not in d]
    if missing:
        raise UserError(f"{path} has no frames for cameras {missing}")
    n = min(steps, len(d["states"]))
    instr = str(d["instruction"])
    obs = [Observation(images={c: d[f"img_{c}"][i] for c in cameras}, state=d["states"][i], instruction=instr,
                       stamp=float(i), step=i) for i in range(n)]
    return obs, (d["actions"][:n] if "actions" in d else None)


def build_policies(policy: str, arch: str, variants: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """label -> VLAPolicy sharing one model (pruners differ); `arch` builds a random-weight model instead."""
    from vla_runtime.policies.vla.policy import VLAPolicy, build_strategies

    if arch:
        from vla_runtime.policies.vla.configuration import VLAConfig
        from vla_runtime.policies.vla.modeling import VLAModel
        from vla_runtime.policies.vla.tokenizer import WordTokenizer

        kv = {}
        for item in arch.split(","):
            k, _, v = item.partition("=")
            kv[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
        tok = WordTokenizer.from_instructions(["pick up the object and place it in the basket"])
        cfg = VLAConfig(vocab_size=tok.vocab_size, **kv)  # type: ignore[arg-type]
        torch.manual_seed(0)
        model = VLAModel(cfg, bos_id=tok.bos_id)
        A, S = cfg.action_dim, cfg.state_dim
        stats = {"action_min": -np.ones(A, np.float32), "action_max": np.ones(A, np.float32),
                 "state_min": -np.ones(S, np.float32), "state_max": np.ones(S, np.float32)}
        base = VLAPolicy(model, tok, stats, name="vla:random")
    else:
        from vla_runtime.policies import make_policy

        base = make_policy(policy)
    out = {}
    for label, accel, opts in variants:
        pr, ex = build_strategies(base.model, (accel,) if accel else (), {accel: opts} if accel else None)
        p = VLAPolicy.__new__(VLAPolicy)
        p.__dict__.update(base.__dict__)
        p.pruner, p.exit_policy, p.accel, p.memory = pr, ex, (accel,) if accel else (), {}
        out[label] = p
    return out


def measure(policies: dict[str, Any], frames: list[Observation], warmup: int = 3,
            actions: np.ndarray | None = None, stride: int = 1) -> dict[str, dict[str, Any]]:
    """Interleaved per observation: every variant acts on frame i before any acts on frame i + stride.

    With the recorded `actions`, every variant's `on_action` sees the actions executed between its inferences
    (so SpecPrune's controller follows the demo's phases). `action_l1` is the mean |a - a_full| of a variant's
    chunk against the first variant's (no pruning) on the same frame: how much the token selection changes
    what the model would do (0 for a lossless selection).
    """
    res: dict[str, dict[str, list[float]]] = {k: {"ms": [], "cpu": [], "vision": [], "decoder": [], "vis_tok": [],
                                                    "l1": [], "fine": [], "pruner": []} for k in policies}
    hook_s: dict[str, list[float]] = {k: [0.0] for k in policies}
    for label, p in policies.items():
        p.reset(frames[0].instruction)
        if p.pruner is not None:  # time the pruner's own work (its hook calls), per inference
            inner = p.pruner.before_layer

            def timed(i: int, ctx: Any, inner: Any = inner, acc: list[float] = hook_s[label]) -> Any:
                t = time.perf_counter()
                try:
                    return inner(i, ctx)
                finally:
                    acc[0] += time.perf_counter() - t

            p.pruner.before_layer = timed
    for n_inf, i in enumerate(range(0, len(frames), stride)):
        obs = frames[i]
        ref = None
        for label, p in policies.items():
            h0 = hook_s[label][0]
            t0, c0 = time.perf_counter(), time.process_time()
            ch = p.act(obs)
            ms = (time.perf_counter() - t0) * 1e3
            cpu = (time.process_time() - c0) * 1e3
            if ref is None:
                ref = ch.actions
            if actions is not None:
                for a in actions[i:i + stride]:
                    p.on_action(a)
            if n_inf < warmup:
                continue
            r = res[label]
            r["ms"].append(ms)
            r["cpu"].append(cpu)
            r["vision"].append(ch.info.get("vision_ms", 0.0))
            r["decoder"].append(ch.info.get("decoder_ms", 0.0))
            r["vis_tok"].append(ch.info.get("mean_visual_tokens", float("nan")))
            r["l1"].append(float(np.abs(ch.actions - ref).mean()))
            r["fine"].append(float(ch.info.get("prune_fine", 0)))
            r["pruner"].append((hook_s[label][0] - h0) * 1e3)
    first = res[next(iter(policies))]
    base, base_cpu = float(np.median(first["ms"])), float(np.median(first["cpu"]))
    out = {}
    for label, r in res.items():
        p50, cpu50 = float(np.median(r["ms"])), float(np.median(r["cpu"]))
        out[label] = {"p50_ms": round(p50, 2), "p95_ms": round(float(np.percentile(r["ms"], 95)), 2),
                      "cpu_ms_p50": round(cpu50, 2), "cpu_ratio": round(base_cpu / cpu50, 3),
                      "vision_ms_p50": round(float(np.median(r["vision"])), 2),
                      "decoder_ms_p50": round(float(np.median(r["decoder"])), 2),
                      "visual_tokens_per_layer": round(float(np.mean(r["vis_tok"])), 1),
                      "pruner_ms_p50": round(float(np.median(r["pruner"])), 2),
                      "action_l1": round(float(np.mean(r["l1"])), 4), "fine_frac": round(float(np.mean(r["fine"])), 3),
                      "ratio": round(base / p50, 3), "n": len(r["ms"])}
    return out


def default_variants(budgets: list[float]) -> list[tuple[str, str, dict[str, Any]]]:
    v: list[tuple[str, str, dict[str, Any]]] = [("no-pruning", "", {}), ("specprune(default)", "specprune", {})]
    for b in budgets:
        v.append((f"specprune@{b}", "specprune", {"budget_coarse": b, "budget_fine": b}))
    for b in budgets:
        v.append((f"static@{b}", "specprune-static", {"budget_coarse": b, "budget_fine": b}))
    for b in budgets:
        v.append((f"random@{b}", "prune-random", {"budget": b}))
    return v


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="")
    ap.add_argument("--arch", default="", help="random-weight VLAConfig overrides, e.g. patch_size=8,layers=8")
    ap.add_argument("--frames", type=Path, default=None, help="npz from --record")
    ap.add_argument("--record", default="", help="env name: record expert frames to --frames first")
    ap.add_argument("--task", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stride", type=int, default=1, help="infer on every k-th recorded frame")
    ap.add_argument("--budgets", default="0.5,0.3,0.2,0.1")
    ap.add_argument("--options", default="{}", help="JSON overrides of SpecPruneConfig for every variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not a.policy and not a.arch:
        raise UserError("give --policy vla:<ckpt> or --arch k=v,...")
    extra = json.loads(a.options)
    variants = [(lab, acc, {**extra, **o} if acc else o) for lab, acc, o in
                default_variants([float(x) for x in a.budgets.split(",")])]
    pols = build_policies(a.policy, a.arch, variants)
    first = next(iter(pols.values()))
    cams, size = tuple(first.cfg.cameras), first.cfg.image_size
    if a.record:
        if a.frames is None:
            raise UserError("--record needs --frames PATH to write to")
        record_frames(a.record, cams, size, a.steps, a.frames, task=a.task)
    frames, acts = load_frames(a.frames, cams, size, a.steps)
    res = measure(pols, frames, actions=acts, stride=a.stride)
    cfg = first.cfg
    report = {"policy": a.policy or f"random:{a.arch}", "n_visual": cfg.n_visual, "layers": cfg.layers,
              "hidden": cfg.hidden, "frames": str(a.frames) if a.frames else "dummy", "threads": a.threads,
              "options": extra, "results": res}
    print(f"{report['policy']}: {cfg.n_visual} visual tokens, {cfg.layers}x{cfg.hidden} decoder, "
          f"{len(frames)} frames, {a.threads} thread(s)")
    print(f"{'variant':22s} {'p50 ms':>8s} {'p95 ms':>8s} {'vision':>7s} {'decoder':>8s} {'vis/layer':>9s} "
          f"{'ratio':>6s} {'cpu ms':>7s} {'cpu x':>6s} {'pruner':>6s} {'|da|':>7s} {'fine':>5s}")
    for k, r in res.items():
        print(f"{k:22s} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['vision_ms_p50']:7.1f} {r['decoder_ms_p50']:8.1f} "
              f"{r['visual_tokens_per_layer']:9.1f} {r['ratio']:5.2f}x {r['cpu_ms_p50']:7.1f} {r['cpu_ratio']:5.2f}x "
              f"{r['pruner_ms_p50']:6.1f} {r['action_l1']:7.4f} "
              f"{r['fine_frac']:5.2f}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
