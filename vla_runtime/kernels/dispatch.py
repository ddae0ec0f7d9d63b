"""One dispatch rule for every kernel op, and the lazy, import-order-safe loading of the Triton kernels.

The rule (`choose_backend`), evaluated at *call time* for each call:
  1. a forced backend wins: the op's `backend=` kwarg, else the innermost `use_backend(...)` context;
  2. "auto": Triton (compiled) when the tensors are on CUDA and triton is importable;
     the Triton *interpreter* when `TRITON_INTERPRET=1` is set in the environment (CPU tensors then go
     through the Triton kernel, run by numpy: slow, for tests only);
     the torch reference otherwise.
  Forcing "triton" on CPU tensors without `TRITON_INTERPRET=1` raises UserError (nothing can run it).

Why the env var is read at call time and the kernels are loaded lazily:
- `triton.jit` decides compiled-vs-interpreted when the decorator runs, i.e. when the module holding the
  `@triton.jit` functions is imported. The kernel bodies therefore live in `vla_runtime/kernels/_triton/`,
  imported only on the first Triton-path call, under the `TRITON_INTERPRET` value of that moment; if a later
  call wants the other mode the module is reloaded (`load_triton_module`). So a test module can set the env
  var in a fixture, and test modules that import the kernels without it keep getting the torch path.
- `import triton` after Mesa's GL driver (system libLLVM) is mapped segfaults the process (see
  `vla_runtime/envs/render.py`). `import vla_runtime.kernels` never imports triton; the first Triton-path call
  does, after checking /proc/self/maps: if libLLVM is already loaded, "auto" falls back to torch with one
  warning and a forced "triton" raises, instead of killing the process. Processes that render and want
  Triton must import triton before the simulator (`vla_runtime.envs.render.prepare_robosuite_import()`).

`last_backend(op)` reports which path the latest call of `op` took ("torch", "triton" or
"triton-interpret"), so tests and benchmarks can assert on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

from vla_runtime.errors import UserError

log = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "triton"]
ChosenBackend = Literal["torch", "triton", "triton-interpret"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

_forced: contextvars.ContextVar[str] = contextvars.ContextVar("vla_runtime_kernel_backend", default="auto")
_last: dict[str, str] = {}
_loaded_mode: dict[str, bool] = {}  # op -> interpret flag its kernel module was (re)imported under
_triton_import_ok: bool | None = None  # None until the first attempt
_warned_fallback = False


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET is set to a true value (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _system_llvm_loaded() -> bool:
    """True if a system libLLVM (Mesa's GL driver) is mapped: a first `import triton` would then segfault."""
    try:
        with open("/proc/self/maps") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


def triton_importable() -> bool:
    """Whether `import triton` is (or was) safe and successful here; imports triton on the first True answer."""
    global _triton_import_ok
    if "triton" in sys.modules:
        return True
    if _triton_import_ok is not None:
        return _triton_import_ok
    if not triton_installed():
        _triton_import_ok = False
    elif _system_llvm_loaded():
        # Cached: once Mesa's libLLVM is mapped it stays mapped for the life of the process.
        _triton_import_ok = False
    else:
        import triton  # noqa: F401  - lazy on purpose, see module docstring

        _triton_import_ok = True
    return _triton_import_ok


@contextlib.contextmanager
def use_backend(name: BackendName) -> Iterator[None]:
    """Force a backend for every kernel call in this context (benchmarks compare paths with it)."""
    if name not in BACKENDS:
        raise UserError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def choose_backend(op: str, *tensors: torch.Tensor, backend: BackendName | None = None) -> ChosenBackend:
    """Apply the dispatch rule to these input tensors; records and returns the chosen path."""
    global _warned_fallback
    want = backend if backend is not None else _forced.get()
    if want not in BACKENDS:
        raise UserError(f"unknown kernel backend {want!r}; choose one of {', '.join(BACKENDS)}")
    tensors = tuple(t for t in tensors if isinstance(t, torch.Tensor))  # non-tensors: the op's checks report
    on_cuda = any(t.is_cuda for t in tensors)
    if on_cuda and not all(t.is_cuda for t in tensors):
        raise UserError(f"{op}: inputs are on different devices "
                        f"({sorted({str(t.device) for t in tensors})}); move them to one device")
    chosen: ChosenBackend
    if want == "torch":
        chosen = "torch"
    elif want == "triton":
        if not on_cuda and not interpret_requested():
            raise UserError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton "
                            "interpreter); use a CUDA device or backend='torch'")
        if not triton_importable():
            raise UserError(f"{op}: backend='triton' but triton cannot be imported safely here (not installed, "
                            "or Mesa's libLLVM is already loaded: import triton before the simulator)")
        chosen = "triton" if on_cuda else "triton-interpret"
    else:  # auto
        if (on_cuda or interpret_requested()) and triton_importable():
            chosen = "triton" if on_cuda else "triton-interpret"
        else:
            if (on_cuda or interpret_requested()) and not _warned_fallback:
                log.warning("%s: triton unavailable (not installed or unsafe to import after the GL driver); "
                            "using the torch reference", op)
                _warned_fallback = True
            chosen = "torch"
    if chosen == "triton" and interpret_requested():
        chosen = "triton-interpret"  # TRITON_INTERPRET=1 also interprets CUDA tensors' kernels
    _last[op] = chosen
    return chosen


def last_backend(op: str) -> str | None:
    """The path the latest call of `op` took in this process, or None if it was never called."""
    return _last.get(op)


def load_triton_module(op: str) -> ModuleType:
    """Import (or re-import) `vla_runtime.kernels._triton.<op>` under the current TRITON_INTERPRET value.

    The `@triton.jit` decorator fixes the mode at import time, so a mode change means a reload.
    """
    interp = interpret_requested()
    name = f"vla_runtime.kernels._triton.{op}"
    mod = sys.modules.get(name)
    if mod is not None and _loaded_mode.get(op) == interp:
        return mod
    mod = importlib.import_module(name) if mod is None else importlib.reload(mod)
    _loaded_mode[op] = interp
    return mod


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (Triton block sizes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()
