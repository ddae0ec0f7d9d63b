"""Lean inference forwards for stock Llama / Qwen2 decoder layers on the CPU.

A small decoder on a CPU is bound by per-op overhead, not arithmetic: one stock `LlamaDecoderLayer` call is ~30
torch ops and a dozen Python module calls (the attention-interface lookup, hub-kernel wrappers, the deprecation
wrapper, repeat_kv, RMSNorm's casts), and a bf16 linear has a fixed cost of ~25-30 us on this CPU whatever its
rows. This module computes the same layer with the same weights in ~15 ops: q/k/v in one matmul and gate/up in
another (fused copies of the layer's weights, made once), rotary and RMSNorm inline, grouped-query SDPA without
repeat_kv. Two weight sets, each made on first use:
  * the layer's own dtype (bf16 on the CPU): prefill and parallel-decoding forwards, same result as the stock
    layer (SDPA and the fused matmuls give the same values; tested);
  * float32 copies: AR decode steps, whose rows are float32 after a bf16 prefill (`VLAModel.decode_fp32`).

It replaces only the layer's `forward` (an instance attribute, see `use_lean_layers`), so `layer(...)` still runs
the layer's own hooks (the early-exit lazy KV fill adds its pending rows in a forward pre-hook). It falls back to
the stock forward for anything else: autograd on (training), CUDA, hooks on the layer's submodules (attention
capture for pruners hooks `self_attn`), positional arguments, or another input dtype.
Tests: `tests/test_vla_model.py` (lean layer = stock layer, fallbacks, AR decode with and without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

LEAN_FAMILIES = ("LlamaDecoderLayer", "Qwen2DecoderLayer")


@dataclass
class LeanWeights:
    wqkv: torch.Tensor  # (H*hd + 2*Hkv*hd, D) in the dtype the forward runs in
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor  # (2*I, D): gate rows then up rows
    wdown: torch.Tensor
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps1: float
    eps2: float
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    layer_idx: int
    is_causal: bool = True  # the attention module's flag (stock SDPA: no mask and several rows means causal)
    packed: bool = False  # wqkv/wo/wgu/wdown are oneDNN-prepacked (bf16 on the CPU): use _linear


def mkldnn_packing_available() -> bool:
    """oneDNN bf16 prepacked linears (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _pack(w: torch.Tensor, rows_hint: int = 64) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: bool) -> torch.Tensor:
    """F.linear, or oneDNN's linear on a prepacked weight: a bf16 F.linear on the CPU reorders the weight into
    oneDNN's blocked layout on every call (~25 % of a small layer's time); prepacking does it once. Same values
    (oneDNN computes both; tested bitwise)."""
    if packed:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return nn.functional.linear(x, w, b)


def lean_supported(layer: nn.Module) -> bool:
    """Llama / Qwen2 layers with SiLU gated MLPs, full attention, bias-free o_proj and MLP."""
    if type(layer).__name__ not in LEAN_FAMILIES:
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "sliding_window", None):
        return False
    act = getattr(mlp, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    return all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm))


