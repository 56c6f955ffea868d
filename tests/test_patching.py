"""Tests for persona_kernels.patching: drop-in persona switching on Hugging Face models."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from persona_kernels.bank import MaskBank
from persona_kernels.ops.packing import pack_mask
from persona_kernels.patching import (
    DEFAULT_TARGET_PATTERN,
    PersonaLinear,
    add_persona,
    disable_persona,
    get_gamma,
    get_persona,
    is_patched,
    list_personas,
    merge_persona,
    patch_model,
    persona,
    remove_persona,
    set_backend,
    set_persona,
    unmerge_persona,
    unpatch_model,
)
from persona_kernels.patching import coverage as pk_coverage

transformers = pytest.importorskip("transformers")


VOCAB = 97
PATTERN = re.compile(DEFAULT_TARGET_PATTERN)


def make_bank(bool_masks, **kwargs):
    return MaskBank.from_bool_masks(bool_masks, **kwargs)


# -- tiny models -----------------------------------------------------------------------------------------
def _tiny_config(arch: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(arch)


_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def tiny_model(arch: str = "llama", dtype=torch.float32):
    torch.manual_seed(1)
    model = getattr(transformers, _MODEL_CLASSES[arch])(_tiny_config(arch))
    with torch.no_grad():  # HF initialises biases and norms to constants: make everything nonzero and random
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def random_masks(model, personas=("a", "b"), density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, p in enumerate(personas):
        out[p] = {
            name: torch.rand(m.weight.shape, generator=gen) < (density + 0.1 * i)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and PATTERN.search(name)
        }
    return out


def float64_reference(model, masks_p, gamma):
    """A float64 copy of the unpatched model with W * G written into the masked weights."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, mask in masks_p.items():
            w = ref.get_submodule(name).weight
            g = mask.double() + gamma * (1.0 - mask.double())
            w.mul_(g)
    return ref


def tokens(batch=2, seq=11, vocab=VOCAB, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tol(dtype):
    return {torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}[dtype]


# -- correctness against float64 --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_patched_matches_float64_reference(arch):
    model = tiny_model(arch)
    never_patched = copy.deepcopy(model)
    ids = tokens()
    base_before = logits(model, ids)
    masks = random_masks(model)
    bank = make_bank(masks)
    assert patch_model(model, bank) is model
    n_targets = sum(1 for n, m in model.named_modules() if isinstance(m, PersonaLinear))
    assert n_targets == 2 * 7  # q, k, v, o, gate, up, down in both layers
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(logits(model, ids), base_before)  # base is bit-identical
    results = {}
    for p in ("a", "b"):
        for gamma in (0.0, 0.3):
            set_persona(model, p, gamma)
            got = logits(model, ids)
            want = logits(float64_reference(never_patched, masks[p], gamma), ids)
            torch.testing.assert_close(got.double(), want, atol=tol(torch.float32), rtol=1e-4)
            assert not torch.allclose(got, base_before, atol=1e-3)  # the mask matters
            results[(p, gamma)] = got
    assert not torch.allclose(results[("a", 0.0)], results[("b", 0.0)], atol=1e-3)
    assert not torch.allclose(results[("a", 0.0)], results[("a", 0.3)], atol=1e-3)


def model_unpatched_copy(model):
    """A deep copy of a patched model with the original Linear modules back."""
    clone = copy.deepcopy(model)
    unpatch_model(clone)
    return clone


def test_stories260k_reference_and_switching(shared):
    path = shared / "models" / "stories260K"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    never_patched = copy.deepcopy(model)
    ids = tokens(vocab=model.config.vocab_size, seq=16)
    base = logits(never_patched, ids)
    masks = random_masks(model, personas=("a", "b"))
    assert len(masks["a"]) == 5 * 7
    patch_model(model, make_bank(masks))
    expected = {}
    for p in ("a", "b"):
        for gamma in (0.0, 0.3):
            want = logits(float64_reference(never_patched, masks[p], gamma), ids)
            with persona(model, p, gamma):
                got = logits(model, ids)
            torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)
            expected[(p, gamma)] = got
    # A -> B -> A -> base reproduces every result exactly
    for p, gamma in [("a", 0.0), ("b", 0.3), ("a", 0.0), ("b", 0.0), ("a", 0.3)]:
        set_persona(model, p, gamma)
        assert torch.equal(logits(model, ids), expected[(p, gamma)])
    set_persona(model, None)
    assert torch.equal(logits(model, ids), base)
    unpatch_model(model)
    assert torch.equal(logits(model, ids), base)


