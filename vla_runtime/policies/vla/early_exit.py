"""Early-exit decoding for VLAs after SpecEE (arXiv 2504.08850): an `ExitPolicy` for the VLA layer loop.

AR mode (OpenVLA-style action tokens), per generated token:
  * Speculative candidates, no draft model: the previous action's token for the same action dimension
    (earlier in this chunk, or the previous chunk's action for this time step) and its neighbouring bins
    (actions are smooth, so the next bin is usually within +-1 of the last one), filled up to a fixed count C
    with the top tokens of a shallow layer's full head (the only source when there is no previous token, and
    the one that catches direction changes). Fixed C because the predictor's input is 3C wide.
  * Predictor features at a layer = `vla_runtime.kernels.exit_features_torch`: the final-normed hidden state
    projected on only the candidates' rows of the action head -> C logits, their softmax, and the change of
    that softmax since the last checked layer (3C). One tiny MLP (3C -> 64 -> 1) per layer, trained offline
    (`early_exit_train.py`) on the model's own tokens; label: this layer's argmax over the candidates equals
    the full model's token. At inference the fused kernel `vla_runtime.kernels.exit_predictor` computes
    features + MLP in one call (Triton on CUDA, torch reference on CPU).
  * Exit rule: score >= the layer's threshold AND the layer's full-head argmax is a candidate.
  * Two-level schedule: offline, the layers chosen from the skewed distribution of earliest-correct layers
    (a cost model: layers saved minus predictor calls); online, also the layers next to the exit layers of the
    recent tokens and of the same dimension in the previous action (contextual similarity).
  * KV consistency ("lazy", default): a token that exits at layer l has no keys/values in layers > l. It is
    kept as *pending* with its hidden state; when a later token runs layer j and some pending tokens stand
    before layer j, they are run through layer j in the same call as the later token (extra query rows of one
    layer call, nearly free at batch 1) and advance. Every key a token attends to is therefore exactly the
    full model's key for the same token history (tests check this against the full model); pending tokens
    that no later token needs are never computed. The alternative ("copy", as CALM) fills the deeper layers'
    KV from the exit hidden state with only their k/v projections: cheaper per exit, approximate.
  * Prefill never exits (every prompt token's KV must exist for the whole chunk).

Parallel mode (OFT-style chunk head): after a scheduled layer the chunk head is run on the final-normed
hidden state (and on the layer before's, when that layer was not checked: the deltas always span one layer);
a per-layer MLP over how much the chunk and the suffix hidden states still change decides whether
this chunk is within tolerance of the final one (label: max |chunk_l - chunk_final| <= tolerance in normalised
action units). No LM-head rows exist in this mode, so it uses a torch MLP, not the kernel.

Plugs into the loop through `ACCELERATIONS["earlyexit"]` (factory `make_early_exit(model, **options)`), so
`--accel specprune,earlyexit` composes a token pruner with this exit policy. The lazy KV path hooks the decoder
layers (a forward pre-hook adds the pending rows, a forward hook removes them): the loop's interface only lets
an exit policy stop, not add query rows.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_runtime.errors import UserError
from vla_runtime.kernels import exit_predictor
from vla_runtime.policies.vla.lean_layers import _rotate_half, lean_supported
from vla_runtime.policies.vla.modeling import KIND_SUFFIX, LayerKVCache, StepContext, VLAModel, build_attention_mask

log = logging.getLogger(__name__)

PREDICTOR_DIR = "exit_predictors"
WEIGHTS_FILE = "predictors.safetensors"
META_FILE = "predictors.json"
FORMAT_VERSION = 1
KV_FILLS = ("lazy", "copy", "none")
MEM_PREV_TOKENS = "earlyexit_prev_tokens"  # ctx.memory key: previous chunk's tokens (chunk, A)
MEM_PREV_EXITS = "earlyexit_prev_exits"  # ctx.memory key: recent exit layers (parallel mode: per chunk)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EarlyExitConfig:
    """Candidate source, schedule and exit rule. Saved with the predictors; options given to the factory win."""

    n_neighbors: int = 1  # candidates prev-token +- 1..n_neighbors bins (AR)
    n_shallow: int = 3  # candidates from the shallow layer's full-head top tokens (AR)
    shallow_layer: int = 1  # layer (0-based) whose full-head top-k fills the candidates; -1: none
    threshold: float | None = None  # None: the per-layer thresholds chosen at training time
    context_window: int = 5  # online schedule: exit layers of the last N tokens (AR) / chunks (parallel)
    context_offsets: tuple[int, ...] = (-1, 0, 1)  # ... plus these offsets around each of them
    online: bool = True  # the online contextual schedule on/off (offline layers are always checked)
    kv_fill: str = "lazy"  # lazy (exact), copy (CALM-style, approximate), none (drop: tests only)
    tolerance: float = 0.05  # parallel mode: max |chunk_l - chunk_final| (normalised actions) counted correct
    backend: str | None = None  # None: kernel dispatch on CUDA (Triton), lean same-math path on CPU; or force one

    def __post_init__(self) -> None:
        self.context_offsets = tuple(int(o) for o in self.context_offsets)
        if self.n_neighbors < 0 or self.n_shallow < 0:
            raise UserError("earlyexit: n_neighbors and n_shallow must be >= 0")
        if self.n_candidates < 1:
            raise UserError("earlyexit: need at least one candidate (n_neighbors >= 0 gives the previous token)")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UserError(f"earlyexit: threshold must be in (0, 1), got {self.threshold}")
        if self.kv_fill not in KV_FILLS:
            raise UserError(f"earlyexit: kv_fill must be one of {KV_FILLS}, got {self.kv_fill!r}")
        if self.tolerance <= 0:
            raise UserError("earlyexit: tolerance must be > 0")
        if self.context_window < 0:
            raise UserError("earlyexit: context_window must be >= 0")

    @property
    def n_candidates(self) -> int:
        return 1 + 2 * self.n_neighbors + self.n_shallow

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_offsets"] = list(self.context_offsets)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EarlyExitConfig":
        known = {f.name for f in fields(EarlyExitConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"earlyexit: unknown options {unknown} (known: {sorted(known)})")
        return EarlyExitConfig(**d)


# ---------------------------------------------------------------------------------------------------------------
# candidates and features (shared by training and inference)
# ---------------------------------------------------------------------------------------------------------------
def neighbor_bins(prev: int, n_neighbors: int, n_bins: int) -> list[int]:
    """prev, prev-1, prev+1, prev-2, ... clipped to [0, n_bins): the most likely bins first."""
    out = [prev]
    for r in range(1, n_neighbors + 1):
        for b in (prev - r, prev + r):
            if 0 <= b < n_bins:
                out.append(b)
    return out


def build_candidates(prev_token: int | None, shallow_logits: torch.Tensor | None, cfg: EarlyExitConfig,
                     n_bins: int) -> torch.Tensor | None:
    """The C candidate bins for one token, in priority order, or None when no source can fill C.

    prev_token's neighbourhood first, then the shallow layer's ranking (shallow_logits (n_bins,)) fills the rest
    without duplicates; with no previous token the shallow top-C alone.
    """
    C = cfg.n_candidates
    cand: list[int] = neighbor_bins(prev_token, cfg.n_neighbors, n_bins) if prev_token is not None else []
    if shallow_logits is not None:
        seen = set(cand)
        k = min(n_bins, C + len(cand))
        for b in shallow_logits.float().topk(k).indices.tolist():
            if len(cand) >= C:
                break
            if b not in seen:
                cand.append(b)
                seen.add(b)
    if len(cand) < C:  # edge bins lose neighbours: fill with the next ones outward
        if prev_token is None or len(cand) == 0:
            return None
        seen = set(cand)
        r = cfg.n_neighbors + 1
        while len(cand) < C and r < n_bins:
            for b in (prev_token - r, prev_token + r):
                if 0 <= b < n_bins and b not in seen and len(cand) < C:
                    cand.append(b)
                    seen.add(b)
            r += 1
    return torch.tensor(cand[:C], dtype=torch.long)


def final_norm_params(model: VLAModel) -> tuple[torch.Tensor, float]:
    """(weight (D,), eps) such that RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * weight equals the decoder's norm.

    Gemma's norm multiplies by (1 + weight); the kernel takes the effective weight.
    """
    norm = model.decoder.norm
    w = norm.weight.detach()
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", model.cfg.rms_norm_eps)))
    if "gemma" in type(norm).__name__.lower():
        w = w + 1.0
    return w, eps


def ar_head_weight(model: VLAModel) -> torch.Tensor:
    """The action head's rows (n_bins, D): the 'LM head' the candidates index."""
    proj = getattr(model.head, "proj", None)
    if not isinstance(proj, nn.Linear) or proj.bias is not None:
        raise UserError("earlyexit (AR) needs an ARActionHead with a bias-free projection")
    return proj.weight.detach()


