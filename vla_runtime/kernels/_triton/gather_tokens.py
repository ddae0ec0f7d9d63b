"""Triton kernel: compact the kept token rows of the hidden state together with their position ids."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_tokens_kernel(
    h_ptr, pos_ptr, idx_ptr, out_ptr, pos_out_ptr,
    K, D,
    s_hb, s_hn, s_hd, s_pb, s_pn, s_ib, s_ik, s_ob, s_ok, s_od, s_qb, s_qk,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr,
):
    # One program: batch pid_b, kept slots [pid_k * BLOCK_K, +BLOCK_K), columns [pid_d * CHUNK_D, +CHUNK_D)
    # copied in BLOCK_D tiles. On GPUs CHUNK_D == BLOCK_D (many small programs); in the interpreter one
    # program spans D (few programs, each looping). Pure copies: bf16 moves bit-exactly, interpreter too.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    pid_d = tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    kmask = k < K
    idx = tl.load(idx_ptr + pid_b * s_ib + k * s_ik, mask=kmask, other=0).to(tl.int64)  # source rows
    if pid_d == 0:  # the first column chunk also moves the position ids
        pos = tl.load(pos_ptr + pid_b * s_pb + idx * s_pn, mask=kmask, other=0)
        tl.store(pos_out_ptr + pid_b * s_qb + k * s_qk, pos, mask=kmask)
    src = h_ptr + pid_b * s_hb + idx[:, None] * s_hn
    dst = out_ptr + pid_b * s_ob + k.to(tl.int64)[:, None] * s_ok
    d_start = pid_d * CHUNK_D
    for d0 in range(0, CHUNK_D, BLOCK_D):
        d = d_start + d0 + tl.arange(0, BLOCK_D)
        m = kmask[:, None] & (d < D)[None, :]
        x = tl.load(src + d[None, :] * s_hd, mask=m, other=0)
        tl.store(dst + d[None, :] * s_od, x, mask=m)


def launch(hidden: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, *, interpret: bool,
           block_k: int | None = None, block_d: int | None = None, chunk_d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, N, D), pos (B or 1, N) (a batch stride of 0 broadcasts), idx (B, K) -> ((B, K, D), (B, K))."""
    B, _, D = hidden.shape
    K = idx.shape[1]
    out = torch.empty((B, K, D), dtype=hidden.dtype, device=hidden.device)
    pos_out = torch.empty((B, K), dtype=pos.dtype, device=hidden.device)
    if B == 0 or K == 0:
        return out, pos_out
    bk = block_k or min(triton.next_power_of_2(K), 128 if interpret else 16)
    bd = block_d or min(triton.next_power_of_2(max(D, 1)), 2048 if interpret else 256)
    # Interpreter: one program spans all of D (its cost is per program); GPU: one BLOCK_D tile per program.
    cd = chunk_d or (bd * triton.cdiv(max(D, 1), bd) if interpret else bd)
    if cd % bd:
        raise ValueError(f"chunk_d {cd} must be a multiple of block_d {bd}")
    s_pb = 0 if pos.shape[0] == 1 else pos.stride(0)
    grid = (B, triton.cdiv(K, bk), triton.cdiv(max(D, 1), cd))
    _gather_tokens_kernel[grid](hidden, pos, idx, out, pos_out, K, D,
                                *hidden.stride(), s_pb, pos.stride(1), *idx.stride(), *out.stride(),
                                *pos_out.stride(), BLOCK_K=bk, BLOCK_D=bd, CHUNK_D=cd)
    return out, pos_out


def aot_signature(dt: str) -> tuple[object, dict[str, str], dict[str, int]]:
    """(kernel, signature, constexprs) for ahead-of-time compilation checks (`vla_runtime.kernels.aot`)."""
    sig = {"h_ptr": f"*{dt}", "pos_ptr": "*i64", "idx_ptr": "*i64", "out_ptr": f"*{dt}", "pos_out_ptr": "*i64",
           "K": "i32", "D": "i32",
           **{k: "i32" for k in "s_hb s_hn s_hd s_pb s_pn s_ib s_ik s_ob s_ok s_od s_qb s_qk".split()},
           "BLOCK_K": "constexpr", "BLOCK_D": "constexpr", "CHUNK_D": "constexpr"}
    return _gather_tokens_kernel, sig, {"BLOCK_K": 16, "BLOCK_D": 256, "CHUNK_D": 256}
