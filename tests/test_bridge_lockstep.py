"""Lockstep: an evaluation over the bridge is bit-identical to in-process (dummy:reach, scripted expert)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vla_runtime.bridges.agent import RobotAgent, SimDriver, run_robot_agent
from vla_runtime.bridges.client import RemoteEnv
from vla_runtime.bridges.testing import free_tcp_endpoint
from vla_runtime.envs import make_env
from vla_runtime.policies import make_policy


def _trajectory(env: Any, episodes: list[Any]) -> list[dict[str, Any]]:
    """Everything an eval sees, per step: observation (images, state, privileged), action, reward, flags."""
    policy = make_policy("scripted", env_name="dummy:reach")
    out = []
    for ep in episodes:
        obs = env.reset(ep)
        policy.reset(obs.instruction)
        steps = [{"obs": obs}]
        for _ in range(env.task_info(ep.task).max_steps):
            a = policy.act(obs).actions[0]
            r = env.step(a)
            steps.append({"obs": r.obs, "action": a, "reward": r.reward, "success": r.success, "done": r.done})
            obs = r.obs
            if r.done:
                break
        out.append({"episode": ep, "steps": steps})
    return out


def _same_obs(a: Any, b: Any) -> None:
    assert a.instruction == b.instruction and a.step == b.step
    assert a.state.dtype == b.state.dtype and a.state.tobytes() == b.state.tobytes()
    assert a.images.keys() == b.images.keys()
    for k in a.images:
        assert a.images[k].shape == b.images[k].shape and a.images[k].tobytes() == b.images[k].tobytes()
    assert a.privileged.keys() == b.privileged.keys()
    for k, v in a.privileged.items():
        w = b.privileged[k]
        assert (v.tobytes() == w.tobytes()) if isinstance(v, np.ndarray) else v == w


def test_lockstep_eval_over_the_bridge_equals_in_process() -> None:
    local = make_env("dummy:reach")
    agent = RobotAgent(SimDriver(make_env("dummy:reach")), free_tcp_endpoint(), lockstep=True).start()
    remote = make_env(f"remote:{agent.endpoint}")
    try:
        assert isinstance(remote, RemoteEnv) and remote.mode == "lockstep"
        assert (remote.spec.action_dim, remote.spec.cameras, remote.spec.image_size, remote.spec.control_hz) == \
            (local.spec.action_dim, local.spec.cameras, local.spec.image_size, local.spec.control_hz)
        assert [t.task for t in remote.tasks()] == [t.task for t in local.tasks()]
        eps = local.episode_specs(0, 8)
        ref = _trajectory(local, eps)
        got = _trajectory(remote, remote.episode_specs(0, 8))
        assert len(ref) == len(got) == 8
        total = 0
        for r, g in zip(ref, got):
            assert len(r["steps"]) == len(g["steps"]) > 1
            for sr, sg in zip(r["steps"], g["steps"]):
                _same_obs(sr["obs"], sg["obs"])
                if "action" in sr:
                    assert sr["action"].tobytes() == sg["action"].tobytes()
                    assert (sr["reward"], sr["success"], sr["done"]) == (sg["reward"], sg["success"], sg["done"])
                    total += 1
        assert all(t["steps"][-1]["success"] for t in ref)  # the expert solves every episode: a real trajectory
        assert agent.summary()["safety"] == {k: 0 for k in agent.summary()["safety"]}  # no intervention altered it
        assert len(agent.commands) == total
        st = remote.bridge_stats()  # every step timed; the agent's share is inside the round trip
        assert st["steps"] == total and st["resets"] == 8 and st["dropped"] == {}
        assert 0 <= st["bridge_ms"]["p50"] <= st["round_trip_ms"]["p50"] and st["agent_ms"]["p50"] > 0
    finally:
        remote.close()
        agent.stop()


def test_vla_runtime_evaluate_through_the_bridge_matches(tmp_path: Path) -> None:
    from vla_runtime.runtime.evaluate import EvalConfig, evaluate

    agent = RobotAgent(SimDriver(make_env("dummy:reach")), free_tcp_endpoint(), lockstep=True).start()
    try:
        a = evaluate(EvalConfig(env="dummy:reach", policy="scripted", episodes=4, out=tmp_path / "a"), progress=False)
        b = evaluate(EvalConfig(env=f"remote:{agent.endpoint}", policy="scripted", episodes=4, out=tmp_path / "b"),
                     progress=False)
    finally:
        agent.stop()
    key = [(r["seed"], r["task"], r["success"], r["steps"]) for r in a["per_episode"]]
    assert key == [(r["seed"], r["task"], r["success"], r["steps"]) for r in b["per_episode"]]
    assert a["aggregated"]["success_pct"] == b["aggregated"]["success_pct"] == 100.0


def test_run_robot_agent_stops_on_event_and_on_ctrl_c() -> None:
    stop = threading.Event()
    endpoint = free_tcp_endpoint()
    res: dict[str, Any] = {}
    t = threading.Thread(target=lambda: res.update(run_robot_agent("dummy:reach", endpoint, lockstep=True,
                                                                   stop=stop, quiet=True)))
    t.start()
    env = RemoteEnv(endpoint, timeout_s=10.0)
    env.reset(env.episode_specs(3, 1)[0])
    env.step(np.zeros(7, np.float32))
    env.close()
    stop.set()
    t.join(10)
    assert not t.is_alive() and res["episodes"] == 1 and res["rx"]["action_chunk"] == 1

    endpoint = free_tcp_endpoint()
    p = subprocess.Popen([sys.executable, "-m", "vla_runtime.bridges.agent", "--env", "dummy:reach", "--bind", endpoint,
                          "--lockstep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert "robot agent: dummy:reach" in p.stdout.readline()
        env = RemoteEnv(endpoint, timeout_s=10.0)
        env.reset(env.episode_specs(0, 1)[0])
        env.close()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert summary["episodes"] == 1 and summary["rx"]["bye"] == 1


def test_bench_bridge_writes_bench_json(tmp_path: Path) -> None:
    from vla_runtime.bridges.bench import bench_bridge

    r = bench_bridge(episodes=2, steps=60, image_size=128, out_dir=str(tmp_path))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert {"bench", "env", "episodes", "seeds", "machine", "baseline", "methods"} <= set(saved)
    assert saved["baseline"] == "in_process" and [m["name"] for m in saved["methods"]] == ["in_process", "bridge_lockstep"]
    bridge = saved["methods"][1]
    assert bridge["identical_to_in_process"] is True and bridge["obs_payload_bytes"] == 2 * 128 * 128 * 3 + 32
    assert bridge["steps"] == saved["methods"][0]["steps"] > 0 and bridge["messages"] >= 2 * bridge["steps"]
    for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "ratio_to_baseline", "messages_per_s"):
        assert bridge[k] is not None and bridge[k] > 0


def test_ipc_endpoint_in_a_tmp_dir(tmp_path: Path) -> None:
    agent = RobotAgent(SimDriver(make_env("dummy:reach")), f"ipc://{tmp_path}/agent.sock", lockstep=True).start()
    try:
        env = make_env(f"remote:{agent.endpoint}")
        obs = env.reset(env.episode_specs(5, 1)[0])
        r = env.step(np.zeros(7, np.float32))
        assert r.obs.step == obs.step + 1 == 1
        env.close()
    finally:
        agent.stop()


def test_agent_interventions_reach_the_episode_record() -> None:
    """A policy that slams an axis from low to high every tick: the agent rate-limits, and the eval says so."""
    from vla_runtime.runtime.evaluate import aggregate
    from vla_runtime.runtime.loop import LoopConfig, run_episode
    from vla_runtime.runtime.types import ActionChunk, PolicySpec

    class Slam:
        def __init__(self, spec: Any) -> None:
            self.spec = PolicySpec(action_dim=spec.action_dim, chunk_size=2, n_action_steps=2, cameras=(),
                                   state_dim=spec.state_dim, control_hz=spec.control_hz)
            self.low, self.high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)

        def reset(self, instruction: str) -> None:
            pass

        def act(self, obs: Any) -> ActionChunk:
            a = np.zeros((2, self.spec.action_dim), np.float32)
            a[0, 0], a[1, 0] = self.low[0], self.high[0]  # a full-range jump each tick
            return ActionChunk(actions=a, stamp=obs.stamp)

    agent = RobotAgent(SimDriver(make_env("dummy:reach")), free_tcp_endpoint(), lockstep=True).start()
    remote = make_env(f"remote:{agent.endpoint}")
    try:
        rec = run_episode(remote, Slam(remote.spec), remote.episode_specs(0, 1)[0], LoopConfig(max_steps=12)).to_record()
    finally:
        remote.close()
        agent.stop()
    assert rec["steps"] == 12
    assert rec["safety"]["rate_limited"] >= 5  # 12 jumps of the full range, limited to half of it per tick
    assert rec["safety"] == {k: v for k, v in agent.summary()["safety"].items() if v}
    assert aggregate([rec])["aggregated"]["safety"] == rec["safety"]
