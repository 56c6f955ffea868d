"""welford_partials / linear_with_stats: every backend against a float64 computation of the rounded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from persona_kernels import dispatch
from persona_kernels.ops import welford as W
from persona_kernels.stats import ActivationStats

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backends() -> list[str]:
    out = list(dict.fromkeys(dispatch.available_backends("cpu")))
    if "triton" not in out and dispatch.is_available("triton", "cpu"):
        out.append("triton")
    return out


BACKENDS = _backends()
FAST = [b for b in BACKENDS if b != "triton"]  # the Triton interpreter is slow: small shapes only


def _data(rows: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Channels with means up to 1e3 (1e2 for fp16) and standard deviations down to 1e-2."""
    top = 2.0 if dtype == torch.float16 else 3.0
    mean = torch.randn(k, generator=gen, dtype=torch.float64) * 10 ** (torch.rand(k, generator=gen) * (top + 1) - 1)
    std = 10 ** (torch.rand(k, generator=gen, dtype=torch.float64) * 3 - 2)
    x = mean + std * torch.randn(rows, k, generator=gen, dtype=torch.float64)
    return x.to(dtype)


def _expected(x: torch.Tensor, row_mask: torch.Tensor | None, seq_len: int):
    """float64 statistics of the (already rounded) input, written independently of torch_ref."""
    rows, k = x.shape
    xd = x.double()
    ok = torch.isfinite(xd)
    if row_mask is not None:
        ok &= row_mask[:, None]
    out = {"count": ok.sum(0)}
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    for name, v in (("", xd), ("abs_", xd.abs())):
        vn = torch.where(ok, v, nan)  # excluded entries as NaN, reduced with nan-aware ops
        mean = torch.nan_to_num(vn.nanmean(0), nan=0.0) if rows else v.new_zeros(k)
        out[name + "mean"], out[name + "m2"] = mean, ((vn - mean) ** 2).nansum(0)
    nseq = rows // seq_len if seq_len else 0
    z = torch.where(ok, xd, 0.0)
    out["seq_sumsq"] = (z[: nseq * seq_len] ** 2).reshape(nseq, max(seq_len, 1), k).sum(1) if nseq else xd.new_zeros(0, k)
    out["maxabs"] = torch.where(ok, xd.abs(), 0.0).amax(0) if rows else xd.new_zeros(k)
    return out


def _check(got, exp, rows: int, seq_len: int) -> None:
    count, mean, m2, amean, am2, seq = got
    assert count.dtype == torch.int64 and tuple(count.shape) == exp["count"].shape
    for t in (mean, m2, amean, am2, seq):
        assert t.dtype == torch.float32
    torch.testing.assert_close(count, exp["count"], rtol=0, atol=0)
    eps = torch.finfo(torch.float32).eps
    n = exp["count"].clamp_min(1).double()
    # mean: a few fp32 ulps of the values plus a small fraction of the spread
    for name, got_mean, got_m2 in (("", mean, m2), ("abs_", amean, am2)):
        ref_mean, ref_m2 = exp[name + "mean"], exp[name + "m2"]
        std = (ref_m2 / n).sqrt()
        tol = 8 * eps * exp["maxabs"] + 1e-5 * std + 1e-30
        err = (got_mean.double() - ref_mean).abs()
        assert bool((err <= tol).all()), f"{name}mean: worst excess {float((err - tol).max())}"
        tol2 = 1e-4 * ref_m2 + n * (8 * eps * exp["maxabs"]) ** 2 + 1e-30
        err2 = (got_m2.double() - ref_m2).abs()
        assert bool((err2 <= tol2).all()), f"{name}m2: worst excess {float((err2 - tol2).max())}"
    assert tuple(seq.shape) == tuple(exp["seq_sumsq"].shape)
    torch.testing.assert_close(seq.double(), exp["seq_sumsq"], rtol=1e-4 * max(1, seq_len / 64), atol=1e-30)


