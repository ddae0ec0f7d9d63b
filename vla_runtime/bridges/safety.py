"""The robot-side safety layer: the last code between a network message and the actuators.

Why it lives in the agent and not in the runtime: the runtime may crash, stall, be on another machine or be
written by someone else; the robot must stay safe regardless. So every action the agent executes passes
here, and every intervention is counted by reason (reported in step replies, observations and the agent's
final summary), because a silent clamp hides a policy bug.

Semantics (per control tick):
  - a chunk with any non-finite value is rejected whole (the policy is broken; `non_finite`);
  - actions whose tick already passed are dropped (`tick_passed`), and so are actions older than
    `max_action_age_s` measured from the capture stamp of the observation they answer (`stale_age`);
  - the executed action is clamped to the robot's limits (`clamped`) and its change from the previous
    executed action is limited to `max_delta_frac` x (high - low) per tick on every dim except
    `rate_exempt_dims` (the gripper: open/close commands are binary, `rate_limited`);
  - when the queue has no action for a tick the robot holds (`starved`); when nothing at all arrived from
    the controller for `watchdog_s` the queue is flushed and the robot holds (`watchdog`) until a new chunk
    arrives: a dead controller never leaves a long chunk executing open loop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

INTERVENTIONS = ("clamped", "rate_limited", "non_finite", "stale_age", "tick_passed", "starved", "watchdog",
                 "rejected_chunk")


@dataclass(frozen=True)
class SafetyConfig:
    """Safety limits of the robot agent (owned by the robot side, reported in the handshake)."""

    max_action_age_s: float = 0.5  # drop actions whose observation is older than this when they are due
    max_delta_frac: float | None = 0.5  # per-tick change limit as a fraction of (high - low); None: off
    rate_exempt_dims: tuple[int, ...] = (-1,)  # dims not rate limited (gripper)
    watchdog_periods: float = 2.0  # hold when nothing arrived from the controller for this many periods

    def __post_init__(self) -> None:
        if not self.max_action_age_s > 0:
            raise ValueError("max_action_age_s must be > 0")
        if self.max_delta_frac is not None and not self.max_delta_frac > 0:
            raise ValueError("max_delta_frac must be > 0 or None")
        if not self.watchdog_periods > 0:
            raise ValueError("watchdog_periods must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_exempt_dims"] = list(self.rate_exempt_dims)
        return d


class SafetyFilter:
    """Clamp + rate limit + counters. Stateful: remembers the last executed action for the rate limit."""

    def __init__(self, low: np.ndarray, high: np.ndarray, hold: np.ndarray, cfg: SafetyConfig = SafetyConfig()
                 ) -> None:
        self.low = np.asarray(low, np.float32)  # (A,)
        self.high = np.asarray(high, np.float32)  # (A,)
        self.hold_action = np.asarray(hold, np.float32)  # (A,)
        if not (self.low.shape == self.high.shape == self.hold_action.shape and self.low.ndim == 1):
            raise ValueError("low, high and hold must be (action_dim,) vectors")
        if np.any(self.low > self.high):
            raise ValueError("action limits: low > high")
        self.cfg = cfg
        a = self.low.shape[0]
        self.rate_mask = np.ones(a, bool)  # (A,) dims that are rate limited
        for d in cfg.rate_exempt_dims:
            if -a <= d < a:
                self.rate_mask[d] = False
        self.max_delta = None if cfg.max_delta_frac is None else (self.high - self.low) * np.float32(cfg.max_delta_frac)
        self.prev = self.hold_action.copy()
        self.counts: Counter[str] = Counter()

    def count(self, reason: str, n: int = 1) -> None:
        if reason not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {reason!r}")
        if n:
            self.counts[reason] += n

    def reset(self) -> None:
        """New episode (or after a hold): the rate limit starts from the hold action."""
        self.prev = self.hold_action.copy()

    def filter(self, action: np.ndarray) -> np.ndarray:
        """The action actually sent to the actuators for a (finite, right-shape) commanded `action`."""
        a = np.asarray(action, np.float32)
        c = np.clip(a, self.low, self.high)
        if not np.array_equal(c, a):
            self.count("clamped")
        if self.max_delta is not None:
            lo = np.where(self.rate_mask, self.prev - self.max_delta, self.low)
            hi = np.where(self.rate_mask, self.prev + self.max_delta, self.high)
            r = np.clip(c, lo, hi).astype(np.float32)
            if not np.array_equal(r, c):
                self.count("rate_limited")
            c = r
        self.prev = c.copy()
        return c

    def held(self) -> np.ndarray:
        """Record that the robot held this tick; the next action is rate limited from the hold action."""
        self.prev = self.hold_action.copy()
        return self.hold_action.copy()

    def summary(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in INTERVENTIONS}
