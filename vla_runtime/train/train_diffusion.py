"""Train the visuomotor diffusion policy (denoiser + encoders + STEP predictor) on demo HDF5 files.

    python -m vla_runtime.train.train_diffusion --data-dir /work/data/lift --out-dir /work/ckpt/diffusion_lift \
        --steps 20000 --batch-size 64

Resumable: `out_dir` holds the inference checkpoint (config.json + model.safetensors, EMA weights, fp16) and
the training state (train_state.safetensors: raw weights, EMA, AdamW moments, RNG; train_state.json: step),
all written atomically every `save_every` steps; running again continues from the last save. The loss log is
`out_dir/loss_log.jsonl` (one JSON object per `log_every` steps).

Samples: frame t of a demo gives observation frames t - stride*j (clamped to the episode start), the action
chunk t..t+H-1 (clamped to the last action: padding at the episode end) and, for the STEP predictor, the chunk
the policy would have produced n = n_action_steps steps earlier (ground truth t-n..t-n+H-1), shifted by the n
executed steps, with noise augmentation. The predictor is trained jointly on *detached* encoder features, so
the denoiser and encoder train exactly as without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vla_runtime.errors import UserError
from vla_runtime.policies.diffusion.configuration import DiffusionConfig, ModelConfig, TrainConfig
from vla_runtime.policies.diffusion.modeling import DiffusionModel, count_params, random_crop, resize_image, shift_chunk
from vla_runtime.policies.diffusion.policy import _atomic_write_bytes, save_checkpoint
from vla_runtime.policies.diffusion.samplers import NoiseSchedule
from vla_runtime.train.demos import list_demos, read_demo

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"
LOG_FILE = "loss_log.jsonl"


# ---------------------------------------------------------------------------- data


@dataclass
class DemoDataset:
    """All demos concatenated: frame arrays plus each frame's episode [start, end) for clamped indexing."""

    images: torch.Tensor  # uint8 (N, Ncam, 3, r, r), resized once
    states: torch.Tensor  # float32 (N, S) raw
    actions: torch.Tensor  # float32 (N, A) raw
    ep_start: torch.Tensor  # long (N,)
    ep_end: torch.Tensor  # long (N,) exclusive
    seeds: list[int]
    env: str
    task: str
    image_size: int

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def load_demos(data_dir: str | Path | list[str | Path], cameras: tuple[str, ...], resize_to: int,
               max_demos: int | None = None) -> DemoDataset:
    """Load every demo of one directory or a list of directories (frames resized once to resize_to)."""
    dirs = data_dir if isinstance(data_dir, (list, tuple)) else [data_dir]
    files = [f for d in dirs for f in list_demos(d)]
    if max_demos is not None:
        files = files[:max_demos]
    imgs, states, actions, starts, ends, seeds = [], [], [], [], [], []
    env = task = ""
    image_size = 0
    n = 0
    for p in files:
        d = read_demo(p, cameras=list(cameras))
        T = len(d)
        if T == 0:
            continue
        env, task = d.env, d.task
        image_size = int(d.images[cameras[0]].shape[1])
        per_cam = [np.stack([resize_image(f, resize_to) for f in d.images[c]]) for c in cameras]  # (T, r, r, 3)
        imgs.append(torch.from_numpy(np.stack(per_cam, 1)).permute(0, 1, 4, 2, 3).contiguous())  # (T, Nc, 3, r, r)
        states.append(torch.from_numpy(d.states))
        actions.append(torch.from_numpy(d.actions))
        starts.append(torch.full((T,), n, dtype=torch.long))
        ends.append(torch.full((T,), n + T, dtype=torch.long))
        seeds.append(d.seed)
        n += T
    if n == 0:
        raise UserError(f"{data_dir}: demos are all empty")
    return DemoDataset(torch.cat(imgs), torch.cat(states), torch.cat(actions), torch.cat(starts), torch.cat(ends),
                       seeds, env, task, image_size)


