"""SpecEE-style early-exit predictor, fused: is the hidden state after this layer already good enough?

For each batch row b, with C candidate tokens cand_idx[b] (e.g. a draft head's top-C):

  n       = hidden[b] * rsqrt(mean(hidden[b]^2) + norm_eps) * norm_weight     # RMSNorm, all in float32
  logits  = lm_head[cand_idx[b]] @ n                                          # (C,) only C LM-head rows
  probs   = softmax(logits)                                                   # over the C candidates only
  feats   = concat(logits, probs, probs - prev_probs[b])                      # (3C,)  <- the FEATURE LAYOUT
  score   = sigmoid(relu(feats @ w1 + b1) @ w2 + b2)                          # w1 (3C, Hd), w2 (Hd, 1)

Feature layout, fixed and shared by training and inference: features[:, 0:C] are the candidate logits,
features[:, C:2C] their softmax probabilities, features[:, 2C:3C] the change of those probabilities since the
previous checked layer (pass `prev_probs=None`, i.e. zeros, at the first checked layer; then feed the returned
`cand_probs` as the next layer's `prev_probs`). Candidates keep the order of `cand_idx`. Train predictors on
`exit_features_torch(...)` with `ExitMLP`, then pass `ExitMLP.kernel_params()` here: both backends compute
exactly these features. The RMSNorm is done in float32 throughout (HF Llama rounds the normed state back to
the model dtype before the weight multiply; the difference is at the dtype's rounding level).

SpecEE also requires the full LM-head argmax to be among the candidates before exiting; that needs the whole
head, so it is not fused here: compute it only when `score` crosses the threshold (you need those logits to
emit the token anyway).

Why a kernel: the reference is ~15 small launches (norm, gather, matmul, softmax, cat, two linears) on a
latency-critical path run at every candidate layer; the kernel is one launch reading C rows of the head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.kernels._checks import INDEX_DTYPES, check_index_bounds, check_same_device, check_tensor
from vla_runtime.kernels.dispatch import BackendName, choose_backend, interpret_requested, load_triton_module

OP = "exit_predictor"
MAX_CANDIDATES = 128  # the candidate tile lives in registers


class ExitPrediction(NamedTuple):
    score: torch.Tensor  # (B,) float32 sigmoid probability that exiting here is safe
    cand_logits: torch.Tensor  # (B, C) float32
    cand_probs: torch.Tensor  # (B, C) float32, softmax over the candidates: the next layer's prev_probs


class _Args(NamedTuple):
    prev_probs: torch.Tensor  # (B, C)
    w1: torch.Tensor  # (3C, Hd)
    b1: torch.Tensor  # (Hd,)
    w2: torch.Tensor  # (Hd,)
    b2: torch.Tensor  # (1,)


def _check_features(hidden: torch.Tensor, norm_weight: torch.Tensor, lm_head: torch.Tensor,
                    cand_idx: torch.Tensor, prev_probs: torch.Tensor | None, check_indices: bool) -> torch.Tensor:
    """Validates the feature inputs; returns prev_probs (B, C) (zeros when None)."""
    check_tensor(OP, "hidden", hidden, 2)
    check_tensor(OP, "norm_weight", norm_weight, 1)
    check_tensor(OP, "lm_head", lm_head, 2)
    check_tensor(OP, "cand_idx", cand_idx, 2, INDEX_DTYPES)
    B, D = hidden.shape
    if norm_weight.shape[0] != D or lm_head.shape[1] != D:
        raise UserError(f"{OP}: hidden dim {D} must match norm_weight {tuple(norm_weight.shape)} and "
                        f"lm_head (V, D) {tuple(lm_head.shape)}")
    if cand_idx.shape[0] != B or not 1 <= cand_idx.shape[1] <= MAX_CANDIDATES:
        raise UserError(f"{OP}: cand_idx must be (B={B}, C) with 1 <= C <= {MAX_CANDIDATES}, "
                        f"got {tuple(cand_idx.shape)}")
    if prev_probs is None:
        prev_probs = torch.zeros(cand_idx.shape, dtype=torch.float32, device=hidden.device)
    check_tensor(OP, "prev_probs", prev_probs, 2)
    if prev_probs.shape != cand_idx.shape:
        raise UserError(f"{OP}: prev_probs {tuple(prev_probs.shape)} must match cand_idx {tuple(cand_idx.shape)}")
    if check_indices:
        check_index_bounds(OP, "cand_idx", cand_idx, lm_head.shape[0])
    return prev_probs


def _check_mlp(n_cand: int, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (w1 (3C, Hd), b1 (Hd,), w2 (Hd,), b2 (1,))."""
    check_tensor(OP, "w1", w1, 2)
    check_tensor(OP, "b1", b1, 1)
    check_tensor(OP, "w2", w2, (1, 2))
    check_tensor(OP, "b2", b2, (0, 1))
    hd = w1.shape[1]
    if w1.shape[0] != 3 * n_cand:
        raise UserError(f"{OP}: w1 must be (3C={3 * n_cand}, Hd) for the [logits|probs|delta] features, "
                        f"got {tuple(w1.shape)}")
    w2v = w2[:, 0] if w2.dim() == 2 else w2
    if b1.shape[0] != hd or w2v.shape[0] != hd or (w2.dim() == 2 and w2.shape[1] != 1) or b2.numel() != 1:
        raise UserError(f"{OP}: MLP shapes must be w1 (F, Hd), b1 (Hd,), w2 (Hd, 1), b2 (1,); got "
                        f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
    return w1, b1, w2v, b2.reshape(1)


def exit_features_torch(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float,
                        lm_head: torch.Tensor, cand_idx: torch.Tensor,
                        prev_probs: torch.Tensor | None = None, *, check_indices: bool = True) -> torch.Tensor:
    """The predictor's input features (B, 3C) float32 = [logits | probs | probs - prev_probs] (module doc).

    Differentiable w.r.t. nothing you train (it is the frozen model's state), cheap enough to build datasets.
    """
    prev = _check_features(hidden, norm_weight, lm_head, cand_idx, prev_probs, check_indices)
    h = hidden.float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.float()  # (B, D)
    rows = lm_head[cand_idx.long()].float()  # (B, C, D)
    logits = torch.einsum("bcd,bd->bc", rows, n)  # (B, C)
    probs = torch.softmax(logits, dim=-1)
    return torch.cat([logits, probs, probs - prev.float()], dim=-1)


def exit_mlp_torch(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor) -> torch.Tensor:
    """features (B, F) -> sigmoid score (B,) float32, with the kernel's parameter layout (w1 is (F, Hd))."""
    w2v = w2[:, 0] if w2.dim() == 2 else w2
    z = torch.relu(features.float() @ w1.float() + b1.float())  # (B, Hd)
    return torch.sigmoid(z @ w2v.float() + b2.float().reshape(()))


def exit_predictor_torch(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float,
                         lm_head: torch.Tensor, cand_idx: torch.Tensor, prev_probs: torch.Tensor | None,
                         w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
                         check_indices: bool = True) -> ExitPrediction:
    """Reference: features by `exit_features_torch`, then `exit_mlp_torch`."""
    C = cand_idx.shape[1] if isinstance(cand_idx, torch.Tensor) and cand_idx.dim() == 2 else 0
    feats = exit_features_torch(hidden, norm_weight, norm_eps, lm_head, cand_idx, prev_probs,
                                check_indices=check_indices)  # (B, 3C)
    w1, b1, w2, b2 = _check_mlp(C, w1, b1, w2, b2)
    score = exit_mlp_torch(feats, w1, b1, w2, b2)
    return ExitPrediction(score, feats[:, :C].contiguous(), feats[:, C:2 * C].contiguous())


def exit_predictor_triton(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float,
                          lm_head: torch.Tensor, cand_idx: torch.Tensor, prev_probs: torch.Tensor | None,
                          w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
                          check_indices: bool = True, block_d: int | None = None,
                          block_h: int | None = None) -> ExitPrediction:
    """Triton kernel (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1); block sizes for tests."""
    prev = _check_features(hidden, norm_weight, lm_head, cand_idx, prev_probs, check_indices)
    w1, b1, w2, b2 = _check_mlp(cand_idx.shape[1], w1, b1, w2, b2)
    check_same_device(OP, hidden, norm_weight, lm_head, cand_idx, prev, w1, b1, w2, b2)
    mod = load_triton_module(OP)
    out = mod.launch(hidden, norm_weight, norm_eps, lm_head, cand_idx, prev, w1, b1, w2, b2,
                     interpret=interpret_requested() or not hidden.is_cuda, block_d=block_d, block_h=block_h)
    return ExitPrediction(*out)


def exit_predictor(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float, lm_head: torch.Tensor,
                   cand_idx: torch.Tensor, prev_probs: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor,
                   w2: torch.Tensor, b2: torch.Tensor, *, backend: BackendName | None = None,
                   check_indices: bool = True) -> ExitPrediction:
    """Early-exit score for hidden (B, D) at one candidate layer; see the module docstring for the math.

    norm_weight (D,), lm_head (V, D), cand_idx (B, C) int, prev_probs (B, C) or None (zeros),
    w1 (3C, Hd), b1 (Hd,), w2 (Hd, 1) or (Hd,), b2 (1,) or (). Returns ExitPrediction(score (B,),
    cand_logits (B, C), cand_probs (B, C)), all float32.
    """
    chosen = choose_backend(OP, hidden, norm_weight, lm_head, cand_idx, prev_probs, w1, b1, w2, b2, backend=backend)
    fn = exit_predictor_torch if chosen == "torch" else exit_predictor_triton
    return fn(hidden, norm_weight, norm_eps, lm_head, cand_idx, prev_probs, w1, b1, w2, b2,
              check_indices=check_indices)


def full_head_check(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float, lm_head: torch.Tensor,
                    cand_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SpecEE's exit condition, run only once `score` passed: full-head argmax (B,) and whether it is a candidate.

    Same float32 RMSNorm as the predictor. Torch only: it is one (B, D) x (D, V) matmul, nothing to fuse.
    """
    _check_features(hidden, norm_weight, lm_head, cand_idx, None, check_indices=False)
    h = hidden.float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight.float()  # (B, D)
    logits = n.to(lm_head.dtype) @ lm_head.t()  # (B, V) in the head's dtype (bf16 on CPU is fast)
    top = logits.argmax(dim=-1)  # (B,)
    return top, (cand_idx.long() == top.unsqueeze(1)).any(dim=1)


class ExitMLP(nn.Module):
    """The trainable predictor head F=3C -> Hd -> 1, in torch, for training on `exit_features_torch`.

    forward returns the pre-sigmoid logit (train with BCEWithLogitsLoss); `kernel_params()` gives
    (w1 (3C, Hd), b1, w2 (Hd, 1), b2) in the layout `exit_predictor` takes.
    """

    def __init__(self, n_candidates: int, hidden: int = 64) -> None:
        super().__init__()
        if n_candidates < 1 or hidden < 1:
            raise UserError(f"ExitMLP: n_candidates and hidden must be >= 1, got {n_candidates}, {hidden}")
        self.n_candidates = n_candidates
        self.fc1 = nn.Linear(3 * n_candidates, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, 3C) -> (B,)
        return self.fc2(torch.relu(self.fc1(features))).squeeze(-1)

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        params = (self.fc1.weight.t(), self.fc1.bias, self.fc2.weight.t(), self.fc2.bias)
        w1, b1, w2, b2 = (p.detach().contiguous().clone() for p in params)  # copies: no autograd link
        return w1, b1, w2, b2


def random_exit_inputs(B: int, D: int, V: int, C: int, Hd: int, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", hidden_scale: float = 1.0, head_scale: float = 4.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ExitMLP]:
    """Random inputs of `exit_predictor` (from torch's global RNG): hidden (B, D), norm weight (D,), LM head
    (V, D) scaled by head_scale / sqrt(D) (logits of a few units), candidates (B, C), previous probabilities
    (B, C) and an `ExitMLP(C, Hd)` on `device`. For tests and benchmarks."""
    hidden = (torch.randn(B, D, device=device) * hidden_scale).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(D, device=device)).to(dtype)
    head = (torch.randn(V, D, device=device) / D ** 0.5 * head_scale).to(dtype)
    cand = torch.stack([torch.randperm(V, device=device)[:C] for _ in range(B)])
    prev = torch.softmax(torch.randn(B, C, device=device), -1)
    return hidden, norm_w, head, cand, prev, ExitMLP(C, Hd).to(device)
