"""SpecPrune: kept-set construction (history really used, frame difference, protected tokens, original positions,
pruning nothing == no pruning), the phase controller and its replans, the baselines, the registry, the bench.

Kernels vs their references are covered in tests/test_kernels.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.modeling import KIND_TEXT, KIND_VISUAL, StepContext, VLAModel
from vla_runtime.policies.vla.policy import ACCELERATIONS, VLAPolicy, build_strategies, save_checkpoint
from vla_runtime.policies.vla.specprune import (ACCEL_PRESETS, MEM_KEY, ControllerConfig, SpecPruneConfig,
                                                SpecPrunePruner, classify_action, derive_controller_thresholds,
                                                make_pruner)
from vla_runtime.policies.vla.tokenizer import WordTokenizer
from vla_runtime.runtime.loop import LoopConfig, run_episode

torch.set_num_threads(1)
INSTR = "reach the red target"
# 32 px, 4 px patches: 64 patches per camera, 128 visual tokens; 8 layers so every stage has room
TINY = dict(image_size=32, patch_size=4, vision_hidden=16, vision_heads=2, vision_intermediate=32, hidden=32,
            layers=8, heads=4, kv_heads=2, head_dim=8, intermediate=64, max_text_len=6, chunk_size=4,
            n_action_steps=4, head_hidden=32)
STATS = {"action_min": [-1.0] * 7, "action_max": [1.0] * 7, "state_min": [-0.5] * 8, "state_max": [0.5] * 8}


def tiny_model(mode: str = "parallel", seed: int = 0) -> tuple[VLAModel, WordTokenizer]:
    tok = WordTokenizer.from_instructions([INSTR])
    cfg = VLAConfig(mode=mode, vocab_size=tok.vocab_size, **TINY)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    m = VLAModel(cfg, bos_id=tok.bos_id).eval()
    m.decoder.config._attn_implementation = "eager"  # exact comparisons between captured and plain layers
    return m, tok


def inputs(model: VLAModel, tok: WordTokenizer, seed: int = 1) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = tok.encode(INSTR)
    t = torch.zeros(1, cfg.max_text_len, dtype=torch.long)
    t[0, :len(ids)] = torch.tensor(ids)
    v = torch.zeros(1, cfg.max_text_len, dtype=torch.bool)
    v[0, :len(ids)] = True
    return {"images": torch.rand(1, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
            "state": torch.rand(1, cfg.state_dim, generator=g) * 2 - 1, "text_ids": t, "text_valid": v}


class Recorder:
    """Wraps a pruner; records, per layer, the tokens entering it and the indices the pruner returned."""

    def __init__(self, inner: SpecPrunePruner) -> None:
        self.inner = inner
        self.attention_layers = inner.attention_layers
        self.log: list[dict[str, Any]] = []

    @property
    def early_cuts(self) -> bool:
        return bool(getattr(self.inner, "early_cuts", False))

    @property
    def call_layers(self) -> frozenset[int]:
        return self.inner.call_layers

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        assert ctx.positions is not None and ctx.kinds is not None
        keep = self.inner.before_layer(layer_idx, ctx)
        self.log.append({"layer": layer_idx, "pos": ctx.positions.clone(), "kinds": ctx.kinds.clone(),
                         "keep": None if keep is None else keep.clone()})
        return keep


def step(model: VLAModel, pruner: Any, x: dict[str, torch.Tensor], memory: dict[str, Any], obs_step: int
         ) -> tuple[torch.Tensor, StepContext]:
    ctx = StepContext(n_layers=model.n_layers, mode=model.cfg.mode, memory=memory)
    ctx.extra["step"] = obs_step
    return model.predict(x["images"], x["state"], x["text_ids"], x["text_valid"], pruner=pruner, ctx=ctx)


def visual_ids(ctx: StepContext) -> set[int]:
    assert ctx.positions is not None and ctx.kinds is not None
    return set((ctx.positions[0][ctx.kinds[0] == KIND_VISUAL] - 1).tolist())


def kept_after_static(rec: Recorder, prune_layer: int) -> set[int]:
    """Patch ids entering the layer after the static cut."""
    e = next(e for e in rec.log if e["layer"] == prune_layer + 1)
    return set((e["pos"][0][e["kinds"][0] == KIND_VISUAL] - 1).tolist())


# ---------------------------------------------------------------------------------------------------------------
# kept-set construction
# ---------------------------------------------------------------------------------------------------------------
def test_protected_tokens_never_dropped_and_positions_preserved() -> None:
    model, tok = tiny_model()
    rec = Recorder(make_pruner(model, "specprune", budget_coarse=0.1, floor=4))
    memory: dict[str, Any] = {}
    for s in range(3):
        step(model, rec, inputs(model, tok, seed=s), memory, obs_step=4 * s)
    first = rec.log[0]
    non_vis = set(first["pos"][0][first["kinds"][0] != KIND_VISUAL].tolist())
    cuts = 0
    for j, e in enumerate(rec.log):
        pos, kinds = e["pos"][0], e["kinds"][0]
        # every BOS / proprio / text / action token enters every layer, at its layout position
        assert non_vis <= set(pos.tolist())
        if e["keep"] is not None:
            cuts += 1
            keep = e["keep"][0]
            assert bool((keep[1:] > keep[:-1]).all())  # sorted, no repeats
            kept_pos = pos[keep]
            assert non_vis <= set(kept_pos.tolist())
            # positions travel with the rows: the next layer sees exactly the gathered original ids
            nxt = rec.log[j + 1]  # (the last layer never cuts here)
            assert nxt["layer"] == e["layer"] + 1 and torch.equal(nxt["pos"][0], kept_pos)
        assert bool((pos[1:] > pos[:-1]).all())  # never renumbered: strictly increasing layout ids
    assert cuts >= 3 * 2  # static cut + at least one dynamic cut per step
    # with 10 % of 128 visual tokens kept the static cut (before layer 1) leaves 13, dynamic pruning (before
    # layers 2, 4, 6) never goes below the floor
    vis_counts = [int((e["kinds"][0] == KIND_VISUAL).sum()) for e in rec.log]
    assert max(vis_counts) == model.cfg.n_visual and min(vis_counts) >= 4
    assert vis_counts[:4] == [128, 128, 13, 11]


def test_pruning_nothing_equals_unpruned_output() -> None:
    model, tok = tiny_model()
    x = inputs(model, tok)
    ref, ref_ctx = step(model, None, x, {}, 0)
    pr = make_pruner(model, "specprune", budget_coarse=1.0, budget_fine=1.0, dynamic_keep=1.0)
    mem: dict[str, Any] = {}
    for s in range(2):  # also on a step with history and a reference frame
        out, ctx = step(model, pr, x, mem, 8 * s)
        assert torch.equal(out, ref)
        assert ctx.tokens_per_layer == ref_ctx.tokens_per_layer
    assert mem[MEM_KEY]["history"] is not None  # the pruner did run its stages


def test_history_is_filled_and_changes_the_kept_set() -> None:
    """Global history: the previous inference's most important patches are kept; ablating it changes the set."""
    model, tok = tiny_model()
    opts = dict(budget_coarse=0.25, local_k_coarse=0.05, history_k=0.15, dynamic=True)
    x1, x2 = inputs(model, tok, seed=1), inputs(model, tok, seed=2)
    kept: dict[bool, set[int]] = {}
    for use_history in (True, False):
        pr = make_pruner(model, "specprune", use_history=use_history, **opts)
        rec = Recorder(pr)
        mem: dict[str, Any] = {}
        _, ctx1 = step(model, rec, x1, mem, 0)
        assert mem[MEM_KEY]["history"] is None  # nothing before the first inference
        rec.log.clear()
        _, ctx2 = step(model, rec, x2, mem, 4)
        kept[use_history] = kept_after_static(rec, pr.cfg.prune_layer)
        if use_history:
            hist = mem[MEM_KEY]["history"]
            assert hist is not None and hist.shape == (1, model.cfg.n_visual)
            # the previous inference's importance, recorded exactly for the patches that reached its last layer
            assert set((hist[0] >= 0).nonzero().squeeze(1).tolist()) == visual_ids(ctx1)
            top = pr._per_camera_topk(hist, round(0.15 * pr.P))[0].nonzero().squeeze(1).tolist()
            assert set(top) <= kept[True]  # the history top-k is in this step's kept set
            assert ctx2.extra["info"]["prune_history_k"] == len(top) > 0
    assert len(kept[True]) == len(kept[False]) == 32
    assert kept[True] != kept[False]