def test_switching_is_exact_and_allocation_free():
    model = tiny_model("qwen2")
    ids = tokens()
    patch_model(model, make_bank(random_masks(model)))
    base = logits(model, ids)
    set_persona(model, "a")
    a = logits(model, ids)
    set_persona(model, "b", 0.3)
    b = logits(model, ids)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    buffers_before = {n: b_.data_ptr() for n, b_ in model.named_buffers()}
    for _ in range(2):
        set_persona(model, "a")
        assert get_persona(model) == "a"
        assert torch.equal(logits(model, ids), a)
        set_persona(model, "b", 0.3)
        assert (get_persona(model), get_gamma(model)) == ("b", 0.3)
        assert torch.equal(logits(model, ids), b)
        set_persona(model, None)
        assert get_persona(model) is None
        assert torch.equal(logits(model, ids), base)
    for n, p in model.named_parameters():
        assert p.data_ptr() == ptrs[n] and torch.equal(p, weights_before[n])
    assert {n: b_.data_ptr() for n, b_ in model.named_buffers()} == buffers_before


def test_same_parameters_state_dict_and_unpatch_bit_exact():
    model = tiny_model("llama")
    ids = tokens()
    never_patched = copy.deepcopy(model)
    keys = list(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and PATTERN.search(n)}
    params = {n: (m.weight, m.bias) for n, m in originals.items()}
    patch_model(model, make_bank(random_masks(model)))
    assert is_patched(model)
    assert list(model.state_dict()) == keys  # masks are non-persistent buffers
    for n, (w, b) in params.items():
        mod = model.get_submodule(n)
        assert isinstance(mod, PersonaLinear) and isinstance(mod, nn.Linear)
        assert mod.weight is w and mod.bias is b
        assert mod.weight.data_ptr() == w.data_ptr()
        assert mod.mask("a").dtype == torch.int32 and mod.mask("a").device == w.device
    # loading a state dict into the patched model works (same keys)
    model.load_state_dict(never_patched.state_dict())
    set_persona(model, "a", 0.3)
    logits(model, ids)
    unpatch_model(model)
    assert not is_patched(model)
    for n, m in originals.items():
        assert model.get_submodule(n) is m
        assert type(m) is nn.Linear
    assert not any(isinstance(m, PersonaLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), logits(never_patched, ids))
    assert list(model.state_dict()) == keys
    patch_model(model, make_bank(random_masks(model)))  # can be patched again after unpatching


