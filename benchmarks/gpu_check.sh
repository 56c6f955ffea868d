#!/usr/bin/env bash
# The GPU check, for any machine with an NVIDIA GPU, a CUDA torch (with its Triton) and nvcc; no internet needed.
#   1. build   persona_kernels._C with its CUDA kernels against the installed torch, for this GPU's architecture
#              (benchmarks/gpu_setup.sh: python setup.py build_ext --inplace);
#   2. tests   every test marked `gpu` (the CUDA and Triton kernels against float64 references);
#   3. bench   benchmarks/gpu_check.py: ratios on Llama-3-8B / Qwen2.5-7B shapes and a random-weight 8B model.
# Everything within GPU_CHECK_SECONDS (default 450, under 8 minutes); the log, JSON and markdown go to $OUT when
# set (else the log to stdout only and the results to benchmarks/results/).
#   bash benchmarks/gpu_check.sh [gpu_check.py args]        PYTHON=python3.12 bash benchmarks/gpu_check.sh
# Exit status: the first failing part (build, tests, bench), 0 when all pass. Without a GPU: a notice, exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-450}
export PYTHONUNBUFFERED=1
log=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; log=$OUT/gpu_check.log; fi
t0=$SECONDS
banner() { echo "##### gpu_check: $1 (elapsed $((SECONDS - t0)) s)"; }
{
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing to check."
    exit 0
  fi
  status=0
  banner "build"
  if ! bash benchmarks/gpu_setup.sh; then
    echo "gpu_check: ERROR: the build failed; the cuda backend is unavailable (the tests below will say so)"
    status=1
  fi
  banner "tests (-m gpu)"
  left=$((TOTAL - (SECONDS - t0) - 240))
  [ "$left" -lt 60 ] && left=60
  env -u TRITON_INTERPRET timeout "$left" "$PY" -m pytest -q -p no:cacheprovider -m gpu -x tests/ \
    || { echo "gpu_check: ERROR: gpu tests failed (or ran past ${left} s)"; [ "$status" -eq 0 ] && status=2; }
  banner "bench"
  budget=$((TOTAL - (SECONDS - t0) - 30))
  [ "$budget" -lt 120 ] && budget=120
  "$PY" benchmarks/gpu_check.py --budget "$budget" "$@" || { [ "$status" -eq 0 ] && status=3; }
  banner "done (status $status)"
  exit "$status"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
