#!/usr/bin/env bash
# One prepared script for a lent GPU machine: one call of at most 8 minutes from a cold Triton cache, on
# the GPU image (torch 2.11.0, triton 3.6.0, transformers, pytest-xdist; no open_clip_torch, no wordfreq).
#   1. environment (GPU, driver, versions, git revision);
#   2. the Triton test files on the GPU, in parallel (pytest-xdist: the kernels compile in parallel
#      workers): the small-size tests against the reference, the op contract tests, and
#      tests/test_triton_gpu.py: full-size labels (18,432 x 41,242 x 768 bf16/fp16 and the trainer's
#      mixed call) and loss (N = 4608, D = 4096 bf16 vs float64) checks, and a Stage-1 step with the LM's
#      attention forced onto FlashAttention (flash-attn if installed, else SDPA's flash backend only);
#   3. sea bench --sizes quick --device cuda (the project's benchmark engine): labels at b32 and as the
#      trainer calls it, the loss at N = 4608, the LLaVA-7B-shaped Stage-1 step;
#   4. one summary table (benchmarks/gpu_summary.py): each check pass/fail, each benchmark with ratio
#      and target, each step's time against its deadline.
# Per-step deadlines (s): 20 + 210 + 210 + 20 = 460, under the 470 s total, under 8 minutes.
# A check cannot pass by not running: SEA_REQUIRE_GPU=1 makes a skipped test fail (tests/conftest.py;
# reasons expected on a GPU too are listed in gpu_summary.py), and the summary fails on a missing file,
# an errored or missing benchmark row, and a step that timed out or was skipped.
#
# GPU memory (fits an 80 GB H100 and a 141 GB H200). The full-size labels tests score M = 32 x 576 =
# 18,432 patches against q = 41,242 words: M x q = 760,172,544 scores, 6.08 GB in float64 (S8), 3.04 GB
# in float32 (S4). Their peak is tests/_checks.py's reference_error with the float64 truth alive: truth
# (S8) + the reference's float32 scores and their negation (2 S4) + the error's float64 copy and
# difference (2 S8) = 3 x 6.08 + 2 x 3.04 = 24.3 GB (scores64 alone peaks at 2 S8 = 12.2 GB; the
# reference op at 2 S4 = 6.1 GB; the inputs are < 0.1 GB). Three such tests (bf16, fp16, the trainer's
# call) on three xdist workers at once need 3 x 24.3 = 73 GB plus each worker's allocator cache: over
# 80 GB. They are one xdist_group ("gpu_full", --dist loadgroup) with the full-size loss test (N = 4608,
# D = 4096 in float64: N x N = 0.17 GB, N x D = 0.15 GB per tensor, < 3 GB in all), so they run one after
# another on one worker: peak 24.3 GB of tensors (about 30 GB reserved by its allocator) + the other
# workers' small tests and CUDA contexts (< 1 GB each, 7 x 1 = 7 GB) = about 37 GB, under 70 GB.
# CPU: each worker gets cores / workers threads (OMP_NUM_THREADS, MKL_NUM_THREADS); the gpu_full worker
# holds one 6.08 GB float64 truth in host memory at a time.
# Usage (from the repository root): benchmarks/gpu_check.sh OUTDIR
# Runs from the checkout without installing (PYTHONPATH=.). Writes OUTDIR/gpu_check.log (everything
# printed, with a timing line per step), OUTDIR/tests.xml, OUTDIR/bench/{bench.json,table.md},
# OUTDIR/steps.tsv and OUTDIR/summary.md. Keep them in benchmarks/results/<date>-<card>/.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SEA_REQUIRE_GPU=1
unset TRITON_INTERPRET
log="$out/gpu_check.log"
: >"$log"
: >"$out/steps.tsv"
deadline=$((SECONDS + 470))
workers=$(python3 -c "import os; print(max(2, min(8, (os.cpu_count() or 2) // 2)))")
threads=$(python3 -c "import os; print(max(1, (os.cpu_count() or 2) // $workers))") # per pytest-xdist worker

# step BUDGET_S NAME COMMAND...: run with at most BUDGET_S seconds (less when the total deadline is nearer)
step() {
  local budget=$1 name=$2
  shift 2
  local left=$((deadline - SECONDS))
  ((budget > left)) && budget=$left
  if ((budget < 10)); then
    echo "gpu_check: $name skipped (out of time)" | tee -a "$log"
    printf '%s\t0\t%s\tskipped\n' "$name" "$budget" >>"$out/steps.tsv"
    return
  fi
  echo "=== $name (deadline ${budget}s)" | tee -a "$log"
  local t0=$SECONDS
  timeout "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} why=ok
  ((rc == 124)) && why="timed out"
  ((rc != 0 && rc != 124)) && why="exit $rc"
  echo "=== $name: $((SECONDS - t0))s of ${budget}s, $why" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$budget" "$why" >>"$out/steps.tsv"
}

environment() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "git revision: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("triton", "transformers", "flash-attn", "pytest-xdist", "open_clip_torch"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
PY
}

export -f environment
step 20 "environment" bash -c environment
step 210 "tests on the GPU (pytest-xdist, $workers workers of $threads threads)" \
  env OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" \
  python3 -m pytest -q -p no:cacheprovider -n "$workers" --dist loadgroup --junitxml="$out/tests.xml" \
  tests/test_triton_gpu.py tests/test_triton_labels.py tests/test_triton_contrastive.py \
  tests/test_labels.py tests/test_contrastive.py
step 210 "sea bench --sizes quick --device cuda" \
  python3 -m sea_model.commands.cli bench --sizes quick --device cuda --out "$out/bench" --no-progress
echo "=== summary (deadline 20s)" | tee -a "$log"
timeout 20 python3 benchmarks/gpu_summary.py "$out" | tee -a "$log"
status=${PIPESTATUS[0]}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-+$//')
echo "gpu_check: done in ${SECONDS}s, status $status; keep $out as benchmarks/results/$(date -u +%Y-%m-%d)-${card:-gpu}/" | tee -a "$log"
exit $status
