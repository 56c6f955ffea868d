"""The ``"cpu"`` backend: C++ kernels of the compiled extension (csrc/*.cpp), OpenMP + AVX-512/AVX2.

Each op is the C++ operator ``persona_kernels_C::<op>_cpu`` with the signature of the backend contract
(:mod:`persona_kernels.kernels.torch_ref` defines its semantics):

- ``pack_mask(mask)`` / ``unpack_mask(packed, in_features)``;
- ``gated_linear(x, weight, packed, bias, gamma)``;
- ``gated_linear_multi(x, weight, bank, index, bias, gamma)``: rows grouped by persona, one C++ pass per group;
- ``welford_partials(x, row_mask, seq_len)`` -> ``(count, mean, m2, abs_mean, abs_m2, seq_sumsq)``;
- ``linear_with_stats(x, weight, bias, row_mask, seq_len)`` -> ``(y, *welford_partials(...))``.
"""

from __future__ import annotations

import torch

from persona_kernels import _extension


def is_available(device: torch.device) -> bool:
    return device.type == "cpu" and _extension.has_cpu_kernels()


pack_mask = _extension.kernel("pack_mask", __name__)
unpack_mask = _extension.kernel("unpack_mask", __name__)
gated_linear = _extension.kernel("gated_linear_cpu", __name__)
gated_linear_multi = _extension.kernel("gated_linear_multi_cpu", __name__)
welford_partials = _extension.kernel("welford_partials_cpu", __name__)
linear_with_stats = _extension.kernel("linear_with_stats_cpu", __name__)
