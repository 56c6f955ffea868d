"""persona_batch: one persona per batch row on a patched model, forward and generate()."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import persona_kernels as pk
from persona_kernels.bank import MaskBank
from persona_kernels.patching import DEFAULT_TARGET_PATTERN, PersonaLinear, patch_model, persona_batch, set_persona

transformers = pytest.importorskip("transformers")
VOCAB = 97
PERSONAS = ("a", "b", "c")


def tiny_llama():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def patched(skip_module_for=None):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    pattern = re.compile(DEFAULT_TARGET_PATTERN)
    masks = {}
    for i, p in enumerate(PERSONAS):
        masks[p] = {
            n: torch.rand(m.weight.shape, generator=gen) < 0.4 + 0.15 * i
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and pattern.search(n)
        }
    if skip_module_for:  # this persona has no mask on one module: that module stays dense for it
        masks[skip_module_for].pop("model.layers.0.mlp.up_proj")
    return patch_model(model, MaskBank.from_bool_masks(masks, default_gamma=0.0))


def row_alone(model, ids, name, gamma=None, **kw):
    set_persona(model, name, gamma)
    try:
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits
    finally:
        set_persona(model, None)


@pytest.mark.parametrize("backend", ["auto"])
def test_mixed_batch_rows_equal_single_persona_runs(backend):
    model = patched(skip_module_for="c")
    pk.patching.set_backend(model, backend)
    rows = ["a", None, "c", "b", "a", None]
    ids = torch.randint(1, VOCAB, (len(rows), 9), generator=torch.Generator().manual_seed(3))
    with persona_batch(model, rows):
        with torch.no_grad():
            mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        want = row_alone(model, ids, name)[i]
        torch.testing.assert_close(mixed[i], want, rtol=1e-4, atol=1e-4)
    # the personas matter (the test can fail): row 0 differs from the base model and from persona b
    base = row_alone(model, ids, None)
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)
    assert not torch.allclose(mixed[0], row_alone(model, ids, "b")[0], atol=1e-3)
    # the block is left cleanly: the base model again, and set_persona works
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


def test_gamma_per_persona_and_one_mask_stack():
    model = patched()
    rows = ["a", "b", "a"]
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(4))
    with persona_batch(model, rows, gamma={"b": 0.4}):
        with torch.no_grad():
            mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[1], row_alone(model, ids, "b", 0.4)[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[0], row_alone(model, ids, "a", 0.0)[0], rtol=1e-4, atol=1e-4)
    module = model.model.layers[0].self_attn.q_proj
    assert isinstance(module, PersonaLinear)
    # every persona's mask lives in one stack built at patch time: a batch block allocates no masks
    stack = module.persona_masks
    assert stack.shape[0] == len(module.personas) and stack.data_ptr() == module.mask("a").data_ptr()
    with persona_batch(model, ["b", "a", "b"]):
        assert module.persona_masks is stack


def test_generate_mixed_batch_equals_per_row_generation():
    model = patched()
    model.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 8, 6, 8]
    rows = ["b", None, "a", "c"]
    width = max(lengths)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # left padding
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        att[i, width - n:] = 1
    kw = dict(attention_mask=att, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with persona_batch(model, rows), torch.no_grad():
        mixed = model.generate(ids, **kw)
    for i, name in enumerate(rows):
        set_persona(model, name)
        with torch.no_grad():
            alone = model.generate(ids, **kw)
        set_persona(model, None)
        assert torch.equal(mixed[i], alone[i]), f"row {i} ({name}) differs"
    outs = {tuple(mixed[i, width:].tolist()) for i in range(len(rows))}
    assert len(outs) > 1  # different personas generate different continuations here


def test_errors():
    model = patched()
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(KeyError, match="unknown persona"):
        with persona_batch(model, ["a", "zzz"]):
            pass
    with pytest.raises(TypeError, match="argument 'personas'"):
        with persona_batch(model, "a"):
            pass
    with pytest.raises(RuntimeError, match="batch size 2"):
        with persona_batch(model, ["a", "b", None]), torch.no_grad():
            model(input_ids=ids)
    with persona_batch(model, ["a", "b"]):
        with pytest.raises(RuntimeError, match="persona_batch block is active"):
            set_persona(model, "a")
    pk.merge_persona(model, "a")
    with pytest.raises(RuntimeError, match="merged"):
        with persona_batch(model, ["a", "b"]):
            pass
