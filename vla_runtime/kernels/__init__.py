"""Triton kernels for the VLA hot paths, each with a torch reference of the same signature.

Ops (each in `vla_runtime/kernels/<op>.py` as `<op>` (dispatching), `<op>_torch`, `<op>_triton`):
  attention_importance     text->vision attention score per visual token (SpecPrune)
  patch_cosine_similarity  per-patch cosine similarity of two frames (SpecPrune / VLA-Cache frame difference)
  gather_tokens            compaction of kept token rows with their position ids (token pruning)
  exit_predictor           fused SpecEE-style early-exit predictor (RMSNorm, C LM-head rows, softmax, MLP)

Dispatch (see `dispatch.py`): Triton on CUDA tensors; the Triton interpreter on CPU when TRITON_INTERPRET=1
(read at call time); the torch reference otherwise. Force a path with `backend="torch"|"triton"` or
`with use_backend(...)`; `last_backend(op)` says which path ran.

Importing this package does not import triton (its import must precede Mesa's GL driver, or the process
segfaults): the Triton kernels are imported on the first call that takes the Triton path.
"""

from vla_runtime.kernels.attention_importance import (
    attention_importance,
    attention_importance_torch,
    attention_importance_triton,
)
from vla_runtime.kernels.dispatch import (
    BACKENDS,
    choose_backend,
    interpret_requested,
    last_backend,
    use_backend,
)
from vla_runtime.kernels.exit_predictor import (
    ExitMLP,
    ExitPrediction,
    exit_features_torch,
    exit_mlp_torch,
    exit_predictor,
    exit_predictor_torch,
    exit_predictor_triton,
    full_head_check,
    random_exit_inputs,
)
from vla_runtime.kernels.gather_tokens import (
    gather_tokens,
    gather_tokens_torch,
    gather_tokens_triton,
    keep_indices_from_mask,
    topk_keep_indices,
)
from vla_runtime.kernels.patch_cosine_similarity import (
    image_patches,
    patch_cosine_similarity,
    patch_cosine_similarity_torch,
    patch_cosine_similarity_triton,
)

OPS: tuple[str, ...] = ("attention_importance", "patch_cosine_similarity", "gather_tokens", "exit_predictor")

__all__ = [
    "BACKENDS", "OPS", "ExitMLP", "ExitPrediction", "attention_importance", "attention_importance_torch",
    "attention_importance_triton", "choose_backend", "exit_features_torch", "exit_mlp_torch", "exit_predictor",
    "exit_predictor_torch", "exit_predictor_triton", "full_head_check", "gather_tokens", "gather_tokens_torch",
    "gather_tokens_triton", "image_patches", "interpret_requested", "keep_indices_from_mask", "last_backend",
    "patch_cosine_similarity", "patch_cosine_similarity_torch", "patch_cosine_similarity_triton",
    "topk_keep_indices", "use_backend",
]