def lean_weights(layer: nn.Module, dtype: torch.dtype | None = None, pack: bool | None = None) -> LeanWeights:
    """The layer's weights fused for the lean forward, in `dtype` (default: the layer's own); bf16 CPU weights are
    oneDNN-prepacked when `pack` (default: when available)."""
    a, m = layer.self_attn, layer.mlp
    q, k, v = a.q_proj, a.k_proj, a.v_proj
    dt = dtype or q.weight.dtype

    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dt).contiguous()

    biases = [p.bias for p in (q, k, v)]
    bqkv = None if all(b is None for b in biases) else c(torch.cat(
        [(b if b is not None else torch.zeros(p.out_features, device=p.weight.device, dtype=p.weight.dtype))
         for b, p in zip(biases, (q, k, v))]))
    hd = int(a.head_dim)
    wqkv, wo = c(torch.cat([q.weight, k.weight, v.weight], 0)), c(a.o_proj.weight)
    wgu, wdown = c(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0)), c(m.down_proj.weight)
    ln1, ln2 = c(layer.input_layernorm.weight), c(layer.post_attention_layernorm.weight)
    assert wqkv is not None and wo is not None and wgu is not None and wdown is not None
    assert ln1 is not None and ln2 is not None
    if pack is None:
        pack = dt == torch.bfloat16 and wqkv.device.type == "cpu" and mkldnn_packing_available()
    if pack:
        wqkv, wo, wgu, wdown = _pack(wqkv), _pack(wo), _pack(wgu), _pack(wdown)
    return LeanWeights(wqkv=wqkv, bqkv=bqkv, wo=wo, bo=c(a.o_proj.bias), wgu=wgu, wdown=wdown, ln1=ln1, ln2=ln2,
                       eps1=float(layer.input_layernorm.variance_epsilon),
                       eps2=float(layer.post_attention_layernorm.variance_epsilon),
                       n_heads=q.out_features // hd, n_kv=k.out_features // hd, head_dim=hd,
                       scaling=float(a.scaling), layer_idx=int(a.layer_idx),
                       is_causal=bool(getattr(a, "is_causal", True)), packed=bool(pack))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the stock layer: statistics in float32, back to the input dtype, then the weight. Float32 rows
    (CPU decode steps, float32 models) take torch's fused rms_norm: one op instead of five, the same math."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def lean_layer_forward(lw: LeanWeights, h: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: Any,
                       attn_implementation: str = "sdpa", attn_input: Callable[..., Any] | None = None,
                       qk_probe: Callable[..., Any] | None = None,
                       row_select: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
    """One decoder layer on rows h (B, Q, D) in lw's dtype, the stock layer's math. Without a mask, several rows
    attend causally under SDPA and to everything under eager, as the stock attention functions do.
    attn_input(x, position_embeddings, attention_mask) sees the attention's input (the normed rows) first, as a
    forward pre-hook on `self_attn` would, and returns them (possibly changed). qk_probe(q, k, attention_mask)
    sees the rotated queries (B, H, Q, hd) and keys (B, Hkv, K, hd) the attention is about to use (SpecPrune's
    row scores read them instead of projecting the rows again).
    row_select() (after the probe) may return indices (B, K), ascending, of the rows the caller keeps after this
    layer: only their queries, attention output, o-projection and MLP are computed (every row's keys and values
    still are), and the result is (B, K, D), each row exactly what the full layer gives it."""
    B, Q, _ = h.shape
    H, Hkv, hd = lw.n_heads, lw.n_kv, lw.head_dim
    x = _rms(h, lw.ln1, lw.eps1)
    if attn_input is not None:
        x, position_embeddings, attention_mask = attn_input(x, position_embeddings, attention_mask)
    pk = lw.packed
    qkv = _linear(x, lw.wqkv, lw.bqkv, pk)
    q, k, v = qkv.split((H * hd, Hkv * hd, Hkv * hd), -1)
    q = q.view(B, Q, H, hd).transpose(1, 2)
    k = k.view(B, Q, Hkv, hd).transpose(1, 2)
    v = v.view(B, Q, Hkv, hd).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1).to(h.dtype), sin.unsqueeze(1).to(h.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if cache is not None:
        k, v = cache.update(k, v, lw.layer_idx)
    if qk_probe is not None:
        qk_probe(q, k, attention_mask)
    if row_select is not None:
        keep = row_select()
        if keep is not None:
            if attention_mask is None:
                raise ValueError("row_select needs an explicit attention mask (the kept rows are not a prefix)")
            if B == 1:
                idx = keep[0]
                q, h = q.index_select(2, idx), h.index_select(1, idx)
                attention_mask = attention_mask.index_select(2, idx)
            else:
                q = q.gather(2, keep[:, None, :, None].expand(-1, H, -1, hd))
                h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
                attention_mask = attention_mask.expand(B, -1, -1, -1).gather(
                    2, keep[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[3]))
            Q = q.shape[2]
    causal = Q > 1 and attention_mask is None and lw.is_causal and attn_implementation != "eager"
    o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=lw.scaling,
                                                   is_causal=causal, enable_gqa=H != Hkv)
    h = h + _linear(o.transpose(1, 2).reshape(B, Q, H * hd), lw.wo, lw.bo, pk)
    g, u = _linear(_rms(h, lw.ln2, lw.eps2), lw.wgu, None, pk).chunk(2, -1)
    return h + _linear(nn.functional.silu(g) * u, lw.wdown, None, pk)


