"""The ``"cuda"`` backend: hand-written CUDA C++ kernels of the compiled extension (csrc/cuda/*.cu).

Available only when the extension was built with CUDA (a CUDA torch and nvcc at install time) and the
tensors live on a CUDA device. Inputs arrive validated, 2-D and contiguous (see docs/DESIGN.md).

- ``gated_linear``: a warp-per-output GEMV for decode shapes (M <= 16), tensor-core WMMA tiles for
  fp16/bf16 otherwise, fp32 shared-memory tiles for fp32. ``PERSONA_KERNELS_CUDA_GATED=gemv|simt|wmma``
  forces one path (testing).
- ``welford_partials``: two deterministic passes (per-block Chan merges, then an ordered fp64 merge).
- ``linear_with_stats``: ``at::linear`` (cuBLAS) followed by the statistics kernels on the same stream;
  not fused, x is read twice.
"""

from __future__ import annotations

from typing import Optional

import torch

from persona_kernels import _extension


def is_available(device: torch.device) -> bool:
    """True for CUDA tensors when the extension carries its CUDA kernels and a GPU is visible."""
    device = torch.device(device)
    return device.type == "cuda" and _extension.has_cuda_kernels() and torch.cuda.is_available()


def gated_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], gamma: float
) -> torch.Tensor:
    """``x @ (weight * G).T + bias`` for x [M, K], weight [N, K], packed int32 [N, ceil(K/32)]."""
    return _extension.ops().gated_linear_cuda(x, weight, packed, bias, float(gamma))


def welford_partials(
    x: torch.Tensor, row_mask: Optional[torch.Tensor], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, mean, m2, abs_mean, abs_m2, seq_sumsq)`` of x [R, K] (see docs/DESIGN.md)."""
    return tuple(_extension.ops().welford_partials_cuda(x, row_mask, int(seq_len)))


def linear_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_mask: Optional[torch.Tensor],
    seq_len: int,
) -> tuple[torch.Tensor, ...]:
    """``(F.linear(x, weight, bias), *welford_partials(x, row_mask, seq_len))``."""
    return tuple(_extension.ops().linear_with_stats_cuda(x, weight, bias, row_mask, int(seq_len)))
