"""`vla-runtime bench bridge`: what the bridge costs per control step, on the same episodes as in-process.

Baseline `in_process`: the scripted expert drives dummy:reach (two 128 px cameras + state) directly.
Method `bridge_lockstep`: the same episodes through a robot agent in a separate process over loopback TCP
(lockstep mode, so trajectories must be identical: the report says whether they were). Latency is the time
of one `env.step()` call: in-process it is the simulator step; over the bridge it adds encoding, two
loopback hops, decoding and the agent's safety layer. The policy's time is not included (same in both).
`obs_age_ms` is how old an observation is when step() hands it over (capture stamp to return; the agent
and the client share the machine's monotonic clock, so it needs no clock offset).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla_runtime.bridges.testing import free_tcp_endpoint


def _percentiles(v: list[float]) -> dict[str, float | None]:
    if not v:
        return {"p50": None, "p95": None, "p99": None}
    a = np.asarray(v)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 95, 99)}


def _wilson(k: int, n: int) -> list[float]:
    from vla_runtime.runtime.metrics import wilson_ci

    lo, hi = wilson_ci(k, n)
    return [round(lo, 2), round(hi, 2)]


def _run(env: Any, episodes: list[Any], steps: int
         ) -> tuple[list[float], list[bool], list[np.ndarray], float, int, list[float]]:
    """Per-step latencies (ms), successes, visited states, wall time of the step calls, step count, and the
    age of each returned observation (ms from its capture stamp to the return of step())."""
    from vla_runtime.policies import make_policy

    policy = make_policy("scripted", env_name="dummy:reach")
    lat: list[float] = []
    succ: list[bool] = []
    states: list[np.ndarray] = []
    total = 0.0
    ages: list[float] = []
    for ep in episodes:
        obs = env.reset(ep)
        policy.reset(obs.instruction)
        states.append(np.array(obs.state))
        ok = False
        for _ in range(steps):
            a = policy.act(obs).actions[0]
            t0 = time.perf_counter()
            r = env.step(a)
            dt = time.perf_counter() - t0
            ages.append((time.monotonic() - r.obs.stamp) * 1e3)  # same machine: one monotonic clock
            total += dt
            lat.append(dt * 1e3)
            obs = r.obs
            states.append(np.array(obs.state))
            ok = ok or r.success
            if r.done:
                break
        succ.append(ok)
    return lat, succ, states, total, len(lat), ages


def bench_bridge(episodes: int = 20, steps: int = 60, image_size: int = 128, out_dir: str | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Round-trip latency p50/p95/p99 and messages/s, in-process vs over the bridge; writes out_dir/bench.json."""
    from vla_runtime.bridges.client import RemoteEnv
    from vla_runtime.envs.dummy import DummyReachEnv
    from vla_runtime.errors import UserError

    if episodes < 1 or steps < 1:
        raise UserError("bench bridge needs --episodes >= 1 and --steps >= 1")
    local = DummyReachEnv(image_size=image_size)
    specs = local.episode_specs(seed, episodes)
    lat0, succ0, states0, _, n0, age0 = _run(local, specs, steps)  # baseline first: the agent's start-up would load the CPU
    endpoint = free_tcp_endpoint()
    agent = subprocess.Popen([sys.executable, "-m", "vla_runtime.bridges.agent", "--env", "dummy:reach", "--bind",
                              endpoint, "--lockstep", "--image-size", str(image_size), "--exact-image-size", "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        remote = RemoteEnv(endpoint, timeout_s=30.0, handshake_timeout_s=60.0)
        try:
            lat1, succ1, states1, total1, n1, age1 = _run(remote, [s for s in remote.episode_specs(seed, episodes)], steps)
            stats = remote.client.stats
            msgs = sum(stats["rx"].values()) + sum(stats["tx"].values()) - stats["tx"]["hello"] - stats["rx"]["spec"]
        finally:
            remote.close()
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
    identical = len(states0) == len(states1) and all(np.array_equal(a, b) for a, b in zip(states0, states1))
    obs_bytes = len(local.spec.cameras) * image_size * image_size * 3 + 4 * local.spec.state_dim
    p0, p1 = _percentiles(lat0), _percentiles(lat1)
    methods = [
        {"name": "in_process", "success_pct": 100.0 * sum(succ0) / len(succ0), "success_ci95": _wilson(sum(succ0), len(succ0)),
         "latency_ms_p50": p0["p50"], "latency_ms_p95": p0["p95"], "latency_ms_p99": p0["p99"], "ratio_to_baseline": 1.0,
         "steps": n0, "obs_age_ms_p50": _percentiles(age0)["p50"], "obs_age_ms_p99": _percentiles(age0)["p99"]},
        {"name": "bridge_lockstep", "success_pct": 100.0 * sum(succ1) / len(succ1),
         "success_ci95": _wilson(sum(succ1), len(succ1)), "latency_ms_p50": p1["p50"], "latency_ms_p95": p1["p95"],
         "latency_ms_p99": p1["p99"],
         "ratio_to_baseline": round(p0["p50"] / p1["p50"], 4) if p0["p50"] and p1["p50"] else None,
         "steps": n1, "obs_age_ms_p50": _percentiles(age1)["p50"], "obs_age_ms_p99": _percentiles(age1)["p99"],
         "overhead_ms_p50": round(p1["p50"] - p0["p50"], 4) if p0["p50"] and p1["p50"] else None,
         "messages": msgs, "messages_per_s": round(msgs / total1, 1) if total1 > 0 else None,
         "obs_payload_bytes": obs_bytes,
         "payload_mb_per_s": round(n1 * obs_bytes / total1 / 1e6, 2) if total1 > 0 else None,
         "identical_to_in_process": bool(identical), "transport": "tcp loopback, agent in a separate process"},
    ]
    try:
        from vla_runtime.runtime.evaluate import machine_info

        machine = machine_info()
    except ImportError:
        import platform

        machine = {"platform": platform.platform(), "python": platform.python_version()}
    import zmq

    machine.update({"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()})
    report = {"bench": "bridge", "env": "dummy:reach", "episodes": episodes, "seeds": [s.seed for s in specs],
              "image_size": image_size, "cameras": list(local.spec.cameras), "machine": machine,
              "baseline": "in_process", "methods": methods}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=1))
    return report
