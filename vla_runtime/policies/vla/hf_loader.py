"""Wrap a user's local Hugging Face checkpoint into the same layer loop (no network, stock transformers classes).

Supported directories (config.json `model_type`):
  llama / qwen2 / gemma           a causal LM (`*ForCausalLM`): its decoder (`.model`) becomes the VLA decoder
  llava (text llama/qwen2/gemma)  a VLM: its language model is the decoder; its vision tower feeds our projector

The VLA-specific parts (vision tower for a bare LM, projectors, action queries, heads) come from
`vla_parts.safetensors` + `vla_config.json` in the same directory when present (written by `save_vla_parts`);
otherwise they are freshly initialised and a warning says the actions are meaningless (bring-up and latency
benchmarks of a real-size decoder). AR mode follows OpenVLA: the action tokens are the last `n_bins` vocabulary
entries and the AR head starts from those rows of the LM head.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.heads import ARActionHead
from vla_runtime.policies.vla.modeling import VLAModel
from vla_runtime.policies.vla.tokenizer import HFTokenizer, WordTokenizer, has_hf_tokenizer

log = logging.getLogger(__name__)

LM_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}
VLM_TYPES = ("llava",)
PARTS_FILE = "vla_parts.safetensors"
PARTS_CONFIG = "vla_config.json"


def read_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path, "config.json")
    if not p.is_file():
        raise UserError(f"{path} has no config.json")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e})") from None


class _VisionAdapter(nn.Module):
    """A VLM's vision tower behind the interface VLAModel uses (`config.hidden_size`, `.last_hidden_state`)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.config = tower.config

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.tower(pixel_values=pixel_values)


def _load_lm(path: Path, family: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module | None]:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                  attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the {family} checkpoint in {path}: {e}") from None
    return lm.model, getattr(lm, "lm_head", None)


def _load_vlm(path: Path, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module | None, int]:
    from transformers import AutoModelForImageTextToText

    try:
        vlm = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                          attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the VLM checkpoint in {path}: {e}") from None
    inner = vlm.model
    image_size = int(getattr(inner.vision_tower.config, "image_size", 224))
    return inner.language_model, inner.vision_tower, getattr(vlm, "lm_head", None), image_size


def load_hf_vla(path: str | Path, mode: str = "parallel", device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                base: VLAConfig | None = None) -> tuple[VLAModel, WordTokenizer | HFTokenizer, dict[str, np.ndarray]]:
    """(model on `device` in `dtype`, tokenizer, normalisation stats) from a local HF directory."""
    from vla_runtime.policies.vla.policy import load_stats

    d = Path(path)
    hc = read_hf_config(d)
    mt = hc.get("model_type", "")
    vision: nn.Module | None = None
    image_size = None
    if mt in LM_FAMILIES:
        family = LM_FAMILIES[mt]
        decoder, lm_head = _load_lm(d, family, dtype)
    elif mt in VLM_TYPES:
        tmt = (hc.get("text_config") or {}).get("model_type", "llama")
        if tmt not in LM_FAMILIES:
            raise UserError(f"{d}: VLM language model type {tmt!r} not supported (llama, qwen2, gemma)")
        family = LM_FAMILIES[tmt]
        decoder, tower, lm_head, image_size = _load_vlm(d, dtype)
        vision = _VisionAdapter(tower)
    else:
        raise UserError(f"{d}: model_type {mt!r} not supported; expected one of "
                        f"{sorted(LM_FAMILIES) + list(VLM_TYPES)} (a stock transformers decoder)")
    dc = decoder.config
    parts_cfg = d / PARTS_CONFIG
    if parts_cfg.is_file():
        cfg = VLAConfig.load(parts_cfg)
        if cfg.mode != mode:
            log.info("%s: using the mode of its VLA parts (%s)", d, cfg.mode)
    else:
        b = base or VLAConfig(mode=mode)
        n_bins = b.n_bins
        cfg = replace(b, mode=mode, decoder_family=family, hidden=int(dc.hidden_size),
                      layers=int(dc.num_hidden_layers), heads=int(dc.num_attention_heads),
                      kv_heads=int(getattr(dc, "num_key_value_heads", dc.num_attention_heads)),
                      head_dim=int(getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads),
                      intermediate=int(dc.intermediate_size), vocab_size=int(dc.vocab_size) - n_bins,
                      image_size=image_size or b.image_size, hf_decoder_dir=str(d),
                      head_hidden=max(b.head_hidden, 256))
    if has_hf_tokenizer(d):
        tok: WordTokenizer | HFTokenizer = HFTokenizer(d)
    else:
        log.warning("%s has no tokenizer files: using an empty word vocabulary (instructions map to <unk>)", d)
        tok = WordTokenizer([])
    offset = cfg.hf_action_token_offset if cfg.hf_action_token_offset >= 0 else None
    model = VLAModel(cfg, decoder=decoder, vision=vision, bos_id=tok.bos_id, action_token_offset=offset)
    parts = d / PARTS_FILE
    if parts.is_file():
        from safetensors.torch import load_file

        sd = load_file(str(parts))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("decoder.") and not k.endswith("inv_freq")
                   and not (vision is not None and k.startswith("vision."))]
        if missing or unexpected:
            raise UserError(f"{parts} does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    else:
        log.warning("%s has no %s: vision/projector/head weights are random (latency bring-up only)", d, PARTS_FILE)
        if cfg.mode == "ar" and lm_head is not None and isinstance(model.head, ARActionHead):
            rows = lm_head.weight[model.action_token_offset:model.action_token_offset + cfg.n_bins]
            with torch.no_grad():
                model.head.proj.weight.copy_(rows.float())
    model = model.to(device=device, dtype=dtype).eval()
    return model, tok, load_stats(d, cfg)


def save_vla_parts(model: VLAModel, hf_dir: str | Path) -> Path:
    """Write the non-decoder weights (and their config) next to a HF checkpoint so `load_hf_vla` restores them."""
    from safetensors.torch import save_file

    d = Path(hf_dir)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    save_file(sd, str(d / PARTS_FILE))
    model.cfg.save(d / PARTS_CONFIG)
    return d / PARTS_FILE
