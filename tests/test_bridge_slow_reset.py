"""Slow and heavy resets through the robot agent: the LIBERO-over-the-bridge hang and its neighbours.

The hang (RemoteEnv.reset of libero:libero_object never answered within 300 s) was a reply the client
dropped: a LIBERO observation carried ~50 privileged arrays, one frame each, over the max_arrays limit, and
the client discarded it (logged at debug level) and waited out the timeout. These tests pin the fix and the
failure modes around a long reset: a reset slower than many heartbeat intervals with a LIBERO-sized
privileged payload; a reply one side cannot accept (reported at once, with its reason); an agent bug
(answered with an error, the agent keeps serving); an agent that dies during a reset (reported in seconds).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from vla_runtime.bridges import protocol as P
from vla_runtime.bridges.agent import RobotAgent
from vla_runtime.bridges.client import LINK_LOST_GRACE_S, BridgeClient, BridgeError, RemoteEnv
from vla_runtime.bridges.safety import SafetyConfig
from vla_runtime.bridges.testing import FakeDriver, free_tcp_endpoint
from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.runtime.types import Observation

RESET_S = 1.5  # > 6 lockstep heartbeat intervals (0.25 s), > 10 realtime watchdog windows at 10 Hz


def scene(n_objects: int, step: int) -> dict[str, Any]:
    """LIBERO-like privileged state: 6 pose/box arrays per object, robot arrays, collision boxes, names."""
    rng = np.random.default_rng(step)
    p: dict[str, Any] = {"task": "hover", "objects": np.array([f"obj_{i}" for i in range(n_objects)]),
                         "goal": np.array(["in", "obj_0", "basket_1_contain_region"]),
                         "eef_pos": rng.standard_normal(3), "collision_boxes": rng.standard_normal((3 * n_objects, 15)),
                         "collision_owner": np.arange(3 * n_objects) % n_objects}
    for i in range(n_objects):
        for k, shape in (("pos", (3,)), ("quat", (4,)), ("aabb", (2, 3)), ("obb_rot", (3, 3)),
                         ("obb_center", (3,)), ("obb_half", (3,))):
            p[f"obj_{i}_{k}"] = rng.standard_normal(shape)
    return p


@dataclass
class SlowSceneDriver(FakeDriver):
    """A FakeDriver whose reset takes `reset_s` (a simulator build) and whose observations carry a scene."""

    reset_s: float = RESET_S
    n_objects: int = 8
    fail_outcome: bool = False

    def reset(self, episode: dict[str, Any]) -> Observation:
        time.sleep(self.reset_s)
        return super().reset(episode)

    def read_observation(self) -> Observation:
        return dataclasses.replace(super().read_observation(), privileged=scene(self.n_objects, self._step))

    def outcome(self) -> Any:
        if self.fail_outcome:
            raise RuntimeError("simulated driver bug")
        return super().outcome()


def _same_tree(a: Any, b: Any) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        w = b[k]
        if isinstance(v, np.ndarray):
            assert w.shape == v.shape and w.dtype.kind == v.dtype.kind and w.tolist() == v.tolist(), k
            if v.dtype.kind == "f":
                assert w.tobytes() == v.tobytes(), k  # bit-exact
        else:
            assert w == v, k


@pytest.mark.parametrize("lockstep", [True, False])
def test_slow_reset_with_a_libero_sized_scene_through_the_agent(lockstep: bool) -> None:
    drv = SlowSceneDriver(control_hz=10.0, n_objects=8, cameras=("agentview", "wrist"))
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=lockstep,
                       safety=SafetyConfig(watchdog_periods=5.0, max_action_age_s=5.0)).start()
    env = RemoteEnv(agent.endpoint, timeout_s=10.0)
    try:
        assert len(scene(8, 0)) > P.DEFAULT_LIMITS.max_arrays  # one frame per array would not fit
        ep = EpisodeSpec(env="x", task="hover", index=0, seed=0)
        obs = env.reset(ep)  # RESET_S: many heartbeat intervals, during which the agent reads nothing
        assert drv.resets == 1 and obs.step == 0 and set(obs.images) == {"agentview", "wrist"}
        _same_tree(scene(8, 0), obs.privileged)
        assert env.client.stats["dropped"] == {} and env.client.async_errors == []
        for i in range(5):
            r = env.step(np.full(7, 0.1, np.float32))
            assert np.all(np.isfinite(r.obs.state)) and "obj_7_obb_rot" in r.obs.privileged
        assert len(drv.applied) >= (5 if lockstep else 1)
        assert all(np.allclose(a, 0.1) for _, a in drv.applied)  # exactly what was sent, nothing else
        if not lockstep:  # the client was alive throughout: no hold blamed on a silent controller
            assert agent.safety.summary().get("watchdog", 0) == 0
        obs2 = env.reset(EpisodeSpec(env="x", task="hover", index=1, seed=1))  # a second slow reset
        assert drv.resets == 2 and obs2.step == 0
        assert agent.alive and agent.stats["dropped"] == {} and agent.error is None
    finally:
        env.close()
        agent.stop()


def test_a_reply_the_client_cannot_accept_fails_the_request_at_once() -> None:
    """The original hang, made explicit: the client's limits reject the agent's reset reply. The request
    fails with the rejection's reason instead of waiting out the (here 60 s) timeout."""
    drv = SlowSceneDriver(reset_s=0.0, cameras=("a", "b", "c", "d"))
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=True).start()
    client = BridgeClient(agent.endpoint, limits=P.Limits(max_arrays=4), timeout_s=60.0)
    try:
        client.connect()
        with pytest.raises(BridgeError) as e:  # code 'timeout' (BridgeTimeout) would be the old hang
            client.request("reset", {"episode": {"task": "hover", "seed": 0}}, expect=("obs",))
        assert e.value.code == "frame_count" and "dropped by this client" in e.value.reason
        assert client.stats["dropped"]["frame_count"] == 1
    finally:
        client.close()
        agent.stop()


