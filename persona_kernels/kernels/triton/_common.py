"""Shared helpers of the Triton backend: interpreter detection and dtype choices.

``TRITON_INTERPRET`` is read once, when this package is imported, because ``@triton.jit`` decides at
definition time whether a kernel is compiled for the GPU or run by the CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit
def load_x_w_tiles(x_ptrs, w_ptrs, row_ok, n_ok, offs_k, k3, k0, K, UPCAST: tl.constexpr):
    """K step ``k0`` of a gated GEMM: the x tile [BLOCK_M, BLOCK_K] (rows ``row_ok``) and the W tile viewed
    as [BLOCK_N, WORDS, 32] (``k3`` = in-tile column of each weight), zero past K and past the valid rows."""
    x = tl.load(x_ptrs, mask=row_ok[:, None] & ((offs_k + k0) < K)[None, :], other=0.0)
    w = tl.load(w_ptrs, mask=n_ok[:, None, None] & ((k3 + k0) < K), other=0.0)
    if UPCAST:  # the interpreter's fp16/bf16 arithmetic is not faithful: work in fp32
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return x, w


@triton.jit
def keep_bits(words, offs_b):
    """Keep-mask [BLOCK_N, WORDS, 32] of packed int32 mask words [BLOCK_N, WORDS] (bit j = column 32w + j)."""
    return ((words[:, :, None] >> offs_b[None, None, :]) & 1) != 0


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of this program over a 1-D grid in grouped order: ``GROUP_M`` consecutive row tiles
    walk the column tiles together, so consecutive programs share W column tiles (L2 reuse for prefill)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n
