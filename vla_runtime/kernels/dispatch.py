"""One dispatch rule for every kernel op, and the lazy, import-order-safe loading of the Triton kernels.

The rule (`choose_backend`), evaluated at *call time* for each call:
  1. a forced backend wins: the op's `backend=` kwarg, else the innermost `use_backend(...)` context;
  2. "auto": Triton when the tensors are on CUDA and triton is importable; on CPU tensors, the Triton
     *interpreter* when `TRITON_INTERPRET=1` is set now (numpy-executed: slow, for tests only); the torch
     reference otherwise (and whenever triton is unavailable, with one warning).
  Forcing "triton" on CPU tensors without `TRITON_INTERPRET=1` raises UserError (nothing can run it).

The two import-time constraints, and how they are handled:
- The interpreter/compiled choice is fixed per *process* when `import triton` first runs: `@triton.jit`
  decides at decoration time, and triton.language's own jit'd helpers (tl.zeros, tl.sum, ...) are decorated
  when triton is imported. So the interpreter only works if `TRITON_INTERPRET=1` was set before the first
  `import triton` in the process (and a process that imported triton interpreted runs even CUDA tensors'
  kernels in the interpreter). `triton_mode()` reports the process's mode; if TRITON_INTERPRET=1 is set but
  triton was already imported compiled, "auto" uses torch with a warning and a forced "triton" raises.
  Our own kernel bodies live in `vla_runtime/kernels/_triton/` and are imported lazily, on the first
  Triton-path call, always decorated in the process's mode (`load_triton_module`).
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
import threading
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
_warned: set[str] = set()
_triton_mode: str | None = None  # cached by triton_mode()
_load_lock = threading.Lock()  # first kernel import may race between the control loop and an inference worker


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
    """Whether `import triton` is (or was) safe and successful here; imports triton on the first True answer.

    The first import fixes the process's interpreter mode from TRITON_INTERPRET as it is at that moment.
    """
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
        try:
            import triton  # noqa: F401  - lazy on purpose, see module docstring
        except ImportError as e:  # a broken install: the torch path still works, say why once
            log.warning("import triton failed (%s): kernels use the torch reference", e)
            _triton_import_ok = False
        else:
            _triton_import_ok = True
    return _triton_import_ok


def triton_mode() -> str | None:
    """"interpret" or "compiled": the mode triton was imported in (importing it now if safe); None if unusable."""
    global _triton_mode
    if _triton_mode is not None:
        return _triton_mode  # fixed for the life of the process once triton is imported
    if not triton_importable():
        return None
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    _triton_mode = "interpret" if isinstance(tl.zeros, InterpretedFunction) else "compiled"
    return _triton_mode


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


def choose_backend(op: str, *tensors: torch.Tensor | None, backend: BackendName | None = None) -> ChosenBackend:
    """Apply the dispatch rule to these input tensors; records and returns the chosen path."""
    want = backend if backend is not None else _forced.get()
    if want not in BACKENDS:
        raise UserError(f"unknown kernel backend {want!r}; choose one of {', '.join(BACKENDS)}")
    tensors = tuple(t for t in tensors if isinstance(t, torch.Tensor))  # non-tensors: the op's checks report
    on_cuda = any(t.is_cuda for t in tensors)
    if on_cuda and not all(t.is_cuda for t in tensors):
        raise UserError(f"{op}: inputs are on different devices "
                        f"({sorted({str(t.device) for t in tensors})}); move them to one device")
    chosen: ChosenBackend = "torch"
    if want == "torch" or (want == "auto" and not on_cuda and not interpret_requested()):
        chosen = "torch"
    else:
        if not on_cuda and not interpret_requested():
            raise UserError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (the Triton "
                            "interpreter); use a CUDA device or backend='torch'")
        mode = triton_mode()
        problem = None
        if mode is None:
            problem = ("triton cannot be imported safely here (not installed, or Mesa's libLLVM is already "
                       "loaded: import triton before the simulator)")
        elif not on_cuda and mode != "interpret":
            problem = ("TRITON_INTERPRET=1 is set but triton was first imported without it in this process; "
                       "the interpreter needs it set before the first `import triton`")
        if problem is None:
            chosen = "triton" if mode == "compiled" else "triton-interpret"
        elif want == "triton":
            raise UserError(f"{op}: backend='triton' unavailable: {problem}")
        else:
            _warn_once(f"{op}: using the torch reference: {problem}")
    _last[op] = chosen
    return chosen


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def last_backend(op: str) -> str | None:
    """The path the latest call of `op` took in this process, or None if it was never called."""
    return _last.get(op)


def load_triton_module(op: str) -> ModuleType:
    """Import `vla_runtime.kernels._triton.<op>`, its `@triton.jit` kernels decorated in the process's mode.

    The decorator reads TRITON_INTERPRET when it runs; the env var is pinned to the mode triton itself was
    imported in for the duration, so our kernels and triton.language's helpers always agree. A module first
    imported in the other mode (someone imported it directly) is reloaded.
    """
    mode = triton_mode()
    if mode is None:
        raise UserError(f"{op}: triton is not usable in this process")
    interp = mode == "interpret"
    name = f"vla_runtime.kernels._triton.{op}"
    mod = sys.modules.get(name)
    if mod is not None and _loaded_mode.get(op) == interp:
        return mod
    with _load_lock:
        mod = sys.modules.get(name)
        if mod is not None and _loaded_mode.get(op) == interp:
            return mod
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interp else "0"
        try:
            mod = importlib.import_module(name) if mod is None else importlib.reload(mod)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
        _loaded_mode[op] = interp
    return mod

