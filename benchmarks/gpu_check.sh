#!/usr/bin/env bash
# One prepared script for a lent GPU machine, under 8 minutes in all:
#   1. environment report (GPU, driver, clocks, torch, triton, transformers, open_clip, git revision);
#   2. every Triton kernel compiled for the real GPU and checked against the reference: the Triton test
#      files (no interpreter), then at full size: cosine_topk / patch_labels on 32 x 576 patches against
#      41,242 words (bf16 and fp16), contrastive_loss N = 4608, D = 4096 (bf16, against float64);
#   3. sea bench --sizes full --device cuda: time (CUDA events), extra peak memory, TFLOP/s and share of
#      a matmul of the same shape, ratios to the reference, and the Stage-1 step at LLaVA-1.5-7B shapes
#      (SEA off / reference / fused; 4 Llama-7B layers measured, 32 modelled).
# Usage (from the repository root): benchmarks/gpu_check.sh OUTDIR [--quick]
# Runs from the checkout without installing (PYTHONPATH=.); needs torch, triton, transformers (open_clip
# is optional: without it the Stage-1 step uses a plain-PyTorch CLIP ViT-L/14-336 stand-in).
# Writes OUTDIR/gpu_check.log (everything printed), OUTDIR/checks/{labels,contrastive}.json and
# OUTDIR/bench/{bench.json,table.md,<op>.png}; table and plots can be redrawn from bench.json with
#   python -m sea_kernels.bench.report OUTDIR/bench/bench.json
# Keep the results in benchmarks/results/<date>-<card>/ (the last line names the folder).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--quick]}
quick=${2:-}
mkdir -p "$out/checks" "$out/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log="$out/gpu_check.log"
: >"$log"
status=0
deadline=$((SECONDS + 460))  # leaves a margin under 8 minutes

# step BUDGET_S NAME COMMAND...: run with at most BUDGET_S seconds (less when the deadline is nearer)
step() {
  local budget=$1 name=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((budget > left)) && budget=$left
  if ((budget < 15)); then
    echo "gpu_check: $name skipped (out of time)" | tee -a "$log"
    status=1
    return
  fi
  echo "=== $name (at most ${budget}s)" | tee -a "$log"
  timeout "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    local why="exit $rc"
    ((rc == 124)) && why="timed out after ${budget}s"
    echo "gpu_check: $name failed ($why)" | tee -a "$log"
    status=1
  fi
}

environment() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "git revision: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("triton", "transformers", "open_clip_torch", "tokenizers", "tqdm", "matplotlib"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
PY
}

export -f environment
step 30 "environment" bash -c environment
step 150 "Triton kernels: test files on the GPU" \
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_labels.py tests/test_triton_contrastive.py
step 90 "full-size check: cosine_topk / patch_labels (triton vs reference)" \
  python3 benchmarks/gpu_labels.py "$out/checks" --check-only $quick
step 60 "full-size check: contrastive_loss (triton vs float64 reference)" \
  python3 benchmarks/gpu_contrastive.py "$out/checks" --check-only
sizes=full
[ "$quick" = "--quick" ] && sizes=quick
step 460 "sea bench --sizes $sizes --device cuda" \
  python3 -m sea_model.cli bench --sizes "$sizes" --device cuda --out "$out/bench" --no-progress

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-+$//')
echo "gpu_check: done in ${SECONDS}s, status $status; results in $out: keep them as benchmarks/results/$(date -u +%Y-%m-%d)-${card:-gpu}/" | tee -a "$log"
exit $status
