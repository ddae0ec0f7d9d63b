"""Token compaction for pruning: keep rows `keep_idx` of the hidden state and their position ids, in one pass.

hidden_kept[b, j] = hidden[b, keep_idx[b, j]];   pos_kept[b, j] = position_ids[b, keep_idx[b, j]]

A pruned layer loop runs the remaining layers on the kept tokens only, and RoPE must still see each token's
*original* position, hence the position ids travel with the rows. `keep_idx` is sorted (strictly increasing)
so the kept sequence keeps its causal order. Indices come from `keep_indices_from_mask` or
`topk_keep_indices` (torch: both need a sort or a count, nothing worth a kernel).

Why a kernel: on CUDA the reference is an index build, a row index_select and a gather (three-four
launches); the kernel is one launch that reads each kept row once and moves the position ids with it.
"""

from __future__ import annotations

import torch

from vla_runtime.errors import UserError
from vla_runtime.kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_bounds, check_tensor
from vla_runtime.kernels.dispatch import BackendName, choose_backend, interpret_requested, load_triton_module

OP = "gather_tokens"


def _normalize(hidden: torch.Tensor, position_ids: torch.Tensor, keep_idx: torch.Tensor,
               check_indices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (position_ids as (B or 1, N), keep_idx as (B, K) int64)."""
    check_tensor(OP, "hidden", hidden, 3)
    check_tensor(OP, "position_ids", position_ids, (1, 2), INDEX_DTYPES)
    check_tensor(OP, "keep_idx", keep_idx, (1, 2), INDEX_DTYPES)
    B, N, _ = hidden.shape
    pos = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
    if pos.shape[1] != N or pos.shape[0] not in (1, B):
        raise UserError(f"{OP}: position_ids shape {tuple(position_ids.shape)} does not match hidden "
                        f"(B={B}, N={N}); expected (B, N), (1, N) or (N,)")
    idx = keep_idx.unsqueeze(0).expand(B, -1) if keep_idx.dim() == 1 else keep_idx
    if idx.shape[0] != B:
        raise UserError(f"{OP}: keep_idx batch {idx.shape[0]} != hidden batch {B}")
    if idx.dtype != torch.int64:
        idx = idx.long()
    if pos.device != hidden.device or idx.device != hidden.device:
        raise UserError(f"{OP}: hidden, position_ids and keep_idx must be on one device")
    if check_indices and idx.numel():
        check_index_bounds(OP, "keep_idx", idx, N)
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise UserError(f"{OP}: keep_idx must be strictly increasing per batch row (sorted, no repeats)")
    return pos, idx


def gather_tokens_torch(hidden: torch.Tensor, position_ids: torch.Tensor, keep_idx: torch.Tensor, *,
                        check_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (B, N, D), (B, N), (B, K) -> ((B, K, D), (B, K))."""
    pos, idx = _normalize(hidden, position_ids, keep_idx, check_indices)
    B, N, D = hidden.shape
    # index_select on rows: ~20x faster on CPU than torch.gather with an expanded (B, K, D) index.
    if B == 1:
        kept = hidden[0].index_select(0, idx[0]).unsqueeze(0)  # (1, K, D)
    else:
        flat = (idx + torch.arange(B, device=idx.device).unsqueeze(1) * N).reshape(-1)  # (B*K,)
        kept = hidden.reshape(B * N, D).index_select(0, flat).view(B, idx.shape[1], D)  # (B, K, D)
    pos_kept = torch.gather(pos.expand(B, -1), 1, idx)  # (B, K)
    return kept, pos_kept


def gather_tokens_triton(hidden: torch.Tensor, position_ids: torch.Tensor, keep_idx: torch.Tensor, *,
                         check_indices: bool = True, block_k: int | None = None, block_d: int | None = None,
                         chunk_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1); block sizes for tests."""
    pos, idx = _normalize(hidden, position_ids, keep_idx, check_indices)
    mod = load_triton_module(OP)
    return mod.launch(hidden, pos, idx, interpret=interpret_requested() or not hidden.is_cuda,
                      block_k=block_k, block_d=block_d, chunk_d=chunk_d)


def gather_tokens(hidden: torch.Tensor, position_ids: torch.Tensor, keep_idx: torch.Tensor, *,
                  backend: BackendName | None = None,
                  check_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep rows `keep_idx` (B, K) (or (K,) shared by the batch) of hidden (B, N, D) and position_ids.

    position_ids may be (B, N), (1, N) or (N,); the result's ids are (B, K) with position_ids' dtype.
    `check_indices=False` skips the bounds/order check (a device sync on CUDA) for indices you built yourself.
    """
    chosen = choose_backend(OP, hidden, position_ids, keep_idx, backend=backend)
    if chosen == "torch":
        return gather_tokens_torch(hidden, position_ids, keep_idx, check_indices=check_indices)
    return gather_tokens_triton(hidden, position_ids, keep_idx, check_indices=check_indices)


def keep_indices_from_mask(keep: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask (B, N) or (N,) -> sorted keep_idx (B, K) int64 (K may be 0).

    A batch is one rectangular tensor, so every row must keep the same number of tokens; pruners that pick a
    fixed budget per row (`topk_keep_indices`) always satisfy this.
    """
    check_tensor("keep_indices_from_mask", "keep", keep, (1, 2), (torch.bool,))
    mask = keep.unsqueeze(0) if keep.dim() == 1 else keep
    counts = mask.sum(dim=1)  # (B,)
    if mask.shape[0] > 1 and not bool((counts == counts[0]).all()):
        raise UserError(f"keep_indices_from_mask: rows keep different numbers of tokens "
                        f"({counts.tolist()}); a batch needs one count per row")
    k = int(counts[0]) if mask.shape[0] else 0
    # A stable sort of ~mask puts kept positions first in increasing order.
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # (B, N)
    return order[:, :k].contiguous()


def topk_keep_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k highest scores per row: scores (B, N) float -> keep_idx (B, k) int64.

    Tokens that must always stay (text, proprio, action queries) can be given a score of +inf.
    """
    check_tensor("topk_keep_indices", "scores", scores, 2)
    if not 0 <= k <= scores.shape[1]:
        raise UserError(f"topk_keep_indices: k={k} outside [0, {scores.shape[1]}]")
    idx = torch.topk(scores.float(), k, dim=1, sorted=False).indices  # (B, k)
    return torch.sort(idx, dim=1).values
