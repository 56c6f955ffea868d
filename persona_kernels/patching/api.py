"""The public patching API: patch / unpatch, persona selection, merge, add / remove personas."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Iterator, Mapping, Optional

import torch
import torch.nn as nn

from persona_kernels.ops.packing import pack_mask, packed_words
from persona_kernels.patching import merging
from persona_kernels.patching.linear import _FLOAT_DTYPES, PersonaLinear
from persona_kernels.patching.offload import carry_hook, offload_hook
from persona_kernels.patching.state import BatchSelection, PatchState
from persona_kernels.targeting import TargetError, TargetSpec, select_linears
from persona_kernels.utils.errors import check_gamma, message

__all__ = [
    "DEFAULT_TARGET_PATTERN",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "set_persona",
    "get_persona",
    "get_gamma",
    "persona",
    "disable_persona",
    "merge_persona",
    "unmerge_persona",
    "add_persona",
    "remove_persona",
    "list_personas",
    "set_backend",
    "coverage",
]

DEFAULT_TARGET_PATTERN = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
"""Attention and MLP projections of Llama / Qwen2 / Qwen3 / Mistral / Gemma decoder layers (the preset of
:mod:`persona_kernels.targeting` as one regex)."""

_STATE_ATTR = "_persona_kernels_state"


def _root(model: nn.Module) -> nn.Module:
    """The underlying module of a ``torch.compile``-d model."""
    return getattr(model, "_orig_mod", model)


def _state(model: nn.Module, fn: str) -> PatchState:
    if not isinstance(model, nn.Module):
        raise TypeError(message(fn, f"expected an nn.Module, got {type(model).__name__}", "model"))
    state = _root(model).__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(message(fn, "the model is not patched; call persona_kernels.patch_model(model, bank) first"))
    return state


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch_model`` was applied to ``model`` (and not undone)."""
    return isinstance(model, nn.Module) and _STATE_ATTR in _root(model).__dict__


def _format_mismatches(problems: list[str], limit: int = 8) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"\n  {shown}{more}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _kind(name: str) -> str:
    """A module name with its layer numbers replaced by ``*`` (``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _check_bank_fits(root: nn.Module, bank, modules: dict, check_fingerprint: bool) -> None:
    bank_modules = list(bank.module_names)
    shapes = dict(bank.shapes)
    problems: list[str] = []
    for name in bank_modules:
        m = modules.get(name)
        if m is None:
            problems.append(f"{name}: in the bank but not found in the model")
        elif not isinstance(m, nn.Linear):
            problems.append(f"{name}: in the bank but is a {type(m).__name__} in the model, not an nn.Linear")
        elif tuple(shapes[name]) != (m.out_features, m.in_features):
            problems.append(f"{name}: bank shape (N, K) = {tuple(shapes[name])}, model weight shape {(m.out_features, m.in_features)}")
    if problems:
        raise RuntimeError(message("patch_model", f"the mask bank does not fit this model ({len(problems)} mismatches):"
                                   + _format_mismatches(problems)))
    if not check_fingerprint:
        return
    bank_fp = getattr(bank, "fingerprint", None)
    if bank_fp and hasattr(type(bank), "model_fingerprint"):
        model_fp = type(bank).model_fingerprint(root, bank_modules)
        if model_fp != bank_fp:
            raise RuntimeError(message("patch_model", f"the mask bank was built for another model: bank fingerprint "
                                       f"{bank_fp!r}, this model {model_fp!r} (pass check_fingerprint=False to patch anyway)"))
    check = getattr(bank, "check_weights", None)
    if callable(check):
        problem = check(root)
        if problem:
            raise RuntimeError(message("patch_model", f"the mask bank was built for other weights: {problem} (a different "
                                       "checkpoint of this architecture?); pass check_fingerprint=False to patch anyway"))
        if getattr(bank, "weight_sample", None) is None and getattr(bank, "saved_with", None) is not None:
            warnings.warn(message("patch_model", "the mask bank records no weight digest (saved by an older version), so "
                                  "it cannot be checked against this checkpoint's weights; re-save it to add one"),
                          stacklevel=3)


def patch_model(
    model: nn.Module,
    bank,
    target_modules: TargetSpec = None,
    *,
    backend: str = "auto",
    check_fingerprint: bool = True,
    allow_partial: bool = False,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`PersonaLinear` (in place).

    Args:
        model: a Hugging Face causal LM (or any module); a ``torch.compile``-d model is unwrapped.
        bank: a :class:`persona_kernels.bank.MaskBank` whose module names are ``model.named_modules()`` names, or
            the path of an adapter folder / bank file (:meth:`MaskBank.from_pretrained`).
        target_modules: which Linear modules may be patched, in the grammar of :mod:`persona_kernels.targeting`
            (None: the architecture's preset, the same default as calibration). Only targets the bank has masks
            for are patched.
        backend: gated-linear backend used by every patched module (``"auto"``, ``"torch"``, ``"cpu"``, ...).
        check_fingerprint: refuse a bank built for another model: module names and shapes
            (``bank.fingerprint``) and, for banks that record one, a digest of sampled weight values.
        allow_partial: patch even when the bank covers only some of the targeted modules of a kind it masks
            (e.g. 5 of a model's 7 layers); the others stay dense. See :func:`coverage`.

    Returns:
        ``model`` itself, patched, with the base model active.

    Raises:
        RuntimeError: the model is already patched, has no targetable Linear, or the bank does not fit it.
    """
    root = _root(model)
    if not isinstance(root, nn.Module):
        raise TypeError(message("patch_model", f"expected an nn.Module, got {type(model).__name__}", "model"))
    if is_patched(root):
        raise RuntimeError(message("patch_model", "the model is already patched; add personas with "
                                   "persona_kernels.patching.add_persona or call unpatch_model(model) before patching again"))
    from persona_kernels.dispatch import check_backend

    check_backend("patch_model", backend)
    if isinstance(bank, (str, os.PathLike)):  # an adapter folder or a bank file
        from persona_kernels.bank import MaskBank

        bank = MaskBank.from_pretrained(bank)
    for attr in ("personas", "module_names", "shapes", "get"):
        if not hasattr(bank, attr):
            raise TypeError(message("patch_model", f"expected a MaskBank (missing {attr!r}), got {type(bank).__name__}", "bank"))
    try:
        targetable = dict(select_linears(root, target_modules, fn="patch_model", exclude=(PersonaLinear,)))
    except TargetError as exc:
        raise TargetError(f"{exc}; pass target_modules (names, globs, 're:' regexes or a callable) naming the Linear "
                          "layers to patch") from None
    modules = dict(root.named_modules())
    _check_bank_fits(root, bank, modules, check_fingerprint)
    shapes = dict(bank.shapes)
    selected = [name for name in targetable if name in shapes]
    if not selected:
        raise RuntimeError(message("patch_model", f"the bank has no mask for any of the {len(targetable)} targeted Linear "
                                   f"modules (e.g. {next(iter(targetable))!r}); bank modules: {list(shapes)[:4]}"
                                   f"{' ...' if len(shapes) > 4 else ''}"))
    kinds = {_kind(n) for n in shapes}
    uncovered = [n for n in targetable if n not in shapes and _kind(n) in kinds]
    if uncovered and not allow_partial:
        raise RuntimeError(message("patch_model", f"the mask bank covers {len(selected)} of the {len(selected) + len(uncovered)} "
                                   f"targeted modules of the kinds it masks; {len(uncovered)} would stay dense (e.g. "
                                   f"{uncovered[0]!r}: a bank built for a smaller model?). Pass allow_partial=True to patch "
                                   "anyway"))
    for name in selected:
        w = targetable[name].weight
        if w.device.type == "meta" and offload_hook(targetable[name]) is None:
            raise RuntimeError(message("patch_model", f"{name}: weight is on the meta device without an accelerate offload "
                                       "hook on this Linear (cpu_offload / disk_offload / dispatch_model attach one); cannot patch it"))
        if w.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(message("patch_model", f"{name}: weight dtype {w.dtype} is not supported (float32, float16 or bfloat16)"))

    default_gamma = check_gamma("patch_model", float(getattr(bank, "default_gamma", 0.0) or 0.0), arg="bank.default_gamma")
    personas = list(bank.personas)
    state = PatchState(modules={}, personas=personas, default_gamma=default_gamma, backend=backend)
    state.coverage = {"targeted": list(targetable), "patched": list(selected), "dense": uncovered,
                      "bank_only": [n for n in shapes if n not in targetable]}
    patched: dict[str, PersonaLinear] = {}
    try:
        for name in selected:
            linear = targetable[name]
            new = PersonaLinear(linear, state, backend=backend)
            new.train(linear.training)
            masks = {p: m for p in personas if (m := bank.get(p, name)) is not None}
            new.set_masks(masks)
            carry_hook(linear, new)
            _set_submodule(root, name, new)
            patched[name] = new
    except BaseException:
        for name, new in patched.items():
            _set_submodule(root, name, new.original)
        raise
    state.modules = patched
    root.__dict__[_STATE_ATTR] = state
    return model


