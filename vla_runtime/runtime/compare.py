"""`vla-runtime compare`: paired comparison of runs on the same episodes.

Two evals of different methods on the same seeds / init states are *paired*: episode k of one run and episode k of
the other start from the same state, so most of the outcome variance (easy vs hard init states) is shared. Two
independent 95 % intervals (each ~25 pp wide at 50 episodes) hide that; the paired view shows it:

- the 2 x 2 table of outcomes on the common episodes (both succeed, only the baseline, only the method, neither);
- the exact McNemar test: under "no difference" each discordant episode is a fair coin, so
  p = P(|Binomial(b + c, 1/2) - (b + c)/2| >= |b - c|/2) (two-sided, exact, no continuity approximation);
- a 95 % interval for the paired difference in success rate, Newcombe's hybrid score method for paired data
  (Newcombe 1998, Statistics in Medicine 17:2635, method 10): the two Wilson intervals combined with the
  correlation between the paired outcomes (phi), so agreeing arms get a narrower interval than independent samples;
- the latency ratio over the same episodes' inferences (baseline p50 / method p50, wall and CPU).

A run is a directory with `episodes.jsonl` (what `vla-runtime eval --out` writes), a `bench.json` directory (each of
its methods' `<method>/episodes.jsonl` becomes a run), or an `episodes.jsonl` file. Episodes are matched by their
spec key (task | index | seed; the env must match, except that a `remote:` run pairs with any). Error records (an exception, no outcome) are left out of the pairs and
counted separately; resumed runs may hold a key twice, the last record wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vla_runtime.errors import UserError
from vla_runtime.runtime.metrics import percentiles, wilson_ci


@dataclass
class Run:
    name: str
    source: str
    episodes: dict[str, dict[str, Any]]  # key -> episode record
    errors: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def record_key(rec: dict[str, Any]) -> str:
    """The episode's spec key without the env name (task | index | seed), so a run over the bridge
    (env remote:...) pairs with the same episodes run in process; the envs themselves are checked separately."""
    from vla_runtime.envs.base import episode_key

    if rec.get("key"):
        return episode_key(str(rec["key"]))
    need = ("task", "index", "seed")
    if not all(k in rec for k in need):
        raise UserError(f"episode record without 'key' or {need}: {sorted(rec)[:8]}...")
    return f"{rec['task']}|{rec['index']}|{rec['seed']}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return out


def _run_from_records(name: str, source: Path, recs: list[dict[str, Any]]) -> Run:
    eps: dict[str, dict[str, Any]] = {}
    errors = 0
    for r in recs:
        if r.get("error") is not None or "success" not in r:
            errors += 1
            continue
        eps[record_key(r)] = r
    if not eps:
        raise UserError(f"{source}: no finished episodes")
    first = next(iter(eps.values()))
    return Run(name=name, source=str(source), episodes=eps, errors=errors,
               meta={"policy": first.get("policy"), "env": first.get("env")})


def load_runs(path: str | Path, name: str | None = None) -> list[Run]:
    """The run(s) stored at PATH (see the module doc). A bench directory gives one run per method."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".jsonl":
            raise UserError(f"{p}: expected an episodes.jsonl file or a run directory")
        return [_run_from_records(name or p.parent.name, p, _read_jsonl(p))]
    if not p.is_dir():
        raise UserError(f"{p}: no such run (a directory with episodes.jsonl or bench.json)")
    if (p / "episodes.jsonl").is_file():
        return [_run_from_records(name or p.name, p, _read_jsonl(p / "episodes.jsonl"))]
    if (p / "bench.json").is_file():
        try:
            doc = json.loads((p / "bench.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{p / 'bench.json'}: not JSON ({e.msg})") from None
        runs = []
        for m in doc.get("methods", []):
            f = p / str(m["name"]) / "episodes.jsonl"
            if f.is_file():
                runs.append(_run_from_records(f"{name + '/' if name else ''}{m['name']}", f, _read_jsonl(f)))
        if not runs:
            raise UserError(f"{p}: bench.json names no method with an episodes.jsonl beside it")
        base = doc.get("baseline")
        runs.sort(key=lambda r: r.name.split("/")[-1] != base)  # the bench's own baseline first
        return runs
    raise UserError(f"{p}: neither episodes.jsonl nor bench.json in this directory")


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only the baseline succeeds) and c (only the
    method): twice the smaller binomial tail of Binomial(b + c, 1/2), capped at 1. 1.0 when there are none."""
    if b < 0 or c < 0:
        raise ValueError("counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_diff_ci(both: int, only_a: int, only_b: int, neither: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % interval (in percentage points) for p_b - p_a on paired binary outcomes, Newcombe's method 10.

    p_a = (both + only_a) / n, p_b = (both + only_b) / n; (l, u) their Wilson intervals; phi the phi coefficient
    of the 2 x 2 table with Newcombe's correction of its numerator x = both * neither - only_a * only_b (x - n/2
    when x > n/2, 0 when 0 <= x <= n/2, x when negative; phi = 0 when a margin is empty). With d = p_b - p_a:
      lower = d - sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)
      upper = d + sqrt((u_b - p_b)^2 - 2 phi (u_b - p_b)(p_a - l_a) + (p_a - l_a)^2)
    """
    n = both + only_a + only_b + neither
    if n <= 0:
        return (-100.0, 100.0)
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = (x / 100.0 for x in wilson_ci(both + only_a, n, z))
    lb, ub = (x / 100.0 for x in wilson_ci(both + only_b, n, z))
    # margins of the table: A success / failure, B success / failure
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    x = both * neither - only_a * only_b
    x = x - n / 2 if x > n / 2 else (x if x < 0 else 0.0)
    phi = x / math.sqrt(den) if den > 0 else 0.0
    d = pb - pa
    lo = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    hi = d + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return (100.0 * max(-1.0, lo), 100.0 * min(1.0, hi))


