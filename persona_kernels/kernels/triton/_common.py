"""Shared helpers of the Triton backend: interpreter detection and dtype choices.

``TRITON_INTERPRET`` is read once, when this package is imported, because ``@triton.jit`` decides at
definition time whether a kernel is compiled for the GPU or run by the CPU interpreter.
"""

from __future__ import annotations

import torch

from persona_kernels.dispatch import triton_interpreting

#: True when the kernels of this package were defined under ``TRITON_INTERPRET=1``.
INTERPRET: bool = triton_interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless torch itself allows TF32 for fp32 matmuls.

    Only matters for fp32 operands (fp16/bf16 always use tensor cores with fp32 accumulation).
    """
    if dtype == torch.float32 and not INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32" if not INTERPRET else "ieee"


def m_bucket(m: int) -> int:
    """Autotuning bucket of the row count: 16, 32, 64, 128 or 256 (decode vs prefill shapes)."""
    bucket = 16
    while bucket < m and bucket < 256:
        bucket *= 2
    return bucket


def kernel_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype a kernel should store: fp32 instead of bf16 under the interpreter.

    The interpreter converts fp32 -> bf16 by truncation (not round-to-nearest-even); the wrapper then
    rounds correctly with torch. Compiled kernels store ``dtype`` directly.
    """
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype
