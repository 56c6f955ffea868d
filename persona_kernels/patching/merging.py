"""Merge a persona into the weights in place, and undo it bit-exactly.

``merge_persona`` keeps the original values of the gated entries (only those, in the row-major order of the
mask) so ``unmerge_persona`` restores them. Before restoring, every merged weight is checked against what the
merge left (the tensor's ``_version`` counter and a digest of its content): a weight changed since the merge
(``load_state_dict``, an optimizer step, ``.data`` writes) makes unmerge refuse with a clear error instead of
writing stale values back.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn

from persona_kernels.ops.packing import unpack_mask
from persona_kernels.patching.state import BASE, PatchState
from persona_kernels.utils.errors import check_gamma, message


def weight_digest(weight: torch.Tensor) -> bytes:
    """sha256 of the exact bytes of ``weight`` (on its device: a checksum of every element, then hashed)."""
    w = weight.detach()
    if w.numel() == 0:
        return b""
    flat = w.contiguous().view(-1)
    ints = flat.view(torch.int16) if w.element_size() == 2 else flat.view(torch.int32)
    # position-weighted sums detect any changed element with overwhelming probability at one pass of cost
    pos = torch.arange(1, ints.numel() + 1, device=w.device, dtype=torch.int64)
    vals = ints.to(torch.int64)
    summary = torch.stack([vals.sum(), (vals * pos).sum(), (vals * (pos * pos % 1_000_003)).sum()])
    h = hashlib.sha256(summary.cpu().numpy().tobytes())
    h.update(str((tuple(w.shape), w.dtype)).encode())
    return h.digest()


def _check_unchanged(state: PatchState, fn: str) -> None:
    changed = []
    for mod_name, (version, digest) in state.merged_check.items():
        w = state.modules[mod_name].weight
        if w._version != version or weight_digest(w) != digest:
            changed.append(mod_name)
    if changed:
        name = state.merged[0] if state.merged else "?"
        raise RuntimeError(message(fn, f"the weights of {len(changed)} merged module(s) changed since persona {name!r} was "
                                   f"merged (e.g. {changed[0]!r}: load_state_dict, an optimizer step or an in-place "
                                   "write); restoring the pruned values would write stale weights back. Reload the model "
                                   "(or use unpatch_model(model, keep_merged=True) to keep the current weights)"))


@torch.no_grad()
def merge(state: PatchState, name: str, gamma: Optional[float]) -> None:
    """Bake persona ``name`` into the weights of ``state``'s modules (see :func:`persona_kernels.merge_persona`)."""
    if name not in state.personas:
        raise KeyError(message("merge_persona", f"unknown persona {name!r}; available personas: {state.personas}"))
    gamma = state.default_gamma if gamma is None else check_gamma("merge_persona", gamma)
    if state.merged is not None:
        raise RuntimeError(message("merge_persona", f"persona {state.merged[0]!r} is already merged; call unmerge_persona(model) first"))
    offloaded = [n for n, m in state.modules.items() if m.weight.device.type == "meta"]
    if offloaded:
        raise RuntimeError(message("merge_persona", f"{offloaded[0]}: the weights are offloaded (accelerate, meta device) and "
                                   "cannot be merged; use set_persona (the gated kernel runs after the weights are loaded)"))
    saved: dict[str, torch.Tensor] = {}
    for mod_name, module in state.modules.items():
        if not module.has_mask(name):
            continue
        w = module.weight.data
        pruned = ~unpack_mask(module.mask(name), module.in_features)
        original = w.masked_select(pruned)  # row-major order, the order masked_scatter_ writes back
        saved[mod_name] = original
        if gamma != 1.0:
            w.masked_scatter_(pruned, (original.float() * gamma).to(w.dtype))
    state.merged_check = {n: (state.modules[n].weight._version, weight_digest(state.modules[n].weight)) for n in saved}
    state.default = BASE  # every module computes F.linear on the merged weights
    state.merged, state.merged_saved = (name, gamma), saved


@torch.no_grad()
def unmerge(state: PatchState) -> None:
    """Undo :func:`merge` bit-exactly (refused when a merged weight changed since); the persona stays the default."""
    if state.merged is None:
        raise RuntimeError(message("unmerge_persona", "no persona is merged"))
    _check_unchanged(state, "unmerge_persona")
    name, gamma = state.merged
    for mod_name, original in state.merged_saved.items():
        module: nn.Module = state.modules[mod_name]
        pruned = ~unpack_mask(module.mask(name), module.in_features)
        module.weight.data.masked_scatter_(pruned, original.to(module.weight.device, module.weight.dtype))
    state.merged, state.merged_saved, state.merged_check = None, {}, {}
    state.default = state.select(name, gamma)
