"""Kernels vs their torch references under the Triton interpreter, edge cases, and the dispatch rule.

How TRITON_INTERPRET is handled: triton fixes interpreter-vs-compiled per process at its first import, and the
dispatch reads TRITON_INTERPRET at *call time* to decide whether CPU tensors take the Triton path. So this
module sets TRITON_INTERPRET=1 only around its own first `import triton` (pinning the interpreter) and in an
autouse fixture for its own tests, and restores it afterwards: test modules that import `vla_runtime.kernels`
without it keep getting the torch path, whatever order pytest runs them in. If something imported triton
compiled before this module was collected, the interpreter tests cannot run in this process: they are
skipped and `test_interpreter_suite_in_subprocess` runs this file in a fresh process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from vla_runtime.errors import UserError

_prev = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`, which fixes the interpreter mode
try:
    import vla_runtime.kernels as K
    from vla_runtime.kernels import bench as K_bench
    from vla_runtime.kernels import dispatch

    IN_PROCESS = dispatch.triton_mode() == "interpret"
finally:
    if _prev is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _prev

interp = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled before this module; "
                            "test_interpreter_suite_in_subprocess runs these tests in a fresh process")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


def _close(x: torch.Tensor, y: torch.Tensor, tol: float = 2e-5) -> None:
    assert x.shape == y.shape and x.dtype == y.dtype
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ attention_importance

def _attn(B: int, H: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.softmax(torch.randn(B, H, N, N) * 3, dim=-1).to(dtype)  # (B, H, N, N) rows sum to 1


@interp
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_attention_importance_matches_reference(dtype: torch.dtype) -> None:
    # OFT-like layout: 1 BOS, 256 visual tokens, then 40 text / proprio / action-query rows.
    attn = _attn(1, 8, 297, dtype)
    rows = torch.arange(257, 297)
    out = K.attention_importance(attn, rows, (1, 257))
    assert K.last_backend("attention_importance") == "triton-interpret"
    ref = K.attention_importance_torch(attn, rows, (1, 257))
    assert out.shape == (1, 256) and out.dtype == torch.float32
    _close(out, ref)
    # Independent of the reference's formulation: an explicit double loop over heads and rows.
    a = attn.float()
    manual = sum(a[0, h, q, 1:257] for h in range(8) for q in rows.tolist()) / (8 * 40)
    _close(out[0], manual, 1e-5)


@interp
def test_attention_importance_batch_strides_and_small_blocks() -> None:
    # B > 1, a non-contiguous view, unsorted rows, and tiles smaller than the problem (loops and masks).
    base = _attn(3, 4, 70, torch.float32)
    attn = base.transpose(2, 3)  # a view with swapped strides
    rows = torch.tensor([69, 3, 50, 51, 52])
    ref = K.attention_importance_torch(attn, rows, (5, 60))
    out = K.attention_importance_triton(attn, rows, (5, 60), block_r=2, block_k=16)
    _close(out, ref)
    for hpg in (1, 2):  # heads split over programs (the GPU layout), partials summed
        _close(K.attention_importance_triton(attn, rows, (5, 60), block_r=4, block_k=32, heads_per_program=hpg),
               ref)
    assert not torch.allclose(out[0], out[1])  # batch rows are not mixed up


@interp
def test_attention_importance_peaks_where_queries_look() -> None:
    attn = torch.zeros(1, 2, 10, 10)
    attn[:, :, 8:, 4] = 1.0  # both query rows put all their attention on key 4
    out = K.attention_importance(attn, [8, 9], range(2, 8))
    assert out.shape == (1, 6) and int(out[0].argmax()) == 2  # key 4 is index 2 of the scored range 2..7
    expected = torch.zeros(1, 6)
    expected[0, 2] = 1.0
    _close(out, expected)


@interp
def test_attention_importance_inputs() -> None:
    attn = _attn(1, 2, 12, torch.float32)
    assert K.attention_importance(attn, slice(8, 12), (3, 3)).shape == (1, 0)  # empty key range
    _close(K.attention_importance(attn, slice(8, None), slice(0, 8)),
           K.attention_importance_torch(attn, [8, 9, 10, 11], (0, 8)))
    with pytest.raises(UserError, match="query_rows"):
        K.attention_importance(attn, [], (0, 8))
    with pytest.raises(UserError, match="outside"):
        K.attention_importance(attn, [12], (0, 8))
    with pytest.raises(UserError, match="key_range"):
        K.attention_importance(attn, [1], (4, 13))
    with pytest.raises(UserError, match="4 dims"):
        K.attention_importance(attn[0], [1], (0, 8))


# --------------------------------------------------------------------------------- patch_cosine_similarity

@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_cosine_matches_reference(dtype: torch.dtype) -> None:
    a = torch.randn(2, 256, 384).to(dtype)
    b = torch.randn(2, 256, 384).to(dtype)
    b[0, :20] = a[0, :20]  # static patches
    b[1, :5] = -a[1, :5]  # inverted
    out = K.patch_cosine_similarity(a, b)
    assert K.last_backend("patch_cosine_similarity") == "triton-interpret"
    ref = K.patch_cosine_similarity_torch(a, b)
    _close(out, ref)
    _close(ref, F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8))
    _close(out[0, :20], torch.ones(20), 1e-5)
    _close(out[1, :5], -torch.ones(5), 1e-5)


@interp
def test_patch_cosine_zero_vectors_uint8_and_small_blocks() -> None:
    a = torch.randint(0, 256, (2, 37, 48), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 37, 48), dtype=torch.uint8)
    a[0, 3] = 0  # zero vs non-zero
    a[1, 4] = 0
    b[1, 4] = 0  # zero vs zero
    out = K.patch_cosine_similarity_triton(a, b, block_p=8, block_d=16)
    assert torch.isfinite(out).all()
    assert out[0, 3] == 0 and out[1, 4] == 0
    _close(out, K.patch_cosine_similarity_torch(a, b))
    # 2-D input (one frame pair) and a non-contiguous view
    x, y = torch.randn(64, 33), torch.randn(33, 64).t()
    _close(K.patch_cosine_similarity(x, y), F.cosine_similarity(x, y, dim=-1))
    with pytest.raises(UserError, match="same shape"):
        K.patch_cosine_similarity(x, y[:, :5])


@interp
def test_image_patches_order_matches_vit_tokens() -> None:
    img = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    p = K.image_patches(img, 16)  # (2, 2*3, 16*16*3)
    assert p.shape == (2, 6, 768) and p.dtype == torch.uint8
    assert torch.equal(p[1, 4], img[1, 16:32, 16:32].reshape(-1))  # patch (row 1, col 1) is token 4
    # the same frame scores exactly 1 on every patch
    _close(K.patch_cosine_similarity(p, p.clone()), torch.ones(2, 6), 1e-6)
    with pytest.raises(UserError, match="divisible"):
        K.image_patches(img, 10)


# ------------------------------------------------------------------------------------------ gather_tokens

@interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens_matches_reference(dtype: torch.dtype) -> None:
    B, N, D = 2, 330, 256
    hidden = torch.randn(B, N, D).to(dtype)
    pos = torch.arange(N).expand(B, N).contiguous() + torch.tensor([[0], [7]])
    idx = K.topk_keep_indices(torch.randn(B, N), 150)
    out, pos_out = K.gather_tokens(hidden, pos, idx)
    assert K.last_backend("gather_tokens") == "triton-interpret"
    ref, pos_ref = K.gather_tokens_torch(hidden, pos, idx)
    assert torch.equal(out, ref) and torch.equal(pos_out, pos_ref)  # a copy is bit-exact, bf16 too
    assert out.shape == (B, 150, D) and out.dtype == dtype
    assert torch.equal(out[1, 10], hidden[1, idx[1, 10]]) and pos_out[1, 10] == idx[1, 10] + 7


@interp
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gather_tokens_keep_all_keep_none_and_broadcast(backend: str) -> None:
    hidden = torch.randn(3, 40, 24)
    pos1 = torch.arange(40).unsqueeze(0)  # (1, N) broadcast over the batch
    out, p = K.gather_tokens(hidden, pos1, torch.arange(40).expand(3, 40), backend=backend)
    assert torch.equal(out, hidden) and torch.equal(p, torch.arange(40).expand(3, 40))
    out, p = K.gather_tokens(hidden, pos1, torch.zeros(3, 0, dtype=torch.long), backend=backend)
    assert out.shape == (3, 0, 24) and p.shape == (3, 0)
    idx = torch.tensor([0, 5, 39])  # (K,) shared by the batch, (N,) position ids
    out, p = K.gather_tokens(hidden, torch.arange(40), idx, backend=backend)
    assert torch.equal(out, hidden[:, idx]) and torch.equal(p, idx.expand(3, 3))
    view = hidden.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous (B, N, D)
    assert torch.equal(K.gather_tokens(view, pos1, idx, backend=backend)[0], hidden[:, idx])
    one, _ = K.gather_tokens(hidden[1:2], pos1, idx.unsqueeze(0), backend=backend)  # B == 1
    assert torch.equal(one, hidden[1:2, idx])
    if backend == "triton":  # tiles smaller than K and D: loops and masks
        out, _ = K.gather_tokens_triton(hidden, pos1, idx, block_k=2, block_d=8)  # one program loops D
        assert torch.equal(out, hidden[:, idx])
        out, p = K.gather_tokens_triton(hidden, pos1, idx, block_k=2, block_d=8, chunk_d=8)  # GPU-style D grid
        assert torch.equal(out, hidden[:, idx]) and torch.equal(p, idx.expand(3, 3))
        out, _ = K.gather_tokens_triton(hidden, pos1, idx, block_k=2, block_d=4, chunk_d=16)  # 2 chunks x 4 tiles
        assert torch.equal(out, hidden[:, idx])


@interp
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), N=st.integers(1, 40), D=st.integers(1, 20), seed=st.integers(0, 2**16),
       bf16=st.booleans())
def test_gather_and_cosine_random_shapes(B: int, N: int, D: int, seed: int, bf16: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    hidden = torch.randn(B, N, D, generator=g).to(dtype)
    k = int(torch.randint(0, N + 1, (1,), generator=g))
    idx = K.topk_keep_indices(torch.rand(B, N, generator=g), k)
    pos = torch.randint(0, 1000, (B, N), generator=g)
    out, p = K.gather_tokens(hidden, pos, idx, backend="triton")
    ref, p_ref = K.gather_tokens_torch(hidden, pos, idx)
    assert torch.equal(out, ref) and torch.equal(p, p_ref)
    other = torch.randn(B, N, D, generator=g).to(dtype)
    _close(K.patch_cosine_similarity(hidden, other, backend="triton"),
           F.cosine_similarity(hidden.float(), other.float(), dim=-1, eps=1e-8), 1e-5)


@interp
def test_gather_tokens_rejects_bad_indices() -> None:
    hidden, pos = torch.randn(1, 10, 4), torch.arange(10)
    with pytest.raises(UserError, match="strictly increasing"):
        K.gather_tokens(hidden, pos, torch.tensor([[3, 1]]))
    with pytest.raises(UserError, match="outside"):
        K.gather_tokens(hidden, pos, torch.tensor([[3, 10]]))
    with pytest.raises(UserError, match="position_ids"):
        K.gather_tokens(hidden, torch.arange(9), torch.tensor([[1]]))


def test_keep_index_helpers() -> None:
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 4, 11]] = True
    mask[1, [0, 2, 3]] = True
    assert K.keep_indices_from_mask(mask).tolist() == [[1, 4, 11], [0, 2, 3]]
    assert K.keep_indices_from_mask(torch.zeros(2, 5, dtype=torch.bool)).shape == (2, 0)
    mask[1, 5] = True
    with pytest.raises(UserError, match="different numbers"):
        K.keep_indices_from_mask(mask)
    scores = torch.tensor([[0.1, 5.0, float("inf"), 0.3, 2.0]])
    assert K.topk_keep_indices(scores, 3).tolist() == [[1, 2, 4]]


# ----------------------------------------------------------------------------------------- exit_predictor

def _exit_inputs(B: int, D: int, V: int, C: int, Hd: int, dtype: torch.dtype):
    return K.random_exit_inputs(B, D, V, C, Hd, dtype)  # logits of a few units, softmax not saturated


@interp
@pytest.mark.parametrize("dtype,D,C", [(torch.float32, 1024, 4), (torch.bfloat16, 512, 16),
                                       (torch.float32, 300, 5)])
def test_exit_predictor_matches_reference(dtype: torch.dtype, D: int, C: int) -> None:
    hidden, norm_w, head, cand, prev, mlp = _exit_inputs(3, D, 2000, C, 64, dtype)
    params = mlp.kernel_params()
    out = K.exit_predictor(hidden, norm_w, 1e-6, head, cand, prev, *params)
    assert K.last_backend("exit_predictor") == "triton-interpret"
    ref = K.exit_predictor_torch(hidden, norm_w, 1e-6, head, cand, prev, *params)
    for got, want in zip(out, ref):
        _close(got, want, 1e-4)
    assert out.score.shape == (3,) and out.cand_logits.shape == (3, C)
    _close(out.cand_probs.sum(-1), torch.ones(3), 1e-5)
    # The features a predictor is trained on give the same score through ExitMLP.
    feats = K.exit_features_torch(hidden, norm_w, 1e-6, head, cand, prev)
    assert feats.shape == (3, 3 * C)
    _close(feats[:, :C], out.cand_logits, 1e-4)
    _close(feats[:, 2 * C:], out.cand_probs - prev, 1e-4)
    with torch.no_grad():
        _close(torch.sigmoid(mlp(feats)), out.score, 1e-4)


@interp
def test_exit_predictor_semantics_small_blocks_and_no_prev() -> None:
    D, V, C = 96, 50, 6
    hidden, norm_w, head, cand, _, mlp = _exit_inputs(2, D, V, C, 40, torch.float32)
    norm_w = torch.ones(D)
    head[cand[0, 2]] = hidden[0] * 3  # candidate 2 of row 0 points along the hidden state
    out = K.exit_predictor_triton(hidden, norm_w, 1e-6, head, cand, None, *mlp.kernel_params(),
                                  block_d=32, block_h=16)  # D and Hd tiles not dividing the sizes
    ref = K.exit_predictor_torch(hidden, norm_w, 1e-6, head, cand, None, *mlp.kernel_params())
    for got, want in zip(out, ref):
        _close(got, want, 1e-4)
    assert int(out.cand_probs[0].argmax()) == 2
    rms = hidden[0].pow(2).mean().add(1e-6).rsqrt()
    _close(out.cand_logits[0, 2], (hidden[0] * rms * hidden[0] * 3).sum(), 1e-4)
    # prev_probs=None means zeros: the delta features equal the probs
    feats = K.exit_features_torch(hidden, norm_w, 1e-6, head, cand)
    _close(feats[:, 2 * C:], feats[:, C:2 * C])


def test_full_head_check() -> None:
    hidden, norm_w, head, cand, _, _ = _exit_inputs(2, 64, 30, 3, 8, torch.float32)
    n = hidden * hidden.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * norm_w
    top = (n @ head.t()).argmax(-1)  # (B,)
    cand[0, 1] = top[0]  # row 0 has the argmax among its candidates, row 1 does not
    cand[1] = torch.tensor([i for i in range(30) if i != int(top[1])][:3])
    got_top, ok = K.full_head_check(hidden, norm_w, 1e-6, head, cand)
    assert got_top.tolist() == top.tolist() and ok.tolist() == [True, False]


@interp
def test_exit_predictor_rejects_bad_shapes() -> None:
    hidden, norm_w, head, cand, prev, mlp = _exit_inputs(1, 64, 100, 4, 8, torch.float32)
    w1, b1, w2, b2 = mlp.kernel_params()
    with pytest.raises(UserError, match="3C"):
        K.exit_predictor(hidden, norm_w, 1e-6, head, cand, prev, w1[:-1], b1, w2, b2)
    with pytest.raises(UserError, match="outside"):
        K.exit_predictor(hidden, norm_w, 1e-6, head, cand + 100, prev, w1, b1, w2, b2)
    with pytest.raises(UserError, match="hidden dim"):
        K.exit_predictor(hidden, norm_w[:10], 1e-6, head, cand, prev, w1, b1, w2, b2)


# --------------------------------------------------------------------------------------------- dispatch

@interp
def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(1, 4, 8)
    K.patch_cosine_similarity(a, a)
    assert K.last_backend("patch_cosine_similarity") == "triton-interpret"  # TRITON_INTERPRET=1, CPU
    K.patch_cosine_similarity(a, a, backend="torch")
    assert K.last_backend("patch_cosine_similarity") == "torch"
    with K.use_backend("torch"):
        K.patch_cosine_similarity(a, a)
        assert K.last_backend("patch_cosine_similarity") == "torch"
        K.patch_cosine_similarity(a, a, backend="triton")  # the kwarg beats the context
        assert K.last_backend("patch_cosine_similarity") == "triton-interpret"
    monkeypatch.delenv("TRITON_INTERPRET")  # read at call time: CPU tensors now take the torch path
    K.patch_cosine_similarity(a, a)
    assert K.last_backend("patch_cosine_similarity") == "torch"
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        K.patch_cosine_similarity(a, a, backend="triton")
    with pytest.raises(UserError, match="unknown kernel backend"):
        K.patch_cosine_similarity(a, a, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown kernel backend"):
        with K.use_backend("fast"):  # type: ignore[arg-type]
            pass


@interp
def test_kernel_module_follows_process_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels are decorated in triton's process mode even if TRITON_INTERPRET is unset when they load."""
    from triton.runtime.interpreter import InterpretedFunction

    sys.modules.pop("vla_runtime.kernels._triton.gather_tokens", None)
    dispatch._loaded_mode.pop("gather_tokens", None)
    monkeypatch.delenv("TRITON_INTERPRET")
    mod = dispatch.load_triton_module("gather_tokens")
    assert isinstance(mod._gather_tokens_kernel, InterpretedFunction)
    assert "TRITON_INTERPRET" not in os.environ  # restored after the import
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden = torch.randn(1, 6, 4)
    out, _ = K.gather_tokens(hidden, torch.arange(6), torch.tensor([[1, 2]]))
    assert K.last_backend("gather_tokens") == "triton-interpret" and torch.equal(out, hidden[:, 1:3])


