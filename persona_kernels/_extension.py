"""Loading of the compiled extension (``persona_kernels._C``) and what it offers on this machine."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable

import torch  # noqa: F401  (libc10 must be loaded before the extension)


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """Return the compiled module, or None when the package was installed without building it."""
    try:
        from persona_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels are importable."""
    return load() is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    ext = load()
    return ext is not None and bool(ext.built_with_cuda())


def cpu_isa() -> str:
    """Instruction set used by the CPU kernels here: avx512, avx2, portable, or 'none' (not built)."""
    ext = load()
    return ext.cpu_isa() if ext is not None else "none"


def ops():
    """The ``torch.ops.persona_kernels_C`` namespace (requires the extension)."""
    if load() is None:
        raise RuntimeError(
            "persona_kernels: the compiled extension persona_kernels._C is not available; reinstall with "
            "`pip install --no-build-isolation .` (or use backend='torch')"
        )
    return torch.ops.persona_kernels_C


def kernel(op: str, module: str) -> Callable[..., Any]:
    """The backend function of the extension operator ``persona_kernels_C::<op>``, a member of ``module``.

    The backends ``"cpu"`` and ``"cuda"`` are these bindings: the operator schema converts the scalar
    arguments (``gamma``, ``seq_len``), and the extension is looked up on each call (it loads lazily).
    """
    def call(*args: Any) -> Any:
        return getattr(ops(), op)(*args)

    call.__name__ = call.__qualname__ = op
    call.__module__ = module
    call.__doc__ = f"``torch.ops.persona_kernels_C.{op}`` (see docs/DESIGN.md for the backend contract)."
    return call
