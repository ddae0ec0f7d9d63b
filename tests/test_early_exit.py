"""Early exit (SpecEE-style): candidates, features (= the kernel's), the exit rule, KV consistency after an exit
(lazy fill == the full model), schedules, predictor files, training, the parallel mode, and the bench."""

from __future__ import annotations

import json
from dataclasses import replace
import os
from pathlib import Path

import numpy as np
import pytest
import torch

_prev = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # triton fixes interpreted-vs-compiled at its first import (see test_kernels)
try:
    from vla_runtime.kernels import dispatch

    TRITON_INTERPRETED = dispatch.triton_mode() == "interpret"
finally:
    if _prev is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _prev

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.train.demos import list_demos, read_demo
from vla_runtime.errors import UserError
from vla_runtime.kernels import ExitMLP, exit_features_torch, exit_predictor_torch
from vla_runtime.policies.vla import early_exit as EE
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.early_exit import (EarlyExitConfig, EarlyExitPolicy, PredictorBank, build_candidates,
                                                 neighbor_bins, offline_schedule, online_layers, previous_token_for)
from vla_runtime.policies.vla.modeling import StepContext, VLAModel
from vla_runtime.policies.vla.policy import load_vla_policy, save_checkpoint
from vla_runtime.policies.vla.tokenizer import WordTokenizer

torch.set_num_threads(1)

TINY = dict(image_size=16, patch_size=8, cameras=("agentview", "wrist"), vision_hidden=16, vision_heads=2,
            vision_intermediate=32, hidden=32, layers=4, heads=4, kv_heads=2, head_dim=8, intermediate=64,
            vocab_size=20, max_text_len=5, chunk_size=3, n_action_steps=2, head_hidden=32, n_bins=32)


def tiny_model(mode: str = "ar", seed: int = 0, **kw: object) -> VLAModel:
    torch.manual_seed(seed)
    return VLAModel(VLAConfig(mode=mode, **{**TINY, **kw})).eval()  # type: ignore[arg-type]


def inputs(cfg: VLAConfig, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    state = torch.rand(1, cfg.state_dim, generator=g) * 2 - 1
    text = torch.randint(3, cfg.vocab_size, (1, cfg.max_text_len), generator=g)
    return images, state, text, torch.ones(1, cfg.max_text_len, dtype=torch.bool)


def const_bank(model: VLAModel, logit: float, cfg: EarlyExitConfig, layers: list[int] | None = None) -> PredictorBank:
    """Predictors whose score is sigmoid(logit) at every layer (forces or forbids exits)."""
    L = model.n_layers
    layers = list(range(L - 1)) if layers is None else layers
    F = 3 * cfg.n_candidates if model.cfg.mode == "ar" else EE.PARALLEL_FEATURES
    params = {i: {"w1": torch.zeros(F, 4), "b1": torch.zeros(4), "w2": torch.zeros(4, 1),
                  "b2": torch.tensor([logit])} for i in layers}
    return PredictorBank(mode=model.cfg.mode, n_layers=L, n_candidates=cfg.n_candidates if model.cfg.mode == "ar"
                         else 0, params=params, thresholds={i: 0.5 for i in layers}, offline_layers=layers,
                         config=cfg)


class HeadLog:
    """Forward hook on the action head: the logits of each AR step (prefill first)."""

    def __init__(self, model: VLAModel) -> None:
        self.logits: list[torch.Tensor] = []
        self.h = model.head.register_forward_hook(lambda m, a, o: self.logits.append(o[0, -1].detach().clone()))


# ----------------------------------------------------------------------------------------------- candidates
def test_candidates_priority_dedupe_fill_and_edges() -> None:
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2)
    assert neighbor_bins(5, 2, 32) == [5, 4, 6, 3, 7]
    shallow = torch.zeros(32)
    shallow[[6, 20, 21]] = torch.tensor([3.0, 2.0, 1.0])  # 6 duplicates a neighbour: skipped
    assert build_candidates(5, shallow, cfg, 32).tolist() == [5, 4, 6, 20, 21]
    assert build_candidates(None, shallow, cfg, 32).tolist()[:3] == [6, 20, 21]  # shallow alone fills C
    assert build_candidates(None, shallow, cfg, 32).numel() == cfg.n_candidates
    no_shallow = EarlyExitConfig(n_neighbors=1, n_shallow=0)
    assert build_candidates(0, None, no_shallow, 32).tolist() == [0, 1, 2]  # edge bin: next ones outward
    assert build_candidates(None, None, no_shallow, 32) is None  # no source: no exit possible