def minmax_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dim min/max; a constant dim v gets [v-1, v+1] so it normalises to exactly 0 (no division by 0)."""
    lo, hi = x.min(0).values.float(), x.max(0).values.float()
    const = (hi - lo) < 1e-4
    return torch.where(const, lo - 1, lo), torch.where(const, hi + 1, hi)


def chunk_indices(t: torch.Tensor, start: torch.Tensor, end: torch.Tensor, offset: int, horizon: int) -> torch.Tensor:
    """(B,) frame indices -> (B, horizon) indices t+offset+h clamped to the episode [start, end-1]."""
    idx = t[:, None] + offset + torch.arange(horizon)[None]
    return torch.maximum(torch.minimum(idx, end[:, None] - 1), start[:, None])


def predictor_input(actions: torch.Tensor, t: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                    n_exec: torch.Tensor, horizon: int) -> torch.Tensor:
    """The previous chunk the policy would have produced at t - n (ground truth t-n..t-n+H-1, clamped to the
    episode), shifted by its n executed steps: (B, H, A). Matches `DiffusionPolicy`'s run-time input."""
    out = []
    for i in range(t.shape[0]):
        n = int(n_exec[i])
        idx = chunk_indices(t[i:i + 1], start[i:i + 1], end[i:i + 1], -n, horizon)  # (1, H)
        out.append(shift_chunk(actions[idx], n))
    return torch.cat(out)


