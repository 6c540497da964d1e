#!/bin/bash
# Everything this project checks on a CUDA machine, as one command for a short lease: builds
# the compiled extensions (the package needs _kmeans1d), then times the fused kernels under
# launch settings (bench/dkm_kernels.py), runs the GPU correctness checks +
# the LLaMA DKM benchmark (bench/dkm_gpu.py) (the figures the lease is for), then the
# CUDA / Triton tests and the DKM callback under mixed precision (bench/gpu_callbacks.py).
# Each part has its own time limit, so the parts after one that hangs still run. Results go to
# $OUT (the lease's output folder), else bench/results/gpu; a --profile folder under it is
# packed into one file at the end (a lease returns at most 8 files).
#   bash bench/gpu_lease.sh [dkm_gpu.py arguments...]
# Next lease (the variants not timed yet; ~8 min, timeout_s 570):
#   bash bench/gpu_lease.sh --variants auto,elems,splitelems,chunks,chunked,chunked8,graphselems \
#     --micro auto,elems,split --steps 30 --profile "$OUT/prof"
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
{
  date +%T
  python3 setup.py build_ext --inplace -q >/dev/null 2>&1 || echo "extension build failed"
  nvidia-smi -L
  python3 -c "import torch, triton, transformers, lightning; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__)"
  date +%T
  timeout 150 python3 bench/dkm_kernels.py --out "$OUT/dkm_kernels.json"
  date +%T
  timeout 330 python3 bench/dkm_gpu.py --out "$OUT/dkm_gpu.json" "$@"
  date +%T
  timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda or triton" tests/test_kmeans.py \
    tests/test_palette.py tests/test_sensitivity.py tests/test_soft_kmeans.py tests/test_dkm.py \
    tests/test_dkm_triton.py tests/test_round_graphs.py
  date +%T
  timeout 60 python3 bench/gpu_callbacks.py
  date +%T
} 2>&1 | tee "$OUT/log.txt"
if [ -d "$OUT/prof" ]; then tar czf "$OUT/prof.tgz" -C "$OUT" prof && rm -rf "$OUT/prof"; fi
