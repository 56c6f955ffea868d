"""Calibration statistics of activations: :func:`welford_update` and the fused :func:`linear_with_stats`.

The kernels are pure functions (a batch in, its statistics out as a :class:`WelfordPartials` tuple) and are
registered as the custom ops ``torch.ops.persona_kernels.welford_partials`` and
``torch.ops.persona_kernels.linear_with_stats`` (with fake implementations, so ``torch.compile`` and
``torch.library.opcheck`` work). The stateful part, merging a batch into the running
:class:`~persona_kernels.stats.ActivationStats`, runs with tensor ops on the device (no host sync), or on CPU
in eager mode as one in-place C++ pass (``welford_merge_cpu_``).

Layout: ``x`` is ``[..., K]``; when ``x.dim() >= 3`` every index of the leading dims before the last two
is one sequence of ``x.shape[-2]`` tokens (so ``[B, T, K]`` holds B sequences), which feeds the per-sequence
L2-norm statistics. A 2-D ``x`` is a bag of tokens without sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

from persona_kernels.utils.errors import fail
from persona_kernels.dispatch import (check_backend, direct_call_ok, get_kernel, reference_kernel,
                                      register_device_kernels)

# This module does not import persona_kernels.stats (stats imports it): the running state is any object
# with ActivationStats' ``num_channels``, ``device`` and ``merge_batch`` (duck-typed, one import direction).

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class WelfordPartials(NamedTuple):
    """Statistics of one batch ``x[R, K]`` (see docs/DESIGN.md, ``welford_partials``)."""

    count: torch.Tensor  # int64 [K]: valid rows whose value is finite
    mean: torch.Tensor  # f32 [K]
    m2: torch.Tensor  # f32 [K]: sum of squared deviations from the mean
    abs_mean: torch.Tensor  # f32 [K]: mean of |x|
    abs_m2: torch.Tensor  # f32 [K]
    seq_sumsq: torch.Tensor  # f32 [R // seq_len, K]: per-sequence Σx² ([0, K] without sequences)


def _check_stats(fn: str, stats) -> None:
    if not callable(getattr(stats, "merge_batch", None)) or not isinstance(getattr(stats, "num_channels", None), int):
        fail(fn, "stats", f"expected an ActivationStats, got {type(stats).__name__}", TypeError)


def _check_x_and_mask(fn: str, num_channels: int, device: torch.device, x, token_mask, backend) -> None:
    if not isinstance(x, torch.Tensor):
        fail(fn, "x", f"expected a torch.Tensor, got {type(x).__name__}", TypeError)
    if x.dim() < 1:
        fail(fn, "x", "expected shape [..., K], got a 0-d tensor")
    if x.shape[-1] != num_channels:
        fail(fn, "x", f"last dimension {x.shape[-1]} does not match stats.num_channels={num_channels}")
    if x.dtype not in _FLOAT_DTYPES:
        fail(fn, "x", f"expected dtype float32, float16 or bfloat16, got {x.dtype}", TypeError)
    if x.device != device:
        fail(fn, "x", f"device {x.device} does not match the statistics' device {device} "
              "(create the ActivationStats on the input's device or move it with .to())")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            fail(fn, "token_mask", f"expected a bool tensor or None, got {type(token_mask).__name__}", TypeError)
        if token_mask.dtype != torch.bool:
            fail(fn, "token_mask", f"expected dtype torch.bool, got {token_mask.dtype}", TypeError)
        if tuple(token_mask.shape) != tuple(x.shape[:-1]):
            fail(fn, "token_mask", f"expected shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            fail(fn, "token_mask", f"device {token_mask.device} does not match x's device {x.device}")
    check_backend(fn, backend)


def _layout(x: torch.Tensor, token_mask: Optional[torch.Tensor]):
    """(x2 [R, K], row_mask [R] or None, seq_len)."""
    k = x.shape[-1]
    seq_len = int(x.shape[-2]) if x.dim() >= 3 else 0
    x2 = x.reshape(-1, k)
    row_mask = None if token_mask is None else token_mask.reshape(-1)
    return x2, row_mask, seq_len


# ------------------------------------------------------------------------------------------- custom ops
def _run_partials(kernel, x, row_mask, seq_len, backend):
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    mask = None if row_mask is None else row_mask.reshape(-1).contiguous()
    return tuple(t.clone() if _aliases(t, x, row_mask) else t for t in kernel(x2, mask, int(seq_len)))


@torch.library.custom_op("persona_kernels::welford_partials", mutates_args=())
def _welford_partials_op(
    x: torch.Tensor, row_mask: Optional[torch.Tensor], seq_len: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Devices without a registered kernel: the torch reference (or the ``backend`` override)."""
    return _run_partials(reference_kernel("welford_partials", backend, x.device), x, row_mask, seq_len, backend)


