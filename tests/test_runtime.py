"""Runtime loop: deadline accounting on the simulated clock, async alignment, queue semantics, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from vla_runtime.envs import make_env
from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.runtime.loop import LoopConfig, roll_state_forward, run_episode
from vla_runtime.runtime.metrics import wilson_ci
from vla_runtime.runtime.queue import ActionQueue
from vla_runtime.runtime.types import ActionChunk, Observation, PolicySpec


class ChunkPolicy:
    """Emits chunks whose actions encode (obs step, index in chunk) so the test can see what executed."""

    def __init__(self, chunk: int = 8, n_exec: int = 8) -> None:
        self.spec = PolicySpec(action_dim=7, chunk_size=chunk, n_action_steps=n_exec, name="chunk")
        self.calls: list[Observation] = []

    def reset(self, instruction: str) -> None:
        self.calls = []

    def act(self, obs: Observation) -> ActionChunk:
        self.calls.append(obs)
        a = np.zeros((self.spec.chunk_size, 7), np.float32)
        a[:, 0] = 0.01 * obs.step  # which observation it answers
        a[:, 1] = 0.01 * np.arange(self.spec.chunk_size)  # index within the chunk
        return ActionChunk(a, obs.stamp, {"tokens_kept": 10})


@pytest.fixture()
def env():
    e = make_env("dummy:reach")
    yield e
    e.close()


def spec0(env) -> EpisodeSpec:
    return env.episode_specs(seed=3, episodes=1)[0]


def test_unpaced_sync_executes_n_action_steps_per_inference(env):
    pol = ChunkPolicy(chunk=8, n_exec=4)
    r = run_episode(env, pol, spec0(env), LoopConfig(max_steps=20))
    assert r.steps == 20
    assert len(r.inference_ms) == 5  # 20 steps / 4 executed per chunk
    assert [o.step for o in pol.calls] == [0, 4, 8, 12, 16]
    assert r.deadline_misses == 0
    assert r.to_record()["accel"]["mean_tokens_kept"] == 10


@pytest.mark.parametrize("latency_ms, misses_per_chunk", [(10.0, 0), (50.0, 0), (60.0, 1), (120.0, 2), (151.0, 3)])
def test_sim_clock_deadline_accounting(env, latency_ms, misses_per_chunk):
    # Period 50 ms: an inference of X ms leaves ceil(X/50)-1 ticks without an action (the robot holds).
    pol = ChunkPolicy(chunk=4, n_exec=4)
    r = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", latency_ms=latency_ms, max_steps=40))
    full, rem = divmod(40, misses_per_chunk + 4)  # each cycle: m held ticks, then 4 executed actions
    assert r.deadline_misses == full * misses_per_chunk + min(misses_per_chunk, rem)
    assert len(r.inference_ms) == full + (rem > 0)
    assert r.steps == 40
    held = [t for t in r.ticks if not t.action_ready]
    assert len(held) == r.deadline_misses
    # every reaction is (misses + 1) periods
    assert all(abs(x - (misses_per_chunk + 1) * 50.0) < 1e-6 for x in r.reaction_ms)


def test_async_removes_stalls_when_inference_shorter_than_chunk(env):
    pol = ChunkPolicy(chunk=8, n_exec=8)
    sync = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", latency_ms=120.0, max_steps=48))
    asyn = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=120.0, max_steps=48,
                                                        async_trigger=3))
    assert sync.deadline_misses > 0
    # only the very first inference of the episode can stall in async mode
    assert sum(not t.action_ready for t in asyn.ticks[3:]) == 0
    assert asyn.deadline_misses <= 2


def test_async_drops_actions_already_due(env):
    pol = ChunkPolicy(chunk=8, n_exec=8)
    r = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=120.0, max_steps=30,
                                                     async_trigger=3, future_state=False))
    # without future-state alignment, the first 2 actions of every chunk after the first are stale and dropped
    assert r.dropped_actions >= 2 * (len(r.inference_ms) - 1)


def test_future_state_rolls_the_observation_forward(env):
    pol = ChunkPolicy(chunk=8, n_exec=8)

    class Moving(ChunkPolicy):
        def act(self, obs):
            c = super().act(obs)
            c.actions[:, 0] = 1.0  # +5 cm per step in x
            return c

    p = Moving()
    run_episode(env, p, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=120.0, max_steps=24,
                                               async_trigger=3))
    later = p.calls[2:]
    assert later, "needs a few inferences"
    # a conditioned state is ahead of the env's true state by (lead) steps of +5 cm in x
    assert all(o.state[0] > o.privileged["eef_pos"][0] + 0.04 for o in later)


def test_roll_state_forward_math():
    s = np.zeros(8, np.float32)
    pend = np.zeros((3, 7), np.float32)
    pend[:, 0] = 1.0
    pend[:, 5] = 0.2
    out = roll_state_forward(s, pend, (0.05,) * 3 + (0.5,) * 3)
    assert out[0] == pytest.approx(0.15)
    assert out[5] == pytest.approx(0.3)
    assert out[6] == 0.0  # gripper untouched
    assert s[0] == 0.0  # input not modified


def test_queue_latest_and_weighted():
    q = ActionQueue("latest")
    q.put(np.ones((4, 7)), first_tick=10, now_tick=10)
    assert q.depth(10) == 4
    dropped = q.put(np.full((4, 7), 2.0), first_tick=9, now_tick=11)
    assert dropped == 2  # ticks 9 and 10 already passed
    assert q.depth(11) == 2 and q.pop(11)[0] == 2.0
    w = ActionQueue("weighted", new_weight=0.25)
    w.put(np.zeros((4, 7)), 0, 0)
    a = np.ones((4, 7))
    a[:, -1] = -1.0
    w.put(a, 2, 1)
    assert w.pop(2)[0] == pytest.approx(0.25)
    assert w.pop(3)[-1] == -1.0  # gripper takes the newest command
    assert w.pop(5)[0] == 1.0 and w.depth(6) == 0


def test_policy_env_action_dim_mismatch_is_a_user_error(env):
    from vla_runtime.errors import UserError

    pol = ChunkPolicy()
    pol.spec = PolicySpec(action_dim=6, chunk_size=8, n_action_steps=8)
    with pytest.raises(UserError, match="6-d"):
        run_episode(env, pol, spec0(env), LoopConfig(max_steps=5))


def test_nan_action_never_reaches_env(env):
    class NaNPolicy(ChunkPolicy):
        def act(self, obs):
            c = super().act(obs)
            c.actions[0, 0] = np.nan
            return c

    with pytest.raises(ValueError, match="non-finite"):
        run_episode(env, NaNPolicy(), spec0(env), LoopConfig(max_steps=5))


def test_wilson_ci():
    lo, hi = wilson_ci(50, 50)
    assert hi == pytest.approx(100.0) and 92.0 < lo < 93.5
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and 27 < hi < 29
    lo, hi = wilson_ci(5, 10)
    assert lo == pytest.approx(100 - hi)
    assert wilson_ci(0, 0) == (0.0, 100.0)


def test_config_validation():
    with pytest.raises(ValueError):
        LoopConfig(mode="async")  # unpaced async makes no sense
    with pytest.raises(ValueError):
        LoopConfig(clock="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PolicySpec(chunk_size=4, n_action_steps=5)
    with pytest.raises(ValueError):
        ActionChunk(np.zeros((0, 7)), 0.0)


def test_policy_can_request_a_replan(env):
    class Replanner(ChunkPolicy):
        def on_action(self, action):
            return float(action[1]) == pytest.approx(0.02)  # third action of every chunk

    pol = Replanner(chunk=8, n_exec=8)
    r = run_episode(env, pol, spec0(env), LoopConfig(max_steps=12))
    # each chunk is cut after its 3rd action: inferences at steps 0, 3, 6, 9
    assert [o.step for o in pol.calls] == [0, 3, 6, 9]
    assert r.replans == 4


def test_wall_clock_holds_while_a_slow_policy_thinks(env):
    import time as _time

    class Slow(ChunkPolicy):
        def act(self, obs):
            _time.sleep(0.12)  # > 2 control periods at 20 Hz
            return super().act(obs)

    pol = Slow(chunk=4, n_exec=4)
    r = run_episode(env, pol, spec0(env), LoopConfig(clock="wall", max_steps=12))
    assert r.steps == 12
    # every inference leaves at least 2 ticks without an action; the robot held on them
    assert r.deadline_misses >= 2 * (len(r.inference_ms) - 1)
    assert all(t.action_ready or t.queue_depth == 0 for t in r.ticks)


def test_percentile_names_do_not_collide():
    from vla_runtime.runtime.metrics import percentiles

    p = percentiles([1.0, 2.0, 3.0, 4.0, 100.0], (50, 99, 99.9))
    assert set(p) == {"p50", "p99", "p99_9"}
    assert p["p50"] == 3.0 and p["p99"] < p["p99_9"] < 100.0


class ObservingPolicy(ChunkPolicy):
    """A ChunkPolicy with the optional observe() hook: records every observation the loop feeds it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.observed: list[int] = []

    def reset(self, instruction: str) -> None:
        super().reset(instruction)
        self.observed = []

    def observe(self, obs: Observation) -> None:
        self.observed.append(int(obs.step))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_observe_hook_sees_every_tick(env, mode):
    pol = ObservingPolicy(chunk=8, n_exec=8)
    r = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode=mode, latency_ms=120.0, max_steps=30))
    assert pol.observed == list(range(r.steps))  # every tick's observation, in order, acting or not
    assert len(pol.calls) < r.steps


