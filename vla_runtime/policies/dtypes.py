"""Compute dtype for policies: `auto` picks bf16 only where the hardware multiplies it natively."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vla_runtime.errors import UserError

log = logging.getLogger(__name__)


def cpu_has_native_bf16(flags: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16). Without it (e.g. AVX2-only CPUs)
    PyTorch emulates bf16 matmuls, measured 5-7x slower than float32 for this project's layer shapes
    (docs/VLA.md, "Session 15"). `flags`: the cpuinfo flags line (tests); default: read /proc/cpuinfo."""
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((ln for ln in f if ln.startswith("flags")), "")
        except OSError:
            flags = ""
        if not flags:  # not Linux: trust torch's own capability string
            return "AVX512" in str(torch.backends.cpu.get_cpu_capability())
    words = set(flags.split())
    return "avx512_bf16" in words or "amx_bf16" in words


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def available_memory_bytes() -> int | None:
    """Free + reclaimable physical memory (Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def weight_file_bytes(ckpt_dir: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) in a checkpoint directory (0 if none)."""
    d = Path(ckpt_dir)
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in d.glob(pat) if f.is_file())


def resolve_dtype(dtype: str, device: str, weight_bytes: int | None = None) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32', or 'auto': bf16 on CUDA (fp16 where the GPU lacks bf16) and on CPUs with native
    bf16 arithmetic, float32 on other CPUs (where bf16 is emulated and slower than float32) - unless a float32
    copy of the weights (at most 2x `weight_bytes`, the checkpoint's files) would take more than half the free
    memory, as a 7B checkpoint would: then bf16, slow but loadable."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_has_native_bf16():
            return torch.bfloat16
        avail = available_memory_bytes()
        if weight_bytes and avail and 2 * weight_bytes > avail // 2:
            log.warning("dtype auto: this CPU has no native bf16, but a float32 copy of %.1f GB of weights would "
                        "not fit in the free memory (%.1f GB); using bf16 (emulated, slow)", weight_bytes / 1e9,
                        avail / 1e9)
            return torch.bfloat16
        return torch.float32
    t = DTYPES.get(dtype)
    if t is None:
        raise UserError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return t
