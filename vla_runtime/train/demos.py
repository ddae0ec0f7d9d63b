"""Demonstration files: one HDF5 file per successful episode, written atomically (tmp + rename).

One file per episode makes collection resumable and crash-safe (a killed writer leaves at most a `.tmp`
that is ignored and overwritten) and lets parallel workers write without a shared file lock.

Layout of `DIR/<task>__seed<seed>.hdf5` (task's '/' becomes '-'):
    attrs: format_version, env, task, instruction, seed, control_hz, action_dim, state_dim, cameras (json)
    actions          float32 (T, action_dim)   the action executed after observation t
    states           float32 (T, state_dim)
    images/<camera>  uint8   (T, H, W, 3)       upright, lzf-compressed
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path

import numpy as np

from vla_runtime.errors import UserError

FORMAT_VERSION = 1


@dataclass
class Demo:
    env: str
    task: str
    instruction: str
    seed: int
    actions: np.ndarray  # (T, A) float32
    states: np.ndarray  # (T, S) float32
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    control_hz: float = 20.0

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def demo_filename(task: str, seed: int) -> str:
    return f"{task.replace('/', '-')}__seed{seed}.hdf5"


def write_demo(out_dir: str | Path, demo: Demo) -> Path:
    import h5py

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = len(demo)
    if demo.states.shape[0] != T or any(v.shape[0] != T for v in demo.images.values()):
        raise ValueError("demo arrays must share their first (time) dimension")
    final = out_dir / demo_filename(demo.task, demo.seed)
    tmp = final.with_suffix(".hdf5.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format_version=FORMAT_VERSION, env=demo.env, task=demo.task, instruction=demo.instruction,
                       seed=demo.seed, control_hz=demo.control_hz, action_dim=demo.actions.shape[1],
                       state_dim=demo.states.shape[1], cameras=json.dumps(sorted(demo.images)))
        f.create_dataset("actions", data=demo.actions.astype(np.float32))
        f.create_dataset("states", data=demo.states.astype(np.float32))
        g = f.create_group("images")
        for cam, arr in demo.images.items():
            g.create_dataset(cam, data=arr.astype(np.uint8), compression="lzf", chunks=(1,) + arr.shape[1:])
    os.replace(tmp, final)
    return final


def read_demo(path: str | Path, cameras: list[str] | None = None, load_images: bool = True,
              image_frames: slice | None = None) -> Demo:
    """image_frames: read only these frames of each camera (the frames are stored one per chunk, so this skips the
    rest on disk); actions and states are always read whole."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            ver = int(f.attrs.get("format_version", -1))
            if ver != FORMAT_VERSION:
                raise UserError(f"{path}: demo format version {ver}, expected {FORMAT_VERSION}")
            cams = json.loads(f.attrs["cameras"])
            use = cams if cameras is None else cameras
            missing = [c for c in use if c not in cams]
            if missing:
                raise UserError(f"{path}: cameras {missing} not in demo (has {cams})")
            images = {c: np.asarray(f["images"][c][image_frames or slice(None)]) for c in use} if load_images else {}
            return Demo(env=str(f.attrs["env"]), task=str(f.attrs["task"]), instruction=str(f.attrs["instruction"]),
                        seed=int(f.attrs["seed"]), actions=np.asarray(f["actions"], np.float32),
                        states=np.asarray(f["states"], np.float32), images=images,
                        control_hz=float(f.attrs["control_hz"]))
    except UserError:
        raise
    except (OSError, KeyError) as e:
        raise UserError(f"cannot read demo file {path}: {e}") from None


def list_demos(data_dir: str | Path) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"demo directory {d} does not exist")
    files = sorted(p for p in d.glob("*.hdf5"))
    if not files:
        raise UserError(f"no demo files (*.hdf5) in {d}")
    return files


def recorded_seeds(data_dir: str | Path) -> set[tuple[str, int]]:
    """(task, seed) pairs already collected in `data_dir` (for resume)."""
    d = Path(data_dir)
    out = set()
    if d.is_dir():
        for p in d.glob("*.hdf5"):
            stem = p.name[: -len(".hdf5")]
            task, _, seed = stem.rpartition("__seed")
            if seed.isdigit():
                out.add((task.replace("-", "/"), int(seed)))
    return out


def write_dummy_demos(out_dir: str | Path, n: int, seed0: int = 0, image_size: int = 32, speed: float = 0.25,
                      max_steps: int | None = None, instructions: Sequence[str] = ()) -> list[Path]:
    """Synthetic demos from the simulator-free reach env and its expert (tests and pipeline development).

    speed scales the expert's motion (0.25: episodes last ~15-30 steps, longer than one 16-step chunk);
    max_steps cuts episodes short; instructions, when given, are used in turn (demo i gets instructions[i % len])
    instead of the env's own."""
    from vla_runtime.envs.base import EpisodeSpec
    from vla_runtime.envs.dummy import DummyReachEnv
    from vla_runtime.policies.scripted.reach import ReachExpert

    env = DummyReachEnv(image_size=image_size)
    expert = ReachExpert()
    paths = []
    for i in range(n):
        seed = seed0 + i
        obs = env.reset(EpisodeSpec(env="dummy:reach", task="reach", index=i, seed=seed))
        instruction = instructions[i % len(instructions)] if instructions else obs.instruction
        acts, states, imgs = [], [], {c: [] for c in env.spec.cameras}
        done = False
        while not done and (max_steps is None or len(acts) < max_steps):
            a = expert(obs)
            a[:3] *= speed
            acts.append(a)
            states.append(obs.state)
            for c in env.spec.cameras:
                imgs[c].append(obs.images[c])
            r = env.step(a)
            obs, done = r.obs, r.done
        paths.append(write_demo(out_dir, Demo(env="dummy:reach", task="reach", instruction=instruction, seed=seed,
                                              actions=np.stack(acts), states=np.stack(states),
                                              images={c: np.stack(v) for c, v in imgs.items()})))
    return paths
