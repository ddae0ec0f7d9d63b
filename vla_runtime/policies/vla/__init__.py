"""VLA policies (OpenVLA / OpenVLA-OFT anatomy) over a layer loop this package owns.

Public entry points (wired into the CLI by `vla_runtime.cli`):
  policy.load_vla_policy(ckpt_dir, device="cpu", accel=(), mode=None)   -> VLAPolicy (the Policy protocol)
  policy.ACCELERATIONS / register_acceleration(name, factory)           strategies: token pruners, exit policies
  modeling.VLAModel.forward_layers(...)                                  the layer loop with TokenPruner/ExitPolicy
  hf_loader.load_hf_vla(dir, mode, device, dtype)                        local HF Llama/Qwen2/Gemma/Llava checkpoints
  bench.bench_vla(source, steps, out_dir)                                latency split, tokens, GFLOPs, % of peak
  vla_runtime.train.train_vla.train_vla(data_dirs, out_dir, mode, ...)   resumable training on demo files
See docs/VLA.md.
"""
