"""The action-chunk queue: actions keyed by the absolute control tick at which they are due.

Keying by tick (not by position) is what makes async inference correct: a chunk computed from an observation
at tick k and ready at tick k+d is aligned to the ticks its actions were meant for, actions already due are
dropped, and overlapping chunks are blended tick by tick.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

BlendMode = Literal["latest", "weighted"]


class ActionQueue:
    def __init__(self, blend: BlendMode = "latest", new_weight: float = 0.5) -> None:
        if blend not in ("latest", "weighted"):
            raise ValueError(f"blend must be 'latest' or 'weighted', got {blend!r}")
        if not 0.0 < new_weight <= 1.0:
            raise ValueError("new_weight must be in (0, 1]")
        self.blend = blend
        self.new_weight = new_weight
        self._actions: dict[int, np.ndarray] = {}

    def clear(self) -> None:
        self._actions.clear()

    def put(self, actions: np.ndarray, first_tick: int, now_tick: int) -> int:
        """Queue `actions` (H, A) for ticks first_tick.. ; drop those due before `now_tick`. Returns #dropped.

        Ticks beyond the new chunk's end keep old actions only in 'weighted' mode; 'latest' replaces the future
        from the new chunk's first tick on (the freshest plan wins). In both modes, queued actions for ticks
        before the new chunk's first tick stay: a chunk aligned to a future tick (future-state inference that
        landed early) must not leave the robot without actions until then.
        """
        dropped = 0
        new = {}
        for i, a in enumerate(np.asarray(actions, dtype=np.float32)):
            t = first_tick + i
            if t < now_tick:
                dropped += 1
                continue
            new[t] = a
        if self.blend == "latest":
            keep = {t: a for t, a in self._actions.items() if now_tick <= t < first_tick}
            self._actions = {**keep, **new}
        else:
            merged = {t: a for t, a in self._actions.items() if t >= now_tick}
            for t, a in new.items():
                old = merged.get(t)
                if old is None:
                    merged[t] = a
                else:
                    w = self.new_weight
                    b = w * a + (1 - w) * old
                    b[-1] = a[-1]  # gripper: the newest command, never an average of open/close
                    merged[t] = b
            self._actions = merged
        return dropped

    def pop(self, tick: int) -> np.ndarray | None:
        """The action due at `tick` (None if none is queued); forgets everything due earlier."""
        for t in [t for t in self._actions if t < tick]:
            del self._actions[t]
        return self._actions.pop(tick, None)

    def depth(self, tick: int) -> int:
        """Number of consecutive queued actions starting at `tick`."""
        n = 0
        while (tick + n) in self._actions:
            n += 1
        return n

    def pending(self, tick: int) -> np.ndarray:
        """The consecutive queued actions from `tick` on, (n, A) (for future-state roll-forward)."""
        n = self.depth(tick)
        if n == 0:
            return np.zeros((0, 0), np.float32)
        return np.stack([self._actions[tick + i] for i in range(n)])
