"""Demo files: round trip, atomic writes, resume bookkeeping, clear errors for unreadable files."""

from __future__ import annotations

import numpy as np
import pytest

from vla_runtime.errors import UserError
from vla_runtime.train.demos import Demo, list_demos, read_demo, recorded_seeds, write_demo


def _demo(task="libero_object/3", seed=100007, T=5):
    rng = np.random.default_rng(0)
    return Demo(env="libero:libero_object", task=task, instruction="pick up the soup", seed=seed,
                actions=rng.normal(size=(T, 7)).astype(np.float32), states=rng.normal(size=(T, 8)).astype(np.float32),
                images={"agentview": rng.integers(0, 255, (T, 16, 16, 3), dtype=np.uint8),
                        "wrist": rng.integers(0, 255, (T, 16, 16, 3), dtype=np.uint8)})


def test_round_trip(tmp_path):
    d = _demo()
    p = write_demo(tmp_path, d)
    assert p.name == "libero_object-3__seed100007.hdf5"
    assert not list(tmp_path.glob("*.tmp"))
    r = read_demo(p)
    assert r.task == d.task and r.seed == d.seed and r.instruction == d.instruction and len(r) == 5
    np.testing.assert_array_equal(r.actions, d.actions)
    np.testing.assert_array_equal(r.images["wrist"], d.images["wrist"])
    only = read_demo(p, cameras=["agentview"])
    assert list(only.images) == ["agentview"]
    assert recorded_seeds(tmp_path) == {("libero_object/3", 100007)}


def test_mismatched_lengths_rejected(tmp_path):
    d = _demo()
    d.states = d.states[:3]
    with pytest.raises(ValueError):
        write_demo(tmp_path, d)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unreadable_and_missing(tmp_path):
    bad = tmp_path / "junk__seed1.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(UserError, match="cannot read demo file"):
        read_demo(bad)
    with pytest.raises(UserError, match="does not exist"):
        list_demos(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no demo files"):
        list_demos(empty)
    p = write_demo(tmp_path / "ok", _demo())
    with pytest.raises(UserError, match="cameras"):
        read_demo(p, cameras=["left"])


def test_video_written_with_outcome_in_name(tmp_path):
    from vla_runtime.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--video", "1", "--out", str(out)]) == 0
    vids = sorted((out / "videos").glob("*.mp4"))
    assert [v.name for v in vids] == ["reach__seed0__success.mp4"]
    import imageio.v2 as imageio

    frames = imageio.mimread(vids[0])
    assert len(frames) > 1 and frames[0].shape[2] == 3


def test_collect_dummy_resumable(tmp_path):
    from vla_runtime.train.collect import CollectConfig, collect

    cfg = CollectConfig(env="dummy:reach", episodes=3, out=tmp_path, seed=100, image_size=16)
    res = collect(cfg, progress=False)
    assert res["demos"] == {"reach": 3}
    files = list_demos(tmp_path)
    assert len(files) >= 3
    d = read_demo(files[0])
    assert d.actions.shape[1] == 7 and d.images["agentview"].shape[1:] == (16, 16, 3)
    # resume: nothing more to do, no file rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    res2 = collect(CollectConfig(env="dummy:reach", episodes=3, out=tmp_path, seed=100, image_size=16), progress=False)
    assert res2["demos"] == {"reach": 3}
    assert {p: p.stat().st_mtime_ns for p in list_demos(tmp_path)} == mtimes


# ------------------------------------------------------------------ takeover (HG-DAgger-style) recovery demos
class _PushPolicy:
    """Drives +x at full speed: takes the dummy end-effector away from where the expert would go."""

    def __init__(self, chunk=4, n_exec=2):
        from vla_runtime.runtime.types import PolicySpec

        self.spec = PolicySpec(chunk_size=chunk, n_action_steps=n_exec)
        self.calls = 0
        self.resets = []

    def reset(self, instruction):
        self.resets.append(instruction)

    def act(self, obs):
        from vla_runtime.runtime.types import ActionChunk

        self.calls += 1
        a = np.zeros((self.spec.chunk_size, 7), np.float32)
        a[:, 0] = 1.0
        return ActionChunk(actions=a, stamp=obs.stamp)


def test_takeover_records_only_the_expert_part_from_the_policys_state():
    from vla_runtime.envs.base import EpisodeSpec
    from vla_runtime.envs.dummy import STEP_M, DummyReachEnv
    from vla_runtime.train.collect import rollout_takeover

    env = DummyReachEnv()
    spec = EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=3, init_state=None)
    start = env.reset(spec).privileged["eef_pos"].copy()
    pol = _PushPolicy(chunk=4, n_exec=2)
    demo, steps, info = rollout_takeover(env, spec, pol, switch=5)
    assert pol.resets == ["reach the red target"] and pol.calls == 3  # ceil(5 / 2): n_action_steps per chunk
    assert demo is not None and info["switch"] == 5 and info["expert_steps"] == len(demo) == steps - 5
    # the recorded first state is where the policy left the robot, not the reset state
    np.testing.assert_allclose(demo.states[0, :3], start + np.array([5 * STEP_M, 0, 0]), atol=1e-6)
    # and the expert's first label is its answer to that state
    moved = start + np.array([5 * STEP_M, 0, 0])
    np.testing.assert_allclose(demo.actions[0, :3], np.clip((env._target - moved) / STEP_M, -1, 1), atol=1e-5)


