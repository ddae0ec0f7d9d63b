"""Check that eval runs reached the same outcomes on the same episode specs (config differences are listed).

    python scripts/compare_evals.py RUN_A RUN_B [RUN_C ...]     # directories holding eval_info.json

Compares success and steps per episode spec (task, index, seed / init state) on the specs both runs hold (a
run may be a subset, e.g. 2 of the 5 episodes per task); exits 1 on any difference and lists the first few.
A different config hash is reported with the differing config fields (a run made by an older version may
carry fewer loop fields: its outcomes can still be compared). Used for issue 8's single-process vs --workers
vs --ray runs and the bridge vs in-process runs of issue 7 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vla_runtime.envs.base import episode_key


def outcomes(run: Path) -> tuple[str, list[tuple[str, bool, int]], dict]:
    info = json.loads((run / "eval_info.json").read_text())
    # the key is env|task|index|seed: the env part is left out so a remote:tcp://... run (the same env behind the
    # bridge) compares with the in-process one; a different env shows in the config difference
    return info["config_hash"], [(episode_key(e["key"]), bool(e["success"]), int(e["steps"]))
                                 for e in info["per_episode"]], info


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} vs {y!r}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    ref_hash, ref, ref_info = outcomes(Path(argv[0]))
    mine = {k: (success, steps) for k, success, steps in ref}
    ok = True
    for other in argv[1:]:
        h, eps, info = outcomes(Path(other))
        theirs = {k: (success, steps) for k, success, steps in eps}
        shared = [k for k in mine if k in theirs]
        diffs = [((k, *mine[k]), (k, *theirs[k])) for k in shared if mine[k] != theirs[k]]
        same = bool(shared) and not diffs
        par = info.get("parallel") or {}
        print(f"{other}: {len(eps)} episodes, {sum(s for _, s, _ in eps)} successes, config {h}, "
              f"workers={par.get('workers', 1)} ray={par.get('ray')}: {'SAME' if same else 'DIFFERENT'} outcomes as "
              f"{argv[0]} on the {len(shared)} shared specs ({len(eps) - len(shared)} not in it)")
        if h != ref_hash:
            print(f"   config hash differs ({ref_hash} vs {h}): " + "; ".join(config_diff(ref_info["config"], info["config"])))
        for a, b in diffs[:5]:
            print(f"   {a} != {b}")
        ok &= same
    print(f"{argv[0]}: {len(ref)} episodes, {sum(s for _, s, _ in ref)} successes, config {ref_hash}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
