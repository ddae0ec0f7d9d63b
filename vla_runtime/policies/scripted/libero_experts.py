"""Scripted experts for LIBERO-Object (pick X, place it in the basket) and LIBERO-Spatial (pick the black bowl,
place it on the plate), acting from the env's privileged poses only (`obs.privileged`, see `LiberoEnv`).

One state machine serves both suites; what differs is where to grasp and how to place:
- Object: a top grasp across the object's shorter horizontal side of its oriented collision box, at most
  `GRASP_DEPTH_M` below its top (the palm sits ~2.3 cm above the grasp point) and never so low that the
  fingertips (1.3 cm below the grasp point) touch the floor; carried above every other object and lowered
  into the basket centre before opening.
- Spatial: the bowl (10.7 cm) is wider than the open gripper (7.6 cm), so it is grasped by its rim, the
  fingers closing radially across the wall, on the side of the rim with the most free space around it
  (drawer/cabinet walls, neighbours); the bowl centre is carried over the plate origin (success needs it
  within 3 cm) and lowered until it nearly touches the plate.

Action (OSC_POSE delta, world frame): 0.05 m and 0.5 rad per unit; gripper -1 opens, +1 closes.
Each expert is stateful (phase, timers) and is built fresh per episode by `make_libero_expert`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation

POS_UNIT_M = 0.05  # OSC_POSE: metres per unit action
ROT_UNIT_RAD = 0.5  # radians per unit action
GRASP_DEPTH_M = 0.02  # grasp point below the object's top (palm collision starts ~2.3 cm above it)
FINGERTIP_BELOW_M = 0.014  # finger collision geoms reach this far below the grasp point
GRIPPER_HALF_OPEN_M = 0.038  # inner faces of the open finger pads
R_DOWN = np.diag([1.0, -1.0, -1.0])  # eef frame with the gripper pointing down, yaw 0 (fingers close along y)
# Gripper footprint (collision geometry, in the eef frame: "along" = finger-closing axis), see module docstring
PALM_HALF_ALONG_M = 0.105  # the Panda hand is ~21 cm long along the closing axis
PALM_HALF_ACROSS_M = 0.035
PALM_ABOVE_M = 0.023  # palm collision bottom above the grasp point
FINGER_HALF_ALONG_M = 0.07  # outer faces of the open fingers
FINGER_HALF_ACROSS_M = 0.012
MAX_GRASP_WIDTH_M = 0.07  # object extent along the closing axis that the open gripper still clears


# ----------------------------------------------------------------------------------------------- geometry

def quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def mat_to_axisangle(r: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis * angle."""
    cos = np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    if np.pi - angle < 1e-4:  # near pi: axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(r) + 1) / 2, 0, None))
        k = int(np.argmax(axis))
        axis[(k + 1) % 3] = np.copysign(axis[(k + 1) % 3], r[k, (k + 1) % 3] + r[(k + 1) % 3, k])
        axis[(k + 2) % 3] = np.copysign(axis[(k + 2) % 3], r[k, (k + 2) % 3] + r[(k + 2) % 3, k])
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_for_closing_axis(d: np.ndarray) -> float:
    """Gripper yaw (about world z, relative to R_DOWN) whose finger-closing axis is parallel to the xy vector d.

    At yaw 0 the fingers close along world y; the gripper is symmetric under 180 degrees, so the yaw is
    folded into [-pi/2, pi/2] (the smallest rotation from the start pose).
    """
    yaw = float(np.arctan2(d[1], d[0]) - np.pi / 2)
    return (yaw + np.pi / 2) % np.pi - np.pi / 2


