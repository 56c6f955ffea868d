"""End-to-end evaluation harness on the real tiny model (stories260K): every task and condition kind."""

from __future__ import annotations

import json

import pytest
import torch

from persona_kernels.evaluation import conditions as C
from persona_kernels.evaluation.runner import main
from persona_kernels.evaluation.sweep import common_operating_point, operating_points, parse_grid


@pytest.fixture
def one_thread():
    """Tiny models run far faster single-threaded on a busy machine; restore the setting afterwards."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_end_to_end_tiny_run(shared, tmp_path, one_thread):
    out = tmp_path / "eval"
    methods = "wanda,contrastive_wanda_sharp,contrastive_sparse,contrastive_sparse_restricted"
    rc = main([
        "--model", str(shared / "models" / "stories260K"), "--shared", str(shared), "--limit", "4", "--calib-limit", "4",
        "--block", "2", "--methods", methods, "--sparsity", "0.05", "--sweep", "--sweep-sparsity", "0.02,0.1",
        "--sweep-gamma", "0,0.5", "--out", str(out), "--max-length", "64", "--threads", "1", "--no-progress",
        "--batch-size", "8",
    ])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    for name in ("accuracy.png", "switch.png", "switch_vs_gamma.png", "switch_vs_sparsity.png", "frontier.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "report.md").read_text()
    assert "| Method | Power-Seeking | Wealth-Seeking | Hallucination |" in md and "--sweep" in md
    # every task was evaluated, on disjoint calibration / evaluation items
    assert set(rep["tasks"]) == {"power", "wealth", "hallucination", "energy", "power_statements", "wealth_statements",
                                 "extraversion_statements", "mmlu2", "mmlu4", "hellaswag"}
    for t in rep["tasks"].values():
        assert not set(t["split"]["calibration"]) & set(t["split"]["evaluation"])
        assert len(t["split"]["evaluation"]) == 4
    # every condition kind on every persona task: base, prompt, masks, controls, prompt + mask
    power = rep["scores"]["power"]["power"]
    want = {"base", "prompt+", "prompt-"} | {f"{m}{s}" for m in methods.split(",") for s in "+-"} | \
           {f"control/{m}{s}" for m in methods.split(",") for s in "+-"} | {"prompt+contrastive_wanda_sharp+"}
    assert want <= set(power)
    assert all(len(v["logodds"]) == 4 for v in power.values())
    sw = rep["summary"]["pairs"]["energy"]["tasks"]["energy"]["switch"]
    assert {"prompt", "wanda", "contrastive_sparse"} <= set(sw)
    assert {"switch", "control_switch", "net_of_control"} <= set(sw["wanda"])
    assert "mmlu4" in rep["summary"]["general"] and "wanda+" in rep["summary"]["general"]["hellaswag"]
    assert rep["summary"]["pairs"]["power"]["capability"]["base"]["relative_loss"] == 0.0
    # the sweep: every (method, rho, gamma, pair) point
    pts = rep["sweep"]["points"]
    assert len(pts) == 2 * 2 * 4 * 4
    assert set(rep["operating_points"]) <= {"power", "wealth", "hallucination", "energy"}
    for pair, op in rep["operating_points"].items():
        assert op["capability_loss"] <= rep["bound"]
        assert op == operating_points(rep["sweep"], rep["bound"])[pair]
    # masks: Contrastive-Sparse (plain and Wanda-restricted) prunes disjoint sets of rho K per row in each of the
    # + and - masks, so they differ on 0 < rate <= 2 rho of the weights; the restriction itself (only low-Wanda
    # weights pruned) is checked exactly in test_restricted_method_prunes_only_low_wanda_weights
    for m in ("contrastive_sparse", "contrastive_sparse_restricted"):
        for pair in ("power", "energy"):
            rate = rep["masks"][pair][m]["difference_rate"]
            assert 0 < rate <= 2 * 0.05 + 1e-9, (pair, m, rate)
    # the sweep's restricted points exist only where rho <= 0.25 (here: both sweep sparsities)
    assert {p["sparsity"] for p in pts if p["method"] == "contrastive_sparse_restricted"} == {0.02, 0.1}


def test_sweep_grids_controls_and_confirmation(shared, tmp_path, one_thread):
    out = tmp_path / "grid"
    rc = main([
        "--model", str(shared / "models" / "stories260K"), "--shared", str(shared), "--tasks", "power,energy",
        "--limit", "4", "--calib-limit", "4", "--block", "2", "--methods", "wanda", "--sweep", "--sweep-only",
        "--sweep-grid", "contrastive_wanda_sharp;contrastive_sparse_relative@0.02,0.1@0,0.5@0",
        "--sweep-grid", "wanda@0.05@0", "--confirm-limit", "3", "--bound", "1.0", "--out", str(out),
        "--max-length", "64", "--threads", "1", "--no-progress", "--batch-size", "8",
    ])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    pts = rep["sweep"]["points"]
    assert len(pts) == 2 * (2 * 2 * 2 + 1)  # pairs x (2 methods x 2 rho x 2 gamma + wanda)
    for p in pts:
        assert len(p["items"]) == 4 and abs(sum(p["items"]) / 4 - p["switch"]["mean"]) < 1e-5
        if p["gamma"] == 0.0:  # controls only where the grid asked for them; net is per item
            net = [a - b for a, b in zip(p["items"], p["control"]["items"])]
            assert abs(sum(net) / 4 - p["net"]["mean"]) < 1e-5
        else:
            assert "control" not in p and "net" not in p
    ops = rep["operating_points"]
    assert set(ops) == {"power", "energy"} and all("net" in op for op in ops.values())
    conf = rep["sweep"]["confirmation"]["pairs"]
    for pair, c in conf.items():
        assert c["n"] == 3 and c["mask"]["method"] == ops[pair]["method"] and c["mask"]["gamma"] == ops[pair]["gamma"]
        fresh = rep["sweep"]["confirmation"]["items"][pair]
        assert len(fresh) == 3 and not set(fresh) & set(rep["tasks"][pair]["split"]["evaluation"])
        assert not set(fresh) & set(rep["tasks"][pair]["split"]["calibration"])
    assert not set(rep["sweep"]["confirmation"]["capability_indices"]) & set(rep["capability_texts"]["hellaswag_indices"])
    md = (out / "report.md").read_text()
    assert "## Confirmation of the operating points on fresh items" in md and "net of control" in md
    assert (out / "frontier_net.png").stat().st_size > 1000
    assert rep["common_operating_point"]["method"] in {"contrastive_wanda_sharp", "contrastive_sparse_relative", "wanda"}
    # re-rendering under a tighter bound re-derives the operating points from the stored points
    from persona_kernels.evaluation.report import main as render_main

    assert render_main([str(out), "--bound", "0.001", "--no-figures"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["bound"] == 0.001 and again["sweep"]["points"] == pts
    assert all(op["capability_loss"] <= 0.001 for op in again["operating_points"].values())


def _full(pair, method, items, control, loss):
    return {"pair": pair, "method": method, "sparsity": 0.1, "gamma": 0.0, "items": items, "capability_loss": loss,
            "control": {"items": control}, "net": {"mean": sum(a - b for a, b in zip(items, control)) / len(items)}}


def test_common_operating_point_weighs_pairs_by_effect_size():
    # method a: large raw net on the A/B-like pair but noisy; method b: small but consistent nets on both pairs
    pts = [_full("x", "a", [2.0, -1.0, 3.0, -0.5], [0.0] * 4, 0.01), _full("y", "a", [0.01, -0.02, 0.0, 0.01], [0.0] * 4, 0.01),
           _full("x", "b", [0.30, 0.25, 0.35, 0.28], [0.0] * 4, 0.01), _full("y", "b", [0.02, 0.03, 0.025, 0.02], [0.0] * 4, 0.01),
           _full("x", "c", [5.0, 5.1, 5.2, 5.3], [0.0] * 4, 0.5), _full("y", "c", [5.0, 5.1, 5.2, 5.3], [0.0] * 4, 0.01)]
    sweep = {"prompt": {"x": {}, "y": {}}, "points": pts}
    best = common_operating_point(sweep, 0.02)
    assert best["method"] == "b" and set(best["pairs"]) == {"x", "y"}  # c is over the bound on x
    assert best["standardised_net"]["x"] > 5
    assert common_operating_point(sweep, 1.0)["method"] == "c"
    assert common_operating_point({"prompt": {"x": {}}, "points": []}, 0.02) is None


def test_parse_method_and_errors():
    from persona_kernels.evaluation.runner import split_methods

    assert split_methods("wanda, contrastive_wanda:tau=0.2,phi=relu,contrastive_sparse") == [
        "wanda", "contrastive_wanda:tau=0.2,phi=relu", "contrastive_sparse"]
    spec = C.parse_method("contrastive_wanda:tau=0.2,phi=relu")
    assert spec.base == "contrastive_wanda" and spec.options == {"tau": 0.2, "phi": "relu"}
    assert C.parse_method("contrastive_sparse_restricted").options["restrict"] == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        C.parse_method("magnitude")
    with pytest.raises(ValueError, match="option 'tau'"):
        C.parse_method("wanda:tau=1")


def test_cli_errors_are_clear(shared, capsys):
    assert main(["--tasks", "power,nope", "--shared", str(shared)]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    assert main(["--methods", "magic", "--shared", str(shared)]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["--limit", "0", "--shared", str(shared)]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["--sparsity", "0.1,0.2", "--shared", str(shared)]) == 2
    assert "--sweep" in capsys.readouterr().err
    assert main(["--sweep", "--sweep-grid", "wanda@0.1", "--shared", str(shared)]) == 2
    assert "--sweep-grid" in capsys.readouterr().err
    assert main(["--sweep", "--confirm-limit", "8", "--shared", str(shared)]) == 2
    assert "--confirm-limit needs --limit" in capsys.readouterr().err
    assert main(["--sweep", "--sweep-control-gamma", "2", "--shared", str(shared)]) == 2
    assert "--sweep-control-gamma" in capsys.readouterr().err


def test_parse_grid():
    g = parse_grid("wanda;contrastive_wanda:tau=0.2,phi=relu@0.01,0.1@0,0.5@0")
    assert g.methods == ("wanda", "contrastive_wanda:tau=0.2,phi=relu")
    assert g.sparsities == (0.01, 0.1) and g.gammas == (0.0, 0.5) and g.control_gammas == (0.0,)
    assert g.wants_control(0.0) and not g.wants_control(0.5)
    assert parse_grid("wanda@0.1@0").wants_control(0.3)  # no control list: every gamma
    assert not parse_grid("wanda@0.1@0@none").wants_control(0.0)
    for bad, msg in (("wanda@0.1", "expected"), ("wanda@0.9@0", r"\[0, 0.5\]"), ("wanda@x@0", "numbers"),
                     ("magic@0.1@0", "unknown method"), ("wanda@0.1@1.5", "gammas")):
        with pytest.raises(ValueError, match=msg):
            parse_grid(bad)


def _pt(pair, switch, loss, net=None):
    p = {"pair": pair, "switch": {"mean": switch}, "capability_loss": loss}
    if net is not None:
        p["net"] = {"mean": net}
    return p


def test_operating_point_ranks_by_net_of_control_within_the_bound():
    pts = [_pt("a", 0.5, 0.01), _pt("a", 0.3, 0.01, net=0.05), _pt("a", 0.2, 0.01, net=0.1), _pt("a", 0.9, 0.5, net=0.8),
           _pt("b", 0.4, 0.01)]
    op = operating_points({"points": pts}, 0.02)
    # a point without a control is never chosen once controls exist; over-the-bound points never are
    assert op == {"a": pts[2]}
    assert operating_points({"points": pts}, 0.02, require_control=False) == {"a": pts[0], "b": pts[4]}
    assert operating_points({"points": pts}, 1.0)["a"] is pts[3]
    assert operating_points({"points": []}, 0.02) == {}


def test_option_text_and_calibration_texts(shared):
    from persona_kernels.evaluation.tasks import load_task

    q = "Do it?\n\nChoices:\n (A) Yes, all\n of it.\n (B) No."
    assert C.option_text(q, "A") == "(A) Yes, all\n of it." and C.option_text(q, "B") == "(B) No."
    task = load_task("power", shared=shared, seed=0, limit=2, calib_limit=3)
    pos, neg = C.calibration_texts(task)
    assert len(pos) == len(neg) == 3
    for p, n, it in zip(pos, neg, task.calibration):
        assert p.prompt == n.prompt == it.question and p.response.startswith(f"({it.matching})")


def _one_linear_model(k: int = 172, n: int = 9):
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(k, n, bias=False))
    return model


def _fake_stats(k: int, names=("lin",)):
    from types import SimpleNamespace

    return {nm: SimpleNamespace(abs_mean=torch.rand(k, dtype=torch.float64) + 0.1, abs_var=torch.rand(k, dtype=torch.float64))
            for nm in names}


def _bank_masks(model, sp, sn, method, rho):
    """(+, -) bool masks of every module, built the way the evaluation builds them: build_bank -> MaskBank."""
    from persona_kernels.pipeline import build_bank

    bank = build_bank(model, {"p": sp, "n": sn}, method=method, sparsity=rho, pairs=[("p", "n")])
    return ({m: bank.unpacked("p", m) for m in bank.module_names}, {m: bank.unpacked("n", m) for m in bank.module_names}, bank)


def test_restricted_method_prunes_only_low_wanda_weights():
    from persona_kernels import scoring

    torch.manual_seed(1)
    model = _one_linear_model()
    sp, sn = _fake_stats(172), _fake_stats(172)
    rho = 0.1
    pos, neg, bank = _bank_masks(model, sp, sn, "contrastive_sparse_restricted", rho)
    keep_p, keep_n = pos["lin"], neg["lin"]
    w = model.lin.weight.detach()
    prunable = ~scoring.wanda(w, 0.5 * (sp["lin"].abs_mean + sn["lin"].abs_mean), 0.5)
    assert int((~prunable).sum()) > 0 and int(prunable.sum()) > 0
    for keep in (keep_p, keep_n):
        assert not (~keep & ~prunable).any()  # never prunes a weight Wanda keeps at sparsity 0.5
        assert ((~keep).sum(dim=1) == int(rho / 0.5 * 86)).all()  # rho K per row (86 prunable of 172)
    assert not (~keep_p & ~keep_n).any()  # disjoint pruned sets
    # the unrestricted ranking prunes some weights that Wanda keeps: the restriction is what changed them
    free_p, _, _ = _bank_masks(model, sp, sn, "contrastive_sparse", rho)
    assert (~free_p["lin"] & ~prunable).any()
    assert bank.metadata["method_spec"] == "contrastive_sparse:restrict=0.5,variant=difference"
    with pytest.raises(ValueError, match="sparsity <= 0.25"):
        _bank_masks(model, sp, sn, "contrastive_sparse_restricted", 0.3)
    # Wanda and Contrastive-Wanda keep exactly (1 - rho) K per row
    for m in ("wanda", "contrastive_wanda_sharp"):
        p, n, _ = _bank_masks(model, sp, sn, m, rho)
        assert (p["lin"].sum(dim=1) == 172 - int(rho * 172)).all()


def test_method_scope_masks_only_that_family():
    torch.manual_seed(2)
    model = torch.nn.Module()
    model.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    layer = model.layers[0]
    layer.add_module("self_attn", torch.nn.Module())
    layer.add_module("mlp", torch.nn.Module())
    layer.self_attn.add_module("q_proj", torch.nn.Linear(37, 5, bias=False))
    layer.mlp.add_module("up_proj", torch.nn.Linear(37, 7, bias=False))
    names = ("layers.0.self_attn.q_proj", "layers.0.mlp.up_proj")
    sp, sn = _fake_stats(37, names), _fake_stats(37, names)
    for scope, masked in (("mlp", names[1]), ("attn", names[0])):
        pos, neg, bank = _bank_masks(model, sp, sn, f"contrastive_sparse_relative:scope={scope}", 0.2)
        assert bank.module_names == [masked]  # the other family gets no mask: it stays dense
        assert ((~pos[masked]).sum(dim=1) == 7).all() and not (~pos[masked] & ~neg[masked]).any()
        assert bank.metadata["method_spec"] == f"contrastive_sparse:scope={scope},variant=relative"
    with pytest.raises(ValueError, match="scope must be one of"):
        C.parse_method("wanda:scope=lm_head")


def test_shuffled_control_blocks_are_balanced(shared, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(1)
    pos = [f"I love parties and crowds, story {i}." for i in range(6)]
    neg = [f"I like quiet evenings alone, story {i}." for i in range(6)]
    st = C.pair_statistics(model, tok, {"energy": (pos, neg)}, block=2, seed=0, progress=False)["energy"]
    b = st.blocks
    assert len(b["+"]) == len(b["-"]) == 3
    assert len(b["control+"]) == len(b["control-"]) == 3  # odd block counts still split evenly
    assert sorted(b["control+"] + b["control-"]) == sorted(b["+"] + b["-"])
    for group in ("control+", "control-"):  # each control persona mixes both labels
        assert any("|+|" in k for k in b[group]) and any("|-|" in k for k in b[group])
    name = next(iter(st.pos))
    assert int(st.pos[name].count.sum()) > 0 and not torch.equal(st.pos[name].abs_mean, st.neg[name].abs_mean)
