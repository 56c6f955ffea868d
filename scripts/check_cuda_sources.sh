#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (CHECK_ARCHS="80 90") against the installed
# torch's headers, with the C++ standard setup.py derives from that torch, on a
# machine without a GPU (and with a CPU-only torch). Nothing is linked or run: this catches syntax, type
# and template errors, ptxas errors (e.g. shared memory over the limit) and register spills early.
#
#   scripts/check_cuda_sources.sh            (from anywhere; python is found as described below)
#   PYTHON=/path/to/python scripts/check_cuda_sources.sh
#
# Python: $PYTHON, else ${PERSONA_KERNELS_VENV:-.venv}/bin/python, else python3 -- the first one that
# imports torch. Under CI=true with none found, `scripts/run.sh setup` creates the venv first.
# Without nvcc: a notice and exit 0, except under CI=true where it is an error.
# Warnings raised in our own csrc/cuda sources fail the check (torch's own header warnings do not).
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { [ -n "${CI:-}" ] && [ "${CI}" != "0" ] && [ "${CI}" != "false" ]; }

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_sources: no csrc/cuda/*.cu files; nothing to check"
  exit 0
fi

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc)
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc
  elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -n "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then NVCC=""; fi
if [ -z "$NVCC" ]; then
  if in_ci; then
    echo "check_cuda_sources: ERROR: nvcc not found (CI=$CI requires it; set NVCC or CUDA_HOME)" >&2
    exit 1
  fi
  echo "check_cuda_sources: NOTICE: nvcc not found; the CUDA sources were NOT compile-checked (set NVCC or CUDA_HOME)"
  exit 0
fi

has_torch() { [ -n "$1" ] && [ -x "$(command -v "$1" 2>/dev/null || true)" ] && "$1" -c "import torch" >/dev/null 2>&1; }
VENV=${PERSONA_KERNELS_VENV:-.venv}
PY=""
for candidate in "${PYTHON:-}" "$VENV/bin/python" python3; do
  if has_torch "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ] && in_ci; then
  echo "check_cuda_sources: no python with torch yet; running scripts/run.sh setup first"
  bash scripts/run.sh setup
  if has_torch "$VENV/bin/python"; then PY=$VENV/bin/python; fi
fi
if [ -z "$PY" ]; then
  if in_ci; then
    echo "check_cuda_sources: ERROR: no python that imports torch (set PYTHON)" >&2
    exit 1
  fi
  echo "check_cuda_sources: NOTICE: no python that imports torch (set PYTHON); the CUDA sources were NOT checked"
  exit 0
fi

mapfile -t incs < <("$PY" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
EOF
)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pk_cuda_check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# A CPU-only torch ships c10/cuda headers but not this generated one; the stub comes first on the path.
mkdir -p "$tmp/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/c10/cuda/impl/cuda_cmake_macros.h"

std=$("$PY" -c "import runpy; print(runpy.run_path('setup.py', run_name='pk_setup')['cxx_standard']())")
flags=(-std="$std" -c -O0 -Xptxas -O3 -Xcompiler -fPIC --expt-relaxed-constexpr -Xptxas -warn-spills
       -diag-suppress=3306 -Xcompiler -Wno-c++20-extensions
       -DPK_WITH_CUDA -DTORCH_EXTENSION_NAME=_C
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__
       -I"$tmp" -Icsrc)
for inc in "${incs[@]}"; do flags+=(-I"$inc"); done
for arch in ${CHECK_ARCHS:-80 90}; do flags+=(-gencode "arch=compute_$arch,code=sm_$arch"); done

echo "check_cuda_sources: $("$NVCC" --version | tail -1) | torch $("$PY" -c 'import torch; print(torch.__version__)') | -std=$std | sm_${CHECK_ARCHS:-80 90}"
start=$SECONDS
pids=()
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  "$NVCC" "${flags[@]}" "$src" -o "$tmp/$name.o" >"$tmp/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!sources[@]}"; do
  src=${sources[$i]}
  name=$(basename "$src" .cu)
  if wait "${pids[$i]}"; then
    # Our own warnings (not torch's) count as failures; so do register spills.
    if grep -E "^(\./)?csrc/cuda/[^:(]+[:(].*warning|ptxas.*(warning|spill)" "$tmp/$name.log" \
        >"$tmp/$name.own" 2>/dev/null && [ -s "$tmp/$name.own" ]; then
      echo "FAIL  $src (warnings in our source or register spills):"
      cat "$tmp/$name.own"
      status=1
    else
      echo "ok    $src"
    fi
  else
    echo "FAIL  $src:"
    grep -E -A3 "error" "$tmp/$name.log" | head -80 || true
    status=1
  fi
done
echo "check_cuda_sources: ${#sources[@]} file(s) in $((SECONDS - start)) s"
exit $status
