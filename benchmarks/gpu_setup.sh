#!/usr/bin/env bash
# Prepare a fresh GPU machine to run the CUDA backend: build persona_kernels._C (C++ + csrc/cuda/*.cu)
# against the torch already installed there. Nothing is downloaded (such machines are often offline):
# torch, triton, setuptools, ninja and pybind11 must be present (the H200 image has them).
#
#   bash benchmarks/gpu_setup.sh            in-place build (python setup.py build_ext --inplace)
#   bash benchmarks/gpu_setup.sh --pip      editable install instead (pip install --no-build-isolation --no-deps -e .)
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's, e.g. 9.0 on H100/H200),
# MAX_JOBS (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" - <<'PYEOF'
import sys
import torch
from torch.utils import cpp_extension
ok = True
print(f"gpu_setup: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA_HOME {cpp_extension.CUDA_HOME}, GPU available: {torch.cuda.is_available()}")
if torch.version.cuda is None:
    print("gpu_setup: ERROR: this torch has no CUDA; install a CUDA build of torch first", file=sys.stderr); ok = False
if cpp_extension.CUDA_HOME is None:
    print("gpu_setup: ERROR: nvcc / CUDA_HOME not found", file=sys.stderr); ok = False
for mod in ("setuptools", "ninja", "pybind11"):
    try:
        __import__(mod)
    except ImportError:
        print(f"gpu_setup: ERROR: python package {mod!r} missing (pip install {mod})", file=sys.stderr); ok = False
sys.exit(0 if ok else 1)
PYEOF

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}')" 2>/dev/null || true)
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=$arch
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "gpu_setup: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<torch default>} MAX_JOBS=$MAX_JOBS"

start=$SECONDS
if [ "${1:-}" = "--pip" ]; then
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
else
  "$PY" setup.py -q build_ext --inplace
fi
"$PY" - <<'PYEOF'
import torch
from persona_kernels import _extension
ok = _extension.has_cuda_kernels()
print(f"gpu_setup: extension built with CUDA kernels: {ok}")
if not ok:
    raise SystemExit("gpu_setup: ERROR: the extension has no CUDA kernels (was csrc/cuda/*.cu compiled?)")
print("gpu_setup: ops:", sorted(n for n in dir(torch.ops.persona_kernels_C) if n.endswith("_cuda")))
PYEOF
echo "gpu_setup: done in $((SECONDS - start)) s"
