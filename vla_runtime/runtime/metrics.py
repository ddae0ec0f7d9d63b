"""Statistics for evaluation reports: Wilson intervals and latency percentiles."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def wilson_ci(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval for a binomial proportion, in percent. (0, 100) when n == 0."""
    if n <= 0:
        return (0.0, 100.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


def percentiles(values: Iterable[float], qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {_pname(q): None for q in qs}
    return {_pname(q): float(np.percentile(v, q)) for q in qs}


def _pname(q: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99_9'."""
    return "p" + f"{q:g}".replace(".", "_")


def summarize_latency(values: Iterable[float], prefix: str) -> dict[str, float | None]:
    v = list(values)
    out = {f"{prefix}_{k}": x for k, x in percentiles(v).items()}
    out[f"{prefix}_mean"] = float(np.mean(v)) if v else None
    return out
