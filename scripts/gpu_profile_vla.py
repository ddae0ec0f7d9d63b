"""Where a VLA step's time goes on a GPU: wall vs CPU time vs GPU kernel time, stock decoder forward vs our layer
loop, and the top kernels / CPU ops of one `policy.act` (torch.profiler).

    python scripts/gpu_profile_vla.py --config oft --out OUT/profile.json     # OpenVLA-OFT proportions, random
    python scripts/gpu_profile_vla.py --config vla:vla_libero_object

Wall ~= CPU time with GPU time well below it means the step is bound by Python / kernel launches (or by device
syncs that stop the CPU from running ahead), not by the GPU: fewer tokens then cannot make it faster.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

OFT = {"image_size": 224, "patch_size": 14, "vision_hidden": 1152, "vision_layers": 27, "vision_heads": 16,
       "vision_intermediate": 4304, "hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "head_dim": 128,
       "intermediate": 11008, "vocab_size": 32000, "tokens_per_action": 7, "chunk_size": 8, "head_hidden": 1024,
       "max_text_len": 24}


def timed(fn, n: int = 20) -> dict[str, float]:  # noqa: ANN001
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    walls, cpus, gpus = [], [], []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t, c = time.perf_counter(), time.process_time()
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1e3)
        cpus.append((time.process_time() - c) * 1e3)
        gpus.append(e0.elapsed_time(e1))
    return {"wall_ms": round(float(np.median(walls)), 2), "cpu_ms": round(float(np.median(cpus)), 2),
            "event_ms": round(float(np.median(gpus)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="oft")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from vla_runtime.envs.base import EpisodeSpec
    from vla_runtime.envs.dummy import DummyReachEnv
    from vla_runtime.policies.vla.bench import _policy_from
    from vla_runtime.policies.vla.modeling import RandomVisualDrop

    src = OFT if a.config == "oft" else a.config.removeprefix("vla:")
    pol = _policy_from(src, "cuda", "bf16", ())
    cfg, model = pol.cfg, pol.model
    env = DummyReachEnv(cameras=cfg.cameras, image_size=cfg.image_size)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 0))
    pol.reset(obs.instruction)
    res: dict = {"config": a.config, "seq_len": cfg.seq_len, "visual": cfg.n_visual,
                 "gpu": torch.cuda.get_device_name()}
    lg = model.layer_graphs  # CUDA graphs (the policy default on CUDA); each timing below also runs eagerly
    for tag, g in (("eager", None), ("graphs", lg)):
        model.layer_graphs = g
        res[f"act_full_{tag}"] = timed(lambda: pol.act(obs))
    N, D = cfg.seq_len, model.hidden
    h = torch.randn(1, N, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(N, device="cuda")[None]
    kinds = torch.full((1, N), 3, device="cuda")
    kinds[:, 1:1 + cfg.n_visual] = 1
    valid = torch.ones(1, N, dtype=torch.bool, device="cuda")
    with torch.inference_mode():
        res["stock_decoder_sdpa_causal"] = timed(lambda: model.decoder(inputs_embeds=h, position_ids=pos))
        for tag, g in (("eager", None), ("graphs", lg)):
            model.layer_graphs = g
            res[f"loop_full_{tag}"] = timed(lambda: model.forward_layers(h, pos, kinds, valid))
            for k in (0.5, 0.3, 0.2, 0.1):
                gen = torch.Generator().manual_seed(0)
                res[f"loop_keep{int(k * 100)}_{tag}"] = timed(
                    lambda: model.forward_layers(h, pos, kinds, valid, pruner=RandomVisualDrop(1, k, generator=gen)))
    model.layer_graphs = lg
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            pol.act(obs)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    res["top_cuda"] = ka.table(sort_by="cuda_time_total", row_limit=12)
    res["top_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=12)
    for k, v in res.items():
        if not k.startswith("top"):
            print(f"{k:28s} {json.dumps(v)}")
    print(res["top_cuda"])
    print(res["top_cpu"])
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
