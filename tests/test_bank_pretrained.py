"""MaskBank.save_pretrained / from_pretrained: adapter folders the Hugging Face way."""

from __future__ import annotations

import json

import pytest
import torch

from persona_kernels import patching
from persona_kernels.bank import MaskBank, MaskBankError

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 40), "model.layers.0.mlp.down_proj": (5, 77)}


def make_bank(**meta) -> MaskBank:
    masks = {p: {n: torch.rand(s) > 0.3 for n, s in SHAPES.items()} for p in ("calm", "bold", "shy")}
    metadata = {"method": "contrastive_wanda", "sparsity": 0.3, "method_kwargs": {"tau": 1.0},
                "pairs": [["calm", "bold"]], **meta}
    return MaskBank.from_bool_masks(masks, metadata=metadata, default_gamma=0.25)


def test_round_trip_keeps_masks_metadata_and_writes_the_config(tmp_path):
    bank = make_bank(method_spec="contrastive_wanda(tau=1)")
    folder = bank.save_pretrained(tmp_path / "adapter", base_model="org/model")
    assert sorted(p.name for p in folder.iterdir()) == ["persona_bank.safetensors", "persona_config.json"]
    config = json.loads((folder / "persona_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/model"
    assert config["fingerprint"] == bank.fingerprint and config["personas"] == ["calm", "bold", "shy"]
    assert config["method"] == "contrastive_wanda" and config["method_spec"] == "contrastive_wanda(tau=1)"
    assert config["rho"] == 0.3 and config["gamma"] == 0.25
    assert config["target_modules"] == ["down_proj", "q_proj"] and config["num_modules"] == 2
    from persona_kernels import __version__

    assert config["persona_kernels_version"] == __version__
    loaded = MaskBank.from_pretrained(folder)
    assert loaded.personas == bank.personas and loaded.shapes == bank.shapes
    assert loaded.default_gamma == 0.25 and loaded.metadata["base_model"] == "org/model"
    for p in bank.personas:
        for n in SHAPES:
            assert torch.equal(loaded.get(p, n), bank.get(p, n))
    # the bank file inside is a normal single-file bank
    assert MaskBank.load(folder / "persona_bank.safetensors").personas == bank.personas


def test_base_model_and_revision_from_a_loaded_model(shared, tmp_path):
    from persona_kernels.models import load_model

    model, _ = load_model(str(shared / "models" / "stories260K"))
    model.config._commit_hash = "0123abcd"
    bank = MaskBank.from_bool_masks({"p": {"model.layers.0.mlp.up_proj": torch.rand(172, 64) > 0.5}})
    config = json.loads((bank.save_pretrained(tmp_path / "a", base_model=model) / "persona_config.json").read_text())
    assert config["base_model_name_or_path"] == str(shared / "models" / "stories260K")
    assert config["base_model_revision"] == "0123abcd"


def test_single_files_keep_loading_through_from_pretrained(tmp_path):
    bank = make_bank()
    path = bank.save(tmp_path / "bank.safetensors")
    assert MaskBank.from_pretrained(path).personas == bank.personas
    assert MaskBank.from_pretrained(str(path), expected_fingerprint=bank.fingerprint).fingerprint == bank.fingerprint


def test_patch_model_accepts_a_folder_and_a_file(shared, tmp_path):
    from persona_kernels.models import load_model

    model, _ = load_model(str(shared / "models" / "stories260K"))
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in names}
    bank = MaskBank.from_bool_masks({"p": {n: torch.rand(s) > 0.5 for n, s in shapes.items()}})
    ids = torch.randint(3, 500, (1, 9))

    def persona_logits(source):
        patching.patch_model(model, source)
        try:
            patching.set_persona(model, "p")
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            patching.unpatch_model(model)

    expected = persona_logits(bank)
    for source in (bank.save_pretrained(tmp_path / "adapter"), bank.save(tmp_path / "b.safetensors")):
        assert torch.equal(persona_logits(str(source)), expected)
        assert torch.equal(persona_logits(source), expected)  # a Path too


def test_overwrite_is_atomic_and_a_failed_write_leaves_the_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    make_bank().save_pretrained(folder)
    new = make_bank()
    new.remove("shy")
    new.save_pretrained(folder)
    assert MaskBank.from_pretrained(folder).personas == ["calm", "bold"]

    def broken(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MaskBank, "save", broken)
    with pytest.raises(OSError, match="No space"):
        make_bank().save_pretrained(folder)
    monkeypatch.undo()
    assert MaskBank.from_pretrained(folder).personas == ["calm", "bold"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left


def test_bad_folders_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no persona_config.json"):
        MaskBank.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MaskBank.from_pretrained(tmp_path / "missing")
    folder = make_bank().save_pretrained(tmp_path / "a")
    config = json.loads((folder / "persona_config.json").read_text())
    (folder / "persona_config.json").write_text(json.dumps(dict(config, personas=["calm"])))
    with pytest.raises(MaskBankError, match="does not match"):
        MaskBank.from_pretrained(folder)
    (folder / "persona_config.json").write_text(json.dumps(dict(config, bank_file="../elsewhere.safetensors")))
    with pytest.raises(MaskBankError, match="must be a file name"):
        MaskBank.from_pretrained(folder)
    (folder / "persona_config.json").write_text("{not json")
    with pytest.raises(MaskBankError, match="unreadable persona_config.json"):
        MaskBank.from_pretrained(folder)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_text("x")
        make_bank().save_pretrained(tmp_path / "f")
