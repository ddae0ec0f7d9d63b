"""Derive SpecPrune's controller thresholds from demonstration actions (reproducible numbers for the docs).

    python -m vla_runtime.policies.vla.specprune_stats --demos DIR            # demo HDF5 files (train/demos.py)
    python -m vla_runtime.policies.vla.specprune_stats --expert libero:libero_object --episodes 1

`--expert` runs the scripted expert without rendering (one episode per task and seed) and records the executed
actions, for when no demo directory is at hand. Prints the derived `ControllerConfig` and the statistics it came
from as JSON (`derive_controller_thresholds` documents the rule).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.specprune import derive_controller_thresholds


def demo_actions(data_dir: str | Path) -> list[np.ndarray]:
    from vla_runtime.train.demos import list_demos, read_demo

    files = list_demos(data_dir)
    if not files:
        raise UserError(f"no demo files in {data_dir}")
    return [read_demo(f, load_images=False).actions for f in files]


def expert_actions(env_name: str, episodes: int, seed: int = 0) -> list[np.ndarray]:
    """Executed actions of the scripted expert, `episodes` per task, no rendering."""
    from vla_runtime.envs import make_env
    from vla_runtime.policies import make_policy
    from vla_runtime.runtime.loop import LoopConfig, run_episode

    env = make_env(env_name, render=False)
    expert = make_policy("scripted", env_name=env_name)
    out: list[np.ndarray] = []

    class Recorder:
        spec = expert.spec

        def __init__(self) -> None:
            self.acts: list[np.ndarray] = []

        def reset(self, instruction: str) -> None:
            expert.reset(instruction)

        def act(self, obs):  # type: ignore[no-untyped-def]
            return expert.act(obs)

        def on_action(self, action: np.ndarray) -> bool:
            self.acts.append(np.asarray(action, np.float32))
            return False

    try:
        for spec in env.episode_specs(seed, episodes):
            rec = Recorder()
            r = run_episode(env, rec, spec, LoopConfig())
            if r.success:
                out.append(np.stack(rec.acts))
    finally:
        env.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--demos", help="directory of demo HDF5 files")
    g.add_argument("--expert", help="env name whose scripted expert to run (no rendering)")
    ap.add_argument("--episodes", type=int, default=1, help="expert episodes per task")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    eps = demo_actions(a.demos) if a.demos else expert_actions(a.expert, a.episodes, a.seed)
    cfg, stats = derive_controller_thresholds(eps)
    print(json.dumps({"source": a.demos or a.expert, "episodes": len(eps), "controller": asdict(cfg),
                      "stats": stats}, indent=1))


if __name__ == "__main__":
    main()
