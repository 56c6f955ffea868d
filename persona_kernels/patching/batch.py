"""``persona_batch``: one persona per batch row in one forward (or ``generate()``)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from persona_kernels.patching.state import BatchSelection
from persona_kernels.utils.errors import check_gamma, message


@contextlib.contextmanager
def persona_batch(
    model: nn.Module,
    personas: Sequence[Optional[str]],
    gamma: Union[None, float, Mapping[str, float]] = None,
) -> Iterator[nn.Module]:
    """Context manager: batch row ``i`` runs with persona ``personas[i]`` (``None``: the base model).

    One forward (or ``generate()``) serves several personas at once: every patched module computes
    :func:`persona_kernels.gated_linear_multi` with a per-row persona index, expanded over the sequence
    positions (the KV cache rows keep their persona since the batch dimension is fixed). The inputs' batch
    size must equal ``len(personas)``. Like :func:`~persona_kernels.patching.persona`, the block applies to the
    current thread / asyncio task only: other threads keep computing their own persona.

    Args:
        personas: one persona name (or None) per batch row.
        gamma: soft gate in [0, 1]: one float for every persona, a dict persona -> float, or None for the
            bank's ``default_gamma``.
    """
    from persona_kernels.patching.api import _state

    state = _state(model, "persona_batch")
    if isinstance(personas, str) or not isinstance(personas, Sequence) or len(personas) == 0:
        raise TypeError(message("persona_batch", f"expected a non-empty list with one persona name (or None) per batch "
                                f"row, got {personas!r}", "personas"))
    unknown = sorted({p for p in personas if p is not None and p not in state.personas}, key=str)
    if unknown:
        raise KeyError(message("persona_batch", f"unknown persona(s) {unknown}; available personas: {state.personas} "
                               "(or None for the base model)", "personas"))
    gammas = {p: state.default_gamma for p in state.personas}
    if isinstance(gamma, Mapping):
        for p, g in gamma.items():
            if p not in state.personas:
                raise KeyError(message("persona_batch", f"unknown persona {p!r}", "gamma"))
            gammas[p] = check_gamma("persona_batch", g)
    elif gamma is not None:
        gammas = dict.fromkeys(state.personas, check_gamma("persona_batch", gamma))
    if state.merged is not None:
        raise RuntimeError(message("persona_batch", f"persona {state.merged[0]!r} is merged into the weights; call "
                                   "persona_kernels.unmerge_persona(model) first"))
    current = state.current()
    if isinstance(current, BatchSelection):
        raise RuntimeError(message("persona_batch", "this thread is already inside a persona_batch block of this model "
                                   "(blocks do not nest; other threads may use their own)"))
    rows = tuple(personas)
    slots = torch.tensor([state.slots[p] if p is not None else -1 for p in rows], dtype=torch.int64)
    sel = BatchSelection(rows, slots, {state.slots[p]: g for p, g in gammas.items()}, outer=current)
    with state.selected(sel):
        yield model
