"""Whole-model calibration recorder: statistics vs a float64 hook reference, padding, sharing, restoring."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

from persona_kernels.calibration import (
    CalibrationStats,
    NonFiniteActivationsError,
    StatsRecorder,
    collect_stats,
    resolve_target_modules,
)
from persona_kernels.utils.batching import pad_right

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


def _sequences(n: int = 4, seed: int = 5, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 1, 6, 11, 4, 7][:n]
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lengths]


def _pad(seqs: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right padding (real tokens keep their positions), the package's own padding."""
    ids, mask = pad_right(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def _reference(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """float64 statistics of each named Linear's input over the recorded tokens, via plain forward hooks."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().double()
            keep = current["mask"].reshape(-1)
            rows[name].append(x.reshape(-1, x.shape[-1])[keep])
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                mask = batch.pop("stats_mask", None)
                am = batch.get("attention_mask")
                keep = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if am is None else am.bool()
                if mask is not None:
                    keep = keep & mask.bool()
                current["mask"] = keep
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        x = torch.cat(rows[n])
        out[n] = {
            "count": torch.full((x.shape[1],), x.shape[0], dtype=torch.int64),
            "mean": x.mean(0),
            "var": x.var(0, unbiased=False),
            "abs_mean": x.abs().mean(0),
            "abs_var": x.abs().var(0, unbiased=False),
            "sq_mean": (x * x).mean(0),
            "l2_norm": (x * x).sum(0).sqrt(),
        }
    return out


def _assert_matches(stats, ref, rtol: float, atol: float) -> None:
    assert set(stats) == set(ref)
    for name, r in ref.items():
        s = stats[name]
        torch.testing.assert_close(s.count.cpu(), r["count"], rtol=0, atol=0, msg=lambda m: f"{name}.count: {m}")
        for key in ("mean", "var", "abs_mean", "abs_var", "sq_mean", "l2_norm"):
            got = getattr(s, key).double().cpu()
            torch.testing.assert_close(got, r[key], rtol=rtol, atol=atol, msg=lambda m: f"{name}.{key}: {m}")


def _default_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


# ------------------------------------------------------------------------------------------- correctness
def test_matches_float64_hook_reference(tiny):
    batches = [_pad(_sequences(4, seed=1)), _pad(_sequences(3, seed=2))]
    stats = collect_stats(tiny, batches, progress=False)
    assert isinstance(stats, CalibrationStats)
    names = _default_names(tiny)
    assert list(stats) == names  # model order, lm_head excluded
    _assert_matches(stats, _reference(tiny, batches, names), rtol=1e-4, atol=1e-6)
    # the padding really was excluded: counts equal the number of real tokens
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert int(stats["model.layers.1.mlp.down_proj"].count[0]) == real_tokens


def test_padded_batch_equals_one_at_a_time(tiny):
    seqs = _sequences(5, seed=3)
    batched = collect_stats(tiny, [_pad(seqs)], progress=False)
    single = collect_stats(tiny, [torch.tensor([s]) for s in seqs], progress=False)
    assert list(batched) == list(single)
    for name in batched:
        a, b = batched[name], single[name]
        assert torch.equal(a.count, b.count), name
        for key in ("mean", "var", "abs_mean", "abs_var", "l2_norm"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}.{key}: {m}")


def test_statistics_values_match_float64_reference(tiny):
    """Every statistic of every Linear against float64 recomputed from the captured inputs (token moments and
    the per-sequence L2-norm moments), on a padded batch; the inputs are not degenerate (positive variance)."""
    batch = _pad(_sequences(5, seed=7))
    stats = collect_stats(tiny, [batch], progress=False)
    names = _default_names(tiny)
    _assert_matches(stats, _reference(tiny, [batch], names), rtol=1e-5, atol=1e-7)
    captured: dict[str, torch.Tensor] = {}
    modules = dict(tiny.named_modules())
    handles = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().double())) for n in names]
    try:
        with torch.no_grad():
            tiny(**batch)
    finally:
        for h in handles:
            h.remove()
    keep = batch["attention_mask"].bool().unsqueeze(-1)
    for name in names:
        x = captured[name]  # [B, T, K]
        l2 = ((x * x) * keep).sum(1).sqrt()  # per-sequence L2 norm over its real tokens, [B, K]
        s = stats[name]
        assert bool((s.var > 0).all()), name
        assert torch.equal(s.seq_count.cpu(), torch.full((x.shape[-1],), x.shape[0], dtype=torch.int64)), name
        torch.testing.assert_close(s.seq_l2_mean.double().cpu(), l2.mean(0), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}.seq_l2_mean: {m}")
        torch.testing.assert_close(s.seq_l2_var.double().cpu(), l2.var(0, unbiased=False), rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{name}.seq_l2_var: {m}")


def test_qkv_and_gate_up_share_one_accumulation(tiny):
    stats = collect_stats(tiny, [_pad(_sequences(3))], progress=False)
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        q, k, v = (stats[p + f"self_attn.{x}_proj"] for x in "qkv")
        assert q is k and k is v
        assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
        assert stats[p + "self_attn.o_proj"] is not q
        assert stats[p + "mlp.down_proj"] is not stats[p + "mlp.gate_proj"]
    assert stats.shared_groups == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
    ]
    # without sharing, every module gets its own object holding the same numbers
    separate = collect_stats(tiny, [_pad(_sequences(3))], progress=False, share_inputs=False)
    assert separate.shared_groups == []
    q0 = "model.layers.0.self_attn.q_proj"
    assert separate[q0] is not separate["model.layers.0.self_attn.k_proj"]
    torch.testing.assert_close(separate["model.layers.0.self_attn.k_proj"].mean, stats[q0].mean)


def test_stats_mask_records_only_selected_tokens(tiny):
    batch = _pad(_sequences(4, seed=7))
    sel = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    sel[:, 2:] = True  # "response tokens": positions >= 2, still AND-ed with the attention mask
    batch["stats_mask"] = sel
    stats = collect_stats(tiny, [batch], progress=False)
    names = _default_names(tiny)
    _assert_matches(stats, _reference(tiny, [batch], names), rtol=1e-4, atol=1e-6)
    expected = int((sel & batch["attention_mask"].bool()).sum())
    assert int(stats[names[0]].count[0]) == expected

    # the same through token_mask_fn
    plain = {k: v for k, v in batch.items() if k != "stats_mask"}
    via_fn = collect_stats(tiny, [plain], progress=False, token_mask_fn=lambda b: sel)
    for n in names:
        assert torch.equal(via_fn[n].count, stats[n].count)
        torch.testing.assert_close(via_fn[n].mean, stats[n].mean)


def test_recorder_context_with_direct_model_calls(tiny):
    batch = _pad(_sequences(3, seed=11))
    with StatsRecorder(tiny) as rec:
        with torch.no_grad():
            tiny(**batch)  # attention_mask picked up from the call
    ref = collect_stats(tiny, [batch], progress=False)
    assert list(rec.stats) == list(ref)
    assert rec.shared_groups == ref.shared_groups
    for n in ref:
        assert torch.equal(rec.stats[n].count, ref[n].count)
        torch.testing.assert_close(rec.stats[n].var, ref[n].var)


def test_recorder_with_grad_enabled_still_records_and_backprops():
    model = _tiny_llama()
    batch = _pad(_sequences(2, seed=4))
    with StatsRecorder(model) as rec:
        out = model(**batch)
        out.logits.float().pow(2).mean().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    ref = collect_stats(model, [batch], progress=False)
    for n in ref:
        assert torch.equal(rec.stats[n].count, ref[n].count)
        torch.testing.assert_close(rec.stats[n].mean, ref[n].mean, rtol=1e-4, atol=1e-6)


def test_recorder_with_only_the_bias_trainable_backprops_every_call():
    """BitFit-style: frozen weight, trainable bias, grad enabled. Every call (also after the first, when the
    recorder takes its shortcuts) must keep the bias in the autograd graph and record the same statistics."""
    lin = nn.Linear(6, 3)
    lin.weight.requires_grad_(False)
    model = nn.Sequential(lin)
    xs = [torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with StatsRecorder(model) as rec:
        for x in xs:
            lin.bias.grad = None
            model(x).sum().backward()
            assert torch.equal(lin.bias.grad, torch.full((3,), 8.0))
    ref = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    assert int(rec.stats["0"].count[0]) == 24
    torch.testing.assert_close(rec.stats["0"].mean, ref.mean(0), rtol=1e-6, atol=1e-7)


def test_logits_skipped_unless_the_head_is_recorded(tiny):
    batch = _pad(_sequences(3))
    T = batch["input_ids"].shape[1]
    with StatsRecorder(tiny) as rec:
        assert rec.run(batch).logits.shape[1] == 1  # calibration needs no logits
    with StatsRecorder(tiny, skip_logits=False) as rec:
        assert rec.run(batch).logits.shape[1] == T
    with StatsRecorder(tiny, ["lm_head"]) as rec:
        assert rec.run(batch).logits.shape[1] == T
    assert int(rec.stats["lm_head"].count[0]) == int(batch["attention_mask"].sum())


def test_sharing_that_changes_between_forwards_is_an_error():
    class Toggle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
            self.same = True

        def forward(self, x):
            return self.a(x) + self.b(x if self.same else x + 1)

    model = Toggle()
    with pytest.raises(RuntimeError, match="'?b'? read the same input as '?a'?.*share_inputs=False"):
        with StatsRecorder(model) as rec:
            rec.run(torch.randn(2, 3, 6))
            model.same = False
            rec.run(torch.randn(2, 3, 6))
    assert "forward" not in model.a.__dict__ and "forward" not in model.b.__dict__
    model.same = True
    with StatsRecorder(model, share_inputs=False) as rec:
        rec.run(torch.randn(2, 3, 6))
        model.same = False
        rec.run(torch.randn(2, 3, 6))
    assert int(rec.stats["b"].count[0]) == 12


class _QKV(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, input_ids, attention_mask=None):
        x = input_ids  # float features standing in for embeddings
        return self.o(self.q(x) * self.k(x) + self.v(x))


def test_no_host_synchronisation_while_recording(monkeypatch):
    """The hot path (recorder + fused op + merge) never reads a tensor value on the host."""
    model = _QKV()
    x = torch.randn(3, 5, 12)
    mask = torch.rand(3, 5) > 0.3
    with StatsRecorder(model) as rec:
        rec.run({"input_ids": x, "attention_mask": mask})  # warm-up: creates the statistics

        def forbidden(name):
            def fn(*args, **kwargs):
                raise AssertionError(f"host synchronisation: Tensor.{name} called while recording")
            return fn

        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
                mp.setattr(torch.Tensor, name, forbidden(name))
            rec.run({"input_ids": x, "attention_mask": mask})
    assert rec.shared_groups == [["q", "k", "v"]]
    assert int(rec.stats["q"].count[0]) == 2 * int(mask.sum())


# -------------------------------------------------------------------------------------------- restoring
def _forward_state(model):
    return {n: ("forward" in m.__dict__, m.forward.__func__ if hasattr(m.forward, "__func__") else m.forward)
            for n, m in model.named_modules()}


def test_forward_restored_exactly(tiny):
    untouched = copy.deepcopy(tiny)
    batch = _pad(_sequences(4, seed=9))
    before = _forward_state(tiny)
    with torch.no_grad():
        expected = untouched(**batch).logits
    with StatsRecorder(tiny) as rec:
        q = tiny.model.layers[0].self_attn.q_proj
        assert "forward" in q.__dict__  # overridden while recording
        with torch.no_grad():
            inside = tiny(**batch).logits
        torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-5)
    assert _forward_state(tiny) == before
    for m in tiny.modules():
        assert "forward" not in m.__dict__
    assert not tiny._forward_hooks and not tiny._forward_pre_hooks
    with torch.no_grad():
        after = tiny(**batch).logits
    assert torch.equal(after, expected)
    assert rec.stats  # statistics stay available after the context


def test_forward_restored_after_exception(tiny):
    batch = _pad(_sequences(2))
    before = _forward_state(tiny)
    with pytest.raises(KeyError, match="boom"):
        with StatsRecorder(tiny) as rec:
            rec.run(batch)
            raise KeyError("boom")
    assert _forward_state(tiny) == before
    assert not tiny._forward_hooks and not tiny._forward_pre_hooks

    class Stop(Exception):
        pass

    def bad_batches():
        yield batch
        raise Stop

    with pytest.raises(Stop):
        collect_stats(tiny, bad_batches(), progress=False)
    assert _forward_state(tiny) == before
    assert not tiny.training


def test_existing_instance_forward_is_restored_as_is():
    lin = nn.Linear(8, 4)
    original = lin.forward
    custom = lambda x: original(x) * 2  # noqa: E731
    lin.forward = custom
    model = nn.Sequential(lin)
    with StatsRecorder(model) as rec:
        assert model[0].forward is not custom
        rec.run(torch.randn(2, 3, 8))
    assert model[0].__dict__["forward"] is custom
    assert int(rec.stats["0"].count[0]) == 6


def test_later_contexts_wrap_the_forward_in_place_then():
    """A recorder reuses its recording forwards across contexts only while the wrapped forward is the same: a
    forward assigned between two contexts is the one recorded (and restored) by the next."""
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    rec = StatsRecorder(model)
    x = torch.randn(2, 3, 8)
    with rec:
        rec.run(x)
        first = model[0].__dict__["forward"]
    with rec:
        assert model[0].__dict__["forward"] is first  # same wrapped forward: the wrapper is reused
        rec.run(x)
    assert "forward" not in model[0].__dict__
    original = lin.forward
    custom = lambda x: original(x) * 3  # noqa: E731
    lin.forward = custom
    with rec:
        assert model[0].__dict__["forward"] is not first
        with torch.no_grad():
            out = model(x)
    torch.testing.assert_close(out, original(x).detach() * 3)
    assert model[0].__dict__["forward"] is custom
    assert int(rec.stats["0"].count[0]) == 18  # three contexts of 6 rows each


def test_direct_cpu_path_equals_the_checked_path(tiny):
    """After a module's first call the recorder goes straight to the one-call C++ merge; forcing it through
    linear_with_stats' checked path instead must give the same outputs and bit-identical statistics."""
    batches = [_pad(_sequences(4, seed=s)) for s in (21, 22, 23)]
    recs, outs = [], []
    for direct in (True, False):
        rec = StatsRecorder(tiny)
        got = []
        with torch.no_grad(), rec:
            for b in batches:
                got.append(rec.run(b).logits)
                if not direct:
                    for slot in rec._slots:
                        slot.fast = None
        if direct and any(s.stats is not None and s.stats.device.type == "cpu" for s in rec._slots):
            from persona_kernels.stats import _has_fused_op

            if _has_fused_op():
                assert any(s.fast is not None for s in rec._slots)
        recs.append(rec)
        outs.append(got)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for name, st in recs[0].stats.items():
        other = recs[1].stats[name].state_dict()
        for key, value in st.state_dict().items():
            assert torch.equal(value, other[key]), (name, key)


def test_parametrized_weights_are_recorded_through_the_parametrization():
    """The recorder reads weight and bias from the parameter dict only while they are plain entries of it: a
    parametrized Linear (before the context, or registered while it is active) computes with its
    parametrized weight, as without the recorder."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))
    parametrize.register_parametrization(model[0], "weight", Double())
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        expected = model(x)
        rec = StatsRecorder(model)
        with rec:
            for _ in range(2):  # the second call takes the per-call fast paths
                torch.testing.assert_close(rec.run(x), expected, rtol=0, atol=0)
            parametrize.register_parametrization(model[2], "weight", Double())  # the class changes under it
            expected = model[2](model[1](model[0](x)))
            assert "forward" in model[2].__dict__  # still recorded
            torch.testing.assert_close(rec.run(x), expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(rec.run(x), expected, rtol=1e-6, atol=1e-6)
    assert int(rec.stats["2"].count[0]) == 5 * 12  # four runs and the direct call inside the context


def test_training_flags_restored():
    model = _tiny_llama().train()
    model.model.layers[0].eval()
    flags = {n: m.training for n, m in model.named_modules()}
    collect_stats(model, [_pad(_sequences(2))], progress=False)
    assert {n: m.training for n, m in model.named_modules()} == flags


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    "spec, expected",
    [
        (["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
         ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
        ("o_proj", ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
        (["*.layers.1.mlp.*"], [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]),
        ([r"model\.layers\.0\.self_attn\.[qk]_proj"], [f"model.layers.0.self_attn.{p}_proj" for p in "qk"]),
        (re.compile(r"down_proj$"), ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
        (lambda name, m: m.out_features == 172,
         [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")]),
        (["lm_head"], ["lm_head"]),
    ],
)
def test_target_patterns(tiny, spec, expected):
    assert [n for n, _ in resolve_target_modules(tiny, spec)] == expected
    stats = collect_stats(tiny, [_pad(_sequences(2))], spec, progress=False)
    assert list(stats) == expected


def test_single_target_of_a_shared_input_is_recorded(tiny):
    # k_proj alone: no leader among the targets, so it records itself
    batch = _pad(_sequences(3))
    stats = collect_stats(tiny, [batch], ["model.layers.0.self_attn.k_proj"], progress=False)
    full = collect_stats(tiny, [batch], progress=False)
    k_only, q_full = stats["model.layers.0.self_attn.k_proj"], full["model.layers.0.self_attn.q_proj"]
    assert torch.equal(k_only.count, q_full.count)
    torch.testing.assert_close(k_only.mean, q_full.mean)


def test_target_errors(tiny):
    with pytest.raises(ValueError, match="target_modules.*'nope_proj' matches no nn.Linear"):
        collect_stats(tiny, [_pad(_sequences(1))], ["q_proj", "nope_proj"], progress=False)
    with pytest.raises(ValueError, match="target_modules.*selects no nn.Linear"):
        collect_stats(tiny, [_pad(_sequences(1))], lambda n, m: False, progress=False)
    with pytest.raises(TypeError, match="target_modules"):
        collect_stats(tiny, [_pad(_sequences(1))], [1, 2], progress=False)
    with pytest.raises(ValueError, match="model.*no nn.Linear"):
        collect_stats(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], progress=False)


def test_argument_errors(tiny):
    batch = _pad(_sequences(2))
    with pytest.raises(ValueError, match="on_nonfinite"):
        collect_stats(tiny, [batch], on_nonfinite="maybe", progress=False)
    with pytest.raises(TypeError, match="batches"):
        collect_stats(tiny, batch, progress=False)  # a single dict, not an iterable of batches
    with pytest.raises(TypeError, match="batches"):
        collect_stats(tiny, [[1, 2, 3]], progress=False)
    bad = dict(batch, stats_mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="stats_mask.*expected shape"):
        collect_stats(tiny, [bad], progress=False)
    with pytest.raises(RuntimeError, match="not active"):
        StatsRecorder(tiny).run(batch)
    for m in tiny.modules():
        assert "forward" not in m.__dict__


# -------------------------------------------------------------------------------------------- nonfinite
def _inject_inf(model, name="model.layers.1.mlp.down_proj"):
    module = dict(model.named_modules())[name]

    def hook(mod, args):
        x = args[0].clone()
        x[0, 0, 3] = float("inf")
        x[0, 1, 5] = float("nan")
        return (x,)

    return module.register_forward_pre_hook(hook)


def test_nonfinite_reported_by_module_name(tiny):
    batch = _pad(_sequences(3, seed=2))
    handle = _inject_inf(tiny)
    try:
        with pytest.warns(RuntimeWarning, match=r"model\.layers\.1\.mlp\.down_proj: 2\b"):
            stats = collect_stats(tiny, [batch], progress=False)
        name = "model.layers.1.mlp.down_proj"
        assert int(stats[name].nonfinite) == 2
        # excluded per channel: the other channels see every token
        total = int(batch["attention_mask"].sum())
        assert int(stats[name].count[3]) == total - 1 and int(stats[name].count[0]) == total
        assert bool(torch.isfinite(stats[name].mean).all())
        with pytest.raises(NonFiniteActivationsError, match=r"model\.layers\.1\.mlp\.down_proj") as info:
            collect_stats(tiny, [batch], on_nonfinite="raise", progress=False)
        assert info.value.counts == {name: 2}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            collect_stats(tiny, [batch], on_nonfinite="ignore", progress=False)
    finally:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_stats(tiny, [batch], on_nonfinite="raise", progress=False)  # clean model: nothing raised


# ------------------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_models(dtype, rtol):
    model = _tiny_llama(dtype)
    batches = [_pad(_sequences(4, seed=6))]
    stats = collect_stats(model, batches, progress=False)
    names = _default_names(model)
    for n in names:
        assert stats[n].mean.dtype == torch.float64
    ref = _reference(model, batches, names)
    for n in names:
        assert torch.equal(stats[n].count, ref[n]["count"])
        scale = ref[n]["sq_mean"].sqrt().max()
        for key in ("mean", "abs_mean"):
            torch.testing.assert_close(getattr(stats[n], key), ref[n][key], rtol=rtol, atol=rtol * float(scale))
        torch.testing.assert_close(stats[n].var, ref[n]["var"], rtol=2 * rtol, atol=2 * rtol * float(scale) ** 2)


def test_stats_live_on_each_modules_weight_device(tiny):
    stats = collect_stats(tiny, [_pad(_sequences(2))], progress=False)
    modules = dict(tiny.named_modules())
    for n, s in stats.items():
        assert s.mean.device == modules[n].weight.device and s.count.device == modules[n].weight.device


def test_accelerate_offloaded_model_matches_plain(tiny):
    accelerate = pytest.importorskip("accelerate")
    offloaded = copy.deepcopy(tiny)
    accelerate.cpu_offload(offloaded, execution_device="cpu")
    q = offloaded.model.layers[0].self_attn.q_proj
    assert q.weight.device.type == "meta"
    wrapper, inner = q.__dict__["forward"], q.__dict__["_old_forward"]
    batch = _pad(_sequences(3))
    got = collect_stats(offloaded, [batch], progress=False)
    ref = collect_stats(tiny, [batch], progress=False)
    assert got.shared_groups == ref.shared_groups
    for n in ref:
        assert got[n].mean.device.type == "cpu"
        assert torch.equal(got[n].count, ref[n].count)
        torch.testing.assert_close(got[n].mean, ref[n].mean)
    assert q.__dict__["forward"] is wrapper and q.__dict__["_old_forward"] is inner


# ---------------------------------------------------------------------------------------- real model
def test_stories260k(shared):
    path = shared / "models" / "stories260K"
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [
        "Once upon a time there was a little dog.",
        "Lily liked to play in the park with her ball.",
        "The sun was hot.",
        "Tom and his mom went to the big shop to buy some milk and bread for the cat.",
    ]
    seqs = [tok(t)["input_ids"] for t in texts]
    batch = _pad(seqs)
    stats = collect_stats(model, [batch], progress=False)
    names = _default_names(model)
    assert list(stats) == names and len(names) == 7 * model.config.num_hidden_layers
    assert stats["model.layers.0.mlp.down_proj"].num_channels == 172
    _assert_matches(stats, _reference(model, [batch], names), rtol=1e-4, atol=1e-6)
    single = collect_stats(model, [torch.tensor([s]) for s in seqs], progress=True)
    for n in names:
        assert torch.equal(single[n].count, stats[n].count)
        torch.testing.assert_close(single[n].var, stats[n].var, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- early stop
def _stats_equal(a, b, exact: bool = True) -> None:
    assert list(a) == list(b)
    for name in a:
        for key in ("count", "mean", "var", "abs_mean", "abs_var", "sq_mean"):
            x, y = getattr(a[name], key), getattr(b[name], key)
            if exact:
                assert torch.equal(x, y), f"{name}.{key}"
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}.{key}: {m}")


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda mod, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_stop_early_gives_the_same_statistics_and_skips_the_tail():
    model = _tiny_llama()
    batches = [_pad(_sequences(4, seed=s)) for s in (11, 12, 13)] + [{"input_ids": torch.tensor([_sequences(1, seed=14)[0]])}]
    head_calls, norm_calls = _count_calls(model.lm_head), _count_calls(model.model.norm)
    early = collect_stats(model, batches, progress=False)
    assert head_calls[0] == 1 and norm_calls[0] == 1  # only the first (learning) forward ran whole
    whole = collect_stats(model, batches, progress=False, stop_early=False)
    assert head_calls[0] == 1 + len(batches)
    _stats_equal(early, whole)
    _assert_matches(early, _reference(model, batches, _default_names(model)), rtol=1e-4, atol=1e-6)


def test_stop_early_only_inside_run_and_returns_none():
    model = _tiny_llama()
    batch = _pad(_sequences(3, seed=21))
    with StatsRecorder(model, stop_early=True) as rec:
        assert rec.run(batch) is not None  # learning forward: whole, with its output
        assert rec.run(batch) is None  # stopped after the last Linear
        with torch.no_grad():
            out = model(**batch)  # a direct call inside the context always runs whole
        assert out.logits.shape[0] == 3
    with StatsRecorder(model) as rec:  # off by default: the recorder's run returns the model output
        assert rec.run(batch) is not None and rec.run(batch) is not None


class _Reuse(nn.Module):
    """One Linear called twice per forward: never stopped early."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class _Branch(nn.Module):
    """The last Linear of the first forward comes earlier in later ones: early stop must switch itself off."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.flip = False

    def forward(self, x):
        if self.flip:
            return self.a(self.c(x)) + self.b(x * 2)
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("cls", [_Reuse, _Branch])
def test_stop_early_falls_back_to_whole_forwards(cls):
    torch.manual_seed(3)
    model = cls()
    xs = [torch.randn(2, 5, 8) for _ in range(4)]

    def collect(stop_early):
        if isinstance(model, _Branch):
            model.flip = False
        with StatsRecorder(model, stop_early=stop_early) as rec:
            outs = []
            for i, x in enumerate(xs):
                if isinstance(model, _Branch) and i == 2:
                    model.flip = True
                outs.append(rec.run(x))
        return rec.stats, outs

    early, outs = collect(True)
    whole, _ = collect(False)
    _stats_equal(early, whole)
    if isinstance(model, _Reuse):
        assert all(o is not None for o in outs)  # a Linear ran twice: the rule never applied
        assert int(early["a"].count[0]) == 2 * 2 * 5 * len(xs)
    else:
        assert outs[1] is None and outs[2] is not None and outs[3] is not None  # stopped once, then whole
        assert int(early["c"].count[0]) == 2 * 5 * len(xs)


def test_stop_early_off_when_accelerate_hooks_are_present(tiny):
    model = copy.deepcopy(tiny)
    model.model.layers[0]._hf_hook = object()  # an accelerate hook's offload step must run after each forward
    head_calls = _count_calls(model.lm_head)
    batches = [_pad(_sequences(3, seed=s)) for s in (31, 32)]
    collect_stats(model, batches, progress=False)
    assert head_calls[0] == len(batches)
