"""Real-checkpoint path: tiny random Llama / Qwen2 / Gemma (and a Llava VLM) saved to a temp dir, loaded back into
the VLA layer loop, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.errors import UserError
from vla_runtime.policies.vla.hf_loader import load_hf_vla, save_vla_parts
from vla_runtime.policies.vla.policy import load_vla_policy
from vla_runtime.policies.vla.tokenizer import HFTokenizer

torch.set_num_threads(1)
VOCAB = 300  # > 256 action bins


def save_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "<unk>", "reach", "the", "red", "target", "lift", "cube"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
                            ).save_pretrained(str(d))


def save_lm(family: str, d: Path) -> torch.nn.Module:
    from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "gemma": (GemmaConfig, GemmaForCausalLM)}[family]
    torch.manual_seed(0)
    lm = cls[1](cls[0](**kw))
    lm.save_pretrained(str(d))
    save_tokenizer(d)
    return lm


def small_obs() -> object:
    env = DummyReachEnv(image_size=32)
    return env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_tiny_random_lm_loads_into_the_loop(family: str, tmp_path: Path) -> None:
    lm = save_lm(family, tmp_path)
    pol = load_vla_policy(tmp_path, device="cpu", mode="parallel", dtype="fp32")
    dec = pol.model.decoder
    assert type(dec).__name__ == type(lm.model).__name__  # the stock class, not a fork
    assert torch.equal(dec.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert isinstance(pol.tokenizer, HFTokenizer) and pol.tokenizer.encode("reach the red target") == [3, 4, 5, 6]
    # the loop over the loaded decoder still equals its stock forward
    h = torch.randn(1, 7, 32)
    pos = torch.arange(7)[None]
    kinds = torch.full((1, 7), 3)
    with torch.no_grad():
        ref = dec(inputs_embeds=h, position_ids=pos).last_hidden_state
        out, _ = pol.model.forward_layers(h, pos, kinds, torch.ones(1, 7, dtype=torch.bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    obs = small_obs()
    pol.reset(obs.instruction)  # type: ignore[attr-defined]
    chunk = pol.act(obs)  # type: ignore[arg-type]
    assert chunk.actions.shape == (pol.spec.chunk_size, 7) and np.isfinite(chunk.actions).all()
    assert chunk.info["tokens_per_layer"][0] == pol.cfg.prefix_len - pol.cfg.max_text_len + 4 + pol.cfg.n_suffix


def test_ar_mode_uses_the_last_vocab_rows_as_action_tokens(tmp_path: Path) -> None:
    lm = save_lm("llama", tmp_path)
    model, tok, stats = load_hf_vla(tmp_path, mode="ar", dtype=torch.float32)
    assert model.action_token_offset == VOCAB - 256
    torch.testing.assert_close(model.head.proj.weight, lm.lm_head.weight[VOCAB - 256:])  # type: ignore[union-attr]
    assert stats["action_min"].shape == (7,)
    b = torch.zeros(1, 2, 3, model.cfg.image_size, model.cfg.image_size)
    ids = torch.zeros(1, model.cfg.max_text_len, dtype=torch.long)
    tv = torch.zeros(1, model.cfg.max_text_len, dtype=torch.bool)
    tv[0, :2] = True
    with torch.no_grad():
        a, ctx = model.predict(b, torch.zeros(1, 8), ids, tv)
    assert a.shape == (1, model.cfg.chunk_size, 7) and float(a.abs().max()) <= 1.0


def test_vla_parts_round_trip(tmp_path: Path) -> None:
    save_lm("qwen2", tmp_path)
    m1, _, _ = load_hf_vla(tmp_path, mode="parallel", dtype=torch.float32)
    save_vla_parts(m1, tmp_path)
    m2, _, _ = load_hf_vla(tmp_path, mode="parallel", dtype=torch.float32)
    for (k, v1), (_, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v1, v2), k


def test_tiny_llava_vlm_loads(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=VOCAB - 1,
                                              vision_feature_layer=-1)).save_pretrained(str(tmp_path))
    model, _, _ = load_hf_vla(tmp_path, mode="parallel", dtype=torch.float32)
    assert type(model.decoder).__name__ == "LlamaModel" and model.cfg.image_size == 32
    with torch.no_grad():
        a, ctx = model.predict(torch.zeros(1, 2, 3, 32, 32), torch.zeros(1, 8),
                               torch.zeros(1, model.cfg.max_text_len, dtype=torch.long),
                               torch.ones(1, model.cfg.max_text_len, dtype=torch.bool))
    assert a.shape == (1, model.cfg.chunk_size, 7)
    assert ctx.visual_per_layer[0] == 2 * 16


def test_unsupported_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not supported"):
        load_vla_policy(tmp_path)
    with pytest.raises(UserError):
        load_vla_policy(tmp_path / "missing")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_checkpoint_on_cuda_with_specprune(tmp_path: Path) -> None:
    """The real-checkpoint path on a GPU: fp32 loop equals the stock forward on CUDA; bf16 with SpecPrune acts,
    prunes, and its scoring ops take the compiled Triton path."""
    import vla_runtime.kernels as K

    save_lm("llama", tmp_path)
    pol = load_vla_policy(tmp_path, device="cuda", mode="parallel", dtype="fp32")
    dec = pol.model.decoder
    h = torch.randn(1, 7, 32, device="cuda")
    pos = torch.arange(7, device="cuda")[None]
    kinds = torch.full((1, 7), 3, device="cuda")
    with torch.no_grad():
        ref = dec(inputs_embeds=h, position_ids=pos).last_hidden_state
        out, _ = pol.model.forward_layers(h, pos, kinds, torch.ones(1, 7, dtype=torch.bool, device="cuda"))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    pol = load_vla_policy(tmp_path, device="cuda", mode="parallel", dtype="bf16", accel=("specprune",))
    env = DummyReachEnv(image_size=32)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    pol.reset(obs.instruction)
    for _ in range(3):
        chunk = pol.act(obs)
        assert np.isfinite(chunk.actions).all()
        obs = env.step(chunk.actions[0]).obs
    assert K.last_backend("attention_importance") == "triton"
    n_vis = pol.cfg.n_visual
    assert min(chunk.info["visual_tokens_per_layer"]) < n_vis  # something was pruned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_vla_on_cuda_random_config() -> None:
    """`bench vla --device cuda` on a random config: built on the GPU, variants share the weights, the random-drop
    baseline draws from a CPU generator and still prunes."""
    from vla_runtime.policies.vla.bench import bench_vla

    cfg = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 2, "kv_heads": 1, "head_dim": 32,
           "patch_size": 16}
    res = bench_vla(cfg, steps=2, warmup=1, device="cuda", accel=("specprune",), keep=(0.5,), peak_seconds=0.1)
    names = [m["name"] for m in res["methods"]]
    assert names == ["full", "specprune", "random_keep50@L1"]
    full, _, rnd = res["methods"]
    assert rnd["visual_tokens_per_layer"][-1] < full["visual_tokens_per_layer"][-1]
    assert all(m["gflops_per_step"] > 0 for m in res["methods"])
