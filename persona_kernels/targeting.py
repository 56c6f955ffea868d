"""Which ``nn.Linear`` modules get persona masks: one grammar and one default for calibration and patching.

Grammar of ``target_modules``:

- ``None``: the architecture's preset (:data:`PRESETS`, keyed by ``model.config.model_type``), else every
  ``nn.Linear`` except the output head (``lm_head`` / ``model.get_output_embeddings()``);
- a string, or a list of strings / compiled regexes; a string selects a Linear whose full name
  - equals it, or ends with ``"." + it`` (``"q_proj"``),
  - matches it as a glob over the whole name (``"*.mlp.*"``),
  - with the prefix ``re:``, contains a match of the regex (``"re:layers\\.[01]\\."``);
  a string that is none of these but a valid regex is read as one (``re:`` implied; kept for older code).
  A compiled regex selects the names it ``search``-es. Every entry must select at least one Linear;
- a callable ``(name, module) -> bool`` applied to every ``nn.Linear``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Optional, Sequence, Union

import torch.nn as nn

from persona_kernels.utils.devices import model_embedding
from persona_kernels.utils.errors import message

__all__ = ["PRESETS", "TargetSpec", "TargetError", "select_linears", "preset_for", "is_output_head", "DECODER_PROJECTIONS"]

TargetSpec = Union[None, str, "re.Pattern[str]", Iterable[Union[str, "re.Pattern[str]"]], Callable[[str, nn.Module], bool]]

#: The attention and MLP projections of a decoder layer (globs over the full module name).
DECODER_PROJECTIONS: tuple[str, ...] = (
    "*layers.*.self_attn.q_proj", "*layers.*.self_attn.k_proj", "*layers.*.self_attn.v_proj",
    "*layers.*.self_attn.o_proj", "*layers.*.mlp.gate_proj", "*layers.*.mlp.up_proj", "*layers.*.mlp.down_proj",
)

#: ``model.config.model_type`` -> the default targets of that architecture (the LM head is never targeted).
PRESETS: dict[str, tuple[str, ...]] = {
    arch: DECODER_PROJECTIONS for arch in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")
}


class TargetError(ValueError, RuntimeError):
    """``target_modules`` selects nothing (a ValueError for calibration's callers, a RuntimeError for patching's)."""


def preset_for(model: nn.Module) -> Optional[tuple[str, ...]]:
    """The preset of ``model``'s architecture, or None (then every Linear but the output head is the default)."""
    config = getattr(model, "config", None)
    return PRESETS.get(getattr(config, "model_type", None))


def is_output_head(name: str, module: nn.Module, head: Optional[nn.Module]) -> bool:
    """Whether ``module`` is the LM head (``head``: ``model.get_output_embeddings()``, or None)."""
    return module is head or name == "lm_head" or name.endswith(".lm_head")


def _entry_matcher(item: Union[str, "re.Pattern[str]"]) -> Callable[[str], bool]:
    if isinstance(item, re.Pattern):
        return lambda name: item.search(name) is not None
    if item.startswith("re:"):
        try:
            rx = re.compile(item[3:])
        except re.error as exc:
            raise ValueError(message("targeting", f"{item!r} is not a valid regex: {exc}", "target_modules")) from None
        return lambda name: rx.search(name) is not None
    legacy = None
    if any(c in item for c in "\\$^|()+{"):  # regex syntax that no name or glob uses: an older regex spec
        try:
            legacy = re.compile(item)
        except re.error:
            legacy = None

    def match(name: str) -> bool:
        if name == item or name.endswith("." + item) or fnmatch.fnmatchcase(name, item):
            return True
        return legacy is not None and legacy.search(name) is not None

    return match


def select_linears(model: nn.Module, target_modules: TargetSpec = None, *, fn: str = "collect_stats",
                   exclude: Sequence[type] = ()) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of the ``nn.Linear`` modules ``target_modules`` selects, in model order.

    ``fn`` names the public function in error messages; modules of a type in ``exclude`` are never selected.
    Raises :class:`TargetError` when an entry (or the whole spec) selects no Linear, TypeError for a bad spec.
    """
    linears = [(n, m) for n, m in model.named_modules()
               if n and isinstance(m, nn.Linear) and not isinstance(m, tuple(exclude))]
    if not linears:
        raise TargetError(message(fn, f"{type(model).__name__} contains no nn.Linear module", "model"))
    if target_modules is None:
        preset = preset_for(model)
        if preset is not None:
            return [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, g) for g in preset)]
        head = model_embedding(model, "output")
        return [(n, m) for n, m in linears if not is_output_head(n, m, head)]
    if callable(target_modules) and not isinstance(target_modules, re.Pattern):
        selected = [(n, m) for n, m in linears if target_modules(n, m)]
    else:
        items = [target_modules] if isinstance(target_modules, (str, re.Pattern)) else target_modules
        try:
            items = list(items)
        except TypeError:
            items = None
        if not items or not all(isinstance(i, (str, re.Pattern)) for i in items):
            raise TypeError(message(fn, "expected None, a string, a list of names / glob / 're:' regex patterns, or a "
                                    f"callable (name, module) -> bool; got {target_modules!r}", "target_modules"))
        chosen: set[str] = set()
        for item in items:
            match = _entry_matcher(item)
            hits = [n for n, _ in linears if match(n)]
            if not hits:
                shown = ", ".join(n for n, _ in linears[:6]) + (", ..." if len(linears) > 6 else "")
                raise TargetError(message(fn, f"{getattr(item, 'pattern', item)!r} matches no nn.Linear of the model "
                                          f"(names look like: {shown})", "target_modules"))
            chosen.update(hits)
        selected = [(n, m) for n, m in linears if n in chosen]
    if not selected:
        raise TargetError(message(fn, f"{target_modules!r} selects no nn.Linear of the model ({len(linears)} Linear "
                                  f"modules, e.g. {linears[0][0]!r})", "target_modules"))
    return selected
