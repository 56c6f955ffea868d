"""ActivationStats: running statistics vs float64 over many batches, merges, masks, state, errors."""

from __future__ import annotations

import pytest
import torch

from persona_kernels import dispatch
from persona_kernels.ops.welford import WelfordPartials
from persona_kernels.stats import ActivationStats

BACKENDS = [b for b in dict.fromkeys(dispatch.available_backends("cpu")) if b != "triton"]
PROPS = ("mean", "var", "abs_mean", "abs_var", "sq_mean", "l2_norm", "seq_l2_mean", "seq_l2_var")


def _reference(batches: list[tuple[torch.Tensor, torch.Tensor | None]], k: int) -> dict[str, torch.Tensor]:
    """float64 statistics of all valid finite tokens of 3-D batches [B, T, K] (token masks [B, T])."""
    vals, l2s, nonfinite = [], [], 0
    for x, m in batches:
        xd = x.double()
        m = torch.ones(x.shape[:-1], dtype=torch.bool) if m is None else m
        tok = xd[m]  # [n, K]
        nonfinite += int((~torch.isfinite(tok)).sum())
        vals.append(tok)
        fin = torch.where(torch.isfinite(xd) & m[..., None], xd, 0.0)
        l2 = fin.pow(2).sum(-2).sqrt().reshape(-1, k)
        l2s.append(l2[m.reshape(-1, x.shape[-2]).any(1)])
    v = torch.cat(vals)
    ok = torch.isfinite(v)
    n = ok.sum(0)
    z = torch.where(ok, v, 0.0)
    mean = z.sum(0) / n.clamp_min(1)
    var = torch.where(ok, v - mean, 0.0).pow(2).sum(0) / n.clamp_min(1)
    amean = z.abs().sum(0) / n.clamp_min(1)
    avar = torch.where(ok, v.abs() - amean, 0.0).pow(2).sum(0) / n.clamp_min(1)
    l2 = torch.cat(l2s)
    return {
        "count": n, "mean": mean, "var": var, "abs_mean": amean, "abs_var": avar,
        "sq_mean": z.pow(2).sum(0) / n.clamp_min(1), "l2_norm": z.pow(2).sum(0).sqrt(),
        "seq_count": torch.full((k,), l2.shape[0], dtype=torch.int64),
        "seq_l2_mean": l2.mean(0), "seq_l2_var": l2.var(0, unbiased=False),
        "nonfinite": torch.tensor(nonfinite),
    }


def _assert_matches(stats: ActivationStats, ref: dict[str, torch.Tensor], rtol: float = 2e-5) -> None:
    torch.testing.assert_close(stats.count, ref["count"], rtol=0, atol=0)
    torch.testing.assert_close(stats.seq_count, ref["seq_count"], rtol=0, atol=0)
    assert int(stats.nonfinite) == int(ref["nonfinite"])
    for name in PROPS:
        got = getattr(stats, name)
        assert got.dtype == torch.float64 and got.shape == (stats.num_channels,)
        scale = ref[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got, ref[name], rtol=rtol, atol=rtol * 1e-3 * float(scale), msg=name)