def test_generate_with_and_without_kv_cache():
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)))
    ids = tokens(batch=1, seq=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for p in (None, "b"):
            set_persona(model, p, 0.3 if p == "b" else None)
            with_cache = model.generate(ids, use_cache=True, **kwargs)
            without = model.generate(ids, use_cache=False, **kwargs)
            assert with_cache.shape == (1, 11)
            assert torch.equal(with_cache, without)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_bit_exact(dtype):
    model = tiny_model("qwen2", dtype)
    ids = tokens()
    masks = random_masks(model)
    patch_model(model, make_bank(masks))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_persona(model, "a", 0.3)
    gated = logits(model, ids)
    merge_persona(model, "a", 0.3)
    assert get_persona(model) == "a" and get_gamma(model) == 0.3
    w = model.model.layers[0].mlp.up_proj.weight
    m = masks["a"]["model.layers.0.mlp.up_proj"]
    assert torch.equal(w[m], originals["model.layers.0.mlp.up_proj.weight"][m])
    torch.testing.assert_close(w[~m].float(), (originals["model.layers.0.mlp.up_proj.weight"][~m].float() * 0.3).to(dtype).float())
    merged = logits(model, ids)
    torch.testing.assert_close(merged.float(), gated.float(), atol=tol(dtype), rtol=tol(dtype))
    with pytest.raises(RuntimeError, match="merged"):
        set_persona(model, "b")
    with pytest.raises(RuntimeError, match="merged"):
        set_persona(model, None)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_persona(model, "b")
    set_persona(model, "a", 0.3)  # no-op: that is what the merged weights compute
    unmerge_persona(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n
    assert get_persona(model) == "a"
    assert torch.equal(logits(model, ids), gated)
    set_persona(model, None)
    merge_persona(model, "b", 0.0)
    unpatch_model(model)  # unmerges first
    for n, p in model.named_parameters():
        assert torch.equal(p, originals[n]), n
    assert not is_patched(model)


def test_unpatch_keep_merged_exports_the_persona():
    model = tiny_model("llama")
    masks = random_masks(model)
    patch_model(model, make_bank(masks))
    merge_persona(model, "b", 0.0)
    unpatch_model(model, keep_merged=True)
    w = model.model.layers[1].self_attn.o_proj.weight
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert torch.all(w[~masks["b"]["model.layers.1.self_attn.o_proj"]] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = tiny_model("qwen3")
    masks = random_masks(model)
    ids = tokens()
    want = logits(float64_reference(model, masks["a"], 0.3), ids)
    model = model.to(dtype)
    patch_model(model, make_bank(masks))
    base = logits(model, ids)
    set_persona(model, "a", 0.3)
    got = logits(model, ids)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=tol(dtype), rtol=tol(dtype))
    set_persona(model, None)
    assert torch.equal(logits(model, ids), base)


def test_context_managers_restore_state_also_on_error():
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)))
    set_persona(model, "a", 0.3)
    with persona(model, "b", 0.0):
        assert (get_persona(model), get_gamma(model)) == ("b", 0.0)
        with disable_persona(model):
            assert get_persona(model) is None
            assert all(m.active is None for m in model.modules() if isinstance(m, PersonaLinear))
        assert get_persona(model) == "b"
    assert (get_persona(model), get_gamma(model)) == ("a", 0.3)
    with pytest.raises(ZeroDivisionError):
        with persona(model, None):
            1 / 0
    assert (get_persona(model), get_gamma(model)) == ("a", 0.3)
    assert all(m.active == "a" and m.gamma == 0.3 for m in model.modules() if isinstance(m, PersonaLinear))


def test_add_and_remove_persona():
    model = tiny_model("llama")
    masks = random_masks(model, personas=("a", "b", "c"))
    ids = tokens()
    patch_model(model, make_bank({"a": masks["a"]}))
    assert list_personas(model) == ["a"]
    base = logits(model, ids)
    packed = {n: pack_mask(m) for n, m in masks["b"].items()}
    add_persona(model, "b", packed)
    half = {n: m for i, (n, m) in enumerate(masks["c"].items()) if i % 2 == 0}
    add_persona(model, "c", half)  # bool masks are packed; the other modules stay dense
    assert list_personas(model) == ["a", "b", "c"]
    with persona(model, "b"):
        torch.testing.assert_close(logits(model, ids).double(), logits(float64_reference(model_unpatched_copy(model), masks["b"], 0.0), ids), atol=2e-4, rtol=1e-4)
    with persona(model, "c", 0.3):
        torch.testing.assert_close(logits(model, ids).double(), logits(float64_reference(model_unpatched_copy(model), half, 0.3), ids), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already exists"):
        add_persona(model, "b", packed)
    add_persona(model, "b", {n: pack_mask(m) for n, m in masks["a"].items()}, overwrite=True)
    set_persona(model, "a")
    a = logits(model, ids)
    set_persona(model, "b")
    assert torch.equal(logits(model, ids), a)
    with pytest.raises(RuntimeError, match="active"):
        remove_persona(model, "b")
    set_persona(model, None)
    remove_persona(model, "b")
    assert list_personas(model) == ["a", "c"]
    assert all(not m.has_mask("b") for m in model.modules() if isinstance(m, PersonaLinear))
    with pytest.raises(KeyError, match="unknown persona 'b'"):
        set_persona(model, "b")
    assert torch.equal(logits(model, ids), base)
    with pytest.raises(ValueError, match="not a patched module"):
        add_persona(model, "d", {"lm_head": torch.zeros(VOCAB, 2, dtype=torch.int32)})
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=re.escape(name)):
        add_persona(model, "d", {name: torch.zeros(64, 5, dtype=torch.int32)})


