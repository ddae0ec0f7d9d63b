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


def bench_latency(ckpt: str | Path, samplers: tuple[str, ...] = ("ddim10", "ddim2", "step2", "step4", "predictor"),
                  chunks: int = 40, threads: int = 1, seed: int = 0, device: str = "cpu",
                  cuda_graphs: bool | None = None, cpu_trace: bool | None = None,
                  eager_too: bool = False) -> dict[str, Any]:
    """Per-chunk latency of each sampler on synthetic observations (no simulator), interleaved chunk by chunk
    so machine load drifts hit every sampler alike. Steady state: an episode's first chunk (always DDIM for
    STEP) is excluded. Returns {sampler: {p50, p95, encoder_ms, sampler_ms, predictor_ms, denoise_steps}}.
    All samplers share one network (as in a deployment). eager_too: also run every sampler without CPU traces /
    CUDA graphs ("<sampler>-eager"), interleaved with the others."""
    import torch

    from vla_runtime.policies.diffusion.policy import load_diffusion_policy
    from vla_runtime.runtime.metrics import percentiles
    from vla_runtime.runtime.types import Observation

    torch.set_num_threads(threads)
    base = load_diffusion_policy(Path(ckpt), sampler=samplers[0], device=device, cuda_graphs=cuda_graphs,
                                 cpu_trace=cpu_trace)
    pols = {s: base if i == 0 else base.fork(s) for i, s in enumerate(samplers)}  # one network, N strategies
    if eager_too:
        for s in samplers:
            pols[f"{s}-eager"] = base.fork(s)
            pols[f"{s}-eager"]._graphs = None
    spec = next(iter(pols.values())).spec
    rng = np.random.default_rng(seed)
    frames = [{c: rng.integers(0, 256, (spec.image_size, spec.image_size, 3), dtype=np.uint8) for c in spec.cameras}
              for _ in range(4)]
    rec: dict[str, list[dict[str, Any]]] = {s: [] for s in pols}
    per_episode = 6
    for i in range(chunks + chunks // per_episode + 1):
        step = (i % per_episode) * spec.n_action_steps
        obs = Observation(images=frames[i % 4], state=rng.uniform(-0.2, 0.2, spec.state_dim).astype(np.float32),
                          instruction="", stamp=0.0, step=step)
        for s, p in pols.items():
            if step == 0:
                p.reset("")
            info = p.act(obs).info
            if step > 0:
                rec[s].append(info)
    out: dict[str, Any] = {}
    for s, infos in rec.items():
        pc = percentiles([r["inference_ms"] for r in infos])
        out[s] = {"p50_ms": round(pc["p50"], 2), "p95_ms": round(pc["p95"], 2),
                  **{k: round(float(np.median([r[k] for r in infos])), 2)
                     for k in ("encoder_ms", "sampler_ms", "predictor_ms", "denoise_steps")}}
    return out


def offline_eval(ckpt: str | Path, data_dir: str | Path, n: int = 128, t_starts: tuple[int, ...] = (10, 20, 30, 40, 60),
                 ks: tuple[int, ...] = (2, 4), seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Chunk error against the demos' ground truth (normalised units, mean L2 per action) for DDIM(k), STEP(k,
    t_start) and predictor-only, on n random demo frames that have a previous chunk.

    STEP's previous chunk is the policy's own DDIM-10 output 8 steps earlier (as at run time), not the ground
    truth. This is an open-loop proxy used to pick `step_start_t`; success is measured closed-loop."""
    import torch

    from vla_runtime.policies.diffusion.modeling import shift_chunk
    from vla_runtime.policies.diffusion.policy import load_model
    from vla_runtime.policies.diffusion.samplers import NoiseSchedule, ddim_sample, warm_start_sample
    from vla_runtime.train.train_diffusion import load_demos, make_batch

    torch.set_num_threads(threads)
    model, cfg = load_model(ckpt)
    m = cfg.model
    sched = NoiseSchedule(cfg.schedule)
    ds = load_demos(data_dir, m.cameras, m.resize_to)
    gen = torch.Generator().manual_seed(seed)
    ne = m.n_action_steps
    ok = torch.nonzero(torch.arange(len(ds)) - ne >= ds.ep_start).flatten()
    idx = ok[torch.randint(0, len(ok), (n,), generator=gen)]

    def feats_for(frames: torch.Tensor) -> torch.Tensor:
        b = make_batch(ds, m, frames, gen, crop=False)
        with torch.inference_mode():
            return model.encode(b["images"], model.normalize_state(b["states"]))

    def model_fn(cond: torch.Tensor):  # noqa: ANN202
        def fn(x: torch.Tensor, t: int) -> torch.Tensor:
            with torch.inference_mode():
                return model.unet(x, torch.full((x.shape[0],), t, dtype=torch.long), cond).float()
        return fn

    shape = (n, m.horizon, m.action_dim)
    f_prev, f_now = feats_for(idx - ne), feats_for(idx)
    gt = model.normalize_action(make_batch(ds, m, idx, gen, crop=False)["actions"])
    fn_now = model_fn(f_now.reshape(n, -1))
    prev, _ = ddim_sample(model_fn(f_prev.reshape(n, -1)), sched, shape, 10, 0.0, gen)
    err = lambda x: round(float((x - gt).norm(dim=-1).mean()), 4)  # noqa: E731
    res: dict[str, Any] = {"frames": n}
    for k in (10, *ks):
        res[f"ddim{k}"] = err(ddim_sample(fn_now, sched, shape, k, 0.0, gen)[0])
    with torch.inference_mode():
        prop = model.predictor(f_now, shift_chunk(prev, ne), torch.full((n,), ne)).float().clamp(-1, 1)
    res["predictor"] = err(prop)
    res["shifted_prev"] = err(shift_chunk(prev, ne))
    for k in ks:
        for ts in t_starts:
            res[f"step{k}@{ts}"] = err(warm_start_sample(fn_now, sched, prop, k, ts, 0.0, gen)[0])
    return res


if __name__ == "__main__":
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(description="Diffusion sampler latency (synthetic observations) or, with "
                                             "--offline DATA_DIR, open-loop chunk error against demos")
    ap.add_argument("ckpt")
    ap.add_argument("--offline", default=None, help="demo directory: run offline_eval instead of latency")
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--samplers", default="ddim10,ddim2,step2,step4,predictor")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--out", default=None, help="write the latency table as JSON to this file")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: run the denoiser eagerly")
    ap.add_argument("--no-cpu-trace", action="store_true", help="CPU: run the networks eagerly (no TorchScript)")
    ap.add_argument("--eager-too", action="store_true",
                    help="also run each sampler eagerly (<sampler>-eager), interleaved, same network")
    a = ap.parse_args()
    if a.offline:
        print(json.dumps(offline_eval(a.ckpt, a.offline, n=a.frames, threads=a.threads), indent=1))
        raise SystemExit(0)
    res = bench_latency(a.ckpt, tuple(a.samplers.split(",")), a.chunks, a.threads, device=a.device,
                        cuda_graphs=False if a.no_cuda_graphs else None, cpu_trace=False if a.no_cpu_trace else None,
                        eager_too=a.eager_too)
    base = res[a.samplers.split(",")[0]]["p50_ms"]
    for s, r in res.items():
        print(f"{s:10s} p50 {r['p50_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f}  ratio {base / r['p50_ms']:5.2f}x  "
              f"enc {r['encoder_ms']:.2f}  sampler {r['sampler_ms']:.2f}  pred {r['predictor_ms']:.2f}  "
              f"calls {r['denoise_steps']:.0f}")
    import torch

    rec = {"ckpt": str(a.ckpt), "device": a.device, "cuda_graphs": not a.no_cuda_graphs,
           "cpu_trace": not a.no_cpu_trace, "device_name": torch.cuda.get_device_name(a.device)
           if a.device.startswith("cuda") else None, "torch": torch.__version__, "loadavg": os.getloadavg(),
           "results": res}
    print(json.dumps(rec))
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1))


# ---------------------------------------------------------------------------------------------- stall test

STALL_ARMS = ("step2", "step2-no-perturb", "ddim10")


def parse_stall_arm(arm: str) -> dict[str, Any]:
    """SAMPLER[-shift][-tN][-sSIGMA][-no-perturb] -> fork() arguments: e.g. 'step2', 'step2-t10' (step_start_t
    10), 'step2-s0.5' (sigma_stall 0.5), 'step2-shift' (warm start from the shifted previous chunk, no
    predictor), 'step2-shift-no-perturb'."""
    import re

    mt = re.fullmatch(r"((?:ddim|step)\d+|predictor)(-shift)?(?:-t(\d+))?(?:-s(\d+(?:\.\d+)?))?(-no-perturb)?", arm)
    if mt is None:
        raise UserError(f"bench stall: arm {arm!r} is not SAMPLER[-shift][-tN][-sSIGMA][-no-perturb] "
                        "(e.g. step2, step2-s0.5, step2-shift-no-perturb)")
    kw: dict[str, Any] = {"sampler": mt.group(1), "perturb": mt.group(5) is None}
    if mt.group(2):
        kw["warm_source"] = "shift"
    if mt.group(3) is not None:
        kw["step_start_t"] = int(mt.group(3))
    if mt.group(4) is not None:
        kw["sigma_stall"] = float(mt.group(4))
    return kw


class StallInjection:
    """Bench wrapper that puts a diffusion policy into the state STEP's perturbation exists for.

    At the first inference at or after `hold_at` the robot is paused for one chunk (`n_action_steps` actions of
    zero motion, the gripper kept as last commanded: e.g. an operator pause or a safety hold with the object in
    hand). The policy is then told that this motionless chunk is what it planned, so a warm-started sampler's
    proposal is "stand still" (near-zero actions). Measured over the rest of the episode:
    - stalled steps: steps of the chunks over which the end effector (obs.state[:3], metres, as in the robosuite
      and LIBERO adapters) moved less than `min_motion` between consecutive inferences (a jittering arm that
      goes nowhere counts as stalled; action norms alone would call it moving);
    - near-zero actions: executed actions with |a[:stall_dims]| < stall_eps (the policy's own stall test)."""

    def __init__(self, inner: Any, hold_at: int, stall_eps: float, min_motion: float = 0.005) -> None:
        self.inner, self.hold_at, self.stall_eps, self.min_motion = inner, int(hold_at), float(stall_eps), min_motion
        self.spec = inner.spec
        self.reset("")

    def reset(self, instruction: str) -> None:
        self.inner.reset(instruction)
        self._hold: np.ndarray | None = None
        self._hold_step = -1
        self._resumed = False
        self._gripper = -1.0
        self._path: list[tuple[int, np.ndarray]] = []  # (step, eef position) at each inference after the hold
        self.held_steps = 0
        self.after_steps = 0
        self.near_zero_actions = 0

    @property
    def stalled_steps(self) -> int:
        return int(sum(s1 - s0 for (s0, p0), (s1, p1) in zip(self._path, self._path[1:])
                       if float(np.linalg.norm(p1 - p0)) < self.min_motion))

    @property
    def steps_to_move(self) -> int | None:
        """Steps from the end of the hold to the first inference by which the end effector had moved."""
        for (s0, p0), (s1, p1) in zip(self._path, self._path[1:]):
            if float(np.linalg.norm(p1 - p0)) >= self.min_motion:
                return s1 - self._path[0][0]
        return None

    def act(self, obs: Any) -> Any:
        import torch

        from vla_runtime.runtime.types import ActionChunk

        p = self.inner
        if self._hold is None and int(obs.step) >= self.hold_at and p._prev_env is not None:
            m = p.cfg.model
            hold = np.zeros((m.horizon, m.action_dim), np.float32)
            hold[:, -1] = self._gripper
            self._hold, self._hold_step = hold, int(obs.step)
            p.observe(obs)  # the policy's history still sees this frame
            return ActionChunk(actions=hold, stamp=obs.stamp, info={"hold": True})
        if self._hold is not None and not self._resumed:
            self._resumed = True
            with torch.inference_mode():
                norm = p.model.normalize_action(torch.from_numpy(self._hold)[None].to(p.device)).float().cpu()
            p._prev_norm, p._prev_env, p._prev_step = norm.clamp(-1, 1), self._hold.copy(), self._hold_step
        if self._resumed:
            self._path.append((int(obs.step), np.asarray(obs.state, np.float64)[:3].copy()))
        return p.act(obs)

    def on_action(self, action: np.ndarray) -> bool:
        a = np.asarray(action, np.float32)
        self._gripper = float(a[-1])
        if self._hold is not None and not self._resumed:
            self.held_steps += 1
        elif self._resumed:
            self.after_steps += 1
            self.near_zero_actions += int(float(np.linalg.norm(a[: self.inner.cfg.sampler.stall_dims])) < self.stall_eps)
        return False


def bench_stall(env: str = "robosuite:Lift", policy: str = "diffusion:diffusion_lift", episodes: int = 10,
                seed: int = 5000, out: Path | None = None, hold_at: int = 32, arms: tuple[str, ...] = STALL_ARMS,
                progress: bool = True) -> dict[str, Any]:
    """The issue's stall test: the same held episodes with STEP-2 (velocity-aware perturbation on), STEP-2 with
    it off, and DDIM-10 (a cold sampler, blind to the previous chunk) as reference. bench.json per arm: success,
    stalled steps after the hold (end effector moved < 5 mm over a chunk; total and per episode), near-zero
    actions, episodes that never moved again, steps until it moved."""
    from vla_runtime.policies import make_policy
    from vla_runtime.runtime.bench import Method, compare_methods
    from vla_runtime.runtime.loop import LoopConfig

    if not policy.startswith("diffusion:"):
        policy = f"diffusion:{policy}"
    if not arms:
        raise UserError("bench stall: no arms")
    base = make_policy(policy, env_name=env)
    pols = {a: StallInjection(base.fork(**parse_stall_arm(a)), hold_at, base.cfg.sampler.stall_eps) for a in arms}
    methods = [Method(name=a, policy=policy, loop=LoopConfig(clock="unpaced", mode="sync")) for a in arms]

    def episode_extra(_m: Any, w: StallInjection) -> dict[str, Any]:
        return dict(held_steps=w.held_steps, after_hold_steps=w.after_steps, stalled_steps=w.stalled_steps,
                    near_zero_actions=w.near_zero_actions, steps_to_move=w.steps_to_move)

    def stall_fields(_m: Any, rs: list[dict[str, Any]]) -> dict[str, Any]:
        held = [r for r in rs if "error" not in r and r["held_steps"] > 0]
        moved = [r["steps_to_move"] for r in held if r["steps_to_move"] is not None]
        return {"held_episodes": len(held),
                "stalled_steps": sum(r["stalled_steps"] for r in held),
                "after_hold_steps": sum(r["after_hold_steps"] for r in held),
                "stalled_steps_per_episode": round(float(np.mean([r["stalled_steps"] for r in held])), 2)
                if held else None,
                "near_zero_actions": sum(r["near_zero_actions"] for r in held),
                # failed episodes whose end effector never moved 5 mm between two inferences after the hold
                "never_moved": sum(r["steps_to_move"] is None and not r["success"] for r in held),
                "steps_to_move_mean": round(float(np.mean(moved)), 2) if moved else None,
                "_show": ("stalled_steps", "never_moved", "steps_to_move_mean")}

    def finalize(report: dict[str, Any]) -> None:
        report.update(hold_at=hold_at, hold_steps=base.spec.n_action_steps, stall_eps=base.cfg.sampler.stall_eps)

    return compare_methods("stall", env, methods, episodes, seed, out, baseline=arms[0], extra_fields=stall_fields,
                           progress=progress, finalize=finalize, policies=pols, episode_extra=episode_extra)