def paired_stats(a: Sequence[bool | int], b: Sequence[bool | int]) -> dict[str, Any]:
    """The paired summary of two outcome lists (bools or 0/1) over the same episodes (a = baseline, b = method)."""
    if len(a) != len(b):
        raise ValueError("paired outcomes need equal lengths")
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = len(a) - both - only_a - only_b
    n = len(a)
    lo, hi = paired_diff_ci(both, only_a, only_b, neither)
    return {"n": n, "both": both, "only_baseline": only_a, "only_method": only_b, "neither": neither,
            "diff_pp": round(100.0 * (only_b - only_a) / n, 2) if n else 0.0,
            "diff_ci95": [round(lo, 2), round(hi, 2)], "mcnemar_p": round(mcnemar_exact_p(only_a, only_b), 4)}


def _latency(recs: list[dict[str, Any]], key: str) -> float | None:
    return percentiles([x for r in recs for x in (r.get(key) or [])])["p50"]


def compare_runs(runs: list[Run], baseline: str | None = None) -> dict[str, Any]:
    """Pair every run with the baseline (default: the first) over the episodes both have."""
    if len(runs) < 2:
        raise UserError("compare needs at least two runs (a baseline and a method)")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"run names must differ, got {names} (name them with NAME=PATH)")
    base = runs[0] if baseline is None else next((r for r in runs if r.name == baseline), None)
    if base is None:
        raise UserError(f"baseline {baseline!r} is not one of the runs {names}")
    rows = []
    for r in runs:
        ea, eb = str(base.meta.get("env")), str(r.meta.get("env"))
        if ea != eb and not (ea.startswith("remote:") or eb.startswith("remote:")):
            raise UserError(f"{r.name} ran on {eb}, the baseline {base.name} on {ea}: compare runs of one env")
        common = sorted(set(base.episodes) & set(r.episodes))
        if not common:
            sample = next(iter(r.episodes))
            raise UserError(f"{r.name} shares no episode with the baseline {base.name} (keys such as {sample!r} vs "
                            f"{next(iter(base.episodes))!r}): compare runs of the same env, seeds and init states")
        ra = [base.episodes[k] for k in common]
        rb = [r.episodes[k] for k in common]
        sa, sb = [bool(x["success"]) for x in ra], [bool(x["success"]) for x in rb]
        succ = sum(sb)
        lat_a, lat_b = _latency(ra, "inference_ms"), _latency(rb, "inference_ms")
        cpu_a, cpu_b = _latency(ra, "inference_cpu_ms"), _latency(rb, "inference_cpu_ms")
        row: dict[str, Any] = {
            "name": r.name, "source": r.source, "policy": r.meta.get("policy"), "episodes": len(r.episodes),
            "errors": r.errors, "paired_episodes": len(common), "successes": succ,
            "success_pct": round(100.0 * succ / len(common), 2),
            "success_ci95": [round(x, 2) for x in wilson_ci(succ, len(common))],
            "latency_ms_p50": None if lat_b is None else round(lat_b, 3),
            "cpu_ms_p50": None if cpu_b is None else round(cpu_b, 3),
            "ratio_to_baseline": round(lat_a / lat_b, 3) if lat_a and lat_b else None,
            "cpu_ratio_to_baseline": round(cpu_a / cpu_b, 3) if cpu_a and cpu_b else None,
        }
        if r is not base:
            row["paired"] = paired_stats(sa, sb)
        per_task: dict[str, list[int]] = {}
        for rec in rb:  # [successes, episodes] per task, over the paired episodes
            t = per_task.setdefault(str(rec.get("task")), [0, 0])
            t[0] += bool(rec["success"])
            t[1] += 1
        row["per_task"] = per_task
        rows.append(row)
    return {"baseline": base.name, "runs": rows}


