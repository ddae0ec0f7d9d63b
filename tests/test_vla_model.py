"""The VLA layer loop equals the stock transformers forward; pruning / exit hooks; KV cache; heads; tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.heads import ARActionHead, ParallelActionHead
from vla_runtime.policies.vla.lean_layers import (lean_calls, lean_layer_forward, lean_supported, lean_weights,
                                                  mkldnn_packing_available, use_lean_layers)
from vla_runtime.policies.vla.modeling import (KIND_SUFFIX, KIND_TEXT, LayerKVCache, NoExit, SmallBatchLinear,
                                               StepContext, VLAModel, build_attention_mask, use_fp32_small_batch)
from vla_runtime.policies.vla.tokenizer import WordTokenizer, normalize

torch.set_num_threads(1)


def tiny_cfg(**kw: object) -> VLAConfig:
    base = dict(image_size=16, patch_size=8, cameras=("agentview", "wrist"), vision_hidden=16, vision_heads=2,
                vision_intermediate=32, hidden=32, layers=4, heads=4, kv_heads=2, head_dim=8, intermediate=64,
                vocab_size=20, max_text_len=5, chunk_size=3, n_action_steps=3, head_hidden=32)
    base.update(kw)
    return VLAConfig(**base)  # type: ignore[arg-type]


def make_model(family: str = "llama", mode: str = "parallel", attn: str = "eager", seed: int = 0) -> VLAModel:
    torch.manual_seed(seed)
    m = VLAModel(tiny_cfg(decoder_family=family, mode=mode)).eval()
    m.decoder.config._attn_implementation = attn
    return m


def batch(cfg: VLAConfig, B: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tv = torch.zeros(B, cfg.max_text_len, dtype=torch.bool)
    for b in range(B):
        tv[b, :3 + b % 2] = True
    return {"images": torch.rand(B, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1,
            "state": torch.rand(B, cfg.state_dim, generator=g) * 2 - 1,
            "text_ids": torch.randint(3, cfg.vocab_size, (B, cfg.max_text_len), generator=g) * tv,
            "text_valid": tv,
            "actions": torch.rand(B, cfg.chunk_size, cfg.action_dim, generator=g) * 2 - 1,
            "action_mask": torch.ones(B, cfg.chunk_size, dtype=torch.bool)}


def causal_inputs(m: VLAModel, N: int = 11, B: int = 2, seed: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, m.hidden, generator=g)
    pos = torch.arange(N)[None].expand(B, -1)
    kinds = torch.full((B, N), KIND_TEXT)
    valid = torch.ones(B, N, dtype=torch.bool)
    return h, pos, kinds, valid


class KeepIdx:
    """Pruner returning fixed indices before one layer."""

    attention_layers: frozenset[int] = frozenset()

    def __init__(self, layer: int, idx: torch.Tensor) -> None:
        self.layer, self.idx = layer, idx

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        return self.idx if layer_idx == self.layer else None


class ExitAfter:
    def __init__(self, layer: int, attention_layers: frozenset[int] = frozenset()) -> None:
        self.layer = layer
        self.attention_layers = attention_layers
        self.seen: list[int] = []

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        self.seen.append(layer_idx)
        return layer_idx == self.layer


def truncated(decoder: nn.Module, start: int, stop: int, norm: bool) -> nn.Module:
    """A stock decoder over layers [start, stop) (shared weights), optionally without the final norm."""
    d = copy.copy(decoder)
    d._modules = dict(decoder._modules)
    d.layers = nn.ModuleList(list(decoder.layers)[start:stop])
    d.config = copy.deepcopy(decoder.config)
    d.config.num_hidden_layers = stop - start
    if not norm:
        d.norm = nn.Identity()
    return d


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_loop_equals_stock_forward_when_nothing_dropped(family: str) -> None:
    m = make_model(family)
    h, pos, kinds, valid = causal_inputs(m)
    with torch.no_grad():
        ref = m.decoder(inputs_embeds=h, position_ids=pos).last_hidden_state
        out, ctx = m.forward_layers(h, pos, kinds, valid)
    assert torch.equal(out, ref)
    assert ctx.exit_layer == m.n_layers and ctx.tokens_per_layer == [h.shape[1]] * m.n_layers


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loop_equals_stock_with_sdpa(family: str) -> None:
    m = make_model(family, attn="sdpa")
    h, pos, kinds, valid = causal_inputs(m)
    with torch.no_grad():
        ref = m.decoder(inputs_embeds=h, position_ids=pos).last_hidden_state
        out, _ = m.forward_layers(h, pos, kinds, valid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_full_layout_equals_stock_with_the_equivalent_mask() -> None:
    """Parallel layout (padding + bidirectional suffix): loop == stock model given the same 4D mask."""
    m = make_model("llama", mode="parallel")
    b = batch(m.cfg)
    B = b["images"].shape[0]
    with torch.no_grad():
        h = torch.cat([m.embed_prefix(b["images"], b["state"], b["text_ids"]), m.suffix_inputs(B, torch.float32)], 1)
        pos, kinds, valid = m.layout(B, b["text_valid"], h.device)
        mask = build_attention_mask(pos, kinds, pos, kinds, valid, True, h.dtype)
        ref = m.decoder(inputs_embeds=h, position_ids=pos, attention_mask=mask).last_hidden_state
        out, _ = m.forward_layers(h, pos, kinds, valid)
    assert torch.equal(out, ref)
    # the suffix is bidirectional: the first action query sees the last one; text does not see the future
    allowed = mask[0, 0] == 0
    suf = (kinds[0] == KIND_SUFFIX).nonzero().squeeze(1)
    assert bool(allowed[suf[0], suf[-1]]) and not bool(allowed[suf[0] - 1, suf[0]])
    pad = (~valid[0]).nonzero().squeeze(1)
    assert len(pad) > 0 and not bool(allowed[:, pad].any())


def test_padding_removed_at_batch_one_gives_same_actions() -> None:
    m = make_model("llama", mode="parallel")
    b = batch(m.cfg, B=2)
    with torch.no_grad():
        a_batched, _ = m.predict(b["images"], b["state"], b["text_ids"], b["text_valid"])
        a_single, ctx = m.predict(b["images"][:1], b["state"][:1], b["text_ids"][:1], b["text_valid"][:1])
    torch.testing.assert_close(a_single[0], a_batched[0], atol=1e-5, rtol=1e-5)
    assert ctx.tokens_per_layer[0] == m.cfg.seq_len - int((~b["text_valid"][0]).sum())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruning_before_first_layer_equals_stock_on_kept_subsequence(family: str) -> None:
    m = make_model(family)
    h, pos, kinds, valid = causal_inputs(m, N=12)
    keep = torch.tensor([[0, 2, 3, 7, 8, 11], [1, 2, 4, 5, 9, 11]])
    with torch.no_grad():
        out, ctx = m.forward_layers(h, pos, kinds, valid, pruner=KeepIdx(0, keep))
        hk = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        pk = pos.gather(1, keep)
        mask = build_attention_mask(pk, kinds.gather(1, keep), pk, kinds.gather(1, keep), valid.gather(1, keep),
                                    False, h.dtype)
        ref = m.decoder(inputs_embeds=hk, position_ids=pk, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)
    assert torch.equal(ctx.positions, pk)  # gaps kept: positions are not renumbered
    assert ctx.tokens_per_layer == [6] * m.n_layers


def test_pruning_mid_stack_equals_two_stock_halves() -> None:
    m = make_model("llama")
    h, pos, kinds, valid = causal_inputs(m, N=12)
    keep = torch.tensor([[0, 1, 5, 6, 10, 11], [0, 3, 4, 6, 7, 11]])
    with torch.no_grad():
        out, ctx = m.forward_layers(h, pos, kinds, valid, pruner=KeepIdx(2, keep))
        first = truncated(m.decoder, 0, 2, norm=False)(inputs_embeds=h, position_ids=pos, use_cache=False).last_hidden_state
        hk = first.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        pk = pos.gather(1, keep)
        mask = build_attention_mask(pk, kinds.gather(1, keep), pk, kinds.gather(1, keep), valid.gather(1, keep),
                                    False, h.dtype)
        ref = truncated(m.decoder, 2, 4, norm=True)(inputs_embeds=hk, position_ids=pk, use_cache=False,
                                                    attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)
    assert ctx.tokens_per_layer == [12, 12, 6, 6]


def test_exit_hook_stops_the_loop() -> None:
    m = make_model("llama")
    h, pos, kinds, valid = causal_inputs(m)
    ex = ExitAfter(1)
    with torch.no_grad():
        out, ctx = m.forward_layers(h, pos, kinds, valid, exit_policy=ex)
        ref = truncated(m.decoder, 0, 2, norm=True)(inputs_embeds=h, position_ids=pos, use_cache=False).last_hidden_state
    assert ex.seen == [0, 1] and ctx.exit_layer == 2 and len(ctx.tokens_per_layer) == 2
    assert torch.equal(out, ref)


def test_attention_capture_for_strategies() -> None:
    m = make_model("llama", attn="sdpa")
    h, pos, kinds, valid = causal_inputs(m, N=9)
    with torch.no_grad():
        out_plain, _ = m.forward_layers(h, pos, kinds, valid)
        out, ctx = m.forward_layers(h, pos, kinds, valid, exit_policy=ExitAfter(99, frozenset({0, 2})))
    assert sorted(ctx.attentions) == [0, 2]
    a = ctx.attentions[0]
    assert a.shape == (2, m.cfg.heads, 9, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, m.cfg.heads, 9))
    assert float(a[..., 0, 1:].abs().max()) == 0.0  # causal: the first token sees only itself
    torch.testing.assert_close(out, out_plain, atol=1e-5, rtol=1e-5)
    assert m.decoder.config._attn_implementation == "sdpa"  # restored


def test_ar_kv_cache_decode_equals_full_recompute() -> None:
    m = make_model("llama", mode="ar")
    b = batch(m.cfg, B=1)
    with torch.no_grad():
        actions, ctx = m.predict(b["images"], b["state"], b["text_ids"], b["text_valid"])
        head = m.head
        assert isinstance(head, ARActionHead)
        bins = head.tokenize(actions).reshape(1, -1)  # centres map back to their own bins
        # teacher-forced full forward with the generated tokens reproduces every greedy choice
        h = torch.cat([m.embed_prefix(b["images"], b["state"], b["text_ids"]),
                       m.suffix_inputs(1, torch.float32, bins)], 1)
        pos, kinds, valid = m.layout(1, b["text_valid"], h.device)
        out, _ = m.forward_layers(h, pos, kinds, valid)
        full_bins = head(out[:, -m.cfg.n_suffix:]).argmax(-1)
    assert actions.shape == (1, m.cfg.chunk_size, m.cfg.action_dim)
    assert torch.equal(full_bins, bins)
    assert len(ctx.extra["decode_exit_layers"]) == m.cfg.n_action_tokens


def test_small_batch_linear_runs_few_rows_in_float32_and_keeps_the_module() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    keys = sorted(lin.state_dict())
    ref = copy.deepcopy(lin)
    assert use_fp32_small_batch(lin) == 1 and type(lin) is SmallBatchLinear and sorted(lin.state_dict()) == keys
    few, many = torch.randn(1, 2, 16).to(torch.bfloat16), torch.randn(40, 16).to(torch.bfloat16)
    want = nn.functional.linear(few.float(), ref.weight.float(), ref.bias.float()).to(torch.bfloat16)
    assert torch.equal(lin(few), want) and lin(few).dtype == torch.bfloat16
    assert torch.equal(lin(many), ref(many))  # many rows: the plain bf16 path
    x32 = torch.randn(40, 16)  # float32 input (decode_fp32): float32 path whatever the rows
    assert torch.equal(lin(x32), nn.functional.linear(x32, ref.weight.float(), ref.bias.float()))
    with torch.no_grad():
        lin.weight.mul_(2)  # a changed weight is not served from the stale float32 copy
    assert torch.equal(lin(few), nn.functional.linear(few.float(), 2 * ref.weight.float(),
                                                      ref.bias.float()).to(torch.bfloat16))
    assert use_fp32_small_batch(lin, enable=False) == 1 and type(lin) is nn.Linear


@pytest.mark.parametrize("lean", [False, True])
def test_float32_decode_after_bf16_prefill_equals_its_reference(lean: bool) -> None:
    """decode_fp32: the prefill runs in bf16, every decode step in float32 from the same (bf16) weights; with
    `lean`, the decode steps run the fused lean layer instead of the stock one."""
    mb = make_model("llama", mode="ar", attn="sdpa").to(torch.bfloat16)
    mf = copy.deepcopy(mb).float()  # float32 copy of the bf16-rounded weights: the decode-step reference
    for part in (mb.decoder, mb.head):
        use_fp32_small_batch(part)
    if lean:
        assert use_lean_layers(mb.decoder) == mb.n_layers
    mb.decode_fp32 = True
    cfg, b = mb.cfg, batch(mb.cfg, B=1)
    b = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in b.items()}
    seen: list[tuple[int, torch.dtype]] = []
    hook = mb.decoder.layers[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append((int(args[0].shape[1]), args[0].dtype)), with_kwargs=True)
    with torch.no_grad():
        actions, _ = mb.predict(b["images"], b["state"], b["text_ids"], b["text_valid"])
        hook.remove()
        n_lean = lean_calls(mb.decoder)
        use_lean_layers(mb.decoder, enable=False)  # the reference runs the stock layers
        h = torch.cat([mb.embed_prefix(b["images"], b["state"], b["text_ids"]), mb.suffix_inputs(1, torch.bfloat16)], 1)
        pos, kinds, valid = mb.layout(1, b["text_valid"], h.device)
        keep = valid[0, :cfg.prefix_len + 1].nonzero().squeeze(1)
        h, pos, kinds, valid = h[:, keep], pos[:, keep], kinds[:, keep], valid[:, keep]
        cache = LayerKVCache(mb.n_layers)
        out, _ = mb.forward_layers(h, pos, kinds, valid, cache=cache, bidirectional_suffix=False)
        cache.to_dtype(torch.float32)
        last, bins = out[:, -1:].float(), []
        for step in range(cfg.n_action_tokens):
            bins.append(mf.head(last).argmax(-1))
            if step < cfg.n_action_tokens - 1:
                p = torch.tensor([[cfg.prefix_len + 1 + step]])
                last, _ = mf.forward_layers(mf.embed_action_tokens(bins[-1]), p, torch.full_like(p, KIND_SUFFIX),
                                            torch.ones_like(p, dtype=torch.bool), cache=cache,
                                            bidirectional_suffix=False)
    assert seen[0] == (h.shape[1], torch.bfloat16)  # the prefill in bf16
    assert seen[1:] and all(s == (1, torch.float32) for s in seen[1:])  # every decode step in float32
    want = mf.head.detokenize(torch.cat(bins, 1).reshape(1, cfg.chunk_size, cfg.action_dim))
    assert torch.equal(actions, want)
    # the lean path took every layer call: the bf16 prefill and every decode step
    assert n_lean == (mb.n_layers * cfg.n_action_tokens if lean else 0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rows,dtype", [(1, torch.float32), (3, torch.float32), (20, torch.bfloat16)])
def test_lean_layer_equals_the_stock_layer(family: str, rows: int, dtype: torch.dtype) -> None:
    m = make_model(family, mode="ar", attn="sdpa").to(dtype)
    layer = m.decoder.layers[1]
    assert lean_supported(layer)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, rows, m.hidden, generator=g).to(dtype)
    pos = torch.arange(10, 10 + rows)[None]
    pe = m.decoder.rotary_emb(h, position_ids=pos)
    kpos = torch.arange(10 + rows)[None]
    kind = torch.full_like(kpos, KIND_SUFFIX)
    mask = None if rows == 1 else build_attention_mask(pos, kind[:, -rows:], kpos, kind,
                                                       torch.ones_like(kpos, dtype=torch.bool), False, dtype)
    caches = [LayerKVCache(m.n_layers) for _ in range(2)]
    prev = torch.randn(1, m.decoder.config.num_key_value_heads, 10, m.decoder.config.head_dim, generator=g).to(dtype)
    for c in caches:
        c.k[1], c.v[1] = prev.clone(), 0.5 * prev.clone()
    with torch.no_grad():
        want = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, cache=caches[0],
                     use_cache=True)
        got = lean_layer_forward(lean_weights(layer), h, mask, pe, caches[1])
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches[1].k[1], caches[0].k[1])
    torch.testing.assert_close(caches[1].v[1], caches[0].v[1])


@pytest.mark.skipif(not mkldnn_packing_available(), reason="no oneDNN bf16 on this CPU")
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_prepacked_bf16_lean_layer_equals_the_stock_layer(rows: int) -> None:
    """oneDNN-prepacked bf16 weights (the CPU default) give the stock layer's values for any row count."""
    m = make_model("llama", mode="ar", attn="sdpa").to(torch.bfloat16)
    layer = m.decoder.layers[1]
    h = torch.randn(1, rows, m.hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    pos = torch.arange(rows)[None]
    pe = m.decoder.rotary_emb(h, position_ids=pos)
    packed, plain = lean_weights(layer), lean_weights(layer, pack=False)
    assert packed.packed and not plain.packed and lean_weights(layer, torch.float32).packed is False
    with torch.no_grad():
        want = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        got = lean_layer_forward(packed, h, None, pe, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, lean_layer_forward(plain, h, None, pe, None), rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lean_layer_without_a_mask_attends_as_the_stock_implementation(attn: str) -> None:
    """No mask and several rows: causal under SDPA, everything under eager (the stock attention functions)."""
    m = make_model("llama", mode="ar", attn=attn)
    h = torch.randn(1, 5, m.hidden)
    pos = torch.arange(5)[None]
    pe = m.decoder.rotary_emb(h, position_ids=pos)
    layer = m.decoder.layers[0]
    with torch.no_grad():
        want = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        got = lean_layer_forward(lean_weights(layer), h, None, pe, None, attn)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lean_layers_keep_hooks_and_fall_back_to_the_stock_layer() -> None:
    m = make_model("llama", mode="ar", attn="sdpa")
    layer = m.decoder.layers[0]
    assert use_lean_layers(m.decoder) == m.n_layers and use_lean_layers(m.decoder) == 0  # idempotent
    seen: list[int] = []
    layer.register_forward_pre_hook(lambda mod, args, kw: seen.append(int(args[0].shape[1])), with_kwargs=True)
    h = torch.randn(1, 12, m.hidden)
    pos = torch.arange(12)[None]
    pe = m.decoder.rotary_emb(h, position_ids=pos)

    def call(x: torch.Tensor) -> torch.Tensor:
        return layer(x, attention_mask=None, position_embeddings=pe, position_ids=pos)

    with torch.no_grad():
        call(h)
        assert lean_calls(m.decoder) == 1
        layer(h, None, position_embeddings=pe, position_ids=pos)  # positional arguments: stock
        handle = layer.self_attn.register_forward_hook(lambda *a: None)  # attention capture: stock
        call(h)
        handle.remove()
        assert lean_calls(m.decoder) == 1
    call(h)  # autograd on (training): stock
    assert lean_calls(m.decoder) == 1 and seen == [12, 12, 12, 12]  # the layer's own hooks ran on every path
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(0.5)  # changed in place: the fused copies are remade
        got = call(h)
        use_lean_layers(m.decoder, enable=False)
        torch.testing.assert_close(got, call(h), rtol=1e-5, atol=1e-6)
        use_lean_layers(m.decoder)
    assert use_lean_layers(m.decoder, enable=False) == m.n_layers and "forward" not in layer.__dict__
    gemma = make_model("gemma", mode="ar")
    assert use_lean_layers(gemma.decoder) == 0  # (1 + w) norms, GELU: not the lean layer's math


def test_layer_kv_cache_appends() -> None:
    c = LayerKVCache(2)
    k = torch.randn(1, 2, 3, 4)
    k2, _ = c.update(k, k, 1)
    k3, _ = c.update(k[:, :, :1], k[:, :, :1], 1)
    assert k3.shape == (1, 2, 4, 4) and c.seq_len(1) == 4 and c.seq_len(0) == 0


@pytest.mark.parametrize("mode", ["parallel", "ar"])
def test_forward_train_loss_and_grads(mode: str) -> None:
    m = make_model("llama", mode=mode, attn="sdpa").train()
    b = batch(m.cfg)
    loss, metrics = m.forward_train(**b)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.vision.parameters() if p.requires_grad)
    assert m.proprio_projector[0].weight.grad is not None and m.suffix_embed.grad is not None
    if mode == "ar":
        assert 0.0 <= metrics["token_acc"] <= 1.0
        assert float(loss.detach()) == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.2)


