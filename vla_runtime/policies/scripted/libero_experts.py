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
  within 3 cm) and lowered until it nearly touches the plate. A "tight" rim grasp (< 1 cm of room for the
  fingers, the bowl in a drawer) stops 2.5 cm above the rim until the xy error is < 3 mm and then descends
  slowly (the arm drifts 1-2 cm sideways in a fast descent at that reach); a bowl partly under an overhang
  (the cabinet top over the half-open drawer) is dragged out from under it before it is lifted.

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
MAX_GRASP_WIDTH_M = 0.07
RIM_INSET_M = 0.008  # bowl rim mid-wall inside the outer radius
RIM_GRASP_DEPTH_M = 0.015  # rim grasp below the bowl's top
PRESHAPE_STEPS = 4  # +1 gripper steps before a rim grasp descends: ~4.2 cm opening, fits beside drawer walls
PRESHAPE_HALF_OPEN_M = 0.021
SHOULDER_HEIGHT_M = 0.333  # Panda shoulder (joint 2) above the robot base
TIGHT_CLEARANCE_M = 0.01  # rim grasps with less room than this get the aligned slow descent
ALIGN_ABOVE_RIM_M = 0.025  # align stop: grasp point this far above the rim top (fingertips ~1 cm above it)
ALIGN_TOL_M = 0.003  # xy error allowed before the final slow descent of a tight grasp
REACH_COMFORT_M = 0.68  # shoulder-to-grasp-point distance the arm reaches with the gripper pointing down  # object extent along the closing axis that the open gripper still clears


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


def gripper_clearance(boxes: np.ndarray, grasp: np.ndarray, close_ax: np.ndarray, half_open: float) -> float:
    """Smallest 3D distance from the (vertical) gripper at `grasp` to the oriented boxes (G, 15); 0 = collision.

    Sample points: both fingers (opened to `half_open`) from the fingertips to the palm, and the palm.
    """
    across = np.array([-close_ax[1], close_ax[0], 0.0])
    along = np.array([close_ax[0], close_ax[1], 0.0])
    pts = []
    for side in (-1.0, 1.0):
        for a in (half_open + 0.002, half_open + 0.012):
            for b in (-FINGER_HALF_ACROSS_M, 0.0, FINGER_HALF_ACROSS_M):
                for dz in (-FINGERTIP_BELOW_M, 0.0, 0.015, 0.03):
                    pts.append(grasp + side * a * along + b * across + dz * np.array([0.0, 0.0, 1.0]))
    for a in np.linspace(-PALM_HALF_ALONG_M, PALM_HALF_ALONG_M, 9):
        for b in (-PALM_HALF_ACROSS_M, 0.0, PALM_HALF_ACROSS_M):
            for dz in (PALM_ABOVE_M, PALM_ABOVE_M + 0.03):
                pts.append(grasp + a * along + b * across + dz * np.array([0.0, 0.0, 1.0]))
    return points_box_distance(boxes, np.array(pts))


def points_box_distance(boxes: np.ndarray, q: np.ndarray) -> float:
    """Smallest distance from the points q (P, 3) to the oriented boxes (G, 15); 0 = a point is inside a box."""
    if not len(boxes):
        return np.inf
    c, h, r = boxes[:, :3], boxes[:, 3:6], boxes[:, 6:].reshape(-1, 3, 3)  # (G, 3) (G, 3) (G, 3, 3)
    local = np.einsum("gji,gpj->gpi", r, q[None] - c[:, None])  # (G, P, 3): points in each box frame
    out = np.maximum(np.abs(local) - h[:, None], 0.0)
    return float(np.sqrt((out ** 2).sum(-1)).min())


def _disc(centre_xy: np.ndarray, radius: float, zs: tuple[float, ...] | list[float]) -> np.ndarray:
    """(P, 3) sample points filling a horizontal disc (centre + 3 rings of 16) at each height in zs."""
    pts = []
    for z in zs:
        pts.append([centre_xy[0], centre_xy[1], z])
        for rr in (radius / 3, 2 * radius / 3, radius):
            for t in np.linspace(0.0, 2 * np.pi, 16, endpoint=False):
                pts.append([centre_xy[0] + rr * np.cos(t), centre_xy[1] + rr * np.sin(t), z])
    return np.array(pts)


