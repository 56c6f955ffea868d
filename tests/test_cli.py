"""The command line on the real tiny stories260K model: calibrate -> analyze -> generate, errors, demo."""

from __future__ import annotations

import json

import pytest

from persona_kernels import personas
from persona_kernels.bank import MaskBank
from persona_kernels.cli import main


@pytest.fixture(scope="module")
def persona_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personas")
    texts = personas.default_personas()
    for name in ("extravert", "introvert"):
        lines = [json.dumps(item.to_dict()) for item in texts[name][:6]]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bank_path(shared, persona_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    model = str(shared / "models" / "stories260K")
    code = main(["calibrate", "--model", model, "--personas", str(persona_dir), "--pairs", "extravert:introvert",
                 "--sparsity", "0.2", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    return out


def test_calibrate_writes_a_loadable_bank(bank_path):
    bank = MaskBank.load(bank_path)
    assert bank.personas == ["extravert", "introvert"]
    assert bank.metadata["method"] == "contrastive_wanda"
    assert bank.metadata["sparsity"] == pytest.approx(0.2)


def test_analyze_writes_tables_and_figures(bank_path, tmp_path, capsys):
    assert main(["analyze", str(bank_path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "extravert vs introvert" in out
    data = json.loads((tmp_path / "extravert_vs_introvert.json").read_text())
    assert 0.0 <= data["overall"]["difference_rate"] <= 1.0 if "overall" in data else True
    assert list(tmp_path.glob("*.png"))


def test_generate_with_a_persona(shared, bank_path, capsys):
    model = str(shared / "models" / "stories260K")
    assert main(["generate", "--model", model, "--bank", str(bank_path), "--persona", "introvert",
                 "--prompt", "Once upon a time", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_unknown_persona_is_a_clear_error(shared, bank_path, capsys):
    model = str(shared / "models" / "stories260K")
    code = main(["generate", "--model", model, "--bank", str(bank_path), "--persona", "nobody", "--prompt", "Hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nobody" in err and "extravert" in err


def test_bank_for_another_model_is_refused(shared, tmp_path, capsys):
    import torch

    other = MaskBank.from_bool_masks({"p": {"model.layers.0.mlp.up_proj": torch.rand(8, 40) > 0.5}})
    path = tmp_path / "other.safetensors"
    other.save(path)
    model = str(shared / "models" / "stories260K")
    code = main(["generate", "--model", model, "--bank", str(path), "--persona", "p", "--prompt", "Hi"])
    assert code == 2
    assert "up_proj" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"\xff\xfe not utf-8\n", "UTF-8")])
def test_bad_persona_files(shared, tmp_path, content, expected, capsys):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.txt").write_bytes(content)
    (folder / "b.txt").write_text("I like quiet rooms.\n", encoding="utf-8")
    code = main(["calibrate", "--model", str(shared / "models" / "stories260K"), "--personas", str(folder),
                 "--pairs", "a:b", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert "a.txt" in err and expected.lower() in err.lower()
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_sparsity_and_pairs(shared, persona_dir, tmp_path, capsys):
    model = str(shared / "models" / "stories260K")
    assert main(["calibrate", "--model", model, "--personas", str(persona_dir), "--pairs", "extravert:introvert",
                 "--sparsity", "1.5", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["calibrate", "--model", model, "--personas", str(persona_dir), "--pairs", "extravert:nobody",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "nobody" in capsys.readouterr().err


def test_demo_end_to_end_on_a_tiny_model(shared, tmp_path):
    from persona_kernels.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=str(shared / "models" / "stories260K"), out_dir=str(tmp_path), calibration_texts=8,
                     heldout_pairs=4, ab_questions=2, neutral_texts=2, chunk_size=4, max_new_tokens=4, progress=False)
    report = run_demo(cfg)
    assert (tmp_path / "report.md").read_text().startswith("# persona_kernels demo")
    saved = json.loads((tmp_path / "report.json").read_text())
    for pair in ("power", "energy"):
        entry = saved["pairs"][pair]
        assert set(entry["switch"]) == {"prompt", "mask", "control", "mask minus control"}
        est = entry["switch"]["mask"]["response_margin"]
        assert est["low"] <= est["mean"] <= est["high"] and est["n"] == 4
        assert set(entry["split"]["calibration_indices"]).isdisjoint(entry["split"]["heldout_indices"])
    bank = MaskBank.load(tmp_path / "bank.safetensors")
    assert "control:extravert" in bank.personas and report["bank"]["personas"] == bank.personas
    # the demo runs at the package's operating point and says so
    from persona_kernels.operating_point import DEFAULT

    assert bank.metadata["method"] == DEFAULT.method and bank.metadata["sparsity"] == pytest.approx(DEFAULT.sparsity)
    assert bank.metadata["method_kwargs"] == DEFAULT.method_kwargs
    assert "the package's operating point" in (tmp_path / "report.md").read_text()


def test_defaults_are_the_operating_point():
    import inspect

    from persona_kernels.cli import build_parser
    from persona_kernels.operating_point import DEFAULT, default_method_kwargs
    from persona_kernels.pipeline import build_bank, calibrate

    for cmd in ("demo", "calibrate"):
        args = build_parser().parse_args([cmd] + (["--out", "x"] if cmd == "calibrate" else []))
        assert (args.method, args.sparsity, args.gamma) == (DEFAULT.method, DEFAULT.sparsity, DEFAULT.gamma)
        assert {"phi": args.phi, "tau": args.tau, "statistic": args.statistic} == DEFAULT.method_kwargs
    for fn in (build_bank, calibrate):
        sig = inspect.signature(fn).parameters
        assert sig["method"].default == DEFAULT.method and sig["sparsity"].default == DEFAULT.sparsity
    assert default_method_kwargs(DEFAULT.method) == DEFAULT.method_kwargs and default_method_kwargs("wanda") == {}