def test_early_exit_loss_is_the_shallow_layers_token_ce() -> None:
    """loss = CE(final) + w * mean_l CE(head(norm(h_l))), with h_l the action rows after layer l computed here by
    running the first l + 1 layers by hand; a layer's CE reaches its parameters only through the exit loss."""
    m = make_model("llama", mode="ar", attn="sdpa").train()
    b = batch(m.cfg)
    base, mb = m.forward_train(**b)
    loss, me = m.forward_train(**b, exit_loss_layers=(0,), exit_loss_weight=0.5)
    assert me["ce"] == pytest.approx(mb["ce"]) and "acc_l0" in me and 0.0 <= me["acc_l0"] <= 1.0
    cfg = m.cfg
    B = b["images"].shape[0]
    bins = m.head.tokenize(b["actions"]).reshape(B, -1)
    prefix = m.embed_prefix(b["images"], b["state"], b["text_ids"])
    h = torch.cat([prefix, m.suffix_inputs(B, prefix.dtype, bins)], 1)
    pos, kinds, valid = m.layout(B, b["text_valid"], h.device)
    out, _ = m.forward_layers(h, pos, kinds, valid, exit_policy=_StopAfter(0))
    lg = m.head(out[:, -cfg.n_suffix:])
    ce0 = float(nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), bins.reshape(-1)).detach())
    assert me["exit_ce"] == pytest.approx(ce0, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(mb["ce"] + 0.5 * ce0, rel=1e-4)
    # the exit loss reaches layer 0's weights through layer 0's own logits: a different gradient there
    base.backward()
    g0 = m.decoder.layers[0].mlp.down_proj.weight.grad.clone()
    m.zero_grad()
    loss.backward()
    assert not torch.allclose(m.decoder.layers[0].mlp.down_proj.weight.grad, g0)
    with pytest.raises(UserError, match="layers must be in"):
        m.forward_train(**b, exit_loss_layers=(m.n_layers - 1,), exit_loss_weight=0.5)


def test_parallel_early_exit_loss_is_the_shallow_layers_chunk_l1() -> None:
    """Parallel mode: loss = L1(final) + w * mean_l L1(head(norm(h_l))), the chunk parallel-mode early exit decodes
    after layer l, checked against a forward stopped after layer 0 by hand."""
    m = make_model("llama", mode="parallel", attn="sdpa").train()
    b = batch(m.cfg)
    _, mb = m.forward_train(**b)
    loss, me = m.forward_train(**b, exit_loss_layers=(0,), exit_loss_weight=0.5)
    assert me["l1"] == pytest.approx(mb["l1"]) and "exit_ce" not in me
    B = b["images"].shape[0]
    prefix = m.embed_prefix(b["images"], b["state"], b["text_ids"])
    h = torch.cat([prefix, m.suffix_inputs(B, prefix.dtype)], 1)
    pos, kinds, valid = m.layout(B, b["text_valid"], h.device)
    out, _ = m.forward_layers(h, pos, kinds, valid, exit_policy=_StopAfter(0))
    l1_0 = float(ParallelActionHead.loss(m.head(out[:, -m.cfg.n_suffix:]), b["actions"], b["action_mask"]).detach())
    assert me["l1_l0"] == pytest.approx(l1_0, rel=1e-4) and me["exit_l1"] == pytest.approx(l1_0, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(mb["l1"] + 0.5 * l1_0, rel=1e-4)
    assert l1_0 != pytest.approx(mb["l1"], rel=1e-3)  # layer 0's chunk is not the final one


class _StopAfter(NoExit):
    def __init__(self, layer: int) -> None:
        self.layer = layer

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: object) -> bool:
        return layer_idx == self.layer


def test_parallel_head_shapes_and_l1_loss() -> None:
    head = ParallelActionHead(hidden=16, tokens_per_action=7, action_dim=7, chunk_size=8, head_hidden=32)
    with torch.no_grad():
        pred = head(torch.randn(2, 56, 16))
    assert pred.shape == (2, 8, 7)
    tgt = pred.detach().clone()
    assert float(ParallelActionHead.loss(pred, tgt)) == 0.0
    tgt[:, -1] += 1.0
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert float(ParallelActionHead.loss(pred, tgt, mask)) == pytest.approx(1.0 / 8, rel=1e-5)
    mask[:, -1] = False  # steps past the episode end do not count
    assert float(ParallelActionHead.loss(pred, tgt, mask)) == 0.0


def test_ar_head_bins_round_trip_and_loss() -> None:
    head = ARActionHead(hidden=16, n_bins=256)
    a = torch.linspace(-1, 1, 1001)
    bins = head.tokenize(a)
    assert int(bins.min()) == 0 and int(bins.max()) == 255
    assert float((head.detokenize(bins) - a).abs().max()) <= 1.0 / 256 + 1e-6
    assert torch.equal(head.tokenize(head.detokenize(torch.arange(256))), torch.arange(256))
    logits = torch.full((1, 3, 256), -20.0)
    tgt = torch.tensor([[5, 100, 255]])
    logits[0, torch.arange(3), tgt[0]] = 20.0
    assert float(ARActionHead.loss(logits, tgt)) < 1e-6
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 256)


