"""The env adapter interface: gymnasium-style reset/step over `Observation`s.

One `Env` object serves one env *name* (e.g. `libero:libero_object`, a suite of 10 tasks, or
`robosuite:Lift`, one task); an `EpisodeSpec` says which task, seed and init state an episode uses, so a
run is fully described by its list of specs (this is also the unit of work for parallel evaluation).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vla_runtime.runtime.types import Observation


@dataclass(frozen=True)
class EnvSpec:
    """What the env offers: checked against a policy's spec before an episode starts."""

    name: str
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    cameras: tuple[str, ...]
    image_size: int
    state_dim: int
    control_hz: float

    def low(self) -> np.ndarray:
        return np.asarray(self.action_low, dtype=np.float32)

    def high(self) -> np.ndarray:
        return np.asarray(self.action_high, dtype=np.float32)


@dataclass(frozen=True)
class TaskInfo:
    task: str  # task id: "Lift", "libero_object/3"
    instruction: str
    max_steps: int
    init_states: int = 0  # fixed init states of the task (LIBERO: 50; seed s -> state s mod n); 0: none


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode: env + task + seed (+ LIBERO init-state index). JSON-serialisable, hashable.

    robosuite: episode i of a run with `--seed S` uses seed S+i.
    LIBERO: episode i uses init state (S+i) mod n_init_states and seed S+i (for what init states do not fix).
    init_state=None on LIBERO means a freshly sampled placement (demo collection, never evaluation).
    """

    env: str
    task: str
    index: int
    seed: int
    init_state: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # e.g. (("policy", "scripted"),) for the work-unit key

    def key(self) -> str:
        """Stable id of this episode inside a run (used by --resume and parallel workers)."""
        s = f"{self.env}|{self.task}|{self.seed}|{self.init_state}"
        return s

    def episode_key(self) -> str:
        """`key()` without the env name: the same episode run in process and over the bridge (env `remote:...`)
        has the same episode_key."""
        return episode_key(self.key())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EpisodeSpec":
        d = dict(d)
        d["extra"] = tuple(sorted(dict(d.get("extra") or {}).items()))
        return EpisodeSpec(**d)


@dataclass
class StepResult:
    obs: Observation
    reward: float
    success: bool
    done: bool  # success or max steps reached
    info: dict[str, Any] = field(default_factory=dict)


class Env(abc.ABC):
    """Adapter over one simulator family. Subclasses build simulator envs lazily and reuse them per task."""

    spec: EnvSpec

    @abc.abstractmethod
    def tasks(self) -> list[TaskInfo]:
        """All tasks this env name covers (one for robosuite tasks, 10 for a LIBERO suite)."""

    def episode_specs(self, seed: int, episodes: int, tasks: list[str] | None = None) -> list[EpisodeSpec]:
        """`episodes` episodes per task, following the seeding rule of `EpisodeSpec`."""
        out = []
        for t in self.tasks():
            if tasks is not None and t.task not in tasks:
                continue
            for i in range(episodes):
                out.append(EpisodeSpec(env=self.spec.name, task=t.task, index=i, seed=seed + i,
                                       init_state=self.init_state_for(t.task, seed + i)))
        return out

    def init_state_for(self, task: str, seed: int) -> int | None:
        """Tasks with fixed init states (LIBERO) map seed s to state s mod n; others (robosuite) have none."""
        n = self.task_info(task).init_states
        return int(seed) % n if n else None

    def task_info(self, task: str) -> TaskInfo:
        for t in self.tasks():
            if t.task == task:
                return t
        raise KeyError(task)

    @abc.abstractmethod
    def reset(self, episode: EpisodeSpec) -> Observation:
        """Start `episode` (same spec => same initial state and, with the same actions, same trajectory)."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepResult:
        """Apply one action (float32 (action_dim,), in [action_low, action_high])."""

    def hold_action(self) -> np.ndarray:
        """The action that keeps the robot where it is (zero delta, gripper holds): executed on a missed tick."""
        return np.zeros(self.spec.action_dim, dtype=np.float32)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_action(action: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """Validate an action before it reaches a simulator or robot: shape, finiteness. Clamps to limits."""
    a = np.asarray(action, dtype=np.float32)
    if a.shape != (spec.action_dim,):
        raise ValueError(f"{spec.name}: action must have shape ({spec.action_dim},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{spec.name}: non-finite action {a.tolist()}")
    return np.clip(a, spec.low(), spec.high())


def config_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_sim_options(name: str, cameras: tuple[str, ...] | list[str] | None, aliases: dict[str, str],
                      default_cameras: tuple[str, ...], render: bool, image_size: int,
                      max_steps: int | None) -> tuple[str, ...]:
    """Shared constructor validation of the simulator adapters (robosuite, LIBERO); returns the cameras.

    Why shared: both adapters take the same options and must reject bad ones with the same one-line
    `UserError` before building a simulator (seconds). `name` prefixes the messages ("robosuite:Lift").
    No cameras given: `default_cameras` when rendering, none otherwise.
    """
    from vla_runtime.errors import UserError

    cams = tuple(cameras) if cameras else (default_cameras if render else ())
    bad = [c for c in cams if c not in aliases]
    if bad:
        raise UserError(f"{name}: unknown camera(s) {bad}; valid: {', '.join(aliases)}")
    if cams and not render:
        raise UserError(f"{name}: cameras {cams} requested with render=False")
    if not 16 <= image_size <= 1024:
        raise UserError(f"image_size must be in [16, 1024], got {image_size}")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"max_steps must be >= 1, got {max_steps}")
    return cams


def clear_gripper_commands(robots: Any) -> None:
    """Zero each robot gripper's integrated command before a soft reset.

    Why: robosuite 1.4 grippers integrate their command (`gripper.current_action`, +-0.01 per step) and a
    soft reset (`hard_reset=False`, used by both adapters for speed) does not clear it, so an episode would
    depend on how the previous one ended; a freshly built model starts at zero.
    """
    for robot in robots:
        gripper = getattr(robot, "gripper", None)
        if gripper is not None and hasattr(gripper, "current_action"):
            gripper.current_action = np.zeros_like(gripper.current_action)


def episode_key(key: str) -> str:
    """An `EpisodeSpec.key()` string without its env part (for records read back from episodes.jsonl)."""
    return key.split("|", 1)[-1]
