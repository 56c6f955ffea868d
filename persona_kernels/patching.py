"""Drop-in persona switching for Hugging Face models.

``patch_model(model, bank)`` replaces the targeted ``nn.Linear`` modules by :class:`PersonaLinear`, which
keeps the very same ``weight`` / ``bias`` Parameters and holds one bit-packed keep-mask per persona as a
non-persistent buffer (so ``model.state_dict()`` is unchanged and the masks follow ``model.to(...)``).

- ``set_persona(model, name, gamma)`` switches in O(1) per module: no weight is touched, nothing is
  allocated. ``name=None`` is the base model, computed with ``F.linear`` exactly as before patching.
- ``persona(model, name)`` / ``disable_persona(model)`` are context managers restoring the previous state.
- ``merge_persona`` bakes a persona into the weights in place (fastest single-persona inference) and keeps
  the pruned values, so ``unmerge_persona`` restores the weights bit-exactly.
- ``unpatch_model`` puts the original ``nn.Linear`` objects back.
- ``torch.compile``: patch first, then compile; a persona switch is picked up through Dynamo's guards
  (one recompilation per distinct persona / gamma, cached afterwards).

Decisions:
- Patching an already patched model raises (use :func:`add_persona` or :func:`unpatch_model` first).
- While a persona is merged, switching to another persona (or the base) raises; call
  :func:`unmerge_persona` first. After unmerging, the merged persona stays active (computed by the
  gated kernel), as PEFT does for adapters.
- A persona with no mask for some patched module leaves that module dense (all weights kept).
- Merging keeps the original values of the gated weights in the model's patch state (not in
  ``state_dict``), so saving a merged model saves the persona; ``unpatch_model(model, keep_merged=True)``
  turns it into a plain single-persona model.
- Models with offloaded weights (accelerate ``cpu_offload`` / ``disk_offload`` / ``device_map`` with "cpu" or
  "disk" entries: weights on the ``meta`` device between forwards) are supported when the Linear itself carries
  accelerate's offload hook: the hook is moved to the PersonaLinear, loads the weights before each forward, and
  the masks live on the hook's execution device. ``merge_persona`` is refused for them (nothing to merge into).
- ``persona_batch(model, ["a", None, "b", ...])`` gives every batch row its own persona (``None``: base)
  through :func:`persona_kernels.gated_linear_multi`; each module stacks the masks of a persona set once
  (cached) and holds a per-row index. The batch size is fixed inside the block, so ``generate()`` works and
  KV-cache rows keep their persona. ``set_persona`` / ``merge_persona`` are refused inside the block.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_kernels.ops.gated_linear import gated_linear
from persona_kernels.ops.gated_linear_multi import gated_linear_multi
from persona_kernels.ops.packing import pack_mask, packed_words, unpack_mask

__all__ = [
    "DEFAULT_TARGET_PATTERN",
    "PersonaLinear",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "set_persona",
    "get_persona",
    "get_gamma",
    "persona",
    "persona_batch",
    "disable_persona",
    "merge_persona",
    "unmerge_persona",
    "add_persona",
    "remove_persona",
    "list_personas",
    "set_backend",
]

DEFAULT_TARGET_PATTERN = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
"""Attention and MLP projections of Llama / Qwen2 / Qwen3 / Mistral decoder layers."""

TargetSpec = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

_STATE_ATTR = "_persona_kernels_state"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _err(fn: str, msg: str) -> str:
    return f"persona_kernels.{fn}: {msg}"


def _check_gamma(fn: str, gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(_err(fn, f"argument 'gamma': expected a float in [0, 1] or None, got {type(gamma).__name__}"))
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(_err(fn, f"argument 'gamma': expected a float in [0, 1], got {gamma}"))
    return float(gamma)


class PersonaLinear(nn.Linear):
    """An ``nn.Linear`` whose forward can apply one of several bit-packed persona masks.

    It shares ``weight`` and ``bias`` with the wrapped ``nn.Linear`` (same Parameter objects, no copy).
    With no active persona the forward is ``F.linear(x, weight, bias)``, bit-identical to the original;
    with one it is ``persona_kernels.gated_linear(x, weight, mask, bias, gamma, backend=backend)``.
    """

    def __init__(self, linear: nn.Linear, backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate new parameters
        if not isinstance(linear, nn.Linear):
            raise TypeError(_err("PersonaLinear", f"argument 'linear': expected an nn.Linear, got {type(linear).__name__}"))
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)  # None stays a registered (empty) parameter slot
        # Kept outside the module tree so that state_dict keys and named_modules stay unchanged.
        object.__setattr__(self, "original", linear)
        self.backend = backend
        self.gamma = 0.0
        self.active: Optional[str] = None  # persona name whose mask is applied, None = plain F.linear
        self._mask_buffers: dict[str, str] = {}  # persona -> buffer name
        self._active_buffer: Optional[str] = None
        self._next_id = 0
        # mixed-persona batches: stacked banks per persona set (cache) and the active (bank, row index, gammas)
        self._stack_cache: dict[tuple[str, ...], tuple[torch.Tensor, dict[str, int]]] = {}
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor, list[float]]] = None

    # -- masks -------------------------------------------------------------------------------------------
    @property
    def personas(self) -> list[str]:
        """Personas with a mask on this module."""
        return list(self._mask_buffers)

    def has_mask(self, name: str) -> bool:
        return name in self._mask_buffers

    def mask(self, name: str) -> torch.Tensor:
        """The packed int32 keep-mask ``[N, ceil(K/32)]`` of persona ``name``."""
        if name not in self._mask_buffers:
            raise KeyError(_err("PersonaLinear.mask", f"no mask for persona {name!r} (has: {self.personas})"))
        return getattr(self, self._mask_buffers[name])

    def mask_device(self) -> torch.device:
        """Where the masks live: the weight's device, or accelerate's execution device for offloaded weights."""
        device = self.weight.device
        if device.type == "meta":
            hook = _offload_hook(self) or _offload_hook(self.original)
            if hook is not None:
                return torch.device(hook.execution_device)
        return device

    def add_mask(self, name: str, packed: torch.Tensor) -> None:
        """Store (or replace) the packed mask of persona ``name`` on this module's weight (execution) device."""
        expected = (self.out_features, packed_words(self.in_features))
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or tuple(packed.shape) != expected:
            got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
            raise ValueError(_err("PersonaLinear.add_mask", f"persona {name!r}: expected an int32 mask of shape {expected}, got {got}"))
        packed = packed.detach().to(self.mask_device()).contiguous()
        if name in self._mask_buffers:
            setattr(self, self._mask_buffers[name], packed)
        else:
            buf = f"persona_mask_{self._next_id}"
            self._next_id += 1
            self.register_buffer(buf, packed, persistent=False)
            self._mask_buffers[name] = buf
        if self.active == name:
            self._active_buffer = self._mask_buffers[name]
        self._stack_cache.clear()

    def remove_mask(self, name: str) -> None:
        buf = self._mask_buffers.pop(name, None)
        if buf is not None:
            delattr(self, buf)
        self._stack_cache.clear()
        if self.active == name:
            self.set_active(None)

    def set_active(self, name: Optional[str], gamma: float = 0.0) -> None:
        """Apply persona ``name`` (None or a persona without a mask here: plain ``F.linear``)."""
        buf = self._mask_buffers.get(name) if name is not None else None
        self.active = name if buf is not None else None
        self._active_buffer = buf
        self.gamma = float(gamma)

    # -- mixed-persona batches -------------------------------------------------------------------------
    _STACK_CACHE_SIZE = 8

    def stacked_bank(self, personas: Iterable[str]) -> tuple[torch.Tensor, dict[str, int]]:
        """The masks of ``personas`` that exist on this module, stacked ``int32 [P, N, W]``, and each persona's
        position. Built once per persona set and device (small LRU cache), not per call."""
        key = tuple(sorted({p for p in personas if p in self._mask_buffers}))
        device = self.mask_device()
        hit = self._stack_cache.pop(key, None)
        if hit is None or hit[0].device != device:
            if key:
                bank = torch.stack([self.mask(p).to(device) for p in key])
            else:
                bank = torch.zeros((0, self.out_features, packed_words(self.in_features)), dtype=torch.int32, device=device)
            hit = (bank, {p: i for i, p in enumerate(key)})
        self._stack_cache[key] = hit  # most recently used last
        while len(self._stack_cache) > self._STACK_CACHE_SIZE:
            self._stack_cache.pop(next(iter(self._stack_cache)))
        return hit

    def set_batch(self, rows: Optional[Sequence[Optional[str]]], gamma: Mapping[str, float] | float = 0.0) -> None:
        """Give batch row ``i`` persona ``rows[i]`` (None: base; a persona without a mask here: dense).
        ``rows=None`` leaves batch mode. ``gamma``: one float or persona -> float."""
        if rows is None:
            self._batch = None
            return
        bank, position = self.stacked_bank(r for r in rows if r is not None)
        index = torch.tensor([position.get(r, -1) if r is not None else -1 for r in rows], dtype=torch.int32)
        order = sorted(position, key=position.get)
        gammas = [float(gamma if isinstance(gamma, (int, float)) else gamma[p]) for p in order]
        self._batch = (bank, index.to(bank.device), gammas)

    # -- forward -----------------------------------------------------------------------------------------
    def _forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        bank, index, gammas = self._batch
        if x.dim() < 2 or x.shape[0] != index.shape[0]:
            raise RuntimeError(
                _err("persona_batch", f"the input has batch size {x.shape[0] if x.dim() else 0} (shape {tuple(x.shape)}), "
                     f"but the persona_batch block gave {index.shape[0]} personas (one per batch row); num_beams > 1 "
                     "or num_return_sequences > 1 change the batch size: repeat the persona list accordingly")
            )
        if bank.shape[0] == 0:
            return F.linear(x, self.weight, self.bias)
        if index.device != x.device:
            index = index.to(x.device)
        rows = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        if bank.device != x.device:
            bank = bank.to(x.device)
        return gated_linear_multi(x, self.weight, bank, rows, self.bias, gammas, backend=self.backend, validate_index=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch is not None:
            return self._forward_batch(x)
        if self._active_buffer is None:
            return F.linear(x, self.weight, self.bias)
        mask = getattr(self, self._active_buffer)
        return gated_linear(x, self.weight, mask, self.bias, self.gamma, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"personas={len(self._mask_buffers)}, active={self.active!r}, gamma={self.gamma}, backend={self.backend!r}"
        )


@dataclass
class _PatchState:
    """Model-level bookkeeping stored on the patched model."""

    modules: dict[str, PersonaLinear]
    personas: list[str]
    default_gamma: float
    backend: str
    active: Optional[str] = None
    gamma: float = 0.0
    merged: Optional[tuple[str, float]] = None
    merged_saved: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> original gated values
    batch: Optional[list[Optional[str]]] = None  # persona per batch row while persona_batch is active


def _offload_hook(module: nn.Module):
    """accelerate's offload hook on ``module`` itself (weights loaded from a weights map at each forward), or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # SequentialHook holds several
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None and getattr(h, "execution_device", None) is not None:
            return h
    return None


def _root(model: nn.Module) -> nn.Module:
    """The underlying module of a ``torch.compile``-d model."""
    return getattr(model, "_orig_mod", model)


def _state(model: nn.Module, fn: str) -> _PatchState:
    if not isinstance(model, nn.Module):
        raise TypeError(_err(fn, f"argument 'model': expected an nn.Module, got {type(model).__name__}"))
    state = _root(model).__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(_err(fn, "the model is not patched; call persona_kernels.patch_model(model, bank) first"))
    return state


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch_model`` was applied to ``model`` (and not undone)."""
    return isinstance(model, nn.Module) and _STATE_ATTR in _root(model).__dict__


def _target_matcher(target_modules: TargetSpec) -> Callable[[str, nn.Module], bool]:
    if target_modules is None:
        target_modules = DEFAULT_TARGET_PATTERN
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, module: pattern.search(name) is not None
    try:
        entries = list(target_modules)
    except TypeError:
        raise TypeError(
            _err("patch_model", "argument 'target_modules': expected None, a regex string, a list of module names / "
                 f"suffixes / regex patterns, or a callable (name, module) -> bool; got {type(target_modules).__name__}")
        ) from None
    if not all(isinstance(e, str) for e in entries):
        raise TypeError(_err("patch_model", "argument 'target_modules': every entry of the list must be a str"))
    compiled = []
    for e in entries:
        try:
            compiled.append(re.compile(e))
        except re.error:
            compiled.append(None)

    def match(name: str, module: nn.Module) -> bool:
        for e, rx in zip(entries, compiled):
            if name == e or name.endswith("." + e) or (rx is not None and rx.fullmatch(name)):
                return True
        return False

    return match


def _format_mismatches(problems: list[str], limit: int = 8) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"\n  {shown}{more}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def patch_model(
    model: nn.Module,
    bank,
    target_modules: TargetSpec = None,
    *,
    backend: str = "auto",
    check_fingerprint: bool = True,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`PersonaLinear` (in place).

    Args:
        model: a Hugging Face causal LM (or any module); a ``torch.compile``-d model is unwrapped.
        bank: a :class:`persona_kernels.bank.MaskBank` whose module names are ``model.named_modules()`` names, or
            the path of an adapter folder / bank file (:meth:`MaskBank.from_pretrained`).
        target_modules: which Linear modules may be patched. None: the q/k/v/o and gate/up/down projections of
            Llama-like decoder layers (:data:`DEFAULT_TARGET_PATTERN`). A str: a regex searched in each module
            name. A list of str: each entry is an exact name, a name suffix (``"q_proj"``), or a regex that must
            match the whole name. A callable ``(name, module) -> bool``. Only targets the bank has masks for are
            patched.
        backend: gated-linear backend used by every patched module (``"auto"``, ``"torch"``, ``"cpu"``, ...).
        check_fingerprint: compare ``bank.fingerprint`` with ``MaskBank.model_fingerprint(model, ...)``.

    Returns:
        ``model`` itself, patched, with the base model active.

    Raises:
        RuntimeError: the model is already patched, has no targetable Linear, or the bank does not fit it.
    """
    root = _root(model)
    if not isinstance(root, nn.Module):
        raise TypeError(_err("patch_model", f"argument 'model': expected an nn.Module, got {type(model).__name__}"))
    if isinstance(bank, (str, os.PathLike)):  # an adapter folder or a bank file
        from persona_kernels.bank import MaskBank

        bank = MaskBank.from_pretrained(bank)
    if is_patched(root):
        raise RuntimeError(
            _err("patch_model", "the model is already patched; add personas with persona_kernels.patching.add_persona "
                 "or call unpatch_model(model) before patching again")
        )
    from persona_kernels.dispatch import BACKENDS

    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(_err("patch_model", f"argument 'backend': expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}"))
    for attr in ("personas", "module_names", "shapes", "get"):
        if not hasattr(bank, attr):
            raise TypeError(_err("patch_model", f"argument 'bank': expected a MaskBank (missing {attr!r}), got {type(bank).__name__}"))

    match = _target_matcher(target_modules)
    modules = dict(root.named_modules())
    targetable = {
        name: m for name, m in modules.items()
        if isinstance(m, nn.Linear) and not isinstance(m, PersonaLinear) and name and match(name, m)
    }
    if not targetable:
        raise RuntimeError(
            _err("patch_model", f"no nn.Linear module of {type(root).__name__} matches target_modules="
                 f"{target_modules if target_modules is not None else DEFAULT_TARGET_PATTERN!r}; pass target_modules "
                 "(a regex, a list of names, or a callable) naming the Linear layers to patch")
        )

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
        raise RuntimeError(_err("patch_model", f"the mask bank does not fit this model ({len(problems)} mismatches):"
                                + _format_mismatches(problems)))
    bank_fp = getattr(bank, "fingerprint", None)
    if check_fingerprint and bank_fp and hasattr(type(bank), "model_fingerprint"):
        model_fp = type(bank).model_fingerprint(root, bank_modules)
        if model_fp != bank_fp:
            raise RuntimeError(
                _err("patch_model", f"the mask bank was built for another model: bank fingerprint {bank_fp!r}, "
                     f"this model {model_fp!r} (pass check_fingerprint=False to patch anyway)")
            )

    selected = [name for name in targetable if name in shapes]
    if not selected:
        raise RuntimeError(
            _err("patch_model", f"the bank has no mask for any of the {len(targetable)} targeted Linear modules "
                 f"(e.g. {next(iter(targetable))!r}); bank modules: {bank_modules[:4]}{' ...' if len(bank_modules) > 4 else ''}")
        )
    for name in selected:
        w = targetable[name].weight
        if w.device.type == "meta" and _offload_hook(targetable[name]) is None:
            raise RuntimeError(_err("patch_model", f"{name}: weight is on the meta device without an accelerate offload hook on "
                                    "this Linear (cpu_offload / disk_offload / dispatch_model attach one); cannot patch it"))
        if w.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(_err("patch_model", f"{name}: weight dtype {w.dtype} is not supported (float32, float16 or bfloat16)"))

    personas = list(bank.personas)
    patched: dict[str, PersonaLinear] = {}
    try:
        for name in selected:
            linear = targetable[name]
            new = PersonaLinear(linear, backend=backend)
            new.train(linear.training)
            for p in personas:
                packed = bank.get(p, name)
                if packed is not None:
                    new.add_mask(p, packed)
            hook = getattr(linear, "_hf_hook", None)
            if hook is not None:  # accelerate (device_map) hook on the Linear itself: carry it over
                from accelerate.hooks import add_hook_to_module

                add_hook_to_module(new, hook)
            _set_submodule(root, name, new)
            patched[name] = new
    except BaseException:
        for name, new in patched.items():
            _set_submodule(root, name, new.original)
        raise
    default_gamma = float(getattr(bank, "default_gamma", 0.0) or 0.0)
    root.__dict__[_STATE_ATTR] = _PatchState(modules=patched, personas=personas, default_gamma=default_gamma, backend=backend)
    return model


def unpatch_model(model: nn.Module, *, keep_merged: bool = False) -> nn.Module:
    """Put the original ``nn.Linear`` objects back (in place) and drop all persona state.

    A merged persona is unmerged first (weights restored bit-exactly) unless ``keep_merged=True``, which
    leaves the persona baked into the plain Linear weights (e.g. to export a single-persona model).
    """
    state = _state(model, "unpatch_model")
    root = _root(model)
    if state.merged is not None and not keep_merged:
        unmerge_persona(model)
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


def _apply(state: _PatchState, name: Optional[str], gamma: float) -> None:
    for module in state.modules.values():
        module.set_active(name, gamma)
    state.active, state.gamma = name, gamma


def set_persona(model: nn.Module, name: Optional[str], gamma: Optional[float] = None) -> nn.Module:
    """Make persona ``name`` active (``None``: the base model). O(1) per module: no weight is touched.

    ``gamma`` (soft gate of pruned weights in [0, 1]) defaults to the bank's ``default_gamma``.
    """
    state = _state(model, "set_persona")
    if state.batch is not None:
        raise RuntimeError(_err("set_persona", "a persona_batch block is active; leave it before switching the model's persona"))
    if name is not None and name not in state.personas:
        raise KeyError(_err("set_persona", f"unknown persona {name!r}; available personas: {state.personas} (or None for the base model)"))
    gamma = state.default_gamma if gamma is None else _check_gamma("set_persona", gamma)
    if name is None:
        gamma = 0.0
    if state.merged is not None:
        if (name, gamma) != state.merged:
            m_name, m_gamma = state.merged
            raise RuntimeError(
                _err("set_persona", f"persona {m_name!r} (gamma={m_gamma}) is merged into the weights; call "
                     f"persona_kernels.unmerge_persona(model) before switching to {name!r} (gamma={gamma})")
            )
        return model  # already what the merged weights compute
    _apply(state, name, gamma)
    return model


def get_persona(model: nn.Module) -> Optional[str]:
    """The active (or merged) persona of a patched model, None for the base model."""
    state = _state(model, "get_persona")
    return state.merged[0] if state.merged is not None else state.active


def get_gamma(model: nn.Module) -> float:
    """The gamma of the active (or merged) persona (0.0 for the base model)."""
    state = _state(model, "get_gamma")
    return state.merged[1] if state.merged is not None else state.gamma


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Change the gated-linear backend of every patched module."""
    from persona_kernels.dispatch import BACKENDS

    state = _state(model, "set_backend")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(_err("set_backend", f"argument 'backend': expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}"))
    for module in state.modules.values():
        module.backend = backend
    state.backend = backend
    return model


@contextlib.contextmanager
def persona(model: nn.Module, name: Optional[str], gamma: Optional[float] = None) -> Iterator[nn.Module]:
    """Context manager: persona ``name`` active inside, previous persona and gamma restored on exit."""
    state = _state(model, "persona")
    previous = (get_persona(model), get_gamma(model))
    set_persona(model, name, gamma)
    try:
        yield model
    finally:
        if state.merged is None:  # a merge inside the block stays (unmerge_persona to undo it)
            prev_name, prev_gamma = previous
            if prev_name is not None and prev_name not in state.personas:  # removed inside the block
                prev_name, prev_gamma = None, 0.0
            _apply(state, prev_name, prev_gamma)


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
    size must equal ``len(personas)``. Each module stacks the masks of the persona set once (cached).

    Args:
        personas: one persona name (or None) per batch row.
        gamma: soft gate in [0, 1]: one float for every persona, a dict persona -> float, or None for the
            bank's ``default_gamma``.
    """
    state = _state(model, "persona_batch")
    if isinstance(personas, str) or not isinstance(personas, Sequence) or len(personas) == 0:
        raise TypeError(_err("persona_batch", f"argument 'personas': expected a non-empty list with one persona name "
                             f"(or None) per batch row, got {personas!r}"))
    unknown = sorted({p for p in personas if p is not None and p not in state.personas}, key=str)
    if unknown:
        raise KeyError(_err("persona_batch", f"argument 'personas': unknown persona(s) {unknown}; available personas: "
                            f"{state.personas} (or None for the base model)"))
    if gamma is None:
        gammas: Union[float, dict[str, float]] = state.default_gamma
    elif isinstance(gamma, Mapping):
        gammas = {p: state.default_gamma for p in state.personas}
        for p, g in gamma.items():
            if p not in state.personas:
                raise KeyError(_err("persona_batch", f"argument 'gamma': unknown persona {p!r}"))
            gammas[p] = _check_gamma("persona_batch", g)
    else:
        gammas = _check_gamma("persona_batch", gamma)
    if state.merged is not None:
        raise RuntimeError(_err("persona_batch", f"persona {state.merged[0]!r} is merged into the weights; call "
                                "persona_kernels.unmerge_persona(model) first"))
    if state.batch is not None:
        raise RuntimeError(_err("persona_batch", "a persona_batch block is already active (blocks do not nest)"))
    rows = list(personas)
    try:
        for module in state.modules.values():
            module.set_batch(rows, gammas)
        state.batch = rows
        yield model
    finally:
        for module in state.modules.values():
            module.set_batch(None)
        state.batch = None


def disable_persona(model: nn.Module):
    """Context manager running the base model inside (like PEFT's ``disable_adapter``)."""
    return persona(model, None)


@torch.no_grad()
def merge_persona(model: nn.Module, name: str, gamma: Optional[float] = None) -> nn.Module:
    """Bake persona ``name`` into the weights in place: ``W <- W * G`` on every patched module.

    The original values of the gated entries are kept (compactly: only those entries, in row-major order
    of the mask), so :func:`unmerge_persona` restores the weights bit-exactly. While merged, every patched
    module runs plain ``F.linear`` on the merged weights.
    """
    state = _state(model, "merge_persona")
    if name not in state.personas:
        raise KeyError(_err("merge_persona", f"unknown persona {name!r}; available personas: {state.personas}"))
    gamma = state.default_gamma if gamma is None else _check_gamma("merge_persona", gamma)
    if state.merged is not None:
        raise RuntimeError(_err("merge_persona", f"persona {state.merged[0]!r} is already merged; call unmerge_persona(model) first"))
    if state.batch is not None:
        raise RuntimeError(_err("merge_persona", "a persona_batch block is active; leave it before merging"))
    offloaded = [n for n, m in state.modules.items() if m.weight.device.type == "meta"]
    if offloaded:
        raise RuntimeError(_err("merge_persona", f"{offloaded[0]}: the weights are offloaded (accelerate, meta device) and "
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
    _apply(state, None, 0.0)  # every module computes F.linear on the merged weights
    state.merged, state.merged_saved = (name, gamma), saved
    return model


@torch.no_grad()
def unmerge_persona(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_persona` bit-exactly; the persona stays active, computed by the gated kernel."""
    state = _state(model, "unmerge_persona")
    if state.merged is None:
        raise RuntimeError(_err("unmerge_persona", "no persona is merged"))
    name, gamma = state.merged
    for mod_name, original in state.merged_saved.items():
        module = state.modules[mod_name]
        pruned = ~unpack_mask(module.mask(name), module.in_features)
        module.weight.data.masked_scatter_(pruned, original.to(module.weight.device, module.weight.dtype))
    state.merged, state.merged_saved = None, {}
    _apply(state, name, gamma)
    return model


def add_persona(
    model: nn.Module, name: str, masks: Mapping[str, torch.Tensor], *, overwrite: bool = False
) -> nn.Module:
    """Add persona ``name`` to a patched model: ``masks`` maps patched module names to packed int32 masks
    ``[N, ceil(K/32)]`` (bool ``[N, K]`` masks are packed). Patched modules without a mask stay dense."""
    state = _state(model, "add_persona")
    if not isinstance(name, str) or not name:
        raise TypeError(_err("add_persona", f"argument 'name': expected a non-empty str, got {name!r}"))
    if name in state.personas and not overwrite:
        raise ValueError(_err("add_persona", f"persona {name!r} already exists (pass overwrite=True to replace it)"))
    if state.merged is not None and state.merged[0] == name:
        raise RuntimeError(_err("add_persona", f"persona {name!r} is merged; call unmerge_persona(model) first"))
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError(_err("add_persona", "argument 'masks': expected a non-empty dict {module name: mask}"))
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
        raise ValueError(_err("add_persona", f"argument 'masks' does not fit the patched model:" + _format_mismatches(problems)))
    for module in state.modules.values():
        module.remove_mask(name)  # overwrite: drop masks not in the new set
    for mod_name, mask in prepared.items():
        state.modules[mod_name].add_mask(name, mask)
    if name not in state.personas:
        state.personas.append(name)
    if state.active == name:
        _apply(state, name, state.gamma)
    return model


def remove_persona(model: nn.Module, name: str) -> nn.Module:
    """Drop persona ``name`` (and its masks) from a patched model. It must not be active or merged."""
    state = _state(model, "remove_persona")
    if name not in state.personas:
        raise KeyError(_err("remove_persona", f"unknown persona {name!r}; available personas: {state.personas}"))
    if get_persona(model) == name:
        raise RuntimeError(_err("remove_persona", f"persona {name!r} is active or merged; switch away (set_persona(model, None)) first"))
    for module in state.modules.values():
        module.remove_mask(name)
    state.personas.remove(name)
    return model
