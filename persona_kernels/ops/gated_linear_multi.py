"""Mixed-persona gated linear: every row of a batch with its own persona, in one call.

``y[i] = x[i] @ (W * G_p).T + b`` with ``p = persona_index[i]`` and ``G_p = m_p + gamma_p * (1 - m_p)``,
``m_p`` the bit-packed keep-mask ``packed_bank[p]``; ``p == -1`` is the base model (``F.linear``). One base
weight serves many personas at once, the way multi-LoRA servers serve many adapters. Registered as the
custom op ``torch.ops.persona_kernels.gated_linear_multi`` (fake implementation included; no autograd).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from persona_kernels.dispatch import (check_backend, direct_call_ok, get_kernel, reference_kernel,
                                      register_device_kernels)
from persona_kernels.ops.gated_linear import _contiguous, check_gated_linear_args, run_rows
from persona_kernels.ops.packing import packed_words
from persona_kernels.utils.errors import fail

__all__ = ["gated_linear_multi", "check_gated_linear_multi_args"]

GammaArg = Union[float, Sequence[float], torch.Tensor]


def _fail(arg: str, msg: str, exc=ValueError):
    fail("gated_linear_multi", arg, msg, exc)


def _gammas(gamma: GammaArg, num_personas: int) -> list[float]:
    """One float in [0, 1] per persona (a scalar is broadcast)."""
    if isinstance(gamma, torch.Tensor):
        if gamma.dim() == 0:
            gamma = float(gamma)
        elif gamma.dim() == 1 and gamma.is_floating_point():
            gamma = gamma.tolist()
        else:
            _fail("gamma", f"expected a float or a float tensor of shape [P] = [{num_personas}], got {gamma.dtype} {tuple(gamma.shape)}", TypeError)
    if isinstance(gamma, bool):
        _fail("gamma", "expected a float in [0, 1] or one per persona, got bool", TypeError)
    if isinstance(gamma, (int, float)):
        values = [float(gamma)] * num_personas
        if not 0.0 <= float(gamma) <= 1.0:
            _fail("gamma", f"expected values in [0, 1], got {gamma}")
        return values
    try:
        values = [float(g) for g in gamma]
    except (TypeError, ValueError):
        _fail("gamma", f"expected a float or a sequence of {num_personas} floats, got {type(gamma).__name__}", TypeError)
    if len(values) != num_personas:
        _fail("gamma", f"expected {num_personas} values (one per persona of packed_bank), got {len(values)}")
    bad = [g for g in values if not 0.0 <= g <= 1.0]
    if bad:
        _fail("gamma", f"expected values in [0, 1], got {bad[0]}")
    return values


def check_gated_linear_multi_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_bank: torch.Tensor,
    persona_index: torch.Tensor,
    bias: Optional[torch.Tensor],
    backend: str,
    validate_index: bool = True,
) -> None:
    """Raise a clear error naming the offending argument (gamma is checked by :func:`_gammas`)."""
    if not isinstance(packed_bank, torch.Tensor):
        _fail("packed_bank", f"expected a torch.Tensor, got {type(packed_bank).__name__}", TypeError)
    if packed_bank.dim() != 3:
        _fail("packed_bank", f"expected shape [P, N, ceil(K/32)], got {tuple(packed_bank.shape)}")
    # x / weight / bias checks of the single-persona op, with one persona's slice as the mask
    dummy = packed_bank[0] if packed_bank.shape[0] > 0 else packed_bank.new_empty(packed_bank.shape[1:])
    check_gated_linear_args(x, weight, dummy, bias, op="gated_linear_multi", mask_name="packed_bank")
    check_backend("gated_linear_multi", backend)
    n, k = weight.shape
    if tuple(packed_bank.shape[1:]) != (n, packed_words(k)):
        _fail("packed_bank", f"expected shape [P, N, ceil(K/32)] = [P, {n}, {packed_words(k)}], got {tuple(packed_bank.shape)}")
    if not isinstance(persona_index, torch.Tensor):
        _fail("persona_index", f"expected an integer torch.Tensor, got {type(persona_index).__name__}", TypeError)
    if persona_index.dtype not in (torch.int32, torch.int64):
        _fail("persona_index", f"expected dtype torch.int32 or torch.int64, got {persona_index.dtype}", TypeError)
    rows = math.prod(x.shape[:-1])
    if tuple(persona_index.shape) not in (tuple(x.shape[:-1]), (rows,)):
        _fail("persona_index", f"expected shape x.shape[:-1] = {tuple(x.shape[:-1])} or [{rows}], got {tuple(persona_index.shape)}")
    if persona_index.device != x.device:
        _fail("persona_index", f"device {persona_index.device} does not match x's device {x.device}")
    if validate_index and persona_index.numel():
        lo, hi = torch.stack([persona_index.min(), persona_index.max()]).tolist()
        if lo < -1 or hi >= packed_bank.shape[0]:
            _fail("persona_index", f"values must be in [-1, P) = [-1, {packed_bank.shape[0]}) (-1 = base model), got min {lo}, max {hi}")


def _run(kernel, x, weight, packed_bank, persona_index, bias, gamma, backend):
    w, bank, rows, b = weight.contiguous(), packed_bank.contiguous(), persona_index.reshape(-1).contiguous(), _contiguous(bias)
    gammas = [float(g) for g in gamma]
    return run_rows(x, weight, bias, lambda x2: kernel(x2, w, bank, rows, b, gammas))


@torch.library.custom_op("persona_kernels::gated_linear_multi", mutates_args=())
def _gated_linear_multi_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_bank: torch.Tensor,
    persona_index: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: list[float],
    backend: str,
) -> torch.Tensor:
    """Devices without a registered kernel: the torch reference (or the ``backend`` override)."""
    return _run(reference_kernel("gated_linear_multi", backend, x.device), x, weight, packed_bank, persona_index,
                bias, gamma, backend)


register_device_kernels(_gated_linear_multi_op, "gated_linear_multi", _run)


@_gated_linear_multi_op.register_fake
def _(x, weight, packed_bank, persona_index, bias, gamma, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def gated_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_bank: torch.Tensor,
    persona_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    gamma: GammaArg = 0.0,
    *,
    backend: str = "auto",
    validate_index: bool = True,
) -> torch.Tensor:
    """Gated linear layer where every row of ``x`` picks its own persona mask.

    Args:
        x: ``[..., K]`` input, same dtype and device as ``weight``.
        weight: ``[N, K]`` weight in fp32, fp16 or bf16.
        packed_bank: int32 ``[P, N, ceil(K/32)]``: the packed keep-masks of P personas, stacked.
        persona_index: int32/int64 persona of each row of x, shape ``x.shape[:-1]`` or ``[M]`` (M = number of
            rows); ``-1`` = base model (no mask). Personas absent from the batch cost nothing.
        bias: optional ``[N]`` bias.
        gamma: soft gate in [0, 1] for pruned weights: one float for all personas, or P values (list or
            ``[P]`` tensor).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        validate_index: check that the index values lie in [-1, P) (one host sync on GPU).

    Returns:
        ``[..., N]`` in x's dtype, fp32 accumulation.
    """
    check_gated_linear_multi_args(x, weight, packed_bank, persona_index, bias, backend, validate_index)
    gammas = _gammas(gamma, packed_bank.shape[0])
    if direct_call_ok(x, weight, packed_bank, persona_index, bias):  # eager inference: the kernel the op would run
        return _run(get_kernel("gated_linear_multi", backend, x.device), x, weight, packed_bank, persona_index, bias,
                    gammas, backend)
    if backend != "auto":
        get_kernel("gated_linear_multi", backend, x.device)  # raise now if unavailable / not implemented
    return _gated_linear_multi_op(x, weight, packed_bank, persona_index, bias, gammas, backend)
