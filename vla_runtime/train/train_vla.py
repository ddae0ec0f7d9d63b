"""Train a VLA (parallel L1 chunk head or AR action tokens) on demo files, multi-task, language-conditioned.

Resumable background job: the checkpoint directory holds the fp32 weights, the AdamW state and the step
(written atomically every `save_every` steps), and a jsonl loss log. Re-running the same command continues.
Data: `vla_runtime.train.demos` HDF5 files; actions and proprio are min-max normalised to [-1, 1] with the
stats saved in the checkpoint; targets are chunks of `chunk_size` future actions (steps past the episode end
are masked out of the loss); images get a random-shift augmentation (pad + random crop, as in DrQ / Diffusion
Policy). Frames are read lazily from the HDF5 files so LIBERO-sized datasets do not need to fit in memory.

    python -m vla_runtime.train.train_vla --data /work/data/lift --out /work/ckpt/vla_lift_parallel --steps 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.modeling import AttentionVisualDrop, RandomVisualDrop, VLAModel, count_params
from vla_runtime.policies.vla.policy import Normalizer, load_model, save_checkpoint
from vla_runtime.policies.vla.tokenizer import TOKENIZER_FILE, WordTokenizer
from vla_runtime.train.demos import list_demos, read_demo

log = logging.getLogger(__name__)


class DemoFrames:
    """Index over (file, t) of demo files; actions/states in memory, images read lazily per sample."""

    def __init__(self, files: Sequence[Path], cameras: tuple[str, ...] | None = None) -> None:
        import h5py

        self.files = list(files)
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.instructions: list[str] = []
        cams: tuple[str, ...] | None = cameras
        for f in self.files:
            d = read_demo(f, load_images=False)
            self.actions.append(d.actions)
            self.states.append(d.states)
            self.instructions.append(d.instruction)
            with h5py.File(f, "r") as h:
                fc = tuple(json.loads(h.attrs["cameras"]))
                shape = h["images"][fc[0]].shape
            if cams is None:
                cams = tuple(c for c in fc)
            missing = [c for c in cams if c not in fc]
            if missing:
                raise UserError(f"{f}: cameras {missing} missing (has {list(fc)})")
            self.image_hw = shape[1:3]
        assert cams is not None
        self.cameras = cams
        self.index = np.array([(i, t) for i, a in enumerate(self.actions) for t in range(len(a))], np.int64)
        self._h5: dict[int, Any] = {}
        targets = [grasp_place_targets(a, s) for a, s in zip(self.actions, self.states)]
        self.aux_targets = np.stack([t for t, _ in targets]) if targets else np.zeros((0, 6), np.float32)
        self.aux_masks = np.stack([m for _, m in targets]) if targets else np.zeros((0, 2), bool)

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, i: int) -> Any:
        import h5py

        if i not in self._h5:
            self._h5[i] = h5py.File(self.files[i], "r")
        return self._h5[i]

    def images(self, i: int, t: int) -> np.ndarray:
        """(C, H, W, 3) uint8."""
        h = self._file(i)
        return np.stack([np.asarray(h["images"][c][t]) for c in self.cameras])

    def stats(self) -> dict[str, list[float]]:
        a = np.concatenate(self.actions)
        s = np.concatenate(self.states)
        return {"action_min": a.min(0).tolist(), "action_max": a.max(0).tolist(),
                "state_min": s.min(0).tolist(), "state_max": s.max(0).tolist()}

    def close(self) -> None:
        for h in self._h5.values():
            h.close()
        self._h5.clear()


def grasp_place_targets(actions: np.ndarray, states: np.ndarray, gripper_dim: int = -1,
                        pos_dims: tuple[int, int, int] = (0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Where a demo grasps and where it ends: (6,) = end-effector xyz at the first gripper close, xyz at the last
    frame; mask (2,) says which of the two are known.

    These are the auxiliary targets of `--aux-loss`: a policy that predicts them from the first frame on must find
    the instruction's object (and the place target) in its images, which the proprio state cannot tell it. The
    close is the first frame whose gripper command turns positive after a negative one; a demo that starts with
    the gripper closed (a takeover after the grasp) or never closes it has no grasp target.
    """
    g = np.asarray(actions)[:, gripper_dim]
    pos = np.asarray(states)[:, list(pos_dims)].astype(np.float32)
    out = np.zeros(6, np.float32)
    mask = np.zeros(2, bool)
    opened = np.nonzero(g < 0)[0]
    if len(opened):
        closes = np.nonzero(g[opened[0]:] > 0)[0]
        if len(closes):
            out[:3] = pos[opened[0] + closes[0]]
            mask[0] = True
    if len(pos):
        out[3:] = pos[-1]
        mask[1] = True
    return out, mask


