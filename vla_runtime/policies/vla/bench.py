"""VLA forward benchmark: per-step latency split (vision / decoder / head), token counts, GFLOPs per step, and
achieved GFLOP/s against a bf16 matmul peak measured in the same process (so a busy machine shows up as a low
peak, and the ratio stays meaningful).

Methods compared on the same observations: the full model (baseline), every requested acceleration from the
registry, and optional "random keep-k" references (RandomVisualDrop after `drop_layer`): what dropping that many
visual tokens buys in latency, independent of how a real pruner chooses them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.errors import UserError
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.modeling import RandomVisualDrop, VLAModel, count_params
from vla_runtime.policies.vla.policy import VLAPolicy, build_strategies, load_vla_policy, resolve_dtype
from vla_runtime.policies.vla.tokenizer import WordTokenizer


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 1024, device: str = "cpu",
                       seconds: float = 1.0) -> float:
    """Best-of-runs square matmul throughput (GFLOP/s) with the current thread setting."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def forward_gflops(policy: VLAPolicy, obs: Any) -> float:
    """FLOPs of one act() counted by torch's FlopCounterMode (matmuls, convs and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    policy.reset(obs.instruction)
    with FlopCounterMode(display=False) as fc:
        policy.act(obs)
    return fc.get_total_flops() / 1e9


def _policy_from(source: str | Path | VLAConfig | dict[str, Any], device: str, dtype: str, accel: tuple[str, ...],
                 model: VLAModel | None = None, cuda_graphs: bool | None = None) -> VLAPolicy:
    """A policy from a checkpoint, or from a config with random weights. `model` (config sources only) reuses
    an already built model, so variants of a large random model share one copy of its weights."""
    if isinstance(source, (str, Path)):
        from vla_runtime.policies import resolve_checkpoint

        return load_vla_policy(resolve_checkpoint(str(source)), device=device, accel=accel, dtype=dtype,
                               cuda_graphs=cuda_graphs)
    cfg = source if isinstance(source, VLAConfig) else VLAConfig(**source)
    tok = WordTokenizer.from_instructions(["reach the red target"])
    tdt = resolve_dtype(dtype, device)
    if model is None:
        torch.manual_seed(0)
        # built on the target device in the target dtype: a 7B-size random model never exists in fp32 on the CPU
        prev = torch.get_default_dtype()
        torch.set_default_dtype(tdt)
        try:
            with torch.device(device):
                model = VLAModel(cfg, bos_id=tok.bos_id)
        finally:
            torch.set_default_dtype(prev)
    stats = {k: np.full(n, v, np.float32) for k, n, v in (("action_min", cfg.action_dim, -1.0),
                                                          ("action_max", cfg.action_dim, 1.0),
                                                          ("state_min", cfg.state_dim, -1.0),
                                                          ("state_max", cfg.state_dim, 1.0))}
    pruner, exit_policy = build_strategies(model, accel)
    return VLAPolicy(model, tok, stats, device=device, dtype=tdt, pruner=pruner, exit_policy=exit_policy,
                     name="vla:random", accel=accel, cuda_graphs=cuda_graphs)


def _run(policy: VLAPolicy, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    env = DummyReachEnv(cameras=policy.cfg.cameras, image_size=policy.cfg.image_size)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, seed))
    policy.reset(obs.instruction)
    rows: list[dict[str, Any]] = []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        chunk = policy.act(obs)
        total = (time.perf_counter() - t) * 1e3
        cpu = (time.process_time() - c) * 1e3  # CPU time: what wall time would be on an idle machine (1 thread)
        if i >= warmup:
            rows.append({**chunk.info, "total_ms": total, "cpu_ms": cpu})
        r = env.step(chunk.actions[0])
        obs = r.obs if not r.done else env.reset(EpisodeSpec("dummy:reach", "reach", i, seed + i + 1))
    out: dict[str, Any] = {}
    for k in ("total_ms", "vision_ms", "decoder_ms", "head_ms"):
        v = np.array([r[k] for r in rows])
        out[f"{k[:-3]}_ms_p50"] = round(float(np.percentile(v, 50)), 3)
        out[f"{k[:-3]}_ms_p95"] = round(float(np.percentile(v, 95)), 3)
    out["latency_ms_p50"], out["latency_ms_p95"] = out["total_ms_p50"], out["total_ms_p95"]
    out["cpu_ms_p50"] = round(float(np.percentile([r["cpu_ms"] for r in rows], 50)), 3)
    out["tokens_per_layer"] = rows[-1]["tokens_per_layer"]
    out["visual_tokens_per_layer"] = rows[-1]["visual_tokens_per_layer"]
    out["exit_layer_mean"] = round(float(np.mean([r["exit_layer"] for r in rows])), 3)
    out["decoder_share"] = round(out["decoder_ms_p50"] / max(1e-9, out["total_ms_p50"]), 3)
    return out


def bench_vla(source: str | Path | VLAConfig | dict[str, Any] | None, steps: int = 20, out_dir: str | Path | None = None,
              device: str = "cpu", dtype: str = "auto", threads: int | None = 1, accel: Sequence[str] = (),
              keep: Sequence[float] = (), drop_layer: int = 1, warmup: int = 3, seed: int = 0,
              peak_seconds: float = 1.0, graphs: str = "auto", cpu_paths: str = "auto") -> dict[str, Any]:
    """Benchmark a checkpoint ("vla:<name>", a name or a directory) or a config with random weights (None: the
    default config). Writes out_dir/bench.json when out_dir is set; `format_table(result)` prints it.

    graphs (CUDA only): "auto" = the policy default (CUDA graphs on), "off", or "both": every variant runs eagerly
    and then from CUDA graphs, named "<variant> (eager)" / "<variant> (graphs)"; the first is the baseline.
    cpu_paths (CPU): "auto" = the policy defaults (lean fused layers; AR: float32 decode steps after a bf16
    prefill), "stock" = both off, or "both": every variant runs with the stock layers and then with the fast
    paths, "<variant> (stock)" / "<variant> (lean)"."""
    if graphs not in ("auto", "off", "both"):
        raise UserError(f"graphs must be auto, off or both, got {graphs!r}")
    if cpu_paths not in ("auto", "stock", "both"):
        raise UserError(f"cpu_paths must be auto, stock or both, got {cpu_paths!r}")
    if source is None:  # the default architecture with random weights
        source = VLAConfig()
    if isinstance(source, str) and source.startswith("vla:"):
        source = source[4:]
    if threads is not None:
        torch.set_num_threads(threads)
    if steps < 1:
        raise UserError("--steps must be >= 1")
    cg = False if graphs == "off" else None
    base = _policy_from(source, device, dtype, (), cuda_graphs=cg)
    cfg = base.cfg
    peak = matmul_peak_gflops(base.dtype, device=device,  # the dtype the policy really runs in
                              seconds=peak_seconds, n=8192 if device.startswith("cuda") else 1024)
    env = DummyReachEnv(cameras=cfg.cameras, image_size=cfg.image_size)
    obs0 = env.reset(EpisodeSpec("dummy:reach", "reach", 0, seed))
    methods: list[dict[str, Any]] = []
    variants: list[tuple[str, VLAPolicy]] = [("full", base)]
    shared = None if isinstance(source, (str, Path)) else base.model
    for name in accel:
        variants.append((name, _policy_from(source, device, dtype, (name,), model=shared, cuda_graphs=cg)))
    for k in keep:
        variants.append((f"random_keep{int(round(k * 100))}@L{drop_layer}", base))
    for name, pol in variants:
        saved = pol.pruner
        if name.startswith("random_keep"):
            k = float(name.split("keep")[1].split("@")[0]) / 100
            pol.pruner = RandomVisualDrop(drop_layer, k, generator=torch.Generator().manual_seed(seed))
        lg = pol.model.layer_graphs
        pol.model.layer_graphs = None  # FLOPs are counted per dispatched op: a graph replay dispatches none
        gfl = forward_gflops(pol, obs0)
        both = graphs == "both" and lg is not None
        default = (pol.cpu_lean_layers, pol.cpu_decode_fp32)
        paths = {"auto": (default,), "stock": ((False, False),), "both": ((False, False), default)}[cpu_paths]
        for g in ((None, lg) if both else (lg,)):
            for lean, fp32 in paths:
                pol.set_cpu_paths(lean_layers=lean, decode_fp32=fp32)
                pol.model.layer_graphs = g
                label = f"{name} ({'graphs' if g is not None else 'eager'})" if both else name
                if cpu_paths == "both":
                    label += f" ({'lean' if lean or fp32 else 'stock'})"
                m = {"name": label, **_run(pol, steps, warmup, seed), "gflops_per_step": round(gfl, 3),
                     "cuda_graphs": g is not None, "cpu_lean_layers": lean, "cpu_decode_fp32": fp32}
                m["achieved_gflops_per_s"] = round(gfl / (m["total_ms_p50"] / 1e3), 2)
                m["fraction_of_peak"] = round(m["achieved_gflops_per_s"] / peak, 3)
                m["success_pct"], m["success_ci95"] = None, None
                methods.append(m)
        pol.set_cpu_paths(*default)
        pol.model.layer_graphs = lg
        pol.pruner = saved
    if base.model.layer_graphs is not None:
        res_graphs = base.model.layer_graphs.stats()
    else:
        res_graphs = {}
    b50 = methods[0]["latency_ms_p50"]
    for m in methods:
        m["ratio_to_baseline"] = round(b50 / m["latency_ms_p50"], 3)
    res: dict[str, Any] = {"bench": "vla", "env": "dummy:reach", "episodes": 0, "seeds": [seed],
           "baseline": methods[0]["name"], "cuda_graph_stats": res_graphs,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
                       "dtype": str(base.dtype).replace("torch.", ""), "matmul_peak_gflops": round(peak, 1),
                       "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
           "model": {"mode": cfg.mode, "params_m": round(count_params(base.model) / 1e6, 3),
                     "decoder_params_m": round(count_params(base.model.decoder) / 1e6, 3),
                     "seq_len": cfg.seq_len, "visual_tokens": cfg.n_visual,
                     "visual_fraction": round(cfg.n_visual / cfg.seq_len, 3), "layers": base.model.n_layers,
                     "hidden": base.model.hidden, "patch_size": cfg.patch_size, "image_size": cfg.image_size},
           "methods": methods}
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "bench.json").write_text(json.dumps(res, indent=1))
    res["table"] = format_table(res)
    return res


def format_table(res: dict[str, Any]) -> str:
    lines = [f"VLA bench ({res['model']['mode']}, {res['model']['visual_tokens']} visual / {res['model']['seq_len']} "
             f"tokens, peak {res['machine']['matmul_peak_gflops']} GFLOP/s {res['machine']['dtype']})",
             f"{'method':<22}{'p50 ms':>9}{'vision':>8}{'decoder':>9}{'head':>7}{'GFLOP':>8}{'GFLOP/s':>9}"
             f"{'%peak':>7}{'x':>7}{'cpu ms':>8}"]
    for m in res["methods"]:
        lines.append(f"{m['name']:<22}{m['latency_ms_p50']:>9.1f}{m['vision_ms_p50']:>8.1f}{m['decoder_ms_p50']:>9.1f}"
                     f"{m['head_ms_p50']:>7.1f}{m['gflops_per_step']:>8.2f}{m['achieved_gflops_per_s']:>9.1f}"
                     f"{100 * m['fraction_of_peak']:>7.1f}{m['ratio_to_baseline']:>7.2f}{m['cpu_ms_p50']:>8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="VLA forward benchmark")
    p.add_argument("source", help="checkpoint (shipped name or directory) or a JSON VLAConfig ('{}' = defaults)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accel", default="", help="comma-separated registered accelerations")
    p.add_argument("--keep", default="", help="comma-separated random keep fractions, e.g. 0.5,0.3,0.2")
    p.add_argument("--drop-layer", type=int, default=1)
    p.add_argument("--graphs", default="auto", choices=["auto", "off", "both"],
                   help="CUDA graphs for the decoder layers (CUDA only): policy default, off, or both side by side")
    p.add_argument("--cpu-paths", default="auto", choices=["auto", "stock", "both"],
                   help="CPU fast paths (lean fused layers; AR: float32 decode steps): policy default, off, or both")
    a = p.parse_args(argv)
    src: Any = a.source
    if a.source.lstrip().startswith("{"):
        src = json.loads(a.source)
    res = bench_vla(src, steps=a.steps, out_dir=a.out, device=a.device, dtype=a.dtype, threads=a.threads,
                    accel=[s for s in a.accel.split(",") if s], keep=[float(s) for s in a.keep.split(",") if s],
                    drop_layer=a.drop_layer, graphs=a.graphs, cpu_paths=a.cpu_paths)
    print(format_table(res))


if __name__ == "__main__":
    main()
