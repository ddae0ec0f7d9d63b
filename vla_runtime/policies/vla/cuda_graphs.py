"""CUDA graphs for the decoder layer loop: one graph per (layer, token-set shape), replayed instead of launching the
layer's ~15-20 kernels from Python.

Why: at batch 1 a decoder layer on a GPU is launch-bound. Measured on an H100 with a Llama-2-7B-size decoder and
594 tokens (docs/BENCHMARKS.md): the stock eager forward took 23.5 ms wall with 23.5 ms of CPU time and ~15 ms of
GPU kernels, and keeping 20 % of the visual tokens only brought it to 19 ms. Token pruning saves GPU work, so it
only shows once the CPU no longer sets the pace.

How it stays correct with pruning and early exit:
- The loop stays in Python. A pruner / exit policy that declares where it acts (`call_layers`, `check_layers`)
  gets the runs of layers between those points as one graph each (e.g. SpecPrune: layers 2-7 of 8, then one
  per dynamic-pruning stage); one that does not gets one graph per layer and its hooks called at every layer.
  A changed token set (pruning) is a new shape: its graph is captured on first use.
- A layer runs eagerly when it must: attention weights are requested (eager capture), a KV cache is in use (AR
  decoding), autograd is on, the tensors are not on CUDA, or the layer or any submodule has forward hooks (e.g.
  SpecPrune's row-score pre-hooks, early exit's lazy-KV hooks): hooks would only run at capture time.
- Static inputs are shared by all layers that see the same shapes: per layer replay = copy h in, replay, clone
  the output; mask / rotary / position buffers are copied once per token set (when the loop passes new tensors).
- All graphs share one memory pool; each output is cloned right after its replay, before any other graph runs,
  so a later capture reusing pool memory cannot clobber a live result.
- At most `max_shapes` distinct input shapes are graphed (later ones run eagerly), and a capture that fails
  disables graphs for the model with one warning instead of failing the step.
- The image encoder (vision tower + projector) is one graph per image-batch shape (`run_callable`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn


@dataclass
class _Inputs:
    h: torch.Tensor
    mask: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor
    src: tuple[Any, ...] = ()  # the loop's tensors last copied in (compared by identity)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    inp: list[torch.Tensor] | None = None  # run_callable's static inputs


def has_hooks(module: nn.Module) -> bool:
    """True if `module` or a submodule has forward (pre-)hooks, or global module hooks are installed."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@dataclass
class LayerGraphs:
    """Per-model cache of captured decoder layers (attach as `VLAModel.layer_graphs`)."""

    max_shapes: int = 16
    enabled: bool = True
    captures: int = 0
    replays: int = 0
    eager: int = 0
    _inputs: dict[tuple[Any, ...], _Inputs] = field(default_factory=dict)
    _graphs: dict[tuple[Any, ...], _Graph] = field(default_factory=dict)
    _pool: Any = None

    def usable(self, layer: nn.Module | tuple[nn.Module, ...], h: torch.Tensor) -> bool:
        mods = layer if isinstance(layer, tuple) else (layer,)
        return self.enabled and h.is_cuda and not torch.is_grad_enabled() and not any(has_hooks(m) for m in mods)

    def run(self, i: int, layers: Sequence[nn.Module], h: torch.Tensor, mask: torch.Tensor | None,
            pe: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """Layers i .. i + len(layers) - 1 on h (B, K, D), replayed from one graph for these shapes (captured on
        first use). The loop passes a run of layers between which no pruner / exit policy acts."""

        def call_all(x: torch.Tensor, **kw: Any) -> torch.Tensor:
            for layer in layers:
                x = layer(x, **kw)
            return x

        key = (tuple(h.shape), h.dtype, None if mask is None else (tuple(mask.shape), mask.dtype),
               tuple(pe[0].shape), tuple(positions.shape))
        inp = self._inputs.get(key)
        if inp is None:
            if len(self._inputs) >= self.max_shapes:
                self.eager += 1
                return call_all(h, attention_mask=mask, position_embeddings=pe, position_ids=positions)
            inp = _Inputs(h=torch.empty_like(h), mask=None if mask is None else torch.empty_like(mask),
                          cos=torch.empty_like(pe[0]), sin=torch.empty_like(pe[1]), pos=torch.empty_like(positions))
            self._inputs[key] = inp
        src = (mask, pe[0], pe[1], positions)
        if len(inp.src) != 4 or any(a is not b for a, b in zip(inp.src, src)):
            if mask is not None:
                assert inp.mask is not None
                inp.mask.copy_(mask)
            inp.cos.copy_(pe[0])
            inp.sin.copy_(pe[1])
            inp.pos.copy_(positions)
            inp.src = src  # holding them keeps their identity unique while they are the current inputs
        inp.h.copy_(h)
        gkey = (i, len(layers), key)
        g = self._graphs.get(gkey)
        if g is None:
            kw = dict(attention_mask=inp.mask, position_embeddings=(inp.cos, inp.sin), position_ids=inp.pos)
            g = self._capture(lambda: call_all(inp.h, **kw), f"decoder layers {i}..{i + len(layers) - 1}")
            if g is None:
                return call_all(h, attention_mask=mask, position_embeddings=pe, position_ids=positions)
            self._graphs[gkey] = g
        g.graph.replay()
        self.replays += 1
        return g.out.clone()

    def run_callable(self, name: str, modules: tuple[nn.Module, ...], fn: Callable[..., torch.Tensor],
                     *xs: torch.Tensor) -> torch.Tensor:
        """fn(*xs) replayed from a graph per (name, the inputs' shapes and dtypes); `modules` (what fn runs) are
        checked for hooks. Used for the VLA's image encoder (vision tower + projector) and the diffusion
        policy's denoiser (one graph per sampler step shape, replayed 2-10 times per chunk)."""
        if not xs or not self.usable(modules, xs[0]):
            return fn(*xs)
        key = (name, *((tuple(x.shape), x.dtype) for x in xs))
        g = self._graphs.get(key)
        if g is None:
            if sum(1 for k in self._graphs if k[0] == name) >= self.max_shapes:
                self.eager += 1
                return fn(*xs)
            static = [x.clone() for x in xs]
            g = self._capture(lambda: fn(*static), name)
            if g is None:
                return fn(*xs)
            g.inp = static
            self._graphs[key] = g
        assert g.inp is not None
        for buf, x in zip(g.inp, xs):
            buf.copy_(x)
        g.graph.replay()
        self.replays += 1
        return g.out.clone()

    def _capture(self, call: Callable[[], torch.Tensor], what: str) -> _Graph | None:
        """Warm up `call` on a side stream, capture it; None (and graphs off, one warning) if capture fails."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
                for _ in range(2):
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = call()
        except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly from now on
            self.enabled = False
            warnings.warn(f"CUDA graph capture of {what} failed ({type(e).__name__}: {e}); running eagerly",
                          stacklevel=3)
            torch.cuda.synchronize()
            return None
        self.captures += 1
        return _Graph(graph=graph, out=out)

    def stats(self) -> dict[str, int]:
        return {"graph_captures": self.captures, "graph_replays": self.replays, "graph_eager": self.eager,
                "graph_shapes": len(self._inputs)}
