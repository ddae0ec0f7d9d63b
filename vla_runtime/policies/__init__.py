"""Policies: the `Policy` protocol's implementations, and the name -> policy registry used by the CLI.

Names:
  scripted                    privileged-state expert for the env's task (simulation only)
  diffusion:<ckpt>            visuomotor diffusion policy; <ckpt> a shipped name or a checkpoint directory
  vla:<ckpt>                  VLA (OFT-style parallel chunk or OpenVLA-style autoregressive tokens)
Shipped checkpoints live in `vla_runtime/policies/checkpoints/<name>/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_runtime.errors import UserError
from vla_runtime.runtime.types import Policy

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
POLICY_KINDS = ("scripted", "diffusion", "vla")


def shipped_checkpoints() -> dict[str, Path]:
    """Shipped checkpoint name -> directory (a directory with a config.json)."""
    if not CHECKPOINT_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(CHECKPOINT_DIR.iterdir()) if (p / "config.json").is_file()}


def list_policies() -> list[str]:
    out = ["scripted"]
    for name, path in shipped_checkpoints().items():
        kind = "vla" if name.startswith("vla") else "diffusion"
        out.append(f"{kind}:{name}")
    return out


def resolve_checkpoint(ref: str) -> Path:
    ships = shipped_checkpoints()
    if ref in ships:
        return ships[ref]
    p = Path(ref)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    raise UserError(f"checkpoint {ref!r} not found: not a shipped name ({', '.join(ships) or 'none shipped'}) "
                    "nor a directory holding config.json")


def make_policy(name: str, *, env_name: str = "", device: str = "cpu", accel: tuple[str, ...] = (),
                sampler: str | None = None, **kwargs: Any) -> Policy:
    """Build a policy from its CLI name. Raises UserError listing valid names when unknown."""
    kind, _, ref = name.partition(":")
    if kind == "scripted" and not ref:
        if accel:
            raise UserError(f"--accel {','.join(accel)} does not apply to the scripted expert")
        from vla_runtime.policies.scripted import ScriptedPolicy

        return ScriptedPolicy(env_name)
    if kind == "diffusion" and ref:
        from vla_runtime.policies.diffusion.policy import load_diffusion_policy

        return load_diffusion_policy(resolve_checkpoint(ref), device=device, sampler=sampler, **kwargs)
    if kind == "vla" and ref:
        from vla_runtime.policies.vla.policy import load_vla_policy

        return load_vla_policy(resolve_checkpoint(ref), device=device, accel=accel, **kwargs)
    raise UserError(f"unknown policy {name!r}; valid: {', '.join(list_policies())} "
                    "(or diffusion:<checkpoint dir>, vla:<checkpoint dir>)")
