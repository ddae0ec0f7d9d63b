"""Offline training of the early-exit predictors (`vla-runtime train --policy exit-predictors`).

1. Rollouts of the model's own tokens on demo observations: the VLA policy (full depth, the dtype it is served
   in, so the features match inference) acts on demo frames taken every `n_action_steps` steps, exactly as it
   would in a synchronous loop, so the previous chunk's tokens (a candidate source) are what they would be
   online. A recording ExitPolicy keeps every layer's hidden state of each generated token (AR) or of the
   suffix queries (parallel).
2. Features per (token, layer) with `kernels.exit_features_torch` (AR) / `early_exit.parallel_features`
   (parallel). AR: the "previous checked layer" of the delta features depends on the online schedule, so each
   sample appears with prev = the layer before, two before, and none (zeros): the predictor sees every gap
   it meets at inference. Parallel: inference always looks back one layer, so prev = the layer before.
3. Labels: AR: argmax over the candidates == the full model's token; parallel: max |chunk_l - chunk_final| <=
   tolerance.
4. One MLP per layer (Adam 1e-3), a per-layer threshold reaching `target_precision` of *correct exits* (the
   exit rule included) on held-out chunks, and the offline schedule from the earliest-correct layers.
5. Written as <out>/predictors.safetensors + predictors.json (`early_exit.PredictorBank`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_runtime.errors import UserError
from vla_runtime.kernels import ExitMLP, exit_features_torch
from vla_runtime.policies.vla.early_exit import (PARALLEL_FEATURES, EarlyExitConfig, ParallelExitMLP, PredictorBank,
                                                 ar_head_weight, build_candidates, final_norm_params,
                                                 offline_schedule, parallel_features, previous_token_for,
                                                 weights_digest)
from vla_runtime.policies.vla.modeling import StepContext

log = logging.getLogger(__name__)


class HiddenRecorder:
    """ExitPolicy that never exits and keeps each layer's hidden state of the newest token (AR decode steps) or
    of the suffix tokens (parallel), float32 on CPU."""

    attention_layers: frozenset[int] = frozenset()

    def __init__(self, n_suffix: int) -> None:
        self.n_suffix = n_suffix
        self.steps: dict[int, list[torch.Tensor]] = {}  # AR: decode step -> per-layer (D,)
        self.layers: list[torch.Tensor] = []  # parallel: per-layer (S, D)

    def clear(self) -> None:
        self.steps, self.layers = {}, []

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, ctx: StepContext) -> bool:
        if ctx.mode == "parallel":
            self.layers.append(hidden[0, -self.n_suffix:].float().cpu())
        elif ctx.decode_step >= 0:
            self.steps.setdefault(ctx.decode_step, []).append(hidden[0, -1].float().cpu())
        return False


def _demo_observations(data_dirs: list[Path], cameras: tuple[str, ...], stride: int, max_chunks: int,
                       max_per_episode: int, seed: int, exclude: set[str] | None = None,
                       used: list[str] | None = None) -> list[list[Any]]:
    """Episodes as lists of Observations every `stride` steps (bounded), demo files shuffled by `seed`;
    files named in `exclude` are skipped, the files read are appended to `used`."""
    from vla_runtime.runtime.types import Observation
    from vla_runtime.train.demos import list_demos, read_demo

    files = [f for d in data_dirs for f in list_demos(d) if f.name not in (exclude or set())]
    rng = np.random.default_rng(seed)
    rng.shuffle(files)  # type: ignore[arg-type]
    episodes: list[list[Any]] = []
    total = 0
    for f in files:
        if total >= max_chunks:
            break
        if used is not None:
            used.append(f.name)
        demo = read_demo(f, cameras=list(cameras))
        obs = []
        for t in range(0, len(demo), stride)[:max_per_episode]:
            obs.append(Observation(images={c: demo.images[c][t] for c in cameras}, state=demo.states[t],
                                   instruction=demo.instruction, stamp=0.0, step=t))
        obs = obs[:max_chunks - total]
        total += len(obs)
        episodes.append(obs)
    if total == 0:
        raise UserError(f"no demo frames found in {[str(d) for d in data_dirs]}")
    return episodes


class _RecordingPolicy:
    """A policy proxy that keeps every observation it is asked to act on (everything else is the policy's)."""

    def __init__(self, policy: Any) -> None:
        self._policy = policy
        self.seen: list[Any] = []

    def act(self, obs: Any) -> Any:
        self.seen.append(obs)
        return self._policy.act(obs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


def _rollout_observations(policy: Any, env_name: str, episodes: int, seed: int, max_per_episode: int,
                          max_chunks: int) -> list[list[Any]]:
    """Closed-loop rollouts of the policy itself (full depth, synchronous, n_action_steps actions per chunk):
    the observations it acted on, per episode. These are the states early exit meets online - the policy's own,
    failures and hovering included - which demo frames do not cover (closed loop exits later than on demo
    frames: EARLY_EXIT.md). Seeds `seed`.. must not overlap the seeds the predictors are evaluated on; LIBERO
    episodes use fresh placements (init_state None), never the benchmark init states evaluation uses."""
    from vla_runtime.envs import make_env
    from vla_runtime.runtime.loop import LoopConfig, run_episode

    cfg = policy.model.cfg
    env = make_env(env_name, cameras=tuple(cfg.cameras), image_size=cfg.image_size, render=True)
    out: list[list[Any]] = []
    total = 0
    # fresh placements (init_state None): on LIBERO the benchmark init states are what evaluation uses
    specs = [replace(s, init_state=None) for s in env.episode_specs(seed, episodes)]
    try:
        for spec in specs:
            if total >= max_chunks:
                break
            n = min(max_per_episode, max_chunks - total)
            rec = _RecordingPolicy(policy)
            # the runtime's own sync loop (action checks, replans) for at most n inferences
            run_episode(env, rec, spec, LoopConfig(n_action_steps=cfg.n_action_steps,
                                                    max_steps=n * cfg.n_action_steps))
            seen = rec.seen[:n]
            total += len(seen)
            out.append(seen)
    finally:
        env.close()
    if total == 0:
        raise UserError(f"no rollout observations from {env_name}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# AR samples
# ---------------------------------------------------------------------------------------------------------------
def ar_samples(model: Any, chunks: list[dict[str, Any]], cfg: EarlyExitConfig) -> dict[str, Any]:
    """Per-layer features/labels from recorded AR chunks.

    chunks: [{"tokens": (n,) long, "hidden": (n - 1, L, D) for tokens 1..n-1, "prev": (chunk, A) or None,
              "group": int}]. Returns {"X": {layer: (N, 3C)}, "y": {layer: (N,)}, "ok": {layer: (N,)} (exit rule
    would be correct), "group": {layer: (N,)}, "earliest": [layer per token], "n_tokens"}.
    """
    mc = model.cfg
    L = model.n_layers
    norm_w, eps = final_norm_params(model)
    head_w = ar_head_weight(model).float()
    norm_w = norm_w.float()
    first = max(cfg.shallow_layer, 0) if cfg.n_shallow > 0 and cfg.shallow_layer >= 0 else 0
    X: dict[int, list[torch.Tensor]] = {i: [] for i in range(first, L - 1)}
    Y: dict[int, list[torch.Tensor]] = {i: [] for i in X}
    OK: dict[int, list[torch.Tensor]] = {i: [] for i in X}
    G: dict[int, list[int]] = {i: [] for i in X}
    earliest: list[int] = []
    n_tok = 0
    for ch in chunks:
        toks = ch["tokens"].tolist()
        H = ch["hidden"]  # (n-1, L, D)
        for k in range(1, len(toks)):
            h = H[k - 1]  # (L, D)
            prev = previous_token_for(k, toks, ch["prev"], mc.action_dim, mc.n_action_steps)
            shallow = None
            if cfg.n_shallow > 0 and cfg.shallow_layer >= 0:
                n = h[cfg.shallow_layer] * torch.rsqrt(h[cfg.shallow_layer].pow(2).mean() + eps) * norm_w
                shallow = head_w @ n
            cand = build_candidates(prev, shallow, cfg, mc.n_bins)
            if cand is None:
                continue
            n_tok += 1
            final = toks[k]
            hs = h[first:L - 1]  # (Lc, D)
            c = cand[None].expand(hs.shape[0], -1)
            f0 = exit_features_torch(hs, norm_w, eps, head_w, c)  # (Lc, 3C), prev = zeros
            C = cand.numel()
            probs = f0[:, C:2 * C]
            cand_top = cand[f0[:, :C].argmax(1)]  # (Lc,)
            full_top = (torch.nn.functional.rms_norm(hs, (hs.shape[1],), norm_w, eps) @ head_w.t()).argmax(1)
            label = (cand_top == final)
            ok = label & (full_top == final)
            e = L
            for j in range(hs.shape[0]):
                if bool(ok[j]):
                    e = first + j
                    break
            earliest.append(e)
            for j in range(hs.shape[0]):
                i = first + j
                variants = [torch.zeros(C)]
                for back in (1, 2):
                    if j - back >= 0:
                        variants.append(probs[j - back])
                for pv in variants:
                    x = f0[j].clone()
                    x[2 * C:] = probs[j] - pv
                    X[i].append(x)
                    Y[i].append(label[j])
                    OK[i].append(ok[j])
                    G[i].append(int(ch["group"]))
    out: dict[str, Any] = {"X": {}, "y": {}, "ok": {}, "group": {}, "earliest": earliest, "n_tokens": n_tok,
                           "first_layer": first}
    for i in X:
        if X[i]:
            out["X"][i] = torch.stack(X[i])
            out["y"][i] = torch.stack(Y[i]).float()
            out["ok"][i] = torch.stack(OK[i])
            out["group"][i] = torch.tensor(G[i])
    return out


def parallel_samples(model: Any, chunks: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """chunks: [{"layers": (L, S, D) suffix hidden per layer, "group"}] -> per-layer features / labels."""
    L = model.n_layers
    X: dict[int, list[torch.Tensor]] = {i: [] for i in range(L - 1)}
    Y: dict[int, list[float]] = {i: [] for i in X}
    G: dict[int, list[int]] = {i: [] for i in X}
    earliest: list[int] = []
    with torch.no_grad():
        for ch in chunks:
            hs = ch["layers"]  # (L, S, D)
            dt = next(model.head.parameters()).dtype
            suf = model.decoder.norm(hs.to(dt)).float()  # (L, S, D)
            chunk = model.head(suf.to(dt)).float()  # (L, T, A)
            err = (chunk - chunk[-1]).abs().flatten(1).amax(1)  # (L,)
            ok = err <= tolerance
            e = next((i for i in range(L - 1) if bool(ok[i])), L)
            earliest.append(e)
            for i in range(L - 1):
                # inference looks back one layer at every check (EarlyExitPolicy._after_layer_parallel)
                variants: list[int | None] = [i - 1] if i > 0 else [None]
                for pj in variants:
                    x = parallel_features(chunk[i:i + 1], None if pj is None else chunk[pj:pj + 1], suf[i:i + 1],
                                          None if pj is None else suf[pj:pj + 1], i, L)[0]
                    X[i].append(x)
                    Y[i].append(float(ok[i]))
                    G[i].append(int(ch["group"]))
    out: dict[str, Any] = {"X": {}, "y": {}, "ok": {}, "group": {}, "earliest": earliest, "first_layer": 0}
    for i in X:
        if X[i]:
            out["X"][i] = torch.stack(X[i])
            out["y"][i] = torch.tensor(Y[i])
            out["ok"][i] = out["y"][i].bool()
            out["group"][i] = torch.tensor(G[i])
    return out


# ---------------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------------
def fit_mlp(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int = 60, lr: float = 1e-3,
            batch: int = 512, seed: int = 0) -> None:
    """Adam + BCE on the pre-sigmoid logit, on raw (unstandardised) features: the kernel consumes raw features,
    so any scaling would have to live in w1 anyway."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    lossf = torch.nn.BCEWithLogitsLoss()
    n = X.shape[0]
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            opt.zero_grad()
            loss = lossf(net(X[idx]), y[idx])
            loss.backward()
            opt.step()
    net.eval()


def pick_threshold(score: torch.Tensor, ok: torch.Tensor, target_precision: float, min_support: int = 5
                   ) -> tuple[float, float, float]:
    """Lowest threshold whose exits (score >= t, the exit rule folded into `ok`) are correct at >= target
    precision on held-out samples. Returns (threshold, precision, exit fraction); (1.01, nan, 0) if none."""
    best = (1.01, float("nan"), 0.0)
    for t in np.linspace(0.3, 0.99, 70):
        sel = score >= t
        n = int(sel.sum())
        if n < min_support:
            continue
        prec = float(ok[sel].float().mean())
        if prec >= target_precision:
            return float(t), prec, n / len(score)
    return best


def fit_bank(samples: dict[str, Any], model: Any, cfg: EarlyExitConfig, mode: str, *, hidden: int = 64,
             epochs: int = 60, target_precision: float = 0.99, check_cost: float = 0.25, val_frac: float = 0.25,
             seed: int = 0) -> PredictorBank:
    """Train one MLP per layer, choose thresholds on held-out chunk groups, then the offline schedule."""
    L = model.n_layers
    params: dict[int, dict[str, torch.Tensor]] = {}
    thresholds: dict[int, float] = {}
    stats: dict[str, Any] = {}
    C = cfg.n_candidates
    for i in sorted(samples["X"]):
        X, y, ok, grp = samples["X"][i], samples["y"][i], samples["ok"][i], samples["group"][i]
        groups = torch.unique(grp)
        rng = np.random.default_rng(seed)
        val_groups = set(rng.choice(groups.numpy(), size=max(1, int(len(groups) * val_frac)), replace=False).tolist()) \
            if len(groups) > 1 else set()
        val = torch.tensor([int(g) in val_groups for g in grp])
        tr = ~val if bool((~val).any()) else torch.ones_like(val)
        torch.manual_seed(seed + i)
        net: torch.nn.Module = ExitMLP(C, hidden) if mode == "ar" else ParallelExitMLP(PARALLEL_FEATURES, 32)
        fit_mlp(net, X[tr], y[tr], epochs=epochs, seed=seed + i)
        if mode == "ar":
            assert isinstance(net, ExitMLP)
            w1, b1, w2, b2 = net.kernel_params()
        else:
            w1, b1 = net.fc1.weight.t().contiguous().detach(), net.fc1.bias.detach().clone()
            w2, b2 = net.fc2.weight.t().contiguous().detach(), net.fc2.bias.detach().clone()
        with torch.no_grad():
            vs = val if bool(val.any()) else tr
            score = torch.sigmoid(net(X[vs]))
            acc = float(((score >= 0.5).float() == y[vs]).float().mean())
        t, prec, frac = pick_threshold(score, ok[vs], target_precision)
        params[i] = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
        thresholds[i] = t
        stats[str(i)] = {"samples": int(X.shape[0]), "positive_frac": round(float(y.mean()), 4),
                         "val_acc@0.5": round(acc, 4), "threshold": round(t, 3),
                         "val_precision": None if prec != prec else round(prec, 4), "val_exit_frac": round(frac, 4)}
        log.info("layer %d: %s", i, stats[str(i)])
    usable = [i for i, t in thresholds.items() if t <= 1.0]
    offline = offline_schedule(samples["earliest"], L, usable, check_cost=check_cost)
    hist = np.bincount(np.minimum(np.asarray(samples["earliest"], int), L), minlength=L + 1).tolist() \
        if samples["earliest"] else []
    meta = {"train": {"per_layer": stats, "earliest_correct_hist": hist, "check_cost": check_cost,
                      "target_precision": target_precision, "hidden": hidden if mode == "ar" else 32,
                      "epochs": epochs}}
    return PredictorBank(mode=mode, n_layers=L, n_candidates=C if mode == "ar" else 0, params=params,
                         thresholds=thresholds, offline_layers=offline, config=cfg, meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# data collection + the CLI entry point
# ---------------------------------------------------------------------------------------------------------------
def collect_chunks(policy: Any, episodes: list[list[Any]]) -> list[dict[str, Any]]:
    """Run the policy at full depth on each episode's frames; record per-layer hidden states per chunk."""
    model = policy.model
    rec = HiddenRecorder(model.cfg.n_suffix)
    old = policy.exit_policy
    policy.exit_policy = rec
    chunks: list[dict[str, Any]] = []
    emitted: list[int] = []  # the AR loop's own argmax tokens (normalising the actions back loses flat dims)
    hook = model.head.register_forward_hook(lambda m, a, o: emitted.append(int(o[0, -1].argmax()))
                                            if model.cfg.mode == "ar" else None)
    try:
        for g, obs_list in enumerate(episodes):
            policy.reset(obs_list[0].instruction)
            prev = None
            for obs in obs_list:
                rec.clear()
                emitted.clear()
                policy.act(obs)
                if model.cfg.mode == "ar":
                    toks = torch.tensor(emitted, dtype=torch.long)
                    if toks.numel() != model.cfg.n_action_tokens:
                        raise RuntimeError(f"recorded {toks.numel()} tokens, expected {model.cfg.n_action_tokens}")
                    hid = torch.stack([torch.stack(rec.steps[s]) for s in sorted(rec.steps)])  # (n-1, L, D)
                    chunks.append({"tokens": toks, "hidden": hid, "prev": prev, "group": g})
                    prev = toks.reshape(model.cfg.chunk_size, model.cfg.action_dim)
                else:
                    chunks.append({"layers": torch.stack(rec.layers), "group": g})
    finally:
        hook.remove()
        policy.exit_policy = old
    return chunks


def train_exit_predictors(checkpoint: str, data_dirs: list[Path], out: Path, device: str = "cpu", *,
                          config: EarlyExitConfig | None = None, max_chunks: int = 400, max_per_episode: int = 40,
                          epochs: int = 60, target_precision: float | None = None, check_cost: float = 0.25,
                          dtype: str = "auto", seed: int = 0, accel: tuple[str, ...] = (),
                          rollout_env: str | None = None, rollout_episodes: int = 20,
                          rollout_seed: int = 100_000) -> dict[str, Any]:
    """Collect rollouts of CHECKPOINT on the demos in DATA_DIRS, train the per-layer predictors, write OUT.

    With `rollout_env` the policy also acts in that env itself, closed loop, for `rollout_episodes` episodes from
    `rollout_seed` (kept clear of evaluation seeds), and the predictors train on those states too (DATA_DIRS may
    then be empty). `max_chunks` bounds the demo chunks and the rollout chunks each.

    OUT is usually <checkpoint>/exit_predictors (the default the `earlyexit` acceleration loads). `accel` names
    token pruners to run during collection (e.g. ("specprune",)): predictors for `--accel specprune,earlyexit`
    then see the pruned prefill they will meet (load them with the option predictors=OUT).
    """
    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.vla.policy import load_vla_policy

    if target_precision is not None and not 0.5 <= target_precision <= 1.0:
        raise UserError(f"target precision must be in [0.5, 1], got {target_precision}")
    if max_chunks < 8:
        raise UserError(f"max_chunks must be >= 8, got {max_chunks}")
    t0 = time.perf_counter()
    ck = resolve_checkpoint(checkpoint)
    if "earlyexit" in accel:
        raise UserError("train exit predictors with token pruners only (accel without earlyexit)")
    policy = load_vla_policy(ck, device=device, dtype=dtype, accel=tuple(accel))
    model = policy.model
    cfg = config or EarlyExitConfig()
    mode = model.cfg.mode
    if mode == "ar" and cfg.shallow_layer >= model.n_layers - 1:
        raise UserError(f"earlyexit: shallow_layer {cfg.shallow_layer} must be below the last layer "
                        f"({model.n_layers - 1})")
    if target_precision is None:
        target_precision = 0.99 if mode == "ar" else 0.95
    used: list[str] = []
    if not data_dirs and not rollout_env:
        raise UserError("exit predictors need demo directories (--data) or a rollout env (--rollout-env)")
    episodes = _demo_observations(list(data_dirs), tuple(model.cfg.cameras), model.cfg.n_action_steps, max_chunks,
                                  max_per_episode, seed, used=used) if data_dirs else []
    n_demo_eps = len(episodes)
    if rollout_env:
        if rollout_episodes < 1:
            raise UserError(f"rollout_episodes must be >= 1, got {rollout_episodes}")
        episodes += _rollout_observations(policy, rollout_env, rollout_episodes, rollout_seed, max_per_episode,
                                          max_chunks)
    chunks = collect_chunks(policy, episodes)
    t1 = time.perf_counter()
    with torch.no_grad():
        model_f = model  # features in float32 from the (bf16) recorded states
        samples = ar_samples(model_f, chunks, cfg) if mode == "ar" else parallel_samples(model_f, chunks,
                                                                                         cfg.tolerance)
    bank = fit_bank(samples, model, cfg, mode, epochs=epochs, target_precision=target_precision,
                    check_cost=check_cost, seed=seed)
    bank.meta["train"].update({"checkpoint": str(ck), "data": [str(d) for d in data_dirs], "chunks": len(chunks),
                               "episodes": len(episodes), "dtype": str(policy.dtype).replace("torch.", ""),
                               "collect_s": round(t1 - t0, 1),
                               "total_s": round(time.perf_counter() - t0, 1),
                               "tokens": samples.get("n_tokens"), "demo_files": used, "accel": list(accel),
                               "weights_sha256": weights_digest(ck),
                               "rollouts": {"env": rollout_env, "episodes": len(episodes) - n_demo_eps,
                                            "first_seed": rollout_seed,
                                            "chunks": sum(len(e) for e in episodes[n_demo_eps:])}
                               if rollout_env else None})
    bank.save(out)
    summary = {"out": str(out), "mode": mode, "layers": sorted(bank.params), "offline_layers": bank.offline_layers,
               "thresholds": bank.thresholds, "earliest_correct_hist": bank.meta["train"]["earliest_correct_hist"],
               "chunks": len(chunks)}
    print(summary)
    return summary
