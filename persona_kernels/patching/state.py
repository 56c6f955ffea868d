"""Which persona a patched model computes: a model-wide default plus per-thread / per-task overrides.

- The **default** (:func:`~persona_kernels.patching.set_persona` outside any ``persona()`` block) is one immutable
  :class:`Selection` stored on the model's :class:`PatchState`; every thread and task sees it.
- An **override** (``persona()``, ``disable_persona()``, ``persona_batch()``) lives in a :mod:`contextvars`
  variable, so it is private to the thread (or asyncio task) that opened the block. Inside a block,
  ``set_persona`` changes that block's override, not the default, and the block restores it on exit.
- A forward reads the selection of its own context when each patched module runs: eagerly in
  ``PersonaLinear.forward``, and in compiled graphs inside the opaque custom op
  ``persona_kernels::persona_linear`` (Dynamo never sees the selection, so switching never recompiles).

Selections name personas by *slot*: a model-wide integer that is never reused, so a selection held by another
thread stays valid when personas are added or removed (each module maps slots to rows of its mask stack).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterator, Mapping, Optional, Union

import torch

from persona_kernels.utils.errors import message

if TYPE_CHECKING:  # pragma: no cover
    from persona_kernels.patching.linear import PersonaLinear


@dataclass(frozen=True)
class Selection:
    """One persona (``name=None``: the base model) with its gamma; ``slot`` is the persona's model-wide id."""

    name: Optional[str]
    gamma: float
    slot: int  # -1 = base
    is_batch: ClassVar[bool] = False


@dataclass(frozen=True, eq=False)
class BatchSelection:
    """One persona per batch row (``persona_batch``): ``slots[i]`` is row i's persona slot (-1: base)."""

    rows: tuple[Optional[str], ...]
    slots: torch.Tensor  # int64 [B] on the CPU
    gammas: Mapping[int, float]  # slot -> gamma
    outer: Selection  # what get_persona reports inside the block
    is_batch: ClassVar[bool] = True
    slot: ClassVar[int] = -2  # never -1, so "slot == -1" alone means the base model


BASE = Selection(None, 0.0, -1)
AnySelection = Union[Selection, BatchSelection]

#: model key -> override, private to the current thread / task.
_OVERRIDES: contextvars.ContextVar[Mapping[int, AnySelection]] = contextvars.ContextVar(
    "persona_kernels_overrides", default={}
)
_REGISTRY: "weakref.WeakValueDictionary[int, PatchState]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


@dataclass(eq=False)
class PatchState:
    """Model-level bookkeeping stored on the patched model (not in its ``state_dict``)."""

    modules: dict[str, "PersonaLinear"]
    personas: list[str]
    default_gamma: float
    backend: str
    slots: dict[str, int] = field(default_factory=dict)  # persona -> slot (never reused)
    num_slots: int = 0
    default: Selection = BASE
    merged: Optional[tuple[str, float]] = None
    merged_saved: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> original gated values
    merged_check: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # module -> (weight _version, digest)
    coverage: dict[str, list[str]] = field(default_factory=dict)  # see patching.coverage()
    key: int = field(default_factory=lambda: next(_KEYS))
    lock: threading.RLock = field(default_factory=threading.RLock)  # model-wide edits (patch, merge, add/remove)

    def __post_init__(self) -> None:
        _REGISTRY[self.key] = self
        for p in self.personas:
            self.new_slot(p)

    def __deepcopy__(self, memo):
        """A copy of a patched model gets its own state: a new key and lock, the same default selection."""
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        for f, value in self.__dict__.items():
            if f not in ("lock", "key"):
                new.__dict__[f] = copy.deepcopy(value, memo)
        new.lock = threading.RLock()
        new.key = next(_KEYS)
        _REGISTRY[new.key] = new
        return new

    # -- personas and slots --------------------------------------------------------------------------
    def new_slot(self, name: str) -> int:
        slot = self.num_slots
        self.num_slots += 1
        self.slots[name] = slot
        return slot

    def select(self, name: Optional[str], gamma: float) -> Selection:
        return BASE if name is None else Selection(name, float(gamma), self.slots[name])

    # -- the current selection -----------------------------------------------------------------------
    def override(self) -> Optional[AnySelection]:
        return _OVERRIDES.get().get(self.key)

    def current(self) -> AnySelection:
        """The selection a forward in this thread / task computes (override, else the default)."""
        sel = _OVERRIDES.get().get(self.key)
        return self.default if sel is None else sel

    def current_single(self) -> Selection:
        """The current single-persona selection (inside ``persona_batch``: the one around the block)."""
        sel = self.current()
        return sel.outer if isinstance(sel, BatchSelection) else sel

    def push(self, sel: AnySelection) -> contextvars.Token:
        overrides = dict(_OVERRIDES.get())
        overrides[self.key] = sel
        return _OVERRIDES.set(overrides)

    @contextlib.contextmanager
    def selected(self, sel: AnySelection) -> Iterator[None]:
        """``sel`` is this model's selection in the current context inside the block; the previous one after."""
        token = self.push(sel)
        try:
            yield
        finally:
            pop(token)

    def replace_override(self, sel: AnySelection) -> None:
        """Change the current block's override (the enclosing block's token still restores what was before)."""
        self.push(sel)


def pop(token: contextvars.Token) -> None:
    _OVERRIDES.reset(token)


def state_for_key(key: int) -> PatchState:
    state = _REGISTRY.get(int(key))
    if state is None:
        raise RuntimeError(message("persona_linear", f"no patched model with key {key} (was it unpatched?)"))
    return state
