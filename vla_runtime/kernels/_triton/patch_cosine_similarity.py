"""Triton kernel: per-patch cosine similarity of two frames' patch vectors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _patch_cosine_kernel(
    a_ptr, b_ptr, out_ptr,
    P, D, eps,
    s_ab, s_ap, s_ad, s_bb, s_bp, s_bd, s_ob, s_op,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: batch pid_b, patches [pid_p * BLOCK_P, +BLOCK_P); loops over D accumulating dot and norms.
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    pmask = p < P
    a_rows = a_ptr + pid_b.to(tl.int64) * s_ab + p.to(tl.int64)[:, None] * s_ap
    b_rows = b_ptr + pid_b.to(tl.int64) * s_bb + p.to(tl.int64)[:, None] * s_bp
    dot = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    na = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    nb = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        m = pmask[:, None] & (d < D)[None, :]
        x = tl.load(a_rows + d[None, :] * s_ad, mask=m, other=0).to(tl.float32)  # (BLOCK_P, BLOCK_D)
        y = tl.load(b_rows + d[None, :] * s_bd, mask=m, other=0).to(tl.float32)
        dot += x * y
        na += x * x
        nb += y * y
    norm_a = tl.maximum(tl.sqrt(tl.sum(na, axis=1)), eps)  # (BLOCK_P,)
    norm_b = tl.maximum(tl.sqrt(tl.sum(nb, axis=1)), eps)
    cos = tl.sum(dot, axis=1) / (norm_a * norm_b)
    tl.store(out_ptr + pid_b.to(tl.int64) * s_ob + p * s_op, cos, mask=pmask)


def launch(a: torch.Tensor, b: torch.Tensor, eps: float, *, interpret: bool,
           block_p: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """a, b (B, P, D) same shape, any supported dtype/strides -> (B, P) fp32."""
    B, P, D = a.shape
    out = torch.empty((B, P), dtype=torch.float32, device=a.device)
    if B == 0 or P == 0:
        return out
    if D == 0:
        return out.zero_()
    bp = block_p or min(triton.next_power_of_2(P), 64 if interpret else 16)
    bd = block_d or min(triton.next_power_of_2(D), 1024 if interpret else 128)
    grid = (B, triton.cdiv(P, bp))
    _patch_cosine_kernel[grid](a, b, out, P, D, float(eps), *a.stride(), *b.stride(), *out.stride(),
                               BLOCK_P=bp, BLOCK_D=bd)
    return out


def aot_signature(dt: str) -> tuple[object, dict[str, str], dict[str, int]]:
    """(kernel, signature, constexprs) for ahead-of-time compilation checks (`vla_runtime.kernels.aot`)."""
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": "*fp32", "P": "i32", "D": "i32", "eps": "fp32",
           **{k: "i32" for k in "s_ab s_ap s_ad s_bb s_bp s_bd s_ob s_op".split()},
           "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}
    return _patch_cosine_kernel, sig, {"BLOCK_P": 16, "BLOCK_D": 128}
