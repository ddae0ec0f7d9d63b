"""Input validation shared by the kernel ops: bad shapes/dtypes raise UserError with a one-line message.

Checks that need the index *values* (bounds, order) read them back from the device, a sync on CUDA; every op
takes `check_indices=` so a hot loop that builds its indices itself can skip them.
"""

from __future__ import annotations

import torch

from vla_runtime.errors import UserError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(op: str, name: str, t: object, ndim: int | tuple[int, ...],
                 dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise UserError(f"{op}: {name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise UserError(f"{op}: {name} dtype {t.dtype} not supported; use one of "
                        f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    return t


def check_index_bounds(op: str, name: str, idx: torch.Tensor, size: int) -> None:
    """All entries in [0, size). Reads two scalars back (sync on CUDA)."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise UserError(f"{op}: {name} has entries in [{lo}, {hi}], outside [0, {size})")



def check_same_device(op: str, *tensors: torch.Tensor | None) -> None:
    """A Triton kernel dereferences raw pointers: every input must live on the kernel's device."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise UserError(f"{op}: inputs are on different devices ({sorted(map(str, devs))}); move them to one device")
