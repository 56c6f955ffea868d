"""Triton bitmask-gated GEMM: ``y = x @ (W * G).T + b`` with ``G = m + gamma * (1 - m)``.

The keep-mask stays bit-packed (int32 words along K, LSB first). Each program owns a
``BLOCK_M x BLOCK_N`` output tile and walks K; per K step it loads the x tile, the W tile
``[BLOCK_N, BLOCK_K]`` (viewed as ``[BLOCK_N, BLOCK_K / 32, 32]``) and the ``BLOCK_K / 32`` mask words of
each of its rows, extracts bit ``k % 32`` by broadcasting ``(word >> b) & 1`` over the last axis and gates
W in registers before ``tl.dot`` (fp32 accumulation). W is never copied or modified in memory.

``GATE_MODE`` is a compile-time switch: 0 = hard mask (gamma == 0), 1 = dense (gamma == 1, the
mask is not even read), 2 = soft gate.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, dot_precision, grouped_tile, keep_bits, kernel_out_dtype, load_x_w_tiles, m_bucket,
)

#: Meta-parameters under the CPU interpreter (one config: autotuning needs a GPU). Large tiles keep the
#: number of interpreted programs small; SWAP_AB is chosen per call (see :func:`gated_linear`).
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": swap},
        num_warps=warps,
        num_stages=stages,
    )


# GPU configs; :func:`_prune` keeps those whose row tile fits the M bucket. SWAP_AB computes the
# transposed tile (W*G)[BLOCK_N, K] @ x^T: the gated W tile is the MMA's A operand, which may stay in
# registers on Hopper (wgmma) and whose tile dimension must be >= 64 there, while the token count can
# be as small as 16 — the decode case.
CONFIGS = [
    # decode (M <= 16)
    _cfg(16, 64, 128, 4, 4, True),
    _cfg(16, 64, 256, 4, 3, True),
    _cfg(16, 128, 128, 4, 3, True),
    _cfg(16, 128, 64, 4, 4, True),
    _cfg(16, 32, 128, 4, 4, False),
    _cfg(16, 32, 256, 4, 3, False),
    _cfg(16, 64, 128, 4, 4, False),
    # small batches (M <= 64)
    _cfg(32, 64, 128, 4, 4, True),
    _cfg(32, 128, 64, 4, 4, True),
    _cfg(32, 64, 128, 4, 4, False),
    _cfg(64, 128, 64, 4, 4, True),
    _cfg(64, 64, 64, 4, 4, False),
    _cfg(64, 128, 64, 4, 4, False),
    # prefill (the first one is also the default for M > 64 without autotuning)
    _cfg(128, 128, 64, 8, 3, False),
    _cfg(128, 64, 64, 4, 4, False),
    _cfg(128, 256, 64, 8, 3, False),
    _cfg(128, 128, 64, 8, 3, True),
]


# fp32 inputs (IEEE fp32 FMA dot unless TF32 is allowed): smaller K tiles, mostly A = gated W in registers;
# these fit the register file without spilling for both precisions (see aot_check).
FP32_CONFIGS = [
    _cfg(16, 32, 32, 4, 3, False),
    _cfg(16, 64, 32, 4, 3, True),
    _cfg(32, 64, 32, 4, 3, True),
    _cfg(64, 64, 32, 4, 3, True),
    _cfg(128, 64, 32, 8, 3, True),
]


def _prune(configs, named_args, **kwargs):
    """Keep only the configs whose row tile fits the row-count bucket (decode vs prefill)."""
    bucket = named_args["M_BUCKET"]
    if named_args["x_ptr"].dtype == torch.float32:
        configs = FP32_CONFIGS
    if bucket <= 16:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    elif bucket <= 64:
        keep = [c for c in configs if 16 < c.kwargs["BLOCK_M"] <= bucket]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
        keep = [c for c in keep if c.kwargs["BLOCK_M"] == 128] + [c for c in keep if c.kwargs["BLOCK_M"] < 128]
    return keep or configs


@triton.jit
def _gated_linear_kernel(
    x_ptr, w_ptr, p_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_pn, stride_ym,
    gamma,
    HAS_BIAS: tl.constexpr,
    GATE_MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    # grouped program order: consecutive programs share W column tiles (L2 reuse for prefill)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    WORDS: tl.constexpr = BLOCK_K // 32  # BLOCK_K is a multiple of 32: K tiles start on word boundaries
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    offs_b = tl.arange(0, 32)
    m_ok = offs_m < M
    n_ok = offs_n < N

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # W tile in its natural [BLOCK_N, BLOCK_K] layout, viewed as [BLOCK_N, WORDS, 32] so that the mask
    # words [BLOCK_N, WORDS] (one load per 32 weights) broadcast over the bit axis
    k3 = offs_w[None, :, None] * 32 + offs_b[None, None, :]  # [1, WORDS, 32]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn + k3
    p_ptrs = p_ptr + offs_n.to(tl.int64)[:, None] * stride_pn + offs_w[None, :]

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = load_x_w_tiles(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, k3, k0, K, UPCAST)
        if GATE_MODE != 1:
            words = tl.load(p_ptrs, mask=n_ok[:, None] & ((offs_w[None, :] * 32 + k0) < K), other=0)
            keep = keep_bits(words, offs_b)
            if GATE_MODE == 0:
                w = tl.where(keep, w, tl.zeros_like(w))
            else:
                w = tl.where(keep, w, (w.to(tl.float32) * gamma).to(w.dtype))
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        p_ptrs += WORDS

    if SWAP_AB:
        out = tl.trans(acc)
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


#: Environment switch: ``PERSONA_KERNELS_TRITON_AUTOTUNE=0`` launches :func:`default_config` instead of
#: autotuning (no benchmarking on first use of a shape; needed e.g. before CUDA-graph capture).
AUTOTUNE_ENV = "PERSONA_KERNELS_TRITON_AUTOTUNE"


def default_config(m: int, dtype: torch.dtype) -> triton.Config:
    """The config used without autotuning: the first of the pruned list for this row count and dtype."""
    return _prune(CONFIGS, {"M_BUCKET": m_bucket(m), "x_ptr": torch.empty(0, dtype=dtype)})[0]


def _quick_bench(fn, quantiles):
    """Shorter autotuning measurements than Triton's defaults (25 ms warm-up + 100 ms per config)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


