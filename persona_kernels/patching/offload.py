"""Models with offloaded weights (accelerate ``cpu_offload`` / ``disk_offload`` / ``device_map`` with "cpu" or
"disk" entries): the weights sit on the ``meta`` device between forwards and an accelerate hook loads them.

A patched Linear that carries such a hook keeps it (moved to the :class:`PersonaLinear`); its masks live on the
hook's execution device. Merging is refused for offloaded weights (nothing to merge into).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def offload_hook(module: nn.Module):
    """accelerate's offload hook on ``module`` itself (weights loaded from a weights map at each forward), or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,))  # SequentialHook holds several
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None and getattr(h, "execution_device", None) is not None:
            return h
    return None


def execution_device(module: nn.Module, fallback: Optional[nn.Module] = None) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device for offloaded weights."""
    device = module.weight.device
    if device.type == "meta":
        hook = offload_hook(module) or (offload_hook(fallback) if fallback is not None else None)
        if hook is not None:
            return torch.device(hook.execution_device)
    return device


def carry_hook(old: nn.Module, new: nn.Module) -> None:
    """Move an accelerate hook (device_map / offload) from the replaced Linear to its PersonaLinear."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def is_offloaded(module: nn.Module) -> bool:
    return module.weight.device.type == "meta"
