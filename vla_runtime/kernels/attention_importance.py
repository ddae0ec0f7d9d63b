"""SpecPrune's text->vision attention score: how much attention each visual token receives.

importance[b, k] = mean over heads h and selected query rows q of attn[b, h, q, key_start + k]

`attn` is one decoder layer's attention probabilities (B, H, Q, N) (eager attention, `out[1]` of
`layer.self_attn`); `query_rows` are the rows of the text / proprio / action-query tokens; `key_range` is the
visual tokens' span [start, stop). The result (B, stop - start) float32 ranks visual tokens for pruning.

Why a kernel: the torch reference gathers Q-rows into a copy (B, H, R, Nk) before reducing; the fused kernel
reads each needed element once and writes per-head partials (B, H, Nk), summed by one small reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vla_runtime.errors import UserError
from vla_runtime.kernels._checks import INDEX_DTYPES, check_index_bounds, check_tensor
from vla_runtime.kernels.dispatch import BackendName, choose_backend, interpret_requested, load_triton_module

OP = "attention_importance"

QueryRows = torch.Tensor | Sequence[int] | range | slice
KeyRange = tuple[int, int] | range | slice


def _normalize(attn: torch.Tensor, query_rows: QueryRows, key_range: KeyRange,
               check_indices: bool) -> tuple[torch.Tensor, int, int]:
    """-> (rows (R,) int64 contiguous on attn's device, start, stop)."""
    check_tensor(OP, "attn", attn, 4)
    q_len, n = attn.shape[2], attn.shape[3]
    if isinstance(query_rows, slice):
        query_rows = range(*query_rows.indices(q_len))
    if isinstance(query_rows, torch.Tensor):
        if query_rows.dim() != 1 or query_rows.dtype not in INDEX_DTYPES:
            raise UserError(f"{OP}: query_rows must be a 1-D int64/int32 tensor, got shape "
                            f"{tuple(query_rows.shape)} dtype {query_rows.dtype}")
        rows = query_rows.to(device=attn.device, dtype=torch.int64).contiguous()
    else:
        rows = torch.as_tensor(list(query_rows), dtype=torch.int64, device=attn.device)
    if rows.numel() == 0:
        raise UserError(f"{OP}: query_rows is empty; the mean over no query rows is undefined")
    if check_indices:
        check_index_bounds(OP, "query_rows", rows, q_len)
    if isinstance(key_range, (range, slice)):
        if key_range.step not in (None, 1):
            raise UserError(f"{OP}: key_range must be contiguous (step 1), got step {key_range.step}")
        start, stop = key_range.start or 0, n if key_range.stop is None else key_range.stop
    else:
        try:
            start, stop = (int(v) for v in key_range)
        except (TypeError, ValueError) as e:
            raise UserError(f"{OP}: key_range must be (start, stop), got {key_range!r}") from e
    if not 0 <= start <= stop <= n:
        raise UserError(f"{OP}: key_range [{start}, {stop}) must lie within the {n} keys")
    return rows, start, stop


def attention_importance_torch(attn: torch.Tensor, query_rows: QueryRows, key_range: KeyRange, *,
                               check_indices: bool = True) -> torch.Tensor:
    """Reference: (B, H, Q, N) -> (B, stop - start) float32, accumulated in float32."""
    rows, start, stop = _normalize(attn, query_rows, key_range, check_indices)
    sel = attn[:, :, :, start:stop].index_select(2, rows).float()  # (B, H, R, Nk)
    return sel.mean(dim=(1, 2))


def attention_importance_triton(attn: torch.Tensor, query_rows: QueryRows, key_range: KeyRange, *,
                                check_indices: bool = True, block_r: int | None = None,
                                block_k: int | None = None, heads_per_program: int | None = None) -> torch.Tensor:
    """Triton kernel (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1); block sizes for tests."""
    rows, start, stop = _normalize(attn, query_rows, key_range, check_indices)
    mod = load_triton_module(OP)
    return mod.launch(attn, rows, start, stop, interpret=interpret_requested() or not attn.is_cuda,
                      block_r=block_r, block_k=block_k, heads_per_program=heads_per_program)


def attention_importance(attn: torch.Tensor, query_rows: QueryRows, key_range: KeyRange, *,
                         backend: BackendName | None = None, check_indices: bool = True) -> torch.Tensor:
    """Mean attention (over heads and `query_rows`) each key in `key_range` receives.

    attn: (B, H, Q, N) float32/float16/bfloat16 attention probabilities.
    query_rows: (R,) int tensor, list, range or slice of query positions (shared by the batch).
    key_range: (start, stop) of the scored keys (the visual tokens).
    Returns (B, stop - start) float32. `backend` forces "torch"/"triton"; default follows the dispatch rule.
    """
    chosen = choose_backend(OP, attn, backend=backend)
    if chosen == "torch":
        return attention_importance_torch(attn, query_rows, key_range, check_indices=check_indices)
    return attention_importance_triton(attn, query_rows, key_range, check_indices=check_indices)