def test_random_fill_keeps_the_candidates_and_spreads_the_rest() -> None:
    """fill="random": the local top-k is kept as with the attention fill, the rest of the budget is a seeded draw."""
    model, tok = tiny_model()
    x = inputs(model, tok)
    opts = dict(budget_coarse=0.25, local_k_coarse=0.05, use_history=False, dynamic=False)
    kept: dict[str, set[int]] = {}
    local: set[int] = set()
    for fill in ("attention", "random"):
        pr = make_pruner(model, "specprune", fill=fill, row_scores=False, **opts)
        rec = Recorder(pr)
        _, ctx = step(model, rec, x, {}, 0)
        kept[fill] = kept_after_static(rec, pr.cfg.prune_layer)
        assert len(kept[fill]) == 32 and ctx.extra["info"]["prune_local_k"] == 6  # 3 per camera
        if fill == "attention":  # no reference frame yet: everything ranks by this step's attention
            from vla_runtime.kernels import attention_importance_torch
            text_rows = (rec.log[0]["kinds"][0] == KIND_TEXT).nonzero().squeeze(1)
            imp = attention_importance_torch(ctx.attentions[0], text_rows, (1, 129))[0]
            local = set(pr._per_camera_topk(imp[None], 3)[0].nonzero().squeeze(1).tolist())
            assert kept[fill] == set(imp.topk(32).indices.tolist())
    assert local <= kept["random"] and kept["random"] != kept["attention"]
    again = Recorder(make_pruner(model, "specprune", fill="random", row_scores=False, **opts))
    step(model, again, x, {}, 0)
    assert kept_after_static(again, 1) == kept["random"]  # a fresh episode replays the same draw
    with pytest.raises(UserError, match="fill"):
        make_pruner(model, "specprune", fill="uniform")


