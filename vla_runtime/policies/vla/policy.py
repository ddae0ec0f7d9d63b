"""`VLAPolicy`: the Policy protocol over a `VLAModel`, plus checkpoint save/load and the acceleration registry.

Checkpoint directory (no pickle): config.json (VLAConfig), model.safetensors, vla_tokenizer.json (or a real
checkpoint's HF tokenizer files), stats.json (min/max used to normalise actions and proprio to [-1, 1]).

Accelerations ("specprune", "earlyexit", ...) are strategies that plug into the layer loop. Later work registers
a factory in `ACCELERATIONS`: `factory(model: VLAModel, **options) -> TokenPruner | ExitPolicy`; an object with
`before_layer` becomes the pruner, one with `after_layer` the exit policy.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from vla_runtime.errors import UserError
from vla_runtime.policies.dtypes import (DTYPES, cpu_has_native_bf16, resolve_dtype,  # noqa: F401 (re-exported)
                                        weight_file_bytes)
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.lean_layers import use_lean_layers
from vla_runtime.policies.vla.modeling import (ExitPolicy, StepContext, TokenPruner, VLAModel, count_params,
                                              use_fp32_small_batch)
from vla_runtime.policies.vla.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from vla_runtime.runtime.types import ActionChunk, Observation, PolicySpec

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATS_FILE = "stats.json"

# name -> factory(model, **options) returning a TokenPruner (has before_layer) or an ExitPolicy (has after_layer)
ACCELERATIONS: dict[str, Callable[..., Any]] = {}


def register_acceleration(name: str, factory: Callable[..., Any]) -> None:
    ACCELERATIONS[name] = factory


# modules whose import registers accelerations; imported lazily (they import this module: no import cycle)
ACCELERATION_MODULES: tuple[str, ...] = ("vla_runtime.policies.vla.specprune", "vla_runtime.policies.vla.early_exit")


def load_accelerations() -> dict[str, Callable[..., Any]]:
    """Import the built-in acceleration modules (once) so their names are in `ACCELERATIONS`."""
    import importlib

    for mod in ACCELERATION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a module not written yet; any other import error propagates
            if e.name != mod:
                raise
    return ACCELERATIONS


# ---------------------------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------------------------
class Normalizer:
    """Min-max to [-1, 1] per dimension; dimensions with (almost) no range map to 0 and back to their min."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray) -> None:
        self.lo = np.asarray(lo, np.float32)
        self.hi = np.asarray(hi, np.float32)
        self.rng = np.where(self.hi - self.lo > 1e-6, self.hi - self.lo, 1.0).astype(np.float32)
        self.flat = (self.hi - self.lo) <= 1e-6

    def normalize(self, x: np.ndarray) -> np.ndarray:
        y = 2.0 * (np.asarray(x, np.float32) - self.lo) / self.rng - 1.0
        return np.where(self.flat, 0.0, np.clip(y, -1.5, 1.5)).astype(np.float32)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        x = (np.asarray(y, np.float32) + 1.0) * 0.5 * self.rng + self.lo
        return np.where(self.flat, self.lo, x).astype(np.float32)


def save_stats(ckpt_dir: str | Path, stats: dict[str, list[float]]) -> None:
    Path(ckpt_dir, STATS_FILE).write_text(json.dumps(stats, indent=1))


def load_stats(ckpt_dir: str | Path, cfg: VLAConfig) -> dict[str, np.ndarray]:
    p = Path(ckpt_dir, STATS_FILE)
    if not p.is_file():  # e.g. a bare HF decoder: identity normalisation
        return {"action_min": -np.ones(cfg.action_dim, np.float32), "action_max": np.ones(cfg.action_dim, np.float32),
                "state_min": -np.ones(cfg.state_dim, np.float32), "state_max": np.ones(cfg.state_dim, np.float32)}
    d = json.loads(p.read_text())
    out = {k: np.asarray(d[k], np.float32) for k in ("action_min", "action_max", "state_min", "state_max")}
    if out["action_min"].shape != (cfg.action_dim,) or out["state_min"].shape != (cfg.state_dim,):
        raise UserError(f"{p}: stats shapes do not match the config (action_dim {cfg.action_dim}, "
                        f"state_dim {cfg.state_dim})")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------------------------
