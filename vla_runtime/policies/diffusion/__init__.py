"""Visuomotor diffusion policy (Chi et al. style) with DDPM / DDIM(k) / STEP warm-start samplers.

`load_diffusion_policy(ckpt_dir, sampler="step2")` is the entry point; training is in
`vla_runtime.train.train_diffusion`. See docs/DIFFUSION.md.
"""