def test_frame_difference_keeps_changed_patches_first() -> None:
    model, tok = tiny_model()
    pr = make_pruner(model, "specprune", use_local=False, use_history=False, dynamic=False, budget_coarse=0.25,
                     prev_t_min=1, prev_t_max=1)
    x = inputs(model, tok)
    mem: dict[str, Any] = {}
    step(model, pr, x, mem, 0)
    x2 = {k: v.clone() for k, v in x.items()}
    # change 5 patches of camera 0 (patch row 0, columns 0-4) and 3 of camera 1 (row 7, columns 5-7)
    x2["images"][0, 0, :, 0:4, 0:20] = -x2["images"][0, 0, :, 0:4, 0:20]
    x2["images"][0, 1, :, 28:32, 20:32] = -x2["images"][0, 1, :, 28:32, 20:32]
    rec = Recorder(pr)
    _, ctx = step(model, rec, x2, mem, 4)
    changed = {0, 1, 2, 3, 4} | {64 + 7 * 8 + c for c in (5, 6, 7)}
    kept = kept_after_static(rec, pr.cfg.prune_layer)
    assert changed <= kept and len(kept) == 32
    assert ctx.extra["info"]["prune_static_patches"] == 128 - len(changed)


def test_below_the_local_top_k_specprune_keeps_fastvs_set_unless_budget_shares_are_reserved() -> None:
    """Budget 13 of 128 with a local top-k of 32: under strict tier priority the kept set is the local top-13, i.e.
    exactly FastV's set at the same budget, whatever the history and frame difference say. With quota (0.5, 0.25,
    0.25) the history's and the changed patches' best tokens get their seats."""
    model, tok = tiny_model()
    x1, x2 = inputs(model, tok, seed=1), inputs(model, tok, seed=1)
    x2["images"][0, 0, :, 0:4, 0:20] = -x2["images"][0, 0, :, 0:4, 0:20]  # 5 changed patches, camera 0 row 0
    opts = dict(budget_coarse=0.1, budget_fine=0.1, local_k_coarse=0.25, local_k_fine=0.25, history_k=0.15,
                dynamic=True, prev_t_min=1, prev_t_max=1)
    kept: dict[Any, set[int]] = {}
    infos: dict[Any, dict[str, Any]] = {}
    hist = None
    for quota in (None, (0.5, 0.25, 0.25)):
        pr = make_pruner(model, "specprune", quota=quota, **opts)
        mem: dict[str, Any] = {}
        step(model, pr, x1, mem, 0)
        rec = Recorder(pr)
        _, ctx = step(model, rec, x2, mem, 4)
        hist = mem[MEM_KEY]["history"].clone()  # what this second inference ranked by (the first's importance)
        kept[quota] = kept_after_static(rec, pr.cfg.prune_layer)
        infos[quota] = dict(ctx.extra["info"])
    fv = make_pruner(model, "prune-fastv", budget=0.1)
    rec = Recorder(fv)
    step(model, rec, x2, {}, 4)
    assert len(kept[None]) == len(kept[(0.5, 0.25, 0.25)]) == 13
    assert kept[None] == kept_after_static(rec, fv.cfg.prune_layer)  # FastV's set
    q = kept[(0.5, 0.25, 0.25)]
    assert q != kept[None] and infos[(0.5, 0.25, 0.25)]["prune_quota_used"] == 6 + 3 + 3  # round(share * 13) each; the 13th by tier
    assert {0, 1, 2, 3, 4} & q and not {0, 1, 2, 3, 4} <= kept[None]  # changed patches get seats
    assert hist is not None
    best_hist = set(hist[0].topk(3).indices.tolist())
    assert best_hist & q  # the history's best tokens too
    with pytest.raises(UserError, match="quota"):
        SpecPruneConfig(quota=(0.6, 0.3, 0.3))


def test_frame_lookback_adapts_to_motion() -> None:
    model, tok = tiny_model()
    pr = make_pruner(model, "specprune", prev_t_min=1, prev_t_max=6, motion_ref=0.5)
    mem: dict[str, Any] = {}
    x = inputs(model, tok)
    step(model, pr, x, mem, 0)
    for _ in range(4):
        pr.on_action(np.zeros(7, np.float32), mem)  # at rest: look back prev_t_max steps
    _, ctx = step(model, pr, x, mem, 4)
    assert ctx.extra["info"]["prune_prev_t"] == 6
    for _ in range(4):
        pr.on_action(np.array([1, 0, 0, 0, 0, 0, 0], np.float32), mem)  # fast: the shortest lookback
    _, ctx = step(model, pr, x, mem, 8)
    assert ctx.extra["info"]["prune_prev_t"] == 1


def test_baselines_keep_the_budget() -> None:
    model, tok = tiny_model()
    x = inputs(model, tok)
    sets = {}
    for name in ("prune-random", "prune-fastv", "prune-framediff"):
        pr = make_pruner(model, name, budget=0.2)
        rec = Recorder(pr)
        mem: dict[str, Any] = {}
        step(model, rec, x, mem, 0)
        sets[name] = kept_after_static(rec, pr.cfg.prune_layer)
        assert len(sets[name]) == 26  # ceil(0.2 * 128)
        # no dynamic stage: the count stays the same to the last layer
        assert int((rec.log[-1]["kinds"][0] == KIND_VISUAL).sum()) == 26
    assert pr.score_layers == frozenset() and make_pruner(model, "prune-fastv").score_layers == {0}
    assert sets["prune-random"] != sets["prune-fastv"]
    # random pruning is reproducible per episode: a fresh memory replays the same draws
    pr = make_pruner(model, "prune-random", budget=0.2)
    again = Recorder(pr)
    step(model, again, x, {}, 0)
    assert kept_after_static(again, 2) == sets["prune-random"]


