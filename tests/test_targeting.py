"""persona_kernels.targeting: one grammar and one default for calibration and patching."""

from __future__ import annotations

import pytest
import torch.nn as nn

from persona_kernels.calibration import resolve_target_modules
from persona_kernels.targeting import PRESETS, TargetError, preset_for, select_linears

transformers = pytest.importorskip("transformers")
COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


def _model(arch):
    config = {
        "llama": lambda: transformers.LlamaConfig(**COMMON),
        "qwen2": lambda: transformers.Qwen2Config(**COMMON),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **COMMON),
        "mistral": lambda: transformers.MistralConfig(**COMMON),
        "gemma": lambda: transformers.GemmaConfig(head_dim=8, **COMMON),
    }[arch]()
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
def test_presets_target_the_decoder_projections_and_never_the_head(arch):
    model = _model(arch)
    assert preset_for(model) is PRESETS[arch]
    want = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
    got = [n for n, _ in select_linears(model)]
    assert sorted(got) == sorted(want) and "lm_head" not in got
    # calibration and patching share it
    assert [n for n, _ in resolve_target_modules(model)] == got


def test_unknown_architecture_defaults_to_every_linear_but_the_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.lm_head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 9)

    assert [n for n, _ in select_linears(Tiny())] == ["a", "b"]


def test_grammar():
    model = _model("llama")
    names = lambda spec: [n for n, _ in select_linears(model, spec)]  # noqa: E731
    assert names("o_proj") == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]  # suffix
    assert names(["*.layers.1.mlp.*"]) == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]  # glob
    assert names(r"re:layers\.0\.mlp\.(up|down)") == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert names(r"layers\.0\.mlp\.(up|down)_proj$") == names(r"re:layers\.0\.mlp\.(up|down)")  # older regex specs
    assert names(["lm_head"]) == ["lm_head"]  # an explicit entry may name the head
    with pytest.raises(TargetError, match="'nope' matches no nn.Linear"):
        names(["q_proj", "nope"])
    with pytest.raises(ValueError, match="not a valid regex"):
        names("re:(")
    with pytest.raises(TypeError, match="target_modules"):
        names([1])
