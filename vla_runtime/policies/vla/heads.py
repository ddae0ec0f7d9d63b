"""The two action heads.

- `ParallelActionHead` (OpenVLA-OFT): the final hidden states of the learned action queries -> a residual MLP
  -> a whole chunk of continuous actions at once, trained with L1 on actions normalised to [-1, 1].
- `ARActionHead` (OpenVLA): each action dimension is one token out of `n_bins` uniform bins over [-1, 1];
  the decoder emits `chunk * action_dim` tokens one at a time (teacher forcing in training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc(self.norm(x)))


class ParallelActionHead(nn.Module):
    """OFT's L1 regression head (an MLPResNet): per action step, its query token(s) -> one action vector."""

    def __init__(self, hidden: int, tokens_per_action: int, action_dim: int, chunk_size: int, head_hidden: int = 256,
                 blocks: int = 2) -> None:
        super().__init__()
        self.tokens_per_action, self.action_dim, self.chunk_size = tokens_per_action, action_dim, chunk_size
        self.inp = nn.Sequential(nn.LayerNorm(hidden * tokens_per_action),
                                 nn.Linear(hidden * tokens_per_action, head_hidden), nn.ReLU())
        self.blocks = nn.Sequential(*[_ResBlock(head_hidden) for _ in range(blocks)])
        self.out = nn.Sequential(nn.LayerNorm(head_hidden), nn.Linear(head_hidden, action_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, chunk * tokens_per_action, D) final hidden states of the queries -> (B, chunk, action_dim)."""
        B = h.shape[0]
        x = h.reshape(B, self.chunk_size, -1)  # (B, chunk, tokens_per_action * D)
        return self.out(self.blocks(self.inp(x)))

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """L1 over valid chunk steps. pred/target (B, chunk, A); mask (B, chunk) bool (False past episode end)."""
        err = (pred.float() - target.float()).abs().mean(-1)  # (B, chunk)
        if mask is None:
            return err.mean()
        m = mask.float()
        return (err * m).sum() / m.sum().clamp_min(1.0)


class ARActionHead(nn.Module):
    """Action tokens: `n_bins` uniform bins over [-1, 1] per dimension; logits over the bins only.

    With a real LM the projection is initialised from the LM head rows of the action tokens (OpenVLA overwrites
    the last 256 vocabulary entries), so argmax over bins equals argmax over those vocabulary rows.
    """

    def __init__(self, hidden: int, n_bins: int = 256) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.proj = nn.Linear(hidden, n_bins, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, N, D) -> logits (B, N, n_bins)."""
        return self.proj(h)

    def tokenize(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalised actions (..., A) in [-1, 1] -> bin ids (..., A) in [0, n_bins)."""
        a = actions.float().clamp(-1.0, 1.0)
        return ((a + 1.0) * 0.5 * self.n_bins).floor().long().clamp(0, self.n_bins - 1)

    def detokenize(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin ids -> bin centres in [-1, 1]."""
        return -1.0 + (bins.float() + 0.5) * (2.0 / self.n_bins)

    @staticmethod
    def loss(logits: torch.Tensor, target_bins: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy. logits (B, N, n_bins), target_bins (B, N), mask (B, N) bool."""
        ce = F.cross_entropy(logits.float().flatten(0, 1), target_bins.flatten(), reduction="none")
        ce = ce.view(target_bins.shape)
        if mask is None:
            return ce.mean()
        m = mask.float()
        return (ce * m).sum() / m.sum().clamp_min(1.0)
