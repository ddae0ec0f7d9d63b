"""Closed-loop evaluation: run episode specs, stream results to episodes.jsonl, assemble eval_info.json.

Crash safety: each finished episode is one JSON line appended and fsync'ed before the next starts, so a killed
run loses at most the episode in flight; `resume=True` skips specs whose key is already recorded. The run's
configuration is written to run.json first; resuming with a different configuration is refused (mixing two
configurations in one report would be silently wrong).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from vla_runtime.envs.base import EpisodeSpec, config_hash
from vla_runtime.errors import UserError
from vla_runtime.runtime.loop import EpisodeResult, LoopConfig, run_episode
from vla_runtime.runtime.metrics import percentiles, wilson_ci

DEFAULT_ENV = "robosuite:Lift"
DEFAULT_POLICY = "diffusion:diffusion_lift"


@dataclass
class EvalConfig:
    """What to evaluate and how; everything that changes results goes into the run's config hash."""

    env: str = DEFAULT_ENV
    policy: str = DEFAULT_POLICY
    episodes: int = 10  # per task
    seed: int = 0  # first seed (robosuite: seeds S..S+N-1; LIBERO: init states (S+i) mod 50)
    out: Path | None = None
    tasks: tuple[str, ...] = ()  # restrict to these task ids (empty: all tasks of the env)
    loop: LoopConfig = field(default_factory=LoopConfig)
    video: int = 0  # record mp4s of the first K episodes of each task
    resume: bool = False
    device: str = "cpu"
    accel: tuple[str, ...] = ()
    sampler: str | None = None
    image_size: int = 128
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    keys_dir: str | None = None  # remote envs: CurveZMQ keys directory (vla-runtime keys)
    policy_options: dict[str, Any] = field(default_factory=dict)  # extra make_policy keywords (JSON on the CLI)

    def env_kwargs(self) -> dict[str, Any]:
        return {"keys_dir": self.keys_dir} if self.env.startswith("remote:") and self.keys_dir else {}

    def identity(self) -> dict[str, Any]:
        """The fields whose change makes results incomparable (resume refuses a mismatch)."""
        ident = {"env": self.env, "policy": self.policy, "loop": asdict(self.loop), "accel": list(self.accel),
                 "sampler": self.sampler, "image_size": self.image_size, "device": self.device}
        if self.policy_options:  # only when set, so runs recorded before the field existed still resume
            ident["policy_options"] = self.policy_options
        return ident


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: that episode is simply re-run on resume


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so the next append starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(keep))


