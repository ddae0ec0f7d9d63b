"""VLAPolicy on the dummy env, checkpoints, the acceleration registry, and resumable training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.errors import UserError
from vla_runtime.policies import make_policy
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.modeling import StepContext, VLAModel
from vla_runtime.policies.dtypes import cpu_has_native_bf16, resolve_dtype
from vla_runtime.policies.vla.policy import ACCELERATIONS, Normalizer, load_vla_policy, save_checkpoint
from vla_runtime.policies.vla.tokenizer import WordTokenizer
from vla_runtime.runtime.types import Policy
from vla_runtime.train import demos

torch.set_num_threads(1)
TINY = dict(image_size=32, patch_size=8, vision_hidden=16, vision_heads=2, vision_intermediate=32, hidden=32,
            layers=3, heads=4, kv_heads=2, head_dim=8, intermediate=64, max_text_len=6, chunk_size=4,
            n_action_steps=2, head_hidden=32)


def make_ckpt(d: Path, mode: str = "parallel") -> Path:
    tok = WordTokenizer.from_instructions(["reach the red target"])
    cfg = VLAConfig(mode=mode, vocab_size=tok.vocab_size, **TINY)  # type: ignore[arg-type]
    torch.manual_seed(0)
    stats = {"action_min": [-1.0] * 7, "action_max": [1.0] * 6 + [3.0], "state_min": [-0.5] * 8,
             "state_max": [0.5] * 8}
    return save_checkpoint(VLAModel(cfg, bos_id=tok.bos_id), tok, stats, d / f"vla_{mode}")


@pytest.mark.parametrize("mode", ["parallel", "ar"])
def test_policy_act_on_dummy_env(mode: str, tmp_path: Path) -> None:
    ck = make_ckpt(tmp_path, mode)
    pol = make_policy(f"vla:{ck}")
    assert isinstance(pol, Policy) and pol.spec.chunk_size == 4 and pol.spec.n_action_steps == 2
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    pol.reset(obs.instruction)
    for _ in range(2):
        chunk = pol.act(obs)
        assert chunk.actions.shape == (4, 7) and chunk.actions.dtype == np.float32
        assert np.isfinite(chunk.actions).all()
        assert (chunk.actions[:, :6] >= -1 - 1e-5).all() and (chunk.actions[:, :6] <= 1 + 1e-5).all()
        for k in ("vision_ms", "decoder_ms", "head_ms", "tokens_per_layer", "exit_layer"):
            assert k in chunk.info
        assert chunk.info["exit_layer"] == 3 and len(chunk.info["tokens_per_layer"]) == 3
        if mode == "ar":  # the decoder time split into the prefill pass and the one-token decode steps
            assert chunk.info["prefill_ms"] > 0 and chunk.info["decode_ms"] > 0
            assert chunk.info["prefill_ms"] + chunk.info["decode_ms"] == pytest.approx(chunk.info["decoder_ms"],
                                                                                       abs=2e-3)
        else:
            assert "prefill_ms" not in chunk.info and "decode_ms" not in chunk.info
        assert chunk.stamp == obs.stamp
        obs = env.step(chunk.actions[0]).obs


def test_cpu_fast_paths_defaults_and_switches(tmp_path: Path) -> None:
    from vla_runtime.policies.vla.lean_layers import _LeanForward
    from vla_runtime.policies.vla.modeling import SmallBatchLinear

    ar, par = make_ckpt(tmp_path, "ar"), make_ckpt(tmp_path, "parallel")
    # (checkpoint, options, lean layers, float32 decode)
    bf = {"dtype": "bf16"}
    cases = [(ar, bf, True, True), (ar, {"dtype": "fp32"}, True, False),
             (ar, {**bf, "cpu_decode_fp32": False}, True, False),
             (ar, {**bf, "cpu_lean_layers": False}, False, True), (par, bf, True, False),
             (par, {**bf, "cpu_decode_fp32": True, "cpu_lean_layers": False}, False, True),
             # auto: bf16 (and so the float32 decode steps) only on a CPU with native bf16
             (ar, {}, True, cpu_has_native_bf16())]
    for ck, kw, lean, fp32 in cases:
        pol = load_vla_policy(ck, **kw)  # type: ignore[arg-type]
        layer = pol.model.decoder.layers[0]
        assert (pol.cpu_lean_layers, pol.cpu_decode_fp32, pol.model.decode_fp32) == (lean, fp32, fp32), (ck.name, kw)
        assert isinstance(layer.__dict__.get("forward"), _LeanForward) is lean, (ck.name, kw)
        assert (type(layer.self_attn.q_proj) is SmallBatchLinear) is fp32, (ck.name, kw)
    fast = load_vla_policy(ar, dtype="bf16")
    stock = load_vla_policy(ar, dtype="bf16", cpu_decode_fp32=False, cpu_lean_layers=False)
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    for p in (fast, stock):
        p.reset(obs.instruction)
    # float32 decoding changes rounding, not the model: the chunks stay within a bin or two of bf16 decoding
    step = 2.0 / fast.model.cfg.n_bins * 4.0  # widest action range (4) over the bins, two bins
    assert np.abs(fast.act(obs).actions - stock.act(obs).actions).max() <= step


def test_auto_dtype_picks_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_runtime.policies import dtypes

    assert cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512_bf16 amx_tile") is True
    assert cpu_has_native_bf16("flags : fpu sse avx2 amx_bf16") is True
    assert cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512bw") is False  # AVX-512 without BF16
    assert cpu_has_native_bf16("flags : fpu sse avx2") is False
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype("auto", "cpu") is want
        assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(UserError, match="dtype must be"):
        resolve_dtype("int8", "cpu")
    # no native bf16, but a float32 copy of these weights would not fit: bf16 (loadable) rather than float32
    monkeypatch.setattr(dtypes, "available_memory_bytes", lambda: 16 * 2**30)
    assert resolve_dtype("auto", "cpu", weight_bytes=14 * 2**30) is torch.bfloat16  # a 7B checkpoint in bf16
    assert resolve_dtype("auto", "cpu", weight_bytes=13 * 2**20) is torch.float32  # the shipped 13 MB VLA


def test_policy_rejects_bad_inputs(tmp_path: Path) -> None:
    ck = make_ckpt(tmp_path)
    with pytest.raises(UserError, match="unknown VLA acceleration"):
        load_vla_policy(ck, accel=("warp-drive",))
    with pytest.raises(UserError, match="mode"):
        load_vla_policy(ck, mode="ar")
    with pytest.raises(UserError, match="device"):
        load_vla_policy(ck, device="tpu")
    pol = load_vla_policy(ck)
    obs = DummyReachEnv(image_size=32, cameras=("agentview", "side")).reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    with pytest.raises(UserError, match="camera"):
        pol.act(obs)


class _ExitFirst:
    attention_layers: frozenset[int] = frozenset()

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        ctx.memory["calls"] = ctx.memory.get("calls", 0) + 1
        return True

    def on_action(self, action: np.ndarray, memory: dict) -> bool:
        return bool(action[2] > 0.5)


def test_acceleration_registry_plugs_strategies_in(tmp_path: Path) -> None:
    ck = make_ckpt(tmp_path)
    ACCELERATIONS["exit-first-test"] = lambda model, **kw: _ExitFirst()
    try:
        pol = load_vla_policy(ck, accel=("exit-first-test",))
        obs = DummyReachEnv(image_size=32).reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
        chunk = pol.act(obs)
        assert chunk.info["exit_layer"] == 1 and chunk.info["accel"] == ["exit-first-test"]
        pol.act(obs)
        assert pol.memory["calls"] == 2  # per-episode memory persists across steps...
        pol.reset(obs.instruction)
        assert "calls" not in pol.memory  # ...and is cleared by reset
        assert pol.on_action(np.array([0, 0, 0.9, 0, 0, 0, 1], np.float32))
        assert not pol.on_action(np.zeros(7, np.float32))
    finally:
        del ACCELERATIONS["exit-first-test"]


def test_normalizer_round_trip() -> None:
    n = Normalizer(np.array([-2.0, 0.0, 5.0]), np.array([2.0, 1.0, 5.0]))
    x = np.array([[1.0, 0.25, 5.0], [-2.0, 1.0, 5.0]], np.float32)
    y = n.normalize(x)
    assert np.allclose(y[:, 0], [0.5, -1.0]) and np.allclose(y[:, 2], 0.0)
    assert np.allclose(n.unnormalize(y), x)


def write_dummy_demos(d: Path, n: int = 6) -> None:
    """Short reach demos under two phrasings of the instruction (the tokenizer must learn both)."""
    demos.write_dummy_demos(d, n, image_size=32, speed=1.0, max_steps=10,
                            instructions=("touch the red target", "reach the red target"))


@pytest.mark.parametrize("mode", ["parallel", "ar"])
def test_train_resume_and_act(mode: str, tmp_path: Path) -> None:
    from vla_runtime.train.train_vla import export_checkpoint, train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data)
    out = tmp_path / "ck"
    cfg = {k: v for k, v in TINY.items()}
    r1 = train_vla([data], out, mode=mode, steps=3, batch_size=4, save_every=2, log_every=1, config=cfg,
                   progress=False, drop_prob=0.5)
    assert r1["step"] == 3 and np.isfinite(r1["loss"])
    r2 = train_vla([data], out, mode=mode, steps=5, batch_size=4, save_every=2, log_every=1, progress=False,
                   bf16=False)
    assert r2["step"] == 5
    assert r1["bf16"] is cpu_has_native_bf16() and r2["bf16"] is False  # default: bf16 autocast only where native
    steps = [json.loads(line)["step"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # resumed, not restarted; the log survives checkpoint swaps
    tok = json.loads((out / "vla_tokenizer.json").read_text())["vocab"]
    assert "touch" in tok and "reach" in tok
    shipped = export_checkpoint(out, tmp_path / "ship")
    assert not (shipped / "train_state.safetensors").exists()
    assert (shipped / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    pol = load_vla_policy(shipped)
    obs = DummyReachEnv(image_size=32).reset(EpisodeSpec("dummy:reach", "reach", 1, 1))
    pol.reset("reach the red target")
    assert pol.act(obs).actions.shape == (4, 7)
    with pytest.raises(UserError, match="mode"):
        train_vla([data], out, mode="ar" if mode == "parallel" else "parallel", steps=6, progress=False)


def test_train_with_the_early_exit_loss_logs_shallow_layers(tmp_path: Path) -> None:
    from vla_runtime.train.train_vla import train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data, n=3)
    r = train_vla([data], tmp_path / "ar", mode="ar", steps=2, batch_size=2, log_every=1, config=dict(TINY),
                  progress=False, exit_loss=0.3, exit_loss_layers=[0])
    rec = json.loads((tmp_path / "ar" / "loss_log.jsonl").read_text().splitlines()[-1])
    assert r["step"] == 2 and "exit_ce" in rec and "acc_l0" in rec and np.isfinite(rec["exit_ce"])
    # parallel mode: the chunk decoded from each shallow layer gets an L1 term
    r = train_vla([data], tmp_path / "par", mode="parallel", steps=2, batch_size=2, log_every=1, config=dict(TINY),
                  progress=False, exit_loss=0.5, exit_loss_layers=[0, 1])
    rec = json.loads((tmp_path / "par" / "loss_log.jsonl").read_text().splitlines()[-1])
    assert {"exit_l1", "l1_l0", "l1_l1"} <= set(rec) and "exit_ce" not in rec
    assert rec["exit_l1"] == pytest.approx((rec["l1_l0"] + rec["l1_l1"]) / 2, rel=1e-4)
    assert rec["loss"] == pytest.approx(rec["l1"] + 0.5 * rec["exit_l1"], rel=1e-4)
    with pytest.raises(UserError, match="exit-loss-layers must be in"):
        train_vla([data], tmp_path / "ar2", mode="ar", steps=1, config=dict(TINY), progress=False,
                  exit_loss=0.3, exit_loss_layers=[99])


def test_grasp_place_targets_find_the_first_close_and_the_end() -> None:
    from vla_runtime.train.train_vla import grasp_place_targets

    states = np.arange(30, dtype=np.float32).reshape(10, 3)
    states = np.concatenate([states, np.zeros((10, 5), np.float32)], 1)
    acts = np.zeros((10, 7), np.float32)
    acts[:, 6] = [-1, -1, -1, 1, 1, -1, 1, 1, 1, 1]  # closes at 3 (the re-grasp at 6 is not the grasp)
    tgt, mask = grasp_place_targets(acts, states)
    assert mask.tolist() == [True, True]
    np.testing.assert_array_equal(tgt, np.concatenate([states[3, :3], states[9, :3]]))
    acts[:, 6] = 1.0  # a takeover demo that starts holding the object: no grasp target, the end is known
    tgt, mask = grasp_place_targets(acts, states)
    assert mask.tolist() == [False, True] and np.all(tgt[:3] == 0)
    acts[:, 6] = -1.0  # never closes
    assert grasp_place_targets(acts, states)[1].tolist() == [False, True]


def test_train_aux_loss_logs_trains_its_head_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--aux-loss: the log gets aux_l1, the head's weights live in train_state (not in the shipped weights) and
    come back on resume; resuming without the flag (or adding it later) is refused, not silently misaligned."""
    from safetensors.torch import load_file

    from vla_runtime.train.train_vla import AuxTargetHead, DemoFrames, export_checkpoint, train_vla
    from vla_runtime.train.demos import list_demos

    data = tmp_path / "demos"
    write_dummy_demos(data, n=3)
    frames = DemoFrames(list_demos(data))
    assert frames.aux_targets.shape == (3, 6) and frames.aux_masks[:, 1].all()
    frames.close()
    out = tmp_path / "ck"
    train_vla([data], out, steps=2, batch_size=2, save_every=2, log_every=1, config=dict(TINY), progress=False,
              aux_loss=0.5)
    recs = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert all("aux_l1" in r and np.isfinite(r["aux_l1"]) for r in recs)
    # the total is the action L1 plus the weighted aux L1
    assert recs[-1]["loss"] == pytest.approx(recs[-1]["l1"] + 0.5 * recs[-1]["aux_l1"], rel=1e-4)
    state = load_file(str(out / "train_state.safetensors"))
    aux1 = {k: v.clone() for k, v in state.items() if k.startswith("aux.")}
    assert set(aux1) == {f"aux.{k}" for k in AuxTargetHead(32).state_dict()}
    assert not any(k.startswith("aux") for k in load_file(str(out / "model.safetensors")))
    loaded: list[dict[str, torch.Tensor]] = []
    real_load = AuxTargetHead.load_state_dict
    monkeypatch.setattr(AuxTargetHead, "load_state_dict",
                        lambda self, sd, *a, **k: (loaded.append(dict(sd)), real_load(self, sd, *a, **k))[1])
    train_vla([data], out, steps=4, batch_size=2, save_every=2, log_every=1, progress=False, aux_loss=0.5)
    assert len(loaded) == 1 and all(torch.equal(loaded[0][k[4:]], v) for k, v in aux1.items())
    aux2 = {k: v for k, v in load_file(str(out / "train_state.safetensors")).items() if k.startswith("aux.")}
    assert any(not torch.equal(aux1[k], aux2[k]) for k in aux1)  # the head kept training from its saved weights
    with pytest.raises(UserError, match="--aux-loss"):
        train_vla([data], out, steps=6, batch_size=2, progress=False)
    plain = tmp_path / "plain"
    train_vla([data], plain, steps=1, batch_size=2, config=dict(TINY), progress=False)
    with pytest.raises(UserError, match="--aux-loss"):
        train_vla([data], plain, steps=2, batch_size=2, progress=False, aux_loss=0.5)
    with pytest.raises(UserError, match="--aux-loss"):
        train_vla([data], tmp_path / "neg", steps=1, progress=False, aux_loss=-1.0)
    shipped = export_checkpoint(out, tmp_path / "ship")
    assert load_vla_policy(shipped) is not None