def test_takeover_keeps_no_demo_when_the_policy_succeeds_first():
    from vla_runtime.envs.base import EpisodeSpec
    from vla_runtime.envs.dummy import DummyReachEnv
    from vla_runtime.policies.scripted import ScriptedPolicy
    from vla_runtime.train.collect import rollout_takeover

    env = DummyReachEnv()
    spec = EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=3, init_state=None)
    demo, steps, info = rollout_takeover(env, spec, ScriptedPolicy("dummy:reach"), switch=59)
    assert demo is None and info["policy_success"] and steps < 59


def test_takeover_switch_step_is_deterministic_and_in_range():
    from vla_runtime.train.collect import CollectConfig, takeover_switch_step

    steps = [takeover_switch_step(s, (10, 20)) for s in range(200)]
    assert steps == [takeover_switch_step(s, (10, 20)) for s in range(200)]
    assert min(steps) == 10 and max(steps) == 20
    with pytest.raises(UserError):
        CollectConfig(env="dummy:reach", episodes=1, out="x", takeover_after=(5, 2))


def test_takeover_after_flag_parse_errors():
    from vla_runtime.cli import _int_pair

    assert _int_pair("10,120", "--takeover-after") == (10, 120)
    for bad in ("10", "a,b", "1,2,3"):
        with pytest.raises(UserError, match="--takeover-after"):
            _int_pair(bad, "--takeover-after")


def test_schedule_puts_every_tasks_needed_seeds_before_the_spare_ones():
    """One worker runs jobs in order and is stopped when every task is complete: the spare seeds (for expected
    failures) must come last, or it records spares of early tasks while later ones still need demos."""
    from vla_runtime.train.collect import CollectConfig, _schedule

    cfg = CollectConfig(env="dummy:reach", episodes=3, out="x", seed=100)
    jobs, have = _schedule(cfg, ["a", "b", "c"], {("b", 10_100): True, ("b", 10_101): False})
    assert have == {"a": 0, "b": 1, "c": 0}
    first = jobs[:8]  # a needs 3, b 2, c 3
    assert [t for t, _ in first] == ["a"] * 3 + ["b"] * 2 + ["c"] * 3
    assert first[:3] == [("a", 100), ("a", 101), ("a", 102)] and first[3:5] == [("b", 10_102), ("b", 10_103)]
    spare = jobs[8:]
    assert spare and {t for t, _ in spare} == {"a", "b", "c"} and not set(spare) & set(first)
    assert len(jobs) == len(set(jobs))
    done, _ = _schedule(cfg, ["a"], {("a", 100 + i): True for i in range(3)})
    assert done == []


def test_collect_schedules_more_rounds_until_the_attempt_budget(tmp_path):
    """When more seeds fail than the first round's margin covers, collect keeps scheduling until the budget is
    spent. Here the driving policy (the expert itself) always succeeds before the switch, so no seed gives a demo."""
    from vla_runtime.train.collect import CollectConfig, collect

    cfg = CollectConfig(env="dummy:reach", episodes=2, out=tmp_path, seed=100, image_size=16, takeover="scripted",
                        takeover_after=(59, 59), max_attempts_factor=3.0)
    res = collect(cfg, progress=False)
    assert res["attempts"] == 6 and res["successes"] == 0 and res["short"] == {"reach": 0}  # first round: 4
    assert len((tmp_path / "attempts.jsonl").read_text().splitlines()) == 6
    assert collect(cfg, progress=False)["attempts"] == 0  # resumed: the budget stays spent
