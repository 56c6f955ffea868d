"""The fp32 GEMM of our own (csrc/linear_fp32_cpu.cpp) and its use inside the statistics op: float64 references
on fresh random data, odd shapes (tiles, K blocks, aliasing strides), bias, NaN, threads, fallbacks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persona_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="C++ kernels not built")

EPS = torch.finfo(torch.float32).eps


def _op():
    return _extension.ops().linear_fp32_cpu


def _own_gemm_runs() -> bool:
    """True where the kernel applies on this machine (AVX-512, not capped)."""
    return _extension.load().cpu_isa() == "avx512"


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """|y - y64| within a few fp32 roundings of the magnitudes summed: sqrt(K)-scaled, far below what one
    dropped or repeated column of x or W (about |x_k w_k|) or a wrong bias would cause."""
    xd, wd = x.double(), w.double()
    ref = F.linear(xd, wd, None if b is None else b.double())
    scale = F.linear(xd.abs(), wd.abs(), None if b is None else b.double().abs())
    tol = 4 * EPS * (x.shape[1] ** 0.5) * scale + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"worst excess {float((err - tol).max())} at K={x.shape[1]}"


# M: one partial tile, whole tiles, several 256-row blocks with a partial one; K: 1, odd, a 2 KiB-multiple
# row stride (weights copied to an unaliased stride), above 2048 (K blocks, the last one shorter); N: 1, below,
# at and above the 12-row tile
SHAPES = [
    (32, 1, 1),
    (33, 17, 13),
    (95, 576, 12),
    (128, 512, 25),
    (300, 1030, 11),
    (129, 2100, 24),
    (520, 2100, 13),
    (64, 4096, 7),
    (257, 96, 36),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(m, k, n, with_bias):
    gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    x = torch.randn(m, k, generator=gen) * 3 + 1
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if with_bias else None
    y = _op()(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _check_close(y, x, w, b)


def test_noncontiguous_x_and_row_independence():
    """x as a strided view gives the contiguous result; each row of y is the same bits as that row computed
    in a call of its own block of rows (rows sit at different tile positions in the two calls)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(600, 333, generator=gen)
    x = base[::2, 5:262]  # [300, 257], row stride 666
    w, b = torch.randn(29, 257, generator=gen), torch.randn(29, generator=gen)
    y = _op()(x, w, b)
    torch.testing.assert_close(y, _op()(x.contiguous(), w, b), rtol=0, atol=0)
    _check_close(y, x, w, b)
    sub = _op()(x[37:137].contiguous(), w, b)
    if _own_gemm_runs():
        assert torch.equal(sub, y[37:137])


def test_threads_give_the_same_bits():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(1000, 300, generator=gen), torch.randn(50, 300, generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_op()(x, w, None))
    finally:
        torch.set_num_threads(threads)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])


def test_nan_and_inf_stay_in_their_rows():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(70, 40, generator=gen), torch.randn(20, 40, generator=gen)
    x[5, 7] = float("nan")
    x[40, 0] = float("inf")
    y = _op()(x, w, None)
    assert bool(y[5].isnan().all())
    assert bool((~torch.isfinite(y[40])).all())
    keep = [i for i in range(70) if i not in (5, 40)]
    assert bool(torch.isfinite(y[keep]).all())
    _check_close(y[keep], x[keep], w, None)


@pytest.mark.parametrize("case", ["few_rows", "isa_capped", "env_off", "bf16"])
def test_fallback_is_at_linear(monkeypatch, case):
    """Where the kernel does not apply the op is exactly at::linear."""
    gen = torch.Generator().manual_seed(4)
    m = 31 if case == "few_rows" else 80
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x, w = torch.randn(m, 64, generator=gen).to(dtype), torch.randn(24, 64, generator=gen).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype)
    if case == "isa_capped":
        monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", "avx2")
    if case == "env_off":
        monkeypatch.setenv("PERSONA_KERNELS_CPU_OWN_GEMM", "0")
    assert torch.equal(_op()(x, w, b), F.linear(x, w, b))


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(40, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="argument 'weight'"):
        _op()(x, torch.randn(4, 7), None)
    with pytest.raises(RuntimeError, match="argument 'weight'"):
        _op()(x, w.double(), None)
    with pytest.raises(RuntimeError, match="argument 'bias'"):
        _op()(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match="argument 'x'"):
        _op()(x[None], w, None)


def test_statistics_op_runs_the_gemm_in_its_tasks():
    """linear_stats_merge_cpu_ on 2 threads with a batch that splits its channels over the threads runs the GEMM
    inside the statistics tasks (rows split per task); y must be the same bits as the GEMM alone and on 1 thread,
    and the merged state the same bits as on 1 thread."""
    from persona_kernels.stats import ActivationStats

    gen = torch.Generator().manual_seed(5)
    rows, k, n = 600, 576, 200  # 600 x 576 values: two statistics tasks of 18 channel blocks each
    x = torch.randn(rows, k, generator=gen) * 2 + 0.5
    w, b = torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen)
    mask = torch.rand(rows, generator=gen) > 0.1
    fused = ActivationStats(k)._linear_merge_cpu_op()
    threads = torch.get_num_threads()
    runs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            st = ActivationStats(k)
            y = fused(x, w, b, mask, 100, st._n, st._mean, st._m2, st._nonfinite)
            runs.append((y, st))
    finally:
        torch.set_num_threads(threads)
    _check_close(runs[0][0], x, w, b)
    torch.testing.assert_close(runs[0][0], _op()(x, w, b), rtol=0, atol=0)
    assert torch.equal(runs[1][0], runs[0][0])
    for key, value in runs[1][1].state_dict().items():
        assert torch.equal(value, runs[0][1].state_dict()[key]), key
    ref = ActivationStats(k)
    ref.update(x, mask, backend="torch")
    for attr in ("count", "mean", "var"):
        torch.testing.assert_close(getattr(runs[1][1], attr), getattr(ref, attr), rtol=1e-5, atol=1e-6)