SHAPES_SMALL = [(0, 172, 0), (1, 1, 0), (1, 172, 1), (37, 172, 0), (64, 1, 8), (30, 172, 3)]
SHAPES_LARGE = [(1000, 40, 500), (2053, 33, 0), (777, 17, 24)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_partials_random(backend, dtype, masked):
    gen = torch.Generator().manual_seed(1234)
    shapes = SHAPES_SMALL + (SHAPES_LARGE if backend in FAST and masked else [])
    for rows, k, seq_len in shapes:
        x = _data(rows, k, dtype, gen)
        mask = (torch.rand(rows, generator=gen) > 0.3) if masked else None
        got = dispatch.get_kernel("welford_partials", backend, "cpu")(x, mask, seq_len)
        _check(got, _expected(x, mask, seq_len), rows, seq_len)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_excluded_and_counted(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    rows, k, seq_len = 40, 172, 8
    x = _data(rows, k, dtype, gen)
    x[3, 0], x[5, 0], x[7, 1] = float("nan"), float("inf"), float("-inf")
    x[:, 2] = float("nan")  # a channel without any finite value
    x[:20, 3] = float("nan")  # a channel whose first finite value comes late
    x[torch.rand(rows, k, generator=gen) < 0.02] = float("inf")
    mask = torch.rand(rows, generator=gen) > 0.2
    got = dispatch.get_kernel("welford_partials", backend, "cpu")(x, mask, seq_len)
    exp = _expected(x, mask, seq_len)
    _check(got, exp, rows, seq_len)
    count, mean, m2, amean, am2, seq = got
    assert int(count[2]) == 0 and float(mean[2]) == 0 and float(m2[2]) == 0
    for t in got[1:]:
        assert bool(torch.isfinite(t).all())
    assert int(mask.sum()) * k - int(count.sum()) == int((~torch.isfinite(x[mask])).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked(backend):
    x = torch.randn(12, 5)
    count, mean, m2, amean, am2, seq = dispatch.get_kernel("welford_partials", backend, "cpu")(
        x, torch.zeros(12, dtype=torch.bool), 4)
    assert int(count.abs().sum()) == 0
    for t in (mean, m2, amean, am2, seq):
        assert float(t.abs().sum()) == 0.0
    assert tuple(seq.shape) == (3, 5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ kernels not built")
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_isa_variants(monkeypatch, isa, dtype):
    monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", isa)  # caps the ISA; read by the kernel at every call
    gen = torch.Generator().manual_seed(3)
    # one chunk; several chunks (above 1024 rows); a sequence split over two chunks (longer than a chunk)
    for rows, k, seq_len in [(300, 172, 0), (40, 17, 5), (600, 33, 300), (3000, 19, 0), (2600, 21, 1300)]:
        x = _data(rows, k, dtype, gen)
        x[1, 3] = float("nan")
        x[: rows // 2, k // 2] = float("inf")  # first finite value of this channel only in a later tile
        mask = torch.rand(rows, generator=gen) > 0.1
        got = dispatch.get_kernel("welford_partials", "cpu", "cpu")(x, mask, seq_len)
        _check(got, _expected(x, mask, seq_len), rows, seq_len)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ kernels not built")
def test_cpu_deterministic_across_threads():
    """The partials, and the fused call's merged state, are the same bits for any thread count. The shapes take
    each parallel split: many chunks and a split sequence over channel runs, a calibration batch (one chunk,
    K = 576: the recorder's shape) over channel runs with the merge inside the pass, and too few channel
    blocks for the threads (tasks over chunk x channel group, 3 and 4 threads)."""
    import persona_kernels.stats as stats_mod
    from persona_kernels.stats import ActivationStats

    kernel = dispatch.get_kernel("welford_partials", "cpu", "cpu")
    fused = ActivationStats(1)._linear_merge_cpu_op() if stats_mod._has_fused_op() else None
    gen = torch.Generator().manual_seed(5)
    cases = [(8000, 150, 100), (2600, 70, 1300), (272, 576, 17), (20000, 20, 0), (30000, 9, 3000)]
    threads = torch.get_num_threads()
    runs: dict[int, list] = {}
    data = []
    for rows, k, seq_len in cases:
        x = _data(rows, k, torch.float32, gen)
        x[7, k // 3] = float("nan")
        mask = torch.rand(rows, generator=gen) > 0.05
        data.append((x, torch.randn(5, k, generator=gen), mask, seq_len))
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            out = []
            for x, w, mask, seq_len in data:
                out.append(kernel(x, mask, seq_len))
                if fused is not None:
                    st = ActivationStats(x.shape[1])
                    for _ in range(2):  # the second call merges into a non-empty state
                        fused(x, w, None, mask, seq_len, st._n, st._mean, st._m2, st._nonfinite)
                    out.append(tuple(st.state_dict().values()))  # (y is the GEMM's: its bits may vary)
            runs[n] = out
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3, 4):
        for got, want in zip(runs[n], runs[1]):
            for u, v in zip(got, want):
                assert torch.equal(u, v), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_welford_update_layouts(backend):
    """3-D / 4-D / non-contiguous x and a token mask through the public op; sequences = x.shape[-2]."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(2, 3, 5, 172, generator=gen, dtype=torch.float64).float() * 3 + 1
    x = base.transpose(1, 2)  # [2, 5, 3, 172], non-contiguous: 10 sequences of 3 tokens
    assert not x.is_contiguous()
    mask = torch.rand(2, 5, 3, generator=gen) > 0.3
    mask[0, 1] = False  # a sequence with no valid token
    stats = ActivationStats(172)
    stats.update(x, mask, backend=backend)
    sel = x[mask].double()
    torch.testing.assert_close(stats.count, torch.full((172,), sel.shape[0], dtype=torch.int64))
    torch.testing.assert_close(stats.mean, sel.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, sel.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    l2 = (x.double() * mask[..., None]).pow(2).sum(-2).sqrt().reshape(10, 172)
    valid = mask.reshape(10, 3).any(1)
    assert int(valid.sum()) == 9
    torch.testing.assert_close(stats.seq_count, torch.full((172,), 9, dtype=torch.int64))
    torch.testing.assert_close(stats.seq_l2_mean, l2[valid].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.seq_l2_var, l2[valid].var(0, unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_with_stats_matches_f_linear(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    for shape, n, with_bias in [((2, 7, 172), 33, True), ((5, 1), 1, False), ((0, 16), 4, True), ((1, 48), 20, True)]:
        k = shape[-1]
        x = torch.randn(*shape, generator=gen).to(dtype)
        weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
        mask = torch.rand(shape[:-1], generator=gen) > 0.25
        stats, ref_stats = ActivationStats(k), ActivationStats(k)
        y = W.linear_with_stats(x, weight, bias, stats, mask, backend=backend)
        ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        assert y.dtype == dtype and y.shape == (*shape[:-1], n)
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
        ref_stats.update(x, mask, backend="torch")
        torch.testing.assert_close(stats.count, ref_stats.count, rtol=0, atol=0)
        for attr in ("mean", "var", "abs_mean", "seq_l2_mean", "nonfinite"):
            torch.testing.assert_close(getattr(stats, attr), getattr(ref_stats, attr), rtol=1e-5, atol=1e-6)


def test_linear_with_stats_backward():
    x = torch.randn(3, 4, 20, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    stats = ActivationStats(20)
    # float64 is not a kernel dtype: go through the custom op directly to check the autograd formula
    y = W._linear_with_stats_op(x.reshape(-1, 20), w, b, None, 0, "torch")[0]
    (y * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    (F.linear(x2, w2, b2).reshape(-1, 6) * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, r.grad)
    del stats


@pytest.mark.parametrize("backend", FAST)
def test_public_linear_with_stats_autograd(backend):
    """With inputs that require grad the public op goes through the custom op and its backward."""
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    stats = ActivationStats(16)
    y = W.linear_with_stats(x, w, b, stats, backend=backend)
    y.square().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).square().sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)
    assert int(stats.count[0]) == 6


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 172, generator=gen)
    mask = torch.rand(12, generator=gen) > 0.3
    w = torch.randn(9, 172, generator=gen)
    b = torch.randn(9, generator=gen)
    for args in [(x, mask, 4, backend), (x, None, 0, backend), (x.to(torch.bfloat16), mask, 3, backend)]:
        torch.library.opcheck(torch.ops.persona_kernels.welford_partials.default, args)
    for args in [(x, w, b, mask, 4, backend), (x, w, None, None, 0, backend)]:
        torch.library.opcheck(torch.ops.persona_kernels.linear_with_stats.default, args)


def test_public_welford_partials():
    x = torch.randn(4, 6, 10)
    p = W.welford_partials(x)
    assert isinstance(p, W.WelfordPartials) and tuple(p.seq_sumsq.shape) == (4, 10)
    torch.testing.assert_close(p.mean.double(), x.reshape(-1, 10).double().mean(0), rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    stats = ActivationStats(8)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="argument 'x'.*num_channels=8"):
        W.welford_update(stats, torch.randn(3, 7))
    with pytest.raises(TypeError, match="argument 'x'.*dtype"):
        W.welford_update(stats, torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="argument 'x'.*0-d"):
        W.welford_update(stats, torch.tensor(1.0))
    with pytest.raises(ValueError, match="argument 'token_mask'.*shape"):
        W.welford_update(stats, x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="argument 'token_mask'.*bool"):
        W.welford_update(stats, x, torch.ones(3))
    with pytest.raises(TypeError, match="argument 'stats'"):
        W.welford_update(object(), x)
    with pytest.raises(ValueError, match="argument 'x'.*device"):
        W.welford_update(stats, x.to("meta"))
    with pytest.raises(ValueError, match="argument 'backend'"):
        W.welford_update(stats, x, backend="nope")
    with pytest.raises(ValueError, match="argument 'weight'.*shape"):
        W.linear_with_stats(x, torch.randn(4, 7), None, stats)
    with pytest.raises(TypeError, match="argument 'weight'.*dtype"):
        W.linear_with_stats(x, torch.randn(4, 8, dtype=torch.float64), None, stats)
    with pytest.raises(ValueError, match="argument 'bias'.*shape"):
        W.linear_with_stats(x, torch.randn(4, 8), torch.randn(5), stats)
    assert int(stats.count.sum()) == 0  # nothing was merged by the failed calls


def test_fused_linear_and_merge_equals_two_step(monkeypatch):
    """CPU eager linear_with_stats runs the kernel and the merge in one C++ call (linear_stats_merge_cpu_);
    it must give the same output and state as the kernel followed by ActivationStats.merge_batch."""
    import persona_kernels.stats as stats_mod
    from persona_kernels.ops.welford import linear_with_stats
    from persona_kernels.stats import ActivationStats

    if not stats_mod._has_fused_op():
        pytest.skip("compiled extension not built")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 37, generator=gen) * 3
    x[1, 2, 5] = float("nan")
    w, b = torch.randn(29, 37, generator=gen), torch.randn(29, generator=gen)
    mask = torch.rand(3, 7, generator=gen) < 0.7
    mask[2] = False  # a sequence without any recorded token
    fused, two_step = ActivationStats(37), ActivationStats(37)
    y1 = linear_with_stats(x, w, b, fused, mask)
    with monkeypatch.context() as m:
        m.setattr(stats_mod, "_fused_op_built", lambda: False)
        y2 = linear_with_stats(x, w, b, two_step, mask)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0, equal_nan=True)  # x holds a NaN
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, two_step.state_dict()[key], rtol=1e-12, atol=0, msg=key)
    ref = x.reshape(-1, 37)[mask.reshape(-1)].double()
    ref = ref[:, [j for j in range(37) if j != 5]]
    got = fused.mean[[j for j in range(37) if j != 5]]
    torch.testing.assert_close(got, ref.mean(0), rtol=1e-6, atol=1e-7)


def test_fused_op_direct_binding_equals_the_dispatcher_op():
    """The eager per-call path calls the op's C++ function through the extension's direct binding: same output
    and the same state bits as the registered op, and the same argument checks."""
    import persona_kernels.stats as stats_mod
    from persona_kernels import _extension
    from persona_kernels.stats import ActivationStats

    if not stats_mod._has_fused_op():
        pytest.skip("compiled extension not built")
    direct = ActivationStats(37)._linear_merge_cpu_op()
    assert direct is _extension.load().linear_stats_merge_cpu_
    op = torch.ops.persona_kernels_C.linear_stats_merge_cpu_.default
    gen = torch.Generator().manual_seed(13)
    states = [ActivationStats(37), ActivationStats(37)]
    for seq_len, rows in ((7, 21), (0, 5), (1, 1)):
        x = torch.randn(rows, 37, generator=gen) * 2 - 1
        w, b = torch.randn(13, 37, generator=gen), torch.randn(13, generator=gen)
        mask = torch.rand(rows, generator=gen) < 0.7
        ys = [fn(x, w, b, mask, seq_len, s._n, s._mean, s._m2, s._nonfinite) for fn, s in zip((direct, op), states)]
        assert torch.equal(ys[0], ys[1])
    for key, value in states[0].state_dict().items():
        assert torch.equal(value, states[1].state_dict()[key]), key
    s = states[0]
    with pytest.raises(RuntimeError, match="argument 'weight'"):
        direct(torch.randn(4, 37), torch.randn(13, 36), None, None, 0, s._n, s._mean, s._m2, s._nonfinite)
    with pytest.raises(RuntimeError, match="argument 'row_mask'"):
        direct(torch.randn(4, 37), torch.randn(13, 37), None, torch.ones(3, dtype=torch.bool), 0, s._n, s._mean,
               s._m2, s._nonfinite)
    before = {key: value.clone() for key, value in s.state_dict().items()}
    for fn in (direct, op):  # the state is merged before the GEMM: a bias the GEMM would reject leaves it as it was
        with pytest.raises(RuntimeError, match="argument 'bias'"):
            fn(torch.randn(4, 37), torch.randn(13, 37), torch.randn(12), None, 0, s._n, s._mean, s._m2, s._nonfinite)
    for key, value in s.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fused_linear_and_merge_scratch_reuse_and_threads(monkeypatch):
    """The fused CPU call keeps its batch partials in per-thread scratch reused across calls: shapes that grow
    and shrink (a sequence split over several chunks, 2-D input, one row) and four Python threads calling at
    once must each give exactly the state of the two-step path."""
    import threading

    import persona_kernels.stats as stats_mod
    from persona_kernels.ops.welford import linear_with_stats

    if not stats_mod._has_fused_op():
        pytest.skip("compiled extension not built")
    gen = torch.Generator().manual_seed(12)
    shapes = [(4, 9, 37), (2, 1300, 40), (1, 1, 5), (2100, 129), (3, 33, 64), (6, 5, 300)]
    cases = []
    for shape in shapes:
        x = torch.randn(*shape, generator=gen) * 2 + 1
        w = torch.randn(11, shape[-1], generator=gen)
        mask = (torch.rand(shape[:-1], generator=gen) < 0.8) if len(shape) == 3 else None
        cases.append((x, w, mask))

    def two_step(x, w, mask):
        st = ActivationStats(x.shape[-1])
        with monkeypatch.context() as m:
            m.setattr(stats_mod, "_fused_op_built", lambda: False)
            y = linear_with_stats(x, w, None, st, mask)
        return y, st.state_dict()

    expected = [two_step(*c) for c in cases]

    def fused(x, w, mask):
        st = ActivationStats(x.shape[-1])
        return linear_with_stats(x, w, None, st, mask), st.state_dict()

    def check(got, want):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        for key, value in got[1].items():
            torch.testing.assert_close(value, want[1][key], rtol=1e-12, atol=0, msg=key)

    for case, want in zip(cases, expected):  # serial: every shape after a different one
        check(fused(*case), want)
    results: dict[int, list] = {}

    def worker(i: int) -> None:
        order = cases[i:] + cases[:i]
        results[i] = [fused(*c) for c in order * 3]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        want = expected[i:] + expected[:i]
        for got, w_ in zip(results[i], want * 3):
            check(got, w_)
