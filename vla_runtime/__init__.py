"""vla-runtime: a real-time control runtime for VLA models and diffusion policies.

Dependencies point one way: cli -> runtime -> (policies, envs, bridges); policies -> kernels.
Importing this package imports nothing heavy (no torch, no simulator): submodules do that lazily.
"""

__version__ = "0.1.0"
