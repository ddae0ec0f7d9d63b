"""Diffusion policy: predictor input shifting, batches, act() on the dummy env, checkpoint round trip, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.errors import UserError
from vla_runtime.policies.diffusion.configuration import DiffusionConfig, ModelConfig, SamplerConfig
from vla_runtime.policies.diffusion.modeling import DiffusionModel, shift_chunk
from vla_runtime.policies.diffusion.policy import DiffusionPolicy, load_diffusion_policy, save_checkpoint
from vla_runtime.runtime.types import ActionChunk
from vla_runtime.train.train_diffusion import (DemoDataset, chunk_indices, make_batch, minmax_stats, predictor_input,
                                               train_diffusion)
from vla_runtime.train.demos import write_dummy_demos

torch.set_num_threads(1)


def tiny_model_cfg(**kw) -> ModelConfig:  # noqa: ANN003
    base = dict(image_size=32, resize_to=24, crop_size=20, enc_channels=(8, 8, 8), enc_keypoints=4, enc_feat_dim=8,
                unet_channels=(16, 32), unet_groups=8, time_embed_dim=16, pred_hidden=32, pred_heads=2)
    return ModelConfig(**{**base, **kw})


def tiny_policy(sampler: str = "ddim10", seed: int = 0, **skw) -> DiffusionPolicy:  # noqa: ANN003
    torch.manual_seed(seed)
    cfg = DiffusionConfig(model=tiny_model_cfg(), sampler=SamplerConfig(name=sampler, **skw))
    model = DiffusionModel(cfg.model)
    with torch.no_grad():  # a non-trivial predictor head so warm starts differ from the shifted chunk
        model.predictor.head.weight.normal_(0, 0.05)
    return DiffusionPolicy(model, cfg)


def run_episode(policy: DiffusionPolicy, seed: int = 3, chunks: int = 3) -> list[ActionChunk]:
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=seed))
    policy.reset(obs.instruction)
    out = []
    for _ in range(chunks):
        ch = policy.act(obs)
        out.append(ch)
        for a in ch.actions[: policy.spec.n_action_steps]:
            obs = env.step(a).obs
    return out


# ----------------------------------------------------------------------------- shifting and batches


def test_shift_chunk() -> None:
    c = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1).repeat(1, 1, 2)  # value = index
    s = shift_chunk(c, 8)
    assert s[0, :, 0].tolist() == list(range(8, 16)) + [15.0] * 8
    assert torch.equal(shift_chunk(c, 0), c)
    assert shift_chunk(c, 16)[0, :, 0].tolist() == [15.0] * 16
    assert shift_chunk(c, 3)[0, :, 0].tolist() == list(range(3, 16)) + [15.0] * 3


def _toy_dataset(lengths: list[int]) -> DemoDataset:
    n = sum(lengths)
    starts, ends, s = [], [], 0
    for L in lengths:
        starts += [s] * L
        ends += [s + L] * L
        s += L
    acts = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 7)  # action value = global frame index
    return DemoDataset(images=torch.arange(n, dtype=torch.uint8)[:, None, None, None, None].expand(n, 2, 3, 24, 24).clone(),
                       states=torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 8), actions=acts,
                       ep_start=torch.tensor(starts), ep_end=torch.tensor(ends), seeds=list(range(len(lengths))),
                       env="dummy:reach", task="reach", image_size=24)


def test_predictor_input_is_shifted_previous_chunk() -> None:
    ds = _toy_dataset([40, 30])
    t = torch.tensor([20, 45])  # interior frames of both episodes
    n = torch.tensor([8, 8])
    p = predictor_input(ds.actions, t, ds.ep_start[t], ds.ep_end[t], n, 16)[:, :, 0]
    # first H-n entries: what the chunk from t-8 planned for steps t..t+7 (ground truth), tail repeats the last
    assert p[0].tolist() == list(range(20, 28)) + [27.0] * 8
    assert p[1].tolist() == list(range(45, 53)) + [52.0] * 8
    # near the episode end the previous chunk is clamped to the last action (padding)
    t = torch.tensor([35])
    p = predictor_input(ds.actions, t, ds.ep_start[t], ds.ep_end[t], torch.tensor([8]), 16)[0, :, 0]
    assert p.tolist() == [35.0, 36, 37, 38, 39] + [39.0] * 11
    # other executed counts (async runtimes)
    t = torch.tensor([20])
    p = predictor_input(ds.actions, t, ds.ep_start[t], ds.ep_end[t], torch.tensor([5]), 16)[0, :, 0]
    assert p.tolist() == list(range(20, 31)) + [30.0] * 5


def test_make_batch_history_and_padding() -> None:
    ds = _toy_dataset([40, 30])
    cfg = tiny_model_cfg(obs_stride=8)
    idx = torch.tensor([3, 20, 68])
    b = make_batch(ds, cfg, idx, torch.Generator().manual_seed(0), crop=False)
    # observation frames t-8 and t, clamped to the episode start
    assert b["states"][:, :, 0].tolist() == [[0.0, 3.0], [12.0, 20.0], [60.0, 68.0]]
    assert b["images"].shape == (3, 2, 2, 3, 20, 20)
    assert b["images"][0, 0, 0, 0, 0, 0] == 0 and b["images"][1, 1, 1, 0, 5, 5] == 20
    # action chunk padded with the last action of its episode
    assert b["actions"][2, :, 0].tolist() == [68.0, 69.0] + [69.0] * 14
    assert b["has_prev"].tolist() == [False, True, True]
    assert chunk_indices(torch.tensor([38]), torch.tensor([0]), torch.tensor([40]), 0, 4).tolist() == [[38, 39, 39, 39]]


def test_minmax_stats_constant_dim_maps_to_zero() -> None:
    x = torch.tensor([[0.0, 2.0], [1.0, 2.0], [0.5, 2.0]])
    lo, hi = minmax_stats(x)
    m = DiffusionModel(tiny_model_cfg(action_dim=2))
    m.action_min.copy_(lo)
    m.action_max.copy_(hi)
    n = m.normalize_action(x)
    assert n[:, 0].tolist() == [-1.0, 1.0, 0.0] and n[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(m.unnormalize_action(n), x)


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("sampler", ["ddim10", "ddim2", "ddpm"])
def test_act_shapes_on_dummy_env(sampler: str) -> None:
    p = tiny_policy(sampler)
    chunks = run_episode(p, chunks=2)
    for ch in chunks:
        assert ch.actions.shape == (16, 7) and ch.actions.dtype == np.float32
        assert np.all(np.isfinite(ch.actions))
        assert {"denoise_steps", "warm_start", "perturbed", "encoder_ms", "sampler_ms", "predictor_ms"} <= set(ch.info)
        assert ch.info["denoise_steps"] == {"ddim10": 10, "ddim2": 2, "ddpm": 100}[sampler]
        assert ch.info["warm_start"] is False
    assert p.spec.chunk_size == 16 and p.spec.n_action_steps == 8 and p.spec.cameras == ("agentview", "wrist")


def test_step_falls_back_on_first_chunk_then_warm_starts() -> None:
    p = tiny_policy("step2", first_chunk_steps=10)
    c = run_episode(p, chunks=3)
    assert c[0].info["warm_start"] is False and c[0].info["denoise_steps"] == 10
    for ch in c[1:]:
        assert ch.info["warm_start"] is True and ch.info["denoise_steps"] == 2
        assert "action_speed" in ch.info
    p.reset("again")  # a new episode starts cold again
    assert run_episode(p, chunks=1)[0].info["warm_start"] is False


def test_predictor_only_and_stall_perturbation() -> None:
    c = run_episode(tiny_policy("predictor"), chunks=2)
    assert c[1].info["denoise_steps"] == 0 and c[1].info["warm_start"] is True
    # stall threshold above any speed -> every warm start is perturbed; threshold 0 -> never
    always = run_episode(tiny_policy("step2", stall_eps=1e9), chunks=3)
    assert all(ch.info["perturbed"] for ch in always[1:])
    never = run_episode(tiny_policy("step2", stall_eps=0.0), chunks=3)
    assert not any(ch.info["perturbed"] for ch in never)


def test_shift_warm_start_at_t0_returns_the_shifted_previous_chunk() -> None:
    """The ablation without predictor: noised to level 0 it executes the previous plan, shifted."""
    c = run_episode(tiny_policy("step2", step_start_t=0, perturb=False, warm_source="shift"), chunks=2)
    assert c[1].info["warm_start"] is True and c[1].info["denoise_steps"] == 0
    expected = np.concatenate([c[0].actions[8:], np.repeat(c[0].actions[-1:], 8, 0)])
    np.testing.assert_allclose(c[1].actions, expected, atol=1e-5)
    with pytest.raises(UserError, match="warm_source"):
        SamplerConfig(name="step2", warm_source="zeros")


def test_step_t0_is_predictor_only() -> None:
    """Warm start noised to level 0 = no refinement: STEP then returns exactly the predictor's chunk."""
    a = run_episode(tiny_policy("step2", step_start_t=0, perturb=False), chunks=2)
    b = run_episode(tiny_policy("predictor"), chunks=2)
    assert a[1].info["denoise_steps"] == 0
    np.testing.assert_allclose(a[1].actions, b[1].actions, atol=1e-6)


