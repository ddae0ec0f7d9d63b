"""The compiled Triton kernels on a CUDA GPU against their torch references (skipped without a GPU).

CPU machines (CI) cover the same kernels through the Triton interpreter in tests/test_kernels.py, and the
ahead-of-time compile check proves they build for sm_90; this file is what proves the compiled kernels compute
the right numbers on real hardware. Run on a GPU machine: `python -m pytest -q tests/test_kernels_cuda.py`.
Shapes include the OpenVLA-OFT sizes (D 4096, 32 heads, 512 visual tokens), bf16 and fp32 inputs, B > 1,
non-contiguous views, and the pruner's end-to-end use (importance -> top-k -> gather) on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    import vla_runtime.kernels as K
else:  # collected but skipped; keep the names defined
    K = None  # type: ignore[assignment]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def _close(x: torch.Tensor, y: torch.Tensor, tol: float) -> None:
    assert x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("B,H,N,start,stop,rows", [(1, 32, 600, 1, 513, (513, 600)), (2, 8, 297, 1, 257, (257, 297)),
                                                   (3, 4, 130, 5, 70, (70, 130))])
def test_attention_importance_cuda(dtype: torch.dtype, B: int, H: int, N: int, start: int, stop: int,
                                   rows: tuple[int, int]) -> None:
    attn = torch.softmax(torch.randn(B, H, N, N, device=DEV) * 3, dim=-1).to(dtype)
    q = torch.arange(*rows, device=DEV)
    out = K.attention_importance(attn, q, (start, stop))
    assert K.last_backend("attention_importance") == "triton"
    ref = K.attention_importance_torch(attn, q, (start, stop))
    _close(out, ref, 1e-5)
    # independent formulation: the mean over heads and query rows of the selected block
    manual = attn.float()[:, :, rows[0]:rows[1], start:stop].mean(dim=(1, 2))
    _close(out, manual, 1e-5)
    # a transposed (non-contiguous) view gives the same result as its contiguous copy
    t = attn.transpose(2, 3).contiguous().transpose(2, 3)
    _close(K.attention_importance(t, q, (start, stop)), out, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES + [torch.uint8])
def test_patch_cosine_cuda(dtype: torch.dtype) -> None:
    if dtype == torch.uint8:
        a = torch.randint(0, 256, (2, 512, 588), device=DEV, dtype=torch.uint8)
        b = torch.randint(0, 256, (2, 512, 588), device=DEV, dtype=torch.uint8)
    else:
        a = torch.randn(2, 512, 588, device=DEV).to(dtype)
        b = torch.randn(2, 512, 588, device=DEV).to(dtype)
    b[0, :20] = a[0, :20]
    b[1, :7] = 0
    a[1, :7] = 0  # both zero: cosine 0 ("changed"), never NaN
    out = K.patch_cosine_similarity(a, b)
    assert K.last_backend("patch_cosine_similarity") == "triton"
    ref = K.patch_cosine_similarity_torch(a, b)
    _close(out, ref, 1e-5)
    _close(ref, F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8), 1e-5)
    _close(out[0, :20], torch.ones(20, device=DEV), 1e-5)
    assert torch.isfinite(out).all() and (out[1, :7] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,Kk", [(1, 600, 4096, 180), (2, 330, 256, 150), (3, 40, 24, 40), (2, 50, 64, 0)])
def test_gather_tokens_cuda(dtype: torch.dtype, B: int, N: int, D: int, Kk: int) -> None:
    hidden = torch.randn(B, N, D, device=DEV).to(dtype)
    pos = torch.arange(N, device=DEV).expand(B, N).contiguous() + torch.arange(B, device=DEV)[:, None] * 7
    idx = K.topk_keep_indices(torch.randn(B, N, device=DEV), Kk)
    out, pos_out = K.gather_tokens(hidden, pos, idx)
    assert K.last_backend("gather_tokens") == "triton"
    ref, pos_ref = K.gather_tokens_torch(hidden, pos, idx)
    assert torch.equal(out, ref) and torch.equal(pos_out, pos_ref)  # a copy: bit-exact
    assert out.shape == (B, Kk, D) and out.dtype == dtype
    # a strided hidden view (every other feature of a wider buffer) is read through its strides
    wide = torch.randn(B, N, 2 * D, device=DEV).to(dtype)
    view = wide[:, :, ::2]
    out_v, _ = K.gather_tokens(view, pos, idx)
    assert torch.equal(out_v, K.gather_tokens_torch(view.contiguous(), pos, idx)[0])


@pytest.mark.parametrize("dtype,D,V,C", [(torch.bfloat16, 4096, 32000, 8), (torch.float32, 512, 2048, 16),
                                         (torch.float32, 300, 500, 5)])
def test_exit_predictor_cuda(dtype: torch.dtype, D: int, V: int, C: int) -> None:
    hidden, norm_w, head, cand, prev, mlp = K.random_exit_inputs(3, D, V, C, 64, dtype, DEV, hidden_scale=2.0,
                                                                 head_scale=1.0)
    params = mlp.kernel_params()
    out = K.exit_predictor(hidden, norm_w, 1e-6, head, cand, prev, *params)
    assert K.last_backend("exit_predictor") == "triton"
    ref = K.exit_predictor_torch(hidden, norm_w, 1e-6, head, cand, prev, *params)
    for got, want in zip(out, ref):
        _close(got, want, 2e-4)
    feats = K.exit_features_torch(hidden, norm_w, 1e-6, head, cand, prev)
    with torch.no_grad():
        _close(torch.sigmoid(mlp(feats)), out.score, 2e-4)


def test_prune_pipeline_on_gpu_matches_cpu() -> None:
    """The pruner's use of the kernels (importance -> keep the top visual tokens + all others -> gather) keeps
    the same tokens on the GPU as the torch path on the CPU."""
    B, H, N, D, n_vis = 1, 32, 600, 4096, 512
    attn = torch.softmax(torch.randn(B, H, N, N, device=DEV) * 3, dim=-1).to(torch.bfloat16)
    hidden = torch.randn(B, N, D, device=DEV).to(torch.bfloat16)
    pos = torch.arange(N, device=DEV)[None]
    rows = torch.arange(1 + n_vis, N, device=DEV)
    results = []
    for dev in (DEV, "cpu"):
        imp = K.attention_importance(attn.to(dev), rows.to(dev), (1, 1 + n_vis))
        scores = torch.full((B, N), float("inf"), device=dev)
        scores[:, 1:1 + n_vis] = imp
        keep = K.topk_keep_indices(scores, N - n_vis + 128)
        kept, kpos = K.gather_tokens(hidden.to(dev), pos.to(dev), keep)
        results.append((keep.cpu(), kept.cpu(), kpos.cpu()))
    (k_gpu, h_gpu, p_gpu), (k_cpu, h_cpu, p_cpu) = results
    # importance sums differ only by float summation order: the chosen set may differ at exact ties only
    overlap = len(set(k_gpu[0].tolist()) & set(k_cpu[0].tolist())) / k_cpu.shape[1]
    assert overlap > 0.99
    if torch.equal(k_gpu, k_cpu):
        assert torch.equal(h_gpu, h_cpu) and torch.equal(p_gpu, p_cpu)