def test_adaptive_trigger_removes_stalls_that_a_fixed_trigger_leaves(env):
    # 180 ms at 50 ms periods: a chunk is ready 3 ticks after its observation; a fixed trigger of 1 is too late.
    pol = ChunkPolicy(chunk=16, n_exec=8)
    fixed = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=180.0, max_steps=60,
                                                         async_trigger=1, adaptive_trigger=False))
    adaptive = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=180.0,
                                                            max_steps=60, async_trigger=1))
    assert fixed.stall_ticks > 0
    assert adaptive.stall_ticks == 0
    assert adaptive.to_record()["stall_ticks"] == 0


def run_recording_actions(env, pol, cfg: LoopConfig) -> list[np.ndarray]:
    """Run one episode and return the actions the env executed, in tick order."""
    executed: list[np.ndarray] = []
    orig_step = env.step

    def spy(a):
        executed.append(np.array(a))
        return orig_step(a)

    env.step = spy
    try:
        run_episode(env, pol, spec0(env), cfg)
    finally:
        env.step = orig_step
    return executed


def test_async_executes_at_most_the_trained_horizon_of_each_chunk(env):
    # chunk 16, n_exec 4, latency 3 ticks: each chunk is aligned to its observation (3 actions dropped) and gives
    # at most max(4, 3 + 1) = 4 actions, never its far tail (indices >= 3 + 4).
    pol = ChunkPolicy(chunk=16, n_exec=4)
    executed = run_recording_actions(env, pol, LoopConfig(clock="sim", mode="async", latency_ms=180.0, max_steps=40,
                                                          future_state=False))
    idx = [round(a[1] / 0.01) for a in executed if np.any(a[:6] != 0)]
    assert idx and max(idx) < 3 + 4
    assert min(idx[4:]) >= 3  # after the first chunk, actions due during inference were dropped


