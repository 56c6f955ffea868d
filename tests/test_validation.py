"""Up-front validation of calibration arguments: every error comes before the first forward and names the
argument (and the persona and item for texts)."""

from __future__ import annotations

import warnings

import pytest
import torch

from persona_kernels.pipeline import calibrate
from persona_kernels.personas import PersonaText

GOOD = {"extravert": ["I love parties.", "Meeting people energises me."],
        "introvert": ["I enjoy quiet evenings.", "Large crowds tire me."]}
PAIRS = [("extravert", "introvert")]


@pytest.fixture(scope="module")
def tiny(shared):
    from persona_kernels.models import load_model

    return load_model(str(shared / "models" / "stories260K"), padding_side="right")


@pytest.fixture
def forwards(tiny):
    """Counts forwards of the model (each must stay at 0 when validation refuses the call)."""
    model, _ = tiny
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


def _run(tiny, texts=GOOD, **kw):
    model, tok = tiny
    kw.setdefault("pairs", PAIRS)
    return calibrate(model, tok, texts, progress=False, **kw)


@pytest.mark.parametrize("kw, words", [
    ({"max_length": 0}, ["max_length", "0"]),
    ({"max_length": -5}, ["max_length", "-5"]),
    ({"pairs": [("extravert", "extravert")]}, ["pairs", "two different"]),
    ({"pairs": [("extravert",)]}, ["pairs", "item 0", "pair"]),
    ({"pairs": [("extravert", "introvert", "x")]}, ["pairs", "item 0"]),
    ({"pairs": ["extravert:introvert"]}, ["pairs", "item 0"]),
    ({"pairs": [("extravert", "nobody")]}, ["pairs", "nobody"]),
    ({"pairs": []}, ["pairs", "contrastive_wanda"]),
    ({"pairs": None}, ["pairs", "contrastive_wanda"]),
    ({"method": "contrastive_sparse", "sparsity": 0.6, "method_kwargs": {}}, ["sparsity", "0.5", "contrastive_sparse"]),
    ({"default_gamma": 1.5}, ["default_gamma", "1.5"]),
    ({"default_gamma": float("nan")}, ["default_gamma"]),
    ({"method_kwargs": {"tau": 0.0}}, ["tau", "contrastive_wanda"]),
    ({"method_kwargs": {"tau": -1.0}}, ["tau"]),
    ({"method_kwargs": {"phi": "tanh"}}, ["phi", "tanh"]),
    ({"method_kwargs": {"temperature": 1.0}}, ["method_kwargs", "temperature", "tau"]),
    ({"method": "wanda", "method_kwargs": {"activation": "max"}}, ["activation", "max"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"sparsity": 1.0}, ["sparsity"]),
    ({"tokens": "prompt"}, ["tokens", "prompt"]),
])
def test_bad_arguments_fail_before_any_forward(tiny, forwards, kw, words):
    with pytest.raises((ValueError, TypeError)) as info:
        _run(tiny, **kw)
    msg = str(info.value)
    assert msg.startswith("persona_kernels.calibrate"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert forwards == []


def test_a_bare_string_is_refused_naming_the_persona(tiny, forwards):
    texts = {"extravert": "I love parties.", "introvert": GOOD["introvert"]}
    with pytest.raises(TypeError, match="persona 'extravert'.*single str"):
        _run(tiny, texts)
    assert forwards == []


@pytest.mark.parametrize("bad", ["   ", "\n\t", PersonaText(prompt="Hi", response="x")])
def test_whitespace_only_text_names_persona_and_item(tiny, forwards, bad):
    if isinstance(bad, PersonaText):  # a valid item, then an invalid one
        texts = {"extravert": [bad, 42], "introvert": GOOD["introvert"]}
        with pytest.raises(TypeError, match=r"persona 'extravert', item 1: expected a str or PersonaText, got int"):
            _run(tiny, texts)
    else:
        texts = {"extravert": GOOD["extravert"] + [bad], "introvert": GOOD["introvert"]}
        with pytest.raises(ValueError, match=r"persona 'extravert', item 2: the text is empty or only whitespace"):
            _run(tiny, texts)
    assert forwards == []


def test_a_persona_in_two_pairs_is_refused(tiny, forwards):
    texts = dict(GOOD, ambivert=["Sometimes I go out."])
    with pytest.raises(ValueError, match="'extravert' is already in pair 0"):
        _run(tiny, texts, pairs=[("extravert", "introvert"), ("extravert", "ambivert")])
    assert forwards == []


def test_empty_persona_and_bad_names(tiny, forwards):
    with pytest.raises(ValueError, match="persona 'introvert' has no texts"):
        _run(tiny, {"extravert": GOOD["extravert"], "introvert": []})
    with pytest.raises(ValueError, match="without '/'"):
        _run(tiny, {"a/b": GOOD["extravert"], "introvert": GOOD["introvert"]}, pairs=[("a/b", "introvert")])
    with pytest.raises(TypeError, match="mapping"):
        _run(tiny, [("extravert", "x")])
    assert forwards == []


def test_text_longer_than_the_context_warns_naming_persona_and_item(tiny):
    model, tok = tiny
    context = model.config.max_position_embeddings
    long_text = " ".join(["Once upon a time there was a little dog."] * (context // 4))
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) > context
    texts = {"extravert": GOOD["extravert"] + [long_text], "introvert": GOOD["introvert"]}
    with pytest.warns(UserWarning, match=r"persona 'extravert', item 2: \d+ tokens, longer than the model context "
                                         rf"of {context}; it is truncated .* last 64 tokens"):
        bank = _run(tiny, texts, max_length=64, sparsity=0.1)
    assert bank.personas == ["extravert", "introvert"]


def test_max_length_beyond_the_context_with_a_long_text_is_an_error(tiny, forwards):
    model, tok = tiny
    context = model.config.max_position_embeddings
    long_text = " ".join(["Once upon a time there was a little dog."] * (context // 4))
    texts = {"extravert": [long_text], "introvert": GOOD["introvert"]}
    with pytest.raises(ValueError, match=r"persona 'extravert', item 0: .* exceeds the model context"):
        _run(tiny, texts, max_length=10 * context)
    assert forwards == []


def test_valid_arguments_still_calibrate_without_warnings(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = _run(tiny, sparsity=0.1)
    assert not [w for w in caught if "persona_kernels.calibrate" in str(w.message)]
    assert bank.personas == ["extravert", "introvert"]
    bank = _run(tiny, method="contrastive_sparse", sparsity=0.5, method_kwargs={"variant": "relative"})
    assert bank.metadata["method"] == "contrastive_sparse"


def test_restrict_to_tensor_option_is_not_probed(tiny):
    # model-sized tensors in method_kwargs are passed through to the real scoring, not to the 2x4 probe
    from persona_kernels.validation import validate_method

    validate_method("contrastive_sparse", 0.2, {"restrict_to": torch.ones(3, 3, dtype=torch.bool)})
