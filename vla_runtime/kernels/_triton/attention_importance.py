"""Triton kernel: mean attention each visual key receives from the selected query rows, over heads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_importance_kernel(
    attn_ptr, rows_ptr, out_ptr,
    HPG, R, Nk, key_start, scale,
    s_b, s_h, s_q, s_n,
    s_ob, s_og, s_on,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: batch pid_b, keys [pid_k * BLOCK_K, +BLOCK_K), heads [pid_g * HPG, +HPG); loops those
    # heads x row tiles into a (BLOCK_R, BLOCK_K) fp32 tile, reduces it once, writes the group's partial
    # mean to out[b, g, :]. Partials are summed over g by the caller (deterministic, no atomics).
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_g = tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    kmask = k < Nk
    col = (key_start + k).to(tl.int64) * s_n
    # Pointer arithmetic is 64-bit: advancing the pointer by s_h per head cannot overflow int32 offsets.
    hbase = attn_ptr + pid_b.to(tl.int64) * s_b + pid_g.to(tl.int64) * HPG * s_h
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for _h in range(0, HPG):
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
            rmask = r < R
            q = tl.load(rows_ptr + r, mask=rmask, other=0).to(tl.int64)
            x = tl.load(hbase + q[:, None] * s_q + col[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K)
            acc += x
        hbase += s_h
    res = tl.sum(acc, axis=0) * scale  # (BLOCK_K,)
    tl.store(out_ptr + pid_b.to(tl.int64) * s_ob + pid_g * s_og + k * s_on, res, mask=kmask)


def launch(attn: torch.Tensor, rows: torch.Tensor, start: int, stop: int, *, interpret: bool,
           block_r: int | None = None, block_k: int | None = None,
           heads_per_program: int | None = None) -> torch.Tensor:
    """attn (B, H, Q, N) any float dtype/strides; rows (R,) int64 contiguous -> (B, stop - start) fp32."""
    B, H, _, _ = attn.shape
    R = rows.numel()
    nk = stop - start
    if nk == 0 or B == 0:
        return torch.empty((B, nk), dtype=torch.float32, device=attn.device)
    # Interpreter: big tiles, all heads in one program (its cost is per program and per loop trip).
    # GPU: one head per program, so B=1 still fills the SMs (H x Nk/BLOCK_K programs).
    br = block_r or min(triton.next_power_of_2(R), 64 if interpret else 16)
    bk = block_k or min(triton.next_power_of_2(nk), 512 if interpret else 64)
    hpg = heads_per_program or (H if interpret else 1)
    if H % hpg:
        raise ValueError(f"heads_per_program {hpg} must divide the {H} heads")
    groups = H // hpg
    part = torch.empty((B, groups, nk), dtype=torch.float32, device=attn.device)
    grid = (B, triton.cdiv(nk, bk), groups)
    _attention_importance_kernel[grid](
        attn, rows, part, hpg, R, nk, start, 1.0 / (H * R),
        *attn.stride(), *part.stride(), BLOCK_R=br, BLOCK_K=bk)
    return part[:, 0] if groups == 1 else part.sum(dim=1)


def aot_signature(dt: str) -> tuple[object, dict[str, str], dict[str, int]]:
    """(kernel, signature, constexprs) for ahead-of-time compilation checks (`vla_runtime.kernels.aot`)."""
    sig = {"attn_ptr": f"*{dt}", "rows_ptr": "*i64", "out_ptr": "*fp32", "HPG": "i32", "R": "i32", "Nk": "i32",
           "key_start": "i32", "scale": "fp32", **{k: "i32" for k in "s_b s_h s_q s_n s_ob s_og s_on".split()},
           "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"}
    return _attention_importance_kernel, sig, {"BLOCK_R": 16, "BLOCK_K": 64}