def test_previous_token_for_same_dimension() -> None:
    toks = list(range(10, 24))  # A = 7: token k's previous action is k - 7
    prev_chunk = torch.arange(21).reshape(3, 7)
    assert previous_token_for(9, toks, prev_chunk, 7, 2) == toks[2]
    assert previous_token_for(3, toks, prev_chunk, 7, 2) == int(prev_chunk[2, 3])  # where the last chunk left off
    assert previous_token_for(3, toks, prev_chunk, 7, 8) == int(prev_chunk[2, 3])  # clipped to its last action
    assert previous_token_for(3, toks, None, 7, 2) is None


# ----------------------------------------------------------------------------------------------- features
def test_training_features_equal_the_kernel_features_and_labels() -> None:
    from vla_runtime.policies.vla.early_exit_train import ar_samples

    m = tiny_model()
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0)
    L, D, n = m.n_layers, m.hidden, m.cfg.n_action_tokens
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n - 1, L, D, generator=g)
    toks = torch.randint(0, m.cfg.n_bins, (n,), generator=g)
    s = ar_samples(m, [{"tokens": toks, "hidden": hid, "prev": None, "group": 0}], cfg)
    w, eps = EE.final_norm_params(m)
    head = EE.ar_head_weight(m)
    # token k = 1, layer 1: rebuild the candidates and the features by hand
    h = hid[0]
    sh = head @ (h[0] * torch.rsqrt(h[0].pow(2).mean() + eps) * w)
    cand = build_candidates(None, sh, cfg, m.cfg.n_bins)
    f = exit_features_torch(h[1][None], w, eps, head, cand[None])[0]
    first = s["X"][1][0]  # first sample of layer 1: token 1, prev = zeros
    torch.testing.assert_close(first, f)
    C = cfg.n_candidates
    assert s["X"][1].shape[1] == 3 * C
    assert float(s["y"][1][0]) == float(cand[f[:C].argmax()] == toks[1])
    # the prev-layer variant: delta = probs(layer 1) - probs(layer 0)
    f0 = exit_features_torch(h[0][None], w, eps, head, cand[None])[0]
    torch.testing.assert_close(s["X"][1][1][2 * C:], f[C:2 * C] - f0[C:2 * C])
    # the kernel (fused) computes the same features' score as the MLP on them
    mlp = ExitMLP(C, 8)
    pred = exit_predictor_torch(h[1][None], w, eps, head, cand[None], None, *mlp.kernel_params())
    torch.testing.assert_close(pred.score, torch.sigmoid(mlp(f[None])), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- exit rule
def test_exit_rule_needs_score_and_full_argmax_among_candidates() -> None:
    m = tiny_model()
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=0, shallow_layer=-1)
    hidden = torch.randn(1, 1, m.hidden)
    top = int(m.head(m.decoder.norm(hidden))[0, -1].argmax())
    for logit, cand, expect in ((20.0, top, True), (20.0, (top + 10) % 32, False), (-20.0, top, False)):
        pol = EarlyExitPolicy(m, const_bank(m, logit, cfg), cfg)
        pol._ensure_device(hidden)
        pol._set_candidates(build_candidates(cand, None, cfg, m.cfg.n_bins))
        assert pol._should_exit(1, hidden) is expect
        assert pol.stats.rejected_by_argmax == int(logit > 0 and not expect)
        pol.remove_hooks()