def _batches(gen: torch.Generator, k: int, count: int, nonfinite: bool = False):
    mean = torch.randn(k, generator=gen) * 50
    std = 10 ** (torch.rand(k, generator=gen) * 2 - 1)
    out = []
    for i in range(count):
        b, t = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        x = mean + std * torch.randn(b, t, k, generator=gen)
        if nonfinite and i % 3 == 0:
            x[0, 0, 0] = float("nan")
            x[-1, -1, -1] = float("-inf")
        m = torch.rand(b, t, generator=gen) > 0.25 if i % 2 else None
        out.append((x, m))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_vs_float64_over_many_batches(backend):
    gen = torch.Generator().manual_seed(0)
    k = 172
    batches = _batches(gen, k, 40, nonfinite=True)
    stats = ActivationStats(k)
    for x, m in batches:
        stats.update(x, m, backend=backend)
    _assert_matches(stats, _reference(batches, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_and_fp16_batches(backend):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        batches = [(x.to(dtype), m) for x, m in _batches(gen, 33, 10)]
        stats = ActivationStats(33)
        for x, m in batches:
            stats.update(x, m, backend=backend)
        _assert_matches(stats, _reference(batches, 33))


def test_merge_of_many_small_equals_one_big():
    gen = torch.Generator().manual_seed(2)
    k, t = 40, 6
    x = torch.randn(48, t, k, generator=gen) * 3 + 100
    mask = torch.rand(48, t, generator=gen) > 0.2
    big = ActivationStats(k)
    big.update(x, mask)
    parts = []
    for i in range(0, 48, 5):
        s = ActivationStats(k)
        s.update(x[i:i + 5], mask[i:i + 5])
        parts.append(s)
    merged = ActivationStats.merge_all(parts)
    torch.testing.assert_close(merged.count, big.count, rtol=0, atol=0)
    torch.testing.assert_close(merged.seq_count, big.seq_count, rtol=0, atol=0)
    for name in PROPS:
        torch.testing.assert_close(getattr(merged, name), getattr(big, name), rtol=1e-5, atol=1e-9, msg=name)
    # merging in a different grouping gives the same state
    left = ActivationStats.merge_all(parts[:4]).merge(ActivationStats.merge_all(parts[4:]))
    for name in PROPS:
        torch.testing.assert_close(getattr(left, name), getattr(merged, name), rtol=1e-10, atol=1e-12)
    # merging an empty one is a no-op
    before = merged.state_dict()
    merged.merge(ActivationStats(k))
    for key, value in merged.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_masked_padded_batch_equals_unpadded():
    gen = torch.Generator().manual_seed(3)
    k, lengths = 24, [5, 1, 7, 3]
    seqs = [torch.randn(n, k, generator=gen) * 2 - 1 for n in lengths]
    padded = torch.full((len(seqs), max(lengths), k), float("nan"))  # padding is garbage
    mask = torch.zeros(len(seqs), max(lengths), dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    a, b = ActivationStats(k), ActivationStats(k)
    a.update(padded, mask)
    for s in seqs:
        b.update(s.unsqueeze(0))
    assert int(a.nonfinite) == 0  # masked padding is not counted as non-finite
    torch.testing.assert_close(a.count, b.count, rtol=0, atol=0)
    torch.testing.assert_close(a.seq_count, torch.full((k,), len(seqs), dtype=torch.int64), rtol=0, atol=0)
    for name in PROPS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-8, msg=name)


def test_counts_exact_past_2_pow_24():
    k = 1
    stats = ActivationStats(k)
    n_b = 2**24 + 1
    for i in range(5):  # synthetic partials: fp32 counts would have lost the +1s
        p = WelfordPartials(torch.tensor([n_b]), torch.tensor([float(i)]), torch.tensor([2.0 * n_b]),
                            torch.tensor([float(i)]), torch.tensor([0.0]), torch.zeros(0, k))
        stats.update_from_partials(p, rows=n_b)
    assert int(stats.count) == 5 * n_b
    torch.testing.assert_close(stats.mean, torch.tensor([2.0], dtype=torch.float64))
    # population variance: within-batch 2.0 plus between-batch variance of 0..4 (= 2.0)
    torch.testing.assert_close(stats.var, torch.tensor([4.0], dtype=torch.float64))
    assert int(stats.nonfinite) == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ kernels not built")
def test_counts_exact_big_batch_cpu_kernel():
    rows = 2**24 + 3
    x = torch.full((rows, 1), 1.5, dtype=torch.bfloat16)
    x[::1000] = -0.5
    x[7] = float("nan")
    stats = ActivationStats(1)
    stats.update(x, backend="cpu")
    assert int(stats.count) == rows - 1 and int(stats.nonfinite) == 1
    n_neg = len(range(0, rows, 1000))
    expected = (1.5 * (rows - 1 - n_neg) - 0.5 * n_neg) / (rows - 1)
    torch.testing.assert_close(stats.mean, torch.tensor([expected], dtype=torch.float64), rtol=1e-6, atol=0)


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(4)
    stats = ActivationStats(13)
    for x, m in _batches(gen, 13, 5, nonfinite=True):
        stats.update(x, m)
    state = stats.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "s.safetensors"))
    loaded = load_file(str(tmp_path / "s.safetensors"))
    again = ActivationStats.from_state_dict(loaded)
    other = ActivationStats(13)
    other.load_state_dict(loaded)
    for s in (again, other):
        for key, value in s.state_dict().items():
            assert torch.equal(value, state[key]), key
    # state_dict is a copy: later updates do not change it
    stats.update(torch.randn(2, 13))
    assert not torch.equal(stats.count, state["count"])