class AuxTargetHead(nn.Module):
    """Training-only head: mean of the action queries' final hidden states -> grasp and end xyz (normalised).

    It is not part of the shipped model (inference never reads it); its weights live in the run's train_state.
    """

    def __init__(self, hidden: int, n_out: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, n_out))

    def forward(self, suffix: torch.Tensor) -> torch.Tensor:
        return self.net(suffix.float().mean(1))

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 over the known targets; pred/target (B, 6), mask (B, 2) bool (grasp, end)."""
        m = mask.float().repeat_interleave(3, dim=1)
        return ((pred.float() - target.float()).abs() * m).sum() / m.sum().clamp_min(1.0)


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """x (N, 3, H, W): replicate-pad by `pad` and crop back at a random offset per image."""
    if pad <= 0:
        return x
    N, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (N, 2), generator=gen)
    return torch.stack([xp[n, :, int(off[n, 0]):int(off[n, 0]) + H, int(off[n, 1]):int(off[n, 1]) + W]
                        for n in range(N)])


def make_batch(data: DemoFrames, rows: np.ndarray, cfg: VLAConfig, tok: WordTokenizer, act_norm: Normalizer,
               state_norm: Normalizer, gen: torch.Generator, shift: int) -> dict[str, torch.Tensor]:
    B, C, T = len(rows), len(cfg.cameras), cfg.max_text_len
    imgs = np.stack([data.images(int(i), int(t)) for i, t in data.index[rows]])  # (B, C, H, W, 3)
    x = torch.from_numpy(imgs).permute(0, 1, 4, 2, 3).flatten(0, 1).float()  # (B*C, 3, H, W)
    if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True)
    x = random_shift(x, shift, gen)
    x = (x / 127.5 - 1.0).reshape(B, C, 3, cfg.image_size, cfg.image_size)
    states = np.zeros((B, cfg.state_dim), np.float32)
    acts = np.zeros((B, cfg.chunk_size, cfg.action_dim), np.float32)
    amask = np.zeros((B, cfg.chunk_size), bool)
    text = np.full((B, T), tok.pad_id, np.int64)
    tvalid = np.zeros((B, T), bool)
    files = data.index[rows, 0]
    # grasp and end xyz, normalised like the proprio position dims (grasp_place_targets reads dims 0-2)
    pos_norm = Normalizer(state_norm.lo[:3], state_norm.hi[:3])
    aux = pos_norm.normalize(data.aux_targets[files].reshape(B, 2, 3)).reshape(B, 6)
    aux_mask = data.aux_masks[files]
    for b, (i, t) in enumerate(data.index[rows]):
        a = data.actions[i]
        states[b] = state_norm.normalize(data.states[i][t])
        seg = a[t:t + cfg.chunk_size]
        acts[b, :len(seg)] = act_norm.normalize(seg)
        acts[b, len(seg):] = acts[b, len(seg) - 1]
        amask[b, :len(seg)] = True
        ids = tok.encode(data.instructions[i])[:T]
        text[b, :len(ids)] = ids
        tvalid[b, :len(ids)] = True
    return {"images": x, "state": torch.from_numpy(states), "text_ids": torch.from_numpy(text),
            "text_valid": torch.from_numpy(tvalid), "actions": torch.from_numpy(acts).clamp(-1, 1),
            "action_mask": torch.from_numpy(amask), "aux_target": torch.from_numpy(aux),
            "aux_mask": torch.from_numpy(aux_mask)}


# ---- optimizer state <-> safetensors (no pickle) -------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"step": torch.tensor([step], dtype=torch.int64)}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> int:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return int(tensors["step"][0])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load the EMA weights into `model` (no-op without EMA); the raw weights come back after."""
    if ema is None:
        yield
        return
    params = dict(model.named_parameters())
    backup = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backup[n])