def test_attention_selection_keeps_the_most_attended_patches() -> None:
    """FastV-style selection == top-k of the text->vision attention at layer 0, computed independently."""
    from vla_runtime.kernels import attention_importance_torch

    model, tok = tiny_model()
    x = inputs(model, tok)
    rec = Recorder(make_pruner(model, "prune-fastv", budget=0.2, row_scores=False))  # eager: ctx.attentions
    _, ctx = step(model, rec, x, {}, 0)
    first = rec.log[0]
    text_rows = (first["kinds"][0] == KIND_TEXT).nonzero().squeeze(1)  # (padding already removed, B == 1)
    imp = attention_importance_torch(ctx.attentions[0], text_rows, (1, 129))[0]  # (128,)
    expect = set(imp.topk(26).indices.tolist())
    assert kept_after_static(rec, 1) == expect
    # and the kept patches received more attention than every dropped one
    dropped = sorted(set(range(128)) - expect)
    assert float(imp[sorted(expect)].min()) >= float(imp[dropped].max())


def test_ar_mode_prefill_is_pruned() -> None:
    model, tok = tiny_model(mode="ar")
    pr = make_pruner(model, "specprune", budget_coarse=0.25)
    out, ctx = step(model, pr, inputs(model, tok), {}, 0)
    assert out.shape == (1, model.cfg.chunk_size, model.cfg.action_dim)
    assert ctx.tokens_per_layer[0] > ctx.tokens_per_layer[-1]


# ---------------------------------------------------------------------------------------------------------------
# controller
# ---------------------------------------------------------------------------------------------------------------
FAST = np.array([0.8, 0.6, 0.0, 0, 0, 0, -1], np.float32)  # transport
SLOW = np.array([0.1, 0.0, 0.1, 0, 0, 0, -1], np.float32)  # approach
DESCEND = np.array([0.0, 0.05, -0.6, 0, 0, 0, -1], np.float32)  # vertical descent onto the object
LIFT = np.array([0.0, 0.0, 0.9, 0, 0, 0, 1], np.float32)


def test_classify_action_hysteresis() -> None:
    c = ControllerConfig()
    assert classify_action(FAST, "coarse", c, False) == "coarse"
    assert classify_action(SLOW, "coarse", c, False) == "fine"
    assert classify_action(DESCEND, "coarse", c, False) == "coarse"  # fast: not a reason to enter fine
    assert classify_action(DESCEND, "fine", c, False) == "fine"  # ... but no reason to leave it
    assert classify_action(LIFT, "fine", c, False) == "coarse"
    assert classify_action(FAST, "fine", c, False) == "coarse"
    rot = np.array([0.0, 0.0, 0.0, 0.6, 0, 0, 1], np.float32)
    assert classify_action(rot, "fine", c, chunk_used=False) == "fine"
    assert classify_action(rot, "fine", c, chunk_used=True) == "coarse"


def test_controller_switches_replans_and_sets_the_budget() -> None:
    model, tok = tiny_model()
    pr = make_pruner(model, "specprune", budget_coarse=0.25, budget_fine=0.5, dynamic=False,
                     ctrl={"start_step": 4})
    mem: dict[str, Any] = {}
    x = inputs(model, tok)
    _, ctx = step(model, pr, x, mem, 0)
    assert ctx.extra["info"]["prune_mode"] == "coarse" and ctx.extra["info"]["prune_budget"] == 32
    # slow actions before start_step do not switch
    assert [pr.on_action(SLOW, mem) for _ in range(4)] == [False] * 4 and pr.mode(mem) == "coarse"
    _, ctx = step(model, pr, x, mem, 4)
    assert ctx.extra["info"]["prune_modes_executed"] == "cccc"
    assert pr.on_action(FAST, mem) is False
    assert pr.on_action(SLOW, mem) is True  # coarse -> fine mid-chunk: replan
    assert pr.mode(mem) == "fine" and mem[MEM_KEY]["replans"] == 1
    _, ctx = step(model, pr, x, mem, 6)
    info = ctx.extra["info"]
    assert info["prune_mode"] == "fine" and info["prune_fine"] == 1 and info["prune_budget"] == 64
    assert info["prune_modes_executed"] == "cf"
    assert [pr.on_action(a, mem) for a in (DESCEND, SLOW, LIFT)] == [False, False, False]
    assert pr.mode(mem) == "coarse"
    for _ in range(4):
        pr.on_action(FAST, mem)
    assert pr.on_action(SLOW, mem) is False  # entering fine at the chunk's end: nothing left to replan


def test_controller_off_never_switches() -> None:
    model, _ = tiny_model()
    pr = make_pruner(model, "specprune-nocontroller", ctrl={"start_step": 0})
    mem: dict[str, Any] = {}
    assert not any(pr.on_action(SLOW, mem) for _ in range(6)) and pr.mode(mem) == "coarse"