def test_train_shift_off_and_bad_shift(tmp_path: Path) -> None:
    from vla_runtime.train.train_vla import random_shift, train_vla

    x = torch.rand(2, 3, 8, 8)
    assert random_shift(x, 0, torch.Generator()) is x  # --shift 0: images untouched
    moved = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    with pytest.raises(UserError, match="--shift"):
        train_vla([tmp_path], tmp_path / "o", steps=1, progress=False, shift=-1)


def test_train_ema_resume_keeps_raw_and_ema_apart(tmp_path: Path) -> None:
    """With --ema, model.safetensors holds the EMA and train_state the raw weights; resuming continues both (the
    raw weights are not replaced by the EMA), and EMA can start on a run that had none."""
    from safetensors.torch import load_file

    from vla_runtime.train.train_vla import train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data)
    out = tmp_path / "ck"
    train_vla([data], out, steps=2, batch_size=4, save_every=2, log_every=1, config=dict(TINY), progress=False,
              drop_prob=0.0)
    assert not any(k.startswith("raw.") for k in load_file(str(out / "train_state.safetensors")))
    train_vla([data], out, steps=4, batch_size=4, save_every=2, log_every=1, progress=False, drop_prob=0.0,
              lr=1e-2, ema_decay=0.9)
    st = load_file(str(out / "train_state.safetensors"))
    ema = load_file(str(out / "model.safetensors"))
    raw = {k[4:]: v for k, v in st.items() if k.startswith("raw.")}
    assert int(st["ema_n"][0]) == 2 and int(st["step"][0]) == 4
    name = next(k for k in raw if k.endswith("q_proj.weight"))
    assert not torch.equal(raw[name], ema[name])  # lr 1e-2: the raw weights ran ahead of their average
    # resume with lr 0: the raw weights must come back exactly (not the EMA), and the EMA keeps averaging
    train_vla([data], out, steps=6, batch_size=4, save_every=2, log_every=1, progress=False, drop_prob=0.0,
              lr=0.0, ema_decay=0.9)
    st2 = load_file(str(out / "train_state.safetensors"))
    assert int(st2["ema_n"][0]) == 4
    assert torch.equal(st2["raw." + name], raw[name])
    ema2 = load_file(str(out / "model.safetensors"))[name].float()
    d_before = (ema[name].float() - raw[name].float()).abs().sum()
    assert (ema2 - raw[name].float()).abs().sum() < d_before  # the average moved towards the (fixed) raw weights
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("mode", ["parallel", "ar"])
def test_bench_reports_split_tokens_and_flops(mode: str, tmp_path: Path) -> None:
    from vla_runtime.policies.vla.bench import bench_vla

    cfg = VLAConfig(mode=mode, **TINY)  # type: ignore[arg-type]
    res = bench_vla(cfg, steps=2, warmup=1, out_dir=tmp_path, keep=(0.25,), threads=1,
                    peak_seconds=0.1)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["bench"] == "vla" and saved["baseline"] == "full" and saved["machine"]["matmul_peak_gflops"] > 0
    full, pruned = res["methods"]
    assert full["ratio_to_baseline"] == 1.0
    for k in ("vision_ms_p50", "decoder_ms_p50", "head_ms_p50", "gflops_per_step", "achieved_gflops_per_s"):
        assert full[k] > 0
    assert full["tokens_per_layer"][0] == full["tokens_per_layer"][-1]
    # keeping 25 % of the 32 visual tokens from layer 1 on: 24 fewer tokens in layers 1..2, fewer FLOPs
    assert pruned["tokens_per_layer"][1] == full["tokens_per_layer"][1] - 24
    assert pruned["gflops_per_step"] < full["gflops_per_step"]


