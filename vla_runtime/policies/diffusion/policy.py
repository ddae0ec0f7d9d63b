"""`DiffusionPolicy`: the Policy protocol over the diffusion model, with pluggable samplers.

Per `act(obs)`: encode the observation history once (features of frames already encoded are cached by step),
then run the configured sampler. Samplers:
  ddpm       ancestral sampling over all T levels
  ddim<k>    deterministic DDIM with k denoiser calls
  step<k>    STEP: the predictor proposes the chunk from the observation and the previous chunk (shifted by
             the steps executed since), it is noised to level `step_start_t` and refined by k DDIM steps;
             velocity-aware perturbation on a stall; an episode's first chunk falls back to DDIM
  predictor  the predictor's proposal as is (ablation; first chunk still DDIM)

Checkpoint directory (no pickle): config.json, model.safetensors (weights + normalisation stats as buffers,
fp16 storage for float weights), optional data.json (which demo seeds were used for training).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_runtime.errors import UserError
from vla_runtime.policies.diffusion.configuration import DiffusionConfig, SamplerConfig
from vla_runtime.policies.diffusion.modeling import DiffusionModel, center_crop, resize_image, shift_chunk
from vla_runtime.policies.diffusion.samplers import (NoiseSchedule, action_speed, ddim_sample, ddpm_sample,
                                                      perturb_warm_start, warm_start_sample)
from vla_runtime.runtime.types import ActionChunk, Observation, PolicySpec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DATA_FILE = "data.json"


class DiffusionPolicy:
    """A visuomotor diffusion policy. Keeps the observation history and the previous chunk per episode."""

    def __init__(self, model: DiffusionModel, cfg: DiffusionConfig, device: str = "cpu",
                 cuda_graphs: bool | None = None, cpu_trace: bool | None = None) -> None:
        """cuda_graphs: replay the encoder, predictor and denoiser from CUDA graphs (None = on for CUDA devices);
        see vla_runtime/policies/vla/cuda_graphs.py. cpu_trace: run them as frozen TorchScript traces on the CPU
        (None = on for CPU in float32); see cpu_trace.py. At batch 1 all three are dispatch-bound."""
        self.cfg = cfg
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self._graphs: Any = None
        if self.device.type == "cuda" and cuda_graphs is not False:
            from vla_runtime.policies.vla.cuda_graphs import LayerGraphs

            self._graphs = LayerGraphs()
        elif self.device.type == "cpu" and cpu_trace is not False and cfg.sampler.dtype == "float32":
            from vla_runtime.policies.diffusion.cpu_trace import TracedCalls

            self._graphs = TracedCalls()
        self.sched = NoiseSchedule(cfg.schedule)
        m = cfg.model
        self.spec = PolicySpec(action_dim=m.action_dim, chunk_size=m.horizon, n_action_steps=m.n_action_steps,
                               cameras=tuple(m.cameras), image_size=m.image_size, state_dim=m.state_dim,
                               name=f"diffusion-{cfg.sampler.name}")
        self._dtype = torch.bfloat16 if cfg.sampler.dtype == "bfloat16" else torch.float32
        self.reset("")

    # ------------------------------------------------------------------ protocol
    def reset(self, instruction: str) -> None:
        """New episode: forget the history, the previous chunk and re-seed the sampler noise."""
        self._obs: OrderedDict[int, Observation] = OrderedDict()  # step -> obs (last few)
        self._obs_lock = threading.Lock()  # observe() may run in the loop thread while act() runs in a worker
        self._feat_cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # step -> (F,) features
        self._prev_norm: torch.Tensor | None = None  # (1, H, A) normalised previous chunk
        self._prev_env: np.ndarray | None = None  # (H, A) previous chunk in env units
        self._prev_step = 0
        seed = self.cfg.sampler.seed
        self._gen = torch.Generator().manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**62))

    def set_sampler(self, sampler: str, **overrides: Any) -> None:
        """Switch the sampling strategy in place (the denoiser is unchanged): e.g. for a benchmark loop."""
        self.cfg.sampler = SamplerConfig(**{**self.cfg.sampler.__dict__, "name": sampler, **overrides})
        self.spec = replace(self.spec, name=f"diffusion-{self.cfg.sampler.name}")
        self._dtype = torch.bfloat16 if self.cfg.sampler.dtype == "bfloat16" else torch.float32
        if self._dtype != torch.float32 and self.device.type == "cpu":
            self._graphs = None  # CPU traces are float32 only

    def fork(self, sampler: str, **overrides: Any) -> "DiffusionPolicy":
        """A second policy over the *same* network (weights shared, not copied) with its own sampler, history and
        previous chunk: the sampler strategies of a benchmark then run on one model in memory, as a deployment
        would, instead of N copies that evict each other's weights from the CPU caches."""
        from vla_runtime.policies.diffusion.cpu_trace import TracedCalls

        cfg = copy.deepcopy(self.cfg)
        cfg.sampler = SamplerConfig(**{**cfg.sampler.__dict__, "name": sampler, **overrides})
        on = self._graphs is not None
        fork = DiffusionPolicy(self.model, cfg, device=str(self.device), cuda_graphs=on, cpu_trace=on)
        if isinstance(self._graphs, TracedCalls) and isinstance(fork._graphs, TracedCalls):
            fork._graphs = self._graphs  # traces are pure functions of their inputs: share them
        return fork

    def observe(self, obs: Observation) -> None:
        """Record an observation without acting: the runtime feeds every tick's frame, so the history of a chunk
        holds the frames `obs_stride` ticks apart that training used, whenever the chunk is inferred (async
        inference acts at other ticks than every n_action_steps). Thread-safe against a concurrent `act`."""
        with self._obs_lock:
            self._obs[int(obs.step)] = obs
            while len(self._obs) > 4 * self.cfg.model.obs_stride * self.cfg.model.obs_horizon + 2:
                self._obs.popitem(last=False)

    def act(self, obs: Observation) -> ActionChunk:
        m, sc = self.cfg.model, self.cfg.sampler
        missing = [c for c in m.cameras if c not in obs.images]
        if missing:
            raise UserError(f"diffusion policy needs cameras {list(m.cameras)}; observation lacks {missing}")
        self.observe(obs)
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats = self._encode_history(obs)  # (1, To, F)
            if self.device.type == "cuda":  # honest encoder / sampler split on an async device
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            cond = feats.reshape(1, -1)  # (1, To*F)
            model_fn = self._model_fn(cond)
            shape = (1, m.horizon, m.action_dim)
            kind = sc.kind
            prefix = None
            if sc.inpaint_committed and obs.committed_actions is not None and len(obs.committed_actions) > 0:
                committed = torch.as_tensor(np.asarray(obs.committed_actions, np.float32)[: m.horizon])[None]
                prefix = self.model.normalize_action(committed.to(self.device)).float().cpu().clamp(-1, 1)
            warm, perturbed, pred_ms, speed = False, False, 0.0, None
            if kind == "ddpm":
                x, calls = ddpm_sample(model_fn, self.sched, shape, self._gen)
            elif kind == "ddim" or self._prev_norm is None:
                k = sc.k if kind == "ddim" else sc.first_chunk_steps
                x, calls = ddim_sample(model_fn, self.sched, shape, k, sc.eta, self._gen, prefix=prefix)
            else:
                n_exec = int(np.clip(int(obs.step) - self._prev_step, 0, m.horizon))
                tp = time.perf_counter()
                prev = shift_chunk(self._prev_norm, n_exec)  # (1, H, A)
                if sc.warm_source == "shift":  # ablation: plain warm start from the previous plan
                    proposal = prev.float().clamp(-1, 1)
                else:
                    proposal = self._graphed("predictor", (self.model.predictor,), self._predict_fn,
                                             feats.to(self.device, self._dtype), prev.to(self.device, self._dtype),
                                             torch.tensor([n_exec], device=self.device))
                    proposal = proposal.float().cpu().clamp(-1, 1)
                pred_ms = (time.perf_counter() - tp) * 1e3
                warm = True
                if kind == "predictor":
                    x, calls = warm_start_sample(model_fn, self.sched, proposal, 0, 0, prefix=prefix)
                else:
                    assert self._prev_env is not None
                    executed = torch.from_numpy(self._prev_env[:n_exec])
                    speed = action_speed(executed, sc.stall_dims)
                    stalled = sc.perturb and speed < sc.stall_eps
                    proposal = perturb_warm_start(proposal, stalled, sc.sigma_stall, self._gen)
                    perturbed = bool(stalled)
                    x, calls = warm_start_sample(model_fn, self.sched, proposal, sc.k, sc.step_start_t, sc.eta,
                                                 self._gen, noise_scale=1.0 if stalled else sc.sigma_scale,
                                                 prefix=prefix)
            x = x.float().clamp(-1, 1)
            actions = self.model.unnormalize_action(x.to(self.device))[0].cpu().numpy().astype(np.float32)  # (H, A)
        t2 = time.perf_counter()
        self._prev_norm, self._prev_env, self._prev_step = x, actions, int(obs.step)
        info = {"sampler": sc.name, "denoise_steps": calls, "warm_start": warm, "perturbed": perturbed,
                "inpainted": 0 if prefix is None else int(prefix.shape[1]),
                "encoder_ms": (t1 - t0) * 1e3, "sampler_ms": (t2 - t1) * 1e3 - pred_ms, "predictor_ms": pred_ms,
                "inference_ms": (t2 - t0) * 1e3}
        if speed is not None:
            info["action_speed"] = speed
        return ActionChunk(actions=actions, stamp=obs.stamp, info=info)

    # ------------------------------------------------------------------ internals
    def _graphed(self, name: str, modules: tuple[torch.nn.Module, ...], fn: Any, *xs: torch.Tensor) -> torch.Tensor:
        """fn(*xs), replayed from a CUDA graph when this policy has them (CUDA device), else run directly."""
        if self._graphs is not None:
            return self._graphs.run_callable(name, modules, fn, *xs)
        return fn(*xs)

    def _encode_fn(self, imgs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._dtype == torch.bfloat16,
                            cache_enabled=False):
            return self.model.encode(imgs, states)

    def _predict_fn(self, feats: torch.Tensor, prev: torch.Tensor, n_exec: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._dtype == torch.bfloat16,
                            cache_enabled=False):
            return self.model.predictor(feats, prev, n_exec)

    def _model_fn(self, cond: torch.Tensor):  # noqa: ANN202 - returns a ModelFn
        use_bf16 = self._dtype == torch.bfloat16
        cond = cond.to(self.device, self._dtype)

        def unet(x: torch.Tensor, tt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            # no autocast weight-cast cache: a captured graph must not depend on it
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16, cache_enabled=False):
                return self.model.unet(x, tt, c).float()

        def fn(x: torch.Tensor, t: int) -> torch.Tensor:
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=self.device)
            xd = x.to(self.device, self._dtype)
            if self._graphs is not None:
                out = self._graphs.run_callable("unet", (self.model.unet,), unet, xd, tt, cond)
            else:
                out = unet(xd, tt, cond)
            return out.cpu()  # schedule math on CPU in fp32

        return fn

    def _history_steps(self, step: int, have_steps: list[int]) -> list[int]:
        """Steps of the To frames conditioning the chunk at `step`: the nearest recorded frame at or before
        step - stride*j (the current frame repeated at an episode's start, as in training's padding)."""
        m = self.cfg.model
        have = sorted(have_steps)
        out = []
        for j in range(m.obs_horizon - 1, -1, -1):
            want = step - m.obs_stride * j
            cands = [s for s in have if s <= want]
            out.append(cands[-1] if cands else have[0])
        return out

    def _encode_history(self, obs: Observation) -> torch.Tensor:
        m = self.cfg.model
        with self._obs_lock:
            snapshot = dict(self._obs)
        steps = self._history_steps(int(obs.step), list(snapshot))
        todo = [s for s in dict.fromkeys(steps) if s not in self._feat_cache]
        if todo:
            imgs = torch.stack([self._preprocess(snapshot[s]) for s in todo])[None]  # (1, n, Ncam, 3, c, c)
            states = torch.stack([torch.as_tensor(np.asarray(snapshot[s].state, np.float32)) for s in todo])[None]
            f = self._graphed("encoder", (self.model,), self._encode_fn, imgs.to(self.device),
                              self.model.normalize_state(states.to(self.device)))
            for s, fs in zip(todo, f[0].float().cpu()):
                self._feat_cache[s] = fs
        out = torch.stack([self._feat_cache[s] for s in steps])[None]  # (1, To, F)
        # evict the oldest entries only after reading: a frame still needed may be the oldest one
        for old in [k for k in self._feat_cache if k not in steps][: max(0, len(self._feat_cache) - 2 * m.obs_horizon - 2)]:
            del self._feat_cache[old]
        return out

    def _preprocess(self, obs: Observation) -> torch.Tensor:
        """uint8 (H, W, 3) per camera -> uint8 (Ncam, 3, crop, crop) exactly as in training (resize, crop)."""
        m = self.cfg.model
        out = []
        for cam in m.cameras:
            img = np.asarray(obs.images[cam])
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise UserError(f"camera {cam}: expected uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
            small = resize_image(img, m.resize_to)  # (r, r, 3)
            out.append(center_crop(torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1), m.crop_size))
        return torch.stack(out)