def test_replan_through_the_runtime(tmp_path: Path) -> None:
    """VLAPolicy.on_action forwards to the pruner; the runtime drops the queue and infers again."""
    model, tok = tiny_model()
    # every action counts as slow: the controller enters fine at the first action after start_step
    pr = make_pruner(model, "specprune", ctrl={"start_step": 2, "fine_speed": 10.0, "leave_xy": 10.0,
                                               "leave_z": 10.0, "leave_rot": 10.0})
    pol = VLAPolicy(model, tok, {k: np.asarray(v, np.float32) for k, v in STATS.items()}, dtype=torch.float32,
                    pruner=pr, accel=("specprune",))
    env = DummyReachEnv(image_size=32)
    r = run_episode(env, pol, EpisodeSpec("dummy:reach", "reach", 0, 0), LoopConfig(max_steps=20))
    assert r.replans == 1
    # inference at step 0 (4 actions queued), replan after the 3rd action, then every 4 steps
    assert len(r.inference_ms) == 1 + 1 + (20 - 3 - 1) // 4
    modes = [i["prune_mode"] for i in r.chunk_infos]
    assert modes[0] == "coarse" and set(modes[1:]) == {"fine"}
    assert r.chunk_infos[1]["prune_modes_executed"] == "ccf"
    # a new episode starts coarse again (memory cleared by reset)
    r2 = run_episode(env, pol, EpisodeSpec("dummy:reach", "reach", 1, 1), LoopConfig(max_steps=4))
    assert r2.chunk_infos[0]["prune_mode"] == "coarse"


def test_derive_controller_thresholds() -> None:
    rng = np.random.default_rng(0)
    eps = []
    for _ in range(5):
        fast = np.tile([0.7, 0.7, 0.0, 0, 0, 0, -1.0], (30, 1))
        slow = np.concatenate([rng.uniform(-0.1, 0.1, (13, 2)), rng.uniform(-0.3, -0.1, (13, 1)),
                               np.zeros((13, 3)), -np.ones((13, 1))], 1)
        slow[10:, 6] = 1.0  # grasp after 10 slow steps
        lift = np.tile([0.0, 0.0, 0.9, 0, 0, 0, 1.0], (20, 1))
        eps.append(np.concatenate([fast, slow, lift]))
    cfg, stats = derive_controller_thresholds(eps)
    assert stats["n_fine"] == 5 * 13
    assert 0.1 < cfg.fine_speed < 0.35 and cfg.leave_z < 0.9 and cfg.leave_xy > cfg.fine_xy
    assert classify_action(eps[0][35], "coarse", cfg, False) in ("fine", "coarse")
    assert classify_action(np.array([0.0, 0.0, -0.1, 0, 0, 0, -1]), "coarse", cfg, False) == "fine"
    assert classify_action(eps[0][0], "coarse", cfg, False) == "coarse"
    assert classify_action(eps[0][-1], "fine", cfg, False) == "coarse"
    with pytest.raises(UserError):
        derive_controller_thresholds([np.zeros((5, 3))])


# ---------------------------------------------------------------------------------------------------------------
# config, registry, policy integration, bench
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(budget_coarse=0.0), dict(budget_fine=1.5), dict(local_layers=(0, 2)),
                                 dict(local_queries=("image",)), dict(prev_t_min=3, prev_t_max=2),
                                 dict(variant="magic"), dict(static=False, dynamic=False), dict(ema_alpha=0.0),
                                 dict(ctrl={"fine_speed": -1.0})])
def test_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        SpecPruneConfig(**bad)


def test_registry_and_options() -> None:
    model, _ = tiny_model()
    for name in ACCEL_PRESETS:
        pruner, exit_policy = build_strategies(model, (name,), {name: {"budget": 0.3}})
        assert isinstance(pruner, SpecPrunePruner) and exit_policy is None and name in ACCELERATIONS
    with pytest.raises(UserError, match="unknown SpecPrune options"):
        build_strategies(model, ("specprune",), {"specprune": {"budgett": 0.3}})
    with pytest.raises(UserError, match="prune_layer"):
        make_pruner(model, "specprune", prune_layer=8, local_layers=(0,))
    full = make_pruner(model, "specprune")
    assert full.dynamic_layers == (2, 4, 6)  # quarters of 8 layers, after the static cut before layer 1
    assert full.importance_layers == (0, 3) and full.score_layers == {0, 3}
    assert full.attention_layers == frozenset()  # scored by the row hooks, no eager capture
    assert make_pruner(model, "specprune", prune_layer=2, local_layers=(0, 1)).dynamic_layers == (4, 6)
    assert make_pruner(model, "specprune-static", row_scores=False).attention_layers == {0}


def make_ckpt(d: Path) -> Path:
    model, tok = tiny_model()
    return save_checkpoint(model, tok, STATS, d / "vla_tiny")


def test_eval_cli_with_specprune(tmp_path: Path) -> None:
    ck = make_ckpt(tmp_path)
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "vla_runtime.cli", "eval", "--env", "dummy:reach", "--policy",
                        f"vla:{ck}", "--accel", "specprune", "--episodes", "1", "--out", str(out),
                        "--max-steps", "12", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "eval_info.json").read_text())
    agg = info["aggregated"]
    assert agg["episodes"] == 1
    assert agg["mean_mean_visual_tokens"] < 128 and "mean_prune_fine" in agg