def test_no_exit_predictors_give_the_full_model_and_forced_exits_run_fewer_layers() -> None:
    m = tiny_model()
    x = inputs(m.cfg)
    with torch.no_grad():
        ref, _ = m.predict(*x)
        cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0)
        never = EarlyExitPolicy(m, const_bank(m, -20.0, cfg), cfg)
        out, ctx = m.predict(*x, exit_policy=never, ctx=StepContext(m.n_layers, "ar"))
        never.remove_hooks()
        assert torch.equal(out, ref)
        assert ctx.extra["decode_exit_layers"] == [m.n_layers] * m.cfg.n_action_tokens
        always = EarlyExitPolicy(m, const_bank(m, 20.0, cfg), cfg)
        _, ctx = m.predict(*x, exit_policy=always, ctx=StepContext(m.n_layers, "ar"))
        always.remove_hooks()
    ex = ctx.extra["decode_exit_layers"]
    assert ex[0] == m.n_layers  # the prefill never exits
    assert always.stats.exits > 0 and min(ex[1:]) < m.n_layers
    assert always.stats.exit_layers == ex[1:]


# ----------------------------------------------------------------------------------------------- KV consistency
class ForcedExit(EarlyExitPolicy):
    """Exits after layer 1 on every other decode step: a fixed pattern to test the KV fill against."""

    def _should_exit(self, i: int, hidden: torch.Tensor) -> bool:
        return i == 1 and len(self._exits) % 2 == 1


def _run_forced(m: VLAModel, kv_fill: str) -> tuple[list[torch.Tensor], list[int], ForcedExit]:
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0, kv_fill=kv_fill, online=False)
    pol = ForcedExit(m, const_bank(m, 0.0, cfg), cfg)
    log = HeadLog(m)
    with torch.no_grad():
        _, ctx = m.predict(*inputs(m.cfg), exit_policy=pol, ctx=StepContext(m.n_layers, "ar"))
    log.h.remove()
    pol.remove_hooks()
    return log.logits, ctx.extra["decode_exit_layers"], pol


def _full_depth_logits(m: VLAModel, tokens: list[int]) -> torch.Tensor:
    """The full model, teacher-forced on `tokens`: logits predicting each of them (n, n_bins)."""
    images, state, text, tv = inputs(m.cfg)
    bins = torch.tensor(tokens)[None]
    with torch.no_grad():
        h = torch.cat([m.embed_prefix(images, state, text), m.suffix_inputs(1, torch.float32, bins)], 1)
        pos, kinds, valid = m.layout(1, tv, h.device)
        out, _ = m.forward_layers(h, pos, kinds, valid, bidirectional_suffix=False)
        return m.head(out[0, -m.cfg.n_suffix:])


def test_lazy_kv_fill_equals_the_full_model_after_exits() -> None:
    m = tiny_model(layers=4, chunk_size=3)
    logits, exits, pol = _run_forced(m, "lazy")
    tokens = [int(x.argmax()) for x in logits]
    ref = _full_depth_logits(m, tokens)
    L = m.n_layers
    assert 2 in exits and pol.stats.pending_rows > 0  # exits happened and later tokens carried them along
    full_after_exit = [k for k in range(1, len(exits)) if exits[k] == L and exits[k - 1] < L]
    assert full_after_exit
    for k in range(len(exits)):
        if exits[k] == L:  # every full-depth token sees exactly the full model's keys, exits before it included
            torch.testing.assert_close(logits[k], ref[k], atol=1e-4, rtol=1e-4)
    # without a fill the deeper layers miss the exited tokens' keys: the next full-depth token differs
    logits_none, exits_none, _ = _run_forced(m, "none")
    ref_none = _full_depth_logits(m, [int(x.argmax()) for x in logits_none])
    k = next(k for k in range(1, len(exits_none)) if exits_none[k] == L and exits_none[k - 1] < L)
    assert not torch.allclose(logits_none[k], ref_none[k], atol=1e-4, rtol=1e-4)


