#!/bin/bash
# Everything this project checks on a CUDA machine, as one command for a short lease: builds
# the compiled extensions (the package needs _kmeans1d), then runs the CUDA tests, the GPU
# correctness checks + the LLaMA DKM benchmark (bench/dkm_gpu.py) and the DKM callback under
# mixed precision (bench/gpu_callbacks.py). Results go to $OUT (the lease's output folder),
# else bench/results/gpu.
#   bash bench/gpu_lease.sh [dkm_gpu.py arguments...]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
{
  python3 setup.py build_ext --inplace -q >/dev/null 2>&1 || echo "extension build failed"
  nvidia-smi -L
  python3 -c "import torch, transformers, lightning; print(torch.__version__, transformers.__version__, lightning.__version__)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -k "cuda or triton" tests/test_kmeans.py \
    tests/test_palette.py tests/test_sensitivity.py tests/test_soft_kmeans.py tests/test_dkm.py \
    tests/test_dkm_triton.py
  timeout 300 python3 bench/dkm_gpu.py --out "$OUT/dkm_gpu.json" "$@"
  timeout 90 python3 bench/gpu_callbacks.py
} 2>&1 | tee "$OUT/log.txt"