def test_load_state_dict_errors():
    stats = ActivationStats(4)
    good = stats.state_dict()
    with pytest.raises(KeyError, match="missing \\['m2'\\]"):
        stats.load_state_dict({k: v for k, v in good.items() if k != "m2"})
    with pytest.raises(KeyError, match="unexpected \\['extra'\\]"):
        stats.load_state_dict({**good, "extra": torch.zeros(4)})
    with pytest.raises(ValueError, match="'mean': expected shape \\[4\\]"):
        stats.load_state_dict({**good, "mean": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(TypeError, match="'count': expected an integer"):
        stats.load_state_dict({**good, "count": torch.zeros(4)})
    with pytest.raises(ValueError, match="non-negative"):
        stats.load_state_dict({**good, "count": torch.full((4,), -1)})
    with pytest.raises(TypeError, match="argument 'state'"):
        stats.load_state_dict([1, 2])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="argument 'num_channels'"):
        ActivationStats(0)
    with pytest.raises(TypeError, match="argument 'num_channels'"):
        ActivationStats(3.0)  # type: ignore[arg-type]
    stats = ActivationStats(4)
    with pytest.raises(ValueError, match="argument 'x'.*num_channels=4"):
        stats.update(torch.randn(2, 5))
    with pytest.raises(ValueError, match="argument 'token_mask'"):
        stats.update(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="argument 'other'"):
        stats.merge(ActivationStats(5))
    with pytest.raises(TypeError, match="argument 'partials'"):
        stats.update_from_partials((torch.zeros(4),))
    bad = (torch.zeros(4, dtype=torch.int64), torch.zeros(3), torch.zeros(4), torch.zeros(4), torch.zeros(4),
           torch.zeros(0, 4))
    with pytest.raises(ValueError, match="argument 'partials': mean"):
        stats.update_from_partials(bad)
    ok = (torch.ones(4, dtype=torch.int64), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4),
          torch.ones(2, 4))
    with pytest.raises(ValueError, match="argument 'seq'"):
        stats.update_from_partials(ok, seq=torch.ones(3, dtype=torch.bool))
    assert int(stats.count.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_never_produces_nan(backend):
    stats = ActivationStats(6)
    x = torch.randn(2, 5, 6)
    x[..., 0] = float("nan")  # a channel that never has a finite value
    x[0, :, 1] = float("inf")
    x[1, 2, 2] = float("-inf")
    stats.update(x, backend=backend)
    stats.update(torch.empty(0, 6), backend=backend)  # empty batch
    stats.update(torch.randn(1, 3, 6), torch.zeros(1, 3, dtype=torch.bool), backend=backend)  # all masked
    for name in PROPS:
        assert bool(torch.isfinite(getattr(stats, name)).all()), name
    assert int(stats.count[0]) == 0 and float(stats.mean[0]) == 0.0
    assert int(stats.nonfinite) == 10 + 5 + 1
    assert int(stats.seq_count[0]) == 2  # the fully masked sequence does not count
    fresh = ActivationStats(6)
    for name in PROPS:
        assert bool((getattr(fresh, name) == 0).all())


def test_to_and_clone_are_independent():
    stats = ActivationStats(3)
    stats.update(torch.randn(4, 3))
    copy = stats.clone()
    copy.update(torch.randn(4, 3))
    assert int(stats.count[0]) == 4 and int(copy.count[0]) == 8
    assert stats.to("cpu") is stats and stats.device == torch.device("cpu")
    meta = stats.clone().to("meta")
    assert meta.device.type == "meta" and meta.count.shape == (3,)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("pdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_in_place_merge_equals_tensor_op_merge(pdtype, masked):
    """The one-pass C++ merge (used by welford_update / linear_with_stats on CPU) gives the same state as the
    tensor-op merge, including non-finite counts, empty channels, sequences without valid tokens and K % 32 != 0."""
    from persona_kernels.stats import _seq_info

    gen = torch.Generator().manual_seed(7)
    k, b, t = 45, 5, 7
    fused, plain = ActivationStats(k), ActivationStats(k)
    for step in range(4):
        x = torch.randn(b, t, k, generator=gen) * (1 + step)
        x[0, 1, 3] = float("inf")
        x[2, :, 5] = float("nan")  # channel 5 of sequence 2 has no finite value
        mask = torch.rand(b, t, generator=gen) > 0.3 if masked else None
        if mask is not None:
            mask[1] = False  # a sequence with no valid token
        partials = dispatch.get_kernel("welford_partials", "cpu", torch.device("cpu"))(
            x.reshape(-1, k), None if mask is None else mask.reshape(-1), t)
        partials = tuple(p.to(pdtype) if p.is_floating_point() else p for p in partials)
        assert fused._merge_partials_cpu(partials, None if mask is None else mask.reshape(-1), t, b * t)
        seq, rows = _seq_info(None if mask is None else mask.reshape(-1), b * t, t)
        plain.update_from_partials(WelfordPartials(*partials), seq=seq, rows=rows)
    a, p = fused.state_dict(), plain.state_dict()
    for key in a:
        if a[key].dtype == torch.int64:
            assert torch.equal(a[key], p[key]), key
        else:
            torch.testing.assert_close(a[key], p[key], rtol=1e-12, atol=1e-12, msg=key)
    assert int(fused.nonfinite) > 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("pdtype", [torch.float32, torch.float64])
def test_cpu_in_place_merge_same_bits_on_every_isa(monkeypatch, pdtype):
    """The merge's vectorised variants (AVX-512, AVX2) and the portable one give bit-identical states: counts
    with empty channels, NaN/negative sums of squares, sequences without valid rows, K over several blocks."""
    gen = torch.Generator().manual_seed(17)
    k, b, t = 600, 6, 5
    steps = []
    for step in range(3):
        count = torch.randint(0, 4, (k,), generator=gen)
        count[::7] = 0
        moments = [torch.randn(k, generator=gen, dtype=torch.float64).to(pdtype) * 10 ** step for _ in range(4)]
        moments[1] = moments[1].abs()
        moments[3] = moments[3].abs()
        seq = (torch.randn(b, k, generator=gen, dtype=torch.float64) * 5).to(pdtype)
        seq[0, :3] = float("nan")
        seq[1, 3:6] = -1.0
        mask = torch.rand(b * t, generator=gen) > 0.3
        mask[t:2 * t] = False  # sequence 1 has no valid row
        steps.append(((count, *moments, seq), mask))
    states = {}
    for isa in ("portable", "avx2", "avx512"):
        monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", isa)
        st = ActivationStats(k)
        for partials, mask in steps:
            assert st._merge_partials_cpu(partials, mask, t, b * t)
        states[isa] = st.state_dict()
    for isa in ("avx2", "avx512"):
        for key, value in states["portable"].items():
            assert torch.equal(value, states[isa][key]), (isa, key)
    assert bool(torch.isfinite(states["portable"]["mean"]).all())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not built")
def test_cpu_in_place_merge_rejects_bad_state():
    s = ActivationStats(8)
    parts = (torch.ones(8, dtype=torch.int64),) + tuple(torch.rand(8) for _ in range(4)) + (torch.zeros(0, 8),)
    with pytest.raises(RuntimeError, match="argument 'row_mask'"):
        s._merge_partials_cpu(parts, torch.ones(3, dtype=torch.bool), 0, 4)  # 3 mask rows for 4 rows
    # partials that the op does not take (non-contiguous) fall back to the tensor-op merge
    odd = (parts[0],) + tuple(torch.rand(16)[::2] for _ in range(4)) + (parts[5],)
    assert not s._merge_partials_cpu(odd, None, 0, 1)


# --------------------------------------------------------------------------------------------- aliasing
@pytest.mark.parametrize("path", ["cpp", "tensor"])
def test_properties_follow_updates_on_every_path(monkeypatch, path):
    """One aliasing rule: the state is written in place by update, merge and load_state_dict, on the C++
    merge and on the tensor-op merge alike, so stored properties read earlier follow later updates."""
    import persona_kernels.stats as stats_mod

    if path == "tensor":
        monkeypatch.setattr(stats_mod, "_has_merge_op", lambda: False)
    elif not stats_mod._has_merge_op():
        pytest.skip("compiled extension not built")
    gen = torch.Generator().manual_seed(5)
    s = ActivationStats(7)
    views = {name: getattr(s, name) for name in ("count", "mean", "abs_mean", "seq_count", "seq_l2_mean", "nonfinite")}
    x = torch.randn(3, 5, 7, generator=gen)
    x[0, 0, 0] = float("inf")
    s.update(x, backend="cpu" if path == "cpp" else "torch")
    for name, view in views.items():
        assert torch.equal(view, getattr(s, name)), name
    assert int(views["count"][1]) == 15 and int(views["nonfinite"]) == 1
    other = ActivationStats(7)
    other.update(torch.randn(4, 2, 7, generator=gen))
    s.merge(other)
    assert int(views["count"][1]) == 23 and torch.equal(views["mean"], s.mean)
    s.load_state_dict(other.state_dict())
    assert torch.equal(views["mean"], other.mean) and int(views["count"][0]) == 8
    before = s.mean.clone()
    derived = s.var
    s.update(torch.randn(2, 7, generator=gen) + 3)
    assert not torch.equal(views["mean"], before) and torch.equal(views["mean"], s.mean)
    assert not torch.equal(derived, s.var)  # derived properties are computed when read


def test_no_import_cycle_between_stats_and_welford():
    import subprocess
    import sys

    code = ("import sys, persona_kernels.ops.welford as w; assert 'persona_kernels.stats' not in sys.modules; "
            "import inspect; src = inspect.getsource(w); assert 'persona_kernels.stats import' not in src")
    subprocess.run([sys.executable, "-c", code], check=True)