register_device_kernels(_welford_partials_op, "welford_partials", _run_partials)


def _aliases(t: torch.Tensor, *inputs: Optional[torch.Tensor]) -> bool:
    return any(i is not None and t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs)


def _fake_partials(x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    nseq = rows // seq_len if seq_len > 0 else 0
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        torch.empty(k, dtype=torch.int64, device=x.device),
        torch.empty(k, **f32), torch.empty(k, **f32), torch.empty(k, **f32), torch.empty(k, **f32),
        torch.empty(nseq, k, **f32),
    )


@_welford_partials_op.register_fake
def _(x, row_mask, seq_len, backend):
    return _fake_partials(x, seq_len)


def _run_linear_with_stats(kernel, x, weight, bias, row_mask, seq_len, backend):
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    mask = None if row_mask is None else row_mask.reshape(-1).contiguous()
    y, *parts = kernel(x2, weight.contiguous(), None if bias is None else bias.contiguous(), mask, int(seq_len))
    parts = [t.clone() if _aliases(t, x, weight, bias, row_mask) else t for t in parts]
    return (y.reshape(*lead, n), *parts)


@torch.library.custom_op("persona_kernels::linear_with_stats", mutates_args=())
def _linear_with_stats_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_mask: Optional[torch.Tensor],
    seq_len: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Devices without a registered kernel: the torch reference (or the ``backend`` override)."""
    kernel = reference_kernel("linear_with_stats", backend, x.device)
    return _run_linear_with_stats(kernel, x, weight, bias, row_mask, seq_len, backend)


register_device_kernels(_linear_with_stats_op, "linear_with_stats", _run_linear_with_stats)


@_linear_with_stats_op.register_fake
def _(x, weight, bias, row_mask, seq_len, backend):
    return (x.new_empty(*x.shape[:-1], weight.shape[0]), *_fake_partials(x, seq_len))


def _lws_setup_context(ctx, inputs, output):
    x, weight, bias, row_mask, seq_len, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _lws_backward(ctx, grad_y, *grad_stats):
    x, weight = ctx.saved_tensors
    k = weight.shape[1]
    g = grad_y.reshape(-1, grad_y.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = (g @ weight).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = g.t() @ x.reshape(-1, k)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b, None, None, None


_linear_with_stats_op.register_autograd(_lws_backward, setup_context=_lws_setup_context)


@functools.lru_cache(maxsize=None)
def _cpu_linear_with_stats():
    """The C++ backend's linear_with_stats function (None without the extension)."""
    try:
        from persona_kernels.kernels import cpu
    except ImportError:  # pragma: no cover
        return None
    return cpu.linear_with_stats if cpu.is_available(torch.device("cpu")) else None


def _partials(x2: torch.Tensor, row_mask: Optional[torch.Tensor], seq_len: int, backend: str) -> tuple:
    if direct_call_ok(x2):
        return tuple(get_kernel("welford_partials", backend, x2.device)(
            x2.contiguous(), None if row_mask is None else row_mask.contiguous(), seq_len))
    return _welford_partials_op(x2, row_mask, seq_len, backend)


