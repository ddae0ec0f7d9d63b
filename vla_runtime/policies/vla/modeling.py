"""The VLA model: stock `transformers` vision tower and decoder, driven by a layer loop this package owns.

Why our own loop: token pruning (SpecPrune, VLA-Cache) and early exit (SpecEE, DeeR) must change *which tokens*
enter a layer and *whether the next layer runs*. Instead of forking modelling code per technique, the loop calls
each stock decoder layer with explicit position ids, rotary embeddings computed from the kept positions and a 4D
mask built from those positions, and asks two strategy hooks what to do:

    TokenPruner.before_layer(layer_idx, ctx) -> kept indices (B, K) into the current tokens, or None
    ExitPolicy.after_layer(layer_idx, hidden, ctx) -> True to stop after this layer

With no strategy the loop computes exactly what the stock `model(inputs_embeds=..., position_ids=...)` computes
(tests/test_vla_model.py proves it).

transformers 5.x facts this relies on: decoder layers take `position_embeddings=(cos, sin)` from
`model.rotary_emb(h, position_ids)` and return a tensor; a 4D additive mask is used as given; attention weights
are only returned by the "eager" implementation, so layers whose attention a strategy needs run eager.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.cuda_graphs import has_hooks
from vla_runtime.policies.vla.heads import ARActionHead, ParallelActionHead
from vla_runtime.policies.vla.lean_layers import is_lean

# token kinds (StepContext.kinds)
KIND_BOS, KIND_VISUAL, KIND_PROPRIO, KIND_TEXT, KIND_SUFFIX = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------------------
# strategy hooks
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What strategies see during one forward pass.

    positions/kinds/valid describe the tokens currently kept (B, N); `attentions[l]` holds layer l's attention
    weights (B, H, Q, N) when a strategy listed l in its `attention_layers`; `memory` is per-episode state the
    policy keeps across steps (previous kept indices, previous frames...), cleared by `reset()`.
    """

    n_layers: int
    mode: str
    positions: torch.Tensor | None = None  # (B, N) long
    kinds: torch.Tensor | None = None  # (B, N) long, KIND_*
    valid: torch.Tensor | None = None  # (B, N) bool (False: padding, masked as key)
    layer_idx: int = -1
    images: torch.Tensor | None = None  # (B, C, 3, H, W) in [-1, 1], the frames this step
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. controller mode "fine"/"coarse", last actions
    tokens_per_layer: list[int] = field(default_factory=list)
    visual_per_layer: list[int] = field(default_factory=list)
    exit_layer: int = -1  # number of layers run in the last loop (n_layers when no exit)
    decode_step: int = -1  # AR: -1 during prefill, i >= 0 for the i-th generated token


class TokenPruner(Protocol):
    """Optional attribute `call_layers: frozenset[int]`: the only layers whose `before_layer` may act (return
    indices or keep state); with CUDA graphs the loop then runs the layers between them as one graph and calls
    `before_layer` only there. Without it, every layer is called (and graphed on its own).

    Optional attribute `early_cuts: bool`: True if `before_layer(j)` needs nothing from layer j - 1 beyond what
    its attention pre-hooks / q-k probes see (never its output rows, nor its captured attention). The loop may
    then call it from inside layer j - 1, once the keys and queries exist, and finish that layer only for the
    rows kept (CPU lean layers; exact: each kept row gets the value the full layer gives it)."""

    attention_layers: frozenset[int]

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        """Indices (B, K), ascending, into the current tokens to keep from this layer on; None keeps all.
        Suffix tokens (action queries / action tokens) must be kept."""


class ExitPolicy(Protocol):
    """Optional attribute `check_layers: frozenset[int]`: the only layers after which `after_layer` may act
    (as `TokenPruner.call_layers`)."""

    attention_layers: frozenset[int]

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        """True to stop after layer `layer_idx` (the head then reads the final-normed hidden state)."""


class NoPruner:
    """Keeps every token (the default)."""

    attention_layers: frozenset[int] = frozenset()
    call_layers: frozenset[int] = frozenset()

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        return None


class NoExit:
    """Runs every layer (the default)."""

    attention_layers: frozenset[int] = frozenset()
    check_layers: frozenset[int] = frozenset()

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        return False


class HiddenTap(NoExit):
    """Exit policy that never exits and keeps the last `n_last` rows' hidden states after the given layers
    (training: the early-exit loss reads the action tokens' states at intermediate layers)."""

    def __init__(self, layers: Sequence[int], n_last: int) -> None:
        self.layers, self.n_last = frozenset(int(l) for l in layers), int(n_last)
        self.hidden: dict[int, torch.Tensor] = {}

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        if layer_idx in self.layers:
            self.hidden[layer_idx] = hidden[:, -self.n_last:]
        return False


