"""Faults: a killed client, delayed and dropped messages, a restarted client, a hung policy, bad requests.

The assertions are on the agent's command log (every tick: action or hold, when, why, the stamp of the
observation an action answers) and on the fake driver's log of what reached the actuators, so they check
the safety properties themselves rather than timings: e.g. "no action is executed more than 2 control
periods after the last message from a dead client" holds exactly, however loaded the machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Callable

import numpy as np
import pytest

from vla_runtime.bridges.agent import RobotAgent
from vla_runtime.bridges.client import BridgeClient, BridgeError, BridgeTimeout
from vla_runtime.bridges.safety import SafetyConfig
from vla_runtime.bridges.testing import FakeDriver, free_tcp_endpoint

HZ = 50.0
PERIOD = 1.0 / HZ
EPISODE = {"task": "hover", "seed": 0}


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def _agent(lockstep: bool = False, **safety: float) -> tuple[RobotAgent, FakeDriver]:
    drv = FakeDriver(control_hz=HZ)
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=lockstep, safety=SafetyConfig(**safety), takeover_s=0.3)
    return agent.start(), drv


def _marker(tick: int, chunk_id: int = 0) -> np.ndarray:
    """An action that says which tick it was meant for (a[0] = tick / 1000) and which chunk sent it."""
    a = np.zeros(7, np.float32)
    a[0] = tick / 1000.0
    a[1] = chunk_id / 100.0
    return a


def _intended_tick(a: np.ndarray) -> int:
    return int(round(float(a[0]) * 1000))


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from vla_runtime.bridges.client import BridgeClient
    c = BridgeClient(sys.argv[1], timeout_s=5.0)
    c.connect()
    c.request("reset", {"episode": {"task": "hover", "seed": 0}}, expect=("obs",))
    n = 0
    while True:
        m = c.recv_obs(after_tick=-1 if n == 0 else tick)
        tick = m.body["tick"]
        acts = np.stack([np.array([(tick + i) / 1000.0, 0.01, 0, 0, 0, 0, 0], np.float32) for i in range(10)])
        c.send_chunk(acts, m.body["stamp"], tick)
        n += 1
        if n == 20:
            print("streaming", flush=True)
""")


def test_killed_client_robot_holds_within_two_periods_and_a_new_client_reconnects() -> None:
    agent, drv = _agent(watchdog_periods=2.0)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, agent.endpoint], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "streaming", proc.stderr.read() if proc.poll() is not None else line
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # no bye, no goodbye: the process is gone mid-chunk
        proc.wait(10)
        t_kill = time.monotonic()
        _wait(lambda: sum(1 for c in list(agent.commands) if c.t > t_kill) >= 15)
        t_last = max(t for t, _, _ in list(agent.rx_log))  # last message the agent got from the dead client
        cmds = list(agent.commands)
        before = [c for c in cmds if c.t <= t_last]
        after = [c for c in cmds if c.t > t_last + agent.watchdog_s]
        assert sum(c.kind == "action" for c in before) >= 10  # the client really was in control
        assert after and all(c.kind == "hold" for c in after)  # held within 2 periods of the last message
        assert {c.reason for c in after} == {"watchdog"}
        assert all(t <= t_last + agent.watchdog_s for t, _ in drv.applied)  # nothing later reached the actuators
        # while it drove, every executed action was the one meant for its tick
        assert all(_intended_tick(c.action) == c.tick for c in before if c.kind == "action")

        # a restarted client takes over the session (after takeover_s of silence) and drives again
        client = BridgeClient(agent.endpoint, timeout_s=5.0, handshake_timeout_s=10.0)
        spec = client.connect()
        assert spec["episode_active"] is True
        n_applied = len(drv.applied)
        m = client.recv_obs()
        tick = m.body["tick"]
        client.send_chunk(np.stack([_marker(tick + i, 7) for i in range(5)]), m.body["stamp"], tick)
        _wait(lambda: len(drv.applied) >= n_applied + 3)
        resumed = [c for c in list(agent.commands) if c.kind == "action" and abs(c.action[1] - 0.07) < 1e-6]
        assert resumed and all(_intended_tick(c.action) == c.tick for c in resumed)
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        agent.stop()
    assert agent.alive is False and agent.error is None


