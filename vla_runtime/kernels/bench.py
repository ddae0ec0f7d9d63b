"""Kernel micro-benchmark: torch reference vs Triton path for each op at realistic VLA shapes.

`bench_kernels()` returns a JSON-able dict; `python -m vla_runtime.kernels.bench [--interpret] [--out F]`
prints a table. On CUDA both paths are timed (compiled Triton); on CPU the torch path is timed, plus the
Triton *interpreter* when `interpret=True` (numpy-executed, so its time says nothing about GPU speed: it is
there to smoke-test the kernels at full size). Each case also reports the max abs difference between paths.
Both paths are called through the public op with the backend forced and `check_indices=False`, as the hot
loop would (the bounds check is a device sync).

Shape sets: "tiny" is the locally trained VLA (SigLIP patch 8 at 128 px x 2 cameras = 512 visual tokens, a
512-wide 8-head decoder); "7b" is OpenVLA-OFT's Llama-2-7B (2 x 256 visual tokens of 224 px / 14 px
patches, 32 heads, D 4096, V 32000). Timings: median over `repeats` calls after `warmup` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import vla_runtime.kernels as K
from vla_runtime.errors import UserError
from vla_runtime.kernels.dispatch import interpret_requested
from vla_runtime.kernels.dispatch import triton_mode as dispatch_triton_mode

SIZES = ("tiny", "7b")


@dataclass(frozen=True)
class _Case:
    op: str
    size: str
    shape: dict[str, Any]
    dtype: str
    run: Callable[[str], Any]  # backend -> output (a tensor or a tuple of tensors)


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> list[_Case]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if size == "tiny":
        H, n_vis, n_txt, D, V, patch_dim = 8, 512, 33, 512, 2048, 8 * 8 * 3
    else:
        H, n_vis, n_txt, D, V, patch_dim = 32, 512, 88, 4096, 32000, 14 * 14 * 3
    N = 1 + n_vis + n_txt  # BOS, visual tokens, then text / proprio / action queries
    dt = str(dtype).removeprefix("torch.")
    attn = torch.softmax(rnd(1, H, N, N).float(), dim=-1).to(dtype)  # (1, H, N, N)
    rows = torch.arange(1 + n_vis, N, device=device)
    frames = [torch.randint(0, 256, (1, n_vis, patch_dim), generator=g, dtype=torch.uint8).to(device)
              for _ in range(2)]
    hidden_seq = rnd(1, N, D)
    pos = torch.arange(N, device=device).unsqueeze(0)
    keep = K.topk_keep_indices(torch.rand(1, N, generator=g).to(device), N // 2)
    C, Hd = 4, 64
    hidden, norm_w, head = rnd(1, D), 1 + 0.1 * rnd(D), rnd(V, D) * D ** -0.5
    cand = torch.randperm(V, generator=g)[:C].unsqueeze(0).to(device)
    prev = torch.softmax(torch.randn(1, C, generator=g), -1).to(device)
    mlp = K.ExitMLP(C, Hd).to(device)
    params = mlp.kernel_params()
    return [
        _Case("attention_importance", size, {"B": 1, "H": H, "Q": N, "N": N, "rows": n_txt, "keys": n_vis}, dt,
              lambda be: K.attention_importance(attn, rows, (1, 1 + n_vis), backend=be, check_indices=False)),
        _Case("patch_cosine_similarity", size, {"B": 1, "P": n_vis, "D": patch_dim}, "uint8",
              lambda be: K.patch_cosine_similarity(frames[0], frames[1], backend=be)),
        _Case("gather_tokens", size, {"B": 1, "N": N, "D": D, "K": N // 2}, dt,
              lambda be: K.gather_tokens(hidden_seq, pos, keep, backend=be, check_indices=False)),
        _Case("exit_predictor", size, {"B": 1, "D": D, "V": V, "C": C, "Hd": Hd}, dt,
              lambda be: K.exit_predictor(hidden, norm_w, 1e-6, head, cand, prev, *params, backend=be,
                                          check_indices=False)),
    ]


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_abs_diff(a: Any, b: Any) -> float:
    ta = a if isinstance(a, (tuple, list)) else (a,)
    tb = b if isinstance(b, (tuple, list)) else (b,)
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(ta, tb))


@contextlib.contextmanager
def _interpret_env(on: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET for the duration (the dispatch reads it per call; kernels reload per mode)."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def bench_kernels(device: str | torch.device | None = None, *, sizes: tuple[str, ...] = SIZES,
                  dtype: torch.dtype = torch.bfloat16, interpret: bool = False, warmup: int = 3,
                  repeats: int = 20, interpret_repeats: int = 2, ops: tuple[str, ...] | None = None) -> dict:
    """Time torch vs Triton for each op; returns {"machine": ..., "results": [per op x size]}.

    device defaults to CUDA when present, else CPU. `interpret=True` on CPU also times the Triton interpreter.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                       else "cpu")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise UserError(f"unknown kernel bench size(s) {bad}; choose from {', '.join(SIZES)}")
    if ops is not None and (unknown := sorted(set(ops) - set(K.OPS))):
        raise UserError(f"unknown kernel op(s) {unknown}; choose from {', '.join(K.OPS)}")
    triton_mode: str | None = None
    triton_note = None
    if dev.type == "cuda" or interpret:
        # On CPU the interpreter needs TRITON_INTERPRET=1 at triton's first import in this process.
        with _interpret_env(dev.type == "cpu" or interpret_requested()):
            mode = dispatch_triton_mode()
        if mode is None:
            triton_note = "triton not importable here (not installed, or imported after the GL driver)"
        elif dev.type == "cpu" and mode != "interpret":
            triton_note = ("interpreter unavailable: triton was imported without TRITON_INTERPRET=1 earlier in "
                           "this process")
        else:
            triton_mode = mode
    results = []
    for size in sizes:
        for case in _cases(size, dev, dtype):
            if ops is not None and case.op not in ops:
                continue
            with _interpret_env(False):
                ref = case.run("torch")
                torch_ms = _time_ms(lambda: case.run("torch"), dev, warmup, repeats)
            row: dict[str, Any] = {"op": case.op, "size": size, "shape": case.shape, "dtype": case.dtype,
                                   "torch_ms": round(torch_ms, 4), "triton_ms": None, "triton_mode": triton_mode,
                                   "speedup": None, "max_abs_diff": None}
            if triton_mode is not None:
                reps, warm = (interpret_repeats, 1) if triton_mode == "interpret" else (repeats, warmup)
                with _interpret_env(triton_mode == "interpret"):
                    out = case.run("triton")
                    triton_ms = _time_ms(lambda: case.run("triton"), dev, warm, reps)
                # An interpreter time is no speed figure (numpy executes the kernel): no ratio for it.
                row.update(triton_ms=round(triton_ms, 4), max_abs_diff=_max_abs_diff(out, ref),
                           speedup=round(torch_ms / triton_ms, 3) if triton_mode == "compiled" else None)
            results.append(row)
    try:
        import importlib.metadata as md

        triton_version: str | None = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = None
    machine = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__,
               "triton": triton_version, "threads": torch.get_num_threads(), "dtype": str(dtype)}
    return {"bench": "kernels", "machine": machine, "note": triton_note, "warmup": warmup, "repeats": repeats,
            "results": results}


def format_table(report: dict) -> str:
    lines = [f"{'op':<24} {'size':<5} {'torch ms':>10} {'triton ms':>10} {'mode':>10} {'ratio':>7} {'max diff':>9}"]
    for r in report["results"]:
        tri = "-" if r["triton_ms"] is None else f"{r['triton_ms']:.3f}"
        ratio = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"{r['op']:<24} {r['size']:<5} {r['torch_ms']:>10.3f} {tri:>10} {r['triton_mode'] or '-':>10} "
                     f"{ratio:>7} {diff:>9}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Time torch vs Triton kernel paths at realistic VLA shapes.")
    p.add_argument("--device", default=None, help="cpu or cuda[:i]; default cuda when available")
    p.add_argument("--size", choices=SIZES + ("all",), default="all")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--interpret", action="store_true", help="on CPU, also time the Triton interpreter")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = SIZES if a.size == "all" else (a.size,)
    report = bench_kernels(a.device, sizes=sizes, dtype=getattr(torch, a.dtype), interpret=a.interpret,
                           repeats=a.repeats)
    print(format_table(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
