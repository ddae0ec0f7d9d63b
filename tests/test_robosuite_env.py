"""robosuite adapter: determinism, image layout, state, action validation, experts (short runs)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("robosuite") is None:
    pytest.skip("robosuite not installed", allow_module_level=True)

from vla_runtime.envs import make_env  # noqa: E402
from vla_runtime.envs.base import EpisodeSpec  # noqa: E402
from vla_runtime.envs.robosuite_env import RobosuiteEnv, quat_xyzw_to_axisangle  # noqa: E402
from vla_runtime.errors import UserError  # noqa: E402
from vla_runtime.policies.scripted.robosuite_experts import make_robosuite_expert  # noqa: E402

SIZE = 64


def ep(task: str, seed: int) -> EpisodeSpec:
    return EpisodeSpec(env=f"robosuite:{task}", task=task, index=0, seed=seed)


@pytest.fixture(scope="module")
def lift_render() -> RobosuiteEnv:
    env = make_env("robosuite:Lift", render=True, image_size=SIZE)
    yield env
    env.close()


@pytest.fixture(scope="module")
def lift_fast() -> RobosuiteEnv:
    env = make_env("robosuite:Lift", render=False)
    yield env
    env.close()


def _rollout(env: RobosuiteEnv, seed: int, actions: np.ndarray) -> tuple[list[np.ndarray], list[dict]]:
    obs = env.reset(ep("Lift", seed))
    states, images = [obs.state], [obs.images]
    for a in actions:
        obs = env.step(a).obs
        states.append(obs.state)
        images.append(obs.images)
    return states, images


def test_same_episode_and_actions_give_identical_states_and_images(lift_render: RobosuiteEnv) -> None:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (8, 7)).astype(np.float32)
    s1, i1 = _rollout(lift_render, 11, actions)
    _rollout(lift_render, 12, actions[::-1])  # another episode in between: no state may leak across resets
    s2, i2 = _rollout(lift_render, 11, actions)
    for a, b in zip(s1, s2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(i1, i2):
        assert a.keys() == b.keys() == {"agentview", "wrist"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_seed_changes_the_initial_placement(lift_fast: RobosuiteEnv) -> None:
    p1 = lift_fast.reset(ep("Lift", 1)).privileged["cube_pos"]
    p2 = lift_fast.reset(ep("Lift", 2)).privileged["cube_pos"]
    p1b = lift_fast.reset(ep("Lift", 1)).privileged["cube_pos"]
    assert not np.allclose(p1[:2], p2[:2])
    np.testing.assert_array_equal(p1, p1b)


def test_images_shape_dtype_and_upright(lift_render: RobosuiteEnv) -> None:
    """Upright: when the expert lifts the cube, its red blob moves UP (smaller row) in the agentview image."""
    obs = lift_render.reset(ep("Lift", 5))
    for img in obs.images.values():
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8 and img.flags["C_CONTIGUOUS"]

    def red_row(img: np.ndarray) -> float:
        img = img.astype(int)
        mask = img[..., 0] - np.maximum(img[..., 1], img[..., 2]) > 60  # the red cube (186, 62, 73) at 64 px
        assert mask.sum() >= 3, "cube not visible"
        return float(np.nonzero(mask)[0].mean())

    row0 = red_row(obs.images["agentview"])
    expert = make_robosuite_expert("Lift")
    z0 = obs.privileged["cube_pos"][2]
    for _ in range(120):
        r = lift_render.step(expert(obs))
        obs = r.obs
        if obs.privileged["cube_pos"][2] > z0 + 0.05:
            break
    assert obs.privileged["cube_pos"][2] > z0 + 0.05
    assert red_row(obs.images["agentview"]) < row0 - 2
    # the wrist camera looks down past the gripper: the fingers (dark) fill its bottom rows, not its top
    wrist = obs.images["wrist"].astype(float)
    assert wrist[-SIZE // 8:].mean() < wrist[: SIZE // 8].mean()


def test_state_layout(lift_fast: RobosuiteEnv) -> None:
    obs = lift_fast.reset(ep("Lift", 3))
    assert obs.state.shape == (8,) and obs.state.dtype == np.float32
    p = obs.privileged
    np.testing.assert_allclose(obs.state[:3], p["eef_pos"], atol=1e-6)
    np.testing.assert_allclose(obs.state[3:6], quat_xyzw_to_axisangle(p["eef_quat"]), atol=1e-5)
    np.testing.assert_allclose(obs.state[6:], p["gripper_qpos"], atol=1e-6)
    assert obs.images == {} and obs.instruction == "lift the red cube"
    assert p["task"] == "Lift" and p["cube_pos"].shape == (3,) and p["cube_quat"].shape == (4,)


def test_axisangle_matches_known_rotations() -> None:
    s = np.sqrt(0.5)
    np.testing.assert_allclose(quat_xyzw_to_axisangle(np.array([0, 0, s, s])), [0, 0, np.pi / 2], atol=1e-9)
    np.testing.assert_allclose(quat_xyzw_to_axisangle(np.array([0, 0, -s, -s])), [0, 0, np.pi / 2], atol=1e-9)
    np.testing.assert_allclose(quat_xyzw_to_axisangle(np.array([0, 0, 0, 1.0])), [0, 0, 0])


def test_bad_actions_raise(lift_fast: RobosuiteEnv) -> None:
    lift_fast.reset(ep("Lift", 3))
    with pytest.raises(ValueError, match="shape"):
        lift_fast.step(np.zeros(6, np.float32))
    bad = np.zeros(7, np.float32)
    bad[2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        lift_fast.step(bad)


def test_bad_configuration_raises_user_error(lift_fast: RobosuiteEnv) -> None:
    with pytest.raises(UserError):
        lift_fast.reset(ep("Stack", 1))
    with pytest.raises(UserError, match="camera"):
        RobosuiteEnv("Lift", cameras=("nosuchcam",))
    with pytest.raises(UserError, match="unknown robosuite task"):
        RobosuiteEnv("Door")


def test_done_at_max_steps_without_success() -> None:
    env = RobosuiteEnv("Lift", render=False, max_steps=4)
    env.reset(ep("Lift", 1))
    results = [env.step(np.zeros(7, np.float32)) for _ in range(4)]
    assert [r.done for r in results] == [False, False, False, True]
    assert not any(r.success for r in results)
    env.close()


@pytest.mark.parametrize("seed", [1000, 1001])
def test_expert_solves_lift(lift_fast: RobosuiteEnv, seed: int) -> None:
    obs = lift_fast.reset(ep("Lift", seed))
    expert = make_robosuite_expert("Lift")
    for _ in range(lift_fast.task_info("Lift").max_steps):
        a = expert(obs)
        assert a.shape == (7,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
        r = lift_fast.step(a)
        obs = r.obs
        if r.done:
            break
    assert r.success and r.done


def test_expert_noise_changes_actions_but_is_seeded(lift_fast: RobosuiteEnv) -> None:
    obs = lift_fast.reset(ep("Lift", 1000))
    a0 = make_robosuite_expert("Lift")(obs)
    a1 = make_robosuite_expert("Lift", noise=0.1, seed=3)(obs)
    a2 = make_robosuite_expert("Lift", noise=0.1, seed=3)(obs)
    assert not np.allclose(a0, a1)
    np.testing.assert_array_equal(a1, a2)


def test_two_render_envs_in_one_process_render_the_same_frames(lift_render: RobosuiteEnv) -> None:
    """robosuite renders into whatever GL context is current; building or freeing another env changes it.

    Two envs stepping alternately, with a third built and closed in between, must still give identical frames.
    """
    other = make_env("robosuite:Lift", render=True, image_size=SIZE)
    try:
        oa = lift_render.reset(ep("Lift", 21))
        ob = other.reset(ep("Lift", 21))
        tmp = make_env("robosuite:Lift", render=True, image_size=SIZE)
        tmp.reset(ep("Lift", 5))
        tmp.close()
        del tmp
        import gc

        gc.collect()  # frees the closed env's GL context: robosuite's free() releases the current context
        a = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.1, -1.0], np.float32)
        for _ in range(3):
            oa = lift_render.step(a).obs
            ob = other.step(a).obs
        for k in ("agentview", "wrist"):
            np.testing.assert_array_equal(oa.images[k], ob.images[k])
            assert oa.images[k].std() > 10  # a real scene, not a blank or noise-free buffer
    finally:
        other.close()


def test_rendering_does_not_change_the_physics(lift_render: RobosuiteEnv, lift_fast: RobosuiteEnv) -> None:
    """Experts are validated with render=False; demos are recorded with cameras: same seed, same trajectory."""
    a = np.array([0.5, 0.2, -0.4, 0.0, 0.1, 0.0, 1.0], np.float32)
    o1, o2 = lift_render.reset(ep("Lift", 33)), lift_fast.reset(ep("Lift", 33))
    for _ in range(5):
        o1, o2 = lift_render.step(a).obs, lift_fast.step(a).obs
    np.testing.assert_array_equal(o1.state, o2.state)
    np.testing.assert_array_equal(o1.privileged["cube_pos"], o2.privileged["cube_pos"])
