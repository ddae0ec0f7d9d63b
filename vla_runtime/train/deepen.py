"""Depth up-scaling of a VLA checkpoint: a deeper decoder initialised from a shallower one.

Each source decoder layer i becomes `factor` consecutive layers (i -> factor*i ... factor*i + factor - 1), as in
depth up-scaling (SOLAR, Kim et al. 2023), so every layer of the deeper model starts from trained weights and no
layer is a bolted-on identity. The result is a starting point for `train_vla --init-from DIR` (it is not a usable
policy before training: a duplicated residual layer applies its update twice).

    python -m vla_runtime.train.deepen vla_lift_ar /work/ckpt/vla_lift_ar_x2_init --factor 2
    python -m vla_runtime.train.train_vla --init-from /work/ckpt/vla_lift_ar_x2_init --mode ar ...
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def deepen(state_dict: dict[str, torch.Tensor], layers: int, factor: int) -> dict[str, torch.Tensor]:
    """Return a state dict whose decoder has layers * factor layers, layer i copied to i*factor .. i*factor+factor-1."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value.float().clone()
            continue
        i = int(m.group(1))
        if i >= layers:
            raise ValueError(f"{key}: layer {i} >= the config's {layers} layers")
        for j in range(factor):
            out[f"decoder.layers.{i * factor + j}.{m.group(2)}"] = value.float().clone()
    return out


def deepen_checkpoint(src: str | Path, out: str | Path, factor: int = 2) -> Path:
    """Write a checkpoint directory whose decoder is `factor` x deeper (see `deepen`) with the project's checkpoint
    writer; tokenizer and normalisation are the source's. Refuses checkpoints that wrap a Hugging Face decoder."""
    from dataclasses import replace

    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.vla.modeling import VLAModel
    from vla_runtime.policies.vla.policy import save_checkpoint
    from vla_runtime.policies.vla.tokenizer import load_tokenizer

    src = Path(resolve_checkpoint(str(src)))
    cfg = VLAConfig.load(src / "config.json")
    if cfg.hf_decoder_dir:
        raise UserError(f"{src}: wraps a Hugging Face decoder; deepen only works on the built-in decoder")
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise UserError(f"{out} already holds a checkpoint; choose a new directory")
    tok = load_tokenizer(src)
    model = VLAModel(replace(cfg, layers=cfg.layers * factor), bos_id=tok.bos_id)
    model.load_state_dict(deepen(load_file(str(src / "model.safetensors")), cfg.layers, factor), strict=True)
    save_checkpoint(model, tok, json.loads((src / "stats.json").read_text()), out)
    (out / "train_info.json").write_text(json.dumps({"deepened_from": str(src), "factor": factor,
                                                      "layers": model.n_layers}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="VLA checkpoint (shipped name or directory)")
    ap.add_argument("out", help="directory for the deeper initial checkpoint")
    ap.add_argument("--factor", type=int, default=2)
    a = ap.parse_args(argv)
    try:
        out = deepen_checkpoint(a.src, a.out, a.factor)
    except (UserError, ValueError) as e:
        raise SystemExit(f"deepen: {e}") from None
    print(json.dumps({"out": str(out), "layers": VLAConfig.load(out / "config.json").layers}))


if __name__ == "__main__":
    main()