def coverage(model: nn.Module) -> dict[str, list[str]]:
    """Which modules ``patch_model`` targeted and covered: ``{"targeted", "patched", "dense" (targeted, of a kind
    the bank masks, but absent from it), "bank_only" (in the bank, not targeted)}``."""
    return {k: list(v) for k, v in _state(model, "coverage").coverage.items()}


def unpatch_model(model: nn.Module, *, keep_merged: bool = False) -> nn.Module:
    """Put the original ``nn.Linear`` objects back (in place) and drop all persona state.

    A merged persona is unmerged first (weights restored bit-exactly; refused when they changed since the merge)
    unless ``keep_merged=True``, which leaves the current weights (e.g. to export a single-persona model).
    """
    state = _state(model, "unpatch_model")
    root = _root(model)
    with state.lock:
        if state.merged is not None and not keep_merged:
            merging.unmerge(state)
        for name, module in state.modules.items():
            original = module.original
            # .to() may have swapped the Parameter objects (torch.__future__ swap settings): hand back the current ones.
            if original.weight is not module.weight:
                original.weight = module.weight
            if original.bias is not module.bias:
                original.bias = module.bias
            original.train(module.training)
            _set_submodule(root, name, original)
        del root.__dict__[_STATE_ATTR]
    return model


def list_personas(model: nn.Module) -> list[str]:
    """Personas available on a patched model."""
    return list(_state(model, "list_personas").personas)


def _selection(state: PatchState, fn: str, name: Optional[str], gamma: Optional[float]):
    if isinstance(state.override(), BatchSelection):
        raise RuntimeError(message(fn, "a persona_batch block is active; leave it before switching the model's persona"))
    if name is not None and name not in state.personas:
        raise KeyError(message(fn, f"unknown persona {name!r}; available personas: {state.personas} (or None for the base model)"))
    gamma = state.default_gamma if gamma is None else check_gamma(fn, gamma)
    sel = state.select(name, gamma)
    if state.merged is not None and (sel.name, sel.gamma) != state.merged:
        m_name, m_gamma = state.merged
        raise RuntimeError(message(fn, f"persona {m_name!r} (gamma={m_gamma}) is merged into the weights; call "
                                   f"persona_kernels.unmerge_persona(model) before switching to {name!r} (gamma={sel.gamma})"))
    return sel


def set_persona(model: nn.Module, name: Optional[str], gamma: Optional[float] = None) -> nn.Module:
    """Select persona ``name`` (``None``: the base model). O(1): no weight or buffer is touched.

    Outside a :func:`persona` block this sets the model-wide default that every thread and task computes unless
    it opened its own block; call it when no forward is running (a forward running in another thread at the same
    moment may see the switch part-way). Inside a :func:`persona` block it changes that block's selection only,
    and the block restores the previous one on exit. ``gamma`` (soft gate of pruned weights in [0, 1]) defaults
    to the bank's ``default_gamma``.
    """
    state = _state(model, "set_persona")
    sel = _selection(state, "set_persona", name, gamma)
    if state.merged is not None:
        return model  # already what the merged weights compute
    if state.override() is not None:
        state.replace_override(sel)
    else:
        state.default = sel
    return model


def get_persona(model: nn.Module) -> Optional[str]:
    """The persona the current thread / task computes (or the merged one); None for the base model."""
    state = _state(model, "get_persona")
    return state.merged[0] if state.merged is not None else state.current_single().name


