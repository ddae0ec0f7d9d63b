"""LIBERO through the bridge: a `vla-runtime robot`-style agent process serving libero_object/0 (lockstep),
driven by RemoteEnv and the scripted expert, step for step identical to the same env in-process.

This is the path that hung (the reset reply was dropped by the client, see test_bridge_slow_reset.py). One
episode, a few steps: the agent and this process each build the simulator once (~5-10 s each).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libero.libero")

from vla_runtime.bridges.client import RemoteEnv  # noqa: E402
from vla_runtime.bridges.testing import free_tcp_endpoint  # noqa: E402
from vla_runtime.envs import make_env  # noqa: E402
from vla_runtime.policies import make_policy  # noqa: E402

ENV = "libero:libero_object/0"
N_STEPS = 12


def test_libero_episode_over_the_bridge_matches_in_process() -> None:
    endpoint = free_tcp_endpoint()
    agent = subprocess.Popen([sys.executable, "-m", "vla_runtime.bridges.agent", "--env", ENV, "--bind", endpoint,
                              "--lockstep", "--quiet"], env=dict(os.environ, PYTHONUNBUFFERED="1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    remote = None
    local = make_env(ENV)  # the agent builds its env the same way (default cameras, 128 px)
    try:
        remote = RemoteEnv(endpoint, handshake_timeout_s=120.0)
        assert remote.spec.cameras == local.spec.cameras and remote.spec.image_size == local.spec.image_size
        assert [t.task for t in remote.tasks()] == [t.task for t in local.tasks()]
        ep_remote = remote.episode_specs(seed=57, episodes=1)[0]
        ep_local = local.episode_specs(seed=57, episodes=1)[0]
        # the handshake carries each task's init-state count: the client records the same init state
        assert ep_remote.init_state == ep_local.init_state == 7
        assert ep_remote.episode_key() == ep_local.episode_key()
        obs_r = remote.reset(ep_remote)  # the first reset builds the simulator in the agent process
        obs_l = local.reset(ep_local)
        pol_r, pol_l = make_policy("scripted", env_name=remote.spec.name), make_policy("scripted", env_name=ENV)
        start = obs_l.state.copy()
        pol_r.reset(obs_r.instruction)
        pol_l.reset(obs_l.instruction)
        for i in range(N_STEPS + 1):
            assert obs_r.instruction == obs_l.instruction and obs_r.step == obs_l.step == i
            assert obs_r.state.tobytes() == obs_l.state.tobytes()
            for cam in local.spec.cameras:
                assert np.array_equal(obs_r.images[cam], obs_l.images[cam])
            assert obs_r.privileged.keys() == obs_l.privileged.keys()
            for k, v in obs_l.privileged.items():  # ~50 arrays: poses, boxes, names; float64 bit-exact
                w = obs_r.privileged[k]
                assert (w.tolist() == v.tolist() and w.tobytes() == v.tobytes()
                        if isinstance(v, np.ndarray) and v.dtype.kind not in "US"
                        else np.array_equal(w, v) if isinstance(v, np.ndarray) else w == v), k
            if i == N_STEPS:
                break
            a_r, a_l = pol_r.act(obs_r).actions[0], pol_l.act(obs_l).actions[0]
            assert a_r.tobytes() == a_l.tobytes()
            r_r, r_l = remote.step(a_r), local.step(a_l)
            assert (r_r.reward, r_r.success, r_r.done) == (r_l.reward, r_l.success, r_l.done)
            obs_r, obs_l = r_r.obs, r_l.obs
        assert remote.client.stats["dropped"] == {}
        assert np.abs(obs_l.state[:3] - start[:3]).max() > 1e-3  # the expert moved the arm: a real trajectory
    finally:
        if remote is not None:
            remote.close()
        local.close()
        agent.terminate()
        try:
            _, err = agent.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            _, err = agent.communicate()
        assert agent.returncode == 0 or agent.returncode == -15, err[-2000:]