def test_word_tokenizer_round_trip(tmp_path: object) -> None:
    from pathlib import Path

    instr = ["pick up the alphabet soup and place it in the basket", "Lift the red cube.", "reach the red target"]
    tok = WordTokenizer.from_instructions(instr)
    for s in instr:
        ids = tok.encode(s)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == normalize(s)
    assert tok.encode("lift the purple cube")[2] == tok.unk_id
    tok.save(Path(str(tmp_path)))
    tok2 = WordTokenizer.load(Path(str(tmp_path)) / "vla_tokenizer.json")
    assert tok2.itos == tok.itos and tok2.encode(instr[0]) == tok.encode(instr[0])


def test_config_validation() -> None:
    with pytest.raises(UserError):
        tiny_cfg(mode="diffusion")
    with pytest.raises(UserError):
        tiny_cfg(image_size=20)
    with pytest.raises(UserError):
        tiny_cfg(heads=4, kv_heads=3)
    c = tiny_cfg()
    assert VLAConfig.from_dict(c.to_dict()) == c
    assert c.n_visual == 2 * 4 and c.seq_len == 1 + 8 + 1 + 5 + 3


def test_proprio_dims_hide_the_other_state_dims() -> None:
    with pytest.raises(UserError, match="proprio_dims"):
        tiny_cfg(proprio_dims=[6, 8])
    with pytest.raises(UserError, match="proprio_dims"):
        tiny_cfg(proprio_dims=[6, 6])
    c = tiny_cfg(proprio_dims=[6, 7])
    assert VLAConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # survives the config.json round trip
    torch.manual_seed(0)
    m = VLAModel(c).eval()
    b = batch(c)
    ref = m.embed_prefix(b["images"], b["state"], b["text_ids"])
    moved = b["state"].clone()
    moved[:, :6] += 0.7  # the eef pose the model must not see
    torch.testing.assert_close(m.embed_prefix(b["images"], moved, b["text_ids"]), ref, rtol=0, atol=0)
    grip = b["state"].clone()
    grip[:, 7] += 0.7  # a dim it does see
    assert not torch.allclose(m.embed_prefix(b["images"], grip, b["text_ids"]), ref)
    torch.manual_seed(0)
    full = VLAModel(tiny_cfg()).eval()  # same weights, all dims seen: the eef pose does move the proprio token
    assert not torch.allclose(full.embed_prefix(b["images"], moved, b["text_ids"]),
                              full.embed_prefix(b["images"], b["state"], b["text_ids"]))


