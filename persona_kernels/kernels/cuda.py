"""The ``"cuda"`` backend: hand-written CUDA C++ kernels of the compiled extension (csrc/cuda/*.cu).

Available only when the extension was built with CUDA (a CUDA torch and nvcc at install time) and the
tensors live on a CUDA device. Inputs arrive validated, 2-D and contiguous (see docs/DESIGN.md).

- ``gated_linear``: a warp-per-output GEMV for decode shapes (M <= 16), tensor-core WMMA tiles for
  fp16/bf16 otherwise, fp32 shared-memory tiles for fp32. ``PERSONA_KERNELS_CUDA_GATED=gemv|simt|wmma``
  forces one path (testing).
- ``gated_linear_multi``: mixed-persona batches. M <= 16: the GEMV reads W once and gates it per row with
  that row's persona; larger M: rows sorted by persona on the device into tiles of one persona each (no host
  synchronisation), the same tiled kernels gather x rows and scatter y rows through the sort order.
- ``welford_partials``: two deterministic passes (per-block Chan merges, then an ordered fp64 merge).
- ``linear_with_stats``: one fused launch: the tiled GEMM's M tiles are the statistics segments and the blocks
  of the first column tile reduce each x tile they stage in shared memory (x read once), then the ordered
  fp64 merge. ``PERSONA_KERNELS_CUDA_LWS=cublas`` runs cuBLAS + the statistics kernels instead (comparison).

``python -m persona_kernels.kernels.cuda --check-registration`` checks, without a GPU, that the extension
carries its CUDA kernels and that every op below is registered for the CUDA dispatch key.
"""

from __future__ import annotations

import argparse
import sys
import torch

from persona_kernels import _extension

#: The ops of this backend; each is the C++ operator ``persona_kernels_C::<op>_cuda``.
OPS = ("gated_linear", "gated_linear_multi", "welford_partials", "linear_with_stats")


def is_available(device: torch.device) -> bool:
    """True for CUDA tensors when the extension carries its CUDA kernels and a GPU is visible."""
    device = torch.device(device)
    return device.type == "cuda" and _extension.has_cuda_kernels() and torch.cuda.is_available()


# Each op is the binding of the C++ operator ``persona_kernels_C::<op>_cuda`` (the backend contract's
# signatures, see persona_kernels.kernels.cpu); inputs arrive validated, 2-D and contiguous.
gated_linear = _extension.kernel("gated_linear_cuda", __name__)
gated_linear_multi = _extension.kernel("gated_linear_multi_cuda", __name__)
welford_partials = _extension.kernel("welford_partials_cuda", __name__)
linear_with_stats = _extension.kernel("linear_with_stats_cuda", __name__)


def registration_problems() -> list[str]:
    """What is missing for this backend in the compiled extension (empty when everything is registered).

    Works without a GPU: it asks the dispatcher whether ``persona_kernels_C::<op>_cuda`` has a kernel for the
    CUDA dispatch key.
    """
    if _extension.load() is None:
        return ["the compiled extension persona_kernels._C is not importable"]
    if not _extension.has_cuda_kernels():
        return ["the extension was built without its CUDA kernels (built_with_cuda() is False)"]
    problems = []
    for op in OPS:
        name = f"persona_kernels_C::{op}_cuda"
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        except RuntimeError as exc:  # the operator itself is unknown
            problems.append(f"{name}: not registered ({str(exc).splitlines()[0]})")
            continue
        if not has:
            problems.append(f"{name}: no kernel for the CUDA dispatch key")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Checks of the CUDA backend that need no GPU.")
    parser.add_argument("--check-registration", action="store_true",
                        help="the extension loads, carries CUDA kernels, and every op is registered for CUDA")
    args = parser.parse_args(argv)
    if not args.check_registration:
        parser.print_help()
        return 2
    problems = registration_problems()
    ext = _extension.load()
    where = getattr(ext, "__file__", "?")
    print(f"cuda backend: torch {torch.__version__} (CUDA {torch.version.cuda}), extension {where}")
    for op in OPS:
        status = "MISSING" if any(p.startswith(f"persona_kernels_C::{op}_cuda") for p in problems) else "ok"
        print(f"  {status:7s} persona_kernels_C::{op}_cuda [CUDA]")
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
