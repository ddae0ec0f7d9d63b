"""`vla-runtime bench earlyexit`: full depth vs early exit (and with SpecPrune on, both ways), one process,
the same episode specs, via `runtime.bench.compare_methods`.

Extra fields per method (bench.json): `layers_mean` (decoder layers run per decided token (AR) or per chunk
(parallel), prefill excluded), `exit_frac`, `checks_per_token`, and the agreement with the full model:
  AR:       `token_agreement_pct`: for each chunk, the full-depth model teacher-forced on the early-exit run's own
            tokens (from the same prefill KV cache) predicts each decoded token; the share that matches.
  parallel: `chunk_within_tol_pct` / `chunk_err_mean`: the exited chunk against the chunk the remaining layers
            would have given (same tokens), max |difference| in normalised action units.
The shadow replays run after all episodes from states recorded during them, so they never count in latency.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vla_runtime.errors import UserError
from vla_runtime.policies.vla.early_exit import PREDICTOR_DIR, EarlyExitPolicy, find_policy
from vla_runtime.policies.vla.modeling import KIND_SUFFIX, LayerKVCache


def _default_policy() -> str:
    from vla_runtime.policies import shipped_checkpoints

    for name, path in shipped_checkpoints().items():
        try:
            if json.loads((path / "config.json").read_text()).get("mode") == "ar" and (path / PREDICTOR_DIR).is_dir():
                return f"vla:{name}"
        except (OSError, json.JSONDecodeError):
            continue
    raise UserError("bench earlyexit needs --policy vla:<checkpoint> (no shipped AR VLA with exit predictors)")


@torch.no_grad()
def ar_token_agreement(pol: EarlyExitPolicy) -> dict[str, Any]:
    """Replay every recorded chunk at full depth, teacher-forced on its own tokens (see module doc)."""
    model = pol.model
    cfg = model.cfg
    agree, total, agree_exited, total_exited = 0, 0, 0, 0
    for rec in pol.stats.chunks:
        toks = torch.tensor(rec["tokens"], dtype=torch.long)[None]  # (1, n)
        dev = rec["k"][0].device
        cache = LayerKVCache(model.n_layers)
        cache.k, cache.v = list(rec["k"]), list(rec["v"])
        cache.pos, cache.kind, cache.valid = list(rec["pos"]), list(rec["kind"]), list(rec["valid"])
        n = toks.shape[1]
        x = model.embed_action_tokens(toks[:, :-1].to(dev)).to(rec["k"][0].dtype)  # (1, n-1, D)
        pos = torch.arange(cfg.prefix_len + 1, cfg.prefix_len + n, device=dev)[None]
        kinds = torch.full_like(pos, KIND_SUFFIX)
        valid = torch.ones_like(pos, dtype=torch.bool)
        out, _ = model.forward_layers(x, pos, kinds, valid, cache=cache, bidirectional_suffix=False)
        full = model.head(out).argmax(-1)[0].cpu()  # (n-1,) the full model's token for positions 1..n-1
        eq = full == toks[0, 1:]
        exits = torch.tensor(rec["exits"])  # (n-1,) layers run per decode step (the prefill is not in it)
        early = exits < model.n_layers
        agree += int(eq.sum())
        total += int(eq.numel())
        agree_exited += int(eq[early].sum())
        total_exited += int(early.sum())
    return {"token_agreement_pct": round(100.0 * agree / total, 2) if total else None,
            "exited_token_agreement_pct": round(100.0 * agree_exited / total_exited, 2) if total_exited else None,
            "agreement_tokens": total, "agreement_chunks": len(pol.stats.chunks)}


@torch.no_grad()
def parallel_chunk_agreement(pol: EarlyExitPolicy) -> dict[str, Any]:
    """Run the layers after each recorded exit on the same tokens; compare the exited chunk with the final one."""
    model = pol.model
    S = model.cfg.n_suffix
    errs: list[float] = []
    for rec in pol.stats.chunks:
        h = rec["hidden"]
        exit_chunk = model.head(model.decoder.norm(h[:, -S:])).float()
        for j in range(rec["layer"] + 1, model.n_layers):
            h = model.decoder.layers[j](h, **rec["kwargs"])
        full_chunk = model.head(model.decoder.norm(h[:, -S:])).float()
        errs.append(float((exit_chunk - full_chunk).abs().max()))
    n_chunks = len(pol.stats.exit_layers)
    n_exit = len(errs)
    within = sum(e <= pol.cfg.tolerance for e in errs)
    return {"chunk_within_tol_pct": round(100.0 * (n_chunks - n_exit + within) / n_chunks, 2) if n_chunks else None,
            "exited_chunk_err_mean": round(float(np.mean(errs)), 4) if errs else None,
            "exited_chunk_err_max": round(float(np.max(errs)), 4) if errs else None,
            "tolerance": pol.cfg.tolerance}


def summarize(pol: EarlyExitPolicy | None, n_layers: int) -> dict[str, Any]:
    if pol is None:
        return {"layers_mean": float(n_layers), "exit_frac": 0.0}
    ex = pol.stats.exit_layers
    out: dict[str, Any] = {"layers_mean": round(float(np.mean(ex)), 3) if ex else None,
                           "exit_frac": round(float(np.mean([e < n_layers for e in ex])), 4) if ex else None,
                           "checks_per_token": round(pol.stats.checks / len(ex), 3) if ex else None,
                           "rejected_by_argmax": pol.stats.rejected_by_argmax, "pending_rows": pol.stats.pending_rows,
                           "exit_layer_hist": np.bincount(np.asarray(ex, int), minlength=n_layers + 1).tolist()
                           if ex else []}
    out.update(ar_token_agreement(pol) if pol.mode == "ar" else parallel_chunk_agreement(pol))
    return out


EE_ARMS = ("full", "earlyexit", "specprune", "specprune+earlyexit")


def bench_earlyexit(env: str, policy: str, episodes: int, seed: int, out: Path | None,
                    shadow: bool = True, with_specprune: bool | None = None,
                    options: dict[str, Any] | None = None, arms: Sequence[str] | None = None) -> dict[str, Any]:
    """Methods: full, earlyexit, and (when SpecPrune is registered) specprune, specprune+earlyexit.

    Baseline: full (always run). `arms` runs a subset of EE_ARMS (e.g. full,earlyexit where an episode is costly).
    Also reports `ratio_to_specprune` for specprune+earlyexit (early exit on top of pruning).
    """
    if arms is not None:
        bad = [a for a in arms if a not in EE_ARMS]
        if bad:
            raise UserError(f"bench earlyexit: unknown arm(s) {', '.join(bad)}; choose from {', '.join(EE_ARMS)}")
        if with_specprune is None:
            with_specprune = any("specprune" in a for a in arms)
    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.vla.policy import ACCELERATIONS
    from vla_runtime.runtime.bench import Method, compare_methods, write_bench

    policy = policy or _default_policy()
    if not policy.startswith("vla:"):
        policy = f"vla:{policy}"
    ck = resolve_checkpoint(policy.partition(":")[2])
    pred_dir = ck / PREDICTOR_DIR
    if not pred_dir.is_dir():
        raise UserError(f"{ck} has no {PREDICTOR_DIR}/: train them first with `vla-runtime train --policy "
                        f"exit-predictors --checkpoint {ck} --data DEMOS --out {pred_dir}`")
    if with_specprune is None:
        try:
            import vla_runtime.policies.vla.specprune  # noqa: F401  - registers "specprune"
        except ImportError:
            pass
        with_specprune = "specprune" in ACCELERATIONS
    run_id = uuid.uuid4().hex[:8]
    n_layers = json.loads((ck / "config.json").read_text())["layers"]

    def ee(name: str) -> dict[str, Any]:
        return {"predictors": str(pred_dir), "tag": f"{run_id}:{name}", "record_chunks": shadow, **(options or {})}

    methods = [Method("full", policy), Method("earlyexit", policy, accel=("earlyexit",),
                                              policy_kwargs={"accel_options": {"earlyexit": ee("earlyexit")}})]
    if with_specprune:
        methods += [Method("specprune", policy, accel=("specprune",)),
                    Method("specprune+earlyexit", policy, accel=("specprune", "earlyexit"),
                           policy_kwargs={"accel_options": {"earlyexit": ee("specprune+earlyexit")}})]

    def extra(m: Any, recs: list[dict[str, Any]]) -> dict[str, Any]:
        pol = find_policy(f"{run_id}:{m.name}") if "earlyexit" in m.accel else None
        return summarize(pol, n_layers)

    if arms is not None:
        keep = set(arms) | {"full"}
        methods = [m for m in methods if m.name in keep]
    report = compare_methods("earlyexit", env, methods, episodes, seed, out, baseline="full", extra_fields=extra)
    rows = {r["name"]: r for r in report["methods"]}
    if "specprune" in rows and "specprune+earlyexit" in rows and rows["specprune"]["latency_ms_p50"]:
        r = rows["specprune+earlyexit"]
        r["ratio_to_specprune"] = round(rows["specprune"]["latency_ms_p50"] / r["latency_ms_p50"], 3)
    base = rows["full"]
    for r in report["methods"]:
        if base.get("mean_decode_ms") and r.get("mean_decode_ms"):  # AR: the decode steps alone (SpecEE's metric)
            r["decode_ratio_to_baseline"] = round(base["mean_decode_ms"] / r["mean_decode_ms"], 3)
        if r["success_pct"] is not None and base["success_pct"] is not None:
            r["success_delta_pp"] = round(r["success_pct"] - base["success_pct"], 2)
    report["checkpoint"] = str(ck)
    report["predictors"] = str(pred_dir)
    write_bench(report, out)
    print(format_earlyexit(report))
    return report


def format_earlyexit(report: dict[str, Any]) -> str:
    from vla_runtime.runtime.bench import format_paired

    def ratio(r: dict[str, Any], key: str = "ratio_to_baseline") -> str:
        x = r.get(key)
        return ("-" if x is None else f"{x:.2f}x").rjust(6)

    lines = [f"earlyexit on {report['env']}, {report['episodes']} episodes ({report.get('checkpoint', '')})",
             f"{'method':22s} {'layers':>7s} {'agree%':>7s} {'success% [CI]':>18s} {'p50 ms':>8s} {'p95 ms':>8s} "
             f"{'ratio':>6s} {'cpu':>6s}"]
    for r in report["methods"]:
        ci = r.get("success_ci95") or [0, 0]
        agree = r.get("token_agreement_pct", r.get("chunk_within_tol_pct"))
        f = lambda x, w=7, p=1: ("-" if x is None else f"{x:.{p}f}").rjust(w)  # noqa: E731
        lines.append(f"{r['name']:22s} {f(r.get('layers_mean'), 7, 2)} {f(agree)} "
                     f"{(f(r.get('success_pct'), 5) + f' [{ci[0]:.0f},{ci[1]:.0f}]').rjust(18)} "
                     f"{f(r.get('latency_ms_p50'), 8)} {f(r.get('latency_ms_p95'), 8)} "
                     f"{ratio(r)} {ratio(r, 'cpu_ratio_to_baseline')}"
                     + (f"  (vs specprune {r['ratio_to_specprune']:.2f}x)" if r.get("ratio_to_specprune") else "")
                     + (f"  decode steps {r['decode_ratio_to_baseline']:.2f}x" if r.get("decode_ratio_to_baseline")
                        and r["name"] != "full" else "")
                     + (f"  success vs full: {format_paired(r['paired'])}" if r.get("paired") else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# open-loop replay on held-out demo frames (latency + agreement on identical inputs, no simulator)
# ---------------------------------------------------------------------------------------------------------------
def replay_earlyexit(checkpoint: str, data_dirs: list[Path], max_chunks: int = 40, seed: int = 1,
                     options: dict[str, Any] | None = None, with_specprune: bool = False,
                     out: Path | None = None, specprune_predictors: Path | None = None) -> dict[str, Any]:
    """Full depth vs early exit on the same demo observations (frames every n_action_steps, episodes the
    predictors were not trained on), interleaved per frame, in one process.

    Reports per method: latency p50/p95 (policy.act), ratio to full, mean layers, token agreement (teacher-forced
    shadow, as in the bench) and `same_chunk_tokens_pct`: tokens identical to the full-depth chunk on the same
    frame (stricter: includes how one early-exit error changes the rest of the chunk).
    """
    import time

    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.vla.early_exit_train import _demo_observations
    from vla_runtime.policies.vla.policy import load_vla_policy
    from vla_runtime.runtime.evaluate import machine_info
    from vla_runtime.runtime.metrics import percentiles

    ck = resolve_checkpoint(checkpoint)
    pred_dir = ck / PREDICTOR_DIR
    trained_on: set[str] = set()
    for d in (pred_dir, specprune_predictors):
        if d is not None and (Path(d) / "predictors.json").is_file():
            trained_on |= set(json.loads((Path(d) / "predictors.json").read_text()).get("train", {})
                              .get("demo_files", []))
    arms: list[tuple[str, tuple[str, ...]]] = [("full", ()), ("earlyexit", ("earlyexit",))]
    if with_specprune:
        arms += [("specprune", ("specprune",)), ("specprune+earlyexit", ("specprune", "earlyexit"))]
    def ee_opts(name: str) -> dict[str, Any]:
        o: dict[str, Any] = {"record_chunks": True, **(options or {})}
        if name == "specprune+earlyexit" and specprune_predictors is not None:
            o["predictors"] = str(specprune_predictors)  # trained with the pruner on (train ... accel=specprune)
        return {"earlyexit": o}

    pols = {name: load_vla_policy(ck, accel=acc, accel_options=ee_opts(name)) for name, acc in arms}
    cfg = pols["full"].cfg
    episodes = _demo_observations(list(data_dirs), tuple(cfg.cameras), cfg.n_action_steps, max_chunks, 40, seed,
                                  exclude=trained_on)
    ms: dict[str, list[float]] = {n: [] for n in pols}
    cpu: dict[str, list[float]] = {n: [] for n in pols}  # process CPU time: robust to other jobs' load
    same: dict[str, list[float]] = {n: [] for n in pols}
    err: dict[str, list[float]] = {n: [] for n in pols}  # max |action - reference action| per chunk (env units)
    for obs_list in episodes:
        for p in pols.values():
            p.reset(obs_list[0].instruction)
        for obs in obs_list:
            acts = {}
            for name, p in pols.items():
                t0, c0 = time.perf_counter(), time.process_time()
                acts[name] = p.act(obs).actions
                ms[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
            for name in pols:
                ref = acts["specprune"] if name == "specprune+earlyexit" else acts["full"]
                same[name].append(float(np.mean(np.isclose(acts[name], ref, atol=1e-6))))
                err[name].append(float(np.abs(acts[name] - ref).max()))
    base = percentiles(ms["full"])["p50"]
    base_cpu = percentiles(cpu["full"])["p50"]
    rows = []
    for name, p in pols.items():
        pc = percentiles(ms[name])
        cc = percentiles(cpu[name])
        ep = p.exit_policy if isinstance(p.exit_policy, EarlyExitPolicy) else None
        row = {"name": name, "latency_ms_p50": pc["p50"], "latency_ms_p95": pc["p95"],
               "ratio_to_baseline": round(base / pc["p50"], 3) if pc["p50"] else None,
               "cpu_ms_p50": cc["p50"], "cpu_ratio_to_baseline": round(base_cpu / cc["p50"], 3) if cc["p50"] else None,
               "same_chunk_tokens_pct": round(100.0 * float(np.mean(same[name])), 2),
               "chunk_max_abs_err_mean": round(float(np.mean(err[name])), 4),
               **summarize(ep, p.model.n_layers)}
        rows.append(row)
    report = {"bench": "earlyexit-replay", "checkpoint": str(ck), "data": [str(d) for d in data_dirs],
              "chunks": len(ms["full"]), "episodes": len(episodes), "held_out": bool(trained_on),
              "machine": machine_info(), "baseline": "full", "methods": rows}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"replay {ck.name}: {report['chunks']} chunks from {report['episodes']} held-out demo episodes")
    for r in rows:
        print(f"  {r['name']:22s} layers {r.get('layers_mean')}  agree {r.get('token_agreement_pct')}%  same-chunk "
              f"{r['same_chunk_tokens_pct']}%  p50 {r['latency_ms_p50']:.1f} ms  p95 {r['latency_ms_p95']:.1f} ms  "
              f"ratio {r['ratio_to_baseline']}x (cpu {r['cpu_ratio_to_baseline']}x)  chunk err {r['chunk_max_abs_err_mean']}"
              + (f"  within-tol {r['chunk_within_tol_pct']}%" if "chunk_within_tol_pct" in r else ""))
    return report


def main(argv: list[str] | None = None) -> None:
    """python -m vla_runtime.policies.vla.early_exit_bench CKPT DEMO_DIR [--chunks N] [--specprune] [--out DIR]
    [--threshold T]"""
    import argparse

    ap = argparse.ArgumentParser(description="open-loop early-exit replay on held-out demo frames")
    ap.add_argument("checkpoint")
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--specprune", action="store_true")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--kv-fill", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--specprune-predictors", type=Path, default=None,
                    help="predictors trained with the pruner on, for the specprune+earlyexit arm")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    opts: dict[str, Any] = {}
    if a.threshold is not None:
        opts["threshold"] = a.threshold
    if a.kv_fill:
        opts["kv_fill"] = a.kv_fill
    replay_earlyexit(a.checkpoint, a.data, a.chunks, a.seed, opts, a.specprune, a.out, a.specprune_predictors)


if __name__ == "__main__":
    main()
