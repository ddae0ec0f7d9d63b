#!/usr/bin/env bash
# GPU checks and timings on a CUDA machine, from a source checkout (no install needed beyond torch, triton,
# transformers, numpy, safetensors, pytest, hypothesis, tqdm). Writes logs and JSON under OUT (default ./gpu_out).
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh            # everything (~6-8 min on an H100, incl. building a 7B model)
#   PARTS="tests kernels" bash scripts/gpu_check.sh   # a subset of: tests interp kernels vla oft profile step
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
PARTS=${PARTS:-"tests interp kernels vla oft profile step"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
has() { [[ " $PARTS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if has tests; then
  # compiled kernels vs references on the GPU, and the HF checkpoint path on CUDA (SpecPrune through Triton)
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_vla_hf.py tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests_cuda.log" | tail -n 15
fi
if has interp; then  # the interpreter suite under this machine's triton version (a separate process: the mode is per process)
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/tests_interp.log" | tail -n 8
fi
if has kernels; then
  timeout 200 $PY -m vla_runtime.kernels.bench --repeats 200 --out "$OUT/kernels.json" 2>&1 | tail -n 15
fi
if has vla; then  # the shipped LIBERO VLA on the GPU: full vs SpecPrune vs random drops
  timeout 200 $PY -m vla_runtime.policies.vla.bench vla:vla_libero_object --device cuda --steps 100 \
    --accel specprune --keep 0.5,0.3,0.2 --graphs both --out "$OUT/vla_lo" 2>&1 | tail -n 12
fi
if has oft; then  # OpenVLA-OFT proportions with random weights: SigLIP-So400m-size tower, Llama-2-7B-size decoder
  OFT='{"image_size":224,"patch_size":14,"vision_hidden":1152,"vision_layers":27,"vision_heads":16,"vision_intermediate":4304,
"hidden":4096,"layers":32,"heads":32,"kv_heads":32,"head_dim":128,"intermediate":11008,"vocab_size":32000,
"tokens_per_action":7,"chunk_size":8,"head_hidden":1024,"max_text_len":24}'
  timeout 400 $PY -m vla_runtime.policies.vla.bench "$OFT" --device cuda --steps 30 --accel specprune \
    --keep 0.5,0.3,0.2,0.1 --graphs both --out "$OUT/vla_oft" 2>&1 | tail -n 14
fi
if has profile; then  # wall vs CPU vs GPU time, stock decoder vs our loop, eager vs CUDA graphs
  timeout 300 $PY scripts/gpu_profile_vla.py --config oft --out "$OUT/profile_oft.json" 2>&1 | grep -v Warning | head -n 60
fi
if has step; then  # diffusion samplers on the GPU (synthetic observations): DDIM-10 / STEP-2 latency ratio
  for g in "" "--no-cuda-graphs"; do
    timeout 200 $PY -m vla_runtime.policies.diffusion.bench vla_runtime/policies/checkpoints/diffusion_lift \
      --device cuda --chunks 60 $g --out "$OUT/step_gpu${g:+_eager}.json" 2>&1 | grep -v '^{' | tail -n 6
  done
fi
ls -la "$OUT"