def test_copy_kv_fill_writes_every_deeper_layer() -> None:
    m = tiny_model(layers=4, chunk_size=3)
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0, kv_fill="copy", online=False)
    pol = ForcedExit(m, const_bank(m, 0.0, cfg), cfg, record_chunks=True)
    caches: list[object] = []
    hk = m.decoder.layers[0].register_forward_pre_hook(
        lambda mod, a, kw: caches.append(kw.get("cache", kw.get("past_key_values"))), with_kwargs=True)
    with torch.no_grad():
        _, ctx = m.predict(*inputs(m.cfg), exit_policy=pol, ctx=StepContext(m.n_layers, "ar"))
    hk.remove()
    pol.remove_hooks()
    cache = caches[-1]
    assert min(ctx.extra["decode_exit_layers"]) == 2
    lens = {cache.seq_len(j) for j in range(m.n_layers)}  # type: ignore[attr-defined]
    assert len(lens) == 1  # every layer holds a key for every token (the last token's own keys excepted: none)
    assert all(torch.isfinite(cache.k[j]).all() for j in range(m.n_layers))  # type: ignore[attr-defined]
    # the bench's agreement replay needs the prefill snapshot, taken although only layer 0 is hooked in this mode
    assert len(pol.stats.chunks) == 1 and len(pol.stats.chunks[0]["k"]) == m.n_layers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_copy_fill_equals_the_per_layer_copy_fill(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused copy fill (stacked k/v rows with the input norms folded in, one rotary) writes the same keys and
    values as running each deeper layer's own norm / k_proj / v_proj / rotary (Qwen2: with k/v biases)."""
    def run(fused: bool) -> tuple[list[torch.Tensor], object, list[torch.Tensor]]:
        m = tiny_model(layers=4, chunk_size=3, decoder_family=family)
        for l in m.decoder.layers:  # non-trivial norm weights, so folding them into the rows is exercised
            torch.nn.init.uniform_(l.input_layernorm.weight, 0.5, 1.5)
        logits, exits, pol = _run_forced(m, "copy") if fused else _run_with_stock_copy(m)
        assert (pol._copy_w is not None) is fused
        return logits, exits, pol._last_cache.k + pol._last_cache.v  # type: ignore[attr-defined]

    monkeypatch.setattr(ForcedExit, "_on_head", _keep_cache(ForcedExit._on_head))
    logits_f, exits_f, kv_f = run(True)
    logits_s, exits_s, kv_s = run(False)
    assert exits_f == exits_s and 2 in exits_f
    for a, b in zip(kv_f, kv_s):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(logits_f, logits_s):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _keep_cache(on_head):  # type: ignore[no-untyped-def]
    def f(self, module, args, out):  # type: ignore[no-untyped-def]
        if self._active and self._cache is not None:
            self._last_cache = self._cache
        return on_head(self, module, args, out)
    return f


def _run_with_stock_copy(m: VLAModel) -> tuple[list[torch.Tensor], list[int], ForcedExit]:
    orig = ForcedExit._copy_weights
    ForcedExit._copy_weights = lambda self: None  # type: ignore[method-assign]  # force the per-layer path
    try:
        return _run_forced(m, "copy")
    finally:
        ForcedExit._copy_weights = orig  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------- schedules
def test_offline_schedule_follows_the_skewed_earliest_layers() -> None:
    earliest = [3] * 60 + [5] * 30 + [12] * 10  # 12 = never (n_layers)
    S = offline_schedule(earliest, 12, list(range(11)), check_cost=0.1)
    assert 3 in S and 5 in S and 0 not in S
    assert offline_schedule([12] * 20, 12, list(range(11))) == []  # nothing exits: no predictor pays off
    # one predictor only: layer 5 catches 90 % of tokens (mean 6.6 layers) vs layer 3's 60 % (mean 7.2)
    assert offline_schedule(earliest, 12, list(range(11)), check_cost=0.1, max_layers=1) == [5]
    assert online_layers([4, 7], (-1, 0, 1), set(range(6))) == {2, 3, 4, 5}


def test_online_schedule_adds_layers_near_recent_exits() -> None:
    m = tiny_model(layers=6)
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0, context_offsets=(0,))
    pol = EarlyExitPolicy(m, const_bank(m, -20.0, cfg, layers=[1, 2, 3, 4]), cfg)
    pol.offline = {1}
    pol._exits = [6, 6, 4]  # the last token ran 4 layers: check layer index 3 too
    pol._memory = {}
    pol._tokens = [0] * 8
    ctx = StepContext(6, "ar", decode_step=2)
    pol._begin_token(ctx)
    assert pol._check == {1, 3}
    pol.cfg.online = False
    pol._begin_token(ctx)
    assert pol._check == {1}
    pol.remove_hooks()