def test_bench_specprune_on_dummy(tmp_path: Path) -> None:
    from vla_runtime.policies.vla.specprune import bench_specprune

    ck = make_ckpt(tmp_path)
    rep = bench_specprune(env="dummy:reach", policy=f"vla:{ck}", episodes=1, seed=0, out=tmp_path / "b",
                          options={"budget_coarse": 0.2}, progress=False)
    names = [m["name"] for m in rep["methods"]]
    assert names == ["no-pruning", "specprune", "specprune-static", "specprune-dynamic", "specprune-nocontroller",
                     "no-pruning-pass2", "prune-random", "prune-fastv", "prune-framediff"]
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved["baseline"] == "no-pruning" and len(saved["methods"]) == 9
    by = {m["name"]: m for m in saved["methods"]}
    assert by["no-pruning"]["mean_visual_tokens_per_layer"] == 128
    assert by["specprune"]["mean_visual_tokens_per_layer"] < by["specprune-static"]["mean_visual_tokens_per_layer"]
    # the baselines spend (up to rounding) the visual tokens per layer SpecPrune spent
    assert abs(by["prune-random"]["mean_visual_tokens_per_layer"]
               - by["specprune"]["mean_visual_tokens_per_layer"]) <= 1.0
    for m in saved["methods"]:
        assert m["ratio_to_baseline"] is not None and "success_ci95" in m
    assert by["no-pruning"]["ratio_to_baseline"] == by["no-pruning-pass2"]["ratio_to_baseline"] == 1.0
    # the policy is deterministic on the same specs: both unpruned arms reach the same outcome
    assert by["no-pruning"]["success_pct"] == by["no-pruning-pass2"]["success_pct"]
    # SpecPrune against each same-budget baseline, paired on the same episodes, from both passes' outcomes
    assert set(saved["specprune_vs_baselines"]) == {"prune-random", "prune-fastv", "prune-framediff"}
    assert set(saved["outcomes"]) == set(names)
    for b, p in saved["specprune_vs_baselines"].items():
        assert p["n"] == saved["episodes"]
        assert p["both"] + p["only_method"] == sum(saved["outcomes"]["specprune"])
        assert p["both"] + p["only_baseline"] == sum(saved["outcomes"][b])