DROP_SHAPES = ("random", "attention", "mixed")


def make_train_drop(shape: str, layer: int, keep: float, n_layers: int, gen: torch.Generator
                    ) -> RandomVisualDrop | AttentionVisualDrop:
    """The pruner of one dropping batch. "mixed" draws attention or random with equal odds from `gen`."""
    if shape == "mixed":
        shape = "attention" if float(torch.rand(1, generator=gen)) < 0.5 else "random"
    if shape == "random":
        return RandomVisualDrop(layer, keep, generator=gen)
    from vla_runtime.policies.vla.specprune import SpecPruneConfig

    dynamic = SpecPruneConfig(prune_layer=layer).resolved_dynamic_layers(n_layers)  # SpecPrune's default cuts
    return AttentionVisualDrop(layer, keep, att_frac=0.5, dynamic_layers=dynamic, score_layer=0, generator=gen)


def train_vla(data_dirs: Sequence[str | Path], out_dir: str | Path, mode: str = "parallel", steps: int = 20000,
              batch_size: int = 16, resume: bool = True, lr: float = 3e-4, weight_decay: float = 0.01,
              warmup: int = 300, save_every: int = 250, log_every: int = 25, seed: int = 0, threads: int = 1,
              bf16: bool | None = None, shift: int = 8, drop_keep: float = 0.3, drop_prob: float = 0.75,
              drop_layer: int = 1, val_frac: float = 0.05, config: dict[str, Any] | None = None,
              progress: bool = True, max_minutes: float | None = None, ema_decay: float = 0.0,
              init_from: str | Path | None = None, exit_loss: float = 0.0,
              exit_loss_layers: Sequence[int] | None = None, aux_loss: float = 0.0,
              drop_shape: str = "random") -> dict[str, Any]:
    """Train (or continue training) a VLA; returns a summary dict (steps done, last losses, samples/s).

    ema_decay > 0 keeps an exponential moving average of the weights (decay warmed up as min(decay,
    (1 + n) / (10 + n)) over the n EMA updates so far, as in diffusion_policy). The checkpoint's model.safetensors
    then holds the EMA weights (what eval, export and shipping use); the raw weights the optimizer steps live in
    train_state.safetensors ("raw.*"), so a resumed run continues both. EMA can start on a run that had none.

    drop_*: with probability drop_prob a batch keeps only drop_keep of the visual tokens from decoder layer
    drop_layer on - cheaper steps, and robustness to inference-time pruning. drop_shape picks the kept sets:
    "random" (RandomVisualDrop), "attention" (AttentionVisualDrop: half of them the layer-0 text-attention top,
    then SpecPrune's dynamic cuts at the quarters of the depth by the same score) or "mixed" (each dropping batch
    draws one of the two), so a model can be in distribution for an attention-chosen pruner as well as a random one.

    init_from: a (shipped) VLA checkpoint to start a new run from (ignored when out_dir holds a run to resume).
    Its architecture, tokenizer and normalisation statistics are kept (`config` may still override fields such
    as chunk_size), and every weight whose name and shape match is copied: fine-tuning on new demos in the same
    mode, or an AR run that starts from a parallel run's vision tower, projectors and decoder (only the action
    head and the action-slot embeddings start fresh). The optimiser starts fresh.

    exit_loss > 0: add the early-exit loss (`VLAModel.forward_train`) at exit_loss_layers (default: every layer
    but the last), so early-exit decoding can stop shallower; the log gets exit_ce and acc_l<i> (AR: the shallow
    layers' action-token logits) or exit_l1 and l1_l<i> (parallel: the chunk decoded from a shallow layer).

    aux_loss > 0: add w * L1 of a training-only head (`AuxTargetHead`) that predicts, from the action queries'
    final hidden states, where the demo grasps and where it ends (`grasp_place_targets`, end-effector xyz
    normalised like the proprio state). A target the proprio state cannot give away at the start of an episode,
    so the model must localise the instruction's object in its images; the log gets aux_l1. The head's weights
    are kept in train_state ("aux.*") and never shipped.
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    if shift < 0:
        raise UserError(f"--shift must be >= 0 pixels, got {shift}")
    if exit_loss < 0:
        raise UserError(f"--exit-loss must be >= 0, got {exit_loss}")
    if aux_loss < 0:
        raise UserError(f"--aux-loss must be >= 0, got {aux_loss}")
    if drop_shape not in DROP_SHAPES:
        raise UserError(f"--drop-shape must be one of {DROP_SHAPES}, got {drop_shape!r}")
    torch.set_num_threads(threads)
    if bf16 is None:  # bf16 autocast only where the CPU multiplies bf16 natively (emulated bf16 is ~100x slower)
        from vla_runtime.policies.dtypes import cpu_has_native_bf16

        bf16 = cpu_has_native_bf16()
    out = Path(out_dir)
    files: list[Path] = []
    for d in data_dirs:
        files += list_demos(d)
    resuming = resume and (out / "config.json").is_file() and (out / "train_state.safetensors").is_file()
    if resuming:
        cfg = VLAConfig.load(out / "config.json")
        if cfg.mode != mode:
            raise UserError(f"{out} holds a {cfg.mode!r} run; use another --out for mode {mode!r}")
        tok = WordTokenizer.load(out / TOKENIZER_FILE)
        stats = json.loads((out / "stats.json").read_text())
    src_sd: dict[str, torch.Tensor] | None = None
    if init_from is not None and not resuming:
        src = Path(init_from)
        if not (src / "config.json").is_file():
            raise UserError(f"--init-from {src}: not a VLA checkpoint (no config.json)")
        src_cfg = VLAConfig.load(src / "config.json")
        if src_cfg.hf_decoder_dir:
            raise UserError(f"--init-from {src}: checkpoints that wrap a Hugging Face decoder cannot be fine-tuned here")
        tok = WordTokenizer.load(src / TOKENIZER_FILE)
        stats = json.loads((src / "stats.json").read_text())
        over = dict(config or {})
        cfg = replace(src_cfg, mode=mode, **over)
        cfg = replace(cfg, n_action_steps=min(cfg.n_action_steps, cfg.chunk_size))
        src_sd = load_file(str(src / "model.safetensors"))
    data = DemoFrames(files, cameras=None if not (resuming or src_sd is not None) else cfg.cameras)
    if src_sd is not None:
        sdim, adim = int(data.states[0].shape[1]), int(data.actions[0].shape[1])
        if (sdim, adim) != (cfg.state_dim, cfg.action_dim):
            raise UserError(f"demos have state/action dims {sdim}/{adim}, {init_from} expects "
                            f"{cfg.state_dim}/{cfg.action_dim}")
        unknown = sorted({w for s in set(data.instructions) for w in tok.unknown_words(s)})
        if unknown:
            log.warning("instructions use words %s that %s's tokenizer does not know (they map to <unk>)",
                        unknown[:8], init_from)
    elif not resuming:
        tok = WordTokenizer.from_instructions(data.instructions)
        stats = data.stats()
        base = VLAConfig(**(config or {}))
        cfg = replace(base, mode=mode, cameras=data.cameras, vocab_size=tok.vocab_size,
                      state_dim=int(data.states[0].shape[1]), action_dim=int(data.actions[0].shape[1]),
                      n_action_steps=min(base.n_action_steps, base.chunk_size))
    act_norm = Normalizer(np.array(stats["action_min"]), np.array(stats["action_max"]))
    state_norm = Normalizer(np.array(stats["state_min"]), np.array(stats["state_max"]))
    torch.manual_seed(seed)
    model = load_model(out, tok) if resuming else VLAModel(cfg, bos_id=tok.bos_id)
    if src_sd is not None:
        fresh = copy_matching(model, src_sd)
        print(json.dumps({"event": "init_from", "src": str(init_from), "copied": len(model.state_dict()) - len(fresh),
                          "fresh": fresh}), flush=True)
    model.train()
    aux_head = AuxTargetHead(model.hidden) if aux_loss > 0 else None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if aux_head is not None:  # last, so the model's parameter ids in the optimiser state do not move
        groups.append({"params": list(aux_head.parameters()), "weight_decay": weight_decay})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    step = 0
    ema: dict[str, torch.Tensor] | None = None
    ema_n = 0
    if resuming:
        state = load_file(str(out / "train_state.safetensors"))
        aux_sd = {k[4:]: v for k, v in state.items() if k.startswith("aux.")}
        if aux_head is not None and aux_sd:
            aux_head.load_state_dict(aux_sd)
        elif aux_head is not None or aux_sd:  # the optimiser state would not line up with the parameters
            raise UserError(f"{out}: resumed with{'out' if aux_head is None else ''} --aux-loss, the run was trained "
                            f"with{'' if aux_head is None else 'out'} it; pass the same --aux-loss as before")
        step = load_optimizer_tensors(opt, state)
        raw = {k[4:]: v for k, v in state.items() if k.startswith("raw.")}
        if ema_decay > 0:  # model.safetensors holds the EMA when the run kept one, else the raw weights
            ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            ema_n = int(state["ema_n"][0]) if "ema_n" in state else 0
        if raw:
            missing = model.load_state_dict(raw, strict=False).missing_keys
            if any(n in missing for n, _ in model.named_parameters()):
                raise UserError(f"{out}: train_state raw weights lack {missing[:3]}")
        log.info("resumed %s at step %d%s", out, step, f" (EMA, {ema_n} updates)" if ema is not None else "")
    elif ema_decay > 0:
        ema = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def save(at: int) -> None:
        extra = optimizer_tensors(opt, at)
        if aux_head is not None:
            extra.update({f"aux.{n}": t.detach().clone() for n, t in aux_head.state_dict().items()})
        if ema is None:
            save_checkpoint(model, tok, stats, out, extra_state=extra)
            return
        extra.update({f"raw.{n}": p.detach().clone() for n, p in model.named_parameters()})
        extra["ema_n"] = torch.tensor([ema_n], dtype=torch.int64)
        with ema_weights(model, ema):
            save_checkpoint(model, tok, stats, out, extra_state=extra)
    # held-out episodes for a validation loss (whole episodes, so frames of one demo never straddle the split)
    rng = np.random.default_rng(seed)
    n_val = int(round(len(files) * val_frac)) if len(files) >= 20 else 0
    val_files = set(rng.permutation(len(files))[:n_val].tolist())
    is_val = np.array([int(i) in val_files for i, _ in data.index])
    train_rows, val_rows = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "loss_log.jsonl"
    if resuming and log_path.is_file():  # steps after the last checkpoint are redone: drop their old records
        kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    ee_layers = tuple(range(model.n_layers - 1)) if exit_loss_layers is None else tuple(int(l) for l in exit_loss_layers)
    if exit_loss > 0:
        model.check_exit_loss_layers(ee_layers)  # before the first step, not at it
    n_params = count_params(model)
    info = {"params_m": round(n_params / 1e6, 3), "frames": len(data), "train_frames": len(train_rows),
            "val_frames": len(val_rows), "files": len(files), "seq_len": cfg.seq_len, "visual_tokens": cfg.n_visual}
    print(json.dumps({"event": "start", "step": step, **info}), flush=True)
    if step == 0:
        save(0)
    t_begin = time.time()
    bar = tqdm(total=steps, initial=step, disable=not progress, mininterval=30)
    last: dict[str, float] = {}
    window_t, window_n = time.time(), 0
    while step < steps:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        np_rng = np.random.default_rng(seed * 1_000_003 + step)
        rows = train_rows[np_rng.integers(0, len(train_rows), batch_size)]
        batch = make_batch(data, rows, cfg, tok, act_norm, state_norm, gen, shift)
        pruner = None
        if drop_prob > 0 and drop_keep < 1.0 and float(torch.rand(1, generator=gen)) < drop_prob:
            pruner = make_train_drop(drop_shape, drop_layer, drop_keep, model.n_layers, gen)
        cur_lr = lr_at(step, steps, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        aux_fn = None
        if aux_head is not None:
            def aux_fn(suf: torch.Tensor, b: dict[str, torch.Tensor] = batch) -> tuple[torch.Tensor, dict[str, float]]:
                assert aux_head is not None
                l1 = AuxTargetHead.loss(aux_head(suf), b["aux_target"], b["aux_mask"])
                return aux_loss * l1, {"aux_l1": float(l1.detach())}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model.forward_train(batch["images"], batch["state"], batch["text_ids"],
                                                batch["text_valid"], batch["actions"], batch["action_mask"],
                                                pruner=pruner, exit_loss_layers=ee_layers, exit_loss_weight=exit_loss,
                                                aux=aux_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        if ema is not None:
            d = min(ema_decay, (1 + ema_n) / (10 + ema_n))
            ema_n += 1
            with torch.no_grad():
                for n, p in model.named_parameters():
                    ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
        window_n += batch_size
        bar.update(1)
        last = {"loss": float(loss.detach()), **metrics}
        if step % log_every == 0 or step == steps:
            now = time.time()
            rec: dict[str, Any] = {"step": step, "lr": cur_lr, "grad_norm": float(gn), "dropped": pruner is not None,
                                   "drop_shape": type(pruner).__name__ if pruner is not None else None,
                                   "samples_per_s": round(window_n / max(1e-6, now - window_t), 2),
                                   "wall_s": round(now - t_begin, 1), **last}
            window_t, window_n = now, 0
            if step % (log_every * 8) == 0 and len(val_rows):
                rec["val_loss"] = validate(model, data, val_rows, cfg, tok, act_norm, state_norm, bf16, seed)
                if ema is not None:
                    with ema_weights(model, ema):
                        rec["val_loss_ema"] = validate(model, data, val_rows, cfg, tok, act_norm, state_norm, bf16,
                                                       seed)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if step % save_every == 0 or step == steps:
            save(step)
        if max_minutes is not None and time.time() - t_begin > max_minutes * 60:
            save(step)
            break
    bar.close()
    data.close()
    return {"step": step, "out": str(out), "bf16": bool(bf16), **info, **last}


PATCH_KEY = "vision.embeddings.patch_embedding.weight"
POSITION_KEY = "vision.embeddings.position_embedding.weight"


@torch.no_grad()
def resize_patch_kernel(w: torch.Tensor, size: int) -> torch.Tensor:
    """A patch-embedding kernel [C, 3, k, k] for patches of `size` px that gives the same token for a patch as
    the original kernel gives for that patch resized (nearest) to k px: a sum over r x r blocks when k = r * size
    (patch 16 -> 8 = the old model on the image upsampled 2x), a spread over r x r cells when size = r * k."""
    k = int(w.shape[-1])
    if k == size:
        return w.clone()
    wf = w.float()
    if k % size == 0:
        r = k // size
        out = F.avg_pool2d(wf, r) * (r * r)
    elif size % k == 0:
        r = size // k
        out = wf.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1) / (r * r)
    else:
        raise UserError(f"cannot resize a {k}-px patch kernel to {size} px (sizes must divide one another)")
    return out.to(w.dtype)


@torch.no_grad()
def resize_position_grid(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Learned position embeddings [g*g, C] of a square patch grid, bicubically resized to n = g'*g' rows."""
    g_old, g_new = math.isqrt(int(pos.shape[0])), math.isqrt(n)
    if g_old * g_old != pos.shape[0] or g_new * g_new != n:
        raise UserError(f"position grids must be square: {pos.shape[0]} -> {n}")
    grid = pos.float().T.reshape(1, -1, g_old, g_old)
    out = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    return out.reshape(-1, n).T.contiguous().to(pos.dtype)


