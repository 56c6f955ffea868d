"""persona_kernels: fused kernels for persona subnetworks.

Data flow: calibrate -> statistics -> scores -> masks -> bank -> patch -> inference. Public names are
imported lazily so that ``import persona_kernels`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch  # noqa: F401  (load libc10 before the compiled extension)

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "pack_mask": "persona_kernels.ops.packing",
    "unpack_mask": "persona_kernels.ops.packing",
    "packed_words": "persona_kernels.ops.packing",
    "gated_linear": "persona_kernels.ops.gated_linear",
    "gated_linear_multi": "persona_kernels.ops.gated_linear_multi",
    "available_backends": "persona_kernels.dispatch",
    "welford_update": "persona_kernels.ops.welford",
    "welford_partials": "persona_kernels.ops.welford",
    "WelfordPartials": "persona_kernels.ops.welford",
    "linear_with_stats": "persona_kernels.ops.welford",
    "ActivationStats": "persona_kernels.stats",
    "collect_stats": "persona_kernels.calibration",
    "StatsRecorder": "persona_kernels.calibration",
    "all_reduce_stats": "persona_kernels.distributed",
    "MaskBank": "persona_kernels.bank",
    "patch_model": "persona_kernels.patching",
    "unpatch_model": "persona_kernels.patching",
    "set_persona": "persona_kernels.patching",
    "persona": "persona_kernels.patching",
    "persona_batch": "persona_kernels.patching",
    "merge_persona": "persona_kernels.patching",
    "unmerge_persona": "persona_kernels.patching",
    "PersonaLinear": "persona_kernels.patching",
    "get_persona": "persona_kernels.patching",
    "disable_persona": "persona_kernels.patching",
    "add_persona": "persona_kernels.patching",
    "remove_persona": "persona_kernels.patching",
    "load_model": "persona_kernels.models",
    "calibrate": "persona_kernels.pipeline",
    "export_persona": "persona_kernels.export",
}
_SUBMODULES = ("scoring", "analysis", "evaluation", "dispatch", "models", "personas")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"persona_kernels.{name}")
    raise AttributeError(f"module 'persona_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