def footprint_clearance(p: dict[str, Any], exclude: str, centre_xy: np.ndarray, close_ax: np.ndarray,
                        z: float) -> float:
    """Smallest horizontal distance from the gripper's footprint at grasp height `z` to any other body.

    Fingers count against bodies reaching above the fingertips, the palm against bodies reaching above the
    palm's bottom. 0 means a collision. Bodies are their world collision AABBs.
    """
    across = np.array([-close_ax[1], close_ax[0]])
    fingers = [centre_xy + close_ax * s + across * b for s in np.linspace(-FINGER_HALF_ALONG_M,
               FINGER_HALF_ALONG_M, 7) for b in (-FINGER_HALF_ACROSS_M, FINGER_HALF_ACROSS_M)]
    palm = [centre_xy + close_ax * s + across * b for s in np.linspace(-PALM_HALF_ALONG_M, PALM_HALF_ALONG_M, 9)
            for b in (-PALM_HALF_ACROSS_M, 0.0, PALM_HALF_ACROSS_M)]
    best = np.inf
    for n in p["objects"]:
        n = str(n)
        if n == exclude:
            continue
        lo, hi = p[f"{n}_aabb"]
        pts = []
        if hi[2] > z - FINGERTIP_BELOW_M:
            pts += fingers
        if hi[2] > z + PALM_ABOVE_M:
            pts += palm
        for q in pts:
            dx = max(lo[0] - q[0], 0.0, q[0] - hi[0])
            dy = max(lo[1] - q[1], 0.0, q[1] - hi[1])
            best = min(best, float(np.hypot(dx, dy)))
    return best