def images_to_tensor(obs: Observation, cameras: tuple[str, ...], size: int) -> torch.Tensor:
    """obs.images (uint8 HxWx3 per camera) -> (1, C, 3, size, size) float in [-1, 1]."""
    frames = []
    for cam in cameras:
        if cam not in obs.images:
            raise UserError(f"the VLA needs camera {cam!r}; the observation has {sorted(obs.images)}")
        img = np.asarray(obs.images[cam])
        if img.ndim != 3 or img.shape[2] != 3:
            raise UserError(f"camera {cam!r}: expected (H, W, 3) uint8, got {img.shape}")
        frames.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    x = torch.stack(frames).float()  # (C, 3, H, W)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0)[None]


class VLAPolicy:
    """A VLA as a runtime `Policy`: one forward (parallel) or one prefill + token loop (AR) per chunk."""

    def __init__(self, model: VLAModel, tokenizer: WordTokenizer | HFTokenizer, stats: dict[str, np.ndarray],
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 pruner: TokenPruner | None = None, exit_policy: ExitPolicy | None = None, name: str = "vla",
                 accel: tuple[str, ...] = (), cuda_graphs: bool | None = None,
                 cpu_decode_fp32: bool | None = None, cpu_lean_layers: bool | None = None) -> None:
        """cuda_graphs: replay decoder layers from CUDA graphs (see cuda_graphs.py); None = on for CUDA devices.
        cpu_lean_layers: on the CPU, Llama / Qwen2 layers run a lean fused forward at inference (lean_layers.py,
        same results); cpu_decode_fp32: on the CPU with bf16/fp16 weights, AR decode steps run in float32 after
        the bf16 prefill (faster for one row). None = on for models up to 200M decoder parameters (AR only for
        the second). dtype None: `resolve_dtype("auto", device)`."""
        self.cfg = model.cfg
        self.device = torch.device(device)
        if dtype is None:
            dtype = resolve_dtype("auto", str(self.device))
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        small_cpu = self.device.type == "cpu" and count_params(self.model.decoder) <= 200_000_000
        if cpu_lean_layers is None:
            cpu_lean_layers = small_cpu
        if cpu_decode_fp32 is None:
            cpu_decode_fp32 = small_cpu and model.cfg.mode == "ar" and dtype != torch.float32
        self.set_cpu_paths(lean_layers=bool(cpu_lean_layers), decode_fp32=bool(cpu_decode_fp32))
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type == "cuda":
            from vla_runtime.policies.vla.cuda_graphs import LayerGraphs

            if self.model.layer_graphs is None:  # policies sharing a model share its graphs
                self.model.layer_graphs = LayerGraphs()
        elif not cuda_graphs:
            self.model.layer_graphs = None
        self.tokenizer = tokenizer
        self.act_norm = Normalizer(stats["action_min"], stats["action_max"])
        self.state_norm = Normalizer(stats["state_min"], stats["state_max"])
        self.pruner, self.exit_policy = pruner, exit_policy
        self.accel = accel
        c = self.cfg
        self.spec = PolicySpec(action_dim=c.action_dim, chunk_size=c.chunk_size, n_action_steps=c.n_action_steps,
                               cameras=tuple(c.cameras), image_size=c.image_size, state_dim=c.state_dim,
                               control_hz=c.control_hz, name=name)
        self.memory: dict[str, Any] = {}
        self._instruction: str | None = None
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None

    def _encode_text(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer.encode(instruction)
        T = self.cfg.max_text_len
        if len(ids) > T:
            log.warning("instruction has %d tokens, truncated to max_text_len=%d", len(ids), T)
            ids = ids[:T]
        t = torch.full((1, T), self.tokenizer.pad_id, dtype=torch.long)
        t[0, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        v = torch.zeros(1, T, dtype=torch.bool)
        v[0, :len(ids)] = True
        return t.to(self.device), v.to(self.device)

    def set_cpu_paths(self, lean_layers: bool | None = None, decode_fp32: bool | None = None) -> None:
        """Switch the CPU fast paths (None: leave as is): lean fused layers, float32 AR decode steps (see
        lean_layers.py, SmallBatchLinear). A model is shared by the policies forked from it: this sets it for
        all of them."""
        if lean_layers is not None:
            self.cpu_lean_layers = bool(lean_layers)
            use_lean_layers(self.model.decoder, self.cpu_lean_layers)
        if decode_fp32 is not None:
            self.cpu_decode_fp32 = bool(decode_fp32)
            self.model.decode_fp32 = self.cpu_decode_fp32
            for part in (self.model.decoder, self.model.head):
                use_fp32_small_batch(part, self.cpu_decode_fp32)

    def reset(self, instruction: str) -> None:
        self.memory = {}
        self._instruction = instruction
        self._text = self._encode_text(instruction)

    def on_action(self, action: np.ndarray) -> bool:
        """Runtime hook (see runtime/types.py): each executed action goes to strategies that define
        `on_action(action, memory) -> bool` (e.g. SpecPrune's coarse/fine controller); True asks for a replan."""
        replan = False
        for strategy in (self.pruner, self.exit_policy):
            hook = getattr(strategy, "on_action", None)
            if hook is not None and hook(action, self.memory):
                replan = True
        return replan

    def act(self, obs: Observation) -> ActionChunk:
        t_start = time.perf_counter()
        if self._text is None or obs.instruction != self._instruction:
            self.reset(obs.instruction)
        assert self._text is not None
        state = np.asarray(obs.state, np.float32)
        if state.shape != (self.cfg.state_dim,):
            raise UserError(f"the VLA needs a state of shape ({self.cfg.state_dim},), got {state.shape}")
        images = images_to_tensor(obs, self.cfg.cameras, self.cfg.image_size).to(self.device, self.dtype)
        st = torch.from_numpy(self.state_norm.normalize(state))[None].to(self.device, self.dtype)
        ctx = StepContext(n_layers=self.model.n_layers, mode=self.cfg.mode, memory=self.memory)
        ctx.extra["step"] = obs.step
        timings: dict[str, float] = {}
        with torch.inference_mode():
            a, ctx = self.model.predict(images, st, self._text[0], self._text[1], pruner=self.pruner,
                                        exit_policy=self.exit_policy, ctx=ctx, timings=timings)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # targets were in [-1, 1]: clamp before mapping back to the env's range
        actions = self.act_norm.unnormalize(a[0].float().clamp(-1, 1).cpu().numpy())  # (chunk, A)
        self.memory["prev_actions"] = actions
        info: dict[str, Any] = {k: round(v, 3) for k, v in timings.items()}
        info.update(inference_ms=round((time.perf_counter() - t_start) * 1e3, 3), tokens_per_layer=ctx.tokens_per_layer,
                    visual_tokens_per_layer=ctx.visual_per_layer, exit_layer=ctx.exit_layer,
                    n_layers=self.model.n_layers, mode=self.cfg.mode, accel=list(self.accel))
        if "decode_exit_layers" in ctx.extra:
            info["decode_exit_layers"] = ctx.extra["decode_exit_layers"]
        if ctx.tokens_per_layer:  # numeric: the eval summary averages these per episode
            info["mean_tokens"] = round(float(np.mean(ctx.tokens_per_layer)), 3)
            info["mean_visual_tokens"] = round(float(np.mean(ctx.visual_per_layer)), 3)
        info.update(ctx.extra.get("info", {}))  # what the strategies report (pruning mode, kept counts...)
        return ActionChunk(actions=actions, stamp=obs.stamp, info=info)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(model: VLAModel, tokenizer: WordTokenizer, stats: dict[str, list[float]], out_dir: str | Path,
                    extra_state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory atomically (tmp dir + rename). `dtype` casts the saved weights (bf16 to ship)."""
    import os
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.cfg.save(tmp / "config.json")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(tmp)
    save_stats(tmp, stats)
    if extra_state:
        save_file({k: v.contiguous().cpu() for k, v in extra_state.items()}, str(tmp / "train_state.safetensors"))
    if out.is_dir():  # carry over files the checkpoint does not write (the loss log, notes)
        for f in out.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.name != "train_state.safetensors":
                shutil.copy2(f, tmp / f.name)
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def load_model(ckpt_dir: str | Path, tokenizer: WordTokenizer | HFTokenizer | None = None) -> VLAModel:
    """Build the model from config.json and load model.safetensors (strict: every key must match)."""
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    cfg = VLAConfig.load(d / "config.json")
    bos = tokenizer.bos_id if tokenizer is not None else 1
    model = VLAModel(cfg, bos_id=bos)
    wp = d / WEIGHTS_FILE
    if not wp.is_file():
        raise UserError(f"{d} has no {WEIGHTS_FILE}")
    sd = load_file(str(wp))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"{wp}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def _device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def build_strategies(model: VLAModel, accel: tuple[str, ...], options: dict[str, Any] | None = None
                     ) -> tuple[TokenPruner | None, ExitPolicy | None]:
    """Instantiate the named accelerations from the registry (UserError for unknown names or conflicts)."""
    pruner: TokenPruner | None = None
    exit_policy: ExitPolicy | None = None
    options = options or {}
    load_accelerations()
    for name in accel:
        if name not in ACCELERATIONS:
            known = ", ".join(sorted(ACCELERATIONS)) or "none registered yet"
            raise UserError(f"unknown VLA acceleration {name!r} (available: {known})")
        obj = ACCELERATIONS[name](model, **options.get(name, {}))
        if hasattr(obj, "before_layer"):
            if pruner is not None:
                raise UserError(f"two token pruners requested ({accel}); pick one")
            pruner = obj
        elif hasattr(obj, "after_layer"):
            if exit_policy is not None:
                raise UserError(f"two exit policies requested ({accel}); pick one")
            exit_policy = obj
        else:
            raise TypeError(f"acceleration {name!r} factory returned {type(obj).__name__}, neither pruner nor exit")
    return pruner, exit_policy


def is_vla_checkpoint(ckpt_dir: str | Path) -> bool:
    p = Path(ckpt_dir, "config.json")
    try:
        return json.loads(p.read_text()).get("kind") == "vla"
    except (OSError, json.JSONDecodeError):
        return False


def load_vla_policy(ckpt_dir: str | Path, device: str = "cpu", accel: tuple[str, ...] = (), mode: str | None = None,
                    dtype: str = "auto", accel_options: dict[str, Any] | None = None, **kw: Any) -> VLAPolicy:
    """A VLA policy from a checkpoint directory: ours (config.json kind "vla") or a HF decoder/VLM directory
    (wrapped by `hf_loader`, see there). `mode` checks (ours) or picks (HF) the decoding mode."""
    d = Path(ckpt_dir)
    dev = _device(device)
    tdtype = resolve_dtype(dtype, dev, weight_bytes=weight_file_bytes(d))
    unknown_kw = sorted(set(kw) - {"env_name", "cuda_graphs", "cpu_decode_fp32", "cpu_lean_layers"})
    if unknown_kw:
        raise UserError(f"unknown VLA policy options: {unknown_kw}")
    load_accelerations()
    for name in accel:  # fail fast, before loading weights
        if name not in ACCELERATIONS:
            known = ", ".join(sorted(ACCELERATIONS)) or "none registered yet"
            raise UserError(f"unknown VLA acceleration {name!r} (available: {known})")
    if is_vla_checkpoint(d):
        tok = load_tokenizer(d)
        model = load_model(d, tok)
        if mode is not None and mode != model.cfg.mode:
            raise UserError(f"checkpoint {d} was trained for mode {model.cfg.mode!r}, not {mode!r}")
        stats = load_stats(d, model.cfg)
    else:
        from vla_runtime.policies.vla.hf_loader import load_hf_vla

        model, tok, stats = load_hf_vla(d, mode=mode or "parallel", device=dev, dtype=tdtype)
    model.checkpoint_dir = str(d)  # strategies find their files next to the weights (<ckpt>/exit_predictors)
    pruner, exit_policy = build_strategies(model, tuple(accel), accel_options)
    return VLAPolicy(model, tok, stats, device=dev, dtype=tdtype, pruner=pruner, exit_policy=exit_policy,
                     name=f"vla:{d.name}", accel=tuple(accel), cuda_graphs=kw.get("cuda_graphs"),
                     cpu_decode_fp32=kw.get("cpu_decode_fp32"), cpu_lean_layers=kw.get("cpu_lean_layers"))