def append_record(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def prepare_out_dir(cfg: EvalConfig, specs: list[EpisodeSpec]) -> tuple[Path, set[str]]:
    """Create/validate the output dir; returns (dir, keys already done)."""
    out = Path(cfg.out) if cfg.out else Path("outputs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    ident = cfg.identity()
    jsonl = out / "episodes.jsonl"
    done: set[str] = set()
    if jsonl.exists() and jsonl.stat().st_size > 0:
        if not cfg.resume:
            raise UserError(f"{jsonl} already has results: pass --resume to continue that run, or choose another --out")
        if run_json.exists():
            prev = json.loads(run_json.read_text()).get("identity")
            if prev is not None and config_hash(prev) != config_hash(json.loads(json.dumps(ident, default=str))):
                raise UserError(f"--resume: {out} was run with a different configuration ({run_json}); "
                                "use another --out")
        _drop_torn_tail(jsonl)
        done = {r["key"] for r in _iter_jsonl(jsonl) if "key" in r}
    run_json.write_text(json.dumps({"identity": ident, "config_hash": config_hash(ident), "episodes": cfg.episodes,
                                    "seed": cfg.seed, "specs": [s.to_dict() for s in specs],
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1, default=str))
    return out, done


def save_video(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=1) as w:
        for fr in frames:
            w.append_data(fr)
    os.replace(tmp, path)


def episode_record(result: EpisodeResult, policy_name: str) -> dict[str, Any]:
    rec = result.to_record()
    rec["key"] = result.spec.key()
    rec["policy"] = policy_name
    return rec


def error_record(spec: EpisodeSpec, policy_name: str, err: BaseException, attempts: int = 1) -> dict[str, Any]:
    return {**spec.to_dict(), "key": spec.key(), "policy": policy_name, "error": f"{type(err).__name__}: {err}",
            "attempts": attempts}


def aggregate(records: Iterable[dict[str, Any]], control_hz: float | None = None) -> dict[str, Any]:
    """Aggregate per-episode records into success %, CI, latency percentiles, Hz, misses (+ per task)."""
    recs = list(records)

    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [r for r in rs if "error" not in r]
        n, s = len(ok), sum(bool(r["success"]) for r in ok)
        lo, hi = wilson_ci(s, n)
        inf = [x for r in ok for x in r.get("inference_ms", [])]
        steps = sum(r["steps"] for r in ok)
        wall = sum(r["wall_s"] for r in ok)
        loop_s = sum(r.get("loop_s", r["wall_s"]) for r in ok)
        p = percentiles(inf)
        misses = sum(r["deadline_misses"] for r in ok)
        b: dict[str, Any] = {
            "episodes": n, "errors": len(rs) - n, "successes": s,
            "success_pct": round(100.0 * s / n, 2) if n else None,
            "success_ci95": [round(lo, 2), round(hi, 2)],
            "steps": steps, "wall_s": round(wall, 3),
            "loop_hz": round(steps / loop_s, 2) if loop_s > 0 else None,
            "inference_ms_p50": p["p50"], "inference_ms_p95": p["p95"], "inference_ms_p99": p["p99"],
            "inference_cpu_ms_p50": percentiles([x for r in ok for x in r.get("inference_cpu_ms", [])])["p50"],
            "inferences": len(inf),
            "deadline_misses": misses,
            "deadline_miss_pct": round(100.0 * misses / steps, 3) if steps else None,
            "overhead_ms_p99": max((r.get("overhead_ms_p99") or 0.0) for r in ok) if ok else None,
            "episodes_per_hour": round(3600.0 * n / wall, 1) if wall > 0 else None,
        }
        react = [r["reaction_ms_mean"] for r in ok if r.get("reaction_ms_mean") is not None]
        b["reaction_ms_mean"] = float(np.mean(react)) if react else None
        ev = [r["event_reaction_ms_mean"] for r in ok if r.get("event_reaction_ms_mean") is not None]
        b["event_reaction_ms_mean"] = round(float(np.mean(ev)), 3) if ev else None
        b["stall_ticks"] = int(sum(r.get("stall_ticks") or 0 for r in ok))
        safety: dict[str, int] = {}
        for r in ok:  # robot-agent interventions (remote envs): clamps, rate limits, dropped actions, holds
            for k, v in (r.get("safety") or {}).items():
                safety[k] = safety.get(k, 0) + int(v)
        if safety:
            b["safety"] = safety
        if control_hz is not None:
            b["control_hz_target"] = control_hz
        accel_keys = sorted({k for r in ok for k in (r.get("accel") or {})})
        for k in accel_keys:
            vals = [r["accel"][k] for r in ok if k in (r.get("accel") or {})]
            b[k] = round(float(np.mean(vals)), 4)
        return b

    out = block(recs)
    tasks = sorted({r["task"] for r in recs})
    per_task = {t: block([r for r in recs if r["task"] == t]) for t in tasks}
    return {"aggregated": out, "per_task": per_task}


def build_eval_info(out: Path, cfg: EvalConfig, specs: list[EpisodeSpec], control_hz: float | None,
                    machine: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    keys = {s.key() for s in specs}
    latest: dict[str, dict[str, Any]] = {}
    for r in _iter_jsonl(out / "episodes.jsonl"):
        if r.get("key") in keys:
            latest[r["key"]] = r  # a retried spec: the last record wins
    recs = [latest[s.key()] for s in specs if s.key() in latest]
    agg = aggregate(recs, control_hz)
    info = {"config": cfg.identity(), "config_hash": config_hash(cfg.identity()), "machine": machine or machine_info(),
            "per_episode": recs, **agg, "missing_episodes": [s.key() for s in specs if s.key() not in latest],
            **(extra or {})}
    tmp = out / "eval_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1, default=_json_default))
    os.replace(tmp, out / "eval_info.json")
    return info


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        from vla_runtime.policies.dtypes import cpu_has_native_bf16

        info["cpu_native_bf16"] = cpu_has_native_bf16()  # what `dtype auto` keys on
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def format_table(info: dict[str, Any]) -> str:
    rows = [("task", "eps", "success %", "95% CI", "loop Hz", "infer p50 ms", "p95 ms", "misses")]
    items = list(info["per_task"].items())
    if len(items) > 1:
        items.append(("ALL", info["aggregated"]))
    elif not items:
        items = [("ALL", info["aggregated"])]
    for name, b in items:
        ci = b["success_ci95"]
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        rows.append((name, str(b["episodes"]) + (f" (+{b['errors']} err)" if b["errors"] else ""),
                     f(b["success_pct"]), f"[{ci[0]:.0f}, {ci[1]:.0f}]", f(b["loop_hz"]), f(b["inference_ms_p50"]),
                     f(b["inference_ms_p95"]), str(b["deadline_misses"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation described by `cfg` in this process; returns eval_info."""
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy

    if cfg.episodes < 1:
        raise UserError("--episodes must be >= 1")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    policy = make_policy(cfg.policy, env_name=cfg.env, device=cfg.device, accel=cfg.accel, sampler=cfg.sampler,
                         **cfg.policy_options)
    needs_images = bool(policy.spec.cameras) or cfg.video > 0
    cameras = policy.spec.cameras or None
    image_size = policy.spec.image_size if policy.spec.cameras else cfg.image_size
    env = make_env(cfg.env, cameras=cameras, image_size=image_size, render=needs_images, **cfg.env_kwargs())
    try:
        check_compatible(policy.spec, env.spec)
        specs = env.episode_specs(cfg.seed, cfg.episodes, list(cfg.tasks) or None)
        if not specs:
            raise UserError(f"no episodes: tasks {cfg.tasks} not in {cfg.env} "
                            f"(tasks: {[t.task for t in env.tasks()]})")
        out, done = prepare_out_dir(cfg, specs)
        todo = [s for s in specs if s.key() not in done]
        loop_cfg = cfg.loop
        record_cam = None
        if cfg.video > 0:
            record_cam = env.spec.cameras[0]
        bar = _progress(len(specs), len(specs) - len(todo), progress, desc=cfg.env)
        for spec in todo:
            want_video = cfg.video > 0 and spec.index < cfg.video
            lc = loop_cfg if not want_video else _with_camera(loop_cfg, record_cam)
            try:
                result = run_episode(env, policy, spec, lc)
            except UserError:
                raise
            except Exception as e:  # a simulator/policy crash: recorded as an error, never as a failure
                append_record(out / "episodes.jsonl", error_record(spec, cfg.policy, e))
                print(f"episode {spec.key()} errored: {type(e).__name__}: {e}", file=sys.stderr)
                bar.update(1)
                continue
            append_record(out / "episodes.jsonl", episode_record(result, cfg.policy))
            if want_video and result.frames:
                tag = "success" if result.success else "failure"
                save_video(result.frames, out / "videos" / f"{spec.task.replace('/', '-')}__seed{spec.seed}__{tag}.mp4",
                           env.spec.control_hz)
            bar.set_postfix_str(f"{spec.task} seed {spec.seed}: {'ok' if result.success else 'fail'}")
            bar.update(1)
        bar.close()
        info = build_eval_info(out, cfg, specs, env.spec.control_hz)
        info["out_dir"] = str(out)
        return info
    finally:
        env.close()


def check_compatible(pspec: Any, espec: Any) -> None:
    if pspec.action_dim != espec.action_dim:
        raise UserError(f"policy {pspec.name} outputs {pspec.action_dim}-d actions but {espec.name} takes "
                        f"{espec.action_dim}-d")
    missing = [c for c in pspec.cameras if c not in espec.cameras]
    if missing:
        raise UserError(f"policy {pspec.name} needs cameras {missing}; {espec.name} has {list(espec.cameras)}")
    if pspec.cameras and pspec.state_dim != espec.state_dim:
        raise UserError(f"policy {pspec.name} expects state_dim {pspec.state_dim}, {espec.name} gives {espec.state_dim}")


def _with_camera(cfg: LoopConfig, cam: str | None) -> LoopConfig:
    import dataclasses

    return dataclasses.replace(cfg, record_camera=cam)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="ep", dynamic_ncols=True)