@pytest.mark.parametrize("batch", [1, 3])
def test_cut_gathers_the_same_mask_and_rotary_a_rebuild_gives(batch: int) -> None:
    """A pruning cut takes the kept rows/columns of the current mask and rotary tables; they equal the ones
    built from the kept tokens' positions (gapped positions, a bidirectional suffix, an invalid token)."""
    from vla_runtime.policies.vla.modeling import (KIND_SUFFIX, KIND_TEXT, KIND_VISUAL, build_attention_mask,
                                                   gather_mask, gather_rotary)

    g = torch.Generator().manual_seed(batch)
    N = 20
    kinds = torch.tensor([KIND_TEXT] + [KIND_VISUAL] * 12 + [KIND_TEXT] * 4 + [KIND_SUFFIX] * 3)[None].repeat(batch, 1)
    pos = torch.arange(N)[None].repeat(batch, 1)
    valid = torch.ones(batch, N, dtype=torch.bool)
    valid[-1, 14] = False
    mask = build_attention_mask(pos, kinds, pos, kinds, valid, True, torch.bfloat16)
    keep = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(12, generator=g)[:5].sort().values,
                                   torch.arange(13, N)]) for _ in range(batch)])
    kp, kk, kv = (t.gather(1, keep) for t in (pos, kinds, valid))
    torch.testing.assert_close(gather_mask(mask, keep),
                               build_attention_mask(kp, kk, kp, kk, kv, True, torch.bfloat16), rtol=0, atol=0)
    cos, sin = torch.randn(batch, N, 8, generator=g), torch.randn(batch, N, 8, generator=g)
    gc, gs = gather_rotary((cos, sin), keep)
    for t, gt in ((cos, gc), (sin, gs)):
        torch.testing.assert_close(gt, torch.stack([t[b, keep[b]] for b in range(batch)]), rtol=0, atol=0)


