"""Scripted LIBERO experts: the geometry helpers on synthetic scenes (no simulator) and the drawer task
(LIBERO-Spatial task 4) on a benchmark init state where the bowl sits partly under the cabinet's top panel.

The simulator test builds one env (~5-10 s) and runs one ~120-step episode with render off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vla_runtime.errors import UserError
from vla_runtime.policies.scripted.libero_experts import (
    make_libero_expert,
    points_box_distance,
    slide_out_of_overhang,
)


def _box(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> np.ndarray:
    """Axis-aligned box as one row of `collision_boxes` (15,): centre, half sizes, rotation (identity)."""
    lo_a, hi_a = np.asarray(lo), np.asarray(hi)
    return np.concatenate([(lo_a + hi_a) / 2, (hi_a - lo_a) / 2, np.eye(3).ravel()])


def _drawer_scene(panel: bool) -> dict[str, Any]:
    """A 10 cm bowl in a drawer open towards +y: side walls 1 mm from the bowl (it can only move along y),
    optionally a 3 mm top panel 1 cm above the rim covering the bowl's -y part (y < 0.025)."""
    bowl = [_box((0.0, 0.0, 1.0), (0.1, 0.1, 1.05))]
    cab = [_box((-0.006, -0.3, 0.99), (-0.001, 0.3, 1.055)),  # side walls, as high as the rim
           _box((0.101, -0.3, 0.99), (0.106, 0.3, 1.055)),
           _box((-0.2, -0.3, 0.98), (0.3, 0.3, 0.9995))]  # drawer floor
    if panel:
        cab.append(_box((-0.2, -0.3, 1.06), (0.3, 0.025, 1.063)))
    boxes = np.stack(bowl + cab)  # (G, 15)
    return {"objects": np.array(["bowl", "cabinet"]), "collision_boxes": boxes,
            "collision_owner": np.array([0] + [1] * len(cab)),
            "bowl_aabb": np.array([[0.0, 0.0, 1.0], [0.1, 0.1, 1.05]])}


def test_points_box_distance_inside_and_outside() -> None:
    boxes = _box((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[None]  # (1, 15)
    assert points_box_distance(boxes, np.array([[0.5, 0.5, 0.5]])) == 0.0
    assert points_box_distance(boxes, np.array([[2.0, 0.5, 0.5], [0.5, 0.5, 1.25]])) == pytest.approx(0.25)
    assert points_box_distance(boxes[:0], np.zeros((1, 3))) == np.inf


def test_slide_out_of_overhang_moves_the_bowl_out_along_the_drawer() -> None:
    shift = slide_out_of_overhang(_drawer_scene(panel=True), "bowl")
    assert shift is not None
    # the panel ends at y = 0.025 and the bowl's -y edge is at y = 0: 3 cm clear it (1 cm steps), + 1 cm
    # margin, straight along +y (the side walls block every diagonal)
    assert shift[1] == pytest.approx(0.04)
    assert abs(shift[0]) < 1e-9


def test_slide_out_of_overhang_is_none_without_overhang() -> None:
    assert slide_out_of_overhang(_drawer_scene(panel=False), "bowl") is None


def test_unknown_task_is_a_user_error() -> None:
    with pytest.raises(UserError, match="libero_spatial/0-9"):
        make_libero_expert("libero_goal/3")
    with pytest.raises(UserError):
        make_libero_expert("libero_spatial/10")


@pytest.mark.slow
def test_drawer_task_bowl_under_the_cabinet_top_in_one_grasp() -> None:
    """Init state 5 of libero_spatial/4: before the slide-out the first grasp lifted the bowl into the cabinet
    top, it tilted and slipped (3 attempts, failed). Now: one tight grasp, one slide, success."""
    pytest.importorskip("libero.libero")
    from vla_runtime.envs import EpisodeSpec, make_env

    env = make_env("libero:libero_spatial/4", render=False)
    try:
        spec = EpisodeSpec("libero:libero_spatial", "libero_spatial/4", 0, seed=5, init_state=5)
        obs = env.reset(spec)
        expert = make_libero_expert(spec.task)
        success = False
        for _ in range(env.task_info(spec.task).max_steps):
            r = env.step(expert(obs))
            obs = r.obs
            if r.done:
                success = r.success
                break
    finally:
        env.close()
    assert success
    assert expert.attempts == 0
    assert expert.tight_grasps == 1 and expert.slides == 1