@pytest.mark.parametrize(
    "target, expected",
    [
        (["q_proj", "v_proj"], 4),
        (r"layers\.0\.mlp\.(up|down)_proj$", 2),
        (["model.layers.1.self_attn.o_proj"], 1),
        (lambda name, module: name.endswith("gate_proj"), 2),
    ],
)
def test_target_modules(target, expected):
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)), target_modules=target)
    assert sum(isinstance(m, PersonaLinear) for m in model.modules()) == expected


def test_backends_agree_and_set_backend():
    model = tiny_model("llama")
    ids = tokens()
    patch_model(model, make_bank(random_masks(model)), backend="torch")
    set_persona(model, "a", 0.3)
    ref = logits(model, ids)
    set_backend(model, "auto")
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        set_backend(model, "nope")


def test_errors():
    model = tiny_model("llama")
    masks = random_masks(model)
    bank = make_bank(masks)
    with pytest.raises(RuntimeError, match="not patched"):
        set_persona(model, "a")
    with pytest.raises(ValueError, match="backend"):
        patch_model(model, bank, backend="gpu")
    with pytest.raises(TypeError, match="MaskBank"):
        patch_model(model, {"a": 1})
    # a model without any targetable Linear
    with pytest.raises(RuntimeError, match="no nn.Linear"):
        patch_model(nn.Sequential(nn.Conv1d(2, 2, 1)), bank)
    with pytest.raises(RuntimeError, match="no nn.Linear"):
        patch_model(model, bank, target_modules=["nothing_here"])
    # shape mismatch: a bank built for another model, listing the first mismatches
    other = tiny_model("llama")
    other.model.layers[0].mlp.up_proj = nn.Linear(64, 160, bias=False)
    other.model.layers[0].mlp.gate_proj = nn.Linear(64, 160, bias=False)
    other.model.layers[0].mlp.down_proj = nn.Linear(160, 64, bias=False)
    with pytest.raises(RuntimeError, match=r"(?s)does not fit.*3 mismatches.*model\.layers\.0\.mlp\.gate_proj.*\(172, 64\)") as info:
        patch_model(other, bank)
    assert "down_proj" in str(info.value)
    assert not is_patched(other)
    # bank modules missing from the model
    fewer = tiny_model("llama")
    del fewer.model.layers[1]
    with pytest.raises(RuntimeError, match="not found in the model"):
        patch_model(fewer, bank)
    patch_model(model, bank)
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model, bank)
    with pytest.raises(KeyError, match=r"unknown persona 'zzz'.*\['a', 'b'\]"):
        set_persona(model, "zzz")
    with pytest.raises(ValueError, match="gamma"):
        set_persona(model, "a", 1.5)
    with pytest.raises(TypeError, match="gamma"):
        set_persona(model, "a", "0.3")
    with pytest.raises(RuntimeError, match="no persona is merged"):
        unmerge_persona(model)
    with pytest.raises(KeyError, match="unknown persona"):
        merge_persona(model, "zzz")
    assert get_persona(model) is None


