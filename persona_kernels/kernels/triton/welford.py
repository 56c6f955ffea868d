"""Triton per-channel Welford statistics of activations, alone or fused into a linear layer.

Deterministic by construction (no float atomics):

1. a *partials* stage writes, per block of rows and per channel, ``(count, mean, M2)`` of ``x`` and of
   ``|x|`` (fp32; counts int32) into ``[num_row_blocks, K]`` buffers — either the standalone
   :func:`_partials_kernel` or the ``pid_n == 0`` programs of the fused GEMM :func:`_linear_stats_kernel`,
   which already stream every x element exactly once through their K loop;
2. :func:`_merge_kernel` combines the row blocks of each channel with Chan's formula in ascending
   block order, so the result does not depend on launch order.

All statistics are accumulated of ``x - shift`` (shift = the batch's first valid row, per channel; exact
for nearby values), so partial means are of the order of the spread rather than the offset. Within a tile
the mean is a tree sum plus one correction pass (``mean += Σ(v - mean) / n``) and M2 is summed around
that mean; together this keeps fp32 accurate for channels with mean 1e3 and std 1e-2.

``seq_sumsq``: both partials stages also write Σx² per row block; when ``seq_len`` is a multiple of the
row block (the common case: power-of-two sequence lengths), sequences are sums of whole blocks (a
fixed-order torch sum, no extra pass over x). Otherwise the separate :func:`_seq_sumsq_kernel` (one
program per sequence and channel block) reads x once more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision, grouped_tile, kernel_out_dtype

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32

# (rows per chunk, max chunks per program, channels per program, warps) of the standalone partials kernel
PARTIAL_BLOCKS = (32, 4, 64, 4) if INTERPRET else (32, 8, 128, 8)
MERGE_BLOCKS = (8, 64) if INTERPRET else (16, 32)  # (row blocks per step, channels per program)
SEQ_BLOCKS = (64, 64) if INTERPRET else (32, 128)  # (rows per step, channels per program)


@triton.jit
def _moments(v, valid, inv):
    mean = tl.sum(tl.where(valid, v, 0.0), axis=0) * inv
    mean += tl.sum(tl.where(valid, v - mean[None, :], 0.0), axis=0) * inv  # correction pass
    d = tl.where(valid, v - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)


@triton.jit
def _tile_moments(x, valid, shift):
    """Per-column count, mean and M2 of ``x - shift`` and ``|x| - |shift|`` over the ``valid`` entries.

    ``x`` is a fp32 tile, ``shift`` a per-column fp32 vector (shared by all tiles of a call).
    """
    cnt = tl.sum(valid.to(tl.int32), axis=0)
    inv = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
    mean, m2 = _moments(x - shift[None, :], valid, inv)
    amean, am2 = _moments(tl.abs(x) - tl.abs(shift)[None, :], valid, inv)
    sq = tl.sum(tl.where(valid, x * x, 0.0), axis=0)
    return cnt, mean, m2, amean, am2, sq


@triton.jit
def _group_moments(n, mean, m2, inv):
    """Combine the rows of a tile of (count, mean, M2) summaries [G, BLOCK_K] into one per column."""
    nf = n.to(tl.float32)
    mu = tl.sum(nf * mean, axis=0) * inv
    mu += tl.sum(nf * (mean - mu[None, :]), axis=0) * inv  # correction pass
    d = mean - mu[None, :]
    return mu, tl.sum(m2, axis=0) + tl.sum(nf * d * d, axis=0)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. pairwise combination of two (count, mean, M2) summaries (int32 counts)."""
    n = n_a + n_b
    frac_b = n_b.to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * n_a.to(tl.float32) * frac_b
    return n, mean, m2


@triton.jit
def _store_partials(cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr, sq_ptr, at, ok, n, mean, m2, amean, am2, sq):
    """Store one [BLOCK_K] row of partial statistics (count, mean, M2, |x| mean, |x| M2, Σx²) at offsets ``at``."""
    tl.store(cnt_ptr + at, n, mask=ok)
    tl.store(mean_ptr + at, mean, mask=ok)
    tl.store(m2_ptr + at, m2, mask=ok)
    tl.store(amean_ptr + at, amean, mask=ok)
    tl.store(am2_ptr + at, am2, mask=ok)
    tl.store(sq_ptr + at, sq, mask=ok)


