"""Shared simulator-adapter helpers in `vla_runtime.envs.base`: option validation and the soft-reset gripper fix.

No simulator is built: validation runs before any model is loaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vla_runtime.envs.base import check_sim_options, clear_gripper_commands
from vla_runtime.errors import UserError

ALIASES = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}


def test_default_cameras_only_when_rendering() -> None:
    assert check_sim_options("x:y", None, ALIASES, ("agentview", "wrist"), True, 128, None) == ("agentview", "wrist")
    assert check_sim_options("x:y", None, ALIASES, ("agentview", "wrist"), False, 128, None) == ()
    assert check_sim_options("x:y", ["wrist"], ALIASES, ("agentview",), True, 64, 10) == ("wrist",)


@pytest.mark.parametrize("cams, render, size, steps, match", [
    (("topview",), True, 128, None, r"x:y: unknown camera\(s\) \['topview'\]; valid: agentview, wrist"),
    (("wrist",), False, 128, None, "requested with render=False"),
    (None, True, 8, None, r"image_size must be in \[16, 1024\], got 8"),
    (None, True, 2048, None, "image_size"),
    (None, True, 128, 0, "max_steps must be >= 1, got 0"),
])
def test_bad_options_raise_user_error(cams, render, size, steps, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=match):
        check_sim_options("x:y", cams, ALIASES, ("agentview",), render, size, steps)


def test_adapters_reject_bad_cameras_before_building() -> None:
    pytest.importorskip("robosuite")
    from vla_runtime.envs import make_env

    with pytest.raises(UserError, match=r"robosuite:Lift: unknown camera"):
        make_env("robosuite:Lift", cameras=("nope",))
    pytest.importorskip("libero.libero")
    with pytest.raises(UserError, match=r"libero:libero_spatial: unknown camera"):
        make_env("libero:libero_spatial", cameras=("nope",))


def test_clear_gripper_commands_zeroes_integrated_command() -> None:
    g = SimpleNamespace(current_action=np.array([0.7, -0.3]))
    robots = [SimpleNamespace(gripper=g), SimpleNamespace(gripper=None), SimpleNamespace()]
    clear_gripper_commands(robots)
    assert g.current_action.shape == (2,) and not g.current_action.any()