def test_a_reply_the_agent_may_not_send_becomes_an_error_reply() -> None:
    """The agent checks what it sends against the limits it advertised: too many arrays -> error too_large."""
    drv = SlowSceneDriver(reset_s=0.0, cameras=("a", "b", "c", "d"))
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=True, limits=P.Limits(max_arrays=4)).start()
    client = BridgeClient(agent.endpoint, timeout_s=60.0)
    try:
        client.connect()
        with pytest.raises(BridgeError) as e:
            client.request("reset", {"episode": {"task": "hover", "seed": 0}}, expect=("obs",))
        assert e.value.code == "too_large" and "max_arrays" in e.value.reason
        assert agent.alive and agent.stats["dropped"]["tx_too_large"] == 1
    finally:
        client.close()
        agent.stop()


def test_an_agent_bug_is_an_error_reply_and_the_agent_keeps_serving() -> None:
    drv = SlowSceneDriver(reset_s=0.0, fail_outcome=True)
    agent = RobotAgent(drv, free_tcp_endpoint(), lockstep=True).start()
    env = RemoteEnv(agent.endpoint, timeout_s=10.0)
    try:
        env.reset(EpisodeSpec(env="x", task="hover", index=0, seed=0))
        with pytest.raises(BridgeError) as e:
            env.step(np.zeros(7, np.float32))
        assert e.value.code == "internal" and "simulated driver bug" in e.value.reason
        assert agent.alive and agent.error is None
        drv.fail_outcome = False
        env.reset(EpisodeSpec(env="x", task="hover", index=1, seed=1))  # the agent still serves
        assert env.step(np.zeros(7, np.float32)).obs.step == 1
    finally:
        env.close()
        agent.stop()


AGENT_SCRIPT = textwrap.dedent("""
    import sys, time
    from vla_runtime.bridges.agent import RobotAgent
    from vla_runtime.bridges.testing import FakeDriver

    class Stuck(FakeDriver):
        def reset(self, episode):
            print("resetting", flush=True)
            time.sleep(600)

    RobotAgent(Stuck(), sys.argv[1], lockstep=True).run()
""")


def test_an_agent_that_dies_during_a_reset_is_reported_in_seconds() -> None:
    endpoint = free_tcp_endpoint()
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, endpoint], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    client = BridgeClient(endpoint, timeout_s=300.0, handshake_timeout_s=60.0)
    try:
        client.connect()
        seq = client.send("reset", {"episode": {"task": "hover", "seed": 0}})
        assert proc.stdout is not None and proc.stdout.readline().strip() == "resetting"
        proc.send_signal(signal.SIGKILL)  # a simulator segfault, an OOM kill
        proc.wait(10)
        with pytest.raises(BridgeError) as e:  # not BridgeTimeout after 300 s
            client._wait_reply(seq, 300.0, expect=("obs",))
        assert e.value.code == "closed" and "lost the connection" in e.value.reason
        assert LINK_LOST_GRACE_S < 60 and client.stats["link"]["disconnected"] >= 1
    finally:
        client.close(bye=False)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