def make_batch(ds: DemoDataset, cfg: ModelConfig, idx: torch.Tensor, gen: torch.Generator,
               crop: bool = True, n_exec: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Raw (unnormalised) batch for frame indices idx (B,)."""
    start, end = ds.ep_start[idx], ds.ep_end[idx]
    obs_idx = torch.stack([torch.maximum(idx - cfg.obs_stride * j, start) for j in range(cfg.obs_horizon - 1, -1, -1)], 1)
    imgs = ds.images[obs_idx]  # (B, To, Nc, 3, r, r)
    if crop:
        imgs = random_crop(imgs, cfg.crop_size, gen)
    else:
        h = imgs.shape[-1]
        o = (h - cfg.crop_size) // 2
        imgs = imgs[..., o:o + cfg.crop_size, o:o + cfg.crop_size]
    act_idx = chunk_indices(idx, start, end, 0, cfg.horizon)
    if n_exec is None:
        n_exec = torch.full_like(idx, cfg.n_action_steps)
    return {"images": imgs, "states": ds.states[obs_idx], "actions": ds.actions[act_idx],
            "prev": predictor_input(ds.actions, idx, start, end, n_exec, cfg.horizon),
            "n_exec": n_exec, "has_prev": (idx - n_exec >= start)}


# ---------------------------------------------------------------------------- state I/O


def _flatten_state(model: DiffusionModel, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                   gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(v).float().reshape(-1) if name == "step" else v.contiguous()
    tensors["rng.torch"] = gen.get_state()
    return tensors, {"param_groups": osd["param_groups"]}


def _load_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: DiffusionModel,
                ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng.torch"])


def _lr_factor(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    prog = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


# ---------------------------------------------------------------------------- training


def train_diffusion(data_dir: str | Path | list[str | Path], out_dir: str | Path, steps: int = 20000, batch_size: int = 64,
                    resume: bool = True, model_cfg: ModelConfig | None = None, progress: bool = True,
                    init_from: str | Path | None = None, **train_overrides: Any) -> dict[str, Any]:
    """Train (or resume) and write checkpoints to out_dir. Returns a summary (final losses, samples/s).

    init_from: a (shipped) checkpoint directory to fine-tune from when out_dir holds no training state: its
    weights (the EMA it ships) start both the raw and the EMA weights, and its architecture and normalisation
    statistics are kept (recomputing them would shift what the network has learned); the optimiser starts fresh.
    Ignored when resuming."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_json = out / STATE_JSON
    resuming = resume and state_json.is_file() and (out / STATE_FILE).is_file()
    if resuming:
        cfg = DiffusionConfig.from_dict(json.loads((out / "config.json").read_text()))
        cfg.train = TrainConfig(**{**cfg.train.__dict__, "steps": steps, **train_overrides})
    else:
        tc = TrainConfig(steps=steps, batch_size=batch_size, **train_overrides)
        cfg = DiffusionConfig(model=model_cfg or ModelConfig(), train=tc)
    init_model = None
    if init_from is not None and not resuming:
        from vla_runtime.policies.diffusion.policy import load_model

        init_model, init_cfg = load_model(init_from)
        cfg.model, cfg.schedule = init_cfg.model, init_cfg.schedule
    tc = cfg.train
    torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)

    t_load = time.perf_counter()
    ds = load_demos(data_dir, cfg.model.cameras, cfg.model.resize_to, tc.max_demos)
    if ds.actions.shape[1] != cfg.model.action_dim or ds.states.shape[1] != cfg.model.state_dim:
        if resuming or init_model is not None:
            raise UserError(f"demos in {data_dir} have action/state dims {ds.actions.shape[1]}/{ds.states.shape[1]}, "
                            f"checkpoint expects {cfg.model.action_dim}/{cfg.model.state_dim}")
        cfg.model = ModelConfig(**{**cfg.model.__dict__, "action_dim": int(ds.actions.shape[1]),
                                   "state_dim": int(ds.states.shape[1])})
    if not resuming:
        if init_model is not None and ds.image_size != cfg.model.image_size:
            raise UserError(f"demos in {data_dir} have {ds.image_size}px images, {init_from} was trained on "
                            f"{cfg.model.image_size}px")
        cfg.model = ModelConfig(**{**cfg.model.__dict__, "image_size": ds.image_size})
        cfg.env, cfg.task = ds.env, ds.task
    print(f"[train_diffusion] {len(ds.seeds)} demos, {len(ds)} frames, images {ds.image_size}px -> "
          f"{cfg.model.resize_to}/{cfg.model.crop_size}, loaded in {time.perf_counter() - t_load:.1f}s", flush=True)

    model = DiffusionModel(cfg.model)
    if init_model is not None:
        model.load_state_dict({k: v.float() for k, v in init_model.state_dict().items()})
        print(f"[train_diffusion] initialised from {init_from} (its weights and normalisation)", flush=True)
    elif not resuming:
        amin, amax = minmax_stats(ds.actions)
        smin, smax = minmax_stats(ds.states)
        model.action_min.copy_(amin)
        model.action_max.copy_(amax)
        model.state_min.copy_(smin)
        model.state_max.copy_(smax)
    sched = NoiseSchedule(cfg.schedule)
    denoiser_params = [p for n, p in model.named_parameters() if not n.startswith("predictor.")]
    opt = torch.optim.AdamW([{"params": denoiser_params, "lr": tc.lr},
                             {"params": list(model.predictor.parameters()), "lr": tc.pred_lr}],
                            lr=tc.lr, weight_decay=tc.weight_decay)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
    step = 0
    if resuming:
        from safetensors.torch import load_file

        meta = json.loads(state_json.read_text())
        _load_state(load_file(str(out / STATE_FILE)), meta["optimizer"], model, ema, opt, gen)
        step = int(meta["step"])
        _truncate_log(out / LOG_FILE, step)
        print(f"[train_diffusion] resumed from step {step}", flush=True)
    print(f"[train_diffusion] params: encoders {count_params(model.encoders) / 1e6:.2f}M, unet "
          f"{count_params(model.unet) / 1e6:.2f}M, predictor {count_params(model.predictor) / 1e6:.2f}M", flush=True)

    extra = {"demo_dir": [str(d) for d in data_dir] if isinstance(data_dir, (list, tuple)) else str(data_dir),
             "demo_seeds": sorted(ds.seeds), "frames": len(ds)}
    base_lrs = [tc.lr, tc.pred_lr]
    m = cfg.model
    H = m.horizon
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="diffusion", dynamic_ncols=True, mininterval=5.0)
    acc: dict[str, float] = {"loss": 0.0, "pred_loss": 0.0, "n": 0}
    t_win = time.perf_counter()
    t_start = time.perf_counter()
    summary: dict[str, Any] = {}
    while step < tc.steps:
        idx = torch.randint(0, len(ds), (tc.batch_size,), generator=gen)
        # executed steps before this inference: the configured n mostly, any n sometimes (async runtimes)
        n_exec = torch.where(torch.rand(tc.batch_size, generator=gen) < 0.75,
                             torch.full((tc.batch_size,), m.n_action_steps),
                             torch.randint(1, H, (tc.batch_size,), generator=gen))
        b = make_batch(ds, m, idx, gen, crop=True, n_exec=n_exec)
        actions = model.normalize_action(b["actions"])  # (B, H, A)
        prev = model.normalize_action(b["prev"])
        prev = prev + tc.pred_input_noise * torch.randn(prev.shape, generator=gen)
        noise = torch.randn(actions.shape, generator=gen)
        t = torch.randint(1, sched.T + 1, (tc.batch_size,), generator=gen)
        x_t = sched.add_noise(actions, noise, t)
        target = noise if cfg.schedule.prediction_type == "epsilon" else actions
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
            feats = model.encode(b["images"], model.normalize_state(b["states"]), grad_last_only=True)  # (B, To, F)
            out_ = model.unet(x_t, t, feats.reshape(feats.shape[0], -1))
            pred = model.predictor(feats.detach(), prev, b["n_exec"])
        loss = F.mse_loss(out_.float(), target)
        mask = b["has_prev"].float()[:, None, None]
        pred_loss = (((pred.float() - actions) ** 2) * mask).sum() / (mask.sum() * H * m.action_dim).clamp(min=1)
        f = _lr_factor(step, tc)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        opt.zero_grad(set_to_none=True)
        (loss + pred_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in ema:
                    ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        acc["loss"] += float(loss.detach())
        acc["pred_loss"] += float(pred_loss.detach())
        acc["n"] += 1
        if bar is not None:
            bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            dt = time.perf_counter() - t_win
            rec = {"step": step, "loss": acc["loss"] / acc["n"], "pred_loss": acc["pred_loss"] / acc["n"],
                   "lr": tc.lr * f, "samples_per_s": acc["n"] * tc.batch_size / max(dt, 1e-9),
                   "elapsed_s": time.perf_counter() - t_start, "time": time.time()}
            with open(out / LOG_FILE, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", pred=f"{rec['pred_loss']:.4f}",
                                sps=f"{rec['samples_per_s']:.0f}")
            summary = rec
            acc = {"loss": 0.0, "pred_loss": 0.0, "n": 0}
            t_win = time.perf_counter()
        if step % tc.save_every == 0 or step == tc.steps:
            _save_all(out, model, ema, opt, gen, cfg, step, extra)
    if bar is not None:
        bar.close()
    model.eval()
    return summary


def _ema_model(model: DiffusionModel, ema: dict[str, torch.Tensor]) -> DiffusionModel:
    m = DiffusionModel(model.cfg)
    sd = model.state_dict()
    m.load_state_dict({k: ema.get(k, v) for k, v in sd.items()})
    return m


def _save_all(out: Path, model: DiffusionModel, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
              gen: torch.Generator, cfg: DiffusionConfig, step: int, extra: dict[str, Any]) -> None:
    """Inference checkpoint first, then the training state, then the step file (the commit point)."""
    from safetensors.torch import save

    save_checkpoint(out, _ema_model(model, ema), cfg, extra={**extra, "step": step})
    tensors, meta = _flatten_state(model, ema, opt, gen)
    _atomic_write_bytes(out / STATE_FILE, save(tensors))
    _atomic_write_bytes(out / STATE_JSON, json.dumps({"step": step, "optimizer": meta}).encode())


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint of a killed run)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the visuomotor diffusion policy (resumable).")
    ap.add_argument("--data-dir", required=True, help="directory of demo *.hdf5 files (comma-separated for several)")
    ap.add_argument("--out-dir", required=True, help="checkpoint directory (resumed if it holds a training state)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if out-dir has a state")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--max-demos", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune from this checkpoint dir (shipped name or path) when out-dir has no state")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    ap.add_argument("--warmup-steps", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        dirs = [d for d in a.data_dir.split(",") if d]
        over = {k: v for k, v in (("lr", a.lr), ("warmup_steps", a.warmup_steps)) if v is not None}
        init = None
        if a.init_from:
            from vla_runtime.policies import resolve_checkpoint

            init = resolve_checkpoint(a.init_from)
        s = train_diffusion(dirs if len(dirs) > 1 else dirs[0], a.out_dir, steps=a.steps, batch_size=a.batch_size, resume=not a.no_resume,
                            progress=not a.no_progress, num_threads=a.threads, save_every=a.save_every,
                            max_demos=a.max_demos, init_from=init, **over)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(s))


if __name__ == "__main__":
    main()
