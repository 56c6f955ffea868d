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
    # contrastive masks at rho = 0.2 differ somewhere, and in at most 2 * rho of the weights
    assert 0.0 < data["overall"]["difference_rate"] <= 0.4
    bank = MaskBank.load(bank_path)
    from persona_kernels.analysis import compare

    assert data["overall"]["difference_rate"] == pytest.approx(compare(bank, "extravert", "introvert").difference_rate)
    assert list(tmp_path.glob("*.png"))


def test_generate_with_a_persona(shared, bank_path, capsys):
    """The CLI's output is the greedy continuation of the patched model under the persona, decoded."""
    import torch

    from persona_kernels import patching
    from persona_kernels.models import load_model

    model = str(shared / "models" / "stories260K")
    assert main(["generate", "--model", model, "--bank", str(bank_path), "--persona", "introvert",
                 "--prompt", "Once upon a time", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.strip()
    m, tok = load_model(model)
    patching.patch_model(m, MaskBank.load(bank_path))
    patching.set_persona(m, "introvert")
    enc = tok("Once upon a time\n", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = m.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert out == expected and out


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


# ---------------------------------------------------------------------------------------------- errors


def _one_error_line(capsys, *words):
    import re

    captured = capsys.readouterr()
    progress = re.compile(r"\d+/\d+ \[")  # transformers' "Loading weights" bars are not errors
    lines = [line for line in captured.err.strip().splitlines() if not progress.search(line)]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_nonexistent_and_non_model_paths(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--bank", "b", "--prompt", "x"]) == 2
    _one_error_line(capsys, "does not exist")
    bank = MaskBank.from_bool_masks({"p": {"m": __import__("torch").rand(4, 40) > 0.5}})
    bank.save_pretrained(tmp_path / "adapter")
    assert main(["generate", "--model", str(tmp_path), "--bank", str(tmp_path / "adapter"), "--prompt", "x"]) == 2
    _one_error_line(capsys, "not a Hugging Face model", "config.json")
    assert main(["calibrate", "--model", str(tmp_path / "adapter" / "persona_config.json"), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "is a file")


def test_hub_name_without_network_fails_fast(tmp_path, capsys, monkeypatch):
    import time

    from persona_kernels import models

    probes = []
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: probes.append(1) or False)
    start = time.perf_counter()
    assert main(["calibrate", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - start < 20 and probes == [1]
    _one_error_line(capsys, "no-such-org/no-such-model", "cannot be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["calibrate", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "HF_HUB_OFFLINE")
    assert probes == [1]  # offline: no probe at all


def test_cuda_without_a_gpu(shared, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    model = str(shared / "models" / "stories260K")
    assert main(["calibrate", "--model", model, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "--device cuda", "no CUDA GPU")
    assert main(["calibrate", "--model", model, "--device", "gpu0", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "--device")


@pytest.mark.parametrize("argv, words", [
    (["calibrate", "--threads", "-1", "--out", "x"], ["--threads", "positive integer", "-1"]),
    (["calibrate", "--threads", "two", "--out", "x"], ["--threads", "'two'"]),
    (["generate", "--bank", "b", "--prompt", "x", "--gamma", "7"], ["--gamma", "[0, 1]"]),
    (["calibrate", "--max-length", "0", "--out", "x"], ["--max-length"]),
    (["calibrate"], ["--out"]),
    (["nonsense"], ["invalid choice"]),
])
def test_usage_errors_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _one_error_line(capsys, *words)


def test_analyze_out_is_a_file_and_small_banks(bank_path, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["analyze", str(bank_path), "--out", str(tmp_path / "file")]) == 2
    _one_error_line(capsys, "is a file")
    import torch

    for names in ([], ["only"]):
        bank = MaskBank.from_bool_masks({n: {"m": torch.rand(4, 40) > 0.5} for n in names})
        path = bank.save(tmp_path / f"b{len(names)}.safetensors")
        assert main(["analyze", str(path), "--out", str(tmp_path / "a")]) == 2
        _one_error_line(capsys, f"holds {len(names)} persona(s)", "compares two personas")


def test_very_long_persona_names(shared, tmp_path, capsys):
    import torch

    long_a, long_b = "a" * 300, "b" * 300
    bank = MaskBank.from_bool_masks({n: {"model.layers.0.mlp.up_proj": torch.rand(172, 64) > 0.5}
                                     for n in (long_a, long_b)})
    path = bank.save(tmp_path / "long.safetensors")
    assert main(["analyze", str(path), "--out", str(tmp_path / "a")]) == 0
    files = list((tmp_path / "a").glob("*.json"))
    assert len(files) == 1 and len(files[0].name) < 140
    capsys.readouterr()
    model = str(shared / "models" / "stories260K")
    assert main(["generate", "--model", model, "--bank", str(path), "--persona", "c" * 5000, "--prompt", "x"]) == 2
    line = _one_error_line(capsys, "unknown persona")
    assert len(line) < 800


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.safetensors"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("persona-kernels analyze: error:")


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch, bank_path, tmp_path, capsys):
    from persona_kernels import analysis

    def boom(*a, **k):
        raise RuntimeError("internal\nfailure")

    monkeypatch.setattr(analysis, "compare", boom)
    assert main(["analyze", str(bank_path), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "RuntimeError: internal failure", "--debug")


def test_chat_keeps_gamma_when_a_value_is_rejected(shared, bank_path, capsys, monkeypatch):
    from persona_kernels import patching

    lines = iter(["/gamma 7", "/persona introvert", "/gamma 0.5", "/gamma x", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = patching.set_persona
    monkeypatch.setattr(patching, "set_persona", lambda m, name, gamma=None: seen.append((name, gamma)) or real(m, name, gamma=gamma))
    model = str(shared / "models" / "stories260K")
    assert main(["chat", "--model", model, "--bank", str(bank_path), "--gamma", "0.25"]) == 0
    out = capsys.readouterr().out
    assert out.count("error: /gamma needs a number in [0, 1]") == 2 and "gamma stays 0.25" in out and "gamma stays 0.5" in out
    assert ("introvert", 0.25) in seen  # /persona after the rejected /gamma 7 uses the kept value
    assert "error: persona" not in out and "unknown" not in out


# ---------------------------------------------------------------------------------------------- help


def _subparsers():
    import argparse

    from persona_kernels.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_option_has_help_and_a_shown_default():
    parser, subs = _subparsers()
    checked = 0
    from persona_kernels.bench import _parser as bench_parser
    from persona_kernels.evaluation.runner import build_parser as eval_parser

    delegated = {"eval": eval_parser(), "bench": bench_parser()}  # parsed by their own modules
    for name, sub in [("", parser)] + sorted(subs.items()):
        sub = delegated.get(name, sub)
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings}: no help"
            rendered = sub._get_formatter()._get_help_string(action)
            if action.nargs != 0:
                assert "default" in rendered or "(required)" in rendered, f"{name} {action.option_strings}: {rendered}"
            checked += 1
        assert "%(" not in text
    assert checked > 90


def test_top_level_help_has_an_example_per_subcommand():
    parser, subs = _subparsers()
    text = parser.format_help()
    for name in subs:
        assert f"persona-kernels {name} " in text, name


def test_device_defaults_to_cuda_when_available(monkeypatch):
    import argparse

    import torch

    from persona_kernels.cli import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(argparse.Namespace(device=None)) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _device(argparse.Namespace(device=None)) == "cuda"


def test_quick_says_how_many_texts():
    _, subs = _subparsers()
    from persona_kernels.cli import QUICK

    text = " ".join(subs["demo"].format_help().split())
    assert f"{QUICK['calibration_texts']} calibration texts per persona" in text


# ---------------------------------------------------------------------------------------------- export / adapters


def test_calibrate_to_an_adapter_folder_and_export(shared, persona_dir, tmp_path, capsys):
    model = str(shared / "models" / "stories260K")
    assert main(["calibrate", "--model", model, "--personas", str(persona_dir), "--pairs", "extravert:introvert",
                 "--sparsity", "0.2", "--batch-size", "4", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "persona_config.json").read_text())
    assert config["base_model_name_or_path"] == model and config["personas"] == ["extravert", "introvert"]
    assert main(["export", "--model", model, "--bank", str(tmp_path / "adapter"), "--persona", "introvert",
                 "--out", str(tmp_path / "exported")]) == 0
    assert "plain Hugging Face checkpoint" in capsys.readouterr().out
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "introvert" in card and str(tmp_path / "adapter") in card
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert main(["export", "--model", model, "--bank", str(tmp_path / "adapter"), "--persona", "nobody",
                 "--out", str(tmp_path / "e2")]) == 2
    _one_error_line(capsys, "unknown persona", "nobody")
