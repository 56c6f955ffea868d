"""Scoring (Wanda, Contrastive-Wanda, Contrastive-Sparse, compose) against float64 per-row references."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from persona_kernels import pack_mask, unpack_mask
from persona_kernels import scoring

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class FakeStats:
    """Duck-typed stand-in for ActivationStats: random positive statistics of K channels."""

    abs_mean: torch.Tensor
    abs_var: torch.Tensor
    l2_norm: torch.Tensor
    seq_l2_mean: torch.Tensor
    seq_l2_var: torch.Tensor

    @property
    def num_channels(self) -> int:
        return self.abs_mean.shape[0]

    @classmethod
    def random(cls, k: int, scale: float = 1.0) -> "FakeStats":
        r = lambda: (torch.rand(k, dtype=torch.float64) * scale + 0.05)  # noqa: E731  never zero
        return cls(r(), r(), r() * 10, r() * 5, r())


# ---------------------------------------------------------------------------------------- references


def n_pruned(rho: float, k: int) -> int:
    return min(k, math.floor(rho * k + 1e-9 * max(1, k)))


def ref_keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Per-row loop: keep the `keep` largest; on ties the lower index is kept."""
    n, k = scores.shape
    out = torch.zeros(n, k, dtype=torch.bool)
    for i in range(n):
        row = scores[i].tolist()
        order = sorted(range(k), key=lambda j: (-row[j], j))
        out[i, order[:keep]] = True
    return out


def ref_wanda_scores(weight, a):
    return weight.double().abs() * a.double()


def ref_cwanda_factors(mu_p, var_p, mu_n, var_n, phi, tau, eps):
    z = (mu_p - mu_n) / (torch.sqrt(var_p + var_n) + eps)
    fn = F.softplus if phi == "softplus" else torch.relu
    return fn(z / tau), fn(-z / tau)


def ref_d(weight, a_pos, a_neg, variant="difference", eps=1e-12):
    mag = weight.double().abs()
    s_p, s_n = mag * a_pos.double(), mag * a_neg.double()
    sp, sn = s_p.sum(1, keepdim=True), s_n.sum(1, keepdim=True)
    t_p = torch.where(sp > 0, s_p / torch.where(sp > 0, sp, 1.0), 0.0)
    t_n = torch.where(sn > 0, s_n / torch.where(sn > 0, sn, 1.0), 0.0)
    d = t_p - t_n
    if variant == "relative":
        d = d / (t_p + t_n + eps)
    return d


def ref_contrastive_sparse(d: torch.Tensor, counts, eligible=None):
    """One total order per row: D ascending then index descending; p+ prunes the head, p- the tail."""
    n, k = d.shape
    keep_p = torch.ones(n, k, dtype=torch.bool)
    keep_n = torch.ones(n, k, dtype=torch.bool)
    for i in range(n):
        row = d[i].tolist()
        idx = [j for j in range(k) if eligible is None or bool(eligible[i, j])]
        order = sorted(idx, key=lambda j: (row[j], -j))
        p = counts[i]
        if p:
            keep_p[i, order[:p]] = False
            keep_n[i, order[-p:]] = False
    return keep_p, keep_n


def assert_selection(got: torch.Tensor, ref: torch.Tensor, ref_scores: torch.Tensor, rtol: float = 1e-5):
    """Same count per row; differences only at fp32 near-ties of the float64 reference scores."""
    got = got.cpu()
    assert got.dtype == torch.bool and got.shape == ref.shape
    assert torch.equal(got.sum(1), ref.sum(1)), "keep count per row differs"
    diff = (got ^ ref).nonzero()
    if diff.numel() == 0:
        return
    scale = ref_scores.abs().amax(dim=1).clamp(min=1e-300)
    for i, j in diff.tolist():
        sel = ref_scores[i][ref[i]]
        unsel = ref_scores[i][~ref[i]]
        # the boundary between the selected and the unselected reference scores
        lo = sel.min() if sel.numel() else unsel.max()
        hi = unsel.max() if unsel.numel() else sel.min()
        near = min(abs(ref_scores[i, j] - lo), abs(ref_scores[i, j] - hi))
        assert near <= rtol * scale[i], f"row {i} col {j}: mismatch far from a tie ({near} vs scale {scale[i]})"


