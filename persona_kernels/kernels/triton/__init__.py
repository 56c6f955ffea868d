"""The ``"triton"`` backend: Triton kernels for CUDA GPUs (and the CPU through ``TRITON_INTERPRET=1``).

Ops: :func:`gated_linear` (bitmask-gated GEMM), :func:`welford_partials` and :func:`linear_with_stats`
(deterministic per-channel Welford statistics, optionally fused into the GEMM). ``TRITON_INTERPRET``
is read when this package is first imported (``@triton.jit`` fixes compile-vs-interpret at definition).
``python -m persona_kernels.kernels.triton.aot_check`` compiles every kernel for sm_90 without a GPU.
"""

from __future__ import annotations

import torch

from persona_kernels.dispatch import triton_interpreting

#: Why the kernels could not be defined (None when they were): triton missing, too old or broken.
IMPORT_ERROR: Exception | None = None
try:
    from ._common import INTERPRET as _DEFINED_INTERPRETED
    from .gated_linear import gated_linear
    from .gated_linear_multi import gated_linear_multi
    from .welford import linear_with_stats, welford_partials
except Exception as exc:  # noqa: BLE001 - a broken triton install must not break the other backends
    IMPORT_ERROR = exc
    _DEFINED_INTERPRETED = False

__all__ = ["is_available", "gated_linear", "gated_linear_multi", "welford_partials", "linear_with_stats"]


def is_available(device: torch.device) -> bool:
    """Triton importable and ``device`` is CUDA, or CPU while the interpreter is on.

    The CPU case also requires that the kernels were defined under the interpreter (i.e. this package
    was imported with ``TRITON_INTERPRET=1`` already set).
    """
    if IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return _DEFINED_INTERPRETED and triton_interpreting()
    return False
