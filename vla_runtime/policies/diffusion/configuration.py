"""Configuration of the visuomotor diffusion policy: model shape, noise schedule, samplers, training.

Everything is a plain dataclass serialised to `config.json` in the checkpoint (no pickle); `__post_init__`
validates so a bad checkpoint or CLI value fails with a one-line `UserError` instead of a shape error deep in
the U-Net. Each field's comment is its help text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vla_runtime.errors import UserError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass
class ModelConfig:
    """Network shapes. Sized so the denoiser dominates the per-chunk cost (see docs/DIFFUSION.md)."""

    action_dim: int = 7  # env action dimension (OSC_POSE delta 6 + gripper)
    state_dim: int = 8  # proprio: eef pos 3, eef axis-angle 3, gripper qpos 2
    cameras: tuple[str, ...] = ("agentview", "wrist")  # camera names, order fixed by the checkpoint
    image_size: int = 128  # size of the images the policy receives (from the demos); resized to resize_to
    resize_to: int = 72  # images are area-resized to this square size before cropping
    crop_size: int = 64  # random crop (train) / centre crop (inference) size fed to the encoder
    obs_horizon: int = 2  # observation frames conditioning one chunk
    obs_stride: int = 8  # control steps between those frames (8 = the previous inference's frame in sync mode)
    horizon: int = 16  # actions per chunk (prediction horizon)
    n_action_steps: int = 8  # actions executed per chunk before the next inference
    enc_channels: tuple[int, ...] = (32, 64, 128)  # per-camera conv widths (strides 2, 2, 2, then 1)
    enc_keypoints: int = 32  # spatial-softmax keypoints per camera
    enc_feat_dim: int = 64  # per-camera feature size after the keypoint projection
    unet_channels: tuple[int, ...] = (64, 128, 256)  # 1D U-Net widths per level (horizon 16 -> 8 -> 4)
    unet_kernel: int = 5  # temporal conv kernel
    unet_groups: int = 8  # GroupNorm groups in the U-Net
    time_embed_dim: int = 128  # diffusion-step embedding size
    pred_hidden: int = 128  # STEP predictor width
    pred_blocks: int = 2  # STEP predictor cross-attention blocks
    pred_heads: int = 4  # STEP predictor attention heads

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        self.enc_channels = tuple(int(c) for c in self.enc_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        _check(self.action_dim >= 1 and self.state_dim >= 0, "action_dim must be >= 1 and state_dim >= 0")
        _check(len(self.cameras) >= 1, "the diffusion policy needs at least one camera")
        _check(self.crop_size <= self.resize_to, f"crop_size {self.crop_size} must be <= resize_to {self.resize_to}")
        _check(self.obs_horizon >= 1 and self.obs_stride >= 1, "obs_horizon and obs_stride must be >= 1")
        _check(1 <= self.n_action_steps <= self.horizon, "n_action_steps must be in [1, horizon]")
        n_down = len(self.unet_channels) - 1
        _check(self.horizon % (2 ** n_down) == 0,
               f"horizon {self.horizon} must be divisible by 2**{n_down} (U-Net levels {self.unet_channels})")
        _check(all(c % self.unet_groups == 0 for c in self.unet_channels),
               f"unet_channels {self.unet_channels} must be multiples of unet_groups {self.unet_groups}")
        _check(self.pred_hidden % self.pred_heads == 0, "pred_hidden must be divisible by pred_heads")

    @property
    def obs_feat_dim(self) -> int:
        """Features of one observation frame: every camera's features + the normalised state."""
        return len(self.cameras) * self.enc_feat_dim + self.state_dim

    @property
    def global_cond_dim(self) -> int:
        return self.obs_horizon * self.obs_feat_dim


@dataclass
class ScheduleConfig:
    """The forward noise process, shared by training and every sampler (so samplers are strategies only)."""

    num_train_timesteps: int = 100  # T: noise levels 1..T (level 0 is the clean sample)
    beta_schedule: str = "squaredcos_cap_v2"  # squared-cosine (Nichol & Dhariwal), betas capped at 0.999
    prediction_type: str = "epsilon"  # "epsilon" (Chi et al.'s default) or "sample" (predict x0 directly)
    clip_sample: bool = True  # clip the predicted x0 to [-1, 1] (actions are min-max normalised to that box)

    def __post_init__(self) -> None:
        _check(self.num_train_timesteps >= 2, "num_train_timesteps must be >= 2")
        _check(self.beta_schedule == "squaredcos_cap_v2",
               f"beta_schedule {self.beta_schedule!r} unsupported (only 'squaredcos_cap_v2')")
        _check(self.prediction_type in ("epsilon", "sample"),
               f"prediction_type must be 'epsilon' or 'sample', got {self.prediction_type!r}")


SAMPLER_RE = re.compile(r"^(ddpm|ddim(\d+)|step(\d+)|predictor)$")