def test_bench_compares_stock_and_lean_cpu_paths(tmp_path: Path) -> None:
    from vla_runtime.policies.vla.bench import bench_vla

    res = bench_vla(VLAConfig(mode="ar", **TINY), steps=1, warmup=0, threads=1, peak_seconds=0.05,  # type: ignore[arg-type]
                    cpu_paths="both", dtype="bf16")
    names = [m["name"] for m in res["methods"]]
    assert names == ["full (stock)", "full (lean)"] and res["baseline"] == "full (stock)"
    assert [(m["cpu_lean_layers"], m["cpu_decode_fp32"]) for m in res["methods"]] == [(False, False), (True, True)]
    with pytest.raises(UserError, match="cpu_paths"):
        bench_vla(VLAConfig(mode="ar", **TINY), steps=1, cpu_paths="fast")  # type: ignore[arg-type]


def test_cli_bench_vla_prints_the_table_with_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vla_runtime.cli import main

    ck = make_ckpt(tmp_path, "ar")
    assert main(["bench", "vla", "--policy", str(ck), "--steps", "1", "--out", str(tmp_path / "b"),
                 "--cpu-paths", "both"]) == 0
    out = capsys.readouterr().out
    assert "VLA bench (ar" in out and "full (stock)" in out and "full (lean)" in out
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [m["name"] for m in saved["methods"]] == ["full (stock)", "full (lean)"]


