"""Scripted experts for robosuite Lift, Stack and PickPlaceCan (Panda, OSC_POSE delta).

They act only from `obs.privileged` (object poses, goal) and `obs.state`, never the simulator, so they run
against any env that fills those keys. Each expert is a small phase machine:
approach above -> descend -> grasp -> lift -> (move -> lower -> release -> retreat).

Action conventions (robosuite OSC_POSE, delta): a[0:3] * 0.05 m is the position setpoint offset, a[3:6] *
0.5 rad the rotation offset (axis-angle, world frame), a[6] = -1 open, +1 close. Quaternions are xyzw.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation

POS_SCALE = 0.05  # m per unit action
ROT_SCALE = 0.5  # rad per unit action
OPEN, CLOSE = -1.0, 1.0


# --------------------------------------------------------------------------------------------- rotations
def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """xyzw -> (3, 3)."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mat_to_axisangle(r: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis * angle."""
    c = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    ang = float(np.arccos(c))
    if ang < 1e-6:
        return np.zeros(3)
    if np.pi - ang < 1e-4:  # near pi: axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        i = int(np.argmax(axis))
        for j in range(3):
            if j != i:
                axis[j] = np.copysign(axis[j], r[i, j] + r[j, i])
        return axis / np.linalg.norm(axis) * ang
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return v / (2.0 * np.sin(ang)) * ang


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_of(q: np.ndarray) -> float:
    """Rotation about world z of an object's frame (its x axis projected on the table)."""
    r = quat_to_mat(q)
    return float(np.arctan2(r[1, 0], r[0, 0]))


# Gripper pointing straight down (eef z axis = -world z), as the Panda starts in robosuite.
R_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def wrap(a: float, period: float) -> float:
    """Wrap to [-period/2, period/2)."""
    return (a + period / 2) % period - period / 2


class _Base:
    """Shared phase machine helpers: P-control to a pose with saturation, step counters, optional noise."""

    # distances in metres; gains in action units per metre (action 1 = 5 cm setpoint offset)
    POS_GAIN = 12.0
    ROT_GAIN = 2.5

    def __init__(self, noise: float = 0.0, seed: int | None = None) -> None:
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self.phase = "approach"
        self.t_phase = 0
        self.target_yaw: float | None = None

    def _goto(self, phase: str) -> None:
        self.phase = phase
        self.t_phase = 0

    def _gripper_yaw(self, eef_quat: np.ndarray) -> float:
        """Yaw of the gripper about world z, relative to R_DOWN."""
        r = quat_to_mat(eef_quat) @ R_DOWN.T
        return float(np.arctan2(r[1, 0], r[0, 0]))

    def choose_yaw(self, eef_quat: np.ndarray, obj_yaw: float, symmetry: float) -> float:
        """Target gripper yaw equivalent to `obj_yaw` under the object's symmetry, closest to the current one."""
        cur = self._gripper_yaw(eef_quat)
        return cur + wrap(obj_yaw - cur, symmetry)

    def action(self, obs: Observation, target: np.ndarray, grip: float, yaw: float | None = None,
               max_speed: float = 1.0) -> np.ndarray:
        p = obs.privileged
        a = np.zeros(7, dtype=np.float64)
        a[:3] = np.clip((target - p["eef_pos"]) * self.POS_GAIN, -max_speed, max_speed)
        r_cur = quat_to_mat(p["eef_quat"])
        r_tgt = rot_z(yaw if yaw is not None else self._gripper_yaw(p["eef_quat"])) @ R_DOWN
        err = mat_to_axisangle(r_tgt @ r_cur.T)  # world-frame rotation taking current to target
        a[3:6] = np.clip(err / ROT_SCALE * self.ROT_GAIN, -1.0, 1.0)
        a[6] = grip
        if self.noise > 0:
            a[:6] += self.rng.normal(0.0, self.noise, 6)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def yaw_error(self, obs: Observation, yaw: float | None) -> float:
        if yaw is None:
            return 0.0
        return abs(wrap(yaw - self._gripper_yaw(obs.privileged["eef_quat"]), 2 * np.pi))

    @staticmethod
    def gripper_closed_on_object(obs: Observation) -> bool:
        """Fingers stopped before closing fully: something is between them."""
        g = obs.privileged["gripper_qpos"]
        return float(g[0] - g[1]) > 0.01


class PickExpert(_Base):
    """Grasp an object from above and lift it; subclasses add what happens after the lift."""

    APPROACH_DZ = 0.10  # hover height above the grasp point
    GRASP_STEPS = 8
    LIFT_DZ = 0.12
    SYMMETRY = np.pi / 2  # cube: any of 4 faces

    obj_key = "cube"

    def grasp_point(self, obs: Observation) -> np.ndarray:
        return obs.privileged[f"{self.obj_key}_pos"].copy()

    def obj_yaw(self, obs: Observation) -> float | None:
        return yaw_of(obs.privileged[f"{self.obj_key}_quat"])

    def after_lift(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        return self.action(obs, self.lift_target, CLOSE, self.target_yaw)

    def __call__(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        self.t_phase += 1
        if self.phase == "approach":
            g = self.grasp_point(obs)
            if self.target_yaw is None:
                oy = self.obj_yaw(obs)
                self.target_yaw = None if oy is None else self.choose_yaw(p["eef_quat"], oy, self.SYMMETRY)
            hover = g + np.array([0.0, 0.0, self.APPROACH_DZ])
            if (np.linalg.norm(hover[:2] - p["eef_pos"][:2]) < 0.008 and abs(hover[2] - p["eef_pos"][2]) < 0.03
                    and self.yaw_error(obs, self.target_yaw) < 0.08) or self.t_phase > 80:
                self._goto("descend")
            return self.action(obs, hover, OPEN, self.target_yaw)
        if self.phase == "descend":
            g = self.grasp_point(obs)
            if abs(g[2] - p["eef_pos"][2]) < 0.006 or self.t_phase > 60:
                self._goto("grasp")
            return self.action(obs, g, OPEN, self.target_yaw, max_speed=0.6)
        if self.phase == "grasp":
            if self.t_phase >= self.GRASP_STEPS:
                self.lift_target = p["eef_pos"] + np.array([0.0, 0.0, self.LIFT_DZ])
                self.grasp_offset = p["eef_pos"] - p[f"{self.obj_key}_pos"]  # eef relative to object
                self._goto("lift")
            return self.action(obs, self.grasp_point(obs), CLOSE, self.target_yaw, max_speed=0.3)
        if self.phase == "lift":
            if not self.gripper_closed_on_object(obs) and self.t_phase > 3:
                self._goto("approach")  # missed: open and try again
                self.target_yaw = None
                return self.action(obs, p["eef_pos"] + np.array([0, 0, 0.05]), OPEN)
            if abs(self.lift_target[2] - p["eef_pos"][2]) < 0.02 or self.t_phase > 40:
                self._goto("carry")
            return self.action(obs, self.lift_target, CLOSE, self.target_yaw)
        return self.after_lift(obs)


class LiftExpert(PickExpert):
    obj_key = "cube"


def make_robosuite_expert(task: str, noise: float = 0.0, seed: int | None = None) -> Callable[[Observation],
                                                                                                np.ndarray]:
    """A fresh stateful expert for `task`; `noise` adds N(0, noise) to the 6 arm action dims (demo diversity)."""
    if task == "Lift":
        return LiftExpert(noise, seed)
    raise UserError(f"no robosuite expert for task {task!r}; valid: Lift, Stack, PickPlaceCan")
