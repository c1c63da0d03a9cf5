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
# Usage (from the repository root): benchmarks/gpu_check.sh OUTDIR
# Runs from the checkout without installing (PYTHONPATH=.). Writes OUTDIR/gpu_check.log (everything
# printed, with a timing line per step), OUTDIR/tests.xml, OUTDIR/bench/{bench.json,table.md},
# OUTDIR/steps.tsv and OUTDIR/summary.md. Keep them in benchmarks/results/<date>-<card>/.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log="$out/gpu_check.log"
: >"$log"
: >"$out/steps.tsv"
deadline=$((SECONDS + 470))
workers=$(python3 -c "import os; print(max(2, min(8, (os.cpu_count() or 2) // 2)))")

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
step 210 "tests on the GPU (pytest-xdist, $workers workers)" \
  python3 -m pytest -q -p no:cacheprovider -n "$workers" --junitxml="$out/tests.xml" \
  tests/test_triton_gpu.py tests/test_triton_labels.py tests/test_triton_contrastive.py \
  tests/test_labels.py tests/test_contrastive.py
step 210 "sea bench --sizes quick --device cuda" \
  python3 -m sea_model.cli bench --sizes quick --device cuda --out "$out/bench" --no-progress
echo "=== summary (deadline 20s)" | tee -a "$log"
timeout 20 python3 benchmarks/gpu_summary.py "$out" | tee -a "$log"
status=${PIPESTATUS[0]}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/-+$//')
echo "gpu_check: done in ${SECONDS}s, status $status; keep $out as benchmarks/results/$(date -u +%Y-%m-%d)-${card:-gpu}/" | tee -a "$log"
exit $status
