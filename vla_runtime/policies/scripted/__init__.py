"""Scripted experts acting from privileged object poses (simulation only), as a `Policy`.

`ScriptedPolicy` dispatches on `obs.privileged["task"]` to a per-task expert. Experts emit one OSC_POSE
delta action per call (chunk_size 1) in the same action space learned policies use.
"""

from __future__ import annotations

from typing import Any, Callable

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import ActionChunk, Observation, PolicySpec


class ScriptedPolicy:
    """A Policy wrapping the expert for whichever task the observation says it is in."""

    def __init__(self, env_name: str = "") -> None:
        self.env_name = env_name
        self.spec = PolicySpec(action_dim=7, chunk_size=1, n_action_steps=1, cameras=(), name="scripted")
        self._expert: Any = None
        self._task: str | None = None

    def reset(self, instruction: str) -> None:
        self._expert = None
        self._task = None

    def act(self, obs: Observation) -> ActionChunk:
        task = obs.privileged.get("task")
        if task is None:
            raise UserError("the scripted expert needs privileged simulator state (obs.privileged['task'])")
        if self._expert is None or task != self._task:
            self._expert = make_expert(str(task))
            self._task = str(task)
        a = self._expert(obs)
        return ActionChunk(actions=a[None], stamp=obs.stamp, info={})


def make_expert(task: str) -> Callable[[Observation], Any]:
    """A fresh stateful expert callable for `task` ("Lift", "libero_object/3", "reach", ...)."""
    if task == "reach":
        from vla_runtime.policies.scripted.reach import ReachExpert

        return ReachExpert()
    if task in ("Lift", "Stack", "PickPlaceCan"):
        from vla_runtime.policies.scripted.robosuite_experts import make_robosuite_expert

        return make_robosuite_expert(task)
    if task.startswith("libero_"):
        from vla_runtime.policies.scripted.libero_experts import make_libero_expert

        return make_libero_expert(task)
    raise UserError(f"no scripted expert for task {task!r}")
