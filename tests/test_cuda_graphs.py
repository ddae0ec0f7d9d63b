"""CUDA graphs for the decoder layer loop (vla_runtime/policies/vla/cuda_graphs.py).

On CPU (CI): the policy never attaches graphs, hooks are detected. On a GPU: actions with graphs equal the eager
ones (full, random drops, SpecPrune with its row hooks, AR decoding with its KV cache), graphs are captured once
per shape and replayed afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_runtime.envs.base import EpisodeSpec
from vla_runtime.envs.dummy import DummyReachEnv
from vla_runtime.policies.vla.configuration import VLAConfig
from vla_runtime.policies.vla.cuda_graphs import LayerGraphs, has_hooks
from vla_runtime.policies.vla.modeling import RandomVisualDrop, VLAModel
from vla_runtime.policies.vla.policy import VLAPolicy, build_strategies
from vla_runtime.policies.vla.tokenizer import WordTokenizer

INSTR = "reach the red target"
TINY = dict(image_size=32, patch_size=8, vision_hidden=16, vision_heads=2, vision_intermediate=32, hidden=64,
            layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128, max_text_len=6, chunk_size=4,
            n_action_steps=4, head_hidden=32)
STATS = {k: np.full(n, v, np.float32) for k, n, v in (("action_min", 7, -1.0), ("action_max", 7, 1.0),
                                                      ("state_min", 8, -0.5), ("state_max", 8, 0.5))}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def policy(device: str, graphs: bool, mode: str = "parallel", accel: tuple[str, ...] = (), layers: int = 4
           ) -> VLAPolicy:
    tok = WordTokenizer.from_instructions([INSTR])
    torch.manual_seed(0)
    cfg = VLAConfig(mode=mode, vocab_size=tok.vocab_size, **{**TINY, "layers": layers})  # type: ignore[arg-type]
    model = VLAModel(cfg, bos_id=tok.bos_id)
    pruner, exit_policy = build_strategies(model, accel)
    return VLAPolicy(model, tok, STATS, device=device, dtype=torch.float32, pruner=pruner,
                     exit_policy=exit_policy, cuda_graphs=graphs)


def rollout(pol: VLAPolicy, steps: int = 4) -> list[np.ndarray]:
    env = DummyReachEnv(cameras=pol.cfg.cameras, image_size=pol.cfg.image_size)
    obs = env.reset(EpisodeSpec("dummy:reach", "reach", 0, 3))
    pol.reset(obs.instruction)
    out = []
    for _ in range(steps):
        chunk = pol.act(obs)
        out.append(chunk.actions)
        obs = env.step(chunk.actions[0]).obs
    return out


def test_cpu_policy_never_attaches_graphs() -> None:
    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.diffusion.policy import load_diffusion_policy

    assert policy("cpu", graphs=True).model.layer_graphs is None
    assert policy("cpu", graphs=None).model.layer_graphs is None  # type: ignore[arg-type]
    from vla_runtime.policies.diffusion.cpu_trace import TracedCalls
    from vla_runtime.policies.vla.cuda_graphs import LayerGraphs

    g = load_diffusion_policy(resolve_checkpoint("diffusion_lift"), cuda_graphs=True)._graphs
    assert not isinstance(g, LayerGraphs) and isinstance(g, TracedCalls)  # on the CPU: TorchScript traces
    assert load_diffusion_policy(resolve_checkpoint("diffusion_lift"), cpu_trace=False)._graphs is None


def test_hook_detection() -> None:
    lin = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert not has_hooks(lin)
    h = lin[0].register_forward_pre_hook(lambda m, a: None)
    assert has_hooks(lin)  # a hooked submodule: the layer must run eagerly
    h.remove()
    assert not has_hooks(lin)
    g = LayerGraphs()
    assert not g.usable(lin, torch.zeros(1))  # CPU tensor


@cuda
@pytest.mark.parametrize("accel", [(), ("specprune",)])
def test_graphs_equal_eager_on_cuda(accel: tuple[str, ...]) -> None:
    eager = rollout(policy("cuda", graphs=False, accel=accel))
    pol = policy("cuda", graphs=True, accel=accel)
    assert pol.model.layer_graphs is not None
    graphed = rollout(pol)
    for a, b in zip(eager, graphed):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    st = pol.model.layer_graphs.stats()
    assert st["graph_replays"] > 0
    captures = st["graph_captures"]
    rollout(pol)  # same shapes again: replays only
    assert pol.model.layer_graphs.stats()["graph_captures"] == captures


@cuda
def test_graphs_with_random_drops_and_ar_on_cuda() -> None:
    eager, pol = policy("cuda", graphs=False), policy("cuda", graphs=True)
    for p in (eager, pol):
        p.pruner = RandomVisualDrop(1, 0.5, generator=torch.Generator().manual_seed(0))
    for a, b in zip(rollout(eager), rollout(pol)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert pol.model.layer_graphs.stats()["graph_shapes"] == 2  # full set at layer 0, the kept set after
    # AR decoding uses a KV cache: its layers run eagerly, with the same result
    ar_e, ar_g = policy("cuda", graphs=False, mode="ar"), policy("cuda", graphs=True, mode="ar")
    for a, b in zip(rollout(ar_e, 2), rollout(ar_g, 2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@cuda
def test_vision_encoder_graph_on_cuda() -> None:
    """The image encoder is one graph per image shape; a hook on the vision tower sends it back to eager."""
    pol = policy("cuda", graphs=True)
    lg = pol.model.layer_graphs
    x = torch.rand(2, 3, 32, 32, device="cuda") * 2 - 1
    with torch.inference_mode():
        ref = pol.model.projector(pol.model.vision(pixel_values=x).last_hidden_state)
        out = pol.model.encode_images(x[None])
        assert ("vision", ((2, 3, 32, 32), torch.float32)) in lg._graphs  # (name, (shape, dtype) per input)
        torch.testing.assert_close(out, ref.reshape(1, -1, ref.shape[-1]), atol=1e-5, rtol=1e-5)
        n = lg.replays
        seen: list[int] = []
        h = pol.model.vision.register_forward_hook(lambda m, a, o: seen.append(1))
        pol.model.encode_images(x[None])
        h.remove()
        assert seen and lg.replays == n  # ran eagerly, the hook fired


class RecordingGraphs(LayerGraphs):
    """Runs 'graphed' segments eagerly on any device and records them: checks the loop's segmentation on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.segments: list[tuple[int, int]] = []

    def usable(self, layer, h) -> bool:  # type: ignore[no-untyped-def, override]
        mods = layer if isinstance(layer, tuple) else (layer,)
        return not torch.is_grad_enabled() and not any(has_hooks(m) for m in mods)

    def run(self, i, layers, h, mask, pe, positions):  # type: ignore[no-untyped-def, override]
        self.segments.append((i, i + len(layers)))
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=positions)
        return h

    def run_callable(self, name, modules, fn, x):  # type: ignore[no-untyped-def, override]
        return fn(x)