def get_gamma(model: nn.Module) -> float:
    """The gamma of :func:`get_persona`'s persona (0.0 for the base model)."""
    state = _state(model, "get_gamma")
    return state.merged[1] if state.merged is not None else state.current_single().gamma


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Change the gated-linear backend of every patched module."""
    from persona_kernels.dispatch import check_backend

    state = _state(model, "set_backend")
    check_backend("set_backend", backend)
    for module in state.modules.values():
        module.backend = backend
    state.backend = backend
    return model


@contextlib.contextmanager
def persona(model: nn.Module, name: Optional[str], gamma: Optional[float] = None) -> Iterator[nn.Module]:
    """Context manager: persona ``name`` inside, for the current thread / asyncio task only.

    Other threads keep computing their own selection (the model-wide default of :func:`set_persona`, or their
    own block), also when the model is ``torch.compile``-d. The previous selection is restored on exit.
    """
    state = _state(model, "persona")
    sel = _selection(state, "persona", name, gamma)
    if state.merged is not None:  # the merged weights already compute it
        yield model
        return
    with state.selected(sel):
        yield model


def disable_persona(model: nn.Module):
    """Context manager running the base model inside (like PEFT's ``disable_adapter``), for this thread only."""
    return persona(model, None)


def merge_persona(model: nn.Module, name: str, gamma: Optional[float] = None) -> nn.Module:
    """Bake persona ``name`` into the weights in place: ``W <- W * G`` on every patched module.

    The original values of the gated entries are kept (compactly), so :func:`unmerge_persona` restores the
    weights bit-exactly. While merged, every patched module runs plain ``F.linear`` on the merged weights and
    switching to another persona raises (in every thread). A model-wide change: not while other threads run
    forwards.
    """
    state = _state(model, "merge_persona")
    if isinstance(state.override(), BatchSelection):
        raise RuntimeError(message("merge_persona", "a persona_batch block is active; leave it before merging"))
    with state.lock:
        merging.merge(state, name, gamma)
    return model


def unmerge_persona(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_persona` bit-exactly; the persona stays selected (model-wide), computed by the gated kernel.

    Refused (RuntimeError) when a merged weight changed since the merge, instead of writing stale values back.
    """
    state = _state(model, "unmerge_persona")
    with state.lock:
        merging.unmerge(state)
    return model


def add_persona(
    model: nn.Module, name: str, masks: Mapping[str, torch.Tensor], *, overwrite: bool = False
) -> nn.Module:
    """Add persona ``name`` to a patched model: ``masks`` maps patched module names to packed int32 masks
    ``[N, ceil(K/32)]`` (bool ``[N, K]`` masks are packed). Patched modules without a mask stay dense.

    With ``overwrite=True`` an existing persona is replaced whole (its masks on modules absent from ``masks``
    are dropped), like :meth:`persona_kernels.bank.MaskBank.add`. Adding a persona changes the masks' buffer
    shapes, so a compiled model recompiles once.
    """
    from persona_kernels.bank import check_persona_name

    state = _state(model, "add_persona")
    check_persona_name("add_persona", name)
    if name in state.personas and not overwrite:
        raise ValueError(message("add_persona", f"persona {name!r} already exists (pass overwrite=True to replace it)"))
    if state.merged is not None and state.merged[0] == name:
        raise RuntimeError(message("add_persona", f"persona {name!r} is merged; call unmerge_persona(model) first"))
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(message("add_persona", "expected a non-empty dict {module name: mask}", "masks"))
    prepared: dict[str, torch.Tensor] = {}
    problems = []
    for mod_name, mask in masks.items():
        module = state.modules.get(mod_name)
        if module is None:
            problems.append(f"{mod_name}: not a patched module")
            continue
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            if tuple(mask.shape) != (module.out_features, module.in_features):
                problems.append(f"{mod_name}: bool mask shape {tuple(mask.shape)}, expected {(module.out_features, module.in_features)}")
                continue
            mask = pack_mask(mask)
        expected = (module.out_features, packed_words(module.in_features))
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int32 or tuple(mask.shape) != expected:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            problems.append(f"{mod_name}: expected int32 {expected} or bool {(module.out_features, module.in_features)}, got {got}")
            continue
        prepared[mod_name] = mask
    if problems:
        raise ValueError(message("add_persona", "does not fit the patched model:" + _format_mismatches(problems), "masks"))
    with state.lock:
        if name not in state.personas:
            state.personas.append(name)
            state.new_slot(name)
        for mod_name, module in state.modules.items():
            if mod_name in prepared:
                module.set_masks({name: prepared[mod_name]})
            else:
                module.remove_mask(name)  # overwrite: drop masks not in the new set
            module._refresh_slots()
    return model


def remove_persona(model: nn.Module, name: str) -> nn.Module:
    """Drop persona ``name`` (and its masks) from a patched model. It must not be selected (in this thread or as
    the model-wide default) or merged."""
    state = _state(model, "remove_persona")
    if name not in state.personas:
        raise KeyError(message("remove_persona", f"unknown persona {name!r}; available personas: {state.personas}"))
    if get_persona(model) == name or state.default.name == name:
        raise RuntimeError(message("remove_persona", f"persona {name!r} is active or merged; switch away "
                                   "(set_persona(model, None)) first"))
    with state.lock:
        for module in state.modules.values():
            module.remove_mask(name)
        state.personas.remove(name)
        del state.slots[name]
    return model
