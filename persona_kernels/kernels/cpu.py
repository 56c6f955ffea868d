"""The ``"cpu"`` backend: C++ kernels of the compiled extension (csrc/*.cpp), OpenMP + AVX-512/AVX2."""

from __future__ import annotations

import torch

from persona_kernels import _extension


def is_available(device: torch.device) -> bool:
    return device.type == "cpu" and _extension.has_cpu_kernels()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return _extension.ops().pack_mask(mask)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return _extension.ops().unpack_mask(packed, in_features)


def gated_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    return _extension.ops().gated_linear_cpu(x, weight, packed, bias, float(gamma))


def welford_partials(x: torch.Tensor, row_mask: torch.Tensor | None, seq_len: int):
    """Batch statistics of x [R, K] (see docs/DESIGN.md): (count, mean, m2, abs_mean, abs_m2, seq_sumsq)."""
    return _extension.ops().welford_partials_cpu(x, row_mask, int(seq_len))


def linear_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_mask: torch.Tensor | None,
    seq_len: int,
):
    """``(F.linear(x, weight, bias), *welford_partials(x, row_mask, seq_len))``."""
    return _extension.ops().linear_with_stats_cpu(x, weight, bias, row_mask, int(seq_len))


def gated_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: list[float],
) -> torch.Tensor:
    """Mixed-persona gated linear (rows grouped by persona, one C++ pass per group)."""
    return _extension.ops().gated_linear_multi_cpu(x, weight, bank, index, bias, [float(g) for g in gamma])
