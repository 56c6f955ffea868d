"""Where a model lives: the one helper every module uses to find its embeddings and to place inputs."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn


def model_embedding(model: nn.Module, which: Literal["input", "output"]) -> Optional[nn.Module]:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None when the model has none."""
    get = getattr(model, f"get_{which}_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def model_device(model: nn.Module) -> torch.device:
    """The device inputs should be sent to: the input embedding's device (for an accelerate-offloaded embedding,
    its hook's execution device), else the first non-meta parameter's, else CPU."""
    weight = getattr(model_embedding(model, "input"), "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.device.type != "meta":
            return weight.device
        from persona_kernels.patching.offload import offload_hook

        hook = offload_hook(model_embedding(model, "input"))
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