def _run_py(code: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_interpret_after_compiled_import_falls_back() -> None:
    """TRITON_INTERPRET=1 set after triton was imported compiled: auto uses torch, forced triton says why."""
    code = ("import os, torch, triton, vla_runtime.kernels as K\n"
            "from vla_runtime.errors import UserError\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "a = torch.randn(1, 3, 5)\n"
            "K.patch_cosine_similarity(a, a)\n"
            "print(K.last_backend('patch_cosine_similarity'))\n"
            "try:\n"
            "    K.patch_cosine_similarity(a, a, backend='triton')\n"
            "except UserError as e:\n"
            "    print('UserError', e)\n")
    res = _run_py(code)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("UserError") and "first `import triton`" in lines[1]
    assert "first `import triton`" in res.stderr  # the auto fallback warned


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter tests ran in this process")
def test_interpreter_suite_in_subprocess() -> None:
    if os.environ.get("_VLA_KERNEL_TESTS_CHILD"):
        pytest.fail("the Triton interpreter is unavailable even in a fresh process (is triton importable?)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "_VLA_KERNEL_TESTS_CHILD": "1"}
    # The child skips the tests that already ran here (they spawn their own processes anyway).
    ran_here = "not (test_import_is_lazy or test_interpret_after_compiled or test_kernels_compile_for_gpu)"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", ran_here, __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "1 skipped" in summary, summary  # only this test skips in the child


def test_import_is_lazy_and_torch_path_needs_no_triton() -> None:
    """`import vla_runtime.kernels` and torch-path calls must not import triton (GL import-order hazard)."""
    code = ("import sys, torch, vla_runtime.kernels as K\n"
            "a = torch.randn(1, 3, 5)\n"
            "K.patch_cosine_similarity(a, a)\n"
            "assert K.last_backend('patch_cosine_similarity') == 'torch'\n"
            "print('triton' in sys.modules)\n")
    res = _run_py(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_kernels_compile_for_gpu_without_one() -> None:
    """The interpreter is laxer than the compiler: build every kernel to a sm_90 cubin (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "vla_runtime.kernels.aot", "--arch", "90", "--dtype", "bf16"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if "sm_90" in ln]
    assert len(lines) == len(K.OPS) and all(" ok " in ln for ln in lines), res.stdout


@interp
def test_bench_kernels_reports_both_paths() -> None:
    report = K_bench.bench_kernels("cpu", sizes=("tiny",), interpret=True, warmup=0, repeats=1,
                                   interpret_repeats=1)
    rows = report["results"]
    assert [r["op"] for r in rows] == list(K.OPS)
    for r in rows:
        assert r["torch_ms"] > 0 and r["triton_ms"] > 0 and r["triton_mode"] == "interpret"
        assert r["speedup"] is None  # no speed ratio from the interpreter
        assert r["max_abs_diff"] < 1e-4, r
    assert "TRITON_INTERPRET" in os.environ  # the fixture's value survives the bench's own toggling
    torch_only = K_bench.bench_kernels("cpu", sizes=("tiny",), warmup=0, repeats=1, ops=("gather_tokens",))
    assert len(torch_only["results"]) == 1 and torch_only["results"][0]["triton_ms"] is None
    with pytest.raises(UserError, match="unknown kernel op"):
        K_bench.bench_kernels("cpu", ops=("nope",))