def test_fingerprint_mismatch_and_default_gamma():
    model = tiny_model("llama")
    masks = random_masks(model)

    class ForeignBank(MaskBank):
        @property
        def fingerprint(self):
            return "0123456789abcdef"

    bank = ForeignBank.from_bool_masks(masks)
    with pytest.raises(RuntimeError, match="fingerprint '0123456789abcdef'"):
        patch_model(model, bank)
    assert not is_patched(model)
    patch_model(model, bank, check_fingerprint=False)
    unpatch_model(model)
    patch_model(model, make_bank(masks, default_gamma=0.3))
    set_persona(model, "a")
    assert get_gamma(model) == 0.3
    assert all(m.gamma == 0.3 for m in model.modules() if isinstance(m, PersonaLinear) and m.active)


def test_persona_without_mask_on_some_modules_keeps_them_dense():
    model = tiny_model("llama")
    never_patched = copy.deepcopy(model)
    ids = tokens()
    masks = random_masks(model)
    only_mlp = {n: m for n, m in masks["b"].items() if ".mlp." in n}
    patch_model(model, make_bank({"a": masks["a"], "b": only_mlp}))
    set_persona(model, "b")
    active = [m for m in model.modules() if isinstance(m, PersonaLinear) and m.active == "b"]
    assert len(active) == len(only_mlp)
    want = logits(float64_reference(never_patched, only_mlp, 0.0), ids)
    torch.testing.assert_close(logits(model, ids).double(), want, atol=2e-4, rtol=1e-4)


def test_compiled_model_is_unwrapped_by_helpers():
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)))
    compiled = torch.compile(model, backend="eager")
    set_persona(compiled, "a")
    assert get_persona(model) == "a"


def test_torch_compile_matches_eager():
    # aot_eager runs dynamo + AOTAutograd + the op's fake implementation without a C++ toolchain
    # (the default inductor backend also works: ~40 s here, too slow for the suite).
    model = tiny_model("llama")
    ids = tokens()
    patch_model(model, make_bank(random_masks(model)))
    set_persona(model, "a", 0.3)
    eager_a = logits(model, ids)
    set_persona(model, None)
    eager_base = logits(model, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        set_persona(compiled, "a", 0.3)
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager_a, atol=1e-5, rtol=1e-5)
        set_persona(compiled, None)  # a switch is seen by the compiled model (guards recompile)
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager_base, atol=1e-5, rtol=1e-5)


def test_accelerate_hook_on_a_linear_is_carried_over():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    ids = tokens()
    masks = random_masks(model)
    want = logits(float64_reference(model, masks["a"], 0.0), ids)
    name = "model.layers.0.mlp.up_proj"
    original = model.get_submodule(name)
    hook = AlignDevicesHook(execution_device="cpu", io_same_device=True)
    add_hook_to_module(original, hook)
    calls = []
    hook.pre_forward = lambda module, *args, **kwargs: (calls.append(type(module).__name__), (args, kwargs))[1]
    patch_model(model, make_bank(masks))
    assert model.get_submodule(name)._hf_hook is hook
    set_persona(model, "a")
    torch.testing.assert_close(logits(model, ids).double(), want, atol=2e-4, rtol=1e-4)
    assert calls == ["PersonaLinear"]
    unpatch_model(model)
    assert model.get_submodule(name) is original and original._hf_hook is hook


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharded_model_masks_follow_each_module_device():
    model = tiny_model("llama")
    ids = tokens()
    masks = random_masks(model)
    want = logits(float64_reference(model, masks["a"], 0.0), ids)
    model.model.layers[1].to("cuda")  # a hand-made two-device split: layer 1 on the GPU
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model.model.layers[1], AlignDevicesHook(execution_device="cuda", io_same_device=True))
    patch_model(model, make_bank(masks))
    for name, m in model.named_modules():
        if isinstance(m, PersonaLinear):
            assert m.mask("a").device == m.weight.device
    set_persona(model, "a")
    torch.testing.assert_close(logits(model, ids).double(), want, atol=1e-3, rtol=1e-3)


