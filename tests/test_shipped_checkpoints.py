"""Every checkpoint shipped in the package loads from a fresh install, fits the size budget and acts."""

from __future__ import annotations

import numpy as np
import pytest

from vla_runtime.policies import list_policies, make_policy, shipped_checkpoints
from vla_runtime.runtime.types import Observation

SHIPPED = [p for p in list_policies() if p != "scripted"]
MAX_BYTES = 25 * 1024 * 1024


def test_something_is_shipped_of_each_kind() -> None:
    kinds = {p.split(":")[0] for p in SHIPPED}
    assert {"vla", "diffusion"} <= kinds


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_loads_and_acts(name: str) -> None:
    path = shipped_checkpoints()[name.split(":", 1)[1]]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < MAX_BYTES, f"{name}: {size / 2**20:.1f} MB"
    assert not (path / "train_state.safetensors").exists()  # optimizer state is never shipped
    policy = make_policy(name)
    s = policy.spec
    rng = np.random.default_rng(0)
    obs = Observation(images={c: rng.integers(0, 255, (s.image_size, s.image_size, 3), dtype=np.uint8)
                              for c in s.cameras},
                      state=np.zeros(s.state_dim, np.float32), instruction="pick up the object", stamp=0.0, step=0)
    policy.reset(obs.instruction)
    chunk = policy.act(obs)
    assert chunk.actions.shape == (s.chunk_size, s.action_dim) and chunk.actions.dtype == np.float32
    assert np.isfinite(chunk.actions).all()


def _specprune_settings(name: str) -> dict:
    """The checkpoint's `extra.specprune` as the runtime reads it (VLAConfig), {} when it has none."""
    from vla_runtime.policies.vla.configuration import VLAConfig

    cfg = VLAConfig.load(shipped_checkpoints()[name.split(":", 1)[1]] / "config.json")
    return dict((cfg.extra or {}).get("specprune") or {})


TUNED = [n for n in SHIPPED if n.startswith("vla:") and _specprune_settings(n)]


@pytest.mark.parametrize("name", TUNED)
def test_shipped_specprune_settings_are_used_by_accel_specprune(name: str) -> None:
    """A VLA shipped with its own SpecPrune settings (config extra.specprune) gets them from `--accel specprune`
    with no options, and they are valid SpecPrune options."""
    want = _specprune_settings(name)
    policy = make_policy(name, accel=("specprune",))
    cfg = policy.pruner.cfg  # type: ignore[attr-defined]
    for k, v in want.items():
        if k != "note":
            assert getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v), k
