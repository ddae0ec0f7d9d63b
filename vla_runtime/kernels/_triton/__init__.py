"""The `@triton.jit` kernel bodies, one module per op. Importing any of these imports triton.

Never import these directly: `vla_runtime.kernels.dispatch.load_triton_module(op)` imports them lazily, under
the TRITON_INTERPRET value of that moment (the decorator fixes compiled-vs-interpreted at import time).
Interpreter-safe conventions used throughout: every tl.load of floating data is upcast to fp32 at once
(bf16 arithmetic is wrong in the interpreter), no autotune, no tl.make_block_ptr (gone in triton 3.9).
"""