# -- stale state and wrong inputs (issue 15) -------------------------------------------------------------
def test_bank_from_another_checkpoint_is_refused(tmp_path):
    model = tiny_model("llama")
    masks = random_masks(model)
    bank = make_bank(masks).record_weights(model)
    other = tiny_model("llama")
    with torch.no_grad():  # same architecture and shapes, other weights (another checkpoint)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(RuntimeError, match="built for other weights.*sampled weight values differ.*check_fingerprint=False"):
        patch_model(other, bank)
    assert not is_patched(other)
    patch_model(other, bank, check_fingerprint=False)
    patch_model(model.to(torch.bfloat16), bank)  # the same checkpoint in another dtype passes
    # a file saved without a weight sample (older banks) loads and patches, with a warning
    path = tmp_path / "old.safetensors"
    make_bank(masks).save(path)
    unpatch_model(model)
    with pytest.warns(UserWarning, match="no weight digest"):
        patch_model(model, MaskBank.load(path))


def test_partial_bank_is_refused_unless_allowed():
    model = tiny_model("llama")
    masks = random_masks(model)
    layer0 = {p: {n: m for n, m in ms.items() if ".layers.0." in n} for p, ms in masks.items()}
    with pytest.raises(RuntimeError, match=r"covers 7 of the 14 targeted modules.*layers\.1.*allow_partial=True"):
        patch_model(model, make_bank(layer0))
    assert not is_patched(model)
    patch_model(model, make_bank(layer0), allow_partial=True)
    cov = pk_coverage(model)
    assert len(cov["patched"]) == 7 and len(cov["dense"]) == 7 and all(".layers.1." in n for n in cov["dense"])
    unpatch_model(model)
    mlp_only = {p: {n: m for n, m in ms.items() if ".mlp." in n} for p, ms in masks.items()}
    patch_model(model, make_bank(mlp_only))  # a bank of one kind of module (scope=mlp) is complete for that kind
    assert pk_coverage(model)["dense"] == []


@pytest.mark.parametrize("change", ["load_state_dict", "data_write"])
def test_unmerge_refuses_weights_changed_since_the_merge(change):
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    merge_persona(model, "a")
    if change == "load_state_dict":
        model.load_state_dict(original)
    else:  # a write that bypasses the version counter
        model.model.layers[1].mlp.down_proj.weight.data[0, :5] += 1.0
    with pytest.raises(RuntimeError, match="changed since persona 'a' was merged.*down_proj|changed since persona 'a' was merged"):
        unmerge_persona(model)
    with pytest.raises(RuntimeError, match="changed since persona 'a' was merged"):
        unpatch_model(model)
    unpatch_model(model, keep_merged=True)  # the explicit way out keeps the current weights
    assert not is_patched(model)


def test_add_persona_uses_the_bank_name_rule():
    model = tiny_model("llama")
    patch_model(model, make_bank(random_masks(model)))
    name = "model.layers.0.mlp.down_proj"
    mask = pack_mask(torch.rand(64, 172) < 0.5)
    with pytest.raises(ValueError, match="without '/'"):
        add_persona(model, "a/b", {name: mask})
    with pytest.raises(ValueError, match="without '/'"):
        MaskBank().add("a/b", {name: torch.rand(64, 172) < 0.5})


def test_bank_default_gamma_is_checked_when_patching():
    model = tiny_model("llama")
    bank = make_bank(random_masks(model))
    bank.metadata["default_gamma"] = 5.0  # bypassing the setter
    with pytest.raises(ValueError, match="default_gamma"):
        patch_model(model, bank)
