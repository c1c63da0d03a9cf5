#!/usr/bin/env bash
# One prepared script for a lent GPU machine (< 8 minutes in all):
#   1. environment report, 2. every Triton kernel compiled and checked against the reference by the
#   test suite on the real GPU, 3. full-size checks and timings of each op, written as JSON.
# Usage (from the repository root): benchmarks/gpu_check.sh OUTDIR [--quick]
# Runs from the checkout without installing (the device image has torch + triton, not open_clip).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "git revision: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/environment.txt"

# Correctness of every Triton kernel, compiled for the real GPU (no interpreter here).
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_labels.py tests/test_triton_contrastive.py \
  2>&1 | tee "$out/tests.txt" || status=1

# Full-size correctness and timings against eager PyTorch and the matmul floor.
timeout 120 python3 benchmarks/gpu_labels.py "$out" $quick 2>&1 | tee "$out/labels.txt" || status=1
timeout 150 python3 benchmarks/gpu_contrastive.py "$out" $quick 2>&1 | tee "$out/contrastive.txt" || status=1

echo "gpu_check: results in $out (status $status)"
exit $status
