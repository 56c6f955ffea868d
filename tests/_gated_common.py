"""Shared by the gated_linear and gated_linear_multi tests: backends, dtype tolerances, checks."""

from __future__ import annotations

import math

import pytest
import torch

from persona_kernels import dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = list(dict.fromkeys(
    dispatch.available_backends("cpu") + (["triton"] if dispatch.is_available("triton", "cpu") else [])
))
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # triton runs through its (slow) interpreter here

# Output rounding (relative) and accumulation error (absolute, times sqrt(K)) allowed per dtype.
# bf16/fp16 may round gamma * w to the weight dtype before a half-precision GEMM: covered by ATOL.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def assert_close(y, ref, dtype, k):
    """``y`` (dtype) against the float64 ``ref`` within ATOL * sqrt(K) + RTOL * |ref|."""
    assert y.dtype == dtype and y.shape == ref.shape
    if ref.numel() == 0:
        return
    err = (y.double() - ref).abs()
    bound = ATOL[dtype] * math.sqrt(max(k, 1)) + RTOL[dtype] * ref.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the {dtype} tolerance (by {worst:.3g})"


def assert_error_names_argument(op, args: dict, change, exc, arg: str) -> None:
    """``op(**args)`` after ``change(args)`` raises ``exc`` naming ``arg``."""
    change(args)
    with pytest.raises(exc, match=f"argument '{arg}'"):
        op(**args)