@dataclass
class SamplerConfig:
    """Which sampler runs at inference, and the STEP warm-start / perturbation settings.

    Defaults: STEP's warm start is noised to level `step_start_t` (of T=100) and refined with k' evenly spaced
    DDIM steps; the stall test and sigmas follow STEP's simulation values (|dA| < 0.01, sigma 0.1), measured
    on our delta-action space as the mean commanded translation+rotation per step (see docs/DIFFUSION.md).
    """

    name: str = "ddim10"  # ddpm | ddim<k> | step<k> | predictor
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like posterior noise)
    first_chunk_steps: int = 10  # DDIM steps for an episode's first chunk under STEP (no previous chunk)
    step_start_t: int = 30  # noise level the predictor's chunk is noised to before refinement (0..T)
    stall_eps: float = 0.01  # |dA| below this (env action units, mean over executed steps) counts as a stall
    stall_dims: int = 6  # leading action dims measured for the stall test (OSC translation + rotation)
    sigma_stall: float = 0.1  # std (normalised action units) of noise added to the warm start on a stall
    sigma_scale: float = 1.0  # scale of the forward noise added to the warm start when not stalled
    perturb: bool = True  # velocity-aware perturbation on/off (STEP only)
    warm_source: str = "predictor"  # STEP's proposal: "predictor" (STEP) or "shift" (ablation: the previous chunk
    #                                  shifted by the executed steps, no predictor: a plain warm start)
    seed: int | None = 0  # sampler noise seed (reset() re-seeds, so episodes are reproducible); None = random
    inpaint_committed: bool = True  # async: inpaint the actions committed during inference (obs.committed_actions)
    dtype: str = "float32"  # network compute dtype: float32 (fastest for batch-1 convs on CPU, measured) or bfloat16

    def __post_init__(self) -> None:
        m = SAMPLER_RE.match(self.name)
        _check(m is not None, f"unknown sampler {self.name!r}; valid: ddpm, ddim<k> (e.g. ddim10), "
                              "step<k> (e.g. step2), predictor")
        _check(self.kind in ("ddpm", "predictor") or self.k >= 1, f"sampler {self.name!r}: k must be >= 1")
        _check(self.eta >= 0.0, "eta must be >= 0")
        _check(self.first_chunk_steps >= 1, "first_chunk_steps must be >= 1")
        _check(self.step_start_t >= 0, "step_start_t must be >= 0")
        _check(self.stall_eps >= 0 and self.sigma_stall >= 0 and self.sigma_scale >= 0,
               "stall_eps, sigma_stall and sigma_scale must be >= 0")
        _check(self.dtype in ("bfloat16", "float32"), f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        _check(self.warm_source in ("predictor", "shift"),
               f"warm_source must be predictor or shift, got {self.warm_source!r}")

    @property
    def kind(self) -> str:
        n = self.name
        return "ddpm" if n == "ddpm" else "predictor" if n == "predictor" else n[:4]

    @property
    def k(self) -> int:
        """Denoiser calls per chunk for ddim<k>/step<k> (0 for ddpm/predictor, which decide themselves)."""
        m = SAMPLER_RE.match(self.name)
        assert m is not None
        return int(m.group(2) or m.group(3) or 0)


@dataclass
class TrainConfig:
    """Training hyper-parameters (Chi et al.'s recipe scaled to a 2-core CPU)."""

    steps: int = 20000  # optimiser steps
    batch_size: int = 64
    lr: float = 3e-4  # AdamW learning rate (cosine decay after warmup)
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    ema_decay: float = 0.995  # EMA of the weights used for inference (power-warmup as in Chi et al.)
    pred_lr: float = 1e-3  # STEP predictor learning rate (trained jointly on detached encoder features)
    pred_input_noise: float = 0.05  # std of noise added to the predictor's previous-chunk input (normalised)
    save_every: int = 1000  # checkpoint period (steps)
    log_every: int = 50  # loss log period (steps)
    num_threads: int = 1  # torch threads (1: OpenMP barriers thrash on a shared, oversubscribed CPU)
    bf16: bool = False  # bf16 autocast (measured slower than fp32 for these conv shapes on this CPU)
    seed: int = 0
    max_demos: int | None = None  # use at most this many demos (None = all)

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        _check(self.lr > 0 and self.pred_lr > 0, "learning rates must be > 0")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        _check(self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1")


@dataclass
class DiffusionConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    env: str = ""  # env the demos came from (informational)
    task: str = ""

    def __post_init__(self) -> None:
        _check(self.sampler.step_start_t <= self.schedule.num_train_timesteps,
               f"step_start_t {self.sampler.step_start_t} > num_train_timesteps {self.schedule.num_train_timesteps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DiffusionConfig":
        """Build from JSON; unknown keys are an error (a typo should not silently fall back to a default)."""
        parts: dict[str, Any] = {}
        types = {"model": ModelConfig, "schedule": ScheduleConfig, "sampler": SamplerConfig, "train": TrainConfig}
        for key, val in d.items():
            if key in types:
                cls = types[key]
                known = {f.name for f in fields(cls)}
                bad = set(val) - known
                _check(not bad, f"config.{key}: unknown keys {sorted(bad)}")
                parts[key] = cls(**val)
            elif key in ("env", "task"):
                parts[key] = val
            else:
                raise UserError(f"config: unknown key {key!r}")
        return DiffusionConfig(**parts)