# ----------------------------------------------------------------------------------------------- files + training
def test_bank_round_trip_and_errors(tmp_path: Path) -> None:
    m = tiny_model()
    cfg = EarlyExitConfig()
    bank = const_bank(m, 1.5, cfg, layers=[1, 2])
    bank.save(tmp_path / "p")
    back = PredictorBank.load(tmp_path / "p")
    assert back.offline_layers == [1, 2] and back.n_candidates == cfg.n_candidates
    assert torch.equal(back.params[2]["b2"], torch.tensor([1.5]))
    with pytest.raises(UserError, match="no exit predictors"):
        PredictorBank.load(tmp_path / "missing")
    with pytest.raises(UserError, match="candidates"):
        EarlyExitPolicy(m, back, EarlyExitConfig(n_shallow=5))
    with pytest.raises(UserError, match="mode"):
        EarlyExitPolicy(tiny_model("parallel"), back)
    with pytest.raises(UserError, match="unknown options"):
        EarlyExitConfig.from_dict({"treshold": 0.5})
    with pytest.raises(UserError, match="threshold"):
        EarlyExitConfig(threshold=1.5)


def _ckpt_and_demos(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    from vla_runtime.train.demos import write_dummy_demos

    tok = WordTokenizer.from_instructions(["reach the red target"])
    cfg = VLAConfig(mode=mode, **{**TINY, "vocab_size": tok.vocab_size, "image_size": 32})  # type: ignore[arg-type]
    torch.manual_seed(0)
    stats = {"action_min": [-1.0] * 7, "action_max": [1.0] * 7, "state_min": [-0.5] * 8, "state_max": [0.5] * 8}
    ck = save_checkpoint(VLAModel(cfg, bos_id=tok.bos_id), tok, stats, tmp_path / f"vla_{mode}")
    write_dummy_demos(tmp_path / "demos", 3, image_size=32, speed=1.0, max_steps=8)
    return ck, tmp_path / "demos"


def test_predictors_train_on_the_policys_own_closed_loop_rollouts(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_runtime.envs import dummy

    monkeypatch.setattr(dummy, "MAX_STEPS", 12)
    ck, _ = _ckpt_and_demos(tmp_path, "ar")
    seen: list[tuple[int, int | None]] = []
    orig_reset, orig_specs = dummy.DummyReachEnv.reset, dummy.DummyReachEnv.episode_specs
    monkeypatch.setattr(dummy.DummyReachEnv, "reset",
                        lambda self, spec: (seen.append((spec.seed, spec.init_state)), orig_reset(self, spec))[1])
    # specs that name init states (as LIBERO's do): the rollouts must use fresh placements instead
    monkeypatch.setattr(dummy.DummyReachEnv, "episode_specs", lambda self, seed, n, tasks=None: [
        replace(s, init_state=s.seed % 50) for s in orig_specs(self, seed, n, tasks)])
    out = tmp_path / "pred"
    EE.train_exit_predictors(str(ck), [], out, epochs=2, rollout_env="dummy:reach", rollout_episodes=3,
                             rollout_seed=500)
    meta = json.loads((out / EE.META_FILE).read_text())["train"]
    stride = VLAConfig(mode="ar", **TINY).n_action_steps
    # three closed-loop episodes of the dummy env from seed 500, one chunk per n_action_steps of 12 steps each
    assert seen == [(500, None), (501, None), (502, None)]
    assert meta["rollouts"] == {"env": "dummy:reach", "episodes": 3, "first_seed": 500, "chunks": 3 * (12 // stride)}
    assert meta["chunks"] == 3 * (12 // stride) and meta["demo_files"] == []
    assert sum(meta["earliest_correct_hist"]) == meta["tokens"] > 0
    with pytest.raises(UserError, match="--data"):
        EE.train_exit_predictors(str(ck), [], out)


@pytest.mark.parametrize("mode", ["ar", "parallel"])
def test_train_predictors_then_act_with_accel(mode: str, tmp_path: Path) -> None:
    ck, demos = _ckpt_and_demos(tmp_path, mode)
    res = EE.train_exit_predictors(str(ck), [demos], ck / EE.PREDICTOR_DIR, epochs=3)
    meta = json.loads((ck / EE.PREDICTOR_DIR / EE.META_FILE).read_text())
    stride = VLAConfig(mode=mode, **TINY).n_action_steps  # one chunk per n_action_steps frames of each demo
    frames = [len(read_demo(p, load_images=False).actions) for p in list_demos(demos)]
    assert meta["mode"] == mode and meta["layers"] == res["layers"]
    assert meta["train"]["chunks"] == sum(-(-n // stride) for n in frames) > 3
    assert sum(meta["train"]["earliest_correct_hist"]) > 0
    assert meta["train"]["weights_sha256"] == EE.weights_digest(ck) and len(meta["train"]["demo_files"]) == 3
    # the shipped layout: <ckpt>/exit_predictors is found without options; a forced threshold makes it exit
    pol = load_vla_policy(ck, accel=("earlyexit",), accel_options={"earlyexit": {"threshold": 0.01}})
    assert isinstance(pol.exit_policy, EarlyExitPolicy)
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    pol.reset(obs.instruction)
    for _ in range(2):
        chunk = pol.act(obs)
        assert chunk.actions.shape == (3, 7) and np.isfinite(chunk.actions).all()
        obs = env.step(chunk.actions[0]).obs
    assert pol.exit_policy.stats.checks > 0
    assert len(pol.exit_policy.stats.exit_layers) == (2 * (pol.cfg.n_action_tokens - 1) if mode == "ar" else 2)


def test_train_rejects_missing_data(tmp_path: Path) -> None:
    ck, _ = _ckpt_and_demos(tmp_path, "ar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no demo files"):
        EE.train_exit_predictors(str(ck), [tmp_path / "empty"], tmp_path / "out")


def test_cli_trains_predictors_to_the_given_precision(tmp_path: Path) -> None:
    from vla_runtime.cli import main

    ck, demos = _ckpt_and_demos(tmp_path, "ar")
    out = tmp_path / "pred"
    assert main(["train", "--policy", "exit-predictors", "--checkpoint", str(ck), "--data", str(demos),
                 "--out", str(out), "--target-precision", "0.9", "--max-chunks", "9"]) == 0
    train = json.loads((out / EE.META_FILE).read_text())["train"]
    assert train["target_precision"] == 0.9 and train["chunks"] == 9
    for bad in (["--target-precision", "1.5"], ["--max-chunks", "2"]):
        assert main(["train", "--policy", "exit-predictors", "--checkpoint", str(ck), "--data", str(demos),
                     "--out", str(tmp_path / "bad"), *bad]) != 0
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- parallel mode
def test_parallel_exit_uses_the_exit_layers_chunk() -> None:
    m = tiny_model("parallel", layers=4)
    x = inputs(m.cfg)
    cfg = EarlyExitConfig()
    pol = EarlyExitPolicy(m, const_bank(m, 20.0, cfg, layers=[1]), cfg)
    with torch.no_grad():
        out, ctx = m.predict(*x, exit_policy=pol)
        h = torch.cat([m.embed_prefix(x[0], x[1], x[2]), m.suffix_inputs(1, torch.float32)], 1)
        pos, kinds, valid = m.layout(1, x[3], h.device)
        two, _ = m.forward_layers(h, pos, kinds, valid, exit_policy=_StopAfter(1))
        ref = m.head(two[:, -m.cfg.n_suffix:])
    assert ctx.exit_layer == 2 and pol.stats.exit_layers == [2]
    torch.testing.assert_close(out, ref)
    f = EE.parallel_features(ref, None, two[:, -m.cfg.n_suffix:], None, 1, 4)
    assert f.shape == (1, EE.PARALLEL_FEATURES) and float(f[0, -1]) == 0.5


def test_parallel_lone_check_looks_back_one_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check whose layer before was not checked computes that layer's chunk too, so the deltas span one layer
    (as the predictors are trained) instead of being zeros; the chunk and the exit are unchanged by it."""
    m = tiny_model("parallel", layers=4)
    x = inputs(m.cfg)
    cfg = EarlyExitConfig(online=False)
    seen: list[torch.Tensor] = []
    real = EE._mlp_score
    monkeypatch.setattr(EE, "_mlp_score", lambda f, p: (seen.append(f.clone()), real(f, p))[1])
    pol = EarlyExitPolicy(m, const_bank(m, -20.0, cfg, layers=[2]), cfg)  # scores ~0: checks, never exits
    with torch.no_grad():
        m.predict(*x, exit_policy=pol)
        h = torch.cat([m.embed_prefix(x[0], x[1], x[2]), m.suffix_inputs(1, torch.float32)], 1)
        pos, kinds, valid = m.layout(1, x[3], h.device)
        n = m.cfg.n_suffix
        s1 = m.forward_layers(h, pos, kinds, valid, exit_policy=_StopAfter(1))[0][:, -n:]
        s2 = m.forward_layers(h, pos, kinds, valid, exit_policy=_StopAfter(2))[0][:, -n:]
        ref = EE.parallel_features(m.head(s2).float(), m.head(s1).float(), s2, s1, 2, 4)
    assert len(seen) == 1 and pol.stats.exit_layers == [4]
    torch.testing.assert_close(seen[0], ref, rtol=1e-4, atol=1e-5)
    assert float(seen[0][0, 0]) > 0  # mean |d chunk| over one layer, not the zeros of a first check


class _StopAfter:
    attention_layers: frozenset[int] = frozenset()

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        return layer_idx == self.layer


# ----------------------------------------------------------------------------------------------- kernel path
@pytest.mark.skipif(not TRITON_INTERPRETED, reason="triton was imported compiled before this module (run this file "
                    "alone; tests/test_kernels.py covers the kernel itself)")
def test_policy_decision_with_the_triton_kernel_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_runtime.kernels import last_backend

    m = tiny_model()
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0)
    bank = const_bank(m, 0.0, cfg)
    torch.manual_seed(3)
    for p in bank.params.values():  # a non-trivial MLP
        p["w1"] = torch.randn_like(p["w1"])
        p["w2"] = torch.randn_like(p["w2"])
    hidden = torch.randn(1, 1, m.hidden)
    cand = build_candidates(4, torch.randn(m.cfg.n_bins), cfg, m.cfg.n_bins)
    scores = {}
    for backend in ("torch", "triton"):
        if backend == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        pol = EarlyExitPolicy(m, bank, EarlyExitConfig(**{**cfg.to_dict(), "backend": backend}))
        pol._ensure_device(hidden)
        pol._set_candidates(cand)
        pol._should_exit(1, hidden)
        pol._should_exit(2, hidden)  # second call: with the first call's probabilities as prev_probs
        scores[backend] = pol.last_score
        assert last_backend("exit_predictor") == ("torch" if backend == "torch" else "triton-interpret")
        pol.remove_hooks()
    assert abs(scores["torch"] - scores["triton"]) < 1e-4


def test_lean_cpu_path_equals_the_kernel_reference() -> None:
    m = tiny_model()
    cfg = EarlyExitConfig(n_neighbors=1, n_shallow=2, shallow_layer=0)
    bank = const_bank(m, 0.3, cfg)
    torch.manual_seed(4)
    for p in bank.params.values():
        p["w1"] = torch.randn_like(p["w1"])
        p["w2"] = torch.randn_like(p["w2"])
    cand = build_candidates(7, torch.randn(m.cfg.n_bins), cfg, m.cfg.n_bins)
    hs = [torch.randn(1, 1, m.hidden) * 3 for _ in range(3)]
    out = {}
    for backend in (None, "torch"):
        pol = EarlyExitPolicy(m, bank, EarlyExitConfig(**{**cfg.to_dict(), "backend": backend}))
        pol._ensure_device(hs[0])
        pol._set_candidates(cand)
        out[backend] = []
        for i, h in enumerate(hs):  # consecutive checks: the delta features use the previous check's probs
            pol._should_exit(i, h)
            out[backend].append((pol.last_score, pol._prev_probs.clone()))
        pol.remove_hooks()
    for (s_lean, p_lean), (s_ref, p_ref) in zip(out[None], out["torch"]):
        assert abs(s_lean - s_ref) < 1e-5
        torch.testing.assert_close(p_lean, p_ref)


# ----------------------------------------------------------------------------------------------- bench
def test_bench_reports_layers_agreement_and_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_runtime.envs import dummy
    from vla_runtime.policies.vla.early_exit_bench import bench_earlyexit

    monkeypatch.setattr(dummy, "MAX_STEPS", 8)
    ck, demos = _ckpt_and_demos(tmp_path, "ar")
    EE.train_exit_predictors(str(ck), [demos], ck / EE.PREDICTOR_DIR, epochs=2)
    rep = bench_earlyexit(env="dummy:reach", policy=str(ck), episodes=1, seed=0, out=tmp_path / "b",
                          with_specprune=False, options={"threshold": 0.01})
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {r["name"]: r for r in saved["methods"]}
    assert saved["bench"] == "earlyexit" and set(rows) == {"full", "earlyexit"}
    ee = rows["earlyexit"]
    assert rows["full"]["layers_mean"] == 4.0 and 1.0 <= ee["layers_mean"] <= 4.0
    assert ee["agreement_chunks"] >= 1 and 0.0 <= ee["token_agreement_pct"] <= 100.0
    assert ee["ratio_to_baseline"] is not None and "success_delta_pp" in ee
    assert rep["predictors"].endswith(EE.PREDICTOR_DIR)
    # the decode steps' own ratio (SpecEE's metric) from the prefill / decode split of the AR decoder time
    for r in rows.values():
        assert r["mean_prefill_ms"] > 0 and r["mean_decode_ms"] > 0
    assert ee["decode_ratio_to_baseline"] == pytest.approx(rows["full"]["mean_decode_ms"] / ee["mean_decode_ms"],
                                                           rel=2e-3)


def test_bench_arms_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--arms runs a subset (full always); a SpecPrune arm turns SpecPrune on; unknown arms are refused up front."""
    from vla_runtime.envs import dummy
    from vla_runtime.policies.vla.early_exit_bench import bench_earlyexit

    monkeypatch.setattr(dummy, "MAX_STEPS", 4)
    ck, demos = _ckpt_and_demos(tmp_path, "ar")
    EE.train_exit_predictors(str(ck), [demos], ck / EE.PREDICTOR_DIR, epochs=1)
    with pytest.raises(UserError, match="unknown arm"):
        bench_earlyexit(env="dummy:reach", policy=str(ck), episodes=1, seed=0, out=None, arms=("early-exit",))
    rep = bench_earlyexit(env="dummy:reach", policy=str(ck), episodes=1, seed=0, out=None,
                          arms=("specprune+earlyexit",), options={"threshold": 0.01})
    assert [r["name"] for r in rep["methods"]] == ["full", "specprune+earlyexit"]


def test_replay_compares_on_held_out_frames(tmp_path: Path) -> None:
    """The open-loop replay runs full and early exit on the same frames of demos the predictors were not trained
    on, and reports layers, agreement, identical-chunk share and wall/CPU latency ratios."""
    from vla_runtime.policies.vla.early_exit_bench import replay_earlyexit
    from vla_runtime.train.demos import write_dummy_demos

    ck, demos = _ckpt_and_demos(tmp_path, "ar")
    EE.train_exit_predictors(str(ck), [demos], ck / EE.PREDICTOR_DIR, epochs=1)
    write_dummy_demos(tmp_path / "demos", 5, image_size=32, speed=1.0, max_steps=8)  # 2 more, unseen
    rep = replay_earlyexit(str(ck), [tmp_path / "demos"], max_chunks=4, options={"threshold": 0.01},
                           out=tmp_path / "r")
    rows = {r["name"]: r for r in rep["methods"]}
    assert rep["held_out"] and rep["episodes"] == 2 and set(rows) == {"full", "earlyexit"}
    assert rows["full"]["layers_mean"] == TINY["layers"] and rows["full"]["same_chunk_tokens_pct"] == 100.0
    assert rows["earlyexit"]["layers_mean"] < TINY["layers"]  # threshold 0.01: it exits
    for r in rows.values():
        assert r["cpu_ms_p50"] > 0 and r["cpu_ratio_to_baseline"] is not None
    assert json.loads((tmp_path / "r" / "bench.json").read_text())["bench"] == "earlyexit-replay"
