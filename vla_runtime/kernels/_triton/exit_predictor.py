"""Triton kernel: the fused SpecEE-style early-exit predictor (RMSNorm, candidate logits, softmax, MLP)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _exit_predictor_kernel(
    h_ptr, nw_ptr, head_ptr, cand_ptr, prev_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    score_ptr, logit_ptr, prob_ptr,
    D, C, HD, eps,
    s_hb, s_hd, s_nw, s_vr, s_vd, s_cb, s_cc, s_pb, s_pc, s_w1f, s_w1h, s_b1, s_w2, s_lb, s_lc,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program per batch row. Pass over D: sum of squares of h (for RMSNorm) and the C candidate dot
    # products <h * norm_w, lm_head[cand]>; the RMS scale is applied after, so h is read once.
    pid = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    cmask = c < C
    rows = tl.load(cand_ptr + pid * s_cb + c * s_cc, mask=cmask, other=0).to(tl.int64)
    ss = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        dmask = d < D
        x = tl.load(h_ptr + pid * s_hb + d * s_hd, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + d * s_nw, mask=dmask, other=0.0).to(tl.float32)
        ss += x * x
        wv = tl.load(head_ptr + rows[:, None] * s_vr + d[None, :] * s_vd,
                     mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_D)
        acc += wv * (x * w)[None, :]
    inv_rms = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
    logits = tl.sum(acc, axis=1) * inv_rms  # (BLOCK_C,)
    mx = tl.max(tl.where(cmask, logits, float("-inf")), axis=0)
    e = tl.where(cmask, tl.exp(logits - mx), 0.0)
    probs = e / tl.sum(e, axis=0)
    prev = tl.load(prev_ptr + pid * s_pb + c * s_pc, mask=cmask, other=0.0).to(tl.float32)
    delta = probs - prev
    tl.store(logit_ptr + pid * s_lb + c * s_lc, logits, mask=cmask)
    tl.store(prob_ptr + pid * s_lb + c * s_lc, probs, mask=cmask)
    # MLP on features [logits | probs | delta] (rows 0..C-1, C..2C-1, 2C..3C-1 of w1), tiled over HD.
    out = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        hmask = hh < HD
        m2 = cmask[:, None] & hmask[None, :]
        wa = tl.load(w1_ptr + c[:, None] * s_w1f + hh[None, :] * s_w1h, mask=m2, other=0.0).to(tl.float32)
        wb = tl.load(w1_ptr + (C + c)[:, None] * s_w1f + hh[None, :] * s_w1h, mask=m2, other=0.0).to(tl.float32)
        wc = tl.load(w1_ptr + (2 * C + c)[:, None] * s_w1f + hh[None, :] * s_w1h, mask=m2,
                     other=0.0).to(tl.float32)
        z = tl.sum(logits[:, None] * wa + probs[:, None] * wb + delta[:, None] * wc, axis=0)  # (BLOCK_H,)
        z += tl.load(b1_ptr + hh * s_b1, mask=hmask, other=0.0).to(tl.float32)
        z = tl.maximum(z, 0.0)
        out += z * tl.load(w2_ptr + hh * s_w2, mask=hmask, other=0.0).to(tl.float32)
    y = tl.sum(out, axis=0) + tl.load(b2_ptr).to(tl.float32)
    tl.store(score_ptr + pid, 1.0 / (1.0 + tl.exp(-y)))


def launch(hidden: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float, lm_head: torch.Tensor,
           cand_idx: torch.Tensor, prev_probs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
           w2: torch.Tensor, b2: torch.Tensor, *, interpret: bool, block_d: int | None = None,
           block_h: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes validated by the caller: hidden (B, D), cand_idx/prev_probs (B, C), w1 (3C, HD), w2 (HD,)."""
    B, D = hidden.shape
    C = cand_idx.shape[1]
    HD = w1.shape[1]
    dev = hidden.device
    score = torch.empty((B,), dtype=torch.float32, device=dev)
    logits = torch.empty((B, C), dtype=torch.float32, device=dev)
    probs = torch.empty((B, C), dtype=torch.float32, device=dev)
    if B == 0:
        return score, logits, probs
    bc = triton.next_power_of_2(C)
    bd = block_d or min(triton.next_power_of_2(D), 4096 if interpret else max(64, 4096 // bc))
    bh = block_h or min(triton.next_power_of_2(HD), 1024 if interpret else 64)
    _exit_predictor_kernel[(B,)](
        hidden, norm_weight, lm_head, cand_idx, prev_probs, w1, b1, w2, b2, score, logits, probs,
        D, C, HD, float(norm_eps),
        *hidden.stride(), norm_weight.stride(0), *lm_head.stride(), *cand_idx.stride(), *prev_probs.stride(),
        *w1.stride(), b1.stride(0), w2.stride(0), *logits.stride(),
        BLOCK_C=bc, BLOCK_D=bd, BLOCK_H=bh)
    return score, logits, probs


def aot_signature(dt: str) -> tuple[object, dict[str, str], dict[str, int]]:
    """(kernel, signature, constexprs) for ahead-of-time compilation checks (`vla_runtime.kernels.aot`)."""
    sig = {"h_ptr": f"*{dt}", "nw_ptr": f"*{dt}", "head_ptr": f"*{dt}", "cand_ptr": "*i64", "prev_ptr": "*fp32",
           "w1_ptr": "*fp32", "b1_ptr": "*fp32", "w2_ptr": "*fp32", "b2_ptr": "*fp32",
           "score_ptr": "*fp32", "logit_ptr": "*fp32", "prob_ptr": "*fp32",
           "D": "i32", "C": "i32", "HD": "i32", "eps": "fp32",
           **{k: "i32" for k in "s_hb s_hd s_nw s_vr s_vd s_cb s_cc s_pb s_pc s_w1f s_w1h s_b1 s_w2 s_lb s_lc".split()},
           "BLOCK_C": "constexpr", "BLOCK_D": "constexpr", "BLOCK_H": "constexpr"}
    return _exit_predictor_kernel, sig, {"BLOCK_C": 4, "BLOCK_D": 1024, "BLOCK_H": 64}
