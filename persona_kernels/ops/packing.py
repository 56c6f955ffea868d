"""Bit-packed persona masks: the stable on-disk and in-memory format (1 bit per weight).

Layout: a bool keep-mask ``[N, K]`` (``nn.Linear.weight`` layout) becomes int32 ``[N, ceil(K/32)]``;
bit ``b`` (least significant first) of word ``w`` in row ``n`` is ``mask[n, 32*w + b]``; padding
bits past ``K`` are 0.
"""

from __future__ import annotations

import torch

from persona_kernels.dispatch import reference_kernel, register_device_kernels


def packed_words(in_features: int) -> int:
    """Number of int32 words per row for ``in_features`` input features."""
    return (int(in_features) + 31) // 32


def _check_matrix(arg: str, t: torch.Tensor, dtype: torch.dtype, shape: str) -> None:
    """Raise naming ``arg`` unless ``t`` is a 2-D tensor of ``dtype`` (``shape`` describes the expected shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"persona_kernels: argument '{arg}': expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"persona_kernels: argument '{arg}': expected dtype {dtype}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"persona_kernels: argument '{arg}': expected shape {shape}, got {tuple(t.shape)}")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool keep-mask ``[N, K]`` into int32 words ``[N, ceil(K/32)]`` on the same device."""
    _check_matrix("mask", mask, torch.bool, "[N, K]")
    return _pack_op(mask, "auto")


def unpack_mask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: int32 ``[N, ceil(K/32)]`` -> bool ``[N, in_features]``."""
    _check_matrix("packed", packed, torch.int32, "[N, W]")
    if int(in_features) < 0 or packed.shape[1] != packed_words(in_features):
        raise ValueError(
            f"persona_kernels: argument 'in_features': {in_features} needs {packed_words(max(int(in_features), 0))} "
            f"words per row, but 'packed' has {packed.shape[1]}"
        )
    return _unpack_op(packed, int(in_features), "auto")


# -- custom ops, one kernel per device (torch.library); arguments validated above -------------------------------
def _run_pack(kernel, mask, backend):
    return kernel(mask.contiguous())


def _run_unpack(kernel, packed, in_features, backend):
    return kernel(packed.contiguous(), in_features)


@torch.library.custom_op("persona_kernels::pack_mask", mutates_args=())
def _pack_op(mask: torch.Tensor, backend: str) -> torch.Tensor:
    return _run_pack(reference_kernel("pack_mask", backend, mask.device), mask, backend)


@_pack_op.register_fake
def _(mask, backend):
    return mask.new_empty((mask.shape[0], packed_words(mask.shape[1])), dtype=torch.int32)


@torch.library.custom_op("persona_kernels::unpack_mask", mutates_args=())
def _unpack_op(packed: torch.Tensor, in_features: int, backend: str) -> torch.Tensor:
    return _run_unpack(reference_kernel("unpack_mask", backend, packed.device), packed, in_features, backend)


@_unpack_op.register_fake
def _(packed, in_features, backend):
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.bool)


register_device_kernels(_pack_op, "pack_mask", _run_pack)
register_device_kernels(_unpack_op, "unpack_mask", _run_unpack)
