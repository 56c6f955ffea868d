"""Paired effect sizes with bootstrap confidence intervals."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Estimate:
    """A mean with its 95% (or other) bootstrap interval over ``n`` items."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(values, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile bootstrap interval of the mean of ``values`` (1-D)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("persona_kernels.evaluation: argument 'values': cannot bootstrap an empty sample")
    if not 0 < confidence < 1:
        raise ValueError(f"persona_kernels.evaluation: argument 'confidence': expected (0, 1), got {confidence}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    means = v[idx].mean(dim=1)
    alpha = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Estimate(float(v.mean()), float(low), float(high), n)


def paired_difference(a, b, **kwargs) -> Estimate:
    """Bootstrap estimate of mean(a - b) over paired items (same items under two conditions)."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"persona_kernels.evaluation: paired samples differ in size ({a.numel()} vs {b.numel()})")
    return bootstrap_mean(a - b, **kwargs)