def previous_token_for(k: int, tokens: list[int], prev_chunk: torch.Tensor | None, action_dim: int,
                       n_action_steps: int) -> int | None:
    """The bin of the same action dimension one action earlier than token k (flat index into the chunk).

    Inside the chunk: token k - action_dim. For the chunk's first action: the previous chunk's action for this
    time step (index n_action_steps, i.e. where the previous chunk left off), clipped to its last action.
    """
    if k >= action_dim:
        return tokens[k - action_dim]
    if prev_chunk is None:
        return None
    t = min(n_action_steps, prev_chunk.shape[0] - 1)
    return int(prev_chunk[t, k])


# ---------------------------------------------------------------------------------------------------------------
# predictors on disk
# ---------------------------------------------------------------------------------------------------------------
class ParallelExitMLP(nn.Module):
    """Parallel mode's per-layer predictor: PARALLEL_FEATURES -> hidden -> 1 (pre-sigmoid logit)."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B,)
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)


PARALLEL_FEATURES = 6


@dataclass
class PredictorBank:
    """Per-layer predictor weights + the offline schedule + what they were trained for (meta json)."""

    mode: str  # "ar" | "parallel"
    n_layers: int
    n_candidates: int  # AR: C; parallel: 0
    params: dict[int, dict[str, torch.Tensor]]  # layer -> {w1 (F, Hd), b1 (Hd,), w2 (Hd, 1), b2 (1,)}
    thresholds: dict[int, float]
    offline_layers: list[int]
    config: EarlyExitConfig
    meta: dict[str, Any] = field(default_factory=dict)  # training stats, provenance

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer{i}.{k}": v.detach().float().contiguous().cpu() for i, p in self.params.items()
                   for k, v in p.items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "earlyexit", "version": str(FORMAT_VERSION)})
        tmp.replace(out / WEIGHTS_FILE)
        doc = {"format_version": FORMAT_VERSION, "mode": self.mode, "n_layers": self.n_layers,
               "n_candidates": self.n_candidates, "layers": sorted(self.params),
               "thresholds": {str(k): v for k, v in sorted(self.thresholds.items())},
               "offline_layers": sorted(self.offline_layers), "config": self.config.to_dict(),
               "features": ("kernels.exit_features_torch: [cand logits | cand probs | probs - prev probs]"
                            if self.mode == "ar" else "early_exit.parallel_features"), **self.meta}
        tmpj = out / (META_FILE + ".tmp")
        tmpj.write_text(json.dumps(doc, indent=1))
        tmpj.replace(out / META_FILE)
        return out

    @staticmethod
    def load(path: str | Path) -> "PredictorBank":
        from safetensors.torch import load_file

        d = Path(path)
        if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise UserError(f"no exit predictors in {d} (want {META_FILE} + {WEIGHTS_FILE}); train them with "
                            "`vla-runtime train --policy exit-predictors --checkpoint CKPT --data DEMOS --out DIR`")
        try:
            doc = json.loads((d / META_FILE).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{d / META_FILE}: not valid json ({e})") from None
        if doc.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{d / META_FILE}: format_version {doc.get('format_version')}, expected {FORMAT_VERSION}")
        t = load_file(str(d / WEIGHTS_FILE))
        params: dict[int, dict[str, torch.Tensor]] = {}
        for i in doc["layers"]:
            params[int(i)] = {k: t[f"layer{i}.{k}"] for k in ("w1", "b1", "w2", "b2")}
        extra = {k: v for k, v in doc.items() if k not in {"format_version", "mode", "n_layers", "n_candidates",
                                                           "layers", "thresholds", "offline_layers", "config",
                                                           "features"}}
        return PredictorBank(mode=doc["mode"], n_layers=int(doc["n_layers"]), n_candidates=int(doc["n_candidates"]),
                             params=params, thresholds={int(k): float(v) for k, v in doc["thresholds"].items()},
                             offline_layers=[int(x) for x in doc["offline_layers"]],
                             config=EarlyExitConfig.from_dict(doc["config"]), meta=extra)


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
def offline_schedule(earliest: list[int], n_layers: int, candidate_layers: list[int], check_cost: float = 0.25,
                     max_layers: int | None = None) -> list[int]:
    """Pick the predictor layers from the distribution of earliest-correct layers (SpecEE's offline level).

    earliest[t] = the first layer index after which token t could exit correctly (n_layers if never). With a
    check set S a token exits after min{s in S, s >= e} (layers run = that + 1) and pays `check_cost` layers
    per predictor call before it. Greedy: add the layer that lowers the mean cost most; stop when none helps.
    Why a cost model: on a small decoder one predictor call costs a sizable fraction of a layer.
    """
    if not earliest:
        return []
    import numpy as np

    e = np.asarray(earliest)

    def cost(S: list[int]) -> float:
        total = 0.0
        s_sorted = sorted(S)
        for ei in e:
            run, checks = n_layers, 0
            for s in s_sorted:
                checks += 1
                if s >= ei:
                    run = s + 1
                    break
            total += run + check_cost * checks
        return total / len(e)

    S: list[int] = []
    best = cost(S)
    pool = [c for c in candidate_layers if 0 <= c < n_layers - 1]
    while pool and (max_layers is None or len(S) < max_layers):
        scored = [(cost(S + [c]), c) for c in pool]
        c_best, layer = min(scored)
        if c_best >= best - 1e-9:
            break
        best = c_best
        S.append(layer)
        pool.remove(layer)
    return sorted(S)


def online_layers(recent_exits: list[int], offsets: tuple[int, ...], available: set[int]) -> set[int]:
    """SpecEE's online level: layers next to the recent tokens' exit layers (exit layer x = x layers run,
    i.e. last layer index x - 1), restricted to layers that have a predictor."""
    out: set[int] = set()
    for x in recent_exits:
        for o in offsets:
            j = x - 1 + o
            if j in available:
                out.add(j)
    return out


# ---------------------------------------------------------------------------------------------------------------
# parallel-mode features
# ---------------------------------------------------------------------------------------------------------------
def parallel_features(chunk: torch.Tensor, prev_chunk: torch.Tensor | None, suffix: torch.Tensor,
                      prev_suffix: torch.Tensor | None, layer_idx: int, n_layers: int) -> torch.Tensor:
    """(B, PARALLEL_FEATURES) float32: how much the decoded chunk and the normed suffix states still move.

    chunk (B, T, A) decoded from this layer, prev_chunk from the last checked layer (None: first check -> zeros
    for the deltas, cosine 0), suffix (B, S, D) final-normed suffix hidden states. Features: mean |dchunk|,
    max |dchunk|, mean / min cosine(suffix, prev suffix), mean |chunk|, layer fraction.
    """
    B = chunk.shape[0]
    c = chunk.float()
    if prev_chunk is None or prev_suffix is None:
        d_mean = torch.zeros(B)
        d_max = torch.zeros(B)
        cos_mean = torch.zeros(B)
        cos_min = torch.zeros(B)
    else:
        d = (c - prev_chunk.float()).abs()
        d_mean, d_max = d.flatten(1).mean(1), d.flatten(1).amax(1)
        cs = torch.cosine_similarity(suffix.float(), prev_suffix.float(), dim=-1)  # (B, S)
        cos_mean, cos_min = cs.mean(1), cs.amin(1)
    frac = torch.full((B,), (layer_idx + 1) / n_layers)
    return torch.stack([d_mean.to(c.device), d_max.to(c.device), cos_mean.to(c.device), cos_min.to(c.device),
                        c.abs().flatten(1).mean(1), frac.to(c.device)], 1)


def _mlp_score(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sigmoid score (B,) of a [w1 (F, Hd), b1, w2 (Hd, 1), b2] MLP."""
    z = torch.relu(x.float() @ p["w1"] + p["b1"])
    return torch.sigmoid(z @ p["w2"][:, 0] + p["b2"].reshape(()))


# ---------------------------------------------------------------------------------------------------------------
# the exit policy
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A token that exited before the last layer: its hidden state entering layer `state` (lazy KV fill)."""

    hidden: torch.Tensor  # (B, 1, D)
    pos: torch.Tensor  # (B, 1)
    state: int
    pe: tuple[torch.Tensor, torch.Tensor] | None = None  # its rotary (cos, sin) (B, 1, hd), reused per layer


@dataclass
class ExitStats:
    """Counters the bench reads (per policy object): exit layers per token / chunk, predictor calls."""

    exit_layers: list[int] = field(default_factory=list)  # layers run per decided token (AR) or chunk
    checks: int = 0
    exits: int = 0
    rejected_by_argmax: int = 0  # score passed but the full argmax was not a candidate
    pending_rows: int = 0  # lazy fill: pending-token rows run alongside later tokens
    chunks: list[dict[str, Any]] = field(default_factory=list)  # bench shadow records (see record_chunks)


_LIVE: "weakref.WeakValueDictionary[str, EarlyExitPolicy]" = weakref.WeakValueDictionary()


def find_policy(tag: str) -> "EarlyExitPolicy | None":
    """The live EarlyExitPolicy created with `tag=...` (the bench reads its stats after the episodes)."""
    return _LIVE.get(tag)


class EarlyExitPolicy:
    """SpecEE-style `ExitPolicy` for the VLA layer loop (AR tokens or the parallel chunk head).

    One object per model (it installs hooks on the model's decoder layers and head); per-episode state lives in
    `ctx.memory` (previous chunk's tokens, recent exit layers), per-chunk state on the object.
    """

    attention_layers: frozenset[int] = frozenset()

    def __init__(self, model: VLAModel, bank: PredictorBank, config: EarlyExitConfig | None = None,
                 tag: str | None = None, record_chunks: bool = False) -> None:
        cfg = config or bank.config
        if bank.mode != model.cfg.mode:
            raise UserError(f"earlyexit: predictors were trained for mode {bank.mode!r}, the model is "
                            f"{model.cfg.mode!r}")
        if bank.n_layers != model.n_layers:
            raise UserError(f"earlyexit: predictors are for {bank.n_layers} layers, the model has {model.n_layers}")
        if model.cfg.mode == "ar" and bank.n_candidates != cfg.n_candidates:
            raise UserError(f"earlyexit: predictors take C={bank.n_candidates} candidates, the config gives "
                            f"{cfg.n_candidates} (n_neighbors/n_shallow must match training)")
        self.model, self.bank, self.cfg = model, bank, cfg
        self.n_layers = model.n_layers
        self.mode = model.cfg.mode
        # layers whose predictor can fire (training found no threshold reaching the target precision: 1.01)
        self.available = {i for i in bank.params if cfg.threshold is not None or bank.thresholds.get(i, 0.5) <= 1.0}
        self.offline = set(bank.offline_layers) & self.available
        self.stats = ExitStats()
        self.record_chunks = record_chunks
        self.tag = tag
        if tag is not None:
            _LIVE[tag] = self
        self._device: torch.device | None = None
        self._params: dict[int, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        # per chunk (AR)
        self._active = False
        self._memory: dict[str, Any] = {}
        self._tokens: list[int] = []
        self._cache: LayerKVCache | None = None
        self._pending: list[_Pending] = []
        self._rows: list[_Pending] = []  # pending tokens added to the current layer call
        self._exits: list[int] = []
        self._prefill_snapshot: dict[str, Any] | None = None
        # per token
        self._cand: torch.Tensor | None = None
        self._cand_list: set[int] = set()
        self._prev_probs: torch.Tensor | None = None
        self._check: set[int] = set()
        self._pe: tuple[torch.Tensor, torch.Tensor] | None = None
        # parallel
        self._prev_chunk: torch.Tensor | None = None
        self._prev_suffix: torch.Tensor | None = None
        self._prev_layer = -1  # the last checked layer of this pass
        self._last_raw: torch.Tensor | None = None  # the suffix rows after the last layer seen (look-back source)
        self._last_raw_layer = -1
        self._layer_kwargs: dict[str, Any] = {}
        self._copy_w: tuple[torch.Tensor, torch.Tensor | None, float, int, int] | None = None  # fused copy fill
        self._copy_w_ready = False
        self._rows_t: torch.Tensor | None = None  # (D, C) the candidates' norm-folded head rows (CPU checks)
        if self.mode == "ar":
            self._install_hooks()  # which layers get hooks depends on cfg.kv_fill, fixed at construction
        elif record_chunks:  # parallel bench shadow: keep the latest layer call's kwargs to replay the rest
            for layer in model.decoder.layers:
                self._hooks.append(layer.register_forward_pre_hook(self._keep_kwargs, with_kwargs=True))

    # ---- device-resident parameters ---------------------------------------------------------------------
    def _ensure_device(self, ref: torch.Tensor) -> None:
        if self._device == ref.device:
            return
        self._device = ref.device
        self._copy_w_ready = False  # rebuilt on the new device
        self._params = {i: {k: v.to(ref.device, torch.float32) for k, v in p.items()}
                        for i, p in self.bank.params.items()}
        if self.mode == "ar":
            w, eps = final_norm_params(self.model)
            self._norm_w, self._norm_eps = w.to(ref.device), eps
            self._head_w = ar_head_weight(self.model)
            self._head_w32 = self._head_w.float()  # the shallow ranking and the exit argmax run in float32
            self._norm_w32 = self._norm_w.float()
            self._rows_t = None

    def threshold(self, layer: int) -> float:
        if self.cfg.threshold is not None:
            return float(self.cfg.threshold)
        return float(self.bank.thresholds.get(layer, 0.5))

    # ---- hooks: emitted tokens, the cache, and the lazy KV fill -------------------------------------------
    def _install_hooks(self) -> None:
        self._hooks.append(self.model.head.register_forward_hook(self._on_head))
        for j, layer in enumerate(self.model.decoder.layers):
            if j > 0 and self.cfg.kv_fill != "lazy":  # only the lazy fill adds rows; the others need layer 0's
                break  # cache and rotary (a hook on every layer costs ~10 us per layer call on the CPU)
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(j), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(j)))

    def _keep_kwargs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._layer_kwargs = {k: kwargs[k] for k in ("attention_mask", "position_embeddings", "position_ids")
                              if k in kwargs}

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _on_head(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        """Records each emitted token (the AR loop takes the argmax of the head over the last hidden state)."""
        if not self._active:
            return
        self._tokens.append(int(out[0, -1].argmax()))
        if len(self._tokens) == self.model.cfg.n_action_tokens:
            cfg = self.model.cfg
            self._memory[MEM_PREV_TOKENS] = torch.tensor(self._tokens).reshape(cfg.chunk_size, cfg.action_dim)
            if self.record_chunks and self._prefill_snapshot is not None:
                self.stats.chunks.append({**self._prefill_snapshot, "tokens": list(self._tokens),
                                          "exits": list(self._exits)})
            self._active = False
            self._pending = []
            self._cache = None
            self._prefill_snapshot = None

    def _make_pre_hook(self, j: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if isinstance(cache, LayerKVCache):  # also in the prefill (before the chunk starts, at layer 0)
                self._cache = cache
            if j == 0:
                self._pe = kwargs.get("position_embeddings")
            if not self._active:
                return None
            todo = [p for p in self._pending if p.state == j]
            if not todo or not isinstance(cache, LayerKVCache):
                return None
            return self._add_pending_rows(j, todo, args, kwargs, cache)

        return hook

    def _add_pending_rows(self, j: int, todo: list[_Pending], args: tuple[Any, ...], kwargs: dict[str, Any],
                          cache: LayerKVCache) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Prepend pending tokens (entering layer j) to this layer call's queries, with their keys' metadata.

        The loop already appended the current token's metadata for layer j; the pending rows' metadata goes
        before it, matching the order `update()` will append their keys in (pending rows first).
        """
        h = args[0]  # (B, Q, D)
        Q = h.shape[1]
        ph = torch.cat([p.hidden for p in todo], 1).to(h.dtype)  # (B, P, D)
        ppos = torch.cat([p.pos for p in todo], 1)  # (B, P)
        pkind = torch.full_like(ppos, KIND_SUFFIX)
        pvalid = torch.ones_like(ppos, dtype=torch.bool)
        kp, kk, kv = cache.key_meta(j)  # type: ignore[misc]
        cache.pos[j] = torch.cat([kp[:, :-Q], ppos, kp[:, -Q:]], 1)
        cache.kind[j] = torch.cat([kk[:, :-Q], pkind, kk[:, -Q:]], 1)
        cache.valid[j] = torch.cat([kv[:, :-Q], pvalid, kv[:, -Q:]], 1)
        qpos = torch.cat([ppos, kwargs["position_ids"]], 1)  # (B, P + Q)
        qkind = torch.cat([pkind, kk[:, -Q:]], 1)
        mask = build_attention_mask(qpos, qkind, cache.pos[j], cache.kind[j], cache.valid[j],  # type: ignore[arg-type]
                                    False, h.dtype)
        hh = torch.cat([ph, h], 1)
        cur = kwargs.get("position_embeddings")
        if cur is not None and all(p.pe is not None for p in todo):  # rotary depends on the position only
            pe = tuple(torch.cat([p.pe[n] for p in todo] + [cur[n]], 1) for n in (0, 1))  # type: ignore[index]
        else:
            pe = self.model.decoder.rotary_emb(hh, position_ids=qpos)
        kw = dict(kwargs, attention_mask=mask, position_embeddings=pe, position_ids=qpos)
        self._rows = todo
        self.stats.pending_rows += len(todo)
        return (hh, *args[1:]), kw

    def _make_post_hook(self, j: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
            rows = self._rows
            if not self._active or not rows:
                return None
            P = len(rows)
            for r, p in enumerate(rows):
                p.hidden = out[:, r:r + 1]
                p.state = j + 1
            self._rows = []
            self._pending = [p for p in self._pending if p.state < self.n_layers]
            return out[:, P:]

        return hook

    # ---- copy fill (CALM-style) ---------------------------------------------------------------------------
    def _copy_fill(self, i: int, hidden: torch.Tensor, ctx: StepContext) -> None:
        """Fill layers > i with keys/values projected from the exit hidden state (approximate, cheap).

        Fused where every layer is a stock Llama / Qwen2 layer with one RMSNorm epsilon: each layer's k/v rows
        with its input-norm weight folded in, stacked by layer (`_copy_weights`), so the deeper layers' keys and
        values are one batched matvec + one rotary instead of ~10 module calls per layer (on the CPU the stock
        path cost more than the layers an exit saves). Same math as `_copy_fill_stock` (tested)."""
        cache = self._cache
        if cache is None or self._pe is None:
            raise RuntimeError("earlyexit: copy fill found no KV cache in the decode loop")
        assert ctx.positions is not None and ctx.kinds is not None and ctx.valid is not None
        fused = self._copy_weights()
        if fused is None or hidden.shape[0] != 1:
            self._copy_fill_stock(i, hidden, ctx)
            return
        w, b, eps, n_kv, hd = fused
        L = self.n_layers
        x = hidden[0, -1].float()  # (D,)
        xn = torch.nn.functional.rms_norm(x, (x.shape[-1],), None, eps)  # the norm weights are folded into w
        kv = torch.matmul(w[i + 1:], xn)  # (n, 2 * Hkv * hd): every deeper layer at once
        if b is not None:
            kv = kv + b[i + 1:]
        kv = kv.view(L - 1 - i, 2, n_kv, hd)
        cos, sin = (t[0, -1].float() for t in self._pe)  # (hd,) the current token's rotary
        k = kv[:, 0]
        k = k * cos + _rotate_half(k) * sin
        v = kv[:, 1]
        for n, j in enumerate(range(i + 1, L)):
            dt = cache.k[j].dtype if cache.k[j] is not None else hidden.dtype  # type: ignore[union-attr]
            cache.update(k[n, :, None, :][None].to(dt), v[n, :, None, :][None].to(dt), j)
            cache.add_meta(j, ctx.positions, ctx.kinds, ctx.valid)

    def _copy_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, float, int, int] | None:
        """(W (L, 2*Hkv*hd, D) float32 with each layer's input-norm weight folded in, biases (L, 2*Hkv*hd) or None,
        eps, Hkv, hd), built once; None when a layer is not a stock Llama / Qwen2 layer or the epsilons differ."""
        if self._copy_w_ready:
            return self._copy_w

        layers = list(self.model.decoder.layers)
        dev = self._device
        out = None
        if all(lean_supported(l) for l in layers) and \
                len({float(l.input_layernorm.variance_epsilon) for l in layers}) == 1:
            ws, bs = [], []
            for l in layers:
                a, ln = l.self_attn, l.input_layernorm.weight.detach().float()
                ws.append(torch.cat([a.k_proj.weight, a.v_proj.weight], 0).detach().float() * ln[None, :])
                if a.k_proj.bias is not None or a.v_proj.bias is not None:
                    bs.append(torch.cat([(p.bias if p.bias is not None else torch.zeros(p.out_features,
                                          device=p.weight.device)).detach().float() for p in (a.k_proj, a.v_proj)]))
            a0 = layers[0].self_attn
            hd = int(a0.head_dim)
            out = (torch.stack(ws).to(dev).contiguous(), torch.stack(bs).to(dev) if len(bs) == len(ws) else None,
                   float(layers[0].input_layernorm.variance_epsilon), a0.k_proj.out_features // hd, hd)
        self._copy_w, self._copy_w_ready = out, True
        return out

    def _copy_fill_stock(self, i: int, hidden: torch.Tensor, ctx: StepContext) -> None:
        """The copy fill through each deeper layer's own modules (any decoder family; the fused path's reference)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cache = self._cache
        assert cache is not None and self._pe is not None
        assert ctx.positions is not None and ctx.kinds is not None and ctx.valid is not None
        cos, sin = self._pe
        B, Q, _ = hidden.shape
        for j in range(i + 1, self.n_layers):
            layer = self.model.decoder.layers[j]
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            k = attn.k_proj(x).view(B, Q, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, Q, hd)
            v = attn.v_proj(x).view(B, Q, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            cache.update(k, v, j)
            cache.add_meta(j, ctx.positions, ctx.kinds, ctx.valid)

    # ---- the hook the loop calls --------------------------------------------------------------------------
    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        if self.mode == "parallel":
            return self._after_layer_parallel(layer_idx, hidden, ctx)
        return self._after_layer_ar(layer_idx, hidden, ctx)

    def _begin_chunk(self, ctx: StepContext) -> None:
        self._active = True
        self._memory = ctx.memory
        self._tokens = []
        self._pending = []
        self._exits = []
        self._rows = []
        self._prefill_snapshot = None

    def _begin_token(self, ctx: StepContext) -> None:
        cfg = self.model.cfg
        k = ctx.decode_step + 1  # the token this pass predicts
        prev = previous_token_for(k, self._tokens, self._memory.get(MEM_PREV_TOKENS), cfg.action_dim,
                                  cfg.n_action_steps)
        self._prev_token = prev
        self._cand = None
        self._cand_list = set()
        self._prev_probs = None
        self._check = self._schedule(k)
        if not self._check:  # nothing to check for this token: skip the candidates too
            return
        if self.cfg.shallow_layer < 0 or self.cfg.n_shallow == 0:
            self._set_candidates(build_candidates(prev, None, self.cfg, cfg.n_bins))

    def _schedule(self, k: int) -> set[int]:
        """Layers checked for token k: the offline set plus the online contextual layers."""
        A = self.model.cfg.action_dim
        check = set(self.offline)
        if self.cfg.online and self.cfg.context_window > 0:
            recent = self._exits[-self.cfg.context_window:]
            if k >= A and k - A - 1 < len(self._exits) and k - A - 1 >= 0:
                recent = recent + [self._exits[k - A - 1]]  # same dimension, previous action (exits[j]: token j+1)
            check |= online_layers(recent, self.cfg.context_offsets, self.available)
        return check

    def _set_candidates(self, cand: torch.Tensor | None) -> None:
        if cand is None:
            self._cand = None
            return
        assert self._device is not None
        self._cand = cand.to(self._device)[None]  # (1, C)
        self._cand_list = set(cand.tolist())
        self._rows_t = (self._head_w[self._cand[0]].float() * self._norm_w.float()).t().contiguous()  # (D, C)

    def _after_layer_ar(self, i: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        L = self.n_layers
        if ctx.decode_step < 0:  # prefill: never exit, start the chunk's state
            if i == 0:
                self._begin_chunk(ctx)
                self._ensure_device(hidden)
            if i == L - 1 and self.record_chunks:
                self._snapshot_prefill(hidden)
            return False
        if i == 0:
            self._begin_token(ctx)
        if hidden.shape[0] != 1:
            raise UserError("earlyexit (AR) decodes one sequence at a time (batch 1)")
        if i == L - 1:
            self._record_exit(L)
            return False
        h = hidden[:, -1]  # (1, D)
        if i == self.cfg.shallow_layer and self._check and self._cand is None and self.cfg.n_shallow > 0:
            self._set_candidates(build_candidates(self._prev_token, self._full_logits(h), self.cfg,
                                                  self.model.cfg.n_bins))
        if self._cand is None or i not in self._check or i not in self._params or i < self.cfg.shallow_layer:
            return False
        if not self._should_exit(i, hidden):
            return False
        self.stats.exits += 1
        self._record_exit(i + 1)
        if self.cfg.kv_fill == "lazy":
            assert ctx.positions is not None
            pe = self._pe if self._pe is not None and self._pe[0].shape[1] == 1 else None
            self._pending.append(_Pending(hidden[:, -1:], ctx.positions[:, -1:], i + 1, pe))
        elif self.cfg.kv_fill == "copy":
            self._copy_fill(i, hidden[:, -1:], ctx)
        return True

    def _should_exit(self, i: int, hidden: torch.Tensor) -> bool:
        """The exit rule at a scheduled layer i: predictor score (fused kernel) >= the layer's threshold, and the
        layer's full-head argmax is one of the candidates. hidden (1, Q, D); candidates already set."""
        assert self._cand is not None
        h = hidden[:, -1]  # (1, D)
        p = self._params[i]
        if self._use_dispatch(h):
            pred = exit_predictor(h, self._norm_w, self._norm_eps, self._head_w, self._cand, self._prev_probs,
                                  p["w1"], p["b1"], p["w2"], p["b2"],
                                  backend=self.cfg.backend,  # type: ignore[arg-type]
                                  check_indices=False)
            score, self._prev_probs = pred.score, pred.cand_probs
        else:
            score, self._prev_probs = self._lean_score(h, i)
        self.stats.checks += 1
        self.last_score = float(score[0])
        if self.last_score < self.threshold(i):
            return False
        top = int(self._full_logits(h).argmax())
        if top not in self._cand_list:  # SpecEE's rule: the layer's own token must be a candidate
            self.stats.rejected_by_argmax += 1
            return False
        return True

    def _use_dispatch(self, h: torch.Tensor) -> bool:
        """The kernel dispatch (Triton on CUDA / under TRITON_INTERPRET, or when a backend is forced); on a plain
        CPU run the lean path below computes the same features without the reference's per-call validation."""
        from vla_runtime.kernels.dispatch import interpret_requested

        return self.cfg.backend is not None or h.is_cuda or interpret_requested()

    def _full_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Every bin's logit (n_bins,) from hidden state h (1, D) through the final norm and the action head, in
        float32 (not `self.model.head(...)`: that would fire the emitted-token hook). Two fused ops."""
        n = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), self._norm_w32, self._norm_eps)
        return torch.nn.functional.linear(n, self._head_w32)[0]

    def _lean_score(self, h: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Same math as `exit_predictor_torch` (RMSNorm in float32, C head rows, softmax, [l | p | p - prev], MLP)
        with the norm weight folded into the C candidate rows once per token: 8 small ops instead of ~30 plus
        checks, which matters on CPU where a predictor call competes with a whole decode layer (~0.5 ms).
        (numpy would need fewer microseconds per op, but its BLAS threads fight torch's for the cores.)"""
        assert self._rows_t is not None
        p = self._params[i]
        x = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), None, self._norm_eps)  # (1, D)
        logits = x @ self._rows_t  # (1, C)
        probs = torch.softmax(logits, -1)
        feats = torch.cat([logits, probs, probs - self._prev_probs if self._prev_probs is not None else probs], -1)
        z = torch.relu(torch.addmm(p["b1"], feats, p["w1"]))
        return torch.sigmoid(torch.addmm(p["b2"], z, p["w2"]))[:, 0], probs

    def _record_exit(self, n_run: int) -> None:
        self._exits.append(n_run)
        self.stats.exit_layers.append(n_run)

    def _snapshot_prefill(self, hidden: torch.Tensor) -> None:
        """Bench shadow check: keep the prefill cache (tensors are never modified in place: `update` concatenates)
        and the ACT_START state, to replay the chunk at full depth after the episodes (outside the timing)."""
        c = self._cache
        if c is None:
            return
        self._prefill_snapshot = {"k": list(c.k), "v": list(c.v), "pos": list(c.pos), "kind": list(c.kind),
                                  "valid": list(c.valid)}

    # ---- parallel mode ------------------------------------------------------------------------------------
    def _after_layer_parallel(self, i: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        L = self.n_layers
        if i == 0:
            self._ensure_device(hidden)
            self._prev_chunk, self._prev_suffix, self._prev_layer = None, None, -1
            self._last_raw, self._last_raw_layer = None, -1
            self._check = set(self.offline)
            if self.cfg.online and self.cfg.context_window > 0:
                recent = list(ctx.memory.get(MEM_PREV_EXITS, []))[-self.cfg.context_window:]
                self._check |= online_layers(recent, self.cfg.context_offsets, self.available)
        if i == L - 1:
            self._end_parallel(L, ctx)
            return False
        n_suf = self.model.cfg.n_suffix
        if i not in self._check or i not in self._params:
            self._last_raw, self._last_raw_layer = hidden[:, -n_suf:], i  # a reference: the look-back source
            return False
        suffix = self.model.decoder.norm(hidden[:, -n_suf:])  # (B, S, D)
        chunk = self.model.head(suffix).float()  # (B, T, A)
        if i > 0 and self._prev_layer != i - 1 and self._last_raw_layer == i - 1:
            # look back one layer: the deltas always span one layer, even at the first check of a pass (without
            # it a lone scheduled layer sees zeros and its predictor cannot tell settled chunks apart)
            self._prev_suffix = self.model.decoder.norm(self._last_raw)
            self._prev_chunk = self.model.head(self._prev_suffix).float()
        x = parallel_features(chunk, self._prev_chunk, suffix, self._prev_suffix, i, L)
        self._prev_chunk, self._prev_suffix, self._prev_layer = chunk, suffix, i
        self._last_raw, self._last_raw_layer = hidden[:, -n_suf:], i
        self.stats.checks += 1
        score = _mlp_score(x, self._params[i])  # (B,)
        if bool((score >= self.threshold(i)).all()):
            self.stats.exits += 1
            if self.record_chunks:
                self.stats.chunks.append({"hidden": hidden, "layer": i, "kwargs": dict(self._layer_kwargs)})
            self._end_parallel(i + 1, ctx)
            return True
        return False

    def _end_parallel(self, n_run: int, ctx: StepContext) -> None:
        self.stats.exit_layers.append(n_run)
        ex = list(ctx.memory.get(MEM_PREV_EXITS, [])) + [n_run]
        ctx.memory[MEM_PREV_EXITS] = ex[-max(self.cfg.context_window, 1):]


# ---------------------------------------------------------------------------------------------------------------
# factory + registry
# ---------------------------------------------------------------------------------------------------------------
def default_predictor_dir(model: VLAModel) -> Path | None:
    """<checkpoint>/exit_predictors when the loader recorded the checkpoint directory on the model."""
    d = getattr(model, "checkpoint_dir", None)
    return Path(d) / PREDICTOR_DIR if d else None


def weights_digest(ckpt_dir: str | Path) -> str | None:
    """sha256 of <ckpt>/model.safetensors: predictors record it, the loader warns when the weights changed."""
    import hashlib

    p = Path(ckpt_dir) / "model.safetensors"
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_early_exit(model: VLAModel, predictors: str | Path | None = None, tag: str | None = None,
                    record_chunks: bool = False, **options: Any) -> EarlyExitPolicy:
    """`ACCELERATIONS["earlyexit"]`: load the predictors (default <checkpoint>/exit_predictors) and build the
    exit policy; `options` override the saved EarlyExitConfig fields (e.g. threshold=0.8, kv_fill="copy")."""
    path = Path(predictors) if predictors else default_predictor_dir(model)
    if path is None:
        raise UserError("earlyexit: no predictors given and the model does not know its checkpoint directory; "
                        "pass accel option predictors=DIR")
    bank = PredictorBank.load(path)
    want = bank.meta.get("train", {}).get("weights_sha256")
    ck = getattr(model, "checkpoint_dir", None)
    if want and ck and weights_digest(ck) not in (None, want):
        log.warning("earlyexit: %s was trained for other weights than %s/model.safetensors (retrain with "
                    "`vla-runtime train --policy exit-predictors`); exits may be wrong", path, ck)
    cfg = bank.config
    if options:
        cfg = EarlyExitConfig.from_dict({**cfg.to_dict(), **options})
    return EarlyExitPolicy(model, bank, cfg, tag=tag, record_chunks=record_chunks)


def _register() -> None:
    from vla_runtime.policies.vla.policy import register_acceleration

    register_acceleration("earlyexit", make_early_exit)


_register()


# ---------------------------------------------------------------------------------------------------------------
# entry points implemented in sibling modules (the CLI imports them from here)
# ---------------------------------------------------------------------------------------------------------------
def train_exit_predictors(checkpoint: str, data_dirs: list[Path], out: Path, device: str = "cpu",
                          **kw: Any) -> dict[str, Any]:
    """`vla-runtime train --policy exit-predictors`: see `early_exit_train.train_exit_predictors`."""
    from vla_runtime.policies.vla.early_exit_train import train_exit_predictors as _train

    return _train(checkpoint, data_dirs, out, device=device, **kw)


def bench_earlyexit(env: str, policy: str, episodes: int, seed: int, out: Path | None, **kw: Any) -> dict[str, Any]:
    """`vla-runtime bench earlyexit`: see `early_exit_bench.bench_earlyexit`."""
    from vla_runtime.policies.vla.early_exit_bench import bench_earlyexit as _bench

    return _bench(env=env, policy=policy, episodes=episodes, seed=seed, out=out, **kw)
