"""The forward of a patched Linear for whatever persona the calling thread selects.

:func:`persona_forward` is the one implementation, used by ``PersonaLinear.forward`` in eager mode and by the
custom op ``torch.ops.persona_kernels.persona_linear`` in compiled graphs. The op takes only tensors and constants
that never change while personas are switched (the module's mask stack ``[P, N, W]``, its slot -> row table and
the model's integer key); it reads the selection (model default or this thread's override, see
:mod:`persona_kernels.patching.state`) when it runs. Dynamo therefore has nothing to guard on: switching personas
or gamma never recompiles, and two threads running one compiled model each get their own persona.

Paths: base (or a persona without a mask here) -> ``F.linear`` (bit-identical to the unpatched model); one persona
-> the gated kernel; ``persona_batch`` -> :func:`persona_kernels.gated_linear_multi`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from persona_kernels.dispatch import direct_call_ok, get_kernel
from persona_kernels.ops.gated_linear import _run as run_gated
from persona_kernels.ops.gated_linear import gated_grads, gated_linear
from persona_kernels.ops.gated_linear_multi import gated_linear_multi
from persona_kernels.utils.errors import message

__all__ = ["persona_forward", "persona_linear"]


def _gated(x, weight, mask, bias, gamma: float, backend: str) -> torch.Tensor:
    """Gated linear; in inference the kernel runs on the module's inputs as they are (validated at patch time)."""
    if direct_call_ok(x, weight, bias) and x.dtype == weight.dtype and x.device == weight.device and x.dim() >= 1:
        return run_gated(get_kernel("gated_linear", backend, x.device), x, weight, mask, bias, gamma, backend)
    return gated_linear(x, weight, mask, bias, gamma, backend=backend)  # validating, differentiable op


def persona_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    masks: torch.Tensor,
    local: Sequence[int],
    state,
    backend: str,
) -> torch.Tensor:
    """``x`` through the Linear ``(weight, bias)`` gated by the persona ``state`` selects in this thread / task.

    ``masks``: int32 ``[P, N, W]`` stack of this module's persona masks; ``local[slot]``: the row of a persona slot
    in ``masks`` (-1: no mask here, dense). ``state``: the model's :class:`~persona_kernels.patching.state.PatchState`.
    """
    sel = state.current()
    if state.merged is not None:
        if sel.is_batch or (sel.name is not None and (sel.name, sel.gamma) != state.merged):
            wanted = "a persona_batch block" if sel.is_batch else f"persona {sel.name!r} (gamma={sel.gamma})"
            raise RuntimeError(message("PersonaLinear", f"persona {state.merged[0]!r} is merged into the weights, but this "
                                       f"thread selects {wanted}; call unmerge_persona(model) first"))
        return F.linear(x, weight, bias)
    if sel.is_batch:
        return _forward_batch(x, weight, bias, masks, local, sel, backend)
    if sel.slot < 0:
        return F.linear(x, weight, bias)
    row = local[sel.slot]
    if row < 0:
        if state.slots.get(sel.name) != sel.slot:
            raise RuntimeError(message("PersonaLinear", f"persona {sel.name!r} was removed from the model while this "
                                       "thread still selects it"))
        return F.linear(x, weight, bias)
    return _gated(x, weight, masks[row], bias, sel.gamma, backend)


def _forward_batch(x, weight, bias, masks, local, sel, backend) -> torch.Tensor:
    batch = sel.slots.shape[0]
    if x.dim() < 2 or x.shape[0] != batch:
        raise RuntimeError(message(
            "persona_batch", f"the input has batch size {x.shape[0] if x.dim() else 0} (shape {tuple(x.shape)}), but the "
            f"persona_batch block gave {batch} personas (one per batch row); num_beams > 1 or num_return_sequences > 1 "
            "change the batch size: repeat the persona list accordingly"))
    rows = [local[s] if s >= 0 else -1 for s in sel.slots.tolist()]
    if max(rows) < 0:
        return F.linear(x, weight, bias)
    slot_of_row = {r: s for s, r in enumerate(local) if r >= 0}
    gammas = [sel.gammas.get(slot_of_row[r], 0.0) for r in range(masks.shape[0])]
    index = torch.tensor(rows, dtype=torch.int32, device=x.device)
    index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    return gated_linear_multi(x, weight, masks, index, bias, gammas, backend=backend, validate_index=False)


# -- the custom ops (compiled graphs) -----------------------------------------------------------------------
def _selected(state, local: Sequence[int]) -> torch.Tensor:
    """What a forward applied, for its backward: float64 CPU ``[row of masks (-1: dense, -2: batch), gamma]``."""
    sel = state.current()
    if state.merged is not None:
        return torch.tensor([-1.0, 1.0], dtype=torch.float64)
    if sel.is_batch:
        return torch.tensor([-2.0, 0.0], dtype=torch.float64)
    row = local[sel.slot] if sel.slot >= 0 else -1
    return torch.tensor([float(row), sel.gamma if row >= 0 else 1.0], dtype=torch.float64)


@torch.library.custom_op("persona_kernels::persona_linear", mutates_args=())
def _persona_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    masks: torch.Tensor,
    local_index: torch.Tensor,
    model_key: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``persona_forward`` for the model registered under ``model_key`` (``local_index``: int64 [slots + 1], CPU),
    and what it applied (see :func:`_selected`; read by the backward at run time, never traced)."""
    from persona_kernels.patching.state import state_for_key

    state, local = state_for_key(model_key), local_index.tolist()
    out = persona_forward(x, weight, bias, masks, local, state, backend)
    return (out.clone() if out is x else out), _selected(state, local)


@_persona_linear_op.register_fake
def _(x, weight, bias, masks, local_index, model_key, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty(2, dtype=torch.float64, device="cpu")


@torch.library.custom_op("persona_kernels::persona_linear_backward", mutates_args=())
def _persona_linear_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight and bias of the forward that applied ``selected``."""
    from persona_kernels.kernels.torch_ref import gate

    row, gamma = int(selected[0]), float(selected[1])
    if row == -2:
        raise NotImplementedError(message("persona_batch", "backward through a persona_batch block is not supported"))
    g = gate(masks[row], weight.shape[1], gamma) if row >= 0 else torch.ones_like(weight, dtype=torch.float32)
    return gated_grads(grad, x, weight, g, True, True, True)


@_persona_linear_backward_op.register_fake
def _(grad, x, weight, masks, selected):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, masks, local_index, model_key, backend = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, masks, output[1])


def _backward(ctx, grad, _grad_selected):
    x, weight, masks, selected = ctx.saved_tensors
    grad_x, grad_w, grad_b = _persona_linear_backward_op(grad, x, weight, masks, selected)
    need = ctx.needs_input_grad
    return (grad_x if need[0] else None, grad_w if need[1] else None, grad_b if ctx.has_bias and need[2] else None,
            None, None, None, None)


_persona_linear_op.register_autograd(_backward, setup_context=_setup_context)


def persona_linear(*args) -> torch.Tensor:
    """The patched Linear's output for the persona selected when it runs: ``persona_linear(x, weight, bias, masks,
    local_index, model_key, backend)``, the arguments of ``torch.ops.persona_kernels.persona_linear``."""
    return _persona_linear_op(*args)[0]
