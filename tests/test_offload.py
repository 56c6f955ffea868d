"""Large-model paths: calibration and patching of an accelerate-offloaded (CPU / disk) random Llama."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from persona_kernels import pipeline
from persona_kernels.bank import MaskBank
from persona_kernels.calibration import collect_stats
from persona_kernels.patching import (
    DEFAULT_TARGET_PATTERN,
    PersonaLinear,
    patch_model,
    persona,
    persona_batch,
    set_persona,
    unpatch_model,
)

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
VOCAB = 97


def tiny_llama():
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def offloaded(model, kind, tmp_path):
    model = copy.deepcopy(model)
    if kind == "cpu":
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if kind == "disk":
        return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    # dispatch_model: embeddings in memory, layer 0 offloaded to CPU, layer 1 and the head to disk
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}
    return accelerate.dispatch_model(model, device_map=device_map, main_device="cpu",
                                     offload_dir=str(tmp_path / "dispatch"), offload_buffers=False,
                                     force_hooks=True)


def batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (3, 10), generator=gen)
        att = torch.ones_like(ids)
        att[0, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": att})
    return out


def random_bank(model):
    gen = torch.Generator().manual_seed(0)
    pattern = re.compile(DEFAULT_TARGET_PATTERN)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and pattern.search(n)}
    masks = {p: {n: torch.rand(s, generator=gen) < 0.5 + 0.2 * i for n, s in shapes.items()} for i, p in enumerate(("a", "b"))}
    return MaskBank.from_bool_masks(masks), masks


@pytest.mark.parametrize("kind", ["cpu", "disk", "dispatch"])
def test_offloaded_calibration_matches_plain_model(kind, tmp_path):
    plain = tiny_llama()
    model = offloaded(plain, kind, tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    want = collect_stats(plain, batches(), progress=False)
    got = collect_stats(model, batches(), progress=False)
    assert list(got) == list(want)
    for name in want:
        assert got[name].count.device.type == "cpu"  # statistics on the module's execution device
        assert torch.equal(got[name].count, want[name].count)
        torch.testing.assert_close(got[name].mean, want[name].mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[name].var, want[name].var, rtol=1e-6, atol=1e-7)
    assert any(p.device.type == "meta" for p in model.parameters())  # weights offloaded again afterwards


@pytest.mark.parametrize("kind", ["cpu", "disk", "dispatch"])
def test_offloaded_model_can_be_patched(kind, tmp_path):
    plain = tiny_llama()
    bank, _ = random_bank(plain)
    model = offloaded(plain, kind, tmp_path)
    patch_model(model, bank)
    patch_model(plain, bank)
    modules = [m for m in model.modules() if isinstance(m, PersonaLinear)]
    assert len(modules) == 14
    meta = [m.weight.device.type == "meta" for m in modules]
    assert all(meta) if kind != "dispatch" else (any(meta) and not all(meta))  # dispatch: layer 1 only on disk
    assert all(m.mask("a").device.type == "cpu" for m in modules)  # masks live on the execution device
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        for name in (None, "a", "b"):
            with persona(plain, name), persona(model, name):
                torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with persona_batch(plain, ["a", None, "b"]), persona_batch(model, ["a", None, "b"]):
            torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        set_persona(model, "a")
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)  # plain is base
    set_persona(model, None)
    unpatch_model(model)
    with torch.no_grad():
        unpatch_model(plain)
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_offloaded_calibrate_bank_equals_plain_bank(tmp_path):
    plain = tiny_llama()
    model = offloaded(plain, "disk", tmp_path)

    class Tok:  # a minimal whitespace tokenizer: enough for calibrate(chat_template=False)
        pad_token_id = 0
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=256):
            ids, offs, pos = [], [], 0
            for word in text.split()[:max_length]:
                start = text.index(word, pos)
                pos = start + len(word)
                ids.append(1 + sum(map(ord, word)) % (VOCAB - 1))
                offs.append((start, pos))
            return {"input_ids": ids, "offset_mapping": offs}

    texts = {"x": ["the cat sat on the mat today", "a quiet evening with a book"],
             "y": ["big loud party with many friends", "dance all night and shout"]}
    kw = dict(method="contrastive_wanda", sparsity=0.2, pairs=[("x", "y")], chat_template=False, progress=False)
    want = pipeline.calibrate(plain, Tok(), texts, **kw)
    got = pipeline.calibrate(model, Tok(), texts, **kw)
    assert got.module_names == want.module_names
    for p in want.personas:
        for m in want.module_names:
            assert torch.equal(got.get(p, m), want.get(p, m)), f"{p}/{m}"
