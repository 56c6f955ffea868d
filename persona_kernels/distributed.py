"""Exact merge of calibration statistics across ``torch.distributed`` ranks.

Each rank calibrates on its share of the data; :func:`all_reduce_stats` then gathers every rank's
Welford state (counts, means, sums of squared deviations, ...) and merges them **in rank order** with
Chan's parallel formula (:meth:`ActivationStats.merge`). The result is what one process over all the
data would have computed (up to float64 rounding; counts are exact) and is bit-identical on every rank.
"""

from __future__ import annotations

import zlib
from collections.abc import MutableMapping
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["all_reduce_stats"]


def _unique_in_order(stats_dict: MutableMapping[str, Any]) -> list[tuple[str, Any]]:
    """One ``(name, stats)`` per distinct object, by sorted name (rank-independent order)."""
    seen: set[int] = set()
    out = []
    for name in sorted(stats_dict):
        s = stats_dict[name]
        if id(s) not in seen:
            seen.add(id(s))
            out.append((name, s))
    return out


def all_reduce_stats(stats_dict: MutableMapping[str, Any], group: Optional[Any] = None) -> MutableMapping[str, Any]:
    """Merge ``{name: ActivationStats}`` across the ranks of ``group``, in place; returns ``stats_dict``.

    Every rank must hold the same names with the same channel counts (checked; a mismatch raises on every
    rank). Entries that are the same object (shared q/k/v accumulation) are merged once and stay shared.
    The tensors are gathered on the statistics' own devices (CPU for gloo, CUDA for nccl), one
    ``all_gather`` per (device, dtype) bucket, then merged in rank order, so every rank ends with the
    same values. Collective: call it on every rank of ``group``.
    """
    if not isinstance(stats_dict, MutableMapping):
        raise TypeError(
            f"persona_kernels.all_reduce_stats: argument 'stats_dict': expected a dict name -> ActivationStats, "
            f"got {type(stats_dict).__name__}"
        )
    from persona_kernels.stats import ActivationStats

    for name, s in stats_dict.items():
        if not isinstance(s, ActivationStats):
            raise TypeError(
                f"persona_kernels.all_reduce_stats: argument 'stats_dict': entry {name!r} is a "
                f"{type(s).__name__}, expected ActivationStats"
            )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "persona_kernels.all_reduce_stats: torch.distributed is not initialised (call "
            "torch.distributed.init_process_group first)"
        )
    world = dist.get_world_size(group)
    unique = _unique_in_order(stats_dict)
    if world == 1 or not unique:
        return stats_dict

    # Flatten every state tensor into one buffer per (device, dtype); devices are named by their order of
    # first appearance so that ranks on different GPUs (cuda:0 vs cuda:1) line up.
    device_ordinal: dict[torch.device, int] = {}
    buckets: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    filled: dict[tuple[int, torch.dtype], int] = {}
    layout: list[tuple[str, Any, list[tuple[str, tuple[int, ...], tuple[int, torch.dtype], int, int, bool]]]] = []
    signature_parts: list[str] = []
    for name, s in unique:
        state = s.state_dict()
        entries = []
        for key in sorted(state):
            t = state[key]
            if not isinstance(t, torch.Tensor):
                signature_parts.append(f"{name}.{key}={t!r}")
                continue
            ordinal = device_ordinal.setdefault(t.device, len(device_ordinal))
            is_bool = t.dtype == torch.bool
            flat = t.detach().reshape(-1)
            if is_bool:
                flat = flat.to(torch.uint8)
            bucket_key = (ordinal, flat.dtype)
            buckets.setdefault(bucket_key, []).append(flat)
            offset = filled.get(bucket_key, 0)
            filled[bucket_key] = offset + flat.numel()
            entries.append((key, tuple(t.shape), bucket_key, offset, flat.numel(), is_bool))
            signature_parts.append(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}:{ordinal}")
        layout.append((name, s, entries))

    first_device = next(iter(device_ordinal), torch.device("cpu"))
    signature = torch.tensor(
        [len(unique), zlib.crc32(";".join(signature_parts).encode())], dtype=torch.int64, device=first_device
    )
    gathered_sig = [torch.empty_like(signature) for _ in range(world)]
    dist.all_gather(gathered_sig, signature, group=group)
    sigs = torch.stack(gathered_sig).cpu()
    if not bool((sigs == sigs[0]).all()):
        raise ValueError(
            "persona_kernels.all_reduce_stats: argument 'stats_dict': the ranks hold different statistics layouts "
            f"(module names, channel counts or devices differ; per-rank [modules, checksum]: {sigs.tolist()})"
        )

    gathered: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    for bucket_key, parts in buckets.items():
        buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        out = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(out, buf, group=group)
        gathered[bucket_key] = out

    for name, s, entries in layout:
        local = s.state_dict()  # keeps the non-tensor entries
        device = local[entries[0][0]].device if entries else None
        merged = None
        for rank in range(world):
            state = dict(local)
            for key, shape, bucket_key, offset, numel, is_bool in entries:
                t = gathered[bucket_key][rank][offset:offset + numel].reshape(shape)
                state[key] = t.bool() if is_bool else t
            part = type(s)(s.num_channels, device=device)
            part.load_state_dict(state)
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        s.load_state_dict(merged.state_dict())
    return stats_dict
