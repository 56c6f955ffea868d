"""Right padding of token lists: the one helper behind calibration batches, benchmarks and evaluation."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 [B, T] of B token lists, right-padded to the longest (T):
    real tokens keep their positions; the mask is 1 on them and 0 on padding."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        att[r, : len(s)] = 1
    return ids, att