def format_per_task(report: dict[str, Any]) -> str:
    """Successes per task (over the paired episodes), one column per run."""
    tasks = sorted({t for r in report["runs"] for t in r["per_task"]})
    head = ("task",) + tuple(r["name"] for r in report["runs"])
    rows = [head] + [(t,) + tuple("{}/{}".format(*r["per_task"][t]) if t in r["per_task"] else "-"
                                  for r in report["runs"]) for t in tasks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def format_compare(report: dict[str, Any]) -> str:
    head = ("run", "paired", "success", "95% CI", "vs base (pp)", "paired 95% CI", "b/c", "McNemar p", "p50 ms",
            "ratio", "cpu ratio")
    rows = [head]
    f = lambda x, s="": "-" if x is None else f"{x:.2f}{s}"  # noqa: E731
    for r in report["runs"]:
        p = r.get("paired")
        rows.append((r["name"], str(r["paired_episodes"]), f"{r['successes']} ({r['success_pct']:.1f} %)",
                     f"[{r['success_ci95'][0]:.0f}, {r['success_ci95'][1]:.0f}]",
                     "baseline" if p is None else f"{p['diff_pp']:+.1f}",
                     "" if p is None else f"[{p['diff_ci95'][0]:+.0f}, {p['diff_ci95'][1]:+.0f}]",
                     "" if p is None else f"{p['only_baseline']}/{p['only_method']}",
                     "" if p is None else f"{p['mcnemar_p']:.3f}",
                     "-" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']:.1f}",
                     f(r["ratio_to_baseline"], "x"), f(r["cpu_ratio_to_baseline"], "x")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return (f"paired comparison against {report['baseline']} (b/c = episodes only the baseline / only the run "
            f"solved)\n" + "\n".join(lines))


def parse_run_arg(arg: str) -> tuple[str | None, str]:
    """'NAME=PATH' or 'PATH'."""
    if "=" in arg and not Path(arg).exists():
        name, path = arg.split("=", 1)
        if not name:
            raise UserError(f"empty run name in {arg!r}")
        return name, path
    return None, arg


def compare_paths(args: Sequence[str], baseline: str | None = None, out: Path | None = None) -> dict[str, Any]:
    runs: list[Run] = []
    for a in args:
        name, path = parse_run_arg(a)
        for r in load_runs(path, name):
            same = next((x for x in runs if x.name == r.name), None)
            if same is None or name is None:
                runs.append(r)
                continue
            # NAME=PATH given again: one arm evaluated in parts (e.g. init states 0-4 and 5-9)
            dup = set(same.episodes) & set(r.episodes)
            if dup:
                raise UserError(f"{r.name}: {r.source} repeats {len(dup)} episode(s) of {same.source} "
                                f"(e.g. {sorted(dup)[0]!r})")
            same.episodes.update(r.episodes)
            same.errors += r.errors
            same.source += f",{r.source}"
    report = compare_runs(runs, baseline)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report