def test_delayed_and_dropped_chunks_never_execute_stale_actions() -> None:
    max_age = 0.2
    agent, drv = _agent(max_action_age_s=max_age, watchdog_periods=50.0)
    client = BridgeClient(agent.endpoint, timeout_s=5.0)
    try:
        client.connect()
        client.request("reset", {"episode": EPISODE}, expect=("obs",))
        # 1. a chunk delayed in transit beyond the maximum age is refused whole
        m = client.recv_obs()
        time.sleep(max_age + 0.05)
        seq = client.send_chunk(np.stack([_marker(m.body["tick"] + i, 1) for i in range(5)]), m.body["stamp"],
                                m.body["tick"])
        with pytest.raises(BridgeError) as e:
            client._wait_reply(seq, 5.0, expect=("ack",))
        assert e.value.code == "stale"
        # 2. a chunk delayed by a few ticks: the actions whose tick passed are dropped, the rest land on their tick
        m = client.recv_obs()
        time.sleep(4 * PERIOD)
        seq = client.send_chunk(np.stack([_marker(m.body["tick"] + i, 2) for i in range(30)]), m.body["stamp"],
                                m.body["tick"])
        ack = client._wait_reply(seq, 5.0, expect=("ack",))
        assert ack.body["dropped"] >= 1 and ack.body["accepted"] + ack.body["dropped"] == 30
        # 3. every later chunk is dropped in transit (heartbeats still flow): the queued actions run until
        #    they are older than max_age, then the robot holds
        _wait(lambda: any(c.reason == "stale_age" for c in list(agent.commands)))
        time.sleep(5 * PERIOD)
    finally:
        client.close()
        agent.stop()
    cmds = list(agent.commands)
    executed = [c for c in cmds if c.kind == "action"]
    assert executed, "the fresh part of chunk 2 executed"
    assert all(abs(c.action[1] - 0.02) < 1e-6 for c in executed)  # nothing from the refused chunk 1
    for c in executed:
        assert _intended_tick(c.action) == c.tick  # never on a tick it was not meant for
        assert c.obs_stamp is not None and c.t - c.obs_stamp <= max_age  # never older than the limit
    assert agent.safety.counts["stale_age"] >= 1 and agent.safety.counts["tick_passed"] >= 1
    assert len(drv.applied) == len(executed)


def test_hung_policy_starves_then_silent_client_trips_watchdog_then_resumes_cleanly() -> None:
    agent, drv = _agent(watchdog_periods=3.0, max_delta_frac=0.25)
    client = BridgeClient(agent.endpoint, timeout_s=5.0)
    try:
        client.connect()
        client.request("reset", {"episode": EPISODE}, expect=("obs",))
        m = client.recv_obs()
        t0 = m.body["tick"]
        # heartbeats alive but no chunk (policy still thinking): the robot holds, reason "starved"
        _wait(lambda: agent._tick >= t0 + 5)
        # the process goes silent (no heartbeats either): reason "watchdog"
        client._stop_heartbeat()
        _wait(lambda: any(c.reason == "watchdog" for c in list(agent.commands)))
        client._start_heartbeat()
        m = client.recv_obs()
        tick = m.body["tick"]
        big = np.zeros((5, 7), np.float32)
        big[:, 2] = 1.0  # a full-scale command right after a hold: rate limited, no jump
        client.send_chunk(big, m.body["stamp"], tick)
        _wait(lambda: len(drv.applied) >= 3)
    finally:
        client.close()
        agent.stop()
    reasons = [c.reason for c in list(agent.commands) if c.kind == "hold"]
    assert "starved" in reasons and "watchdog" in reasons
    first, second = drv.applied[0][1], drv.applied[1][1]
    assert first[2] == pytest.approx(0.5) and second[2] == pytest.approx(1.0)  # 0.25 x range per tick from hold
    assert agent.summary()["safety"]["rate_limited"] >= 1


def test_second_controller_is_refused_while_the_first_is_alive() -> None:
    agent, _ = _agent()
    a = BridgeClient(agent.endpoint, timeout_s=5.0, name="first")
    b = BridgeClient(agent.endpoint, timeout_s=5.0, handshake_timeout_s=0.6, name="second")
    try:
        a.connect()
        with pytest.raises(BridgeTimeout, match="busy"):
            b.connect()
        a.request("reset", {"episode": EPISODE}, expect=("obs",))  # the first one still owns the robot
    finally:
        a.close()
        b.close(bye=False)
        agent.stop()


def test_bad_requests_get_clear_errors_and_move_nothing() -> None:
    agent, drv = _agent(lockstep=True)
    c = BridgeClient(agent.endpoint, timeout_s=5.0)
    try:
        c.connect()
        seq = c.send_chunk(np.zeros((1, 7), np.float32), 0.0, 0)
        with pytest.raises(BridgeError) as e:
            c._wait_reply(seq, 5.0, expect=("step",))
        assert e.value.code == "no_episode"
        with pytest.raises(BridgeError) as e:
            c.request("reset", {"episode": {"task": "fly", "seed": 0}}, expect=("obs",))
        assert e.value.code == "bad_episode" and "fly" in e.value.reason
        m = c.request("reset", {"episode": EPISODE}, expect=("obs",))
        stamp = m.body["stamp"]
        for acts, code in ((np.full((2, 7), np.nan, np.float32), "non_finite"), (np.zeros((1, 6), np.float32),
                                                                                   "bad_action_dim")):
            seq = c.send_chunk(acts, stamp, 0)
            with pytest.raises(BridgeError) as e:
                c._wait_reply(seq, 5.0, expect=("step",))
            assert e.value.code == code
        assert drv.applied == []
        # an out-of-range action executes clamped, and the reply reports the intervention
        seq = c.send_chunk(np.full((1, 7), 3.0, np.float32), stamp, 0)
        r = c._wait_reply(seq, 5.0, expect=("step",))
        assert r.body["safety"]["clamped"] == 1 and r.body["result"]["executed"] == 1
        assert np.all(drv.applied[0][1] <= 1.0)
        summary = c.close()
        assert summary is not None and summary["safety"]["non_finite"] == 2 and summary["safety"]["clamped"] == 1
    finally:
        agent.stop()