@pytest.mark.parametrize("accel", [(), ("specprune",), ("random",)])
def test_segments_between_pruning_points_equal_eager(accel: tuple[str, ...]) -> None:
    """Layers between the points where the pruner acts run as one segment; results equal the per-layer loop."""
    real = () if accel == ("random",) else accel
    eager, seg = policy("cpu", graphs=False, accel=real, layers=12), policy("cpu", graphs=False, accel=real, layers=12)
    if accel == ("random",):
        for p in (eager, seg):
            p.pruner = RandomVisualDrop(1, 0.5, generator=torch.Generator().manual_seed(0))
    rec = RecordingGraphs()
    seg.model.layer_graphs = rec
    for a, b in zip(rollout(eager, 3), rollout(seg, 3)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    n = seg.model.n_layers
    per_step = rec.segments[: len(rec.segments) // 3]
    covered = sorted({j for a, b in per_step for j in range(a, b)})
    if not accel:
        assert per_step == [(0, n)]  # nothing acts: one graph for the whole decoder
    elif accel == ("random",):
        assert per_step == [(0, 1), (1, n)]  # the drop before layer 1 splits it once
    else:
        calls = seg.pruner.call_layers
        assert all(not (a < j < b) for a, b in per_step for j in calls)  # never across a point where it acts
        hooked = {j for j in range(n) if has_hooks(seg.model.decoder.layers[j])}
        assert hooked and not hooked & set(covered)  # row-hooked layers run on their own, eagerly
        assert len(per_step) < n - len(hooked)  # and some segments span several layers


@cuda
@pytest.mark.parametrize("sampler", ["ddim10", "step2"])
def test_diffusion_denoiser_graphs_equal_eager_on_cuda(sampler: str) -> None:
    from vla_runtime.policies import resolve_checkpoint
    from vla_runtime.policies.diffusion.policy import load_diffusion_policy
    from vla_runtime.runtime.types import Observation

    ckpt = resolve_checkpoint("diffusion_lift")
    pols = [load_diffusion_policy(ckpt, device="cuda", sampler=sampler, cuda_graphs=g, seed=0) for g in (False, True)]
    assert pols[0]._graphs is None and pols[1]._graphs is not None
    spec = pols[0].spec
    rng = np.random.default_rng(0)
    outs: list[list[np.ndarray]] = [[], []]
    frames = [{c: rng.integers(0, 256, (spec.image_size, spec.image_size, 3), dtype=np.uint8) for c in spec.cameras}
              for _ in range(3)]
    states = [rng.uniform(-0.2, 0.2, spec.state_dim).astype(np.float32) for _ in range(3)]
    for k, p in enumerate(pols):
        p.reset("")
        for i in range(3):
            obs = Observation(images=frames[i], state=states[i], instruction="", stamp=0.0, step=i * spec.n_action_steps)
            outs[k].append(p.act(obs).actions)
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert pols[1]._graphs.replays > 0
