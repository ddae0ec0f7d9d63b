"""Demo files: round trip, atomic writes, resume bookkeeping, clear errors for unreadable files."""

from __future__ import annotations

import numpy as np
import pytest

from vla_runtime.errors import UserError
from vla_runtime.train.demos import Demo, list_demos, read_demo, recorded_seeds, write_demo


def _demo(task="libero_object/3", seed=100007, T=5):
    rng = np.random.default_rng(0)
    return Demo(env="libero:libero_object", task=task, instruction="pick up the soup", seed=seed,
                actions=rng.normal(size=(T, 7)).astype(np.float32), states=rng.normal(size=(T, 8)).astype(np.float32),
                images={"agentview": rng.integers(0, 255, (T, 16, 16, 3), dtype=np.uint8),
                        "wrist": rng.integers(0, 255, (T, 16, 16, 3), dtype=np.uint8)})


def test_round_trip(tmp_path):
    d = _demo()
    p = write_demo(tmp_path, d)
    assert p.name == "libero_object-3__seed100007.hdf5"
    assert not list(tmp_path.glob("*.tmp"))
    r = read_demo(p)
    assert r.task == d.task and r.seed == d.seed and r.instruction == d.instruction and len(r) == 5
    np.testing.assert_array_equal(r.actions, d.actions)
    np.testing.assert_array_equal(r.images["wrist"], d.images["wrist"])
    only = read_demo(p, cameras=["agentview"])
    assert list(only.images) == ["agentview"]
    assert recorded_seeds(tmp_path) == {("libero_object/3", 100007)}


def test_mismatched_lengths_rejected(tmp_path):
    d = _demo()
    d.states = d.states[:3]
    with pytest.raises(ValueError):
        write_demo(tmp_path, d)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unreadable_and_missing(tmp_path):
    bad = tmp_path / "junk__seed1.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(UserError, match="cannot read demo file"):
        read_demo(bad)
    with pytest.raises(UserError, match="does not exist"):
        list_demos(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no demo files"):
        list_demos(empty)
    p = write_demo(tmp_path / "ok", _demo())
    with pytest.raises(UserError, match="cameras"):
        read_demo(p, cameras=["left"])


def test_video_written_with_outcome_in_name(tmp_path):
    from vla_runtime.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "--env", "dummy:reach", "--policy", "scripted", "--episodes", "2", "--video", "1", "--out", str(out)]) == 0
    vids = sorted((out / "videos").glob("*.mp4"))
    assert [v.name for v in vids] == ["reach__seed0__success.mp4"]
    import imageio.v2 as imageio

    frames = imageio.mimread(vids[0])
    assert len(frames) > 1 and frames[0].shape[2] == 3


def test_collect_dummy_resumable(tmp_path):
    from vla_runtime.train.collect import CollectConfig, collect

    cfg = CollectConfig(env="dummy:reach", episodes=3, out=tmp_path, seed=100, image_size=16)
    res = collect(cfg, progress=False)
    assert res["demos"] == {"reach": 3}
    files = list_demos(tmp_path)
    assert len(files) >= 3
    d = read_demo(files[0])
    assert d.actions.shape[1] == 7 and d.images["agentview"].shape[1:] == (16, 16, 3)
    # resume: nothing more to do, no file rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    res2 = collect(CollectConfig(env="dummy:reach", episodes=3, out=tmp_path, seed=100, image_size=16), progress=False)
    assert res2["demos"] == {"reach": 3}
    assert {p: p.stat().st_mtime_ns for p in list_demos(tmp_path)} == mtimes
