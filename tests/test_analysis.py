"""Mask analysis numbers against direct bool computations; markdown/JSON layout; figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from persona_kernels import analysis, pack_mask
from persona_kernels.bank import MaskBank

SHAPES = {}
for layer in range(3):
    SHAPES[f"model.layers.{layer}.self_attn.q_proj"] = (12, 40)
    SHAPES[f"model.layers.{layer}.self_attn.k_proj"] = (4, 40)
    SHAPES[f"model.layers.{layer}.self_attn.v_proj"] = (4, 40)
    SHAPES[f"model.layers.{layer}.self_attn.o_proj"] = (40, 12)
    SHAPES[f"model.layers.{layer}.mlp.gate_proj"] = (17, 40)
    SHAPES[f"model.layers.{layer}.mlp.up_proj"] = (17, 40)
    SHAPES[f"model.layers.{layer}.mlp.down_proj"] = (40, 17)
SHAPES["lm_head"] = (9, 40)


@pytest.fixture()
def bank_and_masks():
    a = {name: torch.rand(*s) < 0.6 for name, s in SHAPES.items()}
    # b differs from a on a layer- and family-dependent fraction of weights
    b = {}
    for name, m in a.items():
        layer, family, _ = analysis.module_info(name)
        p = 0.02 + 0.05 * (layer or 0) + (0.1 if family == "mlp" else 0.0)
        b[name] = m ^ (torch.rand(*m.shape) < p)
    return MaskBank.from_bool_masks({"A": a, "B": b}), a, b


def direct(a, b, names):
    """Counts from the unpacked bool masks."""
    xa = torch.cat([a[n].flatten() for n in names])
    xb = torch.cat([b[n].flatten() for n in names])
    both = int((xa & xb).sum())
    return {
        "differ": int((xa ^ xb).sum()),
        "weights": xa.numel(),
        "jaccard": both / int((xa | xb).sum()),
        "cosine": both / math.sqrt(int(xa.sum()) * int(xb.sum())),
    }


def test_popcount32():
    words = torch.tensor([0, 1, -1, -(2**31), 2**31 - 1, 0x55555555, -0x55555556, 12345678], dtype=torch.int32)
    expected = [bin(int(w) & 0xFFFFFFFF).count("1") for w in words]
    assert analysis.popcount32(words).tolist() == expected
    rnd = torch.randint(-(2**31), 2**31 - 1, (1000,), dtype=torch.int32)
    assert analysis.popcount32(rnd).tolist() == [bin(int(w) & 0xFFFFFFFF).count("1") for w in rnd]
    with pytest.raises(TypeError, match="'words'"):
        analysis.popcount32(torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.3.self_attn.q_proj", (3, "attn", "q")),
        ("model.layers.12.self_attn.o_proj", (12, "attn", "o")),
        ("model.layers.0.mlp.down_proj", (0, "mlp", "down")),
        ("model.layers.7.mlp.gate_proj", (7, "mlp", "gate")),
        ("transformer.h.5.attn.c_attn", (5, "attn", "qkv")),
        ("transformer.h.5.attn.c_proj", (5, "attn", "o")),
        ("transformer.h.5.mlp.c_proj", (5, "mlp", "down")),
        ("lm_head", (None, "other", "other")),
        ("model.layers.2.self_attn.rotary", (2, "attn", "other")),
        ("encoder.q", (None, "other", "other")),
    ],
)
def test_module_info(name, expected):
    assert analysis.module_info(name) == expected


def test_compare_matches_direct_bool(bank_and_masks):
    bank, a, b = bank_and_masks
    cmp = analysis.compare(bank, "A", "B")
    names = list(SHAPES)
    d = direct(a, b, names)
    assert cmp.overall.differ == d["differ"] and cmp.overall.weights == d["weights"]
    assert cmp.difference_rate == pytest.approx(d["differ"] / d["weights"], abs=0)
    assert cmp.jaccard == pytest.approx(d["jaccard"], rel=1e-12)
    assert cmp.overall.mask_cosine == pytest.approx(d["cosine"], rel=1e-12)
    attn = [n for n in names if "self_attn" in n]
    mlp = [n for n in names if ".mlp." in n]
    da, dm = direct(a, b, attn), direct(a, b, mlp)
    assert cmp.attn_difference_rate == pytest.approx(da["differ"] / da["weights"], rel=1e-12)
    assert cmp.mlp_difference_rate == pytest.approx(dm["differ"] / dm["weights"], rel=1e-12)
    assert cmp.by_family["other"].weights == 9 * 40
    for layer in range(3):
        ln = [n for n in names if f".layers.{layer}." in n]
        dl = direct(a, b, ln)
        c = cmp.per_layer[layer]
        assert c.differ == dl["differ"]
        assert c.mask_cosine == pytest.approx(dl["cosine"], rel=1e-12)
        assert c.jaccard == pytest.approx(dl["jaccard"], rel=1e-12)
        for t, suffix in (("q", "q_proj"), ("down", "down_proj")):
            assert cmp.per_layer_type[layer][t].differ == direct(a, b, [f"model.layers.{layer}.{'self_attn' if t == 'q' else 'mlp'}.{suffix}"])["differ"]
    assert cmp.by_type["k"].differ == direct(a, b, [n for n in names if n.endswith("k_proj")])["differ"]
    assert cmp.layers() == [0, 1, 2, None]
    # identical personas: no difference, full overlap
    same = analysis.compare(bank, "A", "A")
    assert same.overall.differ == 0 and same.jaccard == 1.0 and same.overall.mask_cosine == pytest.approx(1.0)


def test_missing_mask_counts_as_dense():
    m = torch.rand(5, 40) < 0.5
    bank = MaskBank.from_bool_masks({"A": {"x.q_proj": m, "y.q_proj": m}, "B": {"x.q_proj": ~m}})
    cmp = analysis.compare(bank, "A", "B")
    assert cmp.modules["y.q_proj"].differ == int((~m).sum())
    assert cmp.modules["x.q_proj"].differ == 200 and cmp.modules["x.q_proj"].kept_both == 0


def test_score_cosine(bank_and_masks):
    bank, _, _ = bank_and_masks
    sa = {n: torch.rand(*s) for n, s in SHAPES.items()}
    sb = {n: torch.rand(*s) for n, s in SHAPES.items()}
    cmp = analysis.compare(bank, "A", "B", scores={"A": sa, "B": sb})
    for layer in range(3):
        ln = [n for n in SHAPES if f".layers.{layer}." in n]
        va = torch.cat([sa[n].double().flatten() for n in ln])
        vb = torch.cat([sb[n].double().flatten() for n in ln])
        assert cmp.score_cosine_per_layer[layer] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-10)
    va = torch.cat([sa[n].double().flatten() for n in SHAPES])
    vb = torch.cat([sb[n].double().flatten() for n in SHAPES])
    assert cmp.score_cosine_overall == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-10)
    assert "score_cosine" in json.loads(cmp.to_json())
    with pytest.raises(ValueError, match="'scores'"):
        analysis.compare(bank, "A", "B", scores={"A": {"lm_head": torch.rand(3, 3)}, "B": sb})
    with pytest.raises(KeyError, match="'scores'"):
        analysis.compare(bank, "A", "B", scores={"A": sa})


def test_json_and_markdown(bank_and_masks):
    bank, _, _ = bank_and_masks
    cmp = analysis.compare(bank, "A", "B")
    data = json.loads(cmp.to_json())
    assert data["overall"]["differ"] == cmp.overall.differ
    assert set(data["per_layer"]) == {"0", "1", "2", "other"}
    assert data["by_type"]["q"]["difference_rate"] == pytest.approx(cmp.by_type["q"].difference_rate)
    assert data["modules"]["lm_head"]["family"] == "other"
    md = cmp.to_markdown()
    first = md.splitlines()[:3]
    assert first[0] == "| Pair | Avg difference (%) | Attn | MLP |"
    assert first[2] == (f"| A vs. B | {100 * cmp.difference_rate:.2f} | {100 * cmp.attn_difference_rate:.2f} | "
                        f"{100 * cmp.mlp_difference_rate:.2f} |")
    assert "| Layer |" in md and "| down |" in md
    table = analysis.comparison_table([cmp, analysis.compare(bank, "B", "A")])
    assert len(table.splitlines()) == 4 and "| B vs. A |" in table
    assert cmp.to_markdown(detail=False) == analysis.comparison_table([cmp])


def test_plot_writes_pngs(bank_and_masks, tmp_path):
    bank, _, _ = bank_and_masks
    cmp = analysis.compare(bank, "A", "B")
    paths = cmp.plot(tmp_path / "figs" / "a_vs_b")
    assert [p.name for p in paths] == ["a_vs_b_heatmap.png", "a_vs_b_attn_mlp.png"]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)


def test_compare_errors(bank_and_masks):
    bank, _, _ = bank_and_masks
    with pytest.raises(KeyError, match="'b'.*'Z'"):
        analysis.compare(bank, "A", "Z")
    with pytest.raises(KeyError, match="'modules'"):
        analysis.compare(bank, "A", "B", modules=["nope"])
    sub = analysis.compare(bank, "A", "B", modules=["lm_head"])
    assert list(sub.modules) == ["lm_head"] and math.isnan(sub.attn_difference_rate)
    assert "n/a" in sub.to_markdown(detail=False)


def test_packed_words_only(bank_and_masks):
    """Counts come from the packed words: a bank holding only packed masks (no bool copies) works."""
    bank, a, _ = bank_and_masks
    packed_only = MaskBank()
    for p in ("A", "B"):
        packed_only.add(p, bank.masks(p), shapes=bank.shapes)
    assert analysis.compare(packed_only, "A", "B").overall.differ == analysis.compare(bank, "A", "B").overall.differ
    assert packed_only.get("A", "lm_head").dtype == torch.int32
    assert torch.equal(packed_only.get("A", "lm_head"), pack_mask(a["lm_head"]))


def test_contrastive_sparse_bank_difference_rates():
    """End to end: masks from scoring -> bank -> analysis; disjoint pruned sets give known rates."""
    from persona_kernels import scoring

    k = 64
    w = {f"model.layers.{i}.mlp.up_proj": torch.randn(10, k) for i in range(2)}
    a_pos, a_neg = torch.rand(k) + 0.1, torch.rand(k) + 0.1
    for rho, expected in ((0.5, 1.0), (0.25, 2 * 16 / 64)):
        masks = {"P": {}, "N": {}}
        for name, weight in w.items():
            masks["P"][name], masks["N"][name] = scoring.contrastive_sparse(weight, a_pos, a_neg, rho)
        cmp = analysis.compare(MaskBank.from_bool_masks(masks), "P", "N")
        assert cmp.difference_rate == pytest.approx(expected, abs=0)
        assert cmp.mlp_difference_rate == pytest.approx(expected, abs=0)
    assert cmp.jaccard == pytest.approx(32 / 64)  # kept both: K - 2p; kept by either: K