if not INTERPRET:
    _extra = {"do_bench": _quick_bench}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        _extra["cache_results"] = True  # keep the choice on disk (Triton cache dir) across processes
    _tuned_kernel = triton.autotune(
        configs=CONFIGS,
        key=["M_BUCKET", "N", "K", "GATE_MODE"],
        prune_configs_by={"early_config_prune": _prune},
        **_extra,
    )(_gated_linear_kernel)


def gated_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """``x[M, K] @ (weight * G).T + bias`` -> ``[M, N]`` in x's dtype (inputs validated, 2-D, contiguous)."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return y.copy_(bias.expand(m, n)) if bias is not None and m > 0 else y
    y = torch.empty((m, n), dtype=kernel_out_dtype(x.dtype), device=x.device)
    gamma = float(gamma)
    gate_mode = 0 if gamma == 0.0 else (1 if gamma == 1.0 else 2)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (
        x, weight, packed, bias if bias is not None else weight, y,
        m, n, k, m_bucket(m),
        x.stride(0), weight.stride(0), packed.stride(0), y.stride(0),
        gamma,
    )
    flags = dict(HAS_BIAS=bias is not None, GATE_MODE=gate_mode, UPCAST=INTERPRET, DOT_PRECISION=dot_precision(x.dtype))
    if INTERPRET:  # one fixed config; both operand orders get exercised (small M swaps, like decode)
        meta = dict(INTERPRET_BLOCKS, SWAP_AB=m <= INTERPRET_BLOCKS["BLOCK_M"] // 2)
        _gated_linear_kernel[grid(meta)](*args, **flags, **meta)
    elif os.environ.get(AUTOTUNE_ENV, "1") == "0":
        cfg = default_config(m, x.dtype)
        _gated_linear_kernel[grid(cfg.kwargs)](
            *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    else:
        _tuned_kernel[grid](*args, **flags)
    return y.to(x.dtype)
