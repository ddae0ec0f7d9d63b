"""Compute dtype for policies: `auto` picks bf16 only where the hardware multiplies it natively."""

from __future__ import annotations

import torch

from vla_runtime.errors import UserError

def cpu_has_native_bf16(flags: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16). Without it (e.g. AVX2-only CPUs)
    PyTorch emulates bf16 matmuls, measured 5-7x slower than float32 for this project's layer shapes
    (docs/VLA.md, "dtype auto"). `flags`: the cpuinfo flags line (tests); default: read /proc/cpuinfo."""
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


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32', or 'auto': bf16 on CUDA (fp16 where the GPU lacks bf16) and on CPUs with native
    bf16 arithmetic, float32 on other CPUs (where bf16 is emulated and slower than float32)."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    t = DTYPES.get(dtype)
    if t is None:
        raise UserError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return t