def test_event_reaction_metric_by_hand():
    from vla_runtime.runtime.loop import EpisodeResult

    spec = EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=0)
    r = EpisodeResult(spec=spec, success=False, steps=16, ticks=[], inference_ms=[], chunk_infos=[],
                      wall_s=1.0, chunk_starts=[(0, 0), (8, 8)], period_ms=50.0)
    # t=0 -> obs 0 acts at tick 0 (1 tick); t=1..8 -> obs 8 acts at tick 8 (8..1 ticks); t>8 has no later chunk
    assert r.event_reaction_ms == pytest.approx(50.0 * (1 + sum(range(1, 9))) / 9)
    # an observation's chunk that starts executing after a later observation's chunk: the earlier action counts
    r.chunk_starts = [(0, 5), (2, 3)]
    r.steps = 3
    assert r.event_reaction_ms == pytest.approx(50.0 * ((3 - 0 + 1) + (3 - 1 + 1) + (3 - 2 + 1)) / 3)


def test_async_back_to_back_reacts_faster_than_sync(env):
    pol = ChunkPolicy(chunk=16, n_exec=8)
    cfg = dict(clock="sim", latency_ms=40.0, max_steps=64)
    sync = run_episode(env, pol, spec0(env), LoopConfig(**cfg))
    b2b = run_episode(env, pol, spec0(env), LoopConfig(mode="async", async_trigger=16, **cfg))
    s, a = sync.event_reaction_ms, b2b.event_reaction_ms
    assert a is not None and s is not None
    assert s / a > 3.0  # sync waits for the 8-action chunk to finish; back-to-back replans every tick
    assert b2b.stall_ticks == 0


class CommitRecordingPolicy(ChunkPolicy):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.committed: list[tuple[int, np.ndarray | None]] = []

    def act(self, obs: Observation) -> ActionChunk:
        self.committed.append((int(obs.step), obs.committed_actions))
        return super().act(obs)


def test_async_hands_the_policy_the_actions_that_execute_while_it_infers(env):
    pol = CommitRecordingPolicy(chunk=16, n_exec=8)
    executed = dict(enumerate(run_recording_actions(
        env, pol, LoopConfig(clock="sim", mode="async", latency_ms=180.0, max_steps=40, future_state=False))))
    with_commit = [(s, c) for s, c in pol.committed if c is not None]
    assert with_commit, "no inference got the committed actions"
    for s, c in with_commit:
        assert len(c) == 3  # latency 180 ms = 3 ticks
        for i, a in enumerate(c):
            if s + i in executed:
                np.testing.assert_allclose(executed[s + i], a, atol=1e-6)  # exactly what then ran
    pol2 = CommitRecordingPolicy(chunk=16, n_exec=8)
    run_episode(env, pol2, spec0(env), LoopConfig(clock="sim", mode="async", latency_ms=180.0, max_steps=40,
                                                  future_state=False, pass_committed=False))
    assert all(c is None for _, c in pol2.committed)