@torch.no_grad()
def copy_matching(model: nn.Module, src: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of src whose name and shape match into model; return the names left as initialised.
    The vision tower's patch kernel and position grid are resized when only the patch size differs (e.g. a
    patch-16 checkpoint starting a patch-8 model: 4x the visual tokens, same image)."""
    own = model.state_dict()
    fresh = []
    for name, t in own.items():
        s = src.get(name)
        if s is not None and name == PATCH_KEY and s.shape[:2] == t.shape[:2] and s.shape != t.shape:
            t.copy_(resize_patch_kernel(s, int(t.shape[-1])).to(t.dtype))
            continue
        if s is not None and name == POSITION_KEY and s.shape[1] == t.shape[1] and s.shape != t.shape:
            t.copy_(resize_position_grid(s, int(t.shape[0])).to(t.dtype))
            continue
        if s is None or tuple(s.shape) != tuple(t.shape):
            if not name.endswith("rotary_emb.inv_freq"):
                fresh.append(name)
            continue
        t.copy_(s.to(t.dtype))
    return fresh


@torch.no_grad()
def validate(model: VLAModel, data: DemoFrames, rows: np.ndarray, cfg: VLAConfig, tok: WordTokenizer,
             act_norm: Normalizer, state_norm: Normalizer, bf16: bool, seed: int, n: int = 32) -> float:
    """Loss on up to n held-out frames (no augmentation, no dropping)."""
    model.eval()
    sel = rows[np.random.default_rng(seed).permutation(len(rows))[:n]]
    batch = make_batch(data, sel, cfg, tok, act_norm, state_norm, torch.Generator().manual_seed(seed), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.forward_train(batch["images"], batch["state"], batch["text_ids"], batch["text_valid"],
                                      batch["actions"], batch["action_mask"])
    model.train()
    return round(float(loss), 5)


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Ship a trained checkpoint: bf16 weights, no optimizer state (~half the size of the training copy)."""
    from vla_runtime.policies.vla.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    if not isinstance(tok, WordTokenizer):
        raise UserError(f"{src}: only checkpoints with a word tokenizer can be exported")
    model = load_model(src, tok)
    stats = json.loads(Path(src, "stats.json").read_text())
    out = save_checkpoint(model, tok, stats, dst, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    state = Path(src, "train_state.safetensors")
    step = int(load_file(str(state))["step"][0]) if state.is_file() else -1
    Path(out, "train_info.json").write_text(json.dumps({"step": step, "source": str(src)}) + "\n")
    log_src = Path(src, "loss_log.jsonl")
    if log_src.is_file():  # the log up to the exported step
        lines = [ln for ln in log_src.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        Path(out, "loss_log.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return out


def _resolve(name: str) -> Path:
    from vla_runtime.policies import resolve_checkpoint

    return Path(resolve_checkpoint(name))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=[], help="demo directories (HDF5 files)")
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if it exists)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "ar"])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=300, help="linear LR warm-up steps (then cosine to 10 %%)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--drop-keep", type=float, default=0.3)
    p.add_argument("--drop-prob", type=float, default=0.75)
    p.add_argument("--drop-shape", default="random", choices=DROP_SHAPES,
                   help="kept sets of the dropping batches: random, attention (SpecPrune-shaped) or mixed")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (e.g. 0.999; 0 = off)")
    p.add_argument("--config", default="{}", help="JSON overrides of VLAConfig fields (new runs only)")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this VLA checkpoint (shipped name or dir): its tokenizer, "
                        "normalisation and every weight that fits (e.g. an AR run from a parallel trunk)")
    p.add_argument("--shift", type=int, default=8,
                   help="random-shift augmentation: pad by this many pixels and crop back (0 = off)")
    p.add_argument("--exit-loss", type=float, default=0.0,
                   help="weight of the early-exit loss (LayerSkip-style: AR, CE of every shallow layer's logits; "
                        "parallel, L1 of the chunk decoded from every shallow layer)")
    p.add_argument("--exit-loss-layers", default=None, help="comma-separated layers (default: all but the last)")
    p.add_argument("--aux-loss", type=float, default=0.0,
                   help="weight of the auxiliary grasp/end-position loss (a training-only head; makes the model "
                        "find the instruction's object in its images)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute precision: bf16 autocast or float32; auto = bf16 only on CPUs with native bf16")
    p.add_argument("--export", default=None, help="only export --out as a bf16 shipping checkpoint to this dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.export:
        print(export_checkpoint(a.out, a.export))
        return
    if not a.data:
        p.error("--data is required for training")
    res = train_vla(a.data, a.out, mode=a.mode, steps=a.steps, batch_size=a.batch_size, resume=not a.no_resume,
                    lr=a.lr, warmup=a.warmup_steps, threads=a.threads, save_every=a.save_every, drop_keep=a.drop_keep,
                    drop_prob=a.drop_prob, drop_shape=a.drop_shape, max_minutes=a.max_minutes, config=json.loads(a.config),
                    ema_decay=a.ema, init_from=_resolve(a.init_from) if a.init_from else None,
                    shift=a.shift, bf16=None if a.precision == "auto" else a.precision == "bf16",
                    exit_loss=a.exit_loss, aux_loss=a.aux_loss,
                    exit_loss_layers=[int(x) for x in a.exit_loss_layers.split(",")] if a.exit_loss_layers else None)
    print(json.dumps({"event": "done", **res}), flush=True)


if __name__ == "__main__":
    main()
