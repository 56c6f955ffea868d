"""One dispatch for every kernel: per-device registration with ``torch.library`` plus a ``backend=`` override.

Each backend lives in ``persona_kernels.kernels.<backend>`` and exposes one function per op with the
same signature across backends (inputs already validated, 2-D and contiguous). The custom ops
(``torch.ops.persona_kernels.*``) register one kernel per device type with :func:`register_device_kernels`:
the dispatcher routes CPU tensors to the C++ kernels (the torch reference when the extension is not built),
CUDA tensors to Triton, then the CUDA extension, then the torch reference, and any other device to the torch
reference (the op's default implementation). ``backend="auto"`` means exactly that; another name (tests,
benchmarks) overrides it, and :func:`check_backend` is the one place that validates the name.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

from persona_kernels.utils.errors import message

BACKENDS = ("torch", "cpu", "triton", "cuda")
_MODULES = {
    "torch": "persona_kernels.kernels.torch_ref",
    "cpu": "persona_kernels.kernels.cpu",
    "triton": "persona_kernels.kernels.triton",
    "cuda": "persona_kernels.kernels.cuda",
}
# Preference order of "auto" per device type.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def triton_interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _backend_module(backend: str):
    return importlib.import_module(_MODULES[backend])


def is_available(backend: str, device: torch.device | str) -> bool:
    """Whether ``backend`` can run on ``device`` on this machine."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return False
    try:
        module = _backend_module(backend)
    except ImportError:
        return False
    return bool(module.is_available(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable for tensors on ``device``, in the order ``"auto"`` prefers them."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("torch",))
    rest = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *rest) if is_available(b, device)]


def check_backend(fn: str, backend: object) -> str:
    """The one check of a ``backend`` argument: ``"auto"`` or a name in :data:`BACKENDS` (ValueError otherwise)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(message(fn, f"expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}", "backend"))
    return backend


def resolve_backend(backend: str, device: torch.device | str, op: str) -> str:
    """Turn a user's ``backend`` argument into a concrete backend that implements ``op`` on ``device``."""
    device = torch.device(device)
    check_backend("persona_kernels", backend)
    if backend == "auto":
        forced = os.environ.get("PERSONA_KERNELS_BACKEND")
        if forced:
            return resolve_backend(forced, device, op)
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if is_available(candidate, device) and hasattr(_backend_module(candidate), op):
                return candidate
        return "torch"
    if not is_available(backend, device):
        raise RuntimeError(
            f"persona_kernels: argument 'backend': backend {backend!r} is not available for {device.type} tensors "
            f"on this machine (available: {', '.join(available_backends(device))})"
        )
    if not hasattr(_backend_module(backend), op):
        raise RuntimeError(f"persona_kernels: argument 'backend': backend {backend!r} does not implement {op!r}")
    return backend


@functools.lru_cache(maxsize=256)
def _cached_kernel(op: str, backend: str, device: torch.device, forced: str | None, interpreting: bool) -> Callable:
    return getattr(_backend_module(resolve_backend(backend, device, op)), op)


def register_device_kernels(custom_op, name: str, run: Callable[..., torch.Tensor]) -> None:
    """Register ``custom_op``'s kernel for each device type of the "auto" order with ``torch.library``.

    ``run(kernel, *args)`` calls the backend function ``kernel`` on the op's (validated) arguments, whose last
    one is the ``backend`` string; the kernel is the device's default unless ``backend`` names another one. The
    op's own default implementation should be ``run(<torch reference>, *args)`` for every other device.
    """
    for device_type in _AUTO_ORDER:
        def impl(*args, _device_type=device_type):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device(_device_type))
            return run(get_kernel(name, args[-1], device), *args)

        custom_op.register_kernel(device_type, impl)


def reference_kernel(name: str, backend: str, device: torch.device) -> Callable:
    """The kernel for a device without a registered one: the torch reference, or the ``backend`` override."""
    return getattr(_backend_module("torch"), name) if backend == "auto" else get_kernel(name, backend, device)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether an eager call may run the backend kernel itself instead of going through its custom op.

    The custom op's Python dispatch costs about 23 µs a call on a CPU, more than a decode step's kernel on a small
    layer. It is needed only to record autograd, to be traced (``torch.compile``, ``torch.export``) or to be
    seen by a tensor subclass (FakeTensor, DTensor) or a Python mode (FakeTensorMode, FlopCounterMode,
    ``with torch.device``). Without any of these, calling the kernel the op would dispatch to is the same
    computation.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


def get_kernel(op: str, backend: str, device: torch.device | str) -> Callable:
    """The function implementing ``op`` for ``backend`` (``"auto"`` allowed) on ``device``.

    Resolution is cached per (op, backend, device) and the environment switches it depends on, so the
    per-call cost in a model's forward is one dictionary lookup.
    """
    return _cached_kernel(
        op, backend, torch.device(device), os.environ.get("PERSONA_KERNELS_BACKEND") or None, triton_interpreting()
    )
