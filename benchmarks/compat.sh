#!/usr/bin/env bash
# The test suite on the GPU image's versions: torch 2.11.0 + triton 3.6.0 (+ torchvision 0.26.0), the
# oldest versions pyproject.toml accepts. CPU only: the Triton kernels run under TRITON_INTERPRET=1 and
# the compile gate (tests/test_compile_gate.py) compiles them ahead of time for sm_80 and sm_90 with
# triton 3.6.0's own ptxas.
# Usage (from the repository root): benchmarks/compat.sh [VENV_DIR] [pytest arguments...]
#   VENV_DIR defaults to .compat-venv; an existing one with the right versions is reused.
# Measured 2026-11-30 on 2 CPU cores shared with other jobs (load average ~15): the environment in about
# 4 minutes from nothing (several GB of wheels: torch's CUDA dependencies, from a fast package index),
# the suite in 24 minutes with `-n 2` (the full suite in the newest versions took 15 minutes alongside).
# Re-measured 2026-11-30 21:16 UTC on the quiet machine, environment reused, Triton cache warm: 112 s in all
# (848 passed, 24 skipped: the same counts as the newest versions in CI).
# COMPAT_WORKERS sets pytest-xdist's worker count.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.compat-venv}
shift || true
pins=(torch==2.11.0 triton==3.6.0 torchvision==0.26.0)
start=$SECONDS
if ! "$venv/bin/python" - <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
want = {"torch": "2.11.0", "triton": "3.6.0", "torchvision": "0.26.0", "sea-align": None, "pytest-xdist": None}
sys.exit(any(m.version(k) != v if v else not m.version(k) for k, v in want.items()))
PY
    python3 -m venv "$venv"
    "$venv/bin/pip" install --progress-bar off "${pins[@]}"
fi
# the project from this checkout with its dev extra (also when reusing an environment: it may point at another
# checkout or predate a dependency), without letting pip move the pinned versions
"$venv/bin/pip" install --progress-bar off -q -e ".[dev]" pytest-xdist "${pins[@]}"
echo "compat: environment ready in $((SECONDS - start))s"
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
t0=$SECONDS
status=0
PYTHONPATH=$PWD "$venv/bin/python" -m pytest -q -n "${COMPAT_WORKERS:-2}" "$@" || status=$?
echo "compat: test suite exit $status in $((SECONDS - t0))s (total $((SECONDS - start))s)"
exit $status
