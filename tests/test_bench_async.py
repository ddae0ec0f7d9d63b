"""`bench async` options: arm subsets, a shared execution horizon, and one bench.json with the reaction ratios."""

import json

import pytest

from vla_runtime.errors import UserError
from vla_runtime.runtime.bench import bench_async


def test_bench_async_subset_and_horizon_write_one_report(tmp_path):
    rep = bench_async("dummy:reach", "scripted", episodes=1, seed=3, out=tmp_path, n_action_steps=4,
                      arms=["async-back-to-back"])
    names = [m["name"] for m in rep["methods"]]
    assert names == ["sync", "async-back-to-back"]  # sync is always the baseline
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    for m in on_disk["methods"]:
        assert m["loop"]["n_action_steps"] == 4
        assert m["reaction_ratio_to_sync"] is not None  # written by the finalize hook, not a second write
    sync = next(m for m in on_disk["methods"] if m["name"] == "sync")
    assert sync["reaction_ratio_to_sync"] == 1.0


@pytest.mark.parametrize("kw,msg", [({"arms": ["async", "bogus"]}, "unknown async arm"),
                                    ({"n_action_steps": 0}, "--n-action-steps must be >= 1")])
def test_bench_async_rejects_bad_options(tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        bench_async("dummy:reach", "scripted", episodes=1, seed=0, out=tmp_path, **kw)
    assert not (tmp_path / "bench.json").exists()
