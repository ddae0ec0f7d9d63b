"""Paired comparison of runs (`vla-runtime compare`, bench.json's `paired` fields)."""

from __future__ import annotations

import json
import random

import pytest

from vla_runtime.cli import main
from vla_runtime.runtime.compare import mcnemar_exact_p, paired_diff_ci, paired_stats


def test_mcnemar_exact_matches_the_binomial_test():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(5, 0) == mcnemar_exact_p(0, 5)
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(8, 13), (8, 15), (1, 9), (20, 4), (0, 1), (12, 12)]:
        assert mcnemar_exact_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, abs=1e-12)


def test_paired_ci_matches_a_published_value():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: the paired table
    [[59, 6], [16, 80]] has the Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046) for p_1+ - p_+1
    (the value the authors' `contingencytables` R package reproduces in its tests)."""
    lo, hi = paired_diff_ci(both=59, only_a=16, only_b=6, neither=80)
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (-0.1186, -0.0046)


def test_paired_ci_contains_the_estimate_and_flips_with_the_arms():
    for table in [(30, 8, 13, 49), (0, 0, 20, 0), (45, 0, 0, 5), (10, 5, 5, 30), (0, 3, 0, 47)]:
        both, a, b, neither = table
        n = sum(table)
        lo, hi = paired_diff_ci(*table)
        d = 100.0 * (b - a) / n
        assert -100.0 <= lo <= d <= hi <= 100.0
        lo2, hi2 = paired_diff_ci(both, b, a, neither)  # arms swapped: the interval of -d
        assert (lo2, hi2) == pytest.approx((-hi, -lo))
    lo, hi = paired_diff_ci(0, 0, 20, 0)  # every episode only the method solved
    assert lo > 50.0


def test_paired_ci_is_narrower_than_independent_samples_when_the_arms_agree():
    """35 shared successes and 4 discordant pairs out of 50: the paired interval must be much tighter than the
    unpaired Newcombe interval of the same two rates (phi = 0)."""
    from vla_runtime.runtime.metrics import wilson_ci

    lo, hi = paired_diff_ci(35, 2, 2, 11)
    la, ua = (x / 100 for x in wilson_ci(37, 50))
    p = 37 / 50
    unpaired_half = 100 * ((p - la) ** 2 + (ua - p) ** 2) ** 0.5
    assert hi - lo < 0.6 * 2 * unpaired_half
    assert lo < 0.0 < hi


def test_paired_ci_covers_the_true_difference():
    """Monte Carlo: correlated paired outcomes (a shared per-episode difficulty), 50 pairs; the 95 % interval must
    cover the true difference in at least ~93 % of draws (a wrong sign on the correlation term fails this)."""
    rng = random.Random(0)
    for pa, pb, shared in [(0.7, 0.76, 0.8), (0.5, 0.5, 0.6), (0.85, 0.7, 0.9)]:
        covered, trials = 0, 1500
        true = 100 * (pb - pa)
        for _ in range(trials):
            both = a_only = b_only = neither = 0
            for _ in range(50):
                u = rng.random()
                x = (u if rng.random() < shared else rng.random()) < pa
                y = (u if rng.random() < shared else rng.random()) < pb
                both += x and y
                a_only += x and not y
                b_only += y and not x
                neither += not x and not y
            lo, hi = paired_diff_ci(both, a_only, b_only, neither)
            covered += lo <= true <= hi
        assert covered / trials >= 0.93, (pa, pb, shared, covered / trials)


def test_paired_stats_counts():
    s = paired_stats([True, True, False, False, True], [True, False, True, False, True])
    assert (s["n"], s["both"], s["only_baseline"], s["only_method"], s["neither"]) == (5, 2, 1, 1, 1)
    assert s["diff_pp"] == 0.0 and s["mcnemar_p"] == 1.0
    with pytest.raises(ValueError):
        paired_stats([True], [True, False])


def _write_run(d, outcomes, env="dummy:reach", seed0=0, extra=None):
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ok in enumerate(outcomes):
        rec = {"env": env, "task": "reach", "seed": seed0 + i, "init_state": None, "success": ok,
               "inference_ms": [10.0 if extra is None else extra], "inference_cpu_ms": [9.0],
               "index": i, "key": f"{env}|reach|{i}|{seed0 + i}", "policy": "p"}
        lines.append(json.dumps(rec))
    (d / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_compare_cli_pairs_runs_merges_parts_and_reads_benches(tmp_path, capsys):
    base = _write_run(tmp_path / "base", [True, True, False, False, True, False])
    meth = _write_run(tmp_path / "meth", [True, True, True, True, True, False], extra=5.0)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(base), str(meth), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    row = rep["runs"][1]
    assert rep["baseline"] == "base" and row["name"] == "meth"
    assert row["paired"]["only_method"] == 2 and row["paired"]["only_baseline"] == 0
    assert row["paired"]["mcnemar_p"] == pytest.approx(0.5)
    assert row["ratio_to_baseline"] == pytest.approx(2.0)
    assert "McNemar" in capsys.readouterr().out
    assert row["per_task"] == {"reach": [5, 6]}
    assert main(["compare", str(base), str(meth), "--per-task"]) == 0
    assert "reach  3/6   5/6" in capsys.readouterr().out

    # one arm in two parts (different seeds), named twice: merged into one 6 + 6 episode arm
    _write_run(tmp_path / "base2", [False] * 6, seed0=6)
    _write_run(tmp_path / "meth2", [True] * 6, seed0=6)
    assert main(["compare", f"b={base}", f"b={tmp_path / 'base2'}", f"m={meth}", f"m={tmp_path / 'meth2'}",
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())["runs"][1]
    assert row["paired_episodes"] == 12 and row["paired"]["only_method"] == 8
    # the same part twice is a mistake, not a double count
    assert main(["compare", f"b={base}", f"b={base}", f"m={meth}"]) == 2
    assert "repeats" in capsys.readouterr().err

    # runs on different envs: a clear error; other seeds of the same env share no episode: another
    other = _write_run(tmp_path / "other", [True] * 6, env="robosuite:Lift")
    assert main(["compare", str(base), str(other)]) == 2
    assert "compare runs of one env" in capsys.readouterr().err
    assert main(["compare", str(base), str(tmp_path / "meth2")]) == 2
    assert "shares no episode" in capsys.readouterr().err
    # the same episodes behind the bridge (env remote:...) pair with the in-process run
    remote = _write_run(tmp_path / "remote", [True] * 6, env="remote:tcp://127.0.0.1:5555")
    assert main(["compare", str(base), str(remote), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][1]["paired_episodes"] == 6
    assert main(["compare", str(tmp_path / "missing"), str(base)]) == 2

    # a bench directory: each method with an episodes.jsonl becomes a run, the bench's baseline first
    bench = tmp_path / "bench"
    _write_run(bench / "slow", [True, False, True, False, True, False])
    _write_run(bench / "fast", [True, True, True, False, True, False])
    (bench / "bench.json").write_text(json.dumps({"baseline": "slow", "methods": [{"name": "fast"},
                                                                                   {"name": "slow"}]}))
    assert main(["compare", str(bench), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["baseline"] == "slow" and rep["runs"][1]["paired"]["only_method"] == 1


def test_bench_reports_paired_outcomes(tmp_path):
    """compare_methods keeps each arm's outcomes in spec order and pairs every arm with the baseline."""
    from vla_runtime.runtime.bench import Method, compare_methods

    rep = compare_methods("t", "dummy:reach", [Method("a", "scripted"), Method("b", "scripted")], 3, 0, tmp_path,
                          baseline="a", progress=False)
    assert len(rep["outcomes"]["a"]) == len(rep["outcomes"]["b"]) == len(rep["episode_keys"]) == rep["episodes"]
    rows = {r["name"]: r for r in rep["methods"]}
    assert "paired" not in rows["a"]
    p = rows["b"]["paired"]
    assert p["n"] == rep["episodes"] and p["only_baseline"] + p["only_method"] + p["both"] + p["neither"] == p["n"]
    # the same scripted policy on the same specs: every pair agrees
    assert p["only_baseline"] == p["only_method"] == 0 and p["mcnemar_p"] == 1.0
    assert json.loads((tmp_path / "bench.json").read_text())["outcomes"] == rep["outcomes"]
