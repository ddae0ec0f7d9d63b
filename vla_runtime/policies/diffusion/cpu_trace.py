"""TorchScript-frozen replays of the diffusion policy's fixed-shape calls on the CPU (the CPU analogue of
vla_runtime/policies/vla/cuda_graphs.py, same `run_callable` interface).

At batch 1 the encoder, the STEP predictor and the U-Net are dominated by per-op dispatch (dozens of small
convs, norms and linears per call). Tracing each call once per input shape and freezing it
(`torch.jit.freeze` + `optimize_for_inference`: constants folded, conv/linear prepacked for oneDNN, elementwise
ops fused) cuts that overhead. Every trace is checked against the eager call on its first inputs; a trace that
fails or disagrees is dropped for that call and the eager path is used (one warning).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn


class _Call(nn.Module):
    def __init__(self, modules: tuple[nn.Module, ...], fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.mods = nn.ModuleList(modules)  # registers the parameters fn reads, so tracing sees them as weights
        self.fn = fn

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)


class TracedCalls:
    """fn(*xs) from a frozen TorchScript trace per (name, input shapes and dtypes); eager fallback."""

    def __init__(self, atol: float = 1e-4, max_shapes: int = 8) -> None:
        self.atol = atol
        self.max_shapes = max_shapes
        self._traced: dict[tuple[Any, ...], Any] = {}
        self._failed: set[str] = set()
        self.replays = 0
        self.eager = 0

    def run_callable(self, name: str, modules: tuple[nn.Module, ...], fn: Callable[..., torch.Tensor],
                     *xs: torch.Tensor) -> torch.Tensor:
        if name in self._failed or not xs or torch.is_grad_enabled() and any(x.requires_grad for x in xs):
            self.eager += 1
            return fn(*xs)
        key = (name, *((tuple(x.shape), x.dtype) for x in xs))
        t = self._traced.get(key)
        if t is None:
            if sum(1 for k in self._traced if k[0] == name) >= self.max_shapes:
                self.eager += 1
                return fn(*xs)
            ref = fn(*xs)
            t = self._trace(name, modules, fn, xs, ref)
            if t is None:
                self.eager += 1
                return ref
            self._traced[key] = t
            return ref
        self.replays += 1
        return t(*xs)

    def _trace(self, name: str, modules: tuple[nn.Module, ...], fn: Callable[..., torch.Tensor],
               xs: tuple[torch.Tensor, ...], ref: torch.Tensor) -> Any:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings: shapes are specialised on purpose (one trace per shape)
                m = _Call(modules, fn).eval()
                t = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, xs, check_trace=False)))
                out = t(*xs)
                out = t(*xs)  # the second call runs the optimised graph (profiling executor)
            ok = out.shape == ref.shape and bool(torch.allclose(out.float(), ref.float(), atol=self.atol, rtol=1e-3))
            if not ok:
                raise RuntimeError(f"trace disagrees with eager (max abs diff "
                                   f"{(out.float() - ref.float()).abs().max().item():.2e})")
            return t
        except Exception as e:  # noqa: BLE001 - any trace failure: eager from now on for this call
            self._failed.add(name)
            warnings.warn(f"CPU trace of {name!r} disabled, running it eagerly: {type(e).__name__}: {e}",
                          stacklevel=3)
            return None
