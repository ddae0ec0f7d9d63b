"""Expert for the dummy reach env: proportional control toward the target."""

from __future__ import annotations

import numpy as np

from vla_runtime.envs.dummy import STEP_M
from vla_runtime.runtime.types import Observation


class ReachExpert:
    def __call__(self, obs: Observation) -> np.ndarray:
        d = (obs.privileged["target_pos"] - obs.privileged["eef_pos"]) / STEP_M
        a = np.zeros(7, np.float32)
        a[:3] = np.clip(d, -1, 1)
        a[6] = -1.0
        return a
