"""robosuite 1.4 adapter: Lift, Stack, PickPlaceCan with a Panda arm and the OSC_POSE delta controller.

One robosuite env object per adapter, reused across episodes with `hard_reset=False` (a hard reset rebuilds
the MuJoCo model and the GL context: ~80x slower). Each episode is fully determined by its seed: robosuite's
object placement (`UniformRandomSampler`) and the robot's initial joint noise both draw from numpy's global
RNG, which `reset()` seeds right before `env.reset()`.

Action: float32 (7,) in [-1, 1]: OSC_POSE delta (0.05 m and 0.5 rad per unit, world frame), gripper last
(-1 open, +1 close). State: float32 (8,): eef pos (3), eef axis-angle (3), gripper finger qpos (2).
Images: uint8 (S, S, 3), upright (robosuite renders with OpenGL's bottom-up rows; we flip).
Privileged (numpy arrays, quaternions xyzw as robosuite gives them): `task`, `eef_pos`, `eef_quat`,
`gripper_qpos`, `table_z`, and per task the object poses and goal (see `_privileged`).
"""

from __future__ import annotations

import atexit
import time
import weakref
from typing import Any

import numpy as np

from vla_runtime.envs.base import (Env, EnvSpec, EpisodeSpec, StepResult, TaskInfo, check_action,
                                   check_sim_options, clear_gripper_commands)
from vla_runtime.envs.render import apply_fast_render_sim, check_gl, import_robosuite
from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation

# Episode limits: 2.4-4x the scripted expert's longest successful episode over seeds 1000-1049 (Lift 50,
# Stack 110, PickPlaceCan 165 steps; docs/EXPERTS_ROBOSUITE.md), so a learned policy that hesitates or
# regrasps once still has time, while a stuck one does not burn minutes of rendering per episode.
TASKS: dict[str, TaskInfo] = {
    "Lift": TaskInfo("Lift", "lift the red cube", 200),
    "Stack": TaskInfo("Stack", "stack the red cube on the green cube", 300),
    "PickPlaceCan": TaskInfo("PickPlaceCan", "pick up the can and place it in the bin", 400),
}

# our camera name -> robosuite camera name
CAMERA_ALIASES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand", "frontview": "frontview",
                  "birdview": "birdview", "sideview": "sideview"}
DEFAULT_CAMERAS = ("agentview", "wrist")
CONTROL_HZ = 20.0

# Envs still open at interpreter exit are closed by `_close_all`: otherwise robosuite's EGL contexts are
# freed by `__del__` after robosuite's own atexit hook terminated the EGL display, which prints EGLError
# tracebacks on every exit. atexit runs hooks last-registered-first, so ours is registered after robosuite
# registered its hook, i.e. after the first render context exists.
_LIVE: "weakref.WeakSet[RobosuiteEnv]" = weakref.WeakSet()
_atexit_registered = False


def _close_all() -> None:
    for env in list(_LIVE):
        env.close()


def quat_xyzw_to_axisangle(q: np.ndarray) -> np.ndarray:
    """(4,) xyzw unit quaternion -> (3,) axis * angle, angle in [0, pi] (same as robosuite's quat2axisangle)."""
    q = np.asarray(q, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    if w < 0:  # the same rotation with angle <= pi
        q, w = -q, -w
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3)
    return q[:3] / s * (2.0 * np.arccos(w))


