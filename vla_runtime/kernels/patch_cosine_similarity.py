"""Per-patch cosine similarity between two frames: the frame-difference signal of SpecPrune / VLA-Cache.

cos[b, p] = <a[b, p], b[b, p]> / (max(|a[b, p]|, eps) * max(|b[b, p]|, eps))

computed in float32 whatever the input dtype. This is `torch.nn.functional.cosine_similarity(a, b, dim=-1,
eps=eps)`'s definition (each norm clamped separately), so a zero vector gives 0, never NaN. Note the
consequence for raw pixels: a patch that is all-zero in both frames scores 0 ("changed"), not 1; callers who
care can test exact equality too. Inputs are patch embeddings (B, P, D) or raw patches from `image_patches`
(uint8 works: it is upcast in the kernel, no float copy of the frames is made).

Why a kernel: the torch reference materialises float copies and three (B, P, D) products; the fused kernel
reads each frame once and writes (B, P).
"""

from __future__ import annotations

import torch

from vla_runtime.errors import UserError
from vla_runtime.kernels._checks import FLOAT_DTYPES, check_same_device, check_tensor
from vla_runtime.kernels.dispatch import BackendName, choose_backend, interpret_requested, load_triton_module

OP = "patch_cosine_similarity"
DTYPES = FLOAT_DTYPES + (torch.uint8,)
DEFAULT_EPS = 1e-8


def _normalize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """-> (a, b) as (B, P, D), and whether the input was 2-D (P, D) so the output drops the batch dim."""
    check_tensor(OP, "a", a, (2, 3), DTYPES)
    check_tensor(OP, "b", b, (2, 3), DTYPES)
    if a.shape != b.shape:
        raise UserError(f"{OP}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 2:
        return a.unsqueeze(0), b.unsqueeze(0), True
    return a, b, False


def patch_cosine_similarity_torch(a: torch.Tensor, b: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Reference: (B, P, D) x2 -> (B, P) float32 (or (P, D) x2 -> (P,))."""
    a3, b3, squeeze = _normalize(a, b)
    x, y = a3.float(), b3.float()
    na = torch.linalg.vector_norm(x, dim=-1).clamp_min(eps)  # (B, P)
    nb = torch.linalg.vector_norm(y, dim=-1).clamp_min(eps)
    out = (x * y).sum(-1) / (na * nb)
    return out[0] if squeeze else out


def patch_cosine_similarity_triton(a: torch.Tensor, b: torch.Tensor, *, eps: float = DEFAULT_EPS,
                                   block_p: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Triton kernel (compiled on CUDA, interpreted on CPU with TRITON_INTERPRET=1); block sizes for tests."""
    a3, b3, squeeze = _normalize(a, b)
    check_same_device(OP, a3, b3)
    mod = load_triton_module(OP)
    out = mod.launch(a3, b3, eps, interpret=interpret_requested() or not a3.is_cuda,
                     block_p=block_p, block_d=block_d)
    return out[0] if squeeze else out


def patch_cosine_similarity(a: torch.Tensor, b: torch.Tensor, *, eps: float = DEFAULT_EPS,
                            backend: BackendName | None = None) -> torch.Tensor:
    """Cosine similarity per patch of two frames, (B, P, D) x2 -> (B, P) float32; see module docstring."""
    chosen = choose_backend(OP, a, b, backend=backend)
    if chosen == "torch":
        return patch_cosine_similarity_torch(a, b, eps=eps)
    return patch_cosine_similarity_triton(a, b, eps=eps)


def image_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Raw frames (B, H, W, C) or (H, W, C) -> (B, (H/patch)*(W/patch), patch*patch*C) (one copy).

    Patches are numbered row-major over the patch grid, the order of a ViT's patch-embedding tokens, so
    cos[b, i] lines up with visual token i of that camera. Dtype is kept (uint8 frames stay uint8).
    """
    check_tensor("image_patches", "images", images, (3, 4), DTYPES)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    B, H, W, C = images.shape
    if patch <= 0 or H % patch or W % patch:
        raise UserError(f"image_patches: image {H}x{W} is not divisible into {patch}x{patch} patches")
    x = images.reshape(B, H // patch, patch, W // patch, patch, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)