def test_same_seed_same_actions() -> None:
    a = run_episode(tiny_policy("ddim2", seed=0), chunks=2)
    b = run_episode(tiny_policy("ddim2", seed=0), chunks=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.actions, y.actions)


def test_missing_camera_is_user_error() -> None:
    p = tiny_policy()
    env = DummyReachEnv(cameras=("agentview",), image_size=32)
    obs = env.reset(EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=0))
    with pytest.raises(UserError, match="cameras"):
        p.act(obs)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    p = tiny_policy("step2")
    save_checkpoint(tmp_path / "fp32", p.model, p.cfg, dtype=torch.float32)
    files = sorted(f.name for f in (tmp_path / "fp32").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert b"pickle" not in (tmp_path / "fp32" / "model.safetensors").read_bytes()[:200]
    q = load_diffusion_policy(tmp_path / "fp32")
    assert q.cfg.to_dict() == p.cfg.to_dict()
    for x, y in zip(run_episode(p, chunks=3), run_episode(q, chunks=3)):
        np.testing.assert_array_equal(x.actions, y.actions)
    # fp16 storage (shipped checkpoints): same outputs up to fp16 weight rounding; stats stay fp32
    save_checkpoint(tmp_path / "fp16", p.model, p.cfg)
    r = load_diffusion_policy(tmp_path / "fp16", sampler="ddim10")
    assert torch.equal(r.model.action_min, p.model.action_min)
    a = run_episode(tiny_policy("ddim10"), chunks=1)[0].actions
    b = run_episode(r, chunks=1)[0].actions
    np.testing.assert_allclose(a, b, atol=0.05)
    assert r.spec.name == "diffusion-ddim10"


def test_load_errors(tmp_path: Path) -> None:
    p = tiny_policy()
    save_checkpoint(tmp_path, p.model, p.cfg)
    with pytest.raises(UserError, match="unknown sampler"):
        load_diffusion_policy(tmp_path, sampler="fast")
    with pytest.raises(UserError, match="unknown diffusion sampler options"):
        load_diffusion_policy(tmp_path, sigma=1.0)
    with pytest.raises(UserError, match="not a diffusion checkpoint"):
        load_diffusion_policy(tmp_path / "nope")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["typo"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unknown keys"):
        load_diffusion_policy(tmp_path)


def test_config_validation() -> None:
    with pytest.raises(UserError):
        ModelConfig(horizon=10, unet_channels=(16, 32, 64))  # not divisible by 4
    with pytest.raises(UserError):
        ModelConfig(crop_size=100, resize_to=84)
    with pytest.raises(UserError):
        ModelConfig(cameras=())


# ----------------------------------------------------------------------------- training


def test_tiny_training_decreases_loss_and_resumes(tmp_path: Path) -> None:
    demos = tmp_path / "demos"
    write_dummy_demos(demos, 6, image_size=32)
    out = tmp_path / "ckpt"
    kw = dict(model_cfg=tiny_model_cfg(), progress=False, log_every=10, save_every=30, lr=2e-3, warmup_steps=5)
    train_diffusion(demos, out, steps=30, batch_size=16, resume=False, **kw)
    log = [json.loads(ln) for ln in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30]
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 30
    # resume: continues at 30 (not from scratch) and keeps the log
    train_diffusion(demos, out, steps=80, batch_size=16, resume=True, **kw)
    log = [json.loads(ln) for ln in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["pred_loss"] < log[0]["pred_loss"] or log[0]["pred_loss"] < 1e-3
    data = json.loads((out / "data.json").read_text())
    assert data["demo_seeds"] == list(range(6)) and data["step"] == 80
    # the inference checkpoint it wrote loads and acts
    p = load_diffusion_policy(out, sampler="step2")
    assert p.cfg.model.image_size == 32
    assert run_episode(p, chunks=2)[1].actions.shape == (16, 7)


@pytest.mark.parametrize("sampler", ["ddim10", "step2"])
def test_committed_actions_are_the_start_of_the_chunk(sampler: str) -> None:
    import dataclasses

    p = tiny_policy(sampler)
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=3))
    p.reset(obs.instruction)
    first = p.act(obs)  # a cold chunk; then the next inference is told 3 of its actions are already committed
    for a in first.actions[:5]:
        obs = env.step(a).obs
    committed = first.actions[5:8]
    ch = p.act(dataclasses.replace(obs, committed_actions=committed))
    assert ch.info["inpainted"] == 3
    # normalise -> inpaint -> unnormalise: the committed actions come back (within the float round trip)
    np.testing.assert_allclose(ch.actions[:3], committed, atol=1e-4)
    off = tiny_policy(sampler, inpaint_committed=False)
    off.reset(obs.instruction)
    assert off.act(dataclasses.replace(obs, committed_actions=committed)).info["inpainted"] == 0


def test_fork_shares_the_network_but_not_the_episode_state() -> None:
    p = tiny_policy("step2", seed=0)
    q = p.fork("ddim2", seed=1)
    assert q.model is p.model and q.cfg.sampler.name == "ddim2" and p.cfg.sampler.name == "step2"
    assert q.cfg.sampler.seed == 1 and p.cfg.sampler.seed != 1
    run_episode(p, chunks=2)
    assert p._prev_norm is not None and q._prev_norm is None  # q's episode state is its own
    chunks = run_episode(q, chunks=2)
    assert [c.info["sampler"] for c in chunks] == ["ddim2", "ddim2"]
    assert all(c.info["denoise_steps"] == 2 for c in chunks)
    # same network, same seed and sampler: a fork acts exactly like a freshly built policy over that network
    fresh = DiffusionPolicy(p.model, DiffusionConfig(model=p.cfg.model, sampler=SamplerConfig(name="ddim2", seed=1)))
    assert np.array_equal(run_episode(fresh, chunks=2)[1].actions, chunks[1].actions)


def test_fine_tune_starts_from_the_checkpoint_and_keeps_its_normalisation(tmp_path: Path) -> None:
    from vla_runtime.policies.diffusion.policy import load_model

    demos, other = tmp_path / "demos", tmp_path / "other"
    write_dummy_demos(demos, 4, image_size=32)
    write_dummy_demos(other, 3, seed0=7, image_size=32, speed=0.6)
    kw = dict(progress=False, log_every=5, save_every=5, warmup_steps=2)
    train_diffusion(demos, tmp_path / "a", steps=10, batch_size=8, resume=False, model_cfg=tiny_model_cfg(),
                    lr=2e-3, **kw)
    a, _ = load_model(tmp_path / "a")
    # fine-tune on other demos with a negligible learning rate: the result is the starting checkpoint
    train_diffusion(other, tmp_path / "b", steps=1, batch_size=8, resume=False, init_from=tmp_path / "a",
                    lr=1e-12, **kw)
    b, bcfg = load_model(tmp_path / "b")
    assert bcfg.model == a.cfg
    for k, v in a.state_dict().items():
        assert torch.allclose(b.state_dict()[k].float(), v.float(), atol=2e-3), k
    assert torch.equal(b.action_min, a.action_min) and torch.equal(b.state_max, a.state_max)
    # a fresh run on the same other demos computes its own statistics, i.e. the kept ones were not a coincidence
    train_diffusion(other, tmp_path / "c", steps=1, batch_size=8, resume=False, model_cfg=tiny_model_cfg(), **kw)
    c, _ = load_model(tmp_path / "c")
    assert not (torch.equal(c.action_min, a.action_min) and torch.equal(c.action_max, a.action_max))
    with pytest.raises(UserError, match="px"):
        write_dummy_demos(tmp_path / "big", 2, image_size=48)
        train_diffusion(tmp_path / "big", tmp_path / "d", steps=1, batch_size=8, resume=False,
                        init_from=tmp_path / "a", **kw)


# ----------------------------------------------------------------------------- stall test (bench stall)


@pytest.mark.parametrize("perturb", [True, False])
def test_stall_injection_holds_then_warm_starts_from_the_motionless_chunk(perturb: bool) -> None:
    from vla_runtime.policies.diffusion.bench import StallInjection
    from vla_runtime.runtime.loop import LoopConfig, run_episode as loop_episode

    w = StallInjection(tiny_policy("step2", perturb=perturb), hold_at=16, stall_eps=0.01)
    infos: list[dict] = []
    inner_act = w.inner.act
    w.inner.act = lambda obs: (lambda ch: (infos.append({**ch.info, "step": int(obs.step)}), ch)[1])(inner_act(obs))
    env = DummyReachEnv(image_size=32)
    r = loop_episode(env, w, EpisodeSpec(env="dummy:reach", task="reach", index=0, seed=3),
                     LoopConfig(clock="unpaced", mode="sync", max_steps=48))
    assert r.steps == 48
    assert w.held_steps == 8  # one chunk of zero motion, executed by the env
    assert [i["step"] for i in infos] == [0, 8, 24, 32, 40]  # no inference for the held chunk at 16
    after = infos[2]
    assert after["warm_start"] is True and after["action_speed"] == 0.0  # its previous plan: stand still
    assert after["perturbed"] is perturb
    assert w.after_steps == 48 - 24 and 0 <= w.near_zero_actions <= w.after_steps
    assert [s for s, _ in w._path] == [24, 32, 40] and 0 <= w.stalled_steps <= 16


def test_bench_stall_writes_a_row_per_arm(tmp_path: Path) -> None:
    from vla_runtime.policies.diffusion.bench import bench_stall

    p = tiny_policy("step2")
    save_checkpoint(tmp_path / "ckpt", p.model, p.cfg)
    rep = bench_stall(env="dummy:reach", policy=str(tmp_path / "ckpt"), episodes=2, seed=0, out=tmp_path / "out",
                      hold_at=8, arms=("step2", "step2-no-perturb"), progress=False)
    rows = {m["name"]: m for m in rep["methods"]}
    assert set(rows) == {"step2", "step2-no-perturb"}
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["bench"] == "stall"
    for m in rows.values():
        assert m["episodes"] == 2 and m["held_episodes"] == 2
        assert 0 <= m["stalled_steps"] <= m["after_hold_steps"] and 0 <= m["near_zero_actions"] <= m["after_hold_steps"]
    assert rows["step2"]["mean_perturbed"] > 0 and rows["step2-no-perturb"]["mean_perturbed"] == 0
    recs = [json.loads(ln) for ln in (tmp_path / "out" / "step2" / "episodes.jsonl").read_text().splitlines()]
    assert [r["held_steps"] for r in recs] == [8, 8]


def test_stalled_steps_measure_end_effector_progress_not_action_norms() -> None:
    from vla_runtime.policies.diffusion.bench import StallInjection

    w = StallInjection(tiny_policy("step2"), hold_at=8, stall_eps=0.01)
    w._path = [(16, np.zeros(3)), (24, np.array([0.002, 0.0, 0.0])), (32, np.array([0.03, 0.0, 0.0])),
               (40, np.array([0.03, 0.001, 0.0]))]
    assert w.stalled_steps == 16  # 16->24 (2 mm) and 32->40 (1 mm) went nowhere; 24->32 moved 28 mm
    assert w.steps_to_move == 16
    w._path = w._path[:2]
    assert w.steps_to_move is None


def test_stall_arm_names() -> None:
    from vla_runtime.policies.diffusion.bench import parse_stall_arm

    assert parse_stall_arm("step2") == {"sampler": "step2", "perturb": True}
    assert parse_stall_arm("step2-t10-no-perturb") == {"sampler": "step2", "perturb": False, "step_start_t": 10}
    assert parse_stall_arm("ddim10") == {"sampler": "ddim10", "perturb": True}
    assert parse_stall_arm("step2-shift-no-perturb") == {"sampler": "step2", "perturb": False, "warm_source": "shift"}
    assert parse_stall_arm("step2-s0.5") == {"sampler": "step2", "perturb": True, "sigma_stall": 0.5}
    with pytest.raises(UserError, match="arm"):
        parse_stall_arm("step2-fast")


# ----------------------------------------------------------------------------- CPU traces


def test_cpu_traced_policy_acts_like_the_eager_one() -> None:
    from vla_runtime.policies.diffusion.cpu_trace import TracedCalls

    for sampler in ("step2", "ddim10"):
        traced, eager = tiny_policy(sampler), tiny_policy(sampler)
        eager._graphs = None
        assert isinstance(traced._graphs, TracedCalls)
        a, b = run_episode(traced, chunks=3), run_episode(eager, chunks=3)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.actions, y.actions, atol=1e-4)
        assert traced._graphs.replays > 0 and not traced._graphs._failed
    # forks share the traces; bf16 and cpu_trace=False run eagerly
    p = tiny_policy("step2")
    assert p.fork("ddim2")._graphs is p._graphs
    assert tiny_policy("step2", dtype="bfloat16")._graphs is None
    p.set_sampler("step2", dtype="bfloat16")
    assert p._graphs is None


def test_cpu_trace_failure_falls_back_to_eager() -> None:
    from vla_runtime.policies.diffusion.cpu_trace import TracedCalls

    tc = TracedCalls()
    lin = torch.nn.Linear(3, 2)
    bad = lambda x: {"y": lin(x)}  # noqa: E731 - not traceable (dict output)
    x = torch.randn(1, 3)
    with pytest.warns(UserWarning, match="eagerly"):
        out = tc.run_callable("bad", (lin,), bad, x)
    assert torch.equal(out["y"], lin(x))
    assert "bad" in tc._failed
    assert torch.equal(tc.run_callable("bad", (lin,), bad, x)["y"], lin(x)) and tc.replays == 0
    good = tc.run_callable("good", (lin,), lin, x)  # first call: eager result, trace built
    assert torch.allclose(tc.run_callable("good", (lin,), lin, x + 1), lin(x + 1), atol=1e-6) and tc.replays == 1
    assert torch.equal(good, lin(x))