def test_bench_specprune_cli_arms_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`vla-runtime bench specprune --arms ... --options JSON`: only the named arms (+ no pruning, specprune), the
    options reach every arm, the paired SpecPrune-vs-baseline line is printed; bad arms / JSON are clear errors."""
    from vla_runtime.cli import main

    ck = make_ckpt(tmp_path)
    out = tmp_path / "b"
    assert main(["bench", "specprune", "--env", "dummy:reach", "--policy", f"vla:{ck}", "--episodes", "1",
                 "--arms", "prune-fastv", "--options", '{"budget_coarse": 0.1, "budget_fine": 0.1, "dynamic": false}',
                 "--out", str(out)]) == 0
    saved = json.loads((out / "bench.json").read_text())
    by = {m["name"]: m for m in saved["methods"]}
    assert list(by) == ["no-pruning", "specprune", "no-pruning-pass2", "prune-fastv"]
    # 13 of 128 kept from layer 1 on (no dynamic stage): (128 + 7 x 13) / 8 per layer
    assert by["specprune"]["mean_visual_tokens_per_layer"] == pytest.approx((128 + 7 * 13) / 8, abs=0.5)
    assert saved["options"] == {"budget_coarse": 0.1, "budget_fine": 0.1, "dynamic": False}
    assert list(saved["specprune_vs_baselines"]) == ["prune-fastv"]
    assert "specprune vs each baseline" in capsys.readouterr().out
    assert main(["bench", "specprune", "--env", "dummy:reach", "--policy", f"vla:{ck}", "--arms", "prune-lucky"]) == 2
    assert "unknown arm" in capsys.readouterr().err
    assert main(["bench", "specprune", "--env", "dummy:reach", "--policy", f"vla:{ck}", "--options", "{x"]) == 2
    assert "--options is not valid JSON" in capsys.readouterr().err
    assert main(["bench", "loop", "--options", '{"a": 1}']) == 2


def test_bench_needs_a_vla(monkeypatch: pytest.MonkeyPatch) -> None:
    import vla_runtime.policies as pols
    from vla_runtime.policies.vla.specprune import bench_specprune

    monkeypatch.setattr(pols, "list_policies", lambda: ["scripted"])
    with pytest.raises(UserError, match="needs a VLA"):
        bench_specprune(env="dummy:reach", policy="", episodes=1)


def test_latency_tool_on_a_tiny_random_model() -> None:
    from vla_runtime.policies.vla.specprune_latency import build_policies, default_variants, load_frames, measure

    arch = ("image_size=32,patch_size=4,hidden=32,layers=8,heads=2,kv_heads=1,head_dim=16,intermediate=64,"
            "vision_hidden=16,vision_heads=2,vision_intermediate=32")
    pols = build_policies("", arch, default_variants([0.25]))
    frames, acts = load_frames(None, ("agentview", "wrist"), 32, 6)
    assert acts is None and len(frames) == 6
    res = measure(pols, frames, warmup=1, actions=np.zeros((6, 7), np.float32), stride=2)
    assert list(res) == ["no-pruning", "specprune(default)", "specprune@0.25", "static@0.25", "random@0.25"]
    assert res["no-pruning"]["ratio"] == 1.0 and res["no-pruning"]["action_l1"] == 0.0
    assert res["no-pruning"]["pruner_ms_p50"] == 0.0 and res["specprune@0.25"]["pruner_ms_p50"] > 0.0
    assert res["no-pruning"]["visual_tokens_per_layer"] == 128.0
    assert res["random@0.25"]["visual_tokens_per_layer"] < 128.0 and res["static@0.25"]["n"] == 2


def test_row_scores_equal_eager_attention_scores() -> None:
    """The pre-hook's query-rows-only softmax gives the scores the eager attention matrix gives, and the layers
    run without attention capture (SDPA stays on)."""
    model, tok = tiny_model()
    fast = make_pruner(model, "specprune", budget_coarse=0.25)
    slow = make_pruner(model, "specprune", budget_coarse=0.25, row_scores=False)
    assert fast.attention_layers == frozenset() and slow.attention_layers == {0, 3}
    mem_f: dict[str, Any] = {}
    mem_s: dict[str, Any] = {}
    for s in range(2):
        rec_f, rec_s = Recorder(fast), Recorder(slow)
        _, cf = step(model, rec_f, inputs(model, tok, seed=s), mem_f, 4 * s)
        _, cs = step(model, rec_s, inputs(model, tok, seed=s), mem_s, 4 * s)
        assert cf.attentions == {} and set(cs.attentions) == {0, 3}
        imp_f, imp_s = cf.extra[MEM_KEY]["imp"], cs.extra[MEM_KEY]["imp"]
        assert set(imp_f) == set(imp_s) == {0, 3}
        for l in (0, 3):
            torch.testing.assert_close(imp_f[l], imp_s[l], rtol=1e-4, atol=1e-6)
        assert kept_after_static(rec_f, 1) == kept_after_static(rec_s, 1)
        assert visual_ids(cf) == visual_ids(cs)


def test_lean_layers_run_the_row_hooks_and_keep_the_same_tokens() -> None:
    """With the CPU lean layers installed, SpecPrune's row-importance pre-hooks still run (inside the lean
    forward) and the kept sets, importances and actions equal the stock layers'."""
    from vla_runtime.policies.vla.lean_layers import lean_calls, use_lean_layers

    model, tok = tiny_model()
    model.decoder.config._attn_implementation = "sdpa"
    runs = []
    for lean in (False, True):
        use_lean_layers(model.decoder, lean)
        pruner = make_pruner(model, "specprune", budget_coarse=0.25)
        assert pruner.attention_layers == frozenset()  # row hooks, no capture
        if lean:  # the lean layer hands its own rotated q/k to the probe: the pre-hook must not project again
            def no_reprojection(*a: Any, **k: Any) -> None:
                raise AssertionError("lean path re-projected the rows")
            pruner._row_importance = no_reprojection  # type: ignore[method-assign]
        mem: dict[str, Any] = {}
        out = []
        for s in range(2):
            rec = Recorder(pruner)
            with torch.no_grad():
                a, c = step(model, rec, inputs(model, tok, seed=s), mem, 4 * s)
            out.append((a, visual_ids(c), kept_after_static(rec, 1), c.extra[MEM_KEY]["imp"]))
        runs.append(out)
        pruner.remove_row_hooks()  # the next run's pruner installs its own row hooks and probes
        assert all("qk_probe" not in layer.self_attn.__dict__ for layer in model.decoder.layers)
    assert lean_calls(model.decoder) == 2 * model.n_layers
    for (a0, v0, k0, i0), (a1, v1, k1, i1) in zip(*runs):
        torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-6)
        assert v0 == v1 and k0 == k1 and set(i0) == set(i1) == {0, 3}
        for layer in i0:
            torch.testing.assert_close(i1[layer], i0[layer], rtol=1e-5, atol=1e-7)


def test_two_pruners_on_one_lean_model_each_get_their_own_scores() -> None:
    """Probes are per pruner: two SpecPrune pruners sharing a model (as the latency tool's variants do) both
    score through the lean layers, and each equals a lone pruner's scores."""
    from vla_runtime.policies.vla.lean_layers import use_lean_layers

    model, tok = tiny_model()
    model.decoder.config._attn_implementation = "sdpa"
    use_lean_layers(model.decoder, True)
    a = make_pruner(model, "specprune", budget_coarse=0.25)
    b = make_pruner(model, "specprune", budget_coarse=0.5)
    assert len(model.decoder.layers[0].self_attn.qk_probe) == 2
    imps = []
    for pr in (a, b):
        with torch.no_grad():
            _, c = step(model, Recorder(pr), inputs(model, tok, seed=1), {}, 0)
        imps.append(c.extra[MEM_KEY]["imp"])
    assert set(imps[0]) == set(imps[1]) == {0, 3}
    torch.testing.assert_close(imps[0][0], imps[1][0])  # same input, same layer-0 scores
    a.remove_row_hooks()
    assert len(model.decoder.layers[0].self_attn.qk_probe) == 1
    b.remove_row_hooks()
    assert "qk_probe" not in model.decoder.layers[0].self_attn.__dict__


