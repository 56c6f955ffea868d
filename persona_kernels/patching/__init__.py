"""Drop-in persona switching for Hugging Face models.

``patch_model(model, bank)`` replaces the targeted ``nn.Linear`` modules by :class:`PersonaLinear`, which keeps the
very same ``weight`` / ``bias`` Parameters and stacks its personas' bit-packed keep-masks in one non-persistent
buffer (``model.state_dict()`` is unchanged and the masks follow ``model.to(...)``).

- ``set_persona(model, name, gamma)``: the model-wide default persona, O(1), nothing touched or allocated.
  ``name=None`` is the base model, computed with ``F.linear`` exactly as before patching.
- ``persona(model, name)`` / ``disable_persona(model)`` / ``persona_batch(model, rows)``: context managers that
  select for the current thread / asyncio task only (``contextvars``); other threads are never affected.
- ``merge_persona`` bakes a persona into the weights in place and keeps the pruned values, so ``unmerge_persona``
  restores the weights bit-exactly (refused when the weights changed since the merge).
- ``unpatch_model`` puts the original ``nn.Linear`` objects back.
- ``torch.compile``: patch first, then compile. The selection is read inside the custom op
  ``persona_kernels::persona_linear`` when it runs, so switching personas or gamma never recompiles (adding or
  removing a persona does, once), and threads sharing one compiled model each compute their own persona.

Modules: :mod:`.linear` (PersonaLinear), :mod:`.state` (selection, threads), :mod:`.batch` (persona_batch),
:mod:`.merging` (merge / unmerge), :mod:`.offload` (accelerate hooks), :mod:`.api` (everything else).

Decisions:
- Patching an already patched model raises (use :func:`add_persona` or :func:`unpatch_model` first).
- While a persona is merged, switching to another persona (or the base) raises; call :func:`unmerge_persona` first.
  After unmerging, the merged persona stays the default (computed by the gated kernel), as PEFT does for adapters.
- A persona with no mask for some patched module leaves that module dense (all weights kept).
- Models with offloaded weights (accelerate hooks on the Linear itself) are supported: the hook moves to the
  PersonaLinear and the masks live on its execution device. ``merge_persona`` is refused for them.
"""

from persona_kernels.patching import api as _api
from persona_kernels.patching.api import *  # noqa: F401,F403  (the public names are listed once, in api.__all__)
from persona_kernels.patching.batch import persona_batch
from persona_kernels.patching.linear import PersonaLinear
from persona_kernels.patching.offload import offload_hook as _offload_hook

__all__ = [*_api.__all__, "PersonaLinear", "persona_batch"]