def test_latest_keeps_actions_before_a_future_aligned_chunk():
    q = ActionQueue("latest")
    q.put(np.ones((8, 7)), first_tick=0, now_tick=0)
    q.put(np.full((4, 7), 2.0), first_tick=5, now_tick=3)  # lands at tick 3, meant for ticks 5..8
    assert q.depth(3) == 6  # ticks 3, 4 from the old chunk, then 5..8 from the new one
    assert q.pop(3)[0] == 1.0 and q.pop(4)[0] == 1.0 and q.pop(5)[0] == 2.0
    assert q.depth(9) == 0  # the old chunk's tail beyond the new chunk is gone


def test_future_state_does_not_stall_when_inference_is_faster_than_expected(env):
    class Jittery(ChunkPolicy):
        """Alternates slow and fast inferences, so the expected latency overestimates the fast ones."""

    pol = Jittery(chunk=16, n_exec=8)
    lat = iter([180.0, 10.0] * 50)
    from vla_runtime.runtime import loop as loop_mod

    orig = loop_mod._Inference.start

    def start(self, obs, tick, lead):
        orig(self, obs, tick, lead)
        self._ready_tick = tick + max(0, int(np.ceil(next(lat) / 50.0)) - 1)

    loop_mod._Inference.start = start
    try:
        r = run_episode(env, pol, spec0(env), LoopConfig(clock="sim", mode="async", max_steps=60, future_state=True))
    finally:
        loop_mod._Inference.start = orig
    assert r.stall_ticks == 0


def test_episode_key_drops_only_the_env() -> None:
    from vla_runtime.envs.base import EpisodeSpec, episode_key

    a = EpisodeSpec("libero:libero_object", "pick up the soup", 3, 5, init_state=7)
    b = EpisodeSpec("remote:tcp://127.0.0.1:5555", "pick up the soup", 3, 5, init_state=7)
    c = EpisodeSpec("remote:tcp://127.0.0.1:5555", "pick up the soup", 3, 5, init_state=8)
    assert a.key() != b.key() and a.episode_key() == b.episode_key() != c.episode_key()
    assert episode_key(a.key()) == a.episode_key() and "libero" not in a.episode_key()


@pytest.mark.parametrize("clock", ["unpaced", "wall"])
def test_inference_cpu_time_separates_work_from_waiting(env, clock):
    """Each inference records its CPU time next to its wall time (inline: the process; worker thread: that
    thread): a policy that waits 30 ms costs ~no CPU, one that computes costs CPU, and the records carry both."""
    import time as _time

    class Waits(ChunkPolicy):
        def act(self, obs):
            _time.sleep(0.03)
            return super().act(obs)

    class Works(ChunkPolicy):
        def act(self, obs):
            x = np.random.default_rng(0).standard_normal((200, 200))
            for _ in range(40):
                x = np.tanh(x @ x.T / 200.0)
            return super().act(obs)

    cfg = LoopConfig(clock=clock, max_steps=8)
    waits = run_episode(env, Waits(chunk=4, n_exec=4), spec0(env), cfg)
    works = run_episode(env, Works(chunk=4, n_exec=4), spec0(env), cfg)
    assert len(waits.inference_cpu_ms) == len(waits.inference_ms) == 2
    assert all(w >= 30.0 for w in waits.inference_ms)
    assert all(c < 0.5 * w for c, w in zip(waits.inference_cpu_ms, waits.inference_ms))  # sleeping is not CPU
    assert all(c > 0.0 for c in works.inference_cpu_ms)
    assert works.to_record()["inference_cpu_ms"] == [round(c, 3) for c in works.inference_cpu_ms]


def test_bench_rows_carry_cpu_ratio(tmp_path):
    """compare_methods reports cpu_ms_p50 and cpu_ratio_to_baseline beside the wall-time ratio."""
    from vla_runtime.runtime.bench import Method, compare_methods

    rep = compare_methods("t", "dummy:reach", [Method("a", "scripted"), Method("b", "scripted")], 1, 0, tmp_path,
                          baseline="a", progress=False)
    rows = {r["name"]: r for r in rep["methods"]}
    assert rows["a"]["cpu_ms_p50"] is not None and rows["a"]["cpu_ratio_to_baseline"] == 1.0
    assert "cpu_ratio_to_baseline" in rows["b"]
