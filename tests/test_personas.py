"""Bundled persona texts and their loader (persona_kernels.personas)."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from persona_kernels import personas as P
from persona_kernels.personas import ABQuestion, PersonaFileError, PersonaText

DATA = Path(P.__file__).parent / "data" / "personas"
FAKE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---------------------------------------------------------------------------------------------- bundled data


def test_bundled_personas_load_and_sizes():
    personas = P.default_personas()
    pairs = P.default_pairs()
    assert pairs == [("power_seeking", "power_averse"), ("extravert", "introvert")]
    assert set(personas) == {n for pair in pairs for n in pair} == set(P.persona_names())
    for name, items in personas.items():
        assert len(items) >= 120, name
        assert all(isinstance(it, PersonaText) for it in items)
        statements = [it for it in items if it.text is not None]
        assert 20 <= len(statements) <= 40, (name, len(statements))
        assert all(it.text.startswith("I") for it in statements), name
        assert all(it.prompt and it.response for it in items if it.text is None), name
    # fresh lists: mutating the result does not change the defaults
    personas["extravert"].clear()
    assert len(P.default_personas()["extravert"]) >= 120
    assert P.default_pair_names() == {"power": pairs[0], "energy": pairs[1]}


@pytest.mark.parametrize("pos,neg", [("power_seeking", "power_averse"), ("extravert", "introvert")])
def test_pairs_are_parallel(pos, neg):
    personas = P.default_personas()
    a, b = personas[pos], personas[neg]
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x.text is None) == (y.text is None), f"item {i}: kinds differ"
        if x.prompt is not None and y.prompt is not None:
            assert x.prompt == y.prompt, f"item {i}: prompts differ"
        assert x.body != y.body, f"item {i}: same answer on both sides"
        # similar lengths item by item, and overall
        lx, ly = len(x.body.split()), len(y.body.split())
        assert max(lx, ly) <= 2 * min(lx, ly), f"item {i}: lengths {lx} vs {ly}"
    words_a = sum(len(x.body.split()) for x in a)
    words_b = sum(len(y.body.split()) for y in b)
    assert 0.85 < words_a / words_b < 1.15


@pytest.mark.parametrize("name", ["power_seeking", "power_averse", "extravert", "introvert"])
def test_no_duplicates_within_file(name):
    items = P.default_personas()[name]
    bodies = Counter(re.sub(r"\s+", " ", it.body.lower()) for it in items)
    assert [b for b, c in bodies.items() if c > 1] == []
    prompts = Counter(it.prompt for it in items if it.prompt is not None)
    assert [p for p, c in prompts.items() if c > 1] == []
    # raw lines are unique too
    lines = (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == len(lines)


def test_ab_questions_balanced():
    qs = P.load_ab_questions()
    assert len(qs) == 48 and all(isinstance(q, ABQuestion) for q in qs)
    positives = dict(P.default_pair_names())
    for pair in ("power", "energy"):
        sub = P.load_ab_questions(pair=pair)
        assert len(sub) == 24
        assert Counter(q.answer_matching for q in sub) == {"(A)": 12, "(B)": 12}
        for q in sub:
            assert q.pair == pair and q.persona in positives[pair]
            assert {q.answer_matching, q.answer_not_matching} == {"(A)", "(B)"}
            assert q.question.count("(A)") == 1 and q.question.count("(B)") == 1
            assert q.question.index("(A)") < q.question.index("(B)")
    assert len({q.question for q in qs}) == len(qs)


def test_system_prompts_and_descriptions():
    for name in P.persona_names():
        assert len(P.system_prompt(name)) > 100
        assert P.description(name)
    assert P.system_prompt("extravert") != P.system_prompt("introvert")
    with pytest.raises(KeyError, match="unknown persona 'nobody'.*extravert"):
        P.system_prompt("nobody")


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def _sentences(s: str) -> list[str]:
    return [_norm(x) for x in re.split(r"(?<=[.!?])\s+|\n+", s) if len(x.split()) >= 6]


def test_nothing_copied_from_shared_evaluation_data(shared):
    """No bundled item (or sentence of one) appears verbatim in the held-out data under shared/data."""
    files = sorted((shared / "data").rglob("*.json")) + sorted((shared / "data").rglob("*.jsonl"))
    assert files, "no evaluation files found under shared/data"
    fields: set[str] = set()
    sentences: set[str] = set()

    def collect(value):
        if isinstance(value, str):
            if len(value) > 10:
                fields.add(_norm(value))
                sentences.update(_sentences(value))
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            collect(json.loads(text))
        else:
            for line in text.splitlines():
                if line.strip():
                    collect(json.loads(line))
    assert len(fields) > 10_000  # the scan really read the evaluation sets

    ours = [s for items in P.default_personas().values() for it in items for s in (it.prompt, it.body) if s]
    for q in P.load_ab_questions():
        stem, _, options = q.question.partition("\n\n")
        ours += [stem] + [o[4:] for o in options.splitlines()]
    copied = [s for s in ours if _norm(s) in fields]
    assert copied == []
    copied_sentences = [x for s in ours for x in _sentences(s) if x in sentences]
    assert copied_sentences == []


# ---------------------------------------------------------------------------------------------- file loading


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_jsonl_formats_and_aliases(tmp_path):
    lines = [
        {"text": "  I like quiet mornings.  "},
        {"prompt": "P1?", "response": "R1."},
        {"instruction": "P2?", "response": "R2.", "meta": 3},
        {"question": "P3?", "answer": "R3."},
        {"response": "Only a response."},
    ]
    path = _write(tmp_path, "a.jsonl", "\ufeff" + "\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = P.load_persona_file(path)
    assert items == [
        PersonaText(text="I like quiet mornings."),
        PersonaText(prompt="P1?", response="R1."),
        PersonaText(prompt="P2?", response="R2."),
        PersonaText(prompt="P3?", response="R3."),
        PersonaText(response="Only a response."),
    ]
    assert items[1].to_dict() == {"prompt": "P1?", "response": "R1."}
    # .json array, and str paths work as well
    jpath = _write(tmp_path, "b.json", json.dumps(lines[:2]))
    assert P.load_persona_file(str(jpath)) == items[:2]


def test_txt_lines_and_paragraphs(tmp_path):
    one_per_line = _write(tmp_path, "lines.txt", "\n\nI am one.\n  I am two.  \nI am three.\n\n")
    assert [x.text for x in P.load_persona_file(one_per_line)] == ["I am one.", "I am two.", "I am three."]
    paragraphs = _write(tmp_path, "paras.txt", "I am one\nstill one.\n\n\n  \nI am two.\n")
    assert [x.text for x in P.load_persona_file(paragraphs)] == ["I am one\nstill one.", "I am two."]


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        P.load_persona_file(tmp_path / "nope.jsonl")
    with pytest.raises(IsADirectoryError, match="folder"):
        P.load_persona_file(tmp_path)


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", ""), ("e.jsonl", "\n \n\t\n"), ("e.txt", "  \n\n"), ("e.json", "[]")]
)
def test_error_empty_file(tmp_path, name, content):
    path = _write(tmp_path, name, content)
    with pytest.raises(PersonaFileError, match=re.escape(name) + ": the file holds no persona items"):
        P.load_persona_file(path)


def test_error_non_utf8(tmp_path):
    data = '{"text": "I am fine."}\n'.encode() + b'{"text": "I caf\xe9."}\n'
    path = _write(tmp_path, "latin.jsonl", data)
    offset = data.index(b"\xe9")
    with pytest.raises(PersonaFileError, match=rf"latin\.jsonl:2: not valid UTF-8 at byte offset {offset}") as info:
        P.load_persona_file(path)
    assert info.value.line == 2 and info.value.path.endswith("latin.jsonl")
    with pytest.raises(PersonaFileError, match="byte offset 3"):
        P.load_persona_file(_write(tmp_path, "t.txt", b"I a\xff\n"))


def test_error_bad_json_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", '{"text": "I one."}\n\n{"text": "I two."}\n{"text": "I three.",\n')
    with pytest.raises(PersonaFileError, match=r"bad\.jsonl:4: invalid JSON") as info:
        P.load_persona_file(path)
    assert info.value.line == 4
    with pytest.raises(PersonaFileError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        P.load_persona_file(_write(tmp_path, "list.jsonl", '["I am a list"]\n'))


@pytest.mark.parametrize(
    "obj,msg",
    [
        ({"prompt": "Only a prompt?"}, r"missing keys: expected 'text' or 'prompt'\+'response'.*\['prompt'\]"),
        ({"question": "Q?", "response": "R."}, r"missing keys"),
        ({"txt": "typo"}, r"missing keys.*\['txt'\]"),
        ({"text": 3}, r"'text' must be a string, got int"),
        ({"prompt": "P?", "response": "   "}, r"'response' is empty"),
        ({"text": "I am.", "response": "R."}, r"an item has both 'text' and a response"),
    ],
)
def test_error_missing_or_bad_keys(tmp_path, obj, msg):
    path = _write(tmp_path, "k.jsonl", '{"text": "I am fine."}\n' + json.dumps(obj) + "\n")
    with pytest.raises(PersonaFileError, match=r"k\.jsonl:2: " + msg):
        P.load_persona_file(path)


def test_error_unsupported_suffix(tmp_path):
    with pytest.raises(PersonaFileError, match=r"unsupported file type.*\.jsonl"):
        P.load_persona_file(_write(tmp_path, "x.csv", "a,b\n"))
    with pytest.raises(TypeError, match="path must be"):
        P.load_persona_file(3)  # type: ignore[arg-type]


def test_persona_text_validation():
    with pytest.raises(ValueError, match="exactly one"):
        PersonaText(prompt="P?")
    with pytest.raises(ValueError, match="exactly one"):
        PersonaText(response="R", text="T")
    with pytest.raises(ValueError, match="prompt= goes with response="):
        PersonaText(prompt="P?", text="T")
    with pytest.raises(ValueError, match="empty"):
        PersonaText(text="  ")
    with pytest.raises(TypeError, match="PersonaText.prompt"):
        PersonaText(prompt=1, response="R")  # type: ignore[arg-type]


def test_load_personas_dict_and_folder(tmp_path):
    a = _write(tmp_path, "calm.txt", "I am calm.\nI am quiet.\n")
    b = _write(tmp_path, "loud.jsonl", json.dumps({"prompt": "Hi?", "response": "HELLO!"}) + "\n")
    _write(tmp_path, "_notes.txt", "ignored\n")
    _write(tmp_path, "ab_questions.jsonl", '{"pair": "x"}\n')
    _write(tmp_path, "personas.json", "{}")
    _write(tmp_path, "readme.md", "ignored")
    got = P.load_personas(tmp_path)
    assert list(got) == ["calm", "loud"]
    assert got["loud"] == [PersonaText(prompt="Hi?", response="HELLO!")]
    assert P.load_personas({"x": a, "y": str(b)}) == {"x": got["calm"], "y": got["loud"]}
    mixed = P.load_personas({"m": ["I am a string.", {"prompt": "P?", "response": "R."}, PersonaText(text="I am.")]})
    assert [it.body for it in mixed["m"]] == ["I am a string.", "R.", "I am."]
    assert set(P.load_personas(None)) == set(P.persona_names())
    assert set(P.load_personas(DATA)) == set(P.persona_names())

    _write(tmp_path, "calm.jsonl", '{"text": "I am calm."}\n')
    with pytest.raises(ValueError, match="two files for persona 'calm'"):
        P.load_personas(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="no persona files"):
        P.load_personas(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="persona folder not found"):
        P.load_personas(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a file"):
        P.load_personas(a)
    with pytest.raises(ValueError, match="has no items"):
        P.load_personas({"empty": []})
    with pytest.raises(ValueError, match="empty dict"):
        P.load_personas({})


def test_load_ab_questions_errors(tmp_path):
    good = {"pair": "p", "question": "Q? (A) x (B) y", "answer_matching": " (B)", "answer_not_matching": "(A)"}
    good["persona"] = "a"
    path = _write(tmp_path, "ab.jsonl", json.dumps(good) + "\n")
    (q,) = P.load_ab_questions(path)
    assert q.answer_matching == "(B)" and q.answer_not_matching == "(A)"
    with pytest.raises(PersonaFileError, match="no A/B questions for pair 'zz'"):
        P.load_ab_questions(path, pair="zz")
    bad = dict(good, answer_not_matching="(B)")
    with pytest.raises(PersonaFileError, match=r"ab2\.jsonl:2: answer_matching"):
        P.load_ab_questions(_write(tmp_path, "ab2.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n"))
    missing = {k: v for k, v in good.items() if k != "persona"}
    with pytest.raises(PersonaFileError, match=r"ab3\.jsonl:1: missing keys \['persona'\]"):
        P.load_ab_questions(_write(tmp_path, "ab3.jsonl", json.dumps(missing) + "\n"))
    with pytest.raises(PersonaFileError, match=r"ab4\.jsonl:1: invalid JSON"):
        P.load_ab_questions(_write(tmp_path, "ab4.jsonl", "{nope\n"))
    with pytest.raises(FileNotFoundError):
        P.load_ab_questions(tmp_path / "none.jsonl")


# ---------------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def stories_tokenizer(shared):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(shared / "models" / "stories260K"))
    assert not getattr(tok, "chat_template", None)
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer(stories_tokenizer):
    tok = copy.deepcopy(stories_tokenizer)
    tok.chat_template = FAKE_TEMPLATE
    return tok


def _sample_items() -> list[PersonaText]:
    personas = P.default_personas()
    items = personas["extravert"][:5] + personas["power_averse"][:5]
    items.append(PersonaText(response="A response without prompt."))
    return items


def test_render_plain_offsets():
    item = PersonaText(prompt="How are you?", response="I am fine.")
    text, start = P.render(item)
    assert text == "How are you?\n\nI am fine." and start == len("How are you?\n\n")
    sys_text, sys_start = P.render(item, system_prompt="Be kind.")
    assert sys_text == "Be kind.\n\nHow are you?\n\nI am fine." and sys_text[sys_start:] == "I am fine."
    assert P.render("I like tea.") == ("I like tea.", 0)
    assert P.render(PersonaText(text="I like tea."), system_prompt="S") == ("S\n\nI like tea.", 3)
    for it in _sample_items():
        text, start = P.render(it)
        assert text[start:] == it.body
        if it.prompt:
            assert text[:start].startswith(it.prompt)
    with pytest.raises(TypeError, match="item must be"):
        P.render(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs tokenizer="):
        P.render(item, chat_template=True)


def test_render_offsets_map_to_response_tokens(stories_tokenizer):
    """With a real tokenizer and no template, offsets select exactly the response tokens."""
    for it in _sample_items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text, start = P.render(it, stories_tokenizer, chat_template=True)
        assert any("no chat template" in str(w.message) for w in caught)
        assert (text, start) == P.render(it)
        enc = stories_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc["offset_mapping"]
        response_ids = [tid for tid, (s, e) in zip(enc["input_ids"], offsets) if s >= start]
        prompt_ids = [tid for tid, (s, e) in zip(enc["input_ids"], offsets) if s < start]
        assert all(e <= start for s, e in offsets if s < start), "a token straddles the response start"
        assert stories_tokenizer.decode(response_ids).strip() == it.body
        if it.prompt:
            assert prompt_ids and stories_tokenizer.decode(prompt_ids).strip() == it.prompt


def test_render_chat_template(chat_tokenizer):
    item = PersonaText(prompt="Tell me about parties.", response="I love parties.")
    text, start = P.render(item, chat_tokenizer, chat_template=True)
    assert text == "<|user|>Tell me about parties.<|end|>\n<|assistant|>I love parties.<|end|>\n"
    assert text[start:].startswith("I love parties.<|end|>")
    text, start = P.render(item, chat_tokenizer, chat_template=True, system_prompt="You are loud.")
    assert text.startswith("<|system|>You are loud.<|end|>\n<|user|>")
    assert text[start : start + len(item.body)] == item.body and text[:start].endswith("<|assistant|>")
    # the response also occurs inside the prompt: the assistant turn is the one located
    echo = PersonaText(prompt="Repeat after me: I love parties.", response="I love parties.")
    text, start = P.render(echo, chat_tokenizer, chat_template=True)
    assert text[:start].endswith("<|assistant|>") and text.count(echo.body) == 2
    # a statement becomes an assistant turn without a user turn
    text, start = P.render(PersonaText(text="I like crowds."), chat_tokenizer, chat_template=True)
    assert text == "<|assistant|>I like crowds.<|end|>\n" and start == len("<|assistant|>")
    # offsets of the rendered text still pick out the response characters
    for it in _sample_items():
        text, start = P.render(it, chat_tokenizer, chat_template=True, system_prompt="S")
        assert text[start : start + len(it.body)] == it.body
        enc = chat_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        covered = "".join(text[s:e] for s, e in enc["offset_mapping"] if s >= start and e <= start + len(it.body))
        assert it.body.replace(" ", "").endswith(covered.replace(" ", "")) and len(covered) > len(it.body) // 2


def test_render_chat_template_fallbacks(chat_tokenizer):
    item = PersonaText(prompt="Q?", response="I answer.")
    tok = copy.deepcopy(chat_tokenizer)
    # a generation prompt that is not a prefix of the full rendering: located by the last occurrence
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant-next]{% endif %}"
    )
    text, start = P.render(item, tok, chat_template=True)
    assert text == "[user] Q?\n[assistant] I answer.\n" and text[start:] == "I answer.\n"
    # a template that requires a user turn first: statements fall back to plain text, pairs still render
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.warns(UserWarning, match="refused a statement"):
        assert P.render(PersonaText(text="I stay in."), tok, chat_template=True) == ("I stay in.", 0)
    text, start = P.render(item, tok, chat_template=True)
    assert text[start:] == "I answer.\n"
    # a template that rewrites the content: the response cannot be located
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template changed the response"):
        P.render(item, tok, chat_template=True)


CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nDefault helper.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_chatml_style_template(chat_tokenizer):
    """A ChatML-like template (SmolLM2's family) that injects a default system turn."""
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = CHATML
    item = PersonaText(prompt="Do you like parties?", response="I do.")
    text, start = P.render(item, tok, chat_template=True)
    assert text.startswith("<|im_start|>system\nDefault helper.<|im_end|>\n<|im_start|>user\nDo you like parties?")
    assert text[:start].endswith("<|im_start|>assistant\n") and text[start:] == "I do.<|im_end|>\n"
    text, start = P.render(item, tok, chat_template=True, system_prompt=P.system_prompt("introvert"))
    assert "Default helper" not in text and P.system_prompt("introvert") in text[:start]
    text, start = P.render(PersonaText(text="I stay in."), tok, chat_template=True)
    assert text[:start].endswith("<|im_start|>assistant\n") and text[start:].startswith("I stay in.<|im_end|>")