def slide_out_of_overhang(p: dict[str, Any], obj: str) -> np.ndarray | None:
    """Horizontal move (2,) that takes `obj` out from under an overhang before it is lifted, or None.

    Why: in LIBERO-Spatial task 4 the bowl sits in a half-open drawer, partly under the cabinet's top panel,
    which is 1 cm above the bowl's rim: lifted straight up, the bowl jams against the panel, tilts and slips
    out of the fingers. The move is the shortest (1 cm steps, up to 10 cm, 16 directions) after which the
    object's footprint, raised by 0.3-4 cm, touches no collision box, and along which the object at its
    current height does not run into one (the drawer walls); None if lifting straight up is already free or
    no such move exists.
    """
    objects = [str(n) for n in p["objects"]]
    boxes = p["collision_boxes"][p["collision_owner"] != objects.index(obj)]  # (G, 15)
    lo, hi = p[f"{obj}_aabb"]
    centre = (lo[:2] + hi[:2]) / 2
    radius = float(min(hi[0] - lo[0], hi[1] - lo[1]) / 2)
    lifted_z = tuple(float(z) for z in np.arange(hi[2] + 0.003, hi[2] + 0.04, 0.002))  # panels are ~3 mm thick
    body_z = (lo[2] + 0.01, (lo[2] + hi[2]) / 2, hi[2] - 0.003)
    if points_box_distance(boxes, _disc(centre, radius, lifted_z)) > 0.0:
        return None
    best: np.ndarray | None = None
    for t in np.linspace(0.0, 2 * np.pi, 16, endpoint=False):
        d = np.array([np.cos(t), np.sin(t)])
        for step in range(1, 11):
            shift = d * 0.01 * step
            if points_box_distance(boxes, _disc(centre + shift, radius, body_z)) <= 0.0:
                break  # runs into a wall along this direction
            if points_box_distance(boxes, _disc(centre + shift, radius, lifted_z)) > 0.0:
                if best is None or step * 0.01 < np.linalg.norm(best) - 1e-9:
                    best = d * 0.01 * (step + 1)  # one more centimetre of margin
                break
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
        self.tried: list[float] = []  # rim angles already tried (Spatial)
        self.lift_ref = 0.0  # object bottom z when the lift started
        self.obj_below = 0.0  # grasp point height above the object's bottom, measured after the lift
        self.best_err, self.best_t = np.inf, 0  # progress tracking within a phase
        self.prev_z = 0.0  # eef height at the previous step (stall detection while lowering)
        self.slides = 0  # grasped objects dragged out from under an overhang before lifting
        self.tight_grasps = 0  # rim grasps planned with the aligned slow descent (recorded by the measure script)

    # -------------------------------------------------------------------------------------------- helpers
    def _set(self, phase: str) -> None:
        self.phase = phase
        self.timer = 0
        self.best_err, self.best_t = np.inf, 0

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

    @staticmethod
    def _obstacle_top(p: dict[str, Any], exclude: str, a_xy: np.ndarray, b_xy: np.ndarray,
                      margin: float = 0.08) -> float:
        """Highest collision point of the bodies (except `exclude`) within `margin` of the segment a -> b.

        The carried object must clear these; bodies far from the carrying path do not raise it.
        """
        top = 0.0
        seg = b_xy - a_xy
        L2 = float(seg @ seg)
        for n in p["objects"]:
            n = str(n)
            if n == exclude:
                continue
            lo, hi = p[f"{n}_aabb"]
            # distance from the segment to the box: sample the segment (cheap, boxes are few)
            d = np.inf
            for t in np.linspace(0.0, 1.0, 11 if L2 > 0 else 1):
                q = a_xy + t * seg
                dx = max(lo[0] - q[0], 0.0, q[0] - hi[0])
                dy = max(lo[1] - q[1], 0.0, q[1] - hi[1])
                d = min(d, float(np.hypot(dx, dy)))
            if d < margin:
                top = max(top, float(hi[2]))
        return top

    # ------------------------------------------------------------------------------------------ strategies
    def _plan_grasp(self, p: dict[str, Any]) -> dict[str, Any]:
        obj = str(p["target_object"])
        lo, hi = p[f"{obj}_aabb"]
        if self.suite == "libero_spatial":
            return self._plan_rim_grasp(p, obj)
        centre, long_ax, short_ax, h_long, h_short = horizontal_box(p, obj)
        z = float(max(hi[2] - GRASP_DEPTH_M, lo[2] + FINGERTIP_BELOW_M))
        if self.attempts > 0:
            return self._plan_top_regrasp(p, obj, centre, long_ax, short_ax, h_long, h_short, z)
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
        self.tried.append(float(np.arctan2(best[1], best[0])))
        yaw = yaw_for_closing_axis(best)
        return {"xy": centre[:2].copy(), "z": z, "yaw": yaw, "obj": obj, "R": rot_z(yaw) @ R_DOWN}

    def _plan_top_regrasp(self, p: dict[str, Any], obj: str, centre: np.ndarray, long_ax: np.ndarray,
                          short_ax: np.ndarray, h_long: float, h_short: float, z: float) -> dict[str, Any]:
        """After a failed top grasp: the closing axis with the most 3D clearance from every collision geom
        (oriented boxes, finer than the neighbours' AABBs used first), excluding axes already tried."""
        objects = [str(n) for n in p["objects"]]
        boxes = p["collision_boxes"][p["collision_owner"] != objects.index(obj)]
        best, best_score = None, -np.inf
        for phi in np.deg2rad(np.linspace(-90.0, 90.0, 37)):
            ax = np.cos(phi) * short_ax + np.sin(phi) * long_ax
            ang = float(np.arctan2(ax[1], ax[0]))
            if any(abs((ang - t + np.pi / 2) % np.pi - np.pi / 2) < np.deg2rad(20) for t in self.tried):
                continue
            if 2 * (h_short * abs(np.cos(phi)) + h_long * abs(np.sin(phi))) > MAX_GRASP_WIDTH_M:
                continue
            clear = gripper_clearance(boxes, np.array([centre[0], centre[1], z]), ax, GRIPPER_HALF_OPEN_M)
            score = min(clear, 0.03) - 0.005 * abs(phi)
            if score > best_score:
                best, best_score = (ax, ang), score
        if best is None:
            self.tried.clear()
            best = (short_ax, float(np.arctan2(short_ax[1], short_ax[0])))
        self.tried.append(best[1])
        yaw = yaw_for_closing_axis(best[0])
        return {"xy": centre[:2].copy(), "z": z, "yaw": yaw, "obj": obj, "R": rot_z(yaw) @ R_DOWN}

    def _plan_rim_grasp(self, p: dict[str, Any], obj: str) -> dict[str, Any]:
        """Rim point and closing direction (radial) with the most clearance for the pre-shaped gripper.

        Clearance is the 3D distance from sample points on the fingers and palm to every other collision
        geom (oriented boxes: drawer walls, cabinet panels, neighbours), so a bowl inside an open drawer is
        grasped where the drawer leaves room for the outer finger.
        """
        lo, hi = p[f"{obj}_aabb"]
        centre = (lo + hi) / 2
        radius = float(min(hi[0] - lo[0], hi[1] - lo[1]) / 2)
        rim_r = radius - RIM_INSET_M
        z = float(hi[2] - RIM_GRASP_DEPTH_M)
        shoulder = p["robot_base_pos"] + np.array([0.0, 0.0, SHOULDER_HEIGHT_M])
        plate_xy = p[f"{p['container']}_pos"][:2]
        objects = [str(n) for n in p["objects"]]
        boxes = p["collision_boxes"][p["collision_owner"] != objects.index(obj)]  # (G, 15)
        best, best_score = None, -np.inf
        for ang in np.linspace(-np.pi, np.pi, 24, endpoint=False):
            # after a failed grasp, try another side of the rim
            if any(abs((ang - t + np.pi) % (2 * np.pi) - np.pi) < np.deg2rad(40) for t in self.tried):
                continue
            u = np.array([np.cos(ang), np.sin(ang)])
            g = centre[:2] + u * rim_r
            clearance = gripper_clearance(boxes, np.array([g[0], g[1], z]), u, PRESHAPE_HALF_OPEN_M)
            # the eef carries this rim point over the plate: both there and here it must stay within reach
            place = np.array([plate_xy[0] + u[0] * rim_r, plate_xy[1] + u[1] * rim_r, z])
            reach = max(np.linalg.norm(np.array([g[0], g[1], z]) - shoulder), np.linalg.norm(place - shoulder))
            # prefer small gripper yaws: a near-90-degree yaw far to the side runs into the wrist's joint limits
            score = (min(clearance, 0.03) - 0.01 * abs(yaw_for_closing_axis(u))
                     - 0.3 * max(0.0, reach - REACH_COMFORT_M))
            if score > best_score:
                best, best_score = (g, u, ang, clearance), score
        if best is None:  # every side tried: start over
            self.tried.clear()
            return self._plan_rim_grasp(p, obj)
        g, u, ang, clearance = best
        self.tried.append(float(ang))
        yaw = yaw_for_closing_axis(u)
        # tight: the fingers have < TIGHT_CLEARANCE_M of room (bowl in a drawer): stop above the rim, align, then
        # descend slowly (see the "align" phase)
        return {"xy": g, "z": z, "yaw": yaw, "obj": obj, "R": rot_z(yaw) @ R_DOWN, "preshape": PRESHAPE_STEPS,
                "tight": bool(clearance < TIGHT_CLEARANCE_M), "rim_top": float(hi[2])}

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
            self.tight_grasps += int(bool(self.grasp.get("tight")))
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
            if (np.linalg.norm(eef[:2] - g["xy"]) < 0.01 and abs(eef[2] - hover) < 0.03 and rot_err < 0.05) \
                    or self.timer > 80:
                self._set("preshape" if g.get("preshape") else "descend")
        elif self.phase == "preshape":  # partly close at the hover point so the fingers fit beside the rim
            a[:3] = self._move(eef, np.array([g["xy"][0], g["xy"][1], eef[2]]))
            grip = 1.0
            if self.timer >= g["preshape"]:
                self._set("align" if g.get("tight") else "descend")
        elif self.phase == "align":  # tight grasp: stop just above the rim and remove the xy error first
            target = np.array([g["xy"][0], g["xy"][1], g["rim_top"] + ALIGN_ABOVE_RIM_M])
            a[:3] = self._move(eef, target, speed=0.6, gain=2.0)
            grip = 0.0
            if (np.linalg.norm(eef[:2] - g["xy"]) < ALIGN_TOL_M and abs(eef[2] - target[2]) < 0.005) \
                    or self.timer > 30:
                self._set("descend")
        elif self.phase == "descend":
            target = np.array([g["xy"][0], g["xy"][1], g["z"]])
            if g.get("tight"):  # slow, with a stiffer xy correction: the arm drifts sideways at this reach
                a[:3] = self._move(eef, target, speed=0.25, gain=2.0)
            else:
                a[:3] = self._move(eef, target, speed=0.6)
            grip = 0.0 if g.get("preshape") else -1.0  # hold the pre-shaped opening
            if abs(eef[2] - g["z"]) < 0.006 or self.timer > 40:
                self._set("close")
        elif self.phase == "close":
            target = np.array([g["xy"][0], g["xy"][1], g["z"]])
            grip = 1.0
            a[:3] = self._move(eef, target, speed=0.3)
            if self.timer >= 10:
                self.lift_ref = float(lo[2])
                shift = slide_out_of_overhang(p, obj) if self.suite == "libero_spatial" else None
                if shift is None:
                    self._set("lift")
                else:  # drag it out from under the overhang first (raised 4 mm, less friction)
                    self.slides += 1
                    g["slide_to"] = np.array([eef[0] + shift[0], eef[1] + shift[1], eef[2] + 0.004])
                    g["slide_hold"] = eef[:2] - (lo[:2] + hi[:2]) / 2  # eef relative to the object centre
                    self._set("slide")
        elif self.phase == "slide":
            grip = 1.0
            a[:3] = self._move(eef, g["slide_to"], speed=0.4)
            if np.linalg.norm((eef[:2] - (lo[:2] + hi[:2]) / 2) - g["slide_hold"]) > 0.02:
                self._regrasp()  # the object stayed behind: lost it
            elif np.linalg.norm(eef[:2] - g["slide_to"][:2]) < 0.005 or self.timer > 30:
                self._set("lift")
        elif self.phase in ("lift", "carry", "lower"):
            grip = 1.0
            obj_below = eef[2] - lo[2]
            place_xy, place_z = self._place_target(p, obj_below)
            carry_z = self._obstacle_top(p, obj, eef[:2], place_xy) + obj_below + 0.04
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
                else:
                    err = float(np.linalg.norm(eef[:2] - place_xy))
                    if err < self.best_err - 0.002:
                        self.best_err, self.best_t = err, self.timer
                    # arrived, or no progress for 10 steps (at the reach limit: lower where we are)
                    if err < 0.01 or self.timer - self.best_t > 10 or self.timer > 100:
                        self._set("lower")
            else:  # lower: fast while high above the release height, then slow
                speed = 1.0 if eef[2] - place_z > 0.04 else 0.5
                a[:3] = self._move(eef, np.array([place_xy[0], place_xy[1], place_z]), speed=speed)
                stalled = self.timer > 5 and self.prev_z - eef[2] < 0.001
                if abs(eef[2] - place_z) < 0.008 or stalled or self.timer > 50:
                    self._set("release")
            self.prev_z = float(eef[2])
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
