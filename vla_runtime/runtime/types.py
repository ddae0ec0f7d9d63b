"""The data that crosses the runtime: observations in, action chunks out, and the Policy protocol.

The runtime knows nothing about a policy beyond this file; envs and the robot bridge produce `Observation`s,
policies produce `ActionChunk`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Observation:
    """One observation, as captured at `stamp`.

    images: camera name -> uint8 (H, W, 3), upright (LIBERO's upside-down renders are flipped by the env).
    state: float32 (state_dim,) proprio: eef pos (3), eef axis-angle (3), gripper qpos (2).
    privileged: simulation only (object poses etc.), so scripted experts can act without the simulator.
    committed_actions: set by the runtime for async inference: (L, action_dim) actions already queued for the
        ticks from this observation on, which will execute while the chunk is computed. A policy may condition
        on them (the diffusion policy inpaints them as the chunk's first L actions) or ignore them.
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str
    stamp: float
    step: int
    privileged: dict[str, Any] = field(default_factory=dict)
    committed_actions: np.ndarray | None = None


@dataclass
class ActionChunk:
    """A chunk of actions answering the observation captured at `stamp`.

    actions: float32 (horizon, action_dim) in the env's action space.
    info: timings (ms) and what the accelerations did (tokens kept, exit layer, denoising steps, mode...).
    """

    actions: np.ndarray
    stamp: float
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = np.asarray(self.actions, dtype=np.float32)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"ActionChunk.actions must be (horizon, action_dim), got shape {a.shape}")
        self.actions = a


@dataclass(frozen=True)
class PolicySpec:
    """What a policy needs and produces; checked against the env's spec before an episode starts."""

    action_dim: int = 7
    chunk_size: int = 1  # actions per inference
    n_action_steps: int = 1  # actions executed from each chunk before the next inference (sync loop)
    cameras: tuple[str, ...] = ()
    image_size: int = 128
    state_dim: int = 8
    control_hz: float = 20.0
    name: str = "policy"

    def __post_init__(self) -> None:
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(f"n_action_steps must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}")


@runtime_checkable
class Policy(Protocol):
    spec: PolicySpec

    def reset(self, instruction: str) -> None:
        """Start a new episode (clears history: previous chunk, pruner state, exit statistics)."""

    def act(self, obs: Observation) -> ActionChunk:
        """Return a chunk of `spec.chunk_size` actions for `obs`."""


# Optional hook a policy may define (the runtime checks with getattr, so the protocol stays minimal):
#     def on_action(self, action: np.ndarray) -> bool
# called with every action the runtime executes from the policy's chunks; returning True asks for a replan:
# the runtime drops the queued rest of the chunk and infers again at the next tick (SpecPrune's controller does
# this when the robot enters a fine-grained phase mid-chunk).