# ------------------------------------------------------------------------------------------- public API
def welford_partials(
    x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> WelfordPartials:
    """Statistics of one batch ``x[..., K]`` without a running state (rows = all leading indices).

    ``seq_len`` is ``x.shape[-2]`` when ``x.dim() >= 3``, else 0 (no per-sequence sums).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        fail("welford_partials", "x", "expected a tensor of shape [..., K]", TypeError)
    _check_x_and_mask("welford_partials", x.shape[-1], x.device, x, token_mask, backend)
    x2, row_mask, seq_len = _layout(x, token_mask)
    return WelfordPartials(*_partials(x2, row_mask, seq_len, backend))


def welford_update(
    stats: Any,
    x: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> None:
    """Merge the statistics of ``x[..., K]`` into ``stats`` (in place, no host synchronisation).

    Args:
        stats: the running :class:`~persona_kernels.stats.ActivationStats` (on x's device, K channels).
        x: activations ``[..., K]`` in fp32/fp16/bf16, any layout. With ``x.dim() >= 3`` each slice
            ``x[i, ..., :, :]`` is a sequence of ``x.shape[-2]`` tokens.
        token_mask: optional bool ``x.shape[:-1]``; False tokens (padding) are ignored.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
    """
    _check_stats("welford_update", stats)
    _check_x_and_mask("welford_update", stats.num_channels, stats.device, x, token_mask, backend)
    if backend != "auto":
        get_kernel("welford_partials", backend, x.device)  # raise now with the backend's message
    x2, row_mask, seq_len = _layout(x, token_mask)
    partials = _partials(x2, row_mask, seq_len, backend)
    _merge(stats, partials, x2, row_mask, seq_len)


def _merge(stats: Any, partials, x2: torch.Tensor, row_mask: Optional[torch.Tensor], seq_len: int) -> None:
    """Merge a batch's partials into ``stats`` (one C++ pass on CPU in eager mode, else tensor ops)."""
    stats.merge_batch(WelfordPartials(*partials), row_mask, seq_len, x2.shape[0], native=direct_call_ok(x2))


def linear_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stats: Any,
    token_mask: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` that also merges the statistics of ``x`` into ``stats``.

    Args:
        x: ``[..., K]`` input, same dtype and device as ``weight``.
        weight: ``[N, K]``; bias: optional ``[N]``.
        stats: running :class:`~persona_kernels.stats.ActivationStats` with K channels on x's device.
        token_mask: optional bool ``x.shape[:-1]``; masked tokens are left out of the statistics (the
            output still covers every row).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[..., N]`` output in x's dtype.
    """
    fn = "linear_with_stats"
    _check_stats(fn, stats)
    _check_x_and_mask(fn, stats.num_channels, stats.device, x, token_mask, backend)
    if not isinstance(weight, torch.Tensor):
        fail(fn, "weight", f"expected a torch.Tensor, got {type(weight).__name__}", TypeError)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        fail(fn, "weight", f"expected shape [N, K] with K={x.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        fail(fn, "weight", f"dtype {weight.dtype} does not match x's dtype {x.dtype}", TypeError)
    if weight.device != x.device:
        fail(fn, "weight", f"device {weight.device} does not match x's device {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            fail(fn, "bias", f"expected a torch.Tensor or None, got {type(bias).__name__}", TypeError)
        if tuple(bias.shape) != (weight.shape[0],):
            fail(fn, "bias", f"expected shape [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            fail(fn, "bias", f"dtype {bias.dtype} does not match x's dtype {x.dtype}", TypeError)
        if bias.device != x.device:
            fail(fn, "bias", f"device {bias.device} does not match x's device {x.device}")
    if backend != "auto":
        get_kernel(fn, backend, x.device)
    return _linear_with_stats_checked(x, weight, bias, stats, token_mask, backend)


def _one_call_cpu_merge(x: torch.Tensor, stats: Any, backend: str) -> Optional[Callable[..., torch.Tensor]]:
    """``stats._linear_merge_cpu_op()``: the C++ op doing GEMM, statistics and merge in one call, called as
    ``op(x2, weight, bias, row_mask, seq_len, stats._n, stats._mean, stats._m2, stats._nonfinite)``, when
    ``backend`` resolves to the C++ kernel on ``x``'s device; else None. Eager callers only (no autograd graph,
    not compiling): the recorder resolves it once per module, :func:`_linear_with_stats_checked` per call."""
    kernel = get_kernel("linear_with_stats", backend, x.device)
    if kernel is None or kernel is not _cpu_linear_with_stats():
        return None
    make = getattr(stats, "_linear_merge_cpu_op", None)
    return None if make is None else make()


def _linear_with_stats_checked(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stats: Any,
                               token_mask: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """:func:`linear_with_stats` after its argument checks (the recorder calls it directly once a module's
    first call has passed them: the inputs it builds keep their dtype, device and width)."""
    x2, row_mask, seq_len = _layout(x, token_mask)
    eager = direct_call_ok(x, weight, bias)
    merge = _one_call_cpu_merge(x, stats, backend) if eager else None
    if merge is not None:
        # CPU: kernel and merge in one C++ call (it makes its inputs contiguous itself)
        y = merge(x2, weight, bias, row_mask, seq_len, stats._n, stats._mean, stats._m2, stats._nonfinite)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    kernel = get_kernel("linear_with_stats", backend, x.device)
    if eager:
        y, *partials = kernel(
            x2.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            None if row_mask is None else row_mask.contiguous(), seq_len)
    else:
        y, *partials = _linear_with_stats_op(x2, weight, bias, row_mask, seq_len, backend)
    _merge(stats, partials, x2, row_mask, seq_len)
    return y.reshape(*x.shape[:-1], weight.shape[0])