@triton.jit
def _valid_rows(mask_ptr, rows, R, HAS_MASK: tl.constexpr):
    ok = rows < R
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + rows, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _partials_kernel(
    x_ptr, mask_ptr, shift_ptr, cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr, sq_ptr,
    R, K, stride_xr,
    HAS_MASK: tl.constexpr, CHUNK_R: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
    n = tl.zeros((BLOCK_K,), dtype=tl.int32)
    mean = tl.zeros((BLOCK_K,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    amean = tl.zeros((BLOCK_K,), dtype=tl.float32)
    am2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c in range(CHUNKS):
        rows = pid_r * (CHUNK_R * CHUNKS) + c * CHUNK_R + tl.arange(0, CHUNK_R)
        r_ok = _valid_rows(mask_ptr, rows, R, HAS_MASK)
        in_tile = r_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + offs_k[None, :], mask=in_tile, other=0.0)
        x = x.to(tl.float32)
        valid = in_tile & (tl.abs(x) <= _FLT_MAX)  # excludes inf and NaN
        cb, mb, m2b, amb, am2b, sqb = _tile_moments(x, valid, shift)
        n_new, mean, m2 = _chan(n, mean, m2, cb, mb, m2b)
        _, amean, am2 = _chan(n, amean, am2, cb, amb, am2b)
        n = n_new
        sq += sqb
    _store_partials(cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr, sq_ptr, pid_r * K + offs_k, k_ok,
                    n, mean, m2, amean, am2, sq)


@triton.jit
def _merge_kernel(
    shift_ptr, cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr,
    out_cnt_ptr, out_mean_ptr, out_m2_ptr, out_amean_ptr, out_am2_ptr,
    NB, K,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    n = tl.zeros((BLOCK_K,), dtype=tl.int32)
    mean = tl.zeros((BLOCK_K,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    amean = tl.zeros((BLOCK_K,), dtype=tl.float32)
    am2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # BLOCK_B row blocks at a time: combine them (fixed reduction tree), then Chan-merge the group into
    # the running summary; groups in ascending order, so the result is bit-reproducible
    for b0 in range(0, NB, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        ok = (blocks < NB)[:, None] & k_ok[None, :]
        at = blocks.to(tl.int64)[:, None] * K + offs_k[None, :]
        nb = tl.load(cnt_ptr + at, mask=ok, other=0)
        n_g = tl.sum(nb, axis=0)
        inv = 1.0 / tl.maximum(n_g, 1).to(tl.float32)
        mean_g, m2_g = _group_moments(nb, tl.load(mean_ptr + at, mask=ok, other=0.0),
                                      tl.load(m2_ptr + at, mask=ok, other=0.0), inv)
        amean_g, am2_g = _group_moments(nb, tl.load(amean_ptr + at, mask=ok, other=0.0),
                                        tl.load(am2_ptr + at, mask=ok, other=0.0), inv)
        n_new, mean, m2 = _chan(n, mean, m2, n_g, mean_g, m2_g)
        _, amean, am2 = _chan(n, amean, am2, n_g, amean_g, am2_g)
        n = n_new
    shift = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
    has = n > 0
    tl.store(out_cnt_ptr + offs_k, n.to(tl.int64), mask=k_ok)
    tl.store(out_mean_ptr + offs_k, tl.where(has, mean + shift, 0.0), mask=k_ok)
    tl.store(out_m2_ptr + offs_k, m2, mask=k_ok)
    tl.store(out_amean_ptr + offs_k, tl.where(has, amean + tl.abs(shift), 0.0), mask=k_ok)
    tl.store(out_am2_ptr + offs_k, am2, mask=k_ok)


@triton.jit
def _seq_sumsq_kernel(
    x_ptr, mask_ptr, out_ptr,
    R, K, stride_xr, SEQ_LEN,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seq = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    start = seq * SEQ_LEN
    for r0 in range(0, SEQ_LEN, BLOCK_R):
        local = r0 + tl.arange(0, BLOCK_R)
        rows = start + local
        r_ok = _valid_rows(mask_ptr, rows, R, HAS_MASK) & (local < SEQ_LEN)
        in_tile = r_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + offs_k[None, :], mask=in_tile, other=0.0)
        x = x.to(tl.float32)
        valid = in_tile & (tl.abs(x) <= _FLT_MAX)
        acc += tl.sum(tl.where(valid, x * x, 0.0), axis=0)
    tl.store(out_ptr + seq.to(tl.int64) * K + offs_k, acc, mask=k_ok)


@triton.jit
def _linear_stats_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mask_ptr, shift_ptr,
    cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr, sq_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    r_ok = _valid_rows(mask_ptr, offs_m, M, HAS_MASK)  # rows that count for the statistics

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    stat_ptrs = pid_m * K + offs_k

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (offs_k + k0) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if pid_n == 0:  # first column block: every x element passes here exactly once
            xf = x.to(tl.float32)
            valid = r_ok[:, None] & k_ok[None, :] & (tl.abs(xf) <= _FLT_MAX)
            shift = tl.load(shift_ptr + k0 + offs_k, mask=k_ok, other=0.0)
            cnt, mean, m2, amean, am2, sq = _tile_moments(xf, valid, shift)
            _store_partials(cnt_ptr, mean_ptr, m2_ptr, amean_ptr, am2_ptr, sq_ptr, stat_ptrs, k_ok,
                            cnt, mean, m2, amean, am2, sq)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        stat_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _linear_config(m: int, dtype: torch.dtype) -> dict:
    """Fixed tiles for the fused GEMM (no autotuning: the row blocking also fixes the statistics' order)."""
    if INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64  # fp32 tiles are twice as large: halve K
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64 or dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _mask_arg(x: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    return x if row_mask is None else row_mask.contiguous().view(torch.uint8)


def _partial_buffers(nb: int, k: int, device: torch.device) -> list[torch.Tensor]:
    """count (int32), mean, m2, abs_mean, abs_m2, sumsq per (row block, channel)."""
    cnt = torch.empty((nb, k), dtype=torch.int32, device=device)
    return [cnt] + [torch.empty((nb, k), dtype=torch.float32, device=device) for _ in range(5)]


def _shift(x: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-channel shift: the first valid row (non-finite -> 0); statistics are accumulated of ``x - shift``.

    Partial means then stay of the order of the spread instead of the offset, so fp32 partial means
    lose no precision when channels have a large mean and a small variance. No host synchronization.
    """
    if row_mask is None:
        row = x[0]
    else:  # argmax returns the first maximal index: the first True row (row 0 when none is valid)
        row = x.index_select(0, row_mask.to(torch.uint8).argmax().view(1))[0]
    return torch.nan_to_num(row.float(), nan=0.0, posinf=0.0, neginf=0.0)


def _merge(shift: torch.Tensor, parts: list[torch.Tensor], k: int, device: torch.device) -> list[torch.Tensor]:
    """Per-channel (count int64, mean, m2, abs_mean, abs_m2) of all row blocks of ``parts``."""
    nb = parts[0].shape[0]
    out = [torch.empty(k, dtype=torch.int64, device=device)]
    out += [torch.empty(k, dtype=torch.float32, device=device) for _ in range(4)]
    block_b, block_k = MERGE_BLOCKS
    _merge_kernel[(triton.cdiv(k, block_k),)](
        shift, *parts[:5], *out, nb, k, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=1
    )
    return out


def _seq_sumsq(
    x: torch.Tensor, row_mask: torch.Tensor | None, seq_len: int, block_sq: torch.Tensor, rows_per_block: int
) -> torch.Tensor:
    """``[R // seq_len, K]`` Σx² per sequence, from the per-block sums when blocks tile the sequences."""
    r, k = x.shape
    num_seq = r // seq_len if seq_len > 0 else 0
    if num_seq == 0 or k == 0:
        return torch.zeros((num_seq, k), dtype=torch.float32, device=x.device)
    if seq_len % rows_per_block == 0:
        per_seq = seq_len // rows_per_block
        return block_sq[: num_seq * per_seq].view(num_seq, per_seq, k).sum(dim=1)
    out = torch.empty((num_seq, k), dtype=torch.float32, device=x.device)
    block_r, block_k = SEQ_BLOCKS
    _seq_sumsq_kernel[(num_seq, triton.cdiv(k, block_k))](
        x, _mask_arg(x, row_mask), out, r, k, x.stride(0), seq_len,
        HAS_MASK=row_mask is not None, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return out


def _chunks_per_program(seq_len: int) -> int:
    """Row chunks per partials program: the most that still lets row blocks tile the sequences."""
    chunk_r, max_chunks = PARTIAL_BLOCKS[:2]
    if seq_len > 0 and seq_len % chunk_r == 0:
        chunks = max_chunks
        while seq_len % (chunk_r * chunks):
            chunks //= 2
        return chunks
    return max_chunks


def welford_partials(x: torch.Tensor, row_mask: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Statistics of one batch ``x[R, K]``: ``(count, mean, m2, abs_mean, abs_m2, seq_sumsq)`` (see DESIGN.md)."""
    r, k = x.shape
    if r == 0 or k == 0:
        num_seq = r // seq_len if seq_len > 0 else 0
        stats = [torch.zeros(k, dtype=torch.int64, device=x.device)]
        stats += [torch.zeros(k, dtype=torch.float32, device=x.device) for _ in range(4)]
        return (*stats, torch.zeros((num_seq, k), dtype=torch.float32, device=x.device))
    chunk_r, _, block_k, warps = PARTIAL_BLOCKS
    chunks = _chunks_per_program(seq_len)
    nb = triton.cdiv(r, chunk_r * chunks)
    parts = _partial_buffers(nb, k, x.device)
    shift = _shift(x, row_mask)
    _partials_kernel[(nb, triton.cdiv(k, block_k))](
        x, _mask_arg(x, row_mask), shift, *parts, r, k, x.stride(0),
        HAS_MASK=row_mask is not None, CHUNK_R=chunk_r, CHUNKS=chunks, BLOCK_K=block_k, num_warps=warps,
    )
    return (*_merge(shift, parts, k, x.device), _seq_sumsq(x, row_mask, seq_len, parts[5], chunk_r * chunks))


def linear_with_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_mask: torch.Tensor | None,
    seq_len: int,
) -> tuple[torch.Tensor, ...]:
    """``(F.linear(x, weight, bias), *welford_partials(x, row_mask, seq_len))`` with one read of x for both."""
    r, k = x.shape
    n = weight.shape[0]
    if r == 0 or k == 0 or n == 0:
        # degenerate shapes: nothing to fuse (with K == 0 the output is just the bias)
        y = torch.zeros((r, n), dtype=x.dtype, device=x.device)
        if bias is not None and r > 0:
            y.copy_(bias.expand(r, n))
        return (y, *welford_partials(x, row_mask, seq_len))
    y = torch.empty((r, n), dtype=kernel_out_dtype(x.dtype), device=x.device)
    cfg = _linear_config(r, x.dtype)
    nb = triton.cdiv(r, cfg["BLOCK_M"])
    parts = _partial_buffers(nb, k, x.device)
    shift = _shift(x, row_mask)
    grid = (nb * triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_stats_kernel[grid](
        x, weight, bias if bias is not None else weight, y, _mask_arg(x, row_mask), shift, *parts,
        r, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, HAS_MASK=row_mask is not None, UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    seq_sumsq = _seq_sumsq(x, row_mask, seq_len, parts[5], cfg["BLOCK_M"])
    return (y.to(x.dtype), *_merge(shift, parts, k, x.device), seq_sumsq)
