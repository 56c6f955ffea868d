#!/usr/bin/env bash
# Build the CUDA extension (benchmarks/gpu_setup.sh) and run benchmarks/gpu_check.py on a GPU machine.
# The log goes to $OUT/gpu_check.log when OUT is set (the GPU runner returns files under $OUT).
# Without a GPU it skips the build, and gpu_check.py prints a notice and exits 0.
#   bash benchmarks/gpu_check.sh [gpu_check.py args, e.g. --budget 400]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; log=$OUT/gpu_check.log; fi
{
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    bash benchmarks/gpu_setup.sh || echo "gpu_check: WARNING: the build failed; the cuda backend will be reported unavailable"
  fi
  "$PY" benchmarks/gpu_check.py "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
