"""VLA configuration: one JSON-serialisable dataclass saved as a checkpoint's `config.json`.

The anatomy follows OpenVLA / OpenVLA-OFT (Prismatic): vision tower -> projector -> decoder, with a proprio
projector and one of two action heads. Sizes default to what trains and runs on a 2-core CPU (see docs/VLA.md
for the measured trade-off); a real checkpoint replaces the decoder (and optionally the vision tower) through
`hf_loader`, and keeps the rest of this config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vla_runtime.errors import UserError

MODES = ("parallel", "ar")
DECODER_FAMILIES = ("llama", "qwen2", "gemma")
CONFIG_KIND = "vla"
CONFIG_VERSION = 1


@dataclass
class VLAConfig:
    """Model + data layout of a VLA policy.

    Token layout of one sample (positions are fixed by the layout, so dropping tokens leaves gaps, never shifts):
        [BOS] [visual cam0 (P)] [visual cam1 (P)] ... [proprio (1)] [text (max_text_len, right-padded)] [suffix]
    suffix, parallel mode: chunk_size * tokens_per_action learned action queries (bidirectional among themselves,
        they see every other token); AR mode: [ACT_START] + the first n-1 action tokens (teacher forcing), causal.
    """

    mode: str = "parallel"  # "parallel" (OFT: L1 MLP head, chunk in one pass) | "ar" (OpenVLA: 256-bin tokens)
    # vision (stock SiglipVisionModel built from these)
    cameras: tuple[str, ...] = ("agentview", "wrist")
    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int = 256
    # decoder (stock LlamaModel / Qwen2Model / GemmaModel built from these)
    decoder_family: str = "llama"
    hidden: int = 256
    layers: int = 8
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    intermediate: int = 768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    # text
    vocab_size: int = 64  # text vocabulary (tokenizer's); action bins come after it in AR mode
    max_text_len: int = 24
    # proprio / action
    state_dim: int = 8
    # the proprio dims the model sees (None: all); the others are zeroed before the projector, in training and at
    # inference alike. [6, 7] (gripper only) takes away the eef pose: the copycat shortcut of predicting the
    # motion from where the arm already is, instead of from where the object is in the images.
    proprio_dims: tuple[int, ...] | None = None
    action_dim: int = 7
    chunk_size: int = 8  # actions per inference
    n_action_steps: int = 8  # actions executed per chunk in a synchronous loop
    tokens_per_action: int = 1  # parallel mode: 1 query per action step (or action_dim, as in OFT)
    head_hidden: int = 256  # parallel head MLP width
    head_blocks: int = 2  # residual MLP blocks (OFT's MLPResNet)
    n_bins: int = 256  # AR mode: bins per action dimension
    control_hz: float = 20.0
    # provenance of a decoder loaded from a HF directory ("" = built from this config)
    hf_decoder_dir: str = ""
    hf_action_token_offset: int = -1  # AR with a real LM: first of the n_bins action token ids (-1: last n_bins)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        if self.mode not in MODES:
            raise UserError(f"VLA mode must be one of {MODES}, got {self.mode!r}")
        if self.decoder_family not in DECODER_FAMILIES:
            raise UserError(f"decoder_family must be one of {DECODER_FAMILIES}, got {self.decoder_family!r}")
        if not self.cameras:
            raise UserError("a VLA needs at least one camera")
        if self.image_size % self.patch_size:
            raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads % self.kv_heads:
            raise UserError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.vision_hidden % self.vision_heads:
            raise UserError("vision_hidden must be a multiple of vision_heads")
        if self.tokens_per_action not in (1, self.action_dim):
            raise UserError(f"tokens_per_action must be 1 or action_dim ({self.action_dim})")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise UserError(f"n_action_steps must be in [1, chunk_size={self.chunk_size}]")
        if self.n_bins < 2:
            raise UserError("n_bins must be >= 2")
        if self.proprio_dims is not None:
            self.proprio_dims = tuple(int(d) for d in self.proprio_dims)
            bad = [d for d in self.proprio_dims if not 0 <= d < self.state_dim]
            if bad or len(set(self.proprio_dims)) != len(self.proprio_dims):
                raise UserError(f"proprio_dims must be distinct state dims in [0, {self.state_dim}), "
                                f"got {list(self.proprio_dims)}")
        for name in ("hidden", "layers", "heads", "intermediate", "max_text_len", "vocab_size", "state_dim",
                     "action_dim", "chunk_size", "vision_layers"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"VLA config {name} must be >= 1, got {getattr(self, name)}")

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def patches_per_camera(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_visual(self) -> int:
        return self.patches_per_camera * len(self.cameras)

    @property
    def n_suffix(self) -> int:
        """Parallel: action queries; AR: ACT_START + n_action_tokens - 1 teacher-forced tokens."""
        if self.mode == "parallel":
            return self.chunk_size * self.tokens_per_action
        return self.n_action_tokens

    @property
    def n_action_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    @property
    def prefix_len(self) -> int:
        """BOS + visual + proprio + padded text."""
        return 1 + self.n_visual + 1 + self.max_text_len

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.n_suffix

    # ---- io -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cameras"] = list(self.cameras)
        return {"kind": CONFIG_KIND, "version": CONFIG_VERSION, **d}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "VLAConfig":
        d = dict(d)
        kind = d.pop("kind", CONFIG_KIND)
        ver = d.pop("version", CONFIG_VERSION)
        if kind != CONFIG_KIND:
            raise UserError(f"config kind is {kind!r}, not a VLA checkpoint")
        if ver != CONFIG_VERSION:
            raise UserError(f"VLA config version {ver}, expected {CONFIG_VERSION}")
        known = {f.name for f in fields(VLAConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown VLA config keys: {unknown}")
        return VLAConfig(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @staticmethod
    def load(path: str | Path) -> "VLAConfig":
        p = Path(path)
        try:
            return VLAConfig.from_dict(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read VLA config {p}: {e}") from None