class RandomVisualDrop:
    """Training-time pruner: before `layer`, keep a random fraction of visual tokens per sample.

    Makes training cheaper (fewer tokens in most layers) and teaches the model to act from a subset of patches,
    which is what inference-time pruning later asks of it.
    """

    attention_layers: frozenset[int] = frozenset()

    def __init__(self, layer: int, keep_frac: float, generator: torch.Generator | None = None) -> None:
        if not 0.0 < keep_frac <= 1.0:
            raise UserError(f"keep fraction must be in (0, 1], got {keep_frac}")
        self.layer, self.keep_frac, self.gen = layer, keep_frac, generator
        self.call_layers = frozenset({layer})

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        if layer_idx != self.layer or self.keep_frac >= 1.0:
            return None
        assert ctx.kinds is not None
        is_vis = ctx.kinds == KIND_VISUAL  # (B, N)
        nv = int(is_vis[0].sum())
        k = max(1, int(round(nv * self.keep_frac)))
        # drawn on the generator's device (a CPU generator stays reproducible for a model on the GPU)
        gdev = self.gen.device if self.gen is not None else is_vis.device
        score = torch.rand(is_vis.shape, generator=self.gen, device=gdev).to(is_vis.device)
        return keep_top_visual(score, is_vis, k)


def keep_top_visual(prio: torch.Tensor, is_vis: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, n_other + k), ascending, into the current tokens: every non-visual token and the k visual
    tokens with the highest `prio` (B, N) per sample (what the training-time drops return from `before_layer`)."""
    prio = torch.where(is_vis, prio, torch.full_like(prio, float("inf")))  # non-visual always kept
    return prio.topk(int((~is_vis[0]).sum()) + k, dim=1).indices.sort(dim=1).values


class AttentionVisualDrop:
    """Training-time pruner shaped like SpecPrune's kept sets (SPECPRUNE.md "Session 13").

    Before `layer`, keep `keep_frac` of the visual tokens per sample: the top `att_frac` of that count by the
    attention they received at layer `score_layer` from the text tokens (heads and rows averaged, as SpecPrune's
    local score), the rest a random draw (standing in for the history / frame-difference tiers, which this step's
    attention does not rank). Then before each of `dynamic_layers` keep the top `dynamic_keep` of the remaining
    visual tokens by the same score, never fewer than `floor`. A model trained on random drops only is in
    distribution for a random pruner, not for an attention-chosen one; mixing these batches in makes it both.
    """

    def __init__(self, layer: int, keep_frac: float, att_frac: float = 0.5, dynamic_layers: Sequence[int] = (),
                 dynamic_keep: float = 0.8, floor: int = 16, score_layer: int = 0,
                 generator: torch.Generator | None = None) -> None:
        if not 0.0 < keep_frac <= 1.0:
            raise UserError(f"keep fraction must be in (0, 1], got {keep_frac}")
        if not 0.0 <= att_frac <= 1.0 or not 0.0 < dynamic_keep <= 1.0:
            raise UserError(f"att_frac must be in [0, 1] and dynamic_keep in (0, 1], got {att_frac}, {dynamic_keep}")
        if score_layer >= layer or any(l <= layer for l in dynamic_layers):
            raise UserError(f"score layer {score_layer} must come before the drop layer {layer}, and the dynamic "
                            f"layers {tuple(dynamic_layers)} after it")
        self.layer, self.keep_frac, self.att_frac, self.gen = layer, keep_frac, att_frac, generator
        self.dynamic_layers, self.dynamic_keep, self.floor = frozenset(dynamic_layers), dynamic_keep, floor
        self.score_layer = score_layer
        self.attention_layers = frozenset({score_layer})
        self.call_layers = frozenset({layer}) | self.dynamic_layers
        self._score: torch.Tensor | None = None  # (B, N) importance of the current tokens

    def _text_to_all(self, ctx: StepContext) -> torch.Tensor:
        """(B, N) mean attention each current token received from the text tokens at `score_layer`."""
        attn = ctx.attentions[self.score_layer].detach().float()  # (B, H, Q, N), prefill: Q = N
        assert ctx.kinds is not None and ctx.valid is not None
        rows = (ctx.kinds[0] == KIND_TEXT) & ctx.valid.all(0)  # padded instruction slots do not vote
        if not bool(rows.any()):
            rows = ctx.kinds[0] != KIND_VISUAL
        return attn[:, :, rows].mean(dim=(1, 2))

    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        assert ctx.kinds is not None
        is_vis = ctx.kinds == KIND_VISUAL  # (B, N)
        nv = int(is_vis[0].sum())
        if layer_idx == self.layer:
            k = max(1, int(round(nv * self.keep_frac)))
            k_att = int(round(k * self.att_frac))
            imp = self._text_to_all(ctx)
            gdev = self.gen.device if self.gen is not None else is_vis.device
            prio = torch.rand(is_vis.shape, generator=self.gen, device=gdev).to(is_vis.device)
            if k_att > 0:  # the attention top k_att rank above every random draw
                top = torch.where(is_vis, imp, torch.full_like(imp, -1.0)).topk(k_att, dim=1).indices
                prio.scatter_(1, top, 2.0)
            idx = keep_top_visual(prio, is_vis, k)
            self._score = imp.gather(1, idx)
            return idx
        if layer_idx in self.dynamic_layers and self._score is not None:
            k = min(nv, max(self.floor, int(math.ceil(nv * self.dynamic_keep))))
            if k >= nv:
                return None
            idx = keep_top_visual(self._score, is_vis, k)
            self._score = self._score.gather(1, idx)
            return idx
        return None


# ---------------------------------------------------------------------------------------------------------------
# a per-layer KV cache, duck-typed to what stock attention calls (`update(k, v, layer_idx)`)
# ---------------------------------------------------------------------------------------------------------------
class LayerKVCache:
    """Keys/values (after rotary) per layer plus the positions/validity of the cached keys.

    Our own (not transformers' DynamicCache) because layers may hold different token sets: a pruner drops
    tokens from some layer on, and an exit policy may stop before the deep layers see a token.
    """

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: list[torch.Tensor | None] = [None] * n_layers  # (B, Nk)
        self.kind: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kw: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value (B, Hkv, Q, hd) -> all cached (B, Hkv, Nk + Q, hd) for this layer."""
        k0, v0 = self.k[layer_idx], self.v[layer_idx]
        if k0 is not None and v0 is not None:
            key, value = torch.cat([k0, key], dim=2), torch.cat([v0, value], dim=2)
        self.k[layer_idx], self.v[layer_idx] = key, value
        return key, value

    def key_meta(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        p = self.pos[layer_idx]
        if p is None:
            return None
        kd, vl = self.kind[layer_idx], self.valid[layer_idx]
        assert kd is not None and vl is not None
        return p, kd, vl

    def add_meta(self, layer_idx: int, pos: torch.Tensor, kind: torch.Tensor, valid: torch.Tensor) -> None:
        if self.pos[layer_idx] is None:
            self.pos[layer_idx], self.kind[layer_idx], self.valid[layer_idx] = pos, kind, valid
        else:
            self.pos[layer_idx] = torch.cat([self.pos[layer_idx], pos], 1)  # type: ignore[list-item]
            self.kind[layer_idx] = torch.cat([self.kind[layer_idx], kind], 1)  # type: ignore[list-item]
            self.valid[layer_idx] = torch.cat([self.valid[layer_idx], valid], 1)  # type: ignore[list-item]

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Cast every cached key/value (e.g. a bf16 prefill's cache for float32 decoding)."""
        self.k = [None if t is None else t.to(dtype) for t in self.k]
        self.v = [None if t is None else t.to(dtype) for t in self.v]

    def seq_len(self, layer_idx: int) -> int:
        k = self.k[layer_idx]
        return 0 if k is None else int(k.shape[2])


# ---------------------------------------------------------------------------------------------------------------
# batch-1 decoding on the CPU
# ---------------------------------------------------------------------------------------------------------------
class SmallBatchLinear(nn.Linear):
    """An nn.Linear whose calls with few rows run in float32 on the CPU when its weight is bf16/fp16.

    Measured on this CPU (1 thread, 256 -> 768): a bf16 linear costs ~48 us for 1 row and ~100 us for 162 rows,
    fp32 ~15 us and ~390 us. The prefill (many rows) is fastest in bf16, AR decoding (1 row, plus the lazy KV
    fill's few pending rows) in fp32. Float32 inputs (VLAModel.decode_fp32) and calls with at most `max_rows`
    rows use a float32 copy of the weight (made on first use, remade when the weight changes) and return the
    input's dtype; everything else is nn.Linear.
    The class is swapped in place (`use_fp32_small_batch`), so parameters and state_dict keys do not change.
    """

    max_rows = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w.dtype == torch.float32 or w.device.type != "cpu"
                or (x.dtype != torch.float32 and x.numel() > self.max_rows * self.in_features)):
            return nn.functional.linear(x, w, self.bias)
        key = (w.data_ptr(), w._version, w.dtype)
        cached = self.__dict__.get("_fp32")
        if cached is None or cached[0] != key:
            b = None if self.bias is None else self.bias.detach().float()
            cached = (key, w.detach().float(), b)
            self.__dict__["_fp32"] = cached
        return nn.functional.linear(x.float(), cached[1], cached[2]).to(x.dtype)


def use_fp32_small_batch(module: nn.Module, enable: bool = True) -> int:
    """Swap every plain nn.Linear in module to SmallBatchLinear (enable) or back; returns how many changed."""
    n = 0
    for m in module.modules():
        if enable and type(m) is nn.Linear:
            m.__class__ = SmallBatchLinear
            n += 1
        elif not enable and type(m) is SmallBatchLinear:
            m.__class__ = nn.Linear
            m.__dict__.pop("_fp32", None)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------------------
_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` (transformers >= 5.25) or `past_key_values`
    (earlier 5.x; later versions only remap it, with a deprecation warning)."""
    t = type(layer)
    if t not in _CACHE_KWARG:
        import inspect

        params = inspect.signature(t.forward).parameters
        _CACHE_KWARG[t] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[t]


def build_attention_mask(q_pos: torch.Tensor, q_kind: torch.Tensor, k_pos: torch.Tensor, k_kind: torch.Tensor,
                         k_valid: torch.Tensor, bidirectional_suffix: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (B, 1, Q, K) from token positions, not from indices, so gaps left by dropped tokens
    do not change who sees whom. A query sees valid keys at positions <= its own; with
    `bidirectional_suffix` (parallel decoding) suffix tokens also see every other suffix token."""
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, Q, K)
    if bidirectional_suffix:
        allowed = allowed | ((q_kind == KIND_SUFFIX)[:, :, None] & (k_kind == KIND_SUFFIX)[:, None, :])
    allowed = allowed & k_valid[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, Q, K)


def gather_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows and columns of kept tokens keep (B, K) of an additive mask (B, 1, N, N): (B, 1, K, K)."""
    if mask.shape[0] == 1 and keep.shape[0] == 1:
        idx = keep[0]
        return mask.index_select(2, idx).index_select(3, idx)
    B, H = mask.shape[0], mask.shape[1]
    m = mask.expand(keep.shape[0], H, -1, -1) if B == 1 else mask
    m = m.gather(2, keep[:, None, :, None].expand(-1, H, -1, m.shape[3]))
    return m.gather(3, keep[:, None, None, :].expand(-1, H, m.shape[2], -1))


def gather_rotary(pe: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens' rows of the rotary tables (cos, sin), each (B, N, hd) -> (B, K, hd)."""
    out = []
    for t in pe:
        t = t.expand(keep.shape[0], -1, -1) if t.shape[0] == 1 else t
        out.append(t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1])))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# building stock modules from the config
# ---------------------------------------------------------------------------------------------------------------
def decoder_config(cfg: VLAConfig, attn_implementation: str = "sdpa") -> Any:
    """A stock transformers config for the decoder family (vocab = text vocab + action bins)."""
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=cfg.vocab_size + cfg.n_bins, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=max(2048, cfg.seq_len + 16),
                  rms_norm_eps=cfg.rms_norm_eps, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                  tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.decoder_family == "llama":
        c = LlamaConfig(**common, rope_parameters=rope)
    elif cfg.decoder_family == "qwen2":
        c = Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    else:
        c = GemmaConfig(**common, rope_parameters=rope)
    c._attn_implementation = attn_implementation
    return c


def build_decoder(cfg: VLAConfig, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import GemmaModel, LlamaModel, Qwen2Model

    cls = {"llama": LlamaModel, "qwen2": Qwen2Model, "gemma": GemmaModel}[cfg.decoder_family]
    return cls(decoder_config(cfg, attn_implementation))


def build_vision(cfg: VLAConfig) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vc = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)
    vc._attn_implementation = "sdpa"
    return SiglipVisionModel(vc)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def check_decoder(decoder: nn.Module) -> None:
    """The loop needs `layers`, `rotary_emb`, `norm`, `embed_tokens` and no sliding-window layers."""
    for name in ("layers", "rotary_emb", "norm", "embed_tokens"):
        if not hasattr(decoder, name):
            raise UserError(f"decoder {type(decoder).__name__} has no `{name}`: not a stock Llama-style decoder")
    types = getattr(decoder.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise UserError("decoders with sliding-window / non-full attention layers are not supported by the loop")


# ---------------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------------
class VLAModel(nn.Module):
    """vision tower -> projector -> [BOS, visual, proprio, text, suffix] -> decoder layer loop -> action head."""

    def __init__(self, cfg: VLAConfig, decoder: nn.Module | None = None, vision: nn.Module | None = None,
                 bos_id: int = 1, action_token_offset: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else build_vision(cfg)
        self.decoder = decoder if decoder is not None else build_decoder(cfg)
        check_decoder(self.decoder)
        d = int(self.decoder.config.hidden_size)
        vis_d = int(self.vision.config.hidden_size)
        self.hidden = d
        self.projector = _mlp(vis_d, d)
        self.proprio_projector = _mlp(cfg.state_dim, d)
        self.bos_id = bos_id
        vocab = int(self.decoder.config.vocab_size)
        self.action_token_offset = vocab - cfg.n_bins if action_token_offset is None else action_token_offset
        if not 0 <= self.action_token_offset <= vocab - cfg.n_bins:
            raise UserError(f"action token offset {self.action_token_offset} out of the vocabulary ({vocab})")
        self.layer_graphs: Any = None  # a cuda_graphs.LayerGraphs replays decoder layers on CUDA (set by VLAPolicy)
        self.decode_fp32 = False  # AR decode steps in float32 after a bf16 prefill, on the CPU (set by VLAPolicy)
        n_learned = cfg.n_suffix if cfg.mode == "parallel" else 1  # queries, or the ACT_START token
        self.suffix_embed = nn.Parameter(torch.randn(n_learned, d) * 0.02)
        self.head: nn.Module
        if cfg.mode == "parallel":
            self.head = ParallelActionHead(d, cfg.tokens_per_action, cfg.action_dim, cfg.chunk_size, cfg.head_hidden,
                                           cfg.head_blocks)
        else:
            self.head = ARActionHead(d, cfg.n_bins)

    @property
    def n_layers(self) -> int:
        return len(self.decoder.layers)

    # ---- embeddings -------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, 3, H, W) in [-1, 1] -> projected visual tokens (B, C * P, D)."""
        B, C = images.shape[:2]
        dt = self.projector[0].weight.dtype
        x = images.flatten(0, 1).to(dt)

        def encode(px: torch.Tensor) -> torch.Tensor:
            return self.projector(self.vision(pixel_values=px).last_hidden_state)  # (B*C, P, D)

        lg = self.layer_graphs
        if lg is not None and not torch.is_grad_enabled():
            proj = lg.run_callable("vision", (self.vision, self.projector), encode, x)
        else:
            proj = encode(x)
        return proj.reshape(B, -1, proj.shape[-1])

    def layout(self, B: int, text_valid: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """positions, kinds, valid (B, seq_len) of the full layout (see VLAConfig)."""
        cfg = self.cfg
        kinds = torch.cat([torch.tensor([KIND_BOS]), torch.full((cfg.n_visual,), KIND_VISUAL),
                           torch.tensor([KIND_PROPRIO]), torch.full((cfg.max_text_len,), KIND_TEXT),
                           torch.full((cfg.n_suffix,), KIND_SUFFIX)]).to(device)
        kinds = kinds[None].expand(B, -1)
        pos = torch.arange(cfg.seq_len, device=device)[None].expand(B, -1)
        valid = torch.ones(B, cfg.seq_len, dtype=torch.bool, device=device)
        t0 = 2 + cfg.n_visual
        valid = torch.cat([valid[:, :t0], text_valid.to(device).bool(), valid[:, t0 + cfg.max_text_len:]], 1)
        return pos, kinds, valid

    def embed_prefix(self, images: torch.Tensor, state: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """images (B, C, 3, H, W), state (B, S) normalised, text_ids (B, T) padded -> (B, prefix_len, D)."""
        B = images.shape[0]
        emb = self.decoder.embed_tokens
        dev = text_ids.device
        bos = emb(torch.full((B, 1), self.bos_id, dtype=torch.long, device=dev))  # (B, 1, D)
        vis = self.encode_images(images)  # (B, Nv, D)
        if self.cfg.proprio_dims is not None:  # the dims the model does not see are zeroed (config, not input)
            keep = torch.zeros(state.shape[-1], dtype=state.dtype, device=state.device)
            keep[list(self.cfg.proprio_dims)] = 1
            state = state * keep
        prop = self.proprio_projector(state.to(vis.dtype))[:, None]  # (B, 1, D)
        txt = emb(text_ids)  # (B, T, D)
        dt = vis.dtype
        return torch.cat([bos.to(dt), vis, prop, txt.to(dt)], 1)

    def embed_action_tokens(self, bins: torch.Tensor) -> torch.Tensor:
        """AR: bin ids (B, n) -> token embeddings (B, n, D)."""
        return self.decoder.embed_tokens(bins + self.action_token_offset)

    def suffix_inputs(self, B: int, dtype: torch.dtype, target_bins: torch.Tensor | None = None) -> torch.Tensor:
        """Parallel: the learned queries. AR: ACT_START followed by the teacher-forced tokens (training)."""
        s = self.suffix_embed.to(dtype)[None].expand(B, -1, -1)
        if self.cfg.mode == "parallel" or target_bins is None:
            return s
        return torch.cat([s, self.embed_action_tokens(target_bins[:, :-1]).to(dtype)], 1)

    # ---- the layer loop ---------------------------------------------------------------------------------------
    def forward_layers(self, h: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, valid: torch.Tensor, *,
                       pruner: TokenPruner | None = None, exit_policy: ExitPolicy | None = None,
                       ctx: StepContext | None = None, cache: LayerKVCache | None = None,
                       bidirectional_suffix: bool | None = None, final_norm: bool = True
                       ) -> tuple[torch.Tensor, StepContext]:
        """Run the decoder layers over tokens h (B, N, D) at `positions` (B, N).

        Returns the (final-normed) hidden states of the tokens still kept at the end (B, K, D) and the context,
        whose positions/kinds/valid describe those K tokens, tokens_per_layer the count entering each layer run,
        and exit_layer the number of layers run. With `cache`, keys/values are appended per layer and queries also
        attend to the cached keys (AR decoding).
        """
        dec = self.decoder
        pruner = pruner or NoPruner()
        exit_policy = exit_policy or NoExit()
        if ctx is None:
            ctx = StepContext(n_layers=self.n_layers, mode=self.cfg.mode)
        if bidirectional_suffix is None:
            bidirectional_suffix = self.cfg.mode == "parallel"
        want_attn = set(pruner.attention_layers) | set(exit_policy.attention_layers)
        ctx.positions, ctx.kinds, ctx.valid = positions, kinds, valid
        ctx.tokens_per_layer, ctx.visual_per_layer = [], []
        mask: torch.Tensor | None = None
        pe: tuple[torch.Tensor, torch.Tensor] | None = None
        if cache is None and not torch.is_grad_enabled():
            # the full sequence's mask and rotary tables are the same at every step of an episode (same layout,
            # same instruction): reuse the last ones when the token metadata is identical
            mask, pe = self._initial_tables(h, positions, kinds, valid, bidirectional_suffix)
        n_run = 0
        n_visual: int | None = None  # counted when the token set changes, not per layer: a count is a device sync
        lg = self.layer_graphs
        layers = list(dec.layers)
        n_layers = len(layers)
        barriers: set[int] | None = None  # layers where a graphed segment must end before (None: no segments)
        solo: set[int] = set()  # layers that must run on their own (attention capture, hooks)
        if lg is not None and cache is None and lg.usable((), h):
            calls = getattr(pruner, "call_layers", None)
            checks = getattr(exit_policy, "check_layers", None)
            if calls is not None and checks is not None:
                solo = set(want_attn) | {j for j in range(n_layers) if has_hooks(layers[j])}
                barriers = set(calls) | {j + 1 for j in checks} | solo  # where a strategy acts, and the solo layers
        early_cuts = bool(getattr(pruner, "early_cuts", False)) and cache is None and barriers is None
        call_layers = getattr(pruner, "call_layers", None)
        decided = -1  # a layer whose before_layer already ran inside the previous layer (early cut)

        def cut_tables(keep: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, valid: torch.Tensor,
                       mask: torch.Tensor | None, pe: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Any, ...]:
            """The kept tokens' metadata, mask and rotary tables. Mask and rotary depend on each token's own
            position/kind/validity only, so the kept rows (and columns) of the current ones are exact; with a KV
            cache the mask is rebuilt per layer anyway."""
            positions, kinds, valid = (t.gather(1, keep) for t in (positions, kinds, valid))
            mask = gather_mask(mask, keep) if mask is not None and cache is None else None
            pe = gather_rotary(pe, keep) if pe is not None else None
            return positions, kinds, valid, mask, pe

        def check_keep(keep: torch.Tensor) -> torch.Tensor:
            keep = keep.to(h.device)
            if keep.ndim != 2 or keep.shape[0] != h.shape[0]:
                raise ValueError(f"pruner must return (B, K) indices, got {tuple(keep.shape)}")
            return keep

        i = 0
        while i < n_layers:
            layer = layers[i]
            ctx.layer_idx = i
            keep = pruner.before_layer(i, ctx) if decided != i else None
            if keep is not None:
                keep = check_keep(keep)
                h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
                positions, kinds, valid, mask, pe = cut_tables(keep, positions, kinds, valid, mask, pe)
                ctx.positions, ctx.kinds, ctx.valid = positions, kinds, valid
                n_visual = None
            if pe is None:
                pe = dec.rotary_emb(h, position_ids=positions)
            meta = cache.key_meta(i) if cache is not None else None
            layer_mask: torch.Tensor | None
            if meta is not None and h.shape[1] == 1 and bool(meta[2].all()) and bool(valid.all()):
                layer_mask = None  # one new token after valid cached keys (all earlier positions): sees them all
            elif meta is not None:  # keys = cached + new, mask per layer (layers may hold different token sets)
                kp, kk, kv = meta
                layer_mask = build_attention_mask(positions, kinds, torch.cat([kp, positions], 1),
                                                  torch.cat([kk, kinds], 1), torch.cat([kv, valid], 1),
                                                  bidirectional_suffix, h.dtype)
            else:
                if mask is None:
                    mask = build_attention_mask(positions, kinds, positions, kinds, valid, bidirectional_suffix,
                                                h.dtype)
                layer_mask = mask
            if cache is not None:
                cache.add_meta(i, positions, kinds, valid)
            if n_visual is None:
                n_visual = int((kinds[0] == KIND_VISUAL).sum())
            end = i + 1
            if barriers is not None and i not in solo:
                while end < n_layers and end not in barriers:
                    end += 1
            for _ in range(i, end):
                ctx.tokens_per_layer.append(int(h.shape[1]))
                ctx.visual_per_layer.append(n_visual)
            early: dict[str, Any] = {}
            if end > i + 1:  # layers i..end-1 as one CUDA graph: nothing acts between them
                assert lg is not None
                h = lg.run(i, layers[i:end], h, layer_mask, pe, positions)
            elif (early_cuts and i + 1 < n_layers and layer_mask is not None and i not in want_attn
                  and (call_layers is None or (i + 1) in call_layers) and is_lean(layer)):
                # ask for layer i + 1's cut inside layer i, once its q/k (and the pruner's row scores) exist:
                # layer i then finishes only the rows kept after it (the same values, less MLP/attention work)
                def row_select(nxt: int = i + 1) -> torch.Tensor | None:
                    ctx.layer_idx = nxt
                    try:
                        k2 = pruner.before_layer(nxt, ctx)
                    finally:
                        ctx.layer_idx = nxt - 1
                    early["asked"] = True
                    early["keep"] = check_keep(k2) if k2 is not None else None
                    return early["keep"]

                h = self._run_layer(layer, h, layer_mask, pe, positions, cache, capture=False, ctx=ctx, i=i,
                                    row_select=row_select)
            else:
                h = self._run_layer(layer, h, layer_mask, pe, positions, cache, capture=(i in want_attn), ctx=ctx,
                                    i=i)
            if early.get("asked"):
                decided = i + 1
                k2 = early["keep"]
                if k2 is not None:  # h already holds only the kept rows
                    positions, kinds, valid, mask, pe = cut_tables(k2, positions, kinds, valid, mask, pe)
                    ctx.positions, ctx.kinds, ctx.valid = positions, kinds, valid
                    n_visual = None
            n_run = end
            i = end
            if exit_policy.after_layer(end - 1, h, ctx):
                break
        ctx.exit_layer = n_run
        if final_norm:
            h = dec.norm(h)
        return h, ctx

    def _initial_tables(self, h: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, valid: torch.Tensor,
                        bidirectional_suffix: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(mask, rotary tables) of the uncut sequence, cached on identical (positions, kinds, valid, dtype)."""
        key = (h.dtype, h.device, bool(bidirectional_suffix))
        c = self.__dict__.get("_tables")
        if (c is not None and c[0] == key and c[1].shape == positions.shape and torch.equal(c[1], positions)
                and torch.equal(c[2], kinds) and torch.equal(c[3], valid)):
            return c[4], c[5]
        mask = build_attention_mask(positions, kinds, positions, kinds, valid, bidirectional_suffix, h.dtype)
        pe = self.decoder.rotary_emb(h, position_ids=positions)
        self.__dict__["_tables"] = (key, positions.clone(), kinds.clone(), valid.clone(), mask, pe)
        return mask, pe

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, pe: tuple[torch.Tensor, torch.Tensor],
                   positions: torch.Tensor, cache: LayerKVCache | None, capture: bool, ctx: StepContext, i: int,
                   row_select: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
        kw: dict[str, Any] = dict(attention_mask=mask, position_embeddings=pe, position_ids=positions)
        if row_select is not None:  # only ever passed for a lean layer (see forward_layers)
            kw["row_select"] = row_select
        if cache is not None:
            kw.update({cache_kwarg(layer): cache, "use_cache": True})
        if not capture:
            lg = self.layer_graphs
            if lg is not None and cache is None and lg.usable(layer, h):
                return lg.run(i, [layer], h, mask, pe, positions)
            return layer(h, **kw)
        conf = layer.self_attn.config
        old = conf._attn_implementation
        captured: list[torch.Tensor] = []
        handle = layer.self_attn.register_forward_hook(lambda m, a, out: captured.append(out[1]))
        try:
            conf._attn_implementation = "eager"
            h = layer(h, **kw)
        finally:
            conf._attn_implementation = old
            handle.remove()
        ctx.attentions[i] = captured[0].detach()
        return h

    # ---- training ---------------------------------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, state: torch.Tensor, text_ids: torch.Tensor,
                      text_valid: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor,
                      pruner: TokenPruner | None = None, exit_loss_layers: Sequence[int] = (),
                      exit_loss_weight: float = 0.0,
                      aux: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for a batch. actions (B, chunk, A) normalised to [-1, 1]; action_mask (B, chunk) bool.

        aux: an auxiliary objective on the suffix tokens' final hidden states (B, n_suffix, D) -> (weighted loss,
        metrics), added to the action loss (e.g. the training-only object-position head of `train_vla --aux-loss`).

        With `exit_loss_layers` and `exit_loss_weight` w > 0 (an early-exit loss, as in LayerSkip), AR mode:
        loss = CE(final) + w * mean over those layers l of CE(head(norm(h_l))), the logits early exit reads at
        layer l, so that shallow layers already rank the right bin first and tokens can exit earlier; parallel mode:
        loss = L1(final) + w * mean over l of L1(head(norm(h_l))), the chunk parallel-mode early exit decodes after
        layer l (log: exit_l1, l1_l<i>).
        """
        cfg = self.cfg
        B = images.shape[0]
        prefix = self.embed_prefix(images, state, text_ids)
        target_bins = None
        if cfg.mode == "ar":
            assert isinstance(self.head, ARActionHead)
            target_bins = self.head.tokenize(actions).reshape(B, -1)  # (B, chunk*A)
        h = torch.cat([prefix, self.suffix_inputs(B, prefix.dtype, target_bins)], 1)
        pos, kinds, valid = self.layout(B, text_valid, h.device)
        tap = None
        if exit_loss_weight > 0 and exit_loss_layers:
            self.check_exit_loss_layers(exit_loss_layers)
            tap = HiddenTap(exit_loss_layers, cfg.n_suffix)
        out, ctx = self.forward_layers(h, pos, kinds, valid, pruner=pruner, exit_policy=tap)
        suf = out[:, -cfg.n_suffix:]  # suffix tokens are never dropped and come last
        aux_loss, aux_metrics = aux(suf) if aux is not None else (None, {})
        if cfg.mode == "parallel":
            pred = self.head(suf)
            loss = ParallelActionHead.loss(pred, actions, action_mask)
            metrics = {"l1": float(loss.detach()), **aux_metrics}
            if aux_loss is not None:
                loss = loss + aux_loss
            if tap is not None:  # the chunk that parallel-mode early exit decodes after layer l
                exit_l1s = []
                for l in sorted(tap.hidden):
                    el = ParallelActionHead.loss(self.head(self.decoder.norm(tap.hidden[l])), actions, action_mask)
                    exit_l1s.append(el)
                    metrics[f"l1_l{l}"] = float(el.detach())
                exit_l1 = torch.stack(exit_l1s).mean()
                metrics["exit_l1"] = float(exit_l1.detach())
                loss = loss + exit_loss_weight * exit_l1
            return loss, metrics
        assert target_bins is not None
        logits = self.head(suf)  # (B, chunk*A, n_bins)
        tok_mask = action_mask[:, :, None].expand(-1, -1, cfg.action_dim).reshape(B, -1)
        loss = ARActionHead.loss(logits, target_bins, tok_mask)
        n_tok = tok_mask.float().sum().clamp_min(1)

        def token_acc(lg: torch.Tensor) -> float:
            with torch.no_grad():
                return float(((lg.argmax(-1) == target_bins).float() * tok_mask).sum() / n_tok)

        metrics = {"ce": float(loss.detach()), "token_acc": token_acc(logits), **aux_metrics}
        if aux_loss is not None:
            loss = loss + aux_loss
        if tap is not None:
            exit_ces = []
            for l in sorted(tap.hidden):
                lg = self.head(self.decoder.norm(tap.hidden[l]))
                exit_ces.append(ARActionHead.loss(lg, target_bins, tok_mask))
                metrics[f"acc_l{l}"] = token_acc(lg)
            exit_ce = torch.stack(exit_ces).mean()
            metrics["exit_ce"] = float(exit_ce.detach())
            loss = loss + exit_loss_weight * exit_ce
        return loss, metrics

    def check_exit_loss_layers(self, layers: Sequence[int]) -> None:
        """The early-exit loss reads layers before the last one (the last one's logits are the main loss)."""
        bad = [l for l in layers if not 0 <= l < self.n_layers - 1]
        if bad:
            raise UserError(f"exit-loss-layers must be in [0, {self.n_layers - 2}], got {bad}")

    # ---- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, state: torch.Tensor, text_ids: torch.Tensor, text_valid: torch.Tensor,
                *, pruner: TokenPruner | None = None, exit_policy: ExitPolicy | None = None,
                ctx: StepContext | None = None, timings: dict[str, float] | None = None) -> tuple[torch.Tensor,
                                                                                                  StepContext]:
        """Normalised action chunk (B, chunk, A) for one observation batch.

        With B == 1 padding tokens are removed before the loop (positions keep their layout values, so the
        result equals the padded computation); `timings` receives vision_ms / decoder_ms / head_ms, and in AR
        mode also prefill_ms + decode_ms (= decoder_ms: the prefill pass and the one-token steps after it, the
        part early exit can shorten; SpecEE's speed-ups are decode-phase numbers).
        """
        import time

        cfg = self.cfg
        B = images.shape[0]
        if ctx is None:
            ctx = StepContext(n_layers=self.n_layers, mode=cfg.mode)
        ctx.images = images
        sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)  # honest split on async devices
        sync()
        t0 = time.perf_counter()
        prefix = self.embed_prefix(images, state, text_ids)
        sync()
        t1 = time.perf_counter()
        h = torch.cat([prefix, self.suffix_inputs(B, prefix.dtype)], 1)
        n_pre = cfg.prefix_len
        pos, kinds, valid = self.layout(B, text_valid, h.device)
        if cfg.mode == "ar":  # prefill ends at ACT_START
            h, pos, kinds, valid = h[:, :n_pre + 1], pos[:, :n_pre + 1], kinds[:, :n_pre + 1], valid[:, :n_pre + 1]
        if B == 1 and not bool(valid.all()):
            keep = valid[0].nonzero().squeeze(1)
            h, pos, kinds, valid = h[:, keep], pos[:, keep], kinds[:, keep], valid[:, keep]
        head_ms = 0.0
        if cfg.mode == "parallel":
            out, ctx = self.forward_layers(h, pos, kinds, valid, pruner=pruner, exit_policy=exit_policy, ctx=ctx)
            sync()
            t2 = time.perf_counter()
            actions = self.head(out[:, -cfg.n_suffix:]).float()
            sync()
            t3 = time.perf_counter()
            head_ms = (t3 - t2) * 1e3
        else:
            actions, ctx, head_ms, t_prefilled = self._generate(h, pos, kinds, valid, pruner, exit_policy, ctx, sync)
            sync()
            t3 = time.perf_counter()
        if timings is not None:
            timings["vision_ms"] = (t1 - t0) * 1e3
            timings["decoder_ms"] = (t3 - t1) * 1e3 - head_ms
            timings["head_ms"] = head_ms
            if cfg.mode == "ar":
                timings["prefill_ms"] = (t_prefilled - t1) * 1e3
                timings["decode_ms"] = timings["decoder_ms"] - timings["prefill_ms"]
        return actions, ctx

    def _generate(self, h: torch.Tensor, pos: torch.Tensor, kinds: torch.Tensor, valid: torch.Tensor,
                  pruner: TokenPruner | None, exit_policy: ExitPolicy | None, ctx: StepContext,
                  sync: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, StepContext, float, float]:
        """Greedy AR decoding of chunk*A action tokens with a per-layer KV cache. Returns the actions, the context,
        the head's ms and the perf_counter time at which the prefill pass ended (`sync`ed first)."""
        import time

        cfg = self.cfg
        assert isinstance(self.head, ARActionHead)
        B = h.shape[0]
        cache = LayerKVCache(self.n_layers)
        ctx.decode_step = -1
        out, ctx = self.forward_layers(h, pos, kinds, valid, pruner=pruner, exit_policy=exit_policy, ctx=ctx,
                                       cache=cache, bidirectional_suffix=False)
        if self.decode_fp32 and out.dtype != torch.float32 and out.device.type == "cpu":
            cache.to_dtype(torch.float32)  # batch-1 decoding is faster in float32 on the CPU (lean_layers.py)
            out = out.float()
        sync()
        t_prefilled = time.perf_counter()
        prefill_tokens = list(ctx.tokens_per_layer)
        exits = [ctx.exit_layer]
        head_s = 0.0
        bins: list[torch.Tensor] = []
        next_pos = int(cfg.prefix_len)  # position of ACT_START
        last = out[:, -1:]
        for step in range(cfg.n_action_tokens):
            t = time.perf_counter()
            b = self.head(last).argmax(-1)  # (B, 1)
            head_s += time.perf_counter() - t
            bins.append(b)
            if step == cfg.n_action_tokens - 1:
                break
            next_pos += 1
            ctx.decode_step = step
            x = self.embed_action_tokens(b).to(out.dtype)
            p = torch.full((B, 1), next_pos, dtype=torch.long, device=h.device)
            k = torch.full((B, 1), KIND_SUFFIX, dtype=torch.long, device=h.device)
            v = torch.ones(B, 1, dtype=torch.bool, device=h.device)
            last, ctx = self.forward_layers(x, p, k, v, pruner=None, exit_policy=exit_policy, ctx=ctx, cache=cache,
                                            bidirectional_suffix=False)
            exits.append(ctx.exit_layer)
        ctx.tokens_per_layer = prefill_tokens
        ctx.extra["decode_exit_layers"] = exits
        all_bins = torch.cat(bins, 1).reshape(B, cfg.chunk_size, cfg.action_dim)
        return self.head.detokenize(all_bins), ctx, head_s * 1e3, t_prefilled


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