class _LeanForward:
    """The instance-level forward installed on a layer: lean for CPU inference calls, stock otherwise."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.stock = type(layer).forward
        self.weights: dict[torch.dtype, LeanWeights] = {}
        self.calls = 0
        self.subs = [m for m in layer.modules() if m is not layer]
        self.params = list(layer.parameters())
        self._key: tuple[tuple[int, int], ...] = ()

    def _weights_key(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.data_ptr(), p._version) for p in self.params)

    def _hooked(self) -> bool:
        """Hooks the lean path cannot honour: global ones, forward hooks on any submodule, pre-hooks on
        submodules other than `self_attn`, and `self_attn` pre-hooks that do not take kwargs."""
        from torch.nn.modules import module as M

        if M._global_forward_hooks or M._global_forward_pre_hooks:
            return True
        attn = self.layer.self_attn
        for m in self.subs:
            if m._forward_hooks or (m._forward_pre_hooks and m is not attn):
                return True
        return any(k not in attn._forward_pre_hooks_with_kwargs for k in attn._forward_pre_hooks)

    def _attn_pre_hooks(self, x: torch.Tensor, pe: Any, mask: torch.Tensor | None) -> tuple[Any, Any, Any]:
        """Run `self_attn`'s forward pre-hooks (e.g. SpecPrune's row-importance hook) on the attention input."""
        attn = self.layer.self_attn
        kwargs: dict[str, Any] = {"hidden_states": x, "position_embeddings": pe, "attention_mask": mask,
                                  "qk_probe_follows": getattr(attn, "qk_probe", None) is not None}
        for hook in list(attn._forward_pre_hooks.values()):
            res = hook(attn, (), kwargs)
            if res is not None:
                _, kwargs = res
        return kwargs["hidden_states"], kwargs["position_embeddings"], kwargs["attention_mask"]

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        # row_select: see lean_layer_forward; the stock fallback never calls it (the caller sees that and cuts
        # after the layer instead)
        row_select = kw.pop("row_select", None)
        h = hidden_states
        own = self.layer.input_layernorm.weight.dtype
        if (args or h.device.type != "cpu" or h.dim() != 3 or h.dtype not in (torch.float32, own)
                or kw.get("position_embeddings") is None or torch.is_grad_enabled() or self._hooked()):
            return self.stock(self.layer, hidden_states, *args, **kw)
        impl = self.layer.self_attn.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            return self.stock(self.layer, hidden_states, *args, **kw)
        key = self._weights_key()
        if key != self._key:  # weights replaced or changed in place since the fused copies were made
            self.weights, self._key = {}, key
        lw = self.weights.get(h.dtype)
        if lw is None:
            lw = self.weights[h.dtype] = lean_weights(self.layer, h.dtype)
        cache = kw.get("cache", kw.get("past_key_values"))
        self.calls += 1
        pre = self._attn_pre_hooks if self.layer.self_attn._forward_pre_hooks else None
        return lean_layer_forward(lw, h, kw.get("attention_mask"), kw["position_embeddings"], cache, impl, pre,
                                  getattr(self.layer.self_attn, "qk_probe", None), row_select)


def use_lean_layers(decoder: nn.Module, enable: bool = True) -> int:
    """Install (or remove) the lean forward on every supported layer of decoder; returns how many changed."""
    n = 0
    for layer in getattr(decoder, "layers", []):
        has = isinstance(layer.__dict__.get("forward"), _LeanForward)
        if enable and not has and lean_supported(layer):
            layer.forward = _LeanForward(layer)
            n += 1
        elif not enable and has:
            del layer.forward
            n += 1
    return n


def is_lean(layer: nn.Module) -> bool:
    """Whether the lean forward is installed on this layer (it may still fall back to the stock one per call)."""
    return isinstance(layer.__dict__.get("forward"), _LeanForward)


def lean_calls(decoder: nn.Module) -> int:
    """How many layer calls took the lean path so far (tests, benches)."""
    return sum(f.calls for f in (layer.__dict__.get("forward") for layer in getattr(decoder, "layers", []))
               if isinstance(f, _LeanForward))