class RobosuiteEnv(Env):
    """Adapter for one robosuite task (`robosuite:Lift`, `robosuite:Stack`, `robosuite:PickPlaceCan`)."""

    def __init__(self, task: str, *, cameras: tuple[str, ...] | None = None, image_size: int = 128,
                 render: bool = True, fast_render: bool = True, max_steps: int | None = None,
                 **kwargs: Any) -> None:
        if task not in TASKS:
            raise UserError(f"unknown robosuite task {task!r}; valid: {', '.join(TASKS)}")
        if kwargs:
            raise UserError(f"robosuite:{task}: unknown options {sorted(kwargs)}")
        cams = check_sim_options(f"robosuite:{task}", cameras, CAMERA_ALIASES, DEFAULT_CAMERAS, render,
                                 image_size, max_steps)
        info = TASKS[task]
        if max_steps is not None:
            info = TaskInfo(info.task, info.instruction, int(max_steps))
        self.task = task
        self._info = info
        self.render = bool(render and cams)
        self.fast_render = fast_render
        self.spec = EnvSpec(name=f"robosuite:{task}", action_dim=7, action_low=(-1.0,) * 7,
                            action_high=(1.0,) * 7, cameras=cams, image_size=image_size, state_dim=8,
                            control_hz=CONTROL_HZ)
        self._rs_cams = [CAMERA_ALIASES[c] for c in cams]
        self._env: Any = None  # robosuite env, built on first reset
        self._flip = True
        self._t = 0
        self._last_obs: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------------- building
    def _build(self) -> Any:
        if self.render:
            check_gl()
        global _atexit_registered
        robosuite = import_robosuite()
        import robosuite.macros as macros

        from robosuite import load_controller_config

        self._flip = macros.IMAGE_CONVENTION == "opengl"
        s = self.spec.image_size
        # model-time randomness (Lift's cube size is drawn in [0.020, 0.022] m when the model is built) comes
        # from the global RNG too: build under a fixed seed so every instance, in any process, is the same
        rng_state = np.random.get_state()
        np.random.seed(0)
        env = robosuite.make(
            self.task, robots="Panda", controller_configs=load_controller_config(default_controller="OSC_POSE"),
            has_renderer=False, has_offscreen_renderer=self.render, use_camera_obs=self.render,
            camera_names=self._rs_cams or "agentview", camera_heights=s, camera_widths=s,
            control_freq=int(CONTROL_HZ), horizon=self._info.max_steps, ignore_done=True,
            reward_shaping=False, hard_reset=False, render_camera=None)
        np.random.set_state(rng_state)
        if self.render and self.fast_render:
            apply_fast_render_sim(env.sim)
        _LIVE.add(self)
        if self.render and not _atexit_registered:  # after robosuite registered eglTerminate (1st context)
            atexit.register(_close_all)
            _atexit_registered = True
        return env

    # -------------------------------------------------------------------------------------------- Env API
    def tasks(self) -> list[TaskInfo]:
        return [self._info]

    def reset(self, episode: EpisodeSpec) -> Observation:
        if episode.task != self.task:
            raise UserError(f"robosuite:{self.task} cannot run an episode of task {episode.task!r}")
        if self._env is None:
            self._env = self._build()
        # placement sampler and robot init noise use numpy's global RNG: seeding it fixes the episode
        np.random.seed(int(episode.seed) % (2**32))
        # robosuite 1.4 keeps the gripper's integrated command (`current_action`) across soft resets, so an
        # episode would depend on how the previous one ended: zero it (a fresh model starts at zero too)
        clear_gripper_commands(self._env.robots)
        self._activate_gl()
        self._last_obs = self._env.reset()
        self._t = 0
        return self._observation(self._last_obs)

    def step(self, action: np.ndarray) -> StepResult:
        if self._env is None:
            raise UserError(f"{self.spec.name}: step() before reset()")
        a = check_action(action, self.spec)
        self._activate_gl()
        raw, reward, _, _ = self._env.step(a.astype(np.float64))
        self._last_obs = raw
        self._t += 1
        success = bool(self._env._check_success())
        done = success or self._t >= self._info.max_steps
        return StepResult(self._observation(raw), float(reward), success, done, info={})

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # -------------------------------------------------------------------------------------------- helpers
    def _activate_gl(self) -> None:
        """Make this env's GL context current before robosuite renders.

        robosuite makes its context current only when creating it, and freeing any context calls
        `eglReleaseThread()`, which unbinds whatever context is current. So with two render envs in one
        process, or after another env was closed/garbage-collected, robosuite would render into the wrong
        or no context: garbage images (seen here: noise frames after a second env was built).
        """
        if self.render:
            ctx = getattr(self._env.sim, "_render_context_offscreen", None)
            if ctx is not None:
                ctx.gl_ctx.make_current()

    @property
    def sim(self) -> Any:
        """The underlying robosuite MjSim (for tests and debugging; policies must not use it)."""
        return None if self._env is None else self._env.sim

    def _observation(self, raw: dict[str, Any]) -> Observation:
        images: dict[str, np.ndarray] = {}
        for ours, theirs in zip(self.spec.cameras, self._rs_cams):
            img = raw[f"{theirs}_image"]
            images[ours] = np.ascontiguousarray(img[::-1] if self._flip else img)  # (S, S, 3) uint8
        eef_quat = np.asarray(raw["robot0_eef_quat"], dtype=np.float64)
        state = np.concatenate([raw["robot0_eef_pos"], quat_xyzw_to_axisangle(eef_quat),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)  # (8,)
        return Observation(images=images, state=state, instruction=self._info.instruction,
                           stamp=time.monotonic(), step=self._t, privileged=self._privileged(raw))

    def _privileged(self, raw: dict[str, Any]) -> dict[str, Any]:
        env = self._env
        p: dict[str, Any] = {
            "task": self.task,
            "eef_pos": np.array(raw["robot0_eef_pos"], dtype=np.float64),
            "eef_quat": np.array(raw["robot0_eef_quat"], dtype=np.float64),  # xyzw
            "gripper_qpos": np.array(raw["robot0_gripper_qpos"], dtype=np.float64),
            "table_z": float(env.table_offset[2]) if hasattr(env, "table_offset") else float(env.bin1_pos[2]),
        }
        if self.task == "Lift":
            p["cube_pos"] = np.array(raw["cube_pos"], dtype=np.float64)
            p["cube_quat"] = np.array(raw["cube_quat"], dtype=np.float64)
            p["cube_half_size"] = np.array(env.cube.size, dtype=np.float64)
        elif self.task == "Stack":
            for k in ("cubeA", "cubeB"):
                p[f"{k}_pos"] = np.array(raw[f"{k}_pos"], dtype=np.float64)
                p[f"{k}_quat"] = np.array(raw[f"{k}_quat"], dtype=np.float64)
                p[f"{k}_half_size"] = np.array(getattr(env, k).size, dtype=np.float64)
        else:  # PickPlaceCan
            p["can_pos"] = np.array(raw["Can_pos"], dtype=np.float64)
            p["can_quat"] = np.array(raw["Can_quat"], dtype=np.float64)
            p["target_pos"] = np.array(env.target_bin_placements[env.object_to_id["can"]], dtype=np.float64)
            p["bin_size"] = np.array(env.bin_size, dtype=np.float64)
        return p
