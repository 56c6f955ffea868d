"""Plain-torch reference implementations (the ``"torch"`` backend): readable, any device, fp32 math.

They define the semantics every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def is_available(device: torch.device) -> bool:
    return True


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _BIT_SHIFTS:
        _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return _BIT_SHIFTS[device]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> int32 [N, ceil(K/32)], bit b of word w = mask[:, 32*w + b]."""
    n, k = mask.shape
    words = (k + 31) // 32
    padded = torch.zeros(n, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :k] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    value = (padded.view(n, words, 32) * weights).sum(-1)  # in [0, 2**32)
    value = torch.where(value >= 2**31, value - 2**32, value)
    return value.to(torch.int32)


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K/32)] -> bool [N, K] (inverse of :func:`pack_mask`)."""
    n, words = packed.shape
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(n, words * 32)[:, :in_features].bool()


def gate(packed: torch.Tensor, in_features: int, gamma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense gate ``G = m + gamma * (1 - m)`` as a ``dtype`` tensor [N, K]."""
    m = unpack_mask(packed, in_features).to(dtype)
    return m + gamma * (1.0 - m)


def gated_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """``x @ (weight * G).T + bias`` computed in fp32, returned in x's dtype. x: [M, K]."""
    w = weight.float() * gate(packed, weight.shape[1], gamma)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)
