"""export_persona: a plain Hugging Face checkpoint with the persona's gates baked in.

The exported folder is loaded by plain transformers in a subprocess that never imports persona_kernels; its
logits must equal the patched model's under that persona, in the same dtype. Tolerances: float32
``atol=1e-5, rtol=1e-4`` (only the summation order differs: gated kernel vs F.linear on W * G); bfloat16 at
gamma = 0 ``atol=rtol=2e-2`` (the baked weights are exact, the two bf16 GEMMs round differently).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import persona_kernels as pk
from persona_kernels import patching
from persona_kernels.bank import MaskBank

PLAIN_LOAD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs = json.loads(sys.argv[1])  # [[folder, ids_file, out_file, dtype], ...]
    for folder, ids_file, out_file, dtype in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        AutoTokenizer.from_pretrained(folder)  # the tokenizer travels with the checkpoint
        with torch.no_grad():
            logits = model(input_ids=load_file(ids_file)["ids"]).logits
        save_file({"logits": logits.contiguous()}, out_file)
    assert not any(m == "persona_kernels" or m.startswith("persona_kernels.") for m in sys.modules), "imported"
""")


def plain_transformers_logits(jobs, tmp_path) -> list[torch.Tensor]:
    """Logits of exported folders, ``jobs = [(folder, ids, dtype), ...]``, computed by one fresh interpreter
    that imports transformers only (never persona_kernels)."""
    from safetensors.torch import load_file, save_file

    args = []
    for i, (folder, ids, dtype) in enumerate(jobs):
        ids_file, out_file = tmp_path / f"ids{i}.safetensors", tmp_path / f"logits{i}.safetensors"
        save_file({"ids": ids.contiguous()}, str(ids_file))
        args.append([str(folder), str(ids_file), str(out_file), str(dtype).replace("torch.", "")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(args)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(a[2])["logits"] for a in args]


def random_bank(model, keep: float = 0.7, personas=("a", "b"), default_gamma: float = 0.0) -> MaskBank:
    """A bank of random keep-masks over the default targets of ``model`` (fresh random data, no zeros)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in
             ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    masks = {p: {n: torch.rand(dict(model.named_modules())[n].weight.shape) < keep for n in names} for p in personas}
    return MaskBank.from_bool_masks(masks, metadata={"method": "random-test", "sparsity": 1 - keep},
                                    default_gamma=default_gamma)


def _patched_logits(model, bank, persona, gamma, ids):
    patching.patch_model(model, bank)
    try:
        patching.set_persona(model, persona, gamma=gamma)
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        patching.unpatch_model(model)


@pytest.fixture(scope="module")
def tiny(shared):
    return pk.load_model(str(shared / "models" / "stories260K"))


CASES = [  # dtype, gamma, (atol, rtol)
    (torch.float32, 0.0, (1e-5, 1e-4)),
    (torch.float32, 0.25, (1e-5, 1e-4)),
    (torch.bfloat16, 0.0, (2e-2, 2e-2)),
]


@pytest.fixture(scope="module")
def exported(shared, tmp_path_factory):
    """Each case exported and reloaded by plain transformers (one subprocess for all cases)."""
    tmp = tmp_path_factory.mktemp("export")
    results, jobs = [], []
    for i, (dtype, gamma, _) in enumerate(CASES):
        model, tok = pk.load_model(str(shared / "models" / "stories260K"), dtype=dtype)
        bank = random_bank(model)
        ids = torch.randint(3, model.config.vocab_size, (2, 23))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = pk.export_persona(model, bank, "b", tmp / f"exported{i}", gamma=gamma, tokenizer=tok)
        unchanged = not patching.is_patched(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        expected = _patched_logits(model, bank, "b", gamma, ids)
        with torch.no_grad():
            base = model(input_ids=ids).logits
        results.append({"out": out, "expected": expected, "base": base, "unchanged": unchanged})
        jobs.append((out, ids, dtype))
    for result, got in zip(results, plain_transformers_logits(jobs, tmp)):
        result["got"] = got
    return results


@pytest.mark.parametrize("case", range(len(CASES)), ids=["fp32-gamma0", "fp32-gamma0.25", "bf16-gamma0"])
def test_exported_checkpoint_matches_the_patched_model(exported, case):
    dtype, _, (atol, rtol) = CASES[case]
    r = exported[case]
    assert r["unchanged"]  # the model is left as it was: unpatched, weights bit-identical
    assert r["got"].dtype == r["expected"].dtype == dtype
    torch.testing.assert_close(r["got"], r["expected"], atol=atol, rtol=rtol)
    assert (r["got"].float() - r["base"].float()).abs().max() > 100 * atol  # the persona really changed the model
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (r["out"] / name).is_file(), name


def test_model_card_and_export_info_name_persona_method_and_bank(tiny, tmp_path):
    model, tok = tiny
    bank = random_bank(model)
    bank.save_pretrained(tmp_path / "adapter", base_model="org/base-model")
    out = pk.export_persona(model, str(tmp_path / "adapter"), "a", tmp_path / "exported", tokenizer=tok)
    card = (out / "README.md").read_text()
    assert "Persona `a`" in card and "random-test" in card and str(tmp_path / "adapter") in card
    assert "base_model: org/base-model" in card and bank.fingerprint in card
    assert "vllm" in card.lower() and "llama.cpp" in card
    info = json.loads((out / "persona_export.json").read_text())
    assert info["persona"] == "a" and info["gamma"] == 0.0 and info["bank_fingerprint"] == bank.fingerprint


def test_export_from_an_already_patched_model_restores_its_persona(tiny, tmp_path):
    model, tok = tiny
    bank = random_bank(model, default_gamma=0.5)
    patching.patch_model(model, bank)
    try:
        patching.set_persona(model, "a", gamma=0.3)
        pk.export_persona(model, bank, "b", tmp_path / "exported", tokenizer=tok)
        assert patching.get_persona(model) == "a" and patching.get_gamma(model) == pytest.approx(0.3)
        assert json.loads((tmp_path / "exported" / "persona_export.json").read_text())["gamma"] == 0.5
    finally:
        patching.unpatch_model(model)


def test_export_errors_are_clear(tiny, tmp_path):
    model, tok = tiny
    bank = random_bank(model)
    with pytest.raises(KeyError, match="unknown persona 'nobody'"):
        pk.export_persona(model, bank, "nobody", tmp_path / "x", tokenizer=tok)
    with pytest.raises(ValueError, match="gamma"):
        pk.export_persona(model, bank, "a", tmp_path / "x", gamma=2.0, tokenizer=tok)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        pk.export_persona(model, bank, "a", tmp_path / "file", tokenizer=tok)
    with pytest.raises(TypeError, match="MaskBank"):
        pk.export_persona(model, {"a": {}}, "a", tmp_path / "x", tokenizer=tok)
    assert not (tmp_path / "x").exists() and not patching.is_patched(model)


@pytest.mark.slow  # ~60 s on a loaded 2-core CPU (writes and reloads a 540 MB checkpoint)
def test_exported_smollm2_matches_the_patched_model(tmp_path):
    pytest.importorskip("gguf")
    try:
        model, tok = pk.load_model()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"default model not installed: {exc}")
    bank = random_bank(model, keep=0.98)
    ids = tok(["The weather today is", "My favourite book"], return_tensors="pt", padding=True)["input_ids"]
    out = pk.export_persona(model, bank, "a", tmp_path / "exported", tokenizer=tok)
    expected = _patched_logits(model, bank, "a", 0.0, ids)
    (got,) = plain_transformers_logits([(out, ids, torch.float32)], tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