def test_train_init_from_parallel_starts_ar_from_its_trunk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--init-from copies every weight that fits (an AR run from a parallel run: all but the action head and the
    action-slot embeddings), keeps the source's tokenizer and normalisation, lets --config change the chunk, and
    refuses demos of other dimensions."""
    from safetensors.torch import load_file

    from vla_runtime.train.train_vla import train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data)
    src = make_ckpt(tmp_path, "parallel")  # tokenizer knows only "reach the red target"; stats are not the data's
    out = tmp_path / "ar"
    with caplog.at_level("WARNING"):
        train_vla([data], out, mode="ar", steps=1, batch_size=4, save_every=1, log_every=1, progress=False,
                  lr=0.0, drop_prob=0.0, init_from=src, config={"chunk_size": 2, "n_action_steps": 2})
    assert "touch" in caplog.text  # the demos' other phrasing is unknown to the source tokenizer: said, not fatal
    cfg = VLAConfig.load(out / "config.json")
    assert cfg.mode == "ar" and cfg.chunk_size == 2 and cfg.hidden == TINY["hidden"]
    assert json.loads((out / "stats.json").read_text()) == json.loads((src / "stats.json").read_text())
    assert json.loads((out / "vla_tokenizer.json").read_text()) == json.loads((src / "vla_tokenizer.json").read_text())
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    assert any("layers.2" in k for k in shared) and any("vision" in k for k in shared)
    for k in shared:  # lr 0: the copied weights come through the step unchanged
        assert torch.equal(a[k].float(), b[k].float()), k
    assert "head.proj.weight" in b and not any(k.startswith("head.proj") for k in a)
    # demos whose action dim differs from the source checkpoint's are refused before any training
    other = tmp_path / "other"
    demos.write_dummy_demos(other, 2, image_size=32, speed=1.0, max_steps=10, instructions=("reach",))
    import h5py

    for f in demos.list_demos(other):
        with h5py.File(f, "a") as h:
            act = h["actions"][:]
            del h["actions"]
            h["actions"] = act[:, :6]
    with pytest.raises(UserError, match="state/action dims"):
        train_vla([other], tmp_path / "bad", steps=1, progress=False, init_from=src)


def test_attention_drop_keeps_the_text_attention_top_and_cuts_by_it(tmp_path: Path) -> None:
    """The SpecPrune-shaped training drop: half its kept set is the layer-0 text-attention top, the rest a random
    draw; non-visual tokens always stay; the dynamic cut keeps the best-scored visual tokens, never below floor."""
    from vla_runtime.policies.vla.modeling import KIND_TEXT, KIND_VISUAL, AttentionVisualDrop

    cfg = VLAConfig(vocab_size=12, **TINY)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = VLAModel(cfg, bos_id=1).eval()
    B = 2
    images = torch.rand(B, len(cfg.cameras), 3, 32, 32) * 2 - 1
    text = torch.randint(2, 12, (B, cfg.max_text_len))
    valid_text = torch.ones(B, cfg.max_text_len, dtype=torch.bool)
    with torch.no_grad():
        h = torch.cat([model.embed_prefix(images, torch.zeros(B, 8), text), model.suffix_inputs(B, torch.float32)], 1)
        pos, kinds, valid = model.layout(B, valid_text, h.device)
        nv = int((kinds[0] == KIND_VISUAL).sum())
        kept: dict[int, torch.Tensor] = {}

        class Rec(AttentionVisualDrop):
            def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
                idx = super().before_layer(layer_idx, ctx)
                if idx is not None:
                    kept[layer_idx] = ctx.positions.gather(1, idx)  # type: ignore[union-attr]
                if layer_idx == 1:
                    attn = ctx.attentions[0].float()
                    kept["imp"] = attn[:, :, ctx.kinds[0] == KIND_TEXT].mean(dim=(1, 2))  # type: ignore[index]
                return idx

        drop = Rec(1, 0.5, att_frac=0.5, dynamic_layers=(2,), floor=4, generator=torch.Generator().manual_seed(0))
        _, ctx = model.forward_layers(h, pos, kinds, valid, pruner=drop)
    k = nv // 2
    assert ctx.visual_per_layer == [nv, k, math.ceil(k * 0.8)]
    n_other = h.shape[1] - nv
    assert ctx.tokens_per_layer == [n_other + v for v in ctx.visual_per_layer]  # only visual tokens dropped
    vis_pos = pos[0][kinds[0] == KIND_VISUAL]
    imp = kept["imp"]
    for b in range(B):
        top = set(pos[b][imp[b].masked_fill(kinds[b] != KIND_VISUAL, -1).topk(k // 2).indices].tolist())
        assert top <= set(kept[1][b].tolist())  # the attention top survives the static cut
        assert top <= set(kept[2][b].tolist())  # and ranks above the random half in the dynamic cut
        assert set(kept[1][b].tolist()) >= set(pos[b][kinds[b] != KIND_VISUAL].tolist())
        assert set(kept[1][b].tolist()) - set(vis_pos.tolist()) == set(pos[b][kinds[b] != KIND_VISUAL].tolist())
    with pytest.raises(UserError):
        AttentionVisualDrop(1, 0.5, dynamic_layers=(1,))
    with pytest.raises(UserError):
        AttentionVisualDrop(0, 0.5)


def test_train_with_mixed_drops_logs_both_shapes(tmp_path: Path) -> None:
    from vla_runtime.train.train_vla import train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data)
    out = tmp_path / "ck"
    r = train_vla([data], out, steps=8, batch_size=4, save_every=8, log_every=1, config=dict(TINY), progress=False,
                  drop_prob=1.0, drop_keep=0.5, drop_shape="mixed")
    assert np.isfinite(r["loss"])
    shapes = {json.loads(line)["drop_shape"] for line in (out / "loss_log.jsonl").read_text().splitlines()}
    assert shapes == {"RandomVisualDrop", "AttentionVisualDrop"}
    with pytest.raises(UserError, match="drop-shape"):
        train_vla([data], tmp_path / "ck2", steps=1, progress=False, drop_shape="fastv")


def test_patch_kernel_resize_keeps_what_each_patch_sees() -> None:
    """A patch-16 kernel resized to 8 px gives, on an image, the tokens the original gives on that image
    upsampled 2x (nearest); 8 -> 16 spreads the kernel so a 2x-upsampled image's tokens are kept; the position
    grid resizes bicubically and keeps its values on a constant grid."""
    import torch.nn.functional as F

    from vla_runtime.train.train_vla import resize_patch_kernel, resize_position_grid

    g = torch.Generator().manual_seed(0)
    w16 = torch.randn(5, 3, 16, 16, generator=g)
    img = torch.randn(2, 3, 32, 32, generator=g)
    up = img.repeat_interleave(2, -2).repeat_interleave(2, -1)  # (2, 3, 64, 64)
    torch.testing.assert_close(F.conv2d(img, resize_patch_kernel(w16, 8), stride=8), F.conv2d(up, w16, stride=16),
                               rtol=1e-4, atol=1e-4)
    w8 = torch.randn(5, 3, 8, 8, generator=g)
    torch.testing.assert_close(F.conv2d(up, resize_patch_kernel(w8, 16), stride=16), F.conv2d(img, w8, stride=8),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="divide"):
        resize_patch_kernel(w16, 6)
    pos = torch.full((64, 4), 0.5)
    out = resize_position_grid(pos, 256)
    assert out.shape == (256, 4)
    torch.testing.assert_close(out, torch.full((256, 4), 0.5))
    with pytest.raises(UserError, match="square"):
        resize_position_grid(pos, 200)


def test_train_init_from_a_coarser_patch_resizes_the_vision_embeddings(tmp_path: Path) -> None:
    """--init-from with --config patch_size halved starts the finer-patch model from the resized kernel and
    position grid (none left fresh), 4x the visual tokens."""
    from safetensors.torch import load_file

    from vla_runtime.train.train_vla import resize_patch_kernel, resize_position_grid, train_vla

    data = tmp_path / "demos"
    write_dummy_demos(data)
    src = make_ckpt(tmp_path, "parallel")
    p = VLAConfig.load(src / "config.json").patch_size
    out = tmp_path / "fine"
    res = train_vla([data], out, steps=1, batch_size=4, save_every=1, log_every=1, progress=False, lr=0.0,
                    drop_prob=0.0, init_from=src, config={"patch_size": p // 2})
    assert res["visual_tokens"] == 4 * VLAConfig.load(src / "config.json").n_visual
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    k, q = "vision.embeddings.patch_embedding.weight", "vision.embeddings.position_embedding.weight"
    assert b[k].shape[-1] == p // 2
    torch.testing.assert_close(b[k].float(), resize_patch_kernel(a[k].float(), p // 2), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(b[q].float(), resize_position_grid(a[q].float(), b[q].shape[0]), rtol=1e-2, atol=1e-3)


def test_deepen_copies_each_layer_into_consecutive_layers_and_trains_from_them(tmp_path: Path) -> None:
    """Depth up-scaling: layer i of the source becomes layers 2i and 2i+1 (every other weight, tokenizer and
    normalisation copied); factor 1 reproduces the source's actions exactly; a run started from the deepened
    directory copies every tensor (none left fresh); bad factors and HF-wrapping sources are refused."""
    from safetensors.torch import load_file

    from vla_runtime.train.deepen import deepen, deepen_checkpoint
    from vla_runtime.train.train_vla import train_vla

    src = make_ckpt(tmp_path, "ar")
    n = TINY["layers"]
    deep = deepen_checkpoint(src, tmp_path / "x2", factor=2)
    assert VLAConfig.load(deep / "config.json").layers == 2 * n
    a, b = load_file(str(src / "model.safetensors")), load_file(str(deep / "model.safetensors"))
    assert len(b) == len(a) + sum(1 for k in a if k.startswith("decoder.layers.")) * 1
    for k, v in a.items():
        if k.startswith("decoder.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            for j in (2 * int(i), 2 * int(i) + 1):
                assert torch.equal(b[f"decoder.layers.{j}.{rest}"], v.float()), (k, j)
        else:
            assert torch.equal(b[k], v.float()), k
    assert (deep / "vla_tokenizer.json").read_text() == (src / "vla_tokenizer.json").read_text()
    assert (deep / "stats.json").read_text() == (src / "stats.json").read_text()

    same = deepen_checkpoint(src, tmp_path / "x1", factor=1)
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 3, 0))
    acts = []
    for ckpt in (src, same):
        pol = load_vla_policy(ckpt, dtype="fp32")
        pol.reset(obs.instruction)
        acts.append(pol.act(obs).actions)
    np.testing.assert_allclose(acts[0], acts[1], atol=1e-6)

    data = tmp_path / "demos"
    write_dummy_demos(data)
    out = tmp_path / "run"
    train_vla([data], out, mode="ar", steps=1, batch_size=4, save_every=1, log_every=1, progress=False, lr=0.0,
              drop_prob=0.0, init_from=deep)
    c = load_file(str(out / "model.safetensors"))
    assert set(c) == set(b) and all(torch.equal(c[k].float(), b[k]) for k in b)
    with pytest.raises(UserError, match="already holds"):  # never overwrites a checkpoint
        deepen_checkpoint(src, deep, factor=3)
    assert VLAConfig.load(deep / "config.json").layers == 2 * n
    with pytest.raises(ValueError, match="factor"):
        deepen(a, n, 0)
    with pytest.raises(ValueError, match="layer"):
        deepen(a, n - 1, 2)
