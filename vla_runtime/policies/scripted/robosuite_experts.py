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

    def pick_yaw(self, obs: Observation) -> float | None:
        """Gripper yaw for the grasp: the object's yaw under its symmetry, closest to the current yaw."""
        oy = self.obj_yaw(obs)
        return None if oy is None else self.choose_yaw(obs.privileged["eef_quat"], oy, self.SYMMETRY)

    def after_lift(self, obs: Observation) -> np.ndarray:
        return self.action(obs, self.lift_target, CLOSE, self.target_yaw)

    def __call__(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        self.t_phase += 1
        if self.phase == "approach":
            g = self.grasp_point(obs)
            if self.target_yaw is None:
                self.target_yaw = self.pick_yaw(obs)
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


class PlaceExpert(PickExpert):
    """Pick, then carry the object above its resting pose, lower it, release and retreat.

    Subclasses give `rest_pos(obs)`: where the object's centre is when placed. The eef target is that pose
    plus the eef-to-object offset measured at the grasp, so a grasp off the object's centre still places it
    where it should go.
    """

    CLEARANCE = 0.04  # carry height above the resting pose
    RELEASE_DZ = 0.004  # release when the object is this far above its resting pose
    RELEASE_STEPS = 6
    RETREAT_DZ = 0.08
    RELEASE_TOL = 0.002
    XY_TOL = 0.006  # carry ends when the eef is this close (m) above the place target

    def rest_pos(self, obs: Observation) -> np.ndarray:
        raise NotImplementedError

    def _place_target(self, obs: Observation, dz: float) -> np.ndarray:
        return self.rest_pos(obs) + np.array([0.0, 0.0, dz]) + self.grasp_offset

    def after_lift(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        if self.phase in ("carry", "lower") and not self.gripper_closed_on_object(obs):
            self._goto("approach")  # dropped it on the way: open, go back and pick it up again
            self.target_yaw = None
            return self.action(obs, p["eef_pos"] + np.array([0.0, 0.0, 0.05]), OPEN)
        if self.phase == "carry":
            tgt = self._place_target(obs, self.CLEARANCE)
            if self.t_phase == 1:
                self.risen = False
            if not self.risen and p["eef_pos"][2] < tgt[2] - 0.03:  # rise first: do not drag the object
                tgt = np.array([p["eef_pos"][0], p["eef_pos"][1], tgt[2]])
            else:
                self.risen = True
            if self.risen and (np.linalg.norm(tgt[:2] - p["eef_pos"][:2]) < self.XY_TOL or self.t_phase > 120):
                self._goto("lower")
            return self.action(obs, tgt, CLOSE, self.target_yaw)
        if self.phase == "lower":
            tgt = self._place_target(obs, self.RELEASE_DZ)
            obj_dz = p[f"{self.obj_key}_pos"][2] - self.rest_pos(obs)[2]
            if obj_dz < self.RELEASE_DZ + self.RELEASE_TOL or self.t_phase > 50:
                self._goto("release")
            return self.action(obs, tgt, CLOSE, self.target_yaw, max_speed=0.4)
        if self.phase == "release":
            if self.t_phase >= self.RELEASE_STEPS:
                self.retreat_target = p["eef_pos"] + np.array([0.0, 0.0, self.RETREAT_DZ])
                self._goto("retreat")
            return self.action(obs, p["eef_pos"], OPEN, self.target_yaw, max_speed=0.0)
        return self.action(obs, self.retreat_target, OPEN, self.target_yaw, max_speed=0.5)


class StackExpert(PlaceExpert):
    """Pick cubeA (red), carry it above cubeB (green), lower until it rests on top, release, retreat."""

    obj_key = "cubeA"
    NEAR = 0.15  # cubeB closer than this (m) constrains which faces the fingers take

    def pick_yaw(self, obs: Observation) -> float | None:
        """Of the two finger axes that fit cubeA's faces, take the one most perpendicular to cubeB.

        Fingers close along the eef's local y, i.e. along world (sin yaw, -cos yaw) with the gripper down;
        with cubeB next to cubeA a finger along the line between them lands on cubeB.
        """
        p = obs.privileged
        oy = self.obj_yaw(obs)
        assert oy is not None
        cands = [self.choose_yaw(p["eef_quat"], oy + k * np.pi / 2, np.pi) for k in (0, 1)]
        d = (p["cubeB_pos"] - p["cubeA_pos"])[:2]
        if np.linalg.norm(d) > self.NEAR:
            return min(cands, key=lambda y: self.yaw_error(obs, y))
        d = d / np.linalg.norm(d)
        return min(cands, key=lambda y: abs(np.sin(y) * d[0] - np.cos(y) * d[1]))

    def rest_pos(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        return p["cubeB_pos"] + np.array([0.0, 0.0, p["cubeB_half_size"][2] + p["cubeA_half_size"][2]])


class CanExpert(PlaceExpert):
    """Pick the can (a vertical cylinder: any yaw fits) near its top, carry it over the bin wall, drop it in.

    The grasp point is 2.5 cm below the can's top: the palm sits ~3 cm above the grasp point, so a deeper
    grasp pushes the can down instead of closing around it.
    """

    obj_key = "can"
    CAN_HALF_HEIGHT = 0.04
    GRASP_BELOW_TOP = 0.025
    CLEARANCE = 0.10  # carry the can's centre this far above its resting pose: clears the bin walls
    RELEASE_DZ = 0.03  # a short drop is harmless and keeps the arm inside its reach
    RELEASE_TOL = 0.008  # the arm sags near its reach limit: do not wait for the last millimetres
    XY_TOL = 0.012
    PLACE_MARGIN = 0.05  # can centre to the target quadrant's inner edges

    def grasp_point(self, obs: Observation) -> np.ndarray:
        return obs.privileged["can_pos"] + np.array([0.0, 0.0, self.CAN_HALF_HEIGHT - self.GRASP_BELOW_TOP])

    def obj_yaw(self, obs: Observation) -> float | None:
        return None

    def pick_yaw(self, obs: Observation) -> float | None:
        return self._gripper_yaw(obs.privileged["eef_quat"])  # hold the start yaw

    def rest_pos(self, obs: Observation) -> np.ndarray:
        """Inside the target quadrant, at its corner nearest the robot base (the quadrant centre is at the
        edge of the Panda's reach with the gripper down); 0.02 m is the bin floor's thickness."""
        p = obs.privileged
        quarter = p["bin_size"][:2] / 4.0  # half-extents of one quadrant
        xy = p["target_pos"][:2] - (quarter - self.PLACE_MARGIN)
        return np.array([xy[0], xy[1], p["table_z"] + 0.02 + self.CAN_HALF_HEIGHT])


def make_robosuite_expert(task: str, noise: float = 0.0, seed: int | None = None) -> Callable[[Observation],
                                                                                                np.ndarray]:
    """A fresh stateful expert for `task`; `noise` adds N(0, noise) to the 6 arm action dims (demo diversity)."""
    if task == "Lift":
        return LiftExpert(noise, seed)
    if task == "Stack":
        return StackExpert(noise, seed)
    if task == "PickPlaceCan":
        return CanExpert(noise, seed)
    raise UserError(f"no robosuite expert for task {task!r}; valid: Lift, Stack, PickPlaceCan")
