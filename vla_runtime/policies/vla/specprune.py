"""SpecPrune-VLA as a token-pruning strategy of the VLA layer loop (arXiv 2509.05614), plus its baselines.

Why: a VLA's decoder runs over hundreds of visual tokens per inference, most of which show a static scene.
SpecPrune drops them in two stages, guided by an action-aware controller:

1. Static pruning at the action level, before `prune_layer` (the layers before it run on every token; a
   pre-hook on their `self_attn` scores the visual tokens from the text query rows only, so they keep SDPA;
   see `SpecPrunePruner.install_row_hooks`). The kept visual set is
       local top-k  U  history top-k  U  changed patches,   capped by the mode's budget:
   - local: text->vision attention of *this* step at `local_layers` (head and query mean), top-k per camera;
   - history ("global"): the patches that were most important in the *previous* inference (their running
     importance at the end of that forward, kept in the per-episode memory). The public code builds this list
     empty and never fills it; here it is really used (tests/test_specprune.py shows it changes the kept set);
   - changed: per-patch cosine similarity of the raw frame to the same patch `prev_T` control steps ago;
     patches with similarity >= `sim_threshold` are static (drop candidates). prev_T shrinks with recent motion.
   Priority when the union exceeds the budget: local > history > changed (by dissimilarity) > static; if the
   union is smaller than the budget it is filled by local attention, so the budget fixes the compute.
2. Dynamic pruning at the layer level: before each of `dynamic_layers`, keep the top `dynamic_keep` fraction
   of the remaining visual tokens by a running importance (EMA over layers of attention-rank weights), never
   fewer than `floor` visual tokens.
3. Action-aware controller: from every executed action (the runtime's `on_action` hook) classify the phase:
   coarse (fast motion: aggressive budget) or fine (slow, e.g. grasping: gentle budget). Entering fine
   mid-chunk asks the runtime to drop the queued rest of the chunk and replan.

BOS, proprio, text and action (suffix) tokens are never pruned; kept tokens keep their original position ids
(the loop gathers positions with the rows), so rotary embeddings stay right.

All per-episode state lives in the policy's `memory` dict (cleared by `VLAPolicy.reset`); the per-forward
scratch lives in `ctx.extra`, so one pruner object serves any number of episodes.

Baselines at the same token budget (same prune point): `prune-random`, `prune-fastv` (local attention only,
FastV-style), `prune-framediff` (frame difference only, VLA-Cache-style selection).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vla_runtime.errors import UserError
from vla_runtime.kernels import attention_importance, image_patches, patch_cosine_similarity
from vla_runtime.policies.vla.modeling import KIND_PROPRIO, KIND_SUFFIX, KIND_TEXT, KIND_VISUAL, StepContext

log = logging.getLogger(__name__)

VARIANTS = ("specprune", "random", "fastv", "framediff")
MODES = ("coarse", "fine")
_QUERY_KINDS = {"text": KIND_TEXT, "proprio": KIND_PROPRIO, "suffix": KIND_SUFFIX}
MEM_KEY = "specprune"  # key of the pruner's per-episode state in the policy memory


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ControllerConfig:
    """Phase thresholds on the commanded OSC delta action (env units: 1 = 0.05 m / 0.5 rad per step).

    Defaults derived from LIBERO-Object expert demonstrations by `derive_controller_thresholds` (the rule and
    the numbers are in docs/SPECPRUNE.md): "fine" is how the robot moves in the steps around a grasp or a
    release (gripper command changes sign), "coarse" how it moves elsewhere. Entering fine uses the slow
    speeds of those windows; leaving it needs a clear lift (|z|), a lateral transport move (|xy|) or a large
    rotation with the chunk used up, which gives hysteresis (the vertical descent onto an object, fast in z
    but with no lateral motion, stays fine).
    """

    fine_speed: float = 0.42  # |a[0:3]| below -> fine (median speed around grasp/release)
    fine_xy: float = 0.09  # or: |a[0:2]| and |a[2]| below these and |a[3:6]| below fine_rot -> fine
    fine_z: float = 0.09
    fine_rot: float = 0.2
    leave_z: float = 0.66  # fine -> coarse if |a[2]| above (lift after the grasp)
    leave_xy: float = 0.36  # ... or |a[0:2]| above (transport)
    leave_rot: float = 0.48  # ... or |a[3:6]| above with the chunk used up
    start_step: int = 10  # executed actions before the controller may leave its initial coarse mode
    replan_on_fine: bool = True  # coarse -> fine mid-chunk: ask the runtime to replan

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, float) and v < 0:
                raise UserError(f"SpecPrune controller {k} must be >= 0, got {v}")
        if self.start_step < 0:
            raise UserError("SpecPrune controller start_step must be >= 0")


@dataclass
class SpecPruneConfig:
    """All knobs of SpecPrune and its ablations/baselines. Fractions are of the model's visual tokens."""

    variant: str = "specprune"  # specprune | random | fastv | framediff (baselines)
    static: bool = True  # stage 1 (action-level static pruning at prune_layer)
    dynamic: bool = True  # stage 2 (layer-level dynamic pruning)
    controller: bool = True  # action-aware budgets + replan; off: always the coarse budget
    use_local: bool = True
    use_history: bool = True
    use_framediff: bool = True
    # stage 1
    prune_layer: int = 1  # visual tokens are dropped before this layer (our VLAs train with drops after layer 1)
    local_layers: tuple[int, ...] = (0,)  # layers whose attention ranks visual tokens this step
    local_queries: tuple[str, ...] = ("text",)  # query tokens whose attention counts: text, proprio, suffix
    budget_coarse: float = 0.3  # visual tokens kept at prune_layer, coarse mode (training drops keep 30-50 %)
    budget_fine: float = 0.5  # ... fine mode (gentle)
    budget: float = 0.25  # baselines: fixed budget (no controller)
    fill: str = "attention"  # what fills the budget after the local/history/changed candidates: "attention"
    # (this step's layer-0 attention rank, the paper's choice) or "random" (a per-episode seeded draw: a spread-out
    # subset, which models trained with random token drops have seen; SPECPRUNE.md "Session 11")
    quota: tuple[float, float, float] | None = None  # (local, history, changed) shares of the budget reserved
    # for each source when their union exceeds it (each source's best first); None: strict tier priority
    # (local > history > changed), under which a budget below the local top-k keeps only local tokens, i.e. the
    # FastV-style set (SPECPRUNE.md "Session 16")
    local_k_coarse: float = 0.06  # local top-k per camera (fraction of the camera's patches), coarse
    local_k_fine: float = 0.10  # ... fine
    history_k: float = 0.06  # history top-k per camera
    sim_threshold: float = 0.986  # cosine >= this: static patch
    prev_t_min: int = 1  # frame-difference lookback in control steps, at high motion
    prev_t_max: int = 6  # ... at rest
    motion_ref: float = 0.6  # |a[0:3]| at which the lookback reaches prev_t_min
    frames_kept: int = 4  # past frames kept for the lookback
    # stage 2
    dynamic_layers: tuple[int, ...] | None = None  # None: every quarter of the depth after prune_layer
    dynamic_keep: float = 0.8  # fraction of remaining visual tokens kept at each dynamic layer
    floor: int = 16  # never fewer visual tokens than this after dynamic pruning
    ema_alpha: float = 0.2  # running importance = (1 - a) * old + a * rank weight of this layer
    rank_weight_hi: float = 10.0  # rank weights linspace(hi -> lo) over the ranked visual tokens
    rank_weight_lo: float = 0.1
    importance_layers: tuple[int, ...] | None = None  # None: local + layer round(3/8 depth) (paper: 0, 1, 12 of 32)
    ctrl: ControllerConfig = field(default_factory=ControllerConfig)
    seed: int = 0  # random baseline
    row_scores: bool = True  # score visual tokens from the query rows only (pre-hook; layers keep SDPA);
    # False: capture the full attention matrix with eager attention (transformers' only way to return it)

    def __post_init__(self) -> None:
        if isinstance(self.ctrl, dict):
            self.ctrl = ControllerConfig(**self.ctrl)
        self.local_layers = tuple(int(x) for x in self.local_layers)
        self.local_queries = tuple(self.local_queries)
        if self.dynamic_layers is not None:
            self.dynamic_layers = tuple(int(x) for x in self.dynamic_layers)
        if self.importance_layers is not None:
            self.importance_layers = tuple(int(x) for x in self.importance_layers)
        if self.variant not in VARIANTS:
            raise UserError(f"SpecPrune variant must be one of {VARIANTS}, got {self.variant!r}")
        for k in ("budget_coarse", "budget_fine", "budget", "dynamic_keep"):
            v = getattr(self, k)
            if not 0.0 < v <= 1.0:
                raise UserError(f"SpecPrune {k} must be in (0, 1], got {v}")
        for k in ("local_k_coarse", "local_k_fine", "history_k"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise UserError(f"SpecPrune {k} must be in [0, 1], got {getattr(self, k)}")
        if self.quota is not None:
            self.quota = tuple(float(x) for x in self.quota)  # type: ignore[assignment]
            if len(self.quota) != 3 or any(x < 0 for x in self.quota) or sum(self.quota) > 1.0 + 1e-9:
                raise UserError(f"SpecPrune quota must be three shares (local, history, changed) >= 0 summing to "
                                f"<= 1, got {self.quota}")
        if self.fill not in ("attention", "random"):
            raise UserError(f"SpecPrune fill must be 'attention' or 'random', got {self.fill!r}")
        if not 0.0 <= self.sim_threshold <= 1.0:
            raise UserError(f"SpecPrune sim_threshold must be in [0, 1], got {self.sim_threshold}")
        if self.prune_layer < 0:
            raise UserError("SpecPrune prune_layer must be >= 0")
        if any(l >= self.prune_layer for l in self.local_layers):
            raise UserError(f"SpecPrune local_layers {self.local_layers} must run before prune_layer "
                            f"{self.prune_layer} (their attention picks the tokens)")
        bad = [q for q in self.local_queries if q not in _QUERY_KINDS]
        if bad or not self.local_queries:
            raise UserError(f"SpecPrune local_queries must be a non-empty subset of {sorted(_QUERY_KINDS)}")
        if not 1 <= self.prev_t_min <= self.prev_t_max:
            raise UserError("SpecPrune needs 1 <= prev_t_min <= prev_t_max")
        if self.frames_kept < 1 or self.floor < 0 or self.motion_ref <= 0:
            raise UserError("SpecPrune frames_kept >= 1, floor >= 0 and motion_ref > 0 required")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise UserError(f"SpecPrune ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if self.variant == "specprune" and not (self.static or self.dynamic):
            raise UserError("SpecPrune with both stages off prunes nothing: use no acceleration instead")

    # ---- derived layers -------------------------------------------------------------------------------------
    def resolved_dynamic_layers(self, n_layers: int) -> tuple[int, ...]:
        if not self.dynamic or self.variant != "specprune":
            return ()
        if self.dynamic_layers is not None:
            layers = self.dynamic_layers
        else:
            layers = tuple(sorted({n_layers * q // 4 for q in (1, 2, 3)}))
        start = self.prune_layer if self.static else 0
        return tuple(l for l in layers if start < l < n_layers)

    def resolved_importance_layers(self, n_layers: int) -> tuple[int, ...]:
        dyn = self.resolved_dynamic_layers(n_layers)
        if not dyn:
            return ()
        if self.importance_layers is not None:
            layers = set(self.importance_layers)
        else:
            layers = set(self.local_layers) | {round(3 * n_layers / 8)}
        return tuple(sorted(l for l in layers if 0 <= l < max(dyn)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_controller_thresholds(episodes: list[np.ndarray], before: int = 10, after: int = 3,
                                 start_step: int = 10) -> tuple[ControllerConfig, dict[str, Any]]:
    """Controller thresholds from demonstration actions: a list of (T, 7) arrays in env units, gripper last.

    Fine windows: `before` steps before to `after` steps after every sign change of the gripper command (a
    grasp or a release). With v = |a[0:3]|, xy = |a[0:2]|, z = |a[2]|, rot = |a[3:6]|:
      fine_speed = median v in the windows; fine_xy = fine_z = 75th pct of xy in the windows;
      fine_rot = max(0.2, 90th pct of rot in the windows); leave_z = 1.1 x 75th pct of z in the windows;
      leave_xy = median xy outside the windows; leave_rot = max(0.3, 90th pct of rot outside the windows).
    Returns the config and the statistics it came from (for the docs).
    """
    fine, rest = [], []
    for a in episodes:
        a = np.asarray(a, np.float64)
        if a.ndim != 2 or a.shape[1] < 7:
            raise UserError(f"demo actions must be (T, >= 7) with the gripper last, got {a.shape}")
        g = np.sign(a[:, -1])
        m = np.zeros(len(a), bool)
        for t in np.nonzero(np.diff(g) != 0)[0] + 1:
            m[max(0, t - before):t + after] = True
        fine.append(a[m])
        rest.append(a[~m])
    F, R = np.concatenate(fine), np.concatenate(rest)
    if len(F) < 10 or len(R) < 10:
        raise UserError(f"too few demo actions around gripper events ({len(F)}) or elsewhere ({len(R)})")

    def mags(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"v": np.linalg.norm(x[:, 0:3], axis=1), "xy": np.linalg.norm(x[:, 0:2], axis=1),
                "z": np.abs(x[:, 2]), "rot": np.linalg.norm(x[:, 3:6], axis=1)}

    f, r = mags(F), mags(R)
    pct = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    cfg = ControllerConfig(fine_speed=round(pct(f["v"], 50), 3), fine_xy=round(pct(f["xy"], 75), 3),
                           fine_z=round(pct(f["xy"], 75), 3), fine_rot=round(max(0.2, pct(f["rot"], 90)), 3),
                           leave_z=round(1.1 * pct(f["z"], 75), 3), leave_xy=round(pct(r["xy"], 50), 3),
                           leave_rot=round(max(0.3, pct(r["rot"], 90)), 3), start_step=start_step)
    stats = {"n_fine": int(len(F)), "n_rest": int(len(R)),
             **{f"fine_{k}_p25_p50_p75": [round(pct(v, q), 3) for q in (25, 50, 75)] for k, v in f.items()},
             **{f"rest_{k}_p25_p50_p75": [round(pct(v, q), 3) for q in (25, 50, 75)] for k, v in r.items()}}
    return cfg, stats


# ---------------------------------------------------------------------------------------------------------------
# the controller (pure state machine over executed actions)
# ---------------------------------------------------------------------------------------------------------------
def classify_action(action: np.ndarray, mode: str, c: ControllerConfig, chunk_used: bool) -> str:
    """Next phase from one commanded action and the current phase (hysteresis between the two)."""
    a = np.asarray(action, np.float64)
    v = float(np.linalg.norm(a[0:3]))
    xy = float(np.linalg.norm(a[0:2]))
    z = abs(float(a[2]))
    rot = float(np.linalg.norm(a[3:6])) if a.shape[0] >= 6 else 0.0
    if mode == "coarse":
        if v < c.fine_speed or (xy < c.fine_xy and z < c.fine_z and rot < c.fine_rot):
            return "fine"
        return "coarse"
    if z > c.leave_z or xy > c.leave_xy or (rot > c.leave_rot and chunk_used):
        return "coarse"
    return "fine"


# ---------------------------------------------------------------------------------------------------------------
# the pruner
# ---------------------------------------------------------------------------------------------------------------
class QKProbes(list):  # type: ignore[type-arg]
    """The q/k probes installed on one attention module (`self_attn.qk_probe`), called in order."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        for fn in self:
            fn(q, k, mask)


def _rank_weights(scores: torch.Tensor, hi: float, lo: float) -> torch.Tensor:
    """scores (B, n) -> weights (B, n): the best-ranked token gets `hi`, the worst `lo`, linear in rank."""
    n = scores.shape[1]
    if n == 0:
        return scores.float()
    w = torch.linspace(hi, lo, n, device=scores.device)  # (n,)
    order = scores.float().argsort(dim=1, descending=True)  # (B, n)
    out = torch.empty_like(scores, dtype=torch.float32)
    out.scatter_(1, order, w.expand_as(out).contiguous())
    return out


class SpecPrunePruner:
    """`TokenPruner` for SpecPrune and the same-budget baselines (see module docstring).

    Layout facts it relies on (VLAConfig): visual tokens have positions 1 .. n_visual, camera c's patch j at
    position 1 + c * P + j, row-major over the patch grid (the ViT's order); they precede every other
    non-BOS token, so after any sorted pruning the remaining visual tokens are contiguous in the sequence.
    """

    def __init__(self, n_layers: int, n_cameras: int, patches_per_camera: int, patch_size: int,
                 n_action_steps: int, config: SpecPruneConfig | None = None) -> None:
        self.cfg = config or SpecPruneConfig()
        c = self.cfg
        if c.prune_layer >= n_layers and (c.static or c.variant != "specprune"):
            raise UserError(f"SpecPrune prune_layer {c.prune_layer} >= the model's {n_layers} layers")
        self.n_layers = n_layers
        self.n_cam, self.P, self.patch = n_cameras, patches_per_camera, patch_size
        self.n_visual = n_cameras * patches_per_camera
        self.n_action_steps = n_action_steps
        self.dynamic_layers = c.resolved_dynamic_layers(n_layers)
        self.importance_layers = c.resolved_importance_layers(n_layers)
        want: set[int] = set()
        if c.variant in ("specprune", "fastv") and (c.static or c.variant == "fastv"):
            if c.variant == "fastv" or c.use_local or c.use_history:
                want |= set(c.local_layers)
        want |= set(self.importance_layers)
        self.score_layers = frozenset(want)  # layers whose text->vision attention the pruner reads
        # every layer whose before_layer does something (CUDA graphs run the layers between them as one graph)
        self.call_layers = frozenset({0, c.prune_layer} | set(self.dynamic_layers) | set(want)
                                     | {j + 1 for j in self.importance_layers})
        self.attention_layers: frozenset[int] = frozenset(want)  # eager capture, unless row hooks replace it
        # before_layer(j) reads only the row scores of layers < j (probes/pre-hooks, computed before their
        # attention runs) and this step's frames: the loop may cut inside layer j - 1 (TokenPruner.early_cuts;
        # a layer whose attention is captured eagerly is never cut early)
        self.early_cuts = True
        self._armed: dict[int, StepContext] = {}
        self._hooks: list[Any] = []
        self._probed: list[tuple[Any, Any]] = []

    def install_row_hooks(self, decoder_layers: Any) -> bool:
        """Compute the scores of `score_layers` in a pre-hook on each layer's `self_attn` from the query rows
        only (R x N instead of the eager N x N attention), so those layers keep SDPA. False (eager capture stays)
        if the attention modules do not look like stock Llama/Qwen2/Gemma attention."""
        mods = []
        for l in sorted(self.score_layers):
            a = getattr(decoder_layers[l], "self_attn", None)
            if a is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")):
                return False
            mods.append((l, a))
        for l, a in mods:
            self._hooks.append(a.register_forward_pre_hook(self._make_row_hook(l), with_kwargs=True))
            # the lean CPU layer hands its own rotated q/k to this probe (no second projection of the rows);
            # the pre-hook then leaves the scoring to it (kwarg qk_probe_follows)
            probes = a.__dict__.get("qk_probe")
            if not isinstance(probes, QKProbes):  # one list per module: several pruners may share a model
                probes = a.qk_probe = QKProbes()
            fn = self._make_qk_probe(l, a)
            probes.append(fn)
            self._probed.append((a, fn))
        self.attention_layers = frozenset()
        return True

    def remove_row_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        for a, fn in self._probed:
            probes = a.__dict__.get("qk_probe")
            if isinstance(probes, QKProbes):
                probes[:] = [f for f in probes if f is not fn]
                if not probes:
                    del a.qk_probe
        self._hooks, self._probed = [], []

    def _make_row_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if kwargs.get("qk_probe_follows"):
                return None  # the lean layer calls the q/k probe with the rows it computes anyway
            ctx = self._armed.pop(layer, None)
            if ctx is None:  # another pruner's forward through a shared model, or a decode step
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._row_importance(module, layer, hidden, kwargs.get("position_embeddings"),
                                 kwargs.get("attention_mask"), ctx)
            return None

        return hook

    def _make_qk_probe(self, layer: int, attn: Any) -> Callable[..., None]:
        scaling = float(attn.scaling)

        def probe(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
            ctx = self._armed.pop(layer, None)
            if ctx is None:
                return None
            rows = self._query_rows(ctx)
            self._scores_to_importance(q[:, :, rows], k, mask, rows, scaling, layer, ctx)
            return None

        return probe

    def _scores_to_importance(self, q_rows: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                              rows: torch.Tensor, scaling: float, layer: int, ctx: StepContext) -> None:
        """q_rows (B, H, R, hd), k (B, Hkv, N, hd), both rotated -> softmax rows -> importance of the visuals."""
        start, stop, _ = self._visual_span(ctx)
        B, H, R, hd = q_rows.shape
        Hkv = k.shape[1]
        # GQA without copying the keys: the H / Hkv query heads of a group share one key head
        qg = q_rows.float().reshape(B, Hkv, (H // Hkv) * R, hd)
        scores = (qg @ k.float().transpose(-1, -2)).reshape(B, H, R, -1) * scaling  # (B, H, R, N)
        if mask is not None:
            scores = scores + mask.index_select(2, rows).float()
        probs = scores.softmax(-1)
        imp = attention_importance(probs, slice(0, R), (start, stop), check_indices=False)
        ctx.extra[MEM_KEY].setdefault("imp", {})[layer] = imp

    def _row_importance(self, attn: Any, layer: int, hidden: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor],
                        mask: torch.Tensor | None, ctx: StepContext) -> None:
        """softmax(q_rows k^T * scale + mask_rows) (B, H, R, N) -> attention_importance -> sc["imp"][layer]."""
        import sys

        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model family's own rotary
        rows = self._query_rows(ctx)
        B, N, _ = hidden.shape
        hd = int(attn.head_dim)
        cos, sin = pe  # (B, N, hd)
        q = attn.q_proj(hidden[:, rows]).view(B, rows.numel(), -1, hd).transpose(1, 2)  # (B, H, R, hd)
        k = attn.k_proj(hidden).view(B, N, -1, hd).transpose(1, 2)  # (B, Hkv, N, hd)
        q = rope(q, q, cos[:, rows], sin[:, rows])[0]
        k = rope(k, k, cos, sin)[0]
        self._scores_to_importance(q, k, mask, rows, float(attn.scaling), layer, ctx)

    # ---- per-episode state ----------------------------------------------------------------------------------
    def state(self, memory: dict[str, Any]) -> dict[str, Any]:
        st = memory.get(MEM_KEY)
        if st is None:
            st = {"mode": "coarse", "executed": [], "since_infer": 0, "n_exec": 0, "frames": [],
                  "history": None, "mode_log": [], "replans": 0, "inferences": 0, "rng": None}
            memory[MEM_KEY] = st
        return st

    def mode(self, memory: dict[str, Any]) -> str:
        return self.state(memory)["mode"] if self.cfg.controller and self.cfg.variant == "specprune" else "coarse"

    def on_action(self, action: np.ndarray, memory: dict[str, Any]) -> bool:
        """Runtime hook, once per executed action: update the phase; True = replan (coarse -> fine mid-chunk)."""
        st = self.state(memory)
        a = np.asarray(action, np.float32).reshape(-1)
        st["executed"].append(a)
        del st["executed"][:-max(self.n_action_steps, 1)]
        st["n_exec"] += 1
        st["since_infer"] += 1
        if not (self.cfg.controller and self.cfg.variant == "specprune"):
            st["mode_log"].append("c")
            return False
        old = st["mode"]
        new = old
        if st["n_exec"] > self.cfg.ctrl.start_step:
            new = classify_action(a, old, self.cfg.ctrl, st["since_infer"] >= self.n_action_steps)
        st["mode"] = new
        st["mode_log"].append(new[0])
        if old == "coarse" and new == "fine" and self.cfg.ctrl.replan_on_fine \
                and st["since_infer"] < self.n_action_steps:
            st["replans"] += 1
            return True
        return False

    # ---- the hook -------------------------------------------------------------------------------------------
    def before_layer(self, layer_idx: int, ctx: StepContext) -> torch.Tensor | None:
        if ctx.decode_step >= 0:  # AR decode steps see only the new token
            return None
        if layer_idx == 0:
            self._begin(ctx)
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        c = self.cfg
        keep: torch.Tensor | None = None
        if self._hooks and layer_idx in self.score_layers:
            self._armed[layer_idx] = ctx  # the row hook of this layer scores the tokens that enter it
        if (layer_idx - 1) in self.importance_layers and sc.get("score") is not None:
            self._update_importance(ctx, layer_idx - 1)  # deeper layers refine the running score
        if layer_idx == c.prune_layer and (c.static or c.variant != "specprune"):
            keep = self._static_keep(ctx)
        elif layer_idx in self.dynamic_layers:
            if c.variant == "specprune" and not c.static and sc.get("score") is None:
                self._init_importance(ctx)
            keep = self._dynamic_keep(ctx)
        return keep

    # ---- stage 0: step start (frames, mode, history hand-over) ----------------------------------------------
    def _begin(self, ctx: StepContext) -> None:
        c = self.cfg
        st = self.state(ctx.memory)
        st["inferences"] += 1
        mode = self.mode(ctx.memory)
        step = int(ctx.extra.get("step", st["n_exec"]))
        info = ctx.extra.setdefault("info", {})
        self._history_from_last(st)
        assert ctx.kinds is not None and ctx.positions is not None
        B, N = ctx.kinds.shape
        vis = (ctx.kinds[0] == KIND_VISUAL).nonzero().squeeze(1)
        if vis.numel() != self.n_visual or (vis.numel() and (int(vis[0]) != 1 or int(vis[-1]) != self.n_visual)):
            raise ValueError(f"SpecPrune: expected the {self.n_visual} visual tokens at indices 1..{self.n_visual} "
                             "(VLAConfig layout)")
        pid = torch.arange(self.n_visual, device=ctx.kinds.device)[None].expand(B, -1)
        sc: dict[str, Any] = {"mode": mode, "step": step, "score": None, "sim": None, "prev_t": None,
                              "history": st["history"], "info": info, "n_vis": self.n_visual, "pid": pid}
        st["last"] = sc  # its final score / patch ids become the next step's history
        ctx.extra[MEM_KEY] = sc
        modes = "".join(st["mode_log"])
        st["mode_log"] = []
        st["since_infer"] = 0
        info.update(prune_variant=c.variant, prune_mode=mode, prune_fine=int(mode == "fine"),
                    prune_modes_executed=modes, prune_replans=st["replans"])
        log.debug("specprune step %d: mode %s, executed since last inference %s", step, mode, modes or "-")
        if c.variant in ("specprune", "framediff") and (c.use_framediff or c.variant == "framediff") \
                and ctx.images is not None:
            self._frame_difference(ctx, st, sc, step)

    def _frame_difference(self, ctx: StepContext, st: dict[str, Any], sc: dict[str, Any], step: int) -> None:
        """Per-patch cosine similarity (B, n_visual) to the frame prev_T control steps ago (None: no frame)."""
        c = self.cfg
        imgs = ctx.images
        assert imgs is not None
        B, C = imgs.shape[:2]
        if C != self.n_cam:
            raise ValueError(f"SpecPrune: {C} cameras in the images, the model has {self.n_cam}")
        # raw-pixel-like, non-negative values as in the paper ([-1, 1] -> [0, 2]), in the frames' dtype (the
        # kernel accumulates in float32); (B*C, H, W, 3) view -> one copy into patches
        x = (imgs.detach().flatten(0, 1) + 1.0).permute(0, 2, 3, 1)
        cur = image_patches(x, self.patch)  # (B*C, P, p*p*3)
        if cur.shape[1] != self.P:
            raise ValueError(f"SpecPrune: {cur.shape[1]} patches per camera, the model has {self.P}")
        executed = st["executed"]
        motion = float(np.mean([np.linalg.norm(a[0:3]) for a in executed])) if executed else 0.0
        frac = min(motion / c.motion_ref, 1.0)
        prev_t = int(round(c.prev_t_max - (c.prev_t_max - c.prev_t_min) * frac))
        frames: list[tuple[int, torch.Tensor, torch.Tensor]] = st["frames"]
        ref = None
        older = [f for f in frames if f[0] <= step - prev_t and f[1].shape == cur.shape]
        if older:
            ref = older[-1]  # the most recent frame at least prev_t steps old
        elif frames and frames[0][1].shape == cur.shape and frames[0][0] < step:
            ref = frames[0]  # only younger frames: the oldest we have
        # a patch that is all-zero in both frames scores 0 in cosine but has not changed: 1 (the zero flag is
        # kept with the frame: one reduction per frame instead of an elementwise comparison of two frames)
        zero = cur.abs().amax(dim=-1) == 0  # (B*C, P)
        if ref is not None:
            sim = patch_cosine_similarity(cur, ref[1])  # (B*C, P)
            sim = sim.masked_fill(zero & ref[2], 1.0)
            sc["sim"] = sim.reshape(B, C * self.P)  # (B, n_visual)
            sc["prev_t"] = step - ref[0]
        frames.append((step, cur, zero))
        del frames[:-c.frames_kept]
        sc["info"]["prune_prev_t"] = prev_t

    # ---- helpers over the current tokens --------------------------------------------------------------------
    def _visual_span(self, ctx: StepContext) -> tuple[int, int, torch.Tensor]:
        """(start, stop) of the visual tokens in the current sequence and their patch ids (B, n).

        Tracked across cuts instead of searched: visual tokens start at index 1 (after BOS) and stay contiguous.
        """
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        return 1, 1 + sc["n_vis"], sc["pid"]

    def _query_rows(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.kinds is not None and ctx.valid is not None
        sc = ctx.extra.get(MEM_KEY)
        cached = sc.get("rows") if isinstance(sc, dict) else None
        if cached is not None and cached[0] is ctx.kinds:  # same token set as the last call of this forward
            return cached[1]
        rows = self._find_query_rows(ctx)
        if isinstance(sc, dict):
            sc["rows"] = (ctx.kinds, rows)
        return rows

    def _find_query_rows(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.kinds is not None and ctx.valid is not None
        want = torch.zeros_like(ctx.kinds[0], dtype=torch.bool)
        for q in self.cfg.local_queries:
            want |= ctx.kinds[0] == _QUERY_KINDS[q]
        want &= ctx.valid.all(0)
        rows = want.nonzero().squeeze(1)
        if rows.numel() == 0:  # e.g. an empty instruction: fall back to every non-visual token after the visuals
            rows = ((ctx.kinds[0] != KIND_VISUAL) & (torch.arange(want.numel(), device=want.device) > 0)
                    ).nonzero().squeeze(1)
        return rows

    def _importance(self, ctx: StepContext, layer: int, start: int, stop: int) -> torch.Tensor:
        """Mean attention the visual tokens [start, stop) received at `layer` from the query tokens, (B, n).

        Computed once per layer and forward (the local layers feed both the local top-k and the running score).
        """
        cache: dict[int, torch.Tensor] = ctx.extra[MEM_KEY].setdefault("imp", {})
        if layer in cache and cache[layer].shape[1] == stop - start:
            return cache[layer]
        if self._hooks:
            raise ValueError(f"SpecPrune: no row scores for layer {layer} with {stop - start} visual tokens")
        attn = ctx.attentions.get(layer)
        if attn is None:
            raise ValueError(f"SpecPrune: layer {layer}'s attention was not captured")
        n_q = attn.shape[2]
        rows = self._query_rows(ctx)
        off = attn.shape[3] - n_q  # cached keys (none in prefill)
        imp = attention_importance(attn, rows[rows < n_q], (start + off, stop + off), check_indices=False)
        cache[layer] = imp
        return imp

    # ---- stage 1 --------------------------------------------------------------------------------------------
    def _static_keep(self, ctx: StepContext) -> torch.Tensor | None:
        c = self.cfg
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        assert ctx.kinds is not None and ctx.positions is not None
        start, stop, _ = self._visual_span(ctx)
        n = stop - start
        if n == 0:
            return None
        B, dev = ctx.kinds.shape[0], ctx.kinds.device
        if n != self.n_visual:
            raise ValueError(f"SpecPrune: {n} visual tokens at the prune point, expected all {self.n_visual}")
        mode = sc["mode"]
        budget_frac = c.budget if c.variant != "specprune" else (
            c.budget_fine if mode == "fine" and c.controller else c.budget_coarse)
        k = min(n, max(1, math.ceil(budget_frac * n)))
        local = None
        if c.variant == "fastv" or (c.variant == "specprune" and (c.use_local or c.use_history)):
            local = torch.stack([self._importance(ctx, l, start, stop) for l in c.local_layers]).mean(0)  # (B, n)
            if c.variant == "specprune":
                sc["score"] = self._ema_init(ctx, start, stop)
        sim = sc.get("sim")
        if c.variant == "random":
            prio = self._draw(ctx, B, n, dev)
        elif c.variant == "fastv":
            assert local is not None
            prio = local.float()
        elif c.variant == "framediff":
            prio = (1.0 - sim) if sim is not None else torch.rand(B, n, generator=torch.Generator().manual_seed(
                c.seed)).to(dev)
        else:
            rand = self._draw(ctx, B, n, dev) if c.fill == "random" else None
            prio = self._specprune_priority(sc, local, sim, B, n, dev, rand, k)
        keep_vis = prio.float().topk(k, dim=1).indices.sort(dim=1).values  # (B, k) into the visual span
        info = sc["info"]
        info.update(prune_budget=k, visual_kept_static=k)
        if sim is not None:
            static = sim >= c.sim_threshold
            info["prune_static_patches"] = int(static[0].sum())
        return self._full_indices(ctx, start, stop, keep_vis)

    def _draw(self, ctx: StepContext, B: int, n: int, dev: torch.device) -> torch.Tensor:
        """Uniform (B, n) from the episode's generator (seeded by cfg.seed at the first inference: reproducible)."""
        st = self.state(ctx.memory)
        if st["rng"] is None:
            st["rng"] = torch.Generator().manual_seed(self.cfg.seed)
        return torch.rand(B, n, generator=st["rng"]).to(dev)

    def _specprune_priority(self, sc: dict[str, Any], local: torch.Tensor | None, sim: torch.Tensor | None,
                            B: int, n: int, dev: torch.device, rand: torch.Tensor | None = None,
                            k: int | None = None) -> torch.Tensor:
        """Tiered priority (B, n): 3 + s local top-k, 2 + s history top-k, 1 + s changed, s static, s in [0, 1).

        `rand` (fill="random"): s of the tokens that no signal ranks (static ones, or all non-picks while there is
        no reference frame) is this draw instead of the attention rank. With `cfg.quota` and the budget `k`, each
        source's best round(share * k) tokens are lifted above every tier first (tier 4), so history and changed
        patches keep seats even when the local top-k alone would fill the budget.
        """
        c = self.cfg
        mode = sc["mode"]
        info = sc["info"]
        if local is not None:
            fill = _unit_rank(local)  # (B, n) in [0, 1): tie-breaker and filler within each tier
        else:
            fill = torch.zeros(B, n, device=dev)
        tier = torch.zeros(B, n, device=dev)
        # changed patches (no reference frame yet: all count as changed)
        if c.use_framediff and sim is not None:
            changed = sim < c.sim_threshold
            tier = torch.where(changed, torch.ones_like(tier), tier)
            fill = torch.where(changed, _unit_rank(1.0 - sim) * 0.5 + fill * 0.5, fill)
        elif c.use_framediff or not (c.use_local or c.use_history):
            tier = torch.ones_like(tier)
        n_hist = 0
        if c.use_history and sc.get("history") is not None:
            hist = sc["history"].to(dev)  # (B, n_visual) importance at the end of the previous inference
            kh = int(round(c.history_k * self.P))
            if kh > 0 and hist.shape == (B, n):
                sel = self._per_camera_topk(hist, kh)
                tier = torch.where(sel, torch.maximum(tier, torch.full_like(tier, 2.0)), tier)
                n_hist = int(sel[0].sum())
        n_local = 0
        if c.use_local and local is not None:
            kl = int(round((c.local_k_fine if mode == "fine" and c.controller else c.local_k_coarse) * self.P))
            if kl > 0:
                sel = self._per_camera_topk(local, kl)
                tier = torch.where(sel, torch.full_like(tier, 3.0), tier)
                n_local = int(sel[0].sum())
        info.update(prune_local_k=n_local, prune_history_k=n_hist,
                    prune_candidates=int((tier[0] >= 1).sum()))
        if c.quota is not None and k is not None:
            tier = self._apply_quota(tier, local, hist_score=sc.get("history") if n_hist else None,
                                     changed_score=(1.0 - sim) if (c.use_framediff and sim is not None) else None,
                                     k=k, info=info)
        if rand is not None:
            unranked = tier < (1.0 if c.use_framediff and sim is not None else 2.0)
            fill = torch.where(unranked, rand, fill)
        return tier + fill.clamp(0.0, 0.999)

    def _apply_quota(self, tier: torch.Tensor, local: torch.Tensor | None, hist_score: torch.Tensor | None,
                     changed_score: torch.Tensor | None, k: int, info: dict[str, Any]) -> torch.Tensor:
        """Reserve budget shares: in order local, history, changed, the best round(share * k) members of each
        source's candidate set (tier 3 / >= 2 / >= 1) not yet reserved get tier 4. Only when the candidates
        exceed the budget; otherwise every candidate is kept anyway."""
        assert self.cfg.quota is not None
        if int((tier[0] >= 1).sum()) <= k:
            info["prune_quota_used"] = 0
            return tier
        reserved = torch.zeros_like(tier, dtype=torch.bool)
        sources = [(tier >= 3, local), (tier >= 2, hist_score), (tier >= 1, changed_score)]
        left = k
        for (member, score), share in zip(sources, self.cfg.quota):
            m = min(left, int(round(share * k)))
            if m <= 0 or score is None:
                continue
            cand = member & ~reserved
            s = torch.where(cand, score.to(tier.device).float(), torch.full_like(tier, float("-inf")))
            top = s.topk(min(m, s.shape[1]), dim=1)
            pick = torch.zeros_like(reserved).scatter_(1, top.indices, torch.isfinite(top.values))
            reserved |= pick
            left -= int(pick[0].sum())
        info["prune_quota_used"] = int(reserved[0].sum())
        return torch.where(reserved, torch.full_like(tier, 4.0), tier)

    def _per_camera_topk(self, score: torch.Tensor, k: int) -> torch.Tensor:
        """Bool (B, n_visual): the k best patches of each camera."""
        B = score.shape[0]
        s = score.float().reshape(B, self.n_cam, self.P)
        k = min(k, self.P)
        idx = s.topk(k, dim=2).indices
        sel = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx, True)
        return sel.reshape(B, self.n_visual)

    # ---- stage 2 --------------------------------------------------------------------------------------------
    def _ema_init(self, ctx: StepContext, start: int, stop: int) -> torch.Tensor | None:
        """Running importance over the local layers (EMA of rank weights), (B, n_current_visual)."""
        c = self.cfg
        if not self.dynamic_layers and not c.use_history:
            return None
        score = None
        for l in c.local_layers:
            w = _rank_weights(self._importance(ctx, l, start, stop), c.rank_weight_hi, c.rank_weight_lo)
            score = w if score is None else (1 - c.ema_alpha) * score + c.ema_alpha * w
        return score

    def _init_importance(self, ctx: StepContext) -> None:
        """Dynamic-only ablation: the running score starts from the importance layers before the first cut."""
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        start, stop, _ = self._visual_span(ctx)
        score = None
        c = self.cfg
        for l in self.importance_layers:
            if (l in ctx.attentions or l in sc.get("imp", {})) and l < ctx.layer_idx:
                w = _rank_weights(self._importance(ctx, l, start, stop), c.rank_weight_hi, c.rank_weight_lo)
                score = w if score is None else (1 - c.ema_alpha) * score + c.ema_alpha * w
        sc["score"] = score

    def _update_importance(self, ctx: StepContext, layer: int) -> None:
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        score = sc.get("score")
        if score is None or (layer not in ctx.attentions and layer not in sc.get("imp", {})):
            return
        start, stop, _ = self._visual_span(ctx)
        if stop - start != score.shape[1]:
            return  # the attention is from before a cut: the score already describes fewer tokens
        c = self.cfg
        w = _rank_weights(self._importance(ctx, layer, start, stop), c.rank_weight_hi, c.rank_weight_lo)
        sc["score"] = (1 - c.ema_alpha) * score + c.ema_alpha * w

    def _dynamic_keep(self, ctx: StepContext) -> torch.Tensor | None:
        c = self.cfg
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        score = sc.get("score")
        start, stop, _ = self._visual_span(ctx)
        n = stop - start
        if score is None or n <= c.floor or score.shape[1] != n:
            return None
        k = max(c.floor, math.ceil(c.dynamic_keep * n))
        if k >= n:
            return None
        keep_vis = score.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
        return self._full_indices(ctx, start, stop, keep_vis)

    # ---- output ---------------------------------------------------------------------------------------------
    def _full_indices(self, ctx: StepContext, start: int, stop: int, keep_vis: torch.Tensor) -> torch.Tensor | None:
        """Visual picks (B, k) into [start, stop) -> sorted indices (B, K) into all current tokens (others kept)."""
        assert ctx.kinds is not None
        B, N = ctx.kinds.shape
        if keep_vis.shape[1] == stop - start:
            return None  # keeps everything: let the loop skip the gather
        dev = ctx.kinds.device
        keep_vis = keep_vis.to(dev)
        before = torch.arange(0, start, device=dev)[None].expand(B, -1)
        after = torch.arange(stop, N, device=dev)[None].expand(B, -1)
        sc: dict[str, Any] = ctx.extra[MEM_KEY]
        if sc.get("score") is not None and sc["score"].shape[1] == stop - start:
            sc["score"] = sc["score"].gather(1, keep_vis.to(sc["score"].device))
        sc["pid"] = sc["pid"].gather(1, keep_vis)
        sc["n_vis"] = int(keep_vis.shape[1])
        return torch.cat([before, keep_vis + start, after], dim=1)

    def _history_from_last(self, st: dict[str, Any]) -> None:
        """The previous forward's final running importance per patch id becomes this step's history.

        Patches dropped before the end get -1 (they were not important then); the result is (B, n_visual).
        """
        last = st.pop("last", None)
        if last is None or not self.cfg.use_history:
            return
        score, pid = last.get("score"), last["pid"]
        if score is None or score.shape != pid.shape:
            return
        hist = torch.full((pid.shape[0], self.n_visual), -1.0, device=score.device)
        st["history"] = hist.scatter_(1, pid.to(score.device), score.float())


def _unit_rank(x: torch.Tensor) -> torch.Tensor:
    """(B, n) -> rank-normalised values in [0, 1): 0 for the smallest, (n-1)/n for the largest."""
    n = x.shape[1]
    r = x.float().argsort(dim=1).argsort(dim=1).float()
    return r / max(n, 1)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------
# accel name -> overrides of SpecPruneConfig
ACCEL_PRESETS: dict[str, dict[str, Any]] = {
    "specprune": {},
    "specprune-static": {"dynamic": False},
    "specprune-dynamic": {"static": False},
    "specprune-nocontroller": {"controller": False},
    "prune-random": {"variant": "random", "controller": False, "dynamic": False},
    "prune-fastv": {"variant": "fastv", "controller": False, "dynamic": False},
    "prune-framediff": {"variant": "framediff", "controller": False, "dynamic": False},
}


def checkpoint_specprune_defaults(model: Any) -> dict[str, Any]:
    """`extra.specprune` of the model's config (validated: unknown fields are an error naming the checkpoint)."""
    extra = getattr(getattr(model, "cfg", None), "extra", None) or {}
    d = extra.get("specprune") or {}
    if not isinstance(d, dict):
        raise UserError(f"config extra.specprune of {getattr(model, 'checkpoint_dir', 'the checkpoint')} must be "
                        f"an object of SpecPrune options, got {type(d).__name__}")
    bad = sorted(set(d) - set(SpecPruneConfig.__dataclass_fields__) - {"note"})
    if bad:
        raise UserError(f"config extra.specprune of {getattr(model, 'checkpoint_dir', 'the checkpoint')} has "
                        f"unknown SpecPrune options {bad}")
    return {k: v for k, v in d.items() if k != "note"}


def make_pruner(model: Any, name: str = "specprune", **options: Any) -> SpecPrunePruner:
    """Factory for the ACCELERATIONS registry: `model` is a VLAModel; options override SpecPruneConfig fields.

    A checkpoint may carry its own SpecPrune settings in `config.json` -> `extra.specprune` (budgets and layers
    chosen for that model, e.g. a 512-token model prunes harder than a 128-token one); they apply to every
    preset (the ablations and baselines share them), under the preset's stage switches and the caller's options.
    """
    if name not in ACCEL_PRESETS:
        raise UserError(f"unknown SpecPrune preset {name!r} (available: {', '.join(ACCEL_PRESETS)})")
    known = set(SpecPruneConfig.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise UserError(f"unknown SpecPrune options {bad} (known: {sorted(known)})")
    ckpt = checkpoint_specprune_defaults(model)
    cfg = SpecPruneConfig(**{**ckpt, **ACCEL_PRESETS[name], **options})
    mc = model.cfg
    pr = SpecPrunePruner(n_layers=model.n_layers, n_cameras=len(mc.cameras), patches_per_camera=mc.patches_per_camera,
                         patch_size=mc.patch_size, n_action_steps=mc.n_action_steps, config=cfg)
    if cfg.row_scores and pr.score_layers and not pr.install_row_hooks(model.decoder.layers):
        log.warning("SpecPrune: attention modules of %s are not stock; capturing eager attention instead",
                    type(model.decoder).__name__)
    return pr


def _factory(name: str) -> Callable[..., SpecPrunePruner]:
    def f(model: Any, **options: Any) -> SpecPrunePruner:
        return make_pruner(model, name, **options)

    f.__name__ = f"make_{name.replace('-', '_')}"
    return f


def register() -> None:
    from vla_runtime.policies.vla.policy import register_acceleration

    for name in ACCEL_PRESETS:
        register_acceleration(name, _factory(name))


register()


# ---------------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------------
def _default_policy(policy: str) -> str:
    if policy:
        return policy
    from vla_runtime.policies import list_policies

    vlas = [p for p in list_policies() if p.startswith("vla:")]
    if not vlas:
        raise UserError("bench specprune needs a VLA: none is shipped; pass --policy vla:<checkpoint dir>")
    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.vla.configuration import VLAConfig

    def tuned(name: str) -> bool:  # a checkpoint shipped with its own SpecPrune settings (config extra.specprune)
        try:
            cfg = VLAConfig.load(resolve_checkpoint(name.partition(":")[2]) / "config.json")
        except (UserError, TypeError, ValueError):
            return False
        return bool((cfg.extra or {}).get("specprune"))

    return next((v for v in vlas if tuned(v)), vlas[0])


def _token_fields(m: Any, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean visual / all tokens per decoder layer over the method's inferences (from the chunk infos)."""
    acc = [r.get("accel") or {} for r in recs]
    out: dict[str, Any] = {}
    for key, name in (("mean_mean_visual_tokens", "mean_visual_tokens_per_layer"),
                      ("mean_mean_tokens", "mean_tokens_per_layer"), ("mean_prune_fine", "fine_fraction")):
        vals = [a[key] for a in acc if key in a]
        if vals:
            out[name] = round(float(np.mean(vals)), 2)
    out["replans"] = int(sum(r.get("replans", 0) for r in recs))
    return out


SPECPRUNE_BENCH_ARMS = ("specprune", "specprune-static", "specprune-dynamic", "specprune-nocontroller",
                        "prune-random", "prune-fastv", "prune-framediff")


def bench_specprune(env: str = "libero:libero_object", policy: str = "", episodes: int = 2, seed: int = 0,
                    out: Path | str | None = None, options: dict[str, Any] | None = None,
                    tasks: list[str] | None = None, progress: bool = True,
                    arms: list[str] | None = None) -> dict[str, Any]:
    """No pruning vs SpecPrune (full + ablations) vs baselines at SpecPrune's measured token budget.

    `options`: SpecPrune settings for every arm (e.g. budgets; the baselines get the matched `budget` on top).
    `arms`: a subset of SPECPRUNE_BENCH_ARMS to run besides no pruning and `specprune`, which always run (the
    baselines' budget is SpecPrune's measured one).

    Two passes on the same episode specs, in this process: (1) no pruning, SpecPrune and its ablations;
    (2) no pruning again and the baselines with `budget` = SpecPrune's mean visual tokens per pruned layer (so
    they spend the same decoder compute); each pass's ratios are against its own no-pruning arm (the machine
    may drift between passes). Writes OUT/bench.json (DESIGN.md format) with all arms of both passes.
    """
    from vla_runtime.runtime.bench import Method, compare_methods, write_bench
    from vla_runtime.runtime.compare import paired_stats

    pol = _default_policy(policy)
    opts = dict(options or {})
    outp = Path(out) if out is not None else None
    if arms is not None:
        bad = [a for a in arms if a not in SPECPRUNE_BENCH_ARMS]
        if bad:
            raise UserError(f"bench specprune: unknown arm(s) {', '.join(bad)}; choose from "
                            f"{', '.join(SPECPRUNE_BENCH_ARMS)}")
    want = set(SPECPRUNE_BENCH_ARMS if arms is None else arms) | {"specprune"}
    names1 = [n for n in ("specprune", "specprune-static", "specprune-dynamic", "specprune-nocontroller") if n in want]
    baselines = [n for n in ("prune-random", "prune-fastv", "prune-framediff") if n in want]

    def kw(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"accel_options": {name: {**opts, **(extra or {})}}}

    m1 = [Method("no-pruning", pol)] + [Method(n, pol, accel=(n,), policy_kwargs=kw(n)) for n in names1]
    r1 = compare_methods("specprune", env, m1, episodes, seed, outp, baseline="no-pruning",
                         extra_fields=_token_fields, tasks=tasks, progress=progress)
    full = next(m for m in r1["methods"] if m["name"] == "specprune")
    # the budget that spends the same visual tokens per layer after the prune point as SpecPrune did
    from vla_runtime.policies import make_policy

    probe = make_policy(pol, env_name=env)
    model = getattr(probe, "model")
    n_vis = int(model.cfg.n_visual)
    n_layers = int(model.n_layers)
    cfg = SpecPruneConfig(**{**checkpoint_specprune_defaults(model), **opts})
    pl = cfg.prune_layer
    mean_vis = full.get("mean_visual_tokens_per_layer")
    if mean_vis is None:
        budget = cfg.budget_coarse
    else:  # mean over all layers = (pl * n_vis + (L - pl) * kept) / L
        kept = (mean_vis * n_layers - pl * n_vis) / max(n_layers - pl, 1)
        budget = float(min(1.0, max(kept / n_vis, 1.0 / n_vis)))
    del probe
    # pass 2 re-runs the unpruned arm so the baselines' ratios compare arms measured at the same time
    m2 = [Method("no-pruning-pass2", pol)] + [
        Method(n, pol, accel=(n,), policy_kwargs=kw(n, {"budget": round(budget, 4)})) for n in baselines]
    r2: dict[str, Any] = {"methods": [], "outcomes": {}}
    if baselines:
        r2 = compare_methods("specprune-baselines", env, m2, episodes, seed, outp, baseline=m2[0].name,
                             extra_fields=_token_fields, tasks=tasks, progress=progress)
    for m in r2["methods"][1:]:
        m["baseline_budget"] = round(budget, 4)
    report = dict(r1)
    report["methods"] = r1["methods"] + r2["methods"]
    report["outcomes"] = {**r1.get("outcomes", {}), **r2.get("outcomes", {})}
    # the comparison the issue asks for: SpecPrune against each same-budget baseline, paired on the same episodes
    oc = report["outcomes"]
    report["specprune_vs_baselines"] = {
        b: paired_stats(oc[b], oc["specprune"])
        for b in ("prune-random", "prune-fastv", "prune-framediff") if b in oc and "specprune" in oc}
    report["baseline_budget_frac"] = round(budget, 4)
    report["n_visual"] = n_vis
    report["n_layers"] = n_layers
    report["options"] = opts
    write_bench(report, outp)
    print(format_table(report))
    return report


def format_table(report: dict[str, Any]) -> str:
    from vla_runtime.runtime.bench import format_paired

    rows = [("method", "success %", "95% CI", "vs pass base [paired CI] p", "vis tok/layer", "p50 ms", "p95 ms",
             "ratio", "cpu ratio")]
    for m in report["methods"]:
        ci = m.get("success_ci95") or [0, 0]
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        rows.append((m["name"], f(m.get("success_pct")), f"[{ci[0]:.0f}, {ci[1]:.0f}]", format_paired(m.get("paired")),
                     f(m.get("mean_visual_tokens_per_layer")), f(m.get("latency_ms_p50")),
                     f(m.get("latency_ms_p95")),
                     "-" if m.get("ratio_to_baseline") is None else f"{m['ratio_to_baseline']:.2f}x",
                     "-" if m.get("cpu_ratio_to_baseline") is None else f"{m['cpu_ratio_to_baseline']:.2f}x"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = (f"SpecPrune on {report['env']}, {report['episodes']} episodes, seeds {report['seeds'][:3]}..., "
            f"baselines at budget {report.get('baseline_budget_frac')} of {report.get('n_visual')} visual tokens")
    table = head + "\n" + "\n".join("  ".join(c.ljust(x) for c, x in zip(r, w)) for r in rows)
    vs = report.get("specprune_vs_baselines") or {}
    if vs:
        table += "\nspecprune vs each baseline, paired on the same episodes (b/c = only the baseline / only specprune):"
        for b, p in vs.items():
            table += (f"\n  vs {b}: {format_paired(p)}  b/c {p['only_baseline']}/{p['only_method']}")
    return table
