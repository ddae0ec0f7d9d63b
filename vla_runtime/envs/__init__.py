"""Gymnasium-style env adapters (robosuite, LIBERO, remote robot) and rendering setup.

`make_env("robosuite:Lift")`, `make_env("libero:libero_object")`, `make_env("libero:libero_object/3")`,
`make_env("remote:tcp://127.0.0.1:5555")`. Simulator packages are imported only when an env is made.
"""

from __future__ import annotations

from typing import Any

from vla_runtime.envs.base import Env, EnvSpec, EpisodeSpec, StepResult, TaskInfo
from vla_runtime.errors import UserError

ROBOSUITE_TASKS = ("Lift", "Stack", "PickPlaceCan")
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def list_envs() -> list[str]:
    return [f"robosuite:{t}" for t in ROBOSUITE_TASKS] + [f"libero:{s}" for s in LIBERO_SUITES] + [
        "libero:<suite>/<task index 0-9>", "remote:tcp://HOST:PORT", "dummy:reach"]


def make_env(name: str, *, cameras: tuple[str, ...] | None = None, image_size: int = 128,
             render: bool = True, fast_render: bool = True, **kwargs: Any) -> Env:
    """Build the env adapter for `name`; raises UserError listing valid names if unknown."""
    family, _, rest = name.partition(":")
    if family == "robosuite" and rest in ROBOSUITE_TASKS:
        from vla_runtime.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv(rest, cameras=cameras, image_size=image_size, render=render,
                            fast_render=fast_render, **kwargs)
    if family == "libero":
        suite, _, task = rest.partition("/")
        if suite in LIBERO_SUITES and (task == "" or (task.isdigit() and 0 <= int(task) <= 9)):
            from vla_runtime.envs.libero_env import LiberoEnv

            return LiberoEnv(suite, task_index=int(task) if task else None, cameras=cameras,
                             image_size=image_size, render=render, fast_render=fast_render, **kwargs)
    if name == "dummy:reach":
        from vla_runtime.envs.dummy import DummyReachEnv

        return DummyReachEnv(cameras=cameras, image_size=min(image_size, 64))
    if family == "remote" and rest.startswith(("tcp://", "ipc://")):
        from vla_runtime.bridges.client import RemoteEnv

        return RemoteEnv(rest, **kwargs)
    raise UserError(f"unknown env {name!r}; valid: {', '.join(list_envs())}")


__all__ = ["Env", "EnvSpec", "EpisodeSpec", "StepResult", "TaskInfo", "make_env", "list_envs"]
