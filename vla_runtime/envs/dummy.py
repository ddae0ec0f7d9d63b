"""A tiny deterministic env with no simulator: a point end-effector reaching a target on a plane.

Used by the tests and the runtime/bridge benchmarks where a physics engine would only add noise. It has the
same action space as the robosuite/LIBERO adapters (7-d OSC delta in [-1, 1], gripper last) and renders
two small synthetic cameras, so every policy type can run against it.
"""

from __future__ import annotations

import time

import numpy as np

from vla_runtime.envs.base import Env, EnvSpec, EpisodeSpec, StepResult, TaskInfo
from vla_runtime.runtime.types import Observation

MAX_STEPS = 60
STEP_M = 0.05  # metres per unit action, as OSC_POSE delta


class DummyReachEnv(Env):
    def __init__(self, cameras: tuple[str, ...] | None = None, image_size: int = 32, **_: object) -> None:
        cams = tuple(cameras) if cameras else ("agentview", "wrist")
        self.spec = EnvSpec(name="dummy:reach", action_dim=7, action_low=(-1.0,) * 7, action_high=(1.0,) * 7,
                            cameras=cams, image_size=image_size, state_dim=8, control_hz=20.0)
        self._pos = np.zeros(3)
        self._target = np.zeros(3)
        self._grip = 0.0
        self._t = 0
        self._instruction = "reach the red target"

    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo("reach", self._instruction, MAX_STEPS)]

    def reset(self, episode: EpisodeSpec) -> Observation:
        rng = np.random.default_rng(episode.seed)
        self._pos = rng.uniform(-0.2, 0.2, 3)
        self._target = rng.uniform(-0.2, 0.2, 3)
        self._grip = 0.0
        self._t = 0
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        a = np.clip(np.asarray(action, dtype=np.float64), -1, 1)
        self._pos = self._pos + a[:3] * STEP_M
        self._grip = float(np.clip(self._grip + 0.25 * np.sign(a[6]), -1, 1))
        self._t += 1
        success = bool(np.linalg.norm(self._pos - self._target) < 0.02)
        return StepResult(self._obs(), float(success), success, success or self._t >= MAX_STEPS)

    def _obs(self) -> Observation:
        s = self.spec.image_size
        images = {}
        for k, cam in enumerate(self.spec.cameras):
            img = np.zeros((s, s, 3), np.uint8)
            for p, ch in ((self._pos, 1), (self._target, 0)):
                u = int(np.clip((p[0 + k % 2] + 0.3) / 0.6 * (s - 1), 0, s - 1))
                v = int(np.clip((p[2 - k % 2] + 0.3) / 0.6 * (s - 1), 0, s - 1))
                img[max(0, v - 1):v + 2, max(0, u - 1):u + 2, ch] = 255
            images[cam] = img
        state = np.concatenate([self._pos, np.zeros(3), [self._grip, -self._grip]]).astype(np.float32)
        return Observation(images=images, state=state, instruction=self._instruction, stamp=time.monotonic(),
                           step=self._t, privileged={"task": "reach", "target_pos": self._target.copy(),
                                                     "eef_pos": self._pos.copy()})