# ---------------------------------------------------------------------------------------- Wanda


@pytest.mark.parametrize("shape", [(1, 172), (37, 64), (23, 33)])
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("activation", ["abs_mean", "l2"])
def test_wanda_matches_reference(shape, rho, activation):
    w = torch.randn(*shape)
    st = FakeStats.random(shape[1])
    got = scoring.wanda(w, st, rho, activation=activation)
    a = st.abs_mean if activation == "abs_mean" else st.l2_norm
    s = ref_wanda_scores(w, a)
    keep = shape[1] - n_pruned(rho, shape[1])
    assert torch.equal(got.sum(1), torch.full((shape[0],), keep))
    assert_selection(got, ref_keep_largest(s, keep), s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wanda_low_precision_weights(dtype):
    w = torch.randn(29, 172).to(dtype)
    st = FakeStats.random(172)
    got = scoring.wanda(w, st, 0.5)
    s = ref_wanda_scores(w, st.abs_mean)
    assert_selection(got, ref_keep_largest(s, 172 - 86), s)


def test_wanda_keep_count_edges():
    w = torch.randn(5, 172)
    st = FakeStats.random(172)
    assert scoring.wanda(w, st, 0.0).all()
    assert torch.equal(scoring.wanda(w, st, 0.999).sum(1), torch.full((5,), 1))
    assert not scoring.wanda(w, st, 1 - 1e-12).any()  # k = 0 as rho -> 1
    assert scoring.num_pruned(0.29, 100) == 29 and scoring.num_pruned(0.5, 33) == 16


def test_wanda_ties_keep_lower_index():
    w = torch.ones(4, 70)
    got = scoring.wanda(w, torch.ones(70), 0.4)
    expected = torch.zeros(4, 70, dtype=torch.bool)
    expected[:, :42] = True
    assert torch.equal(got, expected)
    # partial ties: integer-valued scores, exact in fp32, compared exactly
    w = torch.randint(1, 4, (31, 45)).float() * torch.where(torch.rand(31, 45) < 0.5, -1.0, 1.0)
    a = torch.randint(1, 3, (45,)).double()
    for rho in (0.2, 0.5, 0.77):
        keep = 45 - n_pruned(rho, 45)
        assert torch.equal(scoring.wanda(w, a, rho), ref_keep_largest(ref_wanda_scores(w, a), keep))


@pytest.mark.parametrize("rho", [0.5, 0.25])
def test_chunking_is_invariant(rho):
    w = torch.randn(101, 96)
    st, st2 = FakeStats.random(96), FakeStats.random(96)
    full = scoring.wanda(w, st, rho, chunk_rows=1000)
    for kw in ({"chunk_rows": 1}, {"chunk_rows": 7}, {"memory_budget": 96 * 32 * 5}):
        assert torch.equal(scoring.wanda(w, st, rho, **kw), full)
        assert all(torch.equal(x, y) for x, y in zip(scoring.contrastive_wanda(w, st, st2, rho, **kw),
                                                     scoring.contrastive_wanda(w, st, st2, rho)))
        assert all(torch.equal(x, y) for x, y in zip(scoring.contrastive_sparse(w, st, st2, rho, **kw),
                                                     scoring.contrastive_sparse(w, st, st2, rho)))


def test_packed_output_matches_bool():
    w = torch.randn(13, 172)
    st, st2 = FakeStats.random(172), FakeStats.random(172)
    packed = scoring.wanda(w, st, 0.5, packed=True, chunk_rows=4)
    assert packed.dtype == torch.int32 and packed.shape == (13, 6)
    assert torch.equal(unpack_mask(packed, 172), scoring.wanda(w, st, 0.5))
    for fn in (scoring.contrastive_wanda, scoring.contrastive_sparse):
        for p, b in zip(fn(w, st, st2, 0.5, packed=True, chunk_rows=5), fn(w, st, st2, 0.5)):
            assert torch.equal(unpack_mask(p, 172), b)


# ---------------------------------------------------------------------------------------- Contrastive-Wanda


@pytest.mark.parametrize("phi", ["softplus", "relu"])
@pytest.mark.parametrize("statistic", ["token", "sequence"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_contrastive_wanda_matches_reference(phi, statistic, tau):
    n, k = 19, 172
    w = torch.randn(n, k)
    sp, sn = FakeStats.random(k), FakeStats.random(k)
    kp, kn = scoring.contrastive_wanda(w, sp, sn, 0.5, phi=phi, tau=tau, statistic=statistic)
    mean, var = ("abs_mean", "abs_var") if statistic == "token" else ("seq_l2_mean", "seq_l2_var")
    fp, fn = ref_cwanda_factors(getattr(sp, mean), getattr(sp, var), getattr(sn, mean), getattr(sn, var),
                                phi, tau, 1e-6)
    keep = k - n_pruned(0.5, k)
    for got, f in ((kp, fp), (kn, fn)):
        s = ref_wanda_scores(w, f)
        assert_selection(got, ref_keep_largest(s, keep), s)
    if phi == "relu":  # each side prefers the channels it is more active on
        z_pos = getattr(sp, mean) > getattr(sn, mean)
        assert kp[:, ~z_pos].sum() <= kp[:, z_pos].sum()


def test_contrastive_wanda_identical_stats_equals_magnitude_ranking():
    w = torch.randn(9, 40)
    st = FakeStats.random(40)
    kp, kn = scoring.contrastive_wanda(w, st, st, 0.5)
    assert torch.equal(kp, kn)
    assert torch.equal(kp, ref_keep_largest(w.double().abs(), 20))


# ---------------------------------------------------------------------------------------- Contrastive-Sparse


@pytest.mark.parametrize("shape", [(1, 172), (41, 64), (17, 33)])
@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("variant", ["difference", "relative"])
def test_contrastive_sparse_matches_reference(shape, rho, variant):
    n, k = shape
    w = torch.randn(n, k)
    sp, sn = FakeStats.random(k), FakeStats.random(k)
    kp, kn = scoring.contrastive_sparse(w, sp, sn, rho, variant=variant)
    d = ref_d(w, sp.abs_mean, sn.abs_mean, variant)
    p = n_pruned(rho, k)
    rp, rn = ref_contrastive_sparse(d, [p] * n)
    assert_selection(~kp, ~rp, -d)
    assert_selection(~kn, ~rn, d)
    # pruned sets are disjoint; every row keeps exactly K - p on each side
    assert not (~kp & ~kn).any()
    assert torch.equal(kp.sum(1), torch.full((n,), k - p)) and torch.equal(kn.sum(1), torch.full((n,), k - p))
    if rho == 0.5:
        both = (kp & kn).sum(1)
        assert torch.equal(both, torch.full((n,), k % 2))  # partition (even K) / one shared entry (odd K)


def test_contrastive_sparse_l2_activation_and_dtypes():
    for dtype in DTYPES:
        w = torch.randn(11, 96).to(dtype)
        sp, sn = FakeStats.random(96), FakeStats.random(96)
        kp, kn = scoring.contrastive_sparse(w, sp, sn, 0.3, activation="l2")
        d = ref_d(w, sp.l2_norm, sn.l2_norm)
        rp, rn = ref_contrastive_sparse(d, [28] * 11)
        assert_selection(~kp, ~rp, -d)
        assert_selection(~kn, ~rn, d)


@pytest.mark.parametrize("k", [10, 11])
def test_contrastive_sparse_ties(k):
    # identical statistics: D == 0 exactly, the tie rule alone decides
    w = torch.randn(3, k)
    st = FakeStats.random(k)
    kp, kn = scoring.contrastive_sparse(w, st, st, 0.5)
    p = k // 2
    exp_p = torch.ones(3, k, dtype=torch.bool)
    exp_p[:, k - p:] = False  # p+ prunes the highest indices (keeps the lower ones)
    exp_n = torch.ones(3, k, dtype=torch.bool)
    exp_n[:, :p] = False  # p- prunes the lowest indices
    assert torch.equal(kp, exp_p) and torch.equal(kn, exp_n)
    assert not (~kp & ~kn).any()
    # integer-valued ties against the reference, compared exactly
    w = torch.randint(1, 3, (23, k)).float()
    a_p, a_n = torch.randint(1, 3, (k,)).double(), torch.randint(1, 3, (k,)).double()
    d = ref_d(w, a_p, a_n)
    for rho in (0.2, 0.5):
        kp, kn = scoring.contrastive_sparse(w, a_p, a_n, rho)
        rp, rn = ref_contrastive_sparse(d, [n_pruned(rho, k)] * 23)
        assert_selection(~kp, ~rp, -d, rtol=1e-6)
        assert_selection(~kn, ~rn, d, rtol=1e-6)
        assert not (~kp & ~kn).any()


def test_contrastive_sparse_zero_rows():
    w = torch.randn(4, 20)
    w[1] = 0.0  # a row with zero total score normalises to D = 0
    sp, sn = FakeStats.random(20), FakeStats.random(20)
    kp, kn = scoring.contrastive_sparse(w, sp, sn, 0.5)
    assert torch.equal(kp[1], torch.arange(20) < 10) and torch.equal(kn[1], torch.arange(20) >= 10)


@pytest.mark.parametrize("rho", [0.5, 0.3])
def test_contrastive_sparse_restrict_to(rho):
    n, k = 15, 70
    w = torch.randn(n, k)
    sp, sn, sm = FakeStats.random(k), FakeStats.random(k), FakeStats.random(k)
    prunable = ~scoring.wanda(w, sm, 0.4)
    prunable[3] = False  # a row where nothing may be pruned
    kp, kn = scoring.contrastive_sparse(w, sp, sn, rho, restrict_to=prunable)
    d = ref_d(w, sp.abs_mean, sn.abs_mean)
    counts = [n_pruned(rho, int(c)) for c in prunable.sum(1)]
    rp, rn = ref_contrastive_sparse(d, counts, eligible=prunable)
    assert_selection(~kp, ~rp, torch.where(prunable, -d, -1e9))
    assert_selection(~kn, ~rn, torch.where(prunable, d, -1e9))
    assert not (~kp & ~prunable).any() and not (~kn & ~prunable).any()
    assert not (~kp & ~kn).any()
    assert kp[3].all() and kn[3].all()


# ---------------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("k", [172, 64])
def test_compose_equals_bool_ops(k):
    masks = [torch.rand(9, k) < 0.6 for _ in range(4)]
    packed = [pack_mask(m) for m in masks]
    and_ = scoring.compose(packed, "and")
    or_ = scoring.compose(packed, op="or")
    assert torch.equal(unpack_mask(and_, k), masks[0] & masks[1] & masks[2] & masks[3])
    assert torch.equal(unpack_mask(or_, k), masks[0] | masks[1] | masks[2] | masks[3])
    assert torch.equal(and_, pack_mask(unpack_mask(and_, k)))  # padding bits still zero
    assert torch.equal(scoring.compose(packed[:1]), packed[0]) and scoring.compose(packed[:1]) is not packed[0]


# ---------------------------------------------------------------------------------------- validation


def test_invalid_arguments_name_the_argument():
    w = torch.randn(4, 16)
    st = FakeStats.random(16)
    with pytest.raises(ValueError, match="'sparsity'"):
        scoring.wanda(w, st, 1.0)
    with pytest.raises(ValueError, match="'sparsity'"):
        scoring.wanda(w, st, -0.1)
    with pytest.raises(ValueError, match="'sparsity'"):
        scoring.wanda(w, st, float("nan"))
    with pytest.raises(ValueError, match="'sparsity'"):
        scoring.contrastive_sparse(w, st, st, 0.51)
    with pytest.raises(ValueError, match="'stats.abs_mean'.*16"):
        scoring.wanda(w, FakeStats.random(17), 0.5)
    with pytest.raises(ValueError, match="'stats_neg.abs_mean'"):
        scoring.contrastive_wanda(w, st, FakeStats.random(15), 0.5)
    with pytest.raises(TypeError, match="'stats'.*abs_mean"):
        scoring.wanda(w, object(), 0.5)
    with pytest.raises(ValueError, match="'phi'"):
        scoring.contrastive_wanda(w, st, st, 0.5, phi="gelu")
    with pytest.raises(ValueError, match="'statistic'"):
        scoring.contrastive_wanda(w, st, st, 0.5, statistic="batch")
    with pytest.raises(ValueError, match="'tau'"):
        scoring.contrastive_wanda(w, st, st, 0.5, tau=0.0)
    with pytest.raises(ValueError, match="'activation'"):
        scoring.wanda(w, st, 0.5, activation="mean")
    with pytest.raises(ValueError, match="'variant'"):
        scoring.contrastive_sparse(w, st, st, 0.5, variant="ratio")
    with pytest.raises(ValueError, match="'restrict_to'"):
        scoring.contrastive_sparse(w, st, st, 0.5, restrict_to=torch.ones(4, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="'restrict_to'"):
        scoring.contrastive_sparse(w, st, st, 0.5, restrict_to=torch.ones(4, 16))
    with pytest.raises(ValueError, match="'weight'"):
        scoring.wanda(torch.randn(16), st, 0.5)
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="'weight'.*row 2"):
        scoring.wanda(bad, st, 0.5)
    nonfinite = FakeStats.random(16)
    nonfinite.abs_mean[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        scoring.wanda(w, nonfinite, 0.5)
    with pytest.raises(ValueError, match="'chunk_rows'"):
        scoring.wanda(w, st, 0.5, chunk_rows=0)
    with pytest.raises(ValueError, match="'op'"):
        scoring.compose([pack_mask(w > 0)], op="xor")
    with pytest.raises(ValueError, match="'packed_masks'"):
        scoring.compose([pack_mask(w > 0), pack_mask(w[:3] > 0)])
    with pytest.raises(ValueError, match="'packed_masks'"):
        scoring.compose([])


def test_non_contiguous_weight():
    w = torch.randn(64, 40).t()  # [40, 64] non-contiguous
    st = FakeStats.random(64)
    assert torch.equal(scoring.wanda(w, st, 0.5), scoring.wanda(w.contiguous(), st, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    w = torch.randn(300, 172)
    sp, sn = FakeStats.random(172), FakeStats.random(172)
    assert torch.equal(scoring.wanda(w.cuda(), sp, 0.5).cpu(), scoring.wanda(w, sp, 0.5))
    for fn in (scoring.contrastive_wanda, scoring.contrastive_sparse):
        for g, c in zip(fn(w.cuda(), sp, sn, 0.5), fn(w, sp, sn, 0.5)):
            assert g.is_cuda and (g.cpu() ^ c).float().mean() < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("persona_kernels.stats") is None, reason="persona_kernels.stats not written yet")
def test_real_activation_stats():
    from persona_kernels.stats import ActivationStats

    k = 48
    x_pos = torch.randn(6, 10, k) * torch.linspace(0.5, 2.0, k)
    x_neg = torch.randn(6, 10, k) * torch.linspace(2.0, 0.5, k)
    st_pos, st_neg = ActivationStats(k), ActivationStats(k)
    st_pos.update(x_pos, backend="torch")
    st_neg.update(x_neg, backend="torch")
    w = torch.randn(12, k)
    got = scoring.wanda(w, st_pos, 0.5)
    s = ref_wanda_scores(w, x_pos.double().abs().reshape(-1, k).mean(0))
    assert_selection(got, ref_keep_largest(s, k // 2), s, rtol=1e-4)
    kp, kn = scoring.contrastive_wanda(w, st_pos, st_neg, 0.5)
    xa_p, xa_n = x_pos.double().abs().reshape(-1, k), x_neg.double().abs().reshape(-1, k)
    fp, fn = ref_cwanda_factors(xa_p.mean(0), xa_p.var(0, unbiased=False), xa_n.mean(0), xa_n.var(0, unbiased=False),
                                "softplus", 1.0, 1e-6)
    for g, f in ((kp, fp), (kn, fn)):
        s = ref_wanda_scores(w, f)
        assert_selection(g, ref_keep_largest(s, k // 2), s, rtol=1e-4)
    kp, kn = scoring.contrastive_sparse(w, st_pos, st_neg, 0.5)
    assert not (~kp & ~kn).any()
    with pytest.raises(ValueError, match="'stats_neg'.*no calibration data"):
        scoring.contrastive_wanda(w, st_pos, ActivationStats(k), 0.5)


def test_torch_selection_path_matches_numpy_path(monkeypatch):
    """GPUs use torch.topk instead of numpy.partition: the same masks, checked here on CPU."""
    w = torch.randn(41, 172)
    w[3] = 0.5  # a fully tied row
    sp, sn, sm = FakeStats.random(172), FakeStats.random(172), FakeStats.random(172)
    prunable = ~scoring.wanda(w, sm, 0.4)
    expected = [scoring.wanda(w, sp, rho) for rho in (0.1, 0.5, 0.9)]
    expected.append(scoring.contrastive_sparse(w, sp, sn, 0.5, restrict_to=prunable))
    expected.append(scoring.contrastive_wanda(w, sp, sn, 0.3, phi="relu"))
    expected += [scoring.contrastive_sparse(w, sp, sn, rho) for rho in (0.2, 0.5)]
    expected.append(scoring.contrastive_sparse(w, sp, sp, 0.3))  # all D == 0: ties everywhere
    monkeypatch.setattr(scoring, "_use_numpy", lambda scores: False)
    got = [scoring.wanda(w, sp, rho) for rho in (0.1, 0.5, 0.9)]
    got.append(scoring.contrastive_sparse(w, sp, sn, 0.5, restrict_to=prunable))
    got.append(scoring.contrastive_wanda(w, sp, sn, 0.3, phi="relu"))
    got += [scoring.contrastive_sparse(w, sp, sn, rho) for rho in (0.2, 0.5)]
    got.append(scoring.contrastive_sparse(w, sp, sp, 0.3))
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert all(torch.equal(x, y) for x, y in zip(g, e))
        else:
            assert torch.equal(g, e)


def test_select_largest_per_row_counts():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([1, 2, 0])
    got = scoring.select_largest(scores, counts, prefer_low_index=True)
    assert got.tolist() == [[True, False, False, False], [True, True, False, False], [False] * 4]
    got = scoring.select_largest(scores, counts, prefer_low_index=False)
    assert got.tolist() == [[False, False, True, False], [False, False, True, True], [False] * 4]


def test_select_largest_rejects_nan():
    scores = torch.rand(3, 10)
    scores[1, :] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scoring.select_largest(scores, 4)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None)
    @given(
        rows=st.integers(1, 4),
        k=st.integers(1, 40),
        data=st.data(),
    )
    def test_select_largest_property(rows, k, data):
        """Any small integer-valued scores (many ties): exact agreement with the sorted reference."""
        values = data.draw(st.lists(st.integers(0, 3), min_size=rows * k, max_size=rows * k))
        count = data.draw(st.integers(0, k))
        scores = torch.tensor(values, dtype=torch.float32).reshape(rows, k)
        assert torch.equal(scoring.select_largest(scores, count), ref_keep_largest(scores.double(), count))
        if 2 * count <= k:
            small, large = scoring._select_both_ends(scores, count)
            rp, rn = ref_contrastive_sparse(scores.double(), [count] * rows)
            assert torch.equal(small, ~rp) and torch.equal(large, ~rn)


# ---------------------------------------------------------------------------------------- C++ selection
# The CPU op persona_kernels_C::select_mask_cpu (csrc/select_cpu.cpp) must give exactly the masks of the
# torch / NumPy path (the same tie rule), on rows long enough for its sampled bracket (K > 1024), on ties,
# signed values, rows of very different scales (the previous row's bracket misses) and any count.

needs_select_op = pytest.mark.skipif(scoring._select_op() is None, reason="compiled extension not built")


def _both_paths(monkeypatch, fn):
    native = fn()
    with monkeypatch.context() as m:
        m.setattr(scoring, "_select_op", lambda: None)
        fallback = fn()
    return native, fallback


def _weights(kind: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    if kind == "ties":  # few distinct magnitudes: long runs of equal scores at the threshold
        w = torch.randint(-3, 4, (n, k), generator=gen).float()
    elif kind == "row_scales":  # rows 1e-6 .. 1e6 apart: the previous row's bracket is useless
        w = w * torch.exp(torch.randn(n, 1, generator=gen) * 7)
    elif kind == "zeros":  # many exact zeros (and -0.0) among the smallest
        w = torch.where(torch.rand(n, k, generator=gen) < 0.3, torch.zeros(()), w)
        w[:, ::7] = -0.0
    return w


@needs_select_op
@pytest.mark.parametrize("kind", ["normal", "ties", "row_scales", "zeros"])
@pytest.mark.parametrize("k", [1, 33, 300, 1025, 5003])
@pytest.mark.parametrize("rho", [0.0, 0.001, 0.02, 0.5, 0.97])
def test_native_wanda_equals_fallback(monkeypatch, kind, k, rho):
    gen = torch.Generator().manual_seed(k + int(rho * 1000))
    w = _weights(kind, 9, k, gen)
    a = torch.rand(k, generator=gen, dtype=torch.float64) + 0.05
    if kind == "ties":
        a = torch.randint(1, 3, (k,), generator=gen).double()
    native, fallback = _both_paths(monkeypatch, lambda: scoring.wanda(w, a, rho))
    assert torch.equal(native, fallback)
    assert torch.equal(native.sum(1), torch.full((9,), k - n_pruned(rho, k)))
    packed, _ = _both_paths(monkeypatch, lambda: scoring.wanda(w, a, rho, packed=True))
    assert torch.equal(packed, pack_mask(native))


@needs_select_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_low_precision_and_noncontiguous(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3000, 40, generator=gen).to(dtype).t()  # [40, 3000], non-contiguous
    st = FakeStats.random(3000)
    for rho in (0.02, 0.5):
        native, fallback = _both_paths(monkeypatch, lambda: scoring.wanda(w, st, rho))
        assert torch.equal(native, fallback)
        s = ref_wanda_scores(w, st.abs_mean)
        assert_selection(native, ref_keep_largest(s, 3000 - n_pruned(rho, 3000)), s)


@needs_select_op
@pytest.mark.parametrize("phi", ["softplus", "relu"])
def test_native_contrastive_equals_fallback(monkeypatch, phi):
    gen = torch.Generator().manual_seed(2)
    w = _weights("zeros", 17, 2111, gen)
    sp, sn = FakeStats.random(2111), FakeStats.random(2111)
    for rho in (0.02, 0.5):
        nat, fb = _both_paths(monkeypatch, lambda: scoring.contrastive_wanda(w, sp, sn, rho, phi=phi))
        assert all(torch.equal(x, y) for x, y in zip(nat, fb))
    for variant in ("difference", "relative"):
        for rho in (0.02, 0.5):
            nat, fb = _both_paths(monkeypatch, lambda: scoring.contrastive_sparse(w, sp, sn, rho, variant=variant))
            assert all(torch.equal(x, y) for x, y in zip(nat, fb))
    prunable = ~scoring.wanda(w, sp, 0.4)
    nat, fb = _both_paths(monkeypatch, lambda: scoring.contrastive_sparse(w, sp, sn, 0.3, restrict_to=prunable))
    assert all(torch.equal(x, y) for x, y in zip(nat, fb))


@needs_select_op
def test_native_select_largest_counts_signed_and_infinite(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-4, 5, (12, 1500), generator=gen).float() * 0.5
    scores[0, :100] = float("-inf")
    scores[1] = -0.0
    scores[2, ::3] = float("inf")
    counts = torch.randint(0, 1501, (12,), generator=gen)
    counts[3], counts[4] = 0, 1500
    for prefer_low in (True, False):
        nat, fb = _both_paths(monkeypatch, lambda: scoring.select_largest(scores, counts, prefer_low_index=prefer_low))
        assert torch.equal(nat, fb)
        assert torch.equal(nat.sum(1), counts)
        for c in (1, 37, 750, 1499):
            nat, fb = _both_paths(monkeypatch, lambda: scoring.select_largest(scores, c, prefer_low_index=prefer_low))
            assert torch.equal(nat, fb)


@needs_select_op
def test_native_threads_do_not_change_masks():
    gen = torch.Generator().manual_seed(4)
    w = _weights("row_scales", 300, 1800, gen)
    a = torch.rand(1800, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = scoring.wanda(w, a, 0.3)
        torch.set_num_threads(2)
        two = scoring.wanda(w, a, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_select_op
def test_native_errors_name_the_row():
    w = torch.randn(6, 2000)
    w[4, 7] = float("inf")
    with pytest.raises(ValueError, match="'weight'.*row 4"):
        scoring.wanda(w, torch.ones(2000), 0.5)
    s = torch.rand(5, 2000)
    s[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 3"):
        scoring.select_largest(s, 10)
