"""Triton mixed-persona gated GEMM: row ``i`` of x uses persona ``index[i]`` of a stacked bank.

Like a segmented GEMM (Punica / S-LoRA's SGMV): the rows are sorted by persona (stable) into segments
``-1, 0, ..., P-1``; each segment is cut into row tiles of ``BLOCK_M`` rows, and each program owns one
(row tile, ``BLOCK_N`` column tile) pair, so all its rows share one persona's mask words. x rows are
gathered and y rows scattered through the sort order (x is never permuted in memory). The tile table
is built on the device with an upper bound on the number of tiles (``ceil(M / BLOCK_M) + P + 1``): no
host synchronisation; surplus programs have no rows and skip the K loop.

Persona -1 is the base model (every weight kept). Per-persona ``gamma`` comes from a float32 ``[P]``
tensor; ``gamma == 0`` writes exact zeros (not ``w * 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from persona_kernels.ops.packing import packed_words

from ._common import INTERPRET, dot_precision, keep_bits, kernel_out_dtype, load_x_w_tiles

#: Meta-parameters under the CPU interpreter (one config).
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}


def gpu_blocks(dtype: torch.dtype) -> dict:
    """Fixed GPU meta-parameters (decode-sized segments: a few rows per persona)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


@triton.jit
def _gated_linear_multi_kernel(
    x_ptr, w_ptr, p_ptr, b_ptr, y_ptr, g_ptr,
    order_ptr, tile_persona_ptr, tile_start_ptr, tile_end_ptr,
    N, K,
    stride_xm, stride_wn, stride_pp, stride_pn, stride_ym,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    persona = tl.load(tile_persona_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    is_base = persona < 0
    p_safe = tl.maximum(persona, 0)
    gamma = tl.load(g_ptr + p_safe)

    WORDS: tl.constexpr = BLOCK_K // 32
    offs_r = start + tl.arange(0, BLOCK_M)
    r_ok = offs_r < end
    rows = tl.load(order_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)  # original row numbers
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    offs_b = tl.arange(0, 32)
    n_ok = offs_n < N

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    k3 = offs_w[None, :, None] * 32 + offs_b[None, None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn + k3
    p_ptrs = p_ptr + p_safe.to(tl.int64) * stride_pp + offs_n.to(tl.int64)[:, None] * stride_pn + offs_w[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = tl.where(end > start, K, 0)  # programs without rows skip the K loop
    for k0 in range(0, k_stop, BLOCK_K):
        x, w = load_x_w_tiles(x_ptrs, w_ptrs, r_ok, n_ok, offs_k, k3, k0, K, UPCAST)
        words = tl.load(p_ptrs, mask=n_ok[:, None] & ((offs_w[None, :] * 32 + k0) < K) & (persona >= 0), other=-1)
        keep = keep_bits(words, offs_b) | is_base
        soft = tl.where(gamma == 0.0, tl.zeros_like(w), (w.to(tl.float32) * gamma).to(w.dtype))
        w = tl.where(keep, w, soft)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        p_ptrs += WORDS

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def tile_table(index: torch.Tensor, num_personas: int, block_m: int):
    """Sort order of the rows and the (persona, start, end) of every row tile, all on index's device.

    Segments are personas -1..P-1 in order; tile ``t`` covers sorted rows ``[start, end)`` of one segment.
    Returns ``(order int32[M], persona int32[T], start int32[T], end int32[T])`` with the fixed upper bound
    ``T = ceil(M / block_m) + P + 1`` (surplus tiles have ``start == end``).
    """
    m = index.shape[0]
    idx = index.long()
    order = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.zeros(num_personas + 1, dtype=torch.int64, device=index.device)
    counts.scatter_add_(0, idx + 1, torch.ones_like(idx))  # bincount would sync on CUDA (output size)
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    total = (m + block_m - 1) // block_m + num_personas + 1
    t = torch.arange(total, device=index.device)
    seg = torch.searchsorted(tiles_end, t, right=True).clamp_max(num_personas)
    local = t - (tiles_end[seg] - tiles[seg])
    start = seg_start[seg] + local * block_m
    end = torch.minimum(start + block_m, seg_end[seg])
    valid = t < tiles_end[-1]
    start = torch.where(valid, start, torch.zeros_like(start))
    end = torch.where(valid, end, torch.zeros_like(end))
    i32 = torch.int32
    return order, (seg - 1).to(i32), start.to(i32), end.to(i32)


def gated_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: list[float],
) -> torch.Tensor:
    """``y[i] = x[i] @ (W * G_{index[i]}).T + b`` for x [M, K], bank int32 [P, N, W], index [M] (-1 = base)."""
    m, k = x.shape
    n = weight.shape[0]
    p = bank.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return y.copy_(bias.expand(m, n)) if bias is not None and m > 0 else y
    blocks = dict(INTERPRET_BLOCKS) if INTERPRET else gpu_blocks(x.dtype)
    order, tp, ts, te = tile_table(index, p, blocks["BLOCK_M"])
    gammas = torch.tensor([float(g) for g in gamma] or [0.0], dtype=torch.float32).to(x.device, non_blocking=True)
    bank_arg = bank if p > 0 else torch.zeros((1, n, packed_words(k)), dtype=torch.int32, device=x.device)
    y = torch.empty((m, n), dtype=kernel_out_dtype(x.dtype), device=x.device)
    grid = (tp.shape[0], triton.cdiv(n, blocks["BLOCK_N"]))
    _gated_linear_multi_kernel[grid](
        x, weight, bank_arg, bias if bias is not None else weight, y, gammas,
        order, tp, ts, te,
        n, k,
        x.stride(0), weight.stride(0), bank_arg.stride(0), bank_arg.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, UPCAST=INTERPRET, DOT_PRECISION=dot_precision(x.dtype), **blocks,
    )
    return y.to(x.dtype)
