"""PersonaLinear: an ``nn.Linear`` holding its personas' packed masks, computing whatever persona is selected."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_kernels.ops.packing import packed_words
from persona_kernels.ops.persona_linear import persona_forward, persona_linear
from persona_kernels.patching.offload import execution_device
from persona_kernels.patching.state import _OVERRIDES, BatchSelection, PatchState
from persona_kernels.utils.errors import fail

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PersonaLinear(nn.Linear):
    """An ``nn.Linear`` whose forward applies the bit-packed mask of the persona its model selects.

    It shares ``weight`` and ``bias`` with the wrapped ``nn.Linear`` (same Parameter objects, no copy). Its
    personas' masks are stacked in one non-persistent buffer ``persona_masks`` int32 ``[P, N, ceil(K/32)]``
    (``state_dict`` unchanged; the masks follow ``model.to(...)``). ``persona_slots`` (int64, CPU) maps the
    model's persona slots to rows of that stack (-1: no mask here, dense). Which persona runs is read from the
    model's :class:`~persona_kernels.patching.state.PatchState` at each forward (see that module): the base model
    is ``F.linear(x, weight, bias)``, bit-identical to the original.
    """

    def __init__(self, linear: nn.Linear, state: PatchState, backend: str = "auto") -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate new parameters
        if not isinstance(linear, nn.Linear):
            fail("PersonaLinear", "linear", f"expected an nn.Linear, got {type(linear).__name__}", TypeError)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)  # None stays a registered (empty) parameter slot
        # Kept outside the module tree so that state_dict keys and named_modules stay unchanged.
        object.__setattr__(self, "original", linear)
        object.__setattr__(self, "_state", state)
        self.backend = backend
        self._rows: dict[str, int] = {}  # persona -> row of persona_masks
        self._local: list[int] = []  # slot -> row (-1: none)
        device = execution_device(linear)
        shape = (0, self.out_features, packed_words(self.in_features))
        self.register_buffer("persona_masks", torch.zeros(shape, dtype=torch.int32, device=device), persistent=False)
        self._refresh_slots()

    # -- masks -------------------------------------------------------------------------------------------
    @property
    def personas(self) -> list[str]:
        """Personas with a mask on this module."""
        return list(self._rows)

    def has_mask(self, name: str) -> bool:
        return name in self._rows

    def mask(self, name: str) -> torch.Tensor:
        """The packed int32 keep-mask ``[N, ceil(K/32)]`` of persona ``name`` (a view into the stack)."""
        if name not in self._rows:
            raise KeyError(f"persona_kernels.PersonaLinear.mask: no mask for persona {name!r} (has: {self.personas})")
        return self.persona_masks[self._rows[name]]

    def mask_device(self) -> torch.device:
        """Where the masks live: the weight's device, or accelerate's execution device for offloaded weights."""
        return execution_device(self, self.original)

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace masks by ``{persona: packed int32 [N, ceil(K/32)]}`` in one stack (masks of other personas kept).
        Validated by the caller (``patch_model`` / ``add_persona``)."""
        stack = {p: self.persona_masks[r] for p, r in self._rows.items() if p not in masks}
        device = self.mask_device()
        stack.update({p: m.detach().to(device) for p, m in masks.items()})
        self._store(stack)

    def remove_mask(self, name: str) -> None:
        if name in self._rows:
            self._store({p: self.persona_masks[r] for p, r in self._rows.items() if p != name})

    def _store(self, stack: dict[str, torch.Tensor]) -> None:
        if stack:
            self.persona_masks = torch.stack(list(stack.values())).contiguous()
        else:
            self.persona_masks = self.persona_masks.new_zeros((0, *self.persona_masks.shape[1:]))
        self._rows = {p: i for i, p in enumerate(stack)}
        self._refresh_slots()

    def _refresh_slots(self) -> None:
        """Rebuild the slot -> row table from the model's slots (after personas were added or removed)."""
        local = [-1] * self._state.num_slots
        for p, r in self._rows.items():
            local[self._state.slots[p]] = r
        self._local = local
        # a CPU table read by the compiled op; kept out of .to() so that reading it never syncs a GPU
        object.__setattr__(self, "persona_slots", torch.tensor(local + [-1], dtype=torch.int64))

    # -- what this module computes in the current thread --------------------------------------------------
    @property
    def active(self) -> Optional[str]:
        """The persona whose mask this module applies in the current thread / task (None: plain ``F.linear``)."""
        sel = self._state.current()
        if self._state.merged is not None or isinstance(sel, BatchSelection) or sel.name not in self._rows:
            return None
        return sel.name

    @property
    def gamma(self) -> float:
        """The gamma this module applies in the current thread / task (0.0 when it runs ``F.linear``)."""
        return self._state.current().gamma if self.active is not None else 0.0

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return persona_linear(x, self.weight, self.bias, self.persona_masks, self.persona_slots,
                                  self._state.key, self.backend)
        state = self._state
        if state.merged is None and _OVERRIDES.get().get(state.key, state.default).slot == -1:
            return F.linear(x, self.weight, self.bias)  # the base model: the fast path, bit-identical
        return persona_forward(x, self.weight, self.bias, self.persona_masks, self._local, state, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"personas={len(self._rows)}, backend={self.backend!r}"
        )
