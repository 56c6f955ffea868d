"""The bitmask-gated linear: ``y = x @ (W * G).T + b`` with ``G = m + gamma * (1 - m)``.

``m`` is a bit-packed keep-mask (see :mod:`persona_kernels.ops.packing`). The weights are never
copied or modified. Registered as the custom op ``torch.ops.persona_kernels.gated_linear`` (with a
fake implementation for ``torch.compile`` and a backward for ``x``, ``weight`` and ``bias``).
"""

from __future__ import annotations

from typing import Optional

import torch

from persona_kernels.dispatch import (check_backend, direct_call_ok, get_kernel, reference_kernel,
                                      register_device_kernels)
from persona_kernels.ops.packing import packed_words
from persona_kernels.utils import errors

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_gated_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_mask: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    op: str = "gated_linear",
    mask_name: str = "packed_mask",
) -> None:
    """Check the tensor arguments of a gated linear op: raise a clear error naming ``op`` and the offending
    argument (the mask as ``mask_name``); returns None when everything fits. ``gamma`` and ``backend`` are
    checked by the op itself (:func:`persona_kernels.utils.errors.check_gamma`, :func:`check_backend`)."""
    def fail(arg: str, msg: str, exc=ValueError):
        errors.fail(op, mask_name if arg == "packed_mask" else arg, msg, exc)

    for name, t in (("x", x), ("weight", weight), ("packed_mask", packed_mask)):
        if not isinstance(t, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(t).__name__}", TypeError)
    if weight.dim() != 2:
        fail("weight", f"expected shape [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if weight.dtype not in _FLOAT_DTYPES:
        fail("weight", f"expected dtype float32, float16 or bfloat16, got {weight.dtype}", TypeError)
    if x.dim() < 1:
        fail("x", "expected shape [..., K], got a 0-d tensor")
    if x.shape[-1] != k:
        fail("x", f"last dimension {x.shape[-1]} does not match weight's in_features K={k}")
    if x.dtype != weight.dtype:
        fail("x", f"dtype {x.dtype} does not match weight's dtype {weight.dtype}", TypeError)
    if x.device != weight.device:
        fail("x", f"device {x.device} does not match weight's device {weight.device}")
    if packed_mask.dtype != torch.int32:
        fail("packed_mask", f"expected dtype torch.int32 (use persona_kernels.pack_mask), got {packed_mask.dtype}", TypeError)
    if tuple(packed_mask.shape) != (n, packed_words(k)):
        fail("packed_mask", f"expected shape [N, ceil(K/32)] = [{n}, {packed_words(k)}], got {tuple(packed_mask.shape)}")
    if packed_mask.device != weight.device:
        fail("packed_mask", f"device {packed_mask.device} does not match weight's device {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            fail("bias", f"expected a torch.Tensor or None, got {type(bias).__name__}", TypeError)
        if tuple(bias.shape) != (n,):
            fail("bias", f"expected shape [N] = [{n}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            fail("bias", f"dtype {bias.dtype} does not match weight's dtype {weight.dtype}", TypeError)
        if bias.device != weight.device:
            fail("bias", f"device {bias.device} does not match weight's device {weight.device}")


def run_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], call) -> torch.Tensor:
    """``call(x2)`` on the rows of ``x`` as a contiguous ``[M, K]`` matrix, reshaped to ``x``'s leading shape.
    No rows or K = 0 never reach a kernel: the result is the bias broadcast over the rows (or zeros)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    if x.numel() == 0 or k == 0:
        out = x.new_zeros(*lead, n)
        return out + bias if bias is not None else out
    return call(x.reshape(-1, k).contiguous()).reshape(*lead, n)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _run(kernel, x, weight, packed_mask, bias, gamma, backend):
    w, m, b = weight.contiguous(), packed_mask.contiguous(), _contiguous(bias)
    return run_rows(x, weight, bias, lambda x2: kernel(x2, w, m, b, float(gamma)))


@torch.library.custom_op("persona_kernels::gated_linear", mutates_args=())
def _gated_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_mask: torch.Tensor,
    bias: Optional[torch.Tensor],
    gamma: float,
    backend: str,
) -> torch.Tensor:
    """Devices without a registered kernel: the torch reference (or the ``backend`` override)."""
    return _run(reference_kernel("gated_linear", backend, x.device), x, weight, packed_mask, bias, gamma, backend)


register_device_kernels(_gated_linear_op, "gated_linear", _run)


@_gated_linear_op.register_fake
def _(x, weight, packed_mask, bias, gamma, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, packed_mask, bias, gamma, backend = inputs
    ctx.save_for_backward(x, weight, packed_mask)
    ctx.gamma = gamma
    ctx.has_bias = bias is not None


def gated_grads(grad, x, weight, g, need_x: bool, need_w: bool, need_b: bool):
    """Gradients of ``y = x @ (weight * g).T + b`` for x, weight and bias (None where not needed); fp32 math."""
    k = weight.shape[1]
    grad2 = grad.reshape(-1, grad.shape[-1]).float()
    grad_x = (grad2 @ (weight.float() * g)).to(x.dtype).reshape(x.shape) if need_x else None
    grad_w = ((grad2.t() @ x.reshape(-1, k).float()) * g).to(weight.dtype) if need_w else None
    grad_b = grad2.sum(0).to(weight.dtype) if need_b else None
    return grad_x, grad_w, grad_b


def _backward(ctx, grad):
    from persona_kernels.kernels.torch_ref import gate

    x, weight, packed_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = gate(packed_mask, weight.shape[1], ctx.gamma)
    grad_x, grad_w, grad_b = gated_grads(grad, x, weight, g, need[0], need[1], ctx.has_bias and need[3])
    return grad_x, grad_w, None, grad_b, None, None


_gated_linear_op.register_autograd(_backward, setup_context=_setup_context)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed_mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    gamma: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Bitmask-gated linear layer.

    Args:
        x: ``[..., K]`` input (any leading dims, may be non-contiguous), same dtype and device as ``weight``.
        weight: ``[N, K]`` weight in fp32, fp16 or bf16 (the ``nn.Linear.weight`` layout).
        packed_mask: int32 ``[N, ceil(K/32)]`` keep-mask from :func:`persona_kernels.pack_mask`.
        bias: optional ``[N]`` bias.
        gamma: soft gate in [0, 1] for pruned connections (0 = hard mask, 1 = dense).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``x @ (weight * G).T + bias`` in x's dtype, accumulated in fp32.
    """
    check_gated_linear_args(x, weight, packed_mask, bias)
    errors.check_gamma("gated_linear", gamma)
    check_backend("gated_linear", backend)
    if direct_call_ok(x, weight, packed_mask, bias):  # eager inference: the kernel the op would run
        return _run(get_kernel("gated_linear", backend, x.device), x, weight, packed_mask, bias, gamma, backend)
    if backend != "auto" and not torch.compiler.is_compiling():
        get_kernel("gated_linear", backend, x.device)  # raise now if unavailable, with the backend's message
    return _gated_linear_op(x, weight, packed_mask, bias, float(gamma), backend)