def test_black_patches_in_both_frames_count_as_static() -> None:
    """Cosine gives 0 for a patch that is zero in both frames; the frame difference must call it unchanged,
    while a patch that turns black (zero in one frame only) stays changed."""
    model, tok = tiny_model()
    pr = make_pruner(model, "specprune", prev_t_min=1, prev_t_max=1)
    x = inputs(model, tok)
    x["images"][0, 0, :, 0:4, 0:8] = -1.0  # camera 0, patches 0 and 1: black ([-1, 1] -> 0) in both frames
    mem: dict[str, Any] = {}
    step(model, pr, x, mem, 0)
    x2 = {k: v.clone() for k, v in x.items()}
    x2["images"][0, 1, :, 0:4, 0:4] = -1.0  # camera 1, patch 0: black now only
    _, ctx = step(model, pr, x2, mem, 4)
    sim = ctx.extra[MEM_KEY]["sim"][0]
    assert float(sim[0]) == float(sim[1]) == 1.0
    assert float(sim[64]) < pr.cfg.sim_threshold
    assert ctx.extra["info"]["prune_static_patches"] == 128 - 1


def test_checkpoint_specprune_settings_apply_under_presets_and_options() -> None:
    """config.json extra.specprune sets a checkpoint's own budgets/layers for every preset; the preset's stage
    switches and the caller's options win; unknown fields are a clear error."""
    model, tok = tiny_model()
    model.cfg.extra = {"specprune": {"budget_coarse": 0.2, "budget": 0.15, "dynamic_layers": [4], "note": "why"}}
    full = make_pruner(model, "specprune")
    assert full.cfg.budget_coarse == 0.2 and full.dynamic_layers == (4,)
    static = make_pruner(model, "specprune-static")
    assert static.cfg.budget_coarse == 0.2 and static.dynamic_layers == ()  # the preset turns stage 2 off
    rand = make_pruner(model, "prune-random")
    assert rand.cfg.budget == 0.15 and rand.cfg.variant == "random"
    assert make_pruner(model, "specprune", budget_coarse=0.5).cfg.budget_coarse == 0.5
    model.cfg.extra = {"specprune": {"budgett": 0.2}}
    with pytest.raises(UserError, match="budgett"):
        make_pruner(model, "specprune")


@pytest.mark.parametrize("name", ["specprune", "prune-random", "prune-fastv"])
def test_early_cut_inside_the_previous_layer_equals_cutting_after_it(name: str) -> None:
    """With lean layers, the loop asks the pruner for layer j's cut inside layer j - 1 (after its q/k and row
    scores) and finishes that layer only for the kept rows: the same kept sets and actions as cutting after the
    full layer, and the early layer really returns fewer rows than it took."""
    from vla_runtime.policies.vla.lean_layers import use_lean_layers

    model, tok = tiny_model()
    model.decoder.config._attn_implementation = "sdpa"
    use_lean_layers(model.decoder, True)
    seen: list[tuple[int, int, bool]] = []
    orig = model._run_layer

    def spy(layer: Any, h: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        out = orig(layer, h, *a, **k)
        seen.append((h.shape[1], out.shape[1], k.get("row_select") is not None))
        return out

    model._run_layer = spy  # type: ignore[method-assign]
    runs = []
    for early in (False, True):
        pr = make_pruner(model, name, budget_coarse=0.25, budget=0.25)
        pr.early_cuts = early
        mem: dict[str, Any] = {}
        out = []
        seen.clear()
        for s in range(2):
            rec = Recorder(pr)
            with torch.no_grad():
                a, c = step(model, rec, inputs(model, tok, seed=s), mem, 4 * s)
            out.append((a, visual_ids(c), kept_after_static(rec, 1), list(c.tokens_per_layer)))
        runs.append(out)
        shrunk = [x for x in seen if x[1] < x[0]]
        assert bool(shrunk) == early and all(x[2] for x in shrunk)
        pr.remove_row_hooks()
    for (a0, v0, k0, t0), (a1, v1, k1, t1) in zip(*runs):
        torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5)
        assert v0 == v1 and k0 == k1 and t0 == t1


def test_early_cuts_fall_back_to_cutting_after_the_layer_when_the_lean_path_is_not_taken() -> None:
    """A lean layer that falls back to the stock forward (here: a forward hook on its MLP) never calls row_select;
    the loop then cuts after the full layer, with the same kept sets and actions as without early cuts."""
    from vla_runtime.policies.vla.lean_layers import use_lean_layers

    model, tok = tiny_model()
    model.decoder.config._attn_implementation = "sdpa"
    use_lean_layers(model.decoder, True)
    handles = [layer.mlp.register_forward_hook(lambda m, a, out: None) for layer in model.decoder.layers]
    runs = []
    for early in (False, True):
        pr = make_pruner(model, "specprune", budget_coarse=0.25)
        pr.early_cuts = early
        rec = Recorder(pr)
        with torch.no_grad():
            a, c = step(model, rec, inputs(model, tok, seed=3), {}, 0)
        runs.append((a, visual_ids(c), kept_after_static(rec, 1), list(c.tokens_per_layer)))
        pr.remove_row_hooks()
    from vla_runtime.policies.vla.lean_layers import lean_calls

    assert lean_calls(model.decoder) == 0  # every call took the stock forward
    for h in handles:
        h.remove()
    (a0, v0, k0, t0), (a1, v1, k1, t1) = runs
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-6)
    assert v0 == v1 and k0 == k1 and t0 == t1 and t1[1] < t1[0]  # the cut still happened, after layer 0
