"""Plain-torch reference implementations (the ``"torch"`` backend): readable, any device, fp32 math.

They define the semantics every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def is_available(device: torch.device) -> bool:
    return True


def _shifts(device: torch.device) -> torch.Tensor:
    # created per call (tiny): a cached real tensor would leak into FakeTensor tracing under torch.compile
    return torch.arange(32, dtype=torch.int32, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> int32 [N, ceil(K/32)], bit b of word w = mask[:, 32*w + b]."""
    n, k = mask.shape
    from persona_kernels.ops.packing import packed_words

    words = packed_words(k)
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


def welford_partials(x: torch.Tensor, row_mask: torch.Tensor | None, seq_len: int):
    """Batch statistics of x [R, K], computed two-pass in float64 (the reference of the contract).

    Returns ``(count int64[K], mean, m2, abs_mean, abs_m2 f32[K], seq_sumsq f32[R // seq_len, K])``: rows with
    ``row_mask`` False and non-finite values (per channel) are excluded; ``seq_sumsq[s]`` is Σx² over the valid,
    finite rows of the s-th block of ``seq_len`` consecutive rows (shape [0, K] when ``seq_len`` is 0).
    """
    rows, k = x.shape
    xd = x.to(torch.float64)
    valid = torch.isfinite(xd)
    if row_mask is not None:
        valid &= row_mask.reshape(rows, 1)
    count = valid.sum(0, dtype=torch.int64)
    denom = count.clamp_min(1).to(torch.float64)
    zero = xd.new_zeros(())
    xz = torch.where(valid, xd, zero)

    def two_pass(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = v.sum(0) / denom
        dev = torch.where(valid, v - mean, zero)
        return mean, (dev * dev).sum(0)

    mean, m2 = two_pass(xz)
    abs_mean, abs_m2 = two_pass(xz.abs())
    nseq = rows // seq_len if seq_len > 0 else 0
    seq_sumsq = (xz[: nseq * seq_len] ** 2).reshape(nseq, seq_len if nseq else 1, k).sum(1)
    f32 = torch.float32
    return count, mean.to(f32), m2.to(f32), abs_mean.to(f32), abs_m2.to(f32), seq_sumsq.to(f32).reshape(nseq, k)


def linear_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_mask: torch.Tensor | None,
    seq_len: int,
):
    """``(F.linear(x, weight, bias), *welford_partials(x, row_mask, seq_len))``; y computed in fp32, in x's dtype."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return (y, *welford_partials(x, row_mask, seq_len))


def gated_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: list[float],
) -> torch.Tensor:
    """Mixed-persona gated linear: row ``i`` of x [M, K] uses persona ``index[i]`` of bank int32 [P, N, W]
    with gate ``G_p = m_p + gamma[p] * (1 - m_p)``; ``index[i] == -1`` is the base model (no gate).
    fp32 math, returned in x's dtype."""
    k = weight.shape[1]
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    b = None if bias is None else bias.float()
    idx = index.long()
    for p in idx.unique().tolist():
        rows = (idx == p).nonzero().flatten()
        w = weight.float() if p < 0 else weight.float() * gate(bank[p], k, float(gamma[p]))
        out[rows] = F.linear(x[rows].float(), w, b)
    return out.to(x.dtype)