def horizontal_box(p: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Oriented collision box of `name` reduced to the horizontal plane.

    Returns centre (3,), long and short horizontal unit axes (2,) each, their half lengths (long, short).
    """
    rot = p[f"{name}_obb_rot"]  # (3, 3) body axes in world
    half = p[f"{name}_obb_half"]  # (3,)
    up = int(np.argmax(np.abs(rot[2])))  # body axis closest to world vertical
    axes = [k for k in range(3) if k != up]
    a0, a1 = (rot[:2, k] for k in axes)
    h0, h1 = (float(half[k]) for k in axes)
    a0 = a0 / max(np.linalg.norm(a0), 1e-9)
    a1 = a1 / max(np.linalg.norm(a1), 1e-9)
    if h0 >= h1:
        return p[f"{name}_obb_center"], a0, a1, h0, h1
    return p[f"{name}_obb_center"], a1, a0, h1, h0


# ------------------------------------------------------------------------------------------------- expert

class PickPlaceExpert:
    """Approach -> descend -> close -> lift -> carry -> lower -> open -> retreat, re-grasping on a slip."""

    def __init__(self, task: str, suite: str) -> None:
        self.task = task
        self.suite = suite
        self.phase = "approach"
        self.timer = 0
        self.grasp: dict[str, Any] | None = None  # grasp point, yaw, object offset, chosen at approach
        self.attempts = 0
        self.lift_ref = 0.0  # object bottom z when the lift started
        self.obj_below = 0.0  # grasp point height above the object's bottom, measured after the lift

    # -------------------------------------------------------------------------------------------- helpers
    def _set(self, phase: str) -> None:
        self.phase = phase
        self.timer = 0

    @staticmethod
    def _move(eef: np.ndarray, target: np.ndarray, speed: float = 1.0, gain: float = 1.0) -> np.ndarray:
        d = (target - eef) / POS_UNIT_M * gain
        n = np.abs(d).max()
        if n > speed:
            d = d * (speed / n)
        return d

    @staticmethod
    def _rotate(eef_quat: np.ndarray, r_target: np.ndarray) -> tuple[np.ndarray, float]:
        r_cur = quat_xyzw_to_mat(eef_quat)
        r_err = r_target @ r_cur.T
        aa = mat_to_axisangle(r_err)
        return np.clip(aa / ROT_UNIT_RAD * 1.0, -1.0, 1.0), float(np.linalg.norm(aa))

    def _obstacle_top(self, p: dict[str, Any], exclude: tuple[str, ...]) -> float:
        """Highest collision point of every tracked object/fixture except `exclude` (for carrying heights)."""
        tops = [float(p[f"{n}_aabb"][1, 2]) for n in p["objects"] if str(n) not in exclude]
        return max(tops) if tops else 0.0

    # ------------------------------------------------------------------------------------------ strategies
    def _plan_grasp(self, p: dict[str, Any]) -> dict[str, Any]:
        obj = str(p["target_object"])
        lo, hi = p[f"{obj}_aabb"]
        if self.suite == "libero_spatial":
            return self._plan_rim_grasp(p, obj)
        centre, long_ax, short_ax, h_long, h_short = horizontal_box(p, obj)
        z = float(max(hi[2] - GRASP_DEPTH_M, lo[2] + FINGERTIP_BELOW_M))
        # closing axes: across the short side, rotated as far as the object still fits between the fingers,
        # picking the one whose footprint keeps the most clearance from the neighbours
        best, best_score = short_ax, -np.inf
        for phi in np.deg2rad(np.linspace(-90.0, 90.0, 37)):
            ax = np.cos(phi) * short_ax + np.sin(phi) * long_ax
            width = 2 * (h_short * abs(np.cos(phi)) + h_long * abs(np.sin(phi)))
            if width > MAX_GRASP_WIDTH_M:
                continue
            clear = footprint_clearance(p, obj, centre[:2], ax, z)
            score = min(clear, 0.03) - 0.005 * abs(phi)
            if score > best_score:
                best, best_score = ax, score
        yaw = yaw_for_closing_axis(best)
        return {"xy": centre[:2].copy(), "z": z, "yaw": yaw, "obj": obj, "R": rot_z(yaw) @ R_DOWN}

    def _plan_rim_grasp(self, p: dict[str, Any], obj: str) -> dict[str, Any]:
        lo, hi = p[f"{obj}_aabb"]
        centre = (lo + hi) / 2
        radius = float(min(hi[0] - lo[0], hi[1] - lo[1]) / 2)
        rim_r = radius - 0.008  # mid-wall of the bowl's rim
        z = float(hi[2] - 0.015)
        # candidate rim points; score = clearance of the gripper footprint from every other body's AABB that
        # reaches above the grasp height, plus a mild preference for the side facing the robot (-x)
        best, best_score = None, -np.inf
        others = [str(n) for n in p["objects"] if str(n) != obj]
        for ang in np.linspace(-np.pi, np.pi, 24, endpoint=False):
            u = np.array([np.cos(ang), np.sin(ang)])
            g = centre[:2] + u * rim_r
            # the fingers sit at g +- u * half-opening; the hand is ~2.5 cm thick across
            pts = [g + u * GRIPPER_HALF_OPEN_M, g - u * GRIPPER_HALF_OPEN_M, g]
            clearance = np.inf
            for n in others:
                olo, ohi = p[f"{n}_aabb"]
                if ohi[2] < z - FINGERTIP_BELOW_M + 0.005:
                    continue  # entirely below the fingertips
                for q in pts:
                    dx = max(olo[0] - q[0], 0.0, q[0] - ohi[0])
                    dy = max(olo[1] - q[1], 0.0, q[1] - ohi[1])
                    clearance = min(clearance, float(np.hypot(dx, dy)))
            score = min(clearance, 0.06) + 0.01 * (-u[0])
            if score > best_score:
                best, best_score = (g, u), score
        assert best is not None
        g, u = best
        yaw = yaw_for_closing_axis(u)
        return {"xy": g, "z": z, "yaw": yaw, "obj": obj, "R": rot_z(yaw) @ R_DOWN}

    def _place_target(self, p: dict[str, Any], obj_below: float) -> tuple[np.ndarray, float]:
        """(xy, z) of the grasp point at release."""
        assert self.grasp is not None
        obj = self.grasp["obj"]
        lo, hi = p[f"{obj}_aabb"]
        eef = p["eef_pos"]
        obj_centre_xy = (lo[:2] + hi[:2]) / 2
        offset = eef[:2] - obj_centre_xy  # where the object hangs relative to the fingers
        if self.suite == "libero_spatial":
            cont = str(p["container"])
            plate_xy = p[f"{cont}_pos"][:2]
            plate_top = float(p[f"{cont}_aabb"][1, 2])
            return plate_xy + offset, plate_top + 0.012 + obj_below
        goal = p["goal_pos"]
        cont = str(p["container"])
        floor = float(p[f"{cont}_aabb"][0, 2])
        return goal[:2] + offset, floor + 0.05 + obj_below

    # ------------------------------------------------------------------------------------------ main loop
    def __call__(self, obs: Observation) -> np.ndarray:
        p = obs.privileged
        eef = p["eef_pos"]
        a = np.zeros(7, dtype=np.float64)
        self.timer += 1
        if self.grasp is None:
            self.grasp = self._plan_grasp(p)
        g = self.grasp
        obj = g["obj"]
        lo, hi = p[f"{obj}_aabb"]
        rot, rot_err = self._rotate(p["eef_quat"], g["R"])
        a[3:6] = rot
        grip = -1.0

        if self.phase == "approach":
            hover = max(hi[2] + 0.06, g["z"] + 0.08)
            target = np.array([g["xy"][0], g["xy"][1], hover])
            if eef[2] < hover - 0.03 and np.linalg.norm(eef[:2] - g["xy"]) > 0.03:
                target = np.array([eef[0], eef[1], hover])  # rise first
            a[:3] = self._move(eef, target)
            if np.linalg.norm(eef[:2] - g["xy"]) < 0.01 and abs(eef[2] - hover) < 0.03 and rot_err < 0.05:
                self._set("descend")
            elif self.timer > 80:
                self._set("descend")
        elif self.phase == "descend":
            target = np.array([g["xy"][0], g["xy"][1], g["z"]])
            a[:3] = self._move(eef, target, speed=0.6)
            if abs(eef[2] - g["z"]) < 0.006 or self.timer > 40:
                self._set("close")
        elif self.phase == "close":
            target = np.array([g["xy"][0], g["xy"][1], g["z"]])
            a[:3] = self._move(eef, target, speed=0.3)
            grip = 1.0
            if self.timer >= 10:
                self.lift_ref = float(lo[2])
                self._set("lift")
        elif self.phase in ("lift", "carry", "lower"):
            grip = 1.0
            obj_below = eef[2] - lo[2]
            exclude = (obj,)
            carry_z = self._obstacle_top(p, exclude) + obj_below + 0.04
            place_xy, place_z = self._place_target(p, obj_below)
            if self.phase == "lift":
                a[:3] = self._move(eef, np.array([eef[0], eef[1], carry_z]))
                if self.timer > 6 and lo[2] < self.lift_ref + 0.01 and eef[2] - self.lift_ref > 0.06:
                    self._regrasp()  # the object stayed on the table: it slipped
                elif eef[2] > carry_z - 0.02 or self.timer > 60:
                    self.obj_below = obj_below
                    self._set("carry")
            elif self.phase == "carry":
                a[:3] = self._move(eef, np.array([place_xy[0], place_xy[1], carry_z]))
                if abs(obj_below - self.obj_below) > 0.03:
                    self._regrasp()  # dropped on the way
                elif np.linalg.norm(eef[:2] - place_xy) < 0.01:
                    self._set("lower")
                elif self.timer > 100:
                    self._set("lower")
            else:  # lower
                a[:3] = self._move(eef, np.array([place_xy[0], place_xy[1], place_z]), speed=0.5)
                if abs(eef[2] - place_z) < 0.008 or self.timer > 50:
                    self._set("release")
        elif self.phase == "release":
            a[:3] = 0.0
            grip = -1.0
            if self.timer >= 8:
                self._set("retreat")
        else:  # retreat
            a[:3] = self._move(eef, np.array([eef[0], eef[1], eef[2] + 0.1]), speed=0.5)
            grip = -1.0
        a[6] = grip
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def _regrasp(self) -> None:
        self.attempts += 1
        self.grasp = None
        self._set("approach")


def make_libero_expert(task: str) -> PickPlaceExpert:
    """A fresh expert for "libero_object/<i>" or "libero_spatial/<i>"."""
    suite, _, idx = task.partition("/")
    if suite not in ("libero_object", "libero_spatial") or not idx.isdigit() or not 0 <= int(idx) <= 9:
        raise UserError(f"no scripted LIBERO expert for task {task!r}; experts exist for "
                        "libero_object/0-9 and libero_spatial/0-9")
    return PickPlaceExpert(task, suite)
