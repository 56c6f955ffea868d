#!/usr/bin/env bash
# CI stage: the CUDA build, the way a GPU user installs it, on a machine without a GPU.
#
#   1. venv      $VENV (default .venv-cu130) with $TORCH_SPEC (default torch==2.14.1, the CUDA 13.0 wheel, which
#                pip takes from the machine's local wheel store) and the test/runtime dependencies;
#   2. copy      the working tree (tracked + untracked, not ignored files) into $SRC (default build/cu130/src), so
#                the CUDA build's in-place persona_kernels/_C*.so never overwrites the CPU build of .venv (both
#                have the same file name for the same Python) and vice versa;
#   3. build     CUDA_HOME=... TORCH_CUDA_ARCH_LIST=$ARCHS pip install --no-build-isolation -e $SRC (skipped when
#                the sources, flags and torch are unchanged since the last successful build);
#   4. import    the extension loads without a GPU, carries its CUDA kernels, and every CUDA op of
#                persona_kernels/kernels/cuda.py is registered for the CUDA dispatch key;
#   5. aot       Triton ahead-of-time compile of every kernel config (aot_check --all --fail-on-spill) under the
#                Triton this torch brings, for each of $AOT_ARCHS (default "80 90"), one process per architecture;
#   6. tests     the CPU test files named in $TESTS (op, kernel, patching and CUDA-source tests) under this torch.
#
# Cost on the 2-core CI machine (measured under a load average of ~12, README "GPU" has the table): torch install
# ~90 s, build 9.4 CPU-min (skipped when unchanged), import 3 s, AOT 3.6 CPU-min (21 s with a warm Triton
# cache), tests ~70 CPU-s.
#
# Environment: PERSONA_KERNELS_CUDA_VENV, PERSONA_KERNELS_CUDA_TORCH, TORCH_CUDA_ARCH_LIST (default "8.0;9.0":
# Ampere A100 and Hopper H100/H200 cubins; sm_86/89 run the sm_80 cubin), CUDA_HOME (default /usr/local/cuda),
# CI_CUDA_STAGES (default "venv copy build import aot tests"), CI_CUDA_TESTS (space-separated test files).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VENV=${PERSONA_KERNELS_CUDA_VENV:-.venv-cu130}
TORCH_SPEC=${PERSONA_KERNELS_CUDA_TORCH:-torch==2.14.1}
SRC=${CI_CUDA_SRC:-build/cu130/src}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PIP_DISABLE_PIP_VERSION_CHECK=1
AOT_ARCHS=${CI_CUDA_AOT_ARCHS:-80 90}
STAGES=${CI_CUDA_STAGES:-venv copy build import aot tests}
# Why these: the op layer and its kernels (gated linear, mixed personas, packing, statistics), the Triton kernels
# through the interpreter of the new Triton, patching / persona batches (the custom ops inside a real model), and
# the CUDA source / backend-contract checks. Model downloads, evaluation and CLI tests exercise no kernel that
# these do not, and cost most of the suite's time.
TESTS=${CI_CUDA_TESTS:-tests/test_gated_linear.py tests/test_gated_linear_multi.py tests/test_packing.py \
tests/test_welford.py tests/test_stats.py tests/test_triton_kernels.py tests/test_patching.py \
tests/test_persona_batch.py tests/test_cuda_sources.py tests/test_cuda_kernels.py}

t0=$SECONDS
stage_start=0
stage() {  # banner with the elapsed time of the previous stage and of the whole script
  local now=$SECONDS
  if [ "$stage_start" -gt 0 ] || [ -n "${stage_name:-}" ]; then
    echo "=== ci_cuda: ${stage_name} done in $((now - stage_start)) s (total $((now - t0)) s)"
  fi
  stage_name=$1
  stage_start=$now
  [ "$1" = "end" ] || echo "=== ci_cuda: $1 ($(date -u +%H:%M:%S))"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }

