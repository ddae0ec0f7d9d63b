"""Ahead-of-time compile check: build every kernel to a CUDA binary without a GPU.

The Triton interpreter (what CPU tests run) accepts code the compiler rejects (and vice versa), so the
interpreter tests alone do not prove the kernels build for a GPU. `compile_all()` runs Triton's full
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via the ptxas bundled with triton) for a target
architecture; no device is needed. It needs a process where triton was imported *compiled* (without
TRITON_INTERPRET=1): run it in a fresh process, e.g. `python -m vla_runtime.kernels.aot --arch 90`.
"""

from __future__ import annotations

import argparse
import time

from vla_runtime.errors import UserError
from vla_runtime.kernels import OPS
from vla_runtime.kernels.dispatch import load_triton_module, triton_mode


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp32"),
                ops: tuple[str, ...] = OPS) -> list[dict]:
    """Compile each op's kernel for sm_`arch` per input dtype; returns [{op, dtype, ok, seconds, error}]."""
    if triton_mode() != "compiled":
        raise UserError("ahead-of-time compilation needs triton imported without TRITON_INTERPRET=1; "
                        "run `python -m vla_runtime.kernels.aot` in a fresh process")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = []
    for op in ops:
        mod = load_triton_module(op)
        for dt in dtypes:
            kernel, sig, constexprs = mod.aot_signature(dt)
            t0 = time.perf_counter()
            row = {"op": op, "dtype": dt, "arch": arch, "ok": True, "error": None}
            try:
                compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target)
                row["cubin_bytes"] = len(compiled.asm["cubin"])
            except Exception as e:  # reported per kernel, not swallowed: the caller checks row["ok"]
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Compile every Triton kernel for a CUDA arch, no GPU needed.")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100)")
    p.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"), default=None)
    a = p.parse_args(argv)
    rows = compile_all(a.arch, tuple(a.dtype or ("bf16", "fp32")))
    for r in rows:
        status = f"ok  {r['cubin_bytes']} B cubin" if r["ok"] else f"FAIL {r['error']}"
        print(f"{r['op']:<24} {r['dtype']:<5} sm_{r['arch']}  {r['seconds']:>5.1f}s  {status}")
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