def test_the_uncut_mask_and_rotary_tables_are_reused_only_for_identical_metadata() -> None:
    """Inference reuses the full sequence's mask/rotary tables when positions, kinds and validity are the same
    as the last call (same outputs as a fresh build); any change rebuilds them."""
    from vla_runtime.policies.vla.modeling import KIND_SUFFIX, KIND_TEXT, KIND_VISUAL

    model = make_model(attn="sdpa")
    N = 10
    h = torch.randn(1, N, model.hidden)
    pos = torch.arange(N)[None]
    kinds = torch.tensor([[KIND_TEXT] + [KIND_VISUAL] * 4 + [KIND_TEXT] * 3 + [KIND_SUFFIX] * 2])
    valid = torch.ones(1, N, dtype=torch.bool)
    with torch.no_grad():
        m1, pe1 = model._initial_tables(h, pos, kinds, valid, True)
        m2, pe2 = model._initial_tables(h, pos.clone(), kinds.clone(), valid.clone(), True)
        assert m2 is m1 and pe2[0] is pe1[0]
        valid2 = valid.clone()
        valid2[0, 6] = False
        m3, _ = model._initial_tables(h, pos, kinds, valid2, True)
        assert m3 is not m1 and not torch.equal(m3, m1)
        m4, _ = model._initial_tables(h, pos, kinds, valid, False)  # causal suffix: another mask
        assert not torch.equal(m4, m1)
        out1, _ = model.forward_layers(h, pos, kinds, valid)
        out2, _ = model.forward_layers(h, pos, kinds, valid)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