PY=$ROOT/$VENV/bin/python
if want venv; then
  stage "venv: $VENV with $TORCH_SPEC"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC"
  fi
  "$PY" -m pip install -q numpy "setuptools>=64" wheel ninja pybind11 "pytest>=7" "hypothesis>=6" "pytest-benchmark>=4"
fi
[ -x "$PY" ] || { echo "ci_cuda: ERROR: $PY missing (run the venv stage)" >&2; exit 1; }
"$PY" - <<'EOF'
import sys, torch
import triton
print(f"ci_cuda: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if torch.version.cuda is None:
    raise SystemExit("ci_cuda: ERROR: this torch has no CUDA")
EOF

if want copy; then
  stage "copy: working tree -> $SRC"
  mkdir -p "$SRC"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  git ls-files -co --exclude-standard | sort >"$tmp/want"
  # Files gone from the tree go from the copy too; build outputs (ignored by git) stay for incremental builds.
  (cd "$SRC" && find . -path ./build -prune -o -type f -print | sed 's|^\./||' \
     | { grep -v -E '(^|/)__pycache__/|\.egg-info/|\.so$' || true; } | sort) >"$tmp/have"
  comm -13 "$tmp/want" "$tmp/have" | (cd "$SRC" && xargs -r -d '\n' rm -f)
  tr '\n' '\0' <"$tmp/want" | tar --null -T - -cf - | tar -xf - -C "$SRC"
fi

if want build; then
  stage "build: CUDA extension (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  key=$( { "$PY" -c "import torch; print(torch.__version__)"; echo "$TORCH_CUDA_ARCH_LIST"; "$CUDA_HOME/bin/nvcc" --version | tail -1;
           cd "$SRC" && find setup.py pyproject.toml csrc -type f | sort | xargs sha256sum; } | sha256sum | cut -c1-16)
  stamp=$SRC/build/.ci_cuda_stamp
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && ls "$SRC"/persona_kernels/_C*.so >/dev/null 2>&1; then
    echo "ci_cuda: sources, flags and torch unchanged since the last build ($key); not rebuilding"
  else
    rm -f "$stamp"
    log=$ROOT/build/cu130/build.log
    mkdir -p "$(dirname "$log")"
    if ! (cd "$SRC" && "$PY" -m pip install -v --no-build-isolation -e ".[test]") >"$log" 2>&1; then
      grep -E -B2 -A6 "error|Error" "$log" | tail -80 >&2
      echo "ci_cuda: ERROR: the CUDA build failed (full log: $log)" >&2
      exit 1
    fi
    # Like scripts/check_cuda_sources.sh: register spills and warnings in our own CUDA sources fail the build.
    if grep -E "ptxas warning|Registers are spilled|csrc/cuda/[^ :(]+\.(cu|cuh)(\([0-9]+\)|:[0-9]+:).*warning" "$log" \
        >"$log.own"; then
      cat "$log.own" >&2
      echo "ci_cuda: ERROR: register spills or warnings in csrc/cuda (full log: $log)" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$stamp")" && echo "$key" >"$stamp"
  fi
fi

cd "$SRC"
export PERSONA_KERNELS_SHARED=${PERSONA_KERNELS_SHARED:-$(cd "$ROOT/.." && pwd)/shared}

if want import; then
  stage "import: extension + CUDA dispatch keys"
  "$PY" -m persona_kernels.kernels.cuda --check-registration
fi

if want aot; then
  # One process per architecture, side by side (each is one Python thread + ptxas runs).
  stage "aot: Triton kernels for sm_${AOT_ARCHS// /, sm_} (in parallel)"
  pids=()
  for arch in $AOT_ARCHS; do
    env -u TRITON_INTERPRET "$PY" -m persona_kernels.kernels.triton.aot_check --arch "$arch" --all --fail-on-spill \
      --summary &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" -eq 0 ] || { echo "ci_cuda: ERROR: the Triton AOT compile failed (see above)" >&2; exit 1; }
fi

if want tests; then
  stage "tests: $(echo "$TESTS" | wc -w) files under this torch"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider -x $TESTS
fi
stage end
echo "=== ci_cuda: passed in $((SECONDS - t0)) s"