# ---------------------------------------------------------------------- checkpoint I/O


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: str | Path, model: DiffusionModel, cfg: DiffusionConfig,
                    extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write config.json + model.safetensors (+ data.json) atomically. Float weights stored as `dtype`
    (fp16 halves the size; buffers holding normalisation stats stay fp32)."""
    from safetensors.torch import save

    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    stats = {"action_min", "action_max", "state_min", "state_max"}
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.is_floating_point() and k not in stats:
            v = v.to(dtype)
        tensors[k] = v
    _atomic_write_bytes(d / WEIGHTS_FILE, save(tensors, metadata={"format": "vla_runtime.diffusion/1"}))
    _atomic_write_bytes(d / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2).encode())
    if extra is not None:
        _atomic_write_bytes(d / DATA_FILE, json.dumps(extra, indent=2).encode())
    return d


def load_model(ckpt_dir: str | Path) -> tuple[DiffusionModel, DiffusionConfig]:
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(f"{d} is not a diffusion checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = DiffusionConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{d / CONFIG_FILE}: invalid config: {e}") from None
    model = DiffusionModel(cfg.model)
    sd = load_file(str(d / WEIGHTS_FILE))
    ref = model.state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    if missing or unexpected:
        raise UserError(f"{d / WEIGHTS_FILE} does not match config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()})
    return model.float().eval(), cfg


def load_diffusion_policy(ckpt_dir: Path | str, device: str = "cpu", sampler: str | None = None,
                          **kw: Any) -> DiffusionPolicy:
    """Load a checkpoint directory as a `DiffusionPolicy`.

    sampler: ddpm | ddim<k> | step<k> | predictor (None = the checkpoint's default). Extra keyword arguments
    override `SamplerConfig` fields (eta, step_start_t, stall_eps, sigma_stall, sigma_scale, perturb, seed,
    dtype, first_chunk_steps, warm_source), `cuda_graphs` (bool; default on for CUDA) and `cpu_trace` (bool;
    default on for CPU float32); unknown ones raise UserError."""
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    model, cfg = load_model(ckpt_dir)
    cuda_graphs = kw.pop("cuda_graphs", None)
    cpu_trace = kw.pop("cpu_trace", None)
    known = set(SamplerConfig.__dataclass_fields__)
    bad = sorted(set(kw) - known)
    if bad:
        raise UserError(f"unknown diffusion sampler options {bad}; valid: {sorted(known - {'name'})}")
    fields_ = {**cfg.sampler.__dict__, **kw}
    if sampler is not None:
        fields_["name"] = sampler
    cfg.sampler = SamplerConfig(**fields_)
    if cfg.sampler.step_start_t > cfg.schedule.num_train_timesteps:
        raise UserError(f"step_start_t {cfg.sampler.step_start_t} > T = {cfg.schedule.num_train_timesteps}")
    return DiffusionPolicy(model, cfg, device=device, cuda_graphs=cuda_graphs, cpu_trace=cpu_trace)