def test_dead_agent_is_a_timeout_not_a_hang() -> None:
    agent, _ = _agent(lockstep=True)
    c = BridgeClient(agent.endpoint, timeout_s=0.3)
    c.connect()
    agent.stop()
    with pytest.raises(BridgeTimeout):
        c.request("reset", {"episode": EPISODE}, expect=("obs",))
    c.close(bye=False)


def test_remote_env_realtime_steps_and_async_chunks() -> None:
    from vla_runtime.bridges.client import RemoteEnv
    from vla_runtime.envs.base import EpisodeSpec
    from vla_runtime.runtime.types import ActionChunk

    agent, drv = _agent(watchdog_periods=5.0)
    env = RemoteEnv(agent.endpoint, timeout_s=5.0)
    try:
        assert env.mode == "realtime" and env.spec.control_hz == HZ
        obs = env.reset(EpisodeSpec(env.spec.name, "hover", 0, 0))
        assert obs.step == 0 and obs.privileged == {"task": "hover"}
        assert abs(obs.stamp - time.monotonic()) < 5.0  # converted into this process's clock
        ticks = [obs.step]
        for i in range(5):
            r = env.step(_marker(env._tick))  # one action for the tick of the latest observation
            ticks.append(r.obs.step)
            assert "safety_total" in r.info
        assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)  # every step returns a newer observation
        # async: a whole chunk aligned to the latest observation's tick, acknowledged, executed on its ticks
        o = env.latest_observation()
        seq = env.send_chunk(ActionChunk(np.stack([_marker(o.step + 1 + i, 9) for i in range(6)]), o.stamp), o.step + 1)
        _wait(lambda: sum(abs(c.action[1] - 0.09) < 1e-6 for c in list(agent.commands)) >= 4)
        ack = env.client.poll_reply(seq)
        assert ack is not None and ack.kind == "ack" and ack.body["accepted"] == 6
    finally:
        env.close()
        agent.stop()
    executed = [c for c in list(agent.commands) if c.kind == "action"]
    assert executed and all(_intended_tick(c.action) == c.tick for c in executed)
    summary = agent.summary()
    assert 0 < summary["tick_interval_ms_p50"] <= summary["tick_interval_ms_p99"] <= summary["tick_interval_ms_max"]


def test_realtime_episodes_through_the_runtime_loop() -> None:
    """The lead's control loop drives a realtime agent (which owns time) episode after episode."""
    from vla_runtime.bridges.agent import SimDriver
    from vla_runtime.bridges.client import RemoteEnv
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy
    from vla_runtime.runtime.loop import LoopConfig, run_episode

    agent = RobotAgent(SimDriver(make_env("dummy:reach")), free_tcp_endpoint(), lockstep=False).start()
    env = RemoteEnv(agent.endpoint, timeout_s=5.0)
    try:
        assert env.paces_itself
        specs = env.episode_specs(0, 3)
        # a long idle episode first: its streamed observations must not leak into the next episode
        env.reset(specs[0])
        for _ in range(25):
            last = env.step(np.zeros(7, np.float32))
        assert last.obs.step >= 25
        env.reset(specs[1])
        first = env.step(np.zeros(7, np.float32))
        assert first.obs.step < 20, "the step after a reset went to the previous episode's tick"
        policy = make_policy("scripted", env_name=env.spec.name)
        results = [run_episode(env, policy, s, LoopConfig(clock="unpaced")) for s in specs]
    finally:
        env.close()
        agent.stop()
    assert all(r.success for r in results), [(r.success, r.steps) for r in results]
    executed = [c for c in list(agent.commands) if c.kind == "action"]
    assert executed and all(c.obs_stamp is not None and c.t >= c.obs_stamp for c in executed)


def test_clock_offset_is_not_skewed_by_a_slow_starting_agent() -> None:
    """The first hello may wait in a queue while the agent starts: the offset must come from a fresh probe."""
    import threading

    endpoint = free_tcp_endpoint()
    client = BridgeClient(endpoint, timeout_s=5.0, handshake_timeout_s=10.0)
    t = threading.Thread(target=client.connect)
    t.start()
    time.sleep(0.6)  # the client's hello is queued for 0.6 s before anyone answers it
    agent = RobotAgent(FakeDriver(control_hz=HZ), endpoint, lockstep=True).start()
    try:
        t.join(10)
        assert client.connected
        # one machine, one monotonic clock: the true offset is 0
        assert abs(client.clock_offset) < 0.1, (client.clock_offset, client.clock_rtt_s)
        assert client.clock_rtt_s < 0.2
    finally:
        client.close()
        agent.stop()
