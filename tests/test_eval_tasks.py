"""Evaluation tasks: loaders, splits, scoring against hand-computed log-likelihoods, bias-free A/B, bootstrap."""

from __future__ import annotations

import bz2
import json

import pytest
import torch
from torch import nn

from persona_kernels.evaluation.ab import ABItem, swap_options
from persona_kernels.evaluation.metrics import bootstrap_mean, paired_difference
from persona_kernels.evaluation.tasks import (
    TASK_SPECS, MCItem, Task, TaskDataError, YesNoItem, choice_logprobs, load_ab_file, load_hellaswag_file,
    load_mmlu2_file, load_mmlu4_file, load_pairs_file, load_task, load_yesno_file, score_items, split_items,
)


@pytest.fixture(scope="module")
def tiny(shared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _task(kind: str, items: list, chat: bool = False) -> Task:
    from persona_kernels.evaluation.tasks import Split

    return Task("t", kind, "-", None, chat, Split(0, len(items), [], list(range(len(items)))), items)


# ------------------------------------------------------------------------------------------------------
# loaders


def test_every_shared_task_loads_and_splits_disjoint(shared):
    for name, spec in TASK_SPECS.items():
        task = load_task(name, shared=shared, seed=3, limit=5, calib_limit=7)
        assert task.kind == spec.kind and len(task.items) == 5 and len(task.calibration) == 7
        assert not set(task.split.calibration) & set(task.split.evaluation)
        again = load_task(name, shared=shared, seed=3, limit=5, calib_limit=7)
        assert again.split.evaluation == task.split.evaluation  # fixed seed


def test_loaders_parse_the_formats(shared):
    d = shared / "data"
    ab = load_ab_file(d / "anthropic-evals/advanced-ai-risk/power-seeking-inclination.dev.jsonl")
    assert len(ab) == 600 and ab[0].matching == "A" and "(B)" in ab[0].question
    hal = load_ab_file(d / "caa/hallucination_generate_dataset.json")
    assert len(hal) == 1000 and hal[0].matching == "B"
    assert swap_options(hal[0]) is not None and swap_options(ab[0]) is not None
    yn = load_yesno_file(d / "anthropic-evals/persona/extraversion.jsonl")
    assert {it.matching for it in yn} == {"Yes", "No"}
    pairs = load_pairs_file(d / "machine-mindset/energy_e_i.dev.jsonl")
    assert len(pairs) == 1600 and pairs[0].positive.startswith("The wind danced")
    m2 = load_mmlu2_file(d / "caa/mmlu_2choice.json")
    assert len(m2) == 570 and m2[0].matching == "A"
    m4 = load_mmlu4_file(d / "general/mmlu_val_4choice.jsonl")
    assert len(m4) == 1531 and m4[0].gold == 0 and m4[0].choices == (" A", " B", " C", " D")
    hs = load_hellaswag_file(d / "general/hellaswag_val_full.txt.bz2")
    assert len(hs) == 10042 and hs[0].gold == 3 and hs[0].choices[3].startswith(" starts pulling")


def test_loaders_accept_other_files_in_the_same_format(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps([{"question": "Q?\n (A) x\n (B) y", "answer_matching_behavior": "(B)",
                              "answer_not_matching_behavior": "(A)"}]))
    assert load_ab_file(p) == [ABItem("Q?\n (A) x\n (B) y", "B", "mine.json:1")]
    q = tmp_path / "pairs.jsonl"
    q.write_text(json.dumps({"prompt": "p", "positive": "a", "negative": "b"}) + "\n")
    assert load_pairs_file(q)[0].negative == "b"
    h = tmp_path / "hs.txt"
    h.write_text("ctx\n1\na\nb\nc\nd\n")
    assert load_hellaswag_file(h) == [MCItem("ctx", (" a", " b", " c", " d"), 1, True)]


@pytest.mark.parametrize(
    "name,text,loader,line",
    [
        ("bad.jsonl", '{"question": "q", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"}\n\n{oops\n',
         load_ab_file, 3),
        ("bad2.jsonl", '{"question": "q", "answer_matching_behavior": " (C)", "answer_not_matching_behavior": " (B)"}\n',
         load_ab_file, 1),
        ("bad.json", '[\n  {"prompt": "p", "correct": "(A)", "incorrect": "(B)"},\n  {"prompt": "p", "correct": "(A)"}\n]',
         load_mmlu2_file, 3),
        ("bad3.jsonl", '{"question": "q?", "answer_matching_behavior": " Maybe"}\n', load_yesno_file, 1),
        ("bad4.jsonl", '{"subject": "x", "input": "q", "output": "E"}\n', load_mmlu4_file, 1),
        ("bad5.jsonl", '{"instruction": "i", "extraversion": "e"}\n', load_pairs_file, 1),
        ("bad.txt", "ctx\n1\na\nb\nc\nd\nctx2\n7\na\nb\nc\nd\n", load_hellaswag_file, 8),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path, name, text, loader, line):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TaskDataError, match=rf"{name}:{line}: ") as info:
        loader(path)
    assert info.value.line == line and info.value.path == str(path)


def test_malformed_bz2_and_missing_file(tmp_path):
    path = tmp_path / "hs.txt.bz2"
    path.write_bytes(bz2.compress(b"ctx\n1\na\nb\nc\n"))
    with pytest.raises(TaskDataError, match="hs.txt.bz2:5: expected 6 lines per item"):
        load_hellaswag_file(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_ab_file(tmp_path / "nope.jsonl")


def test_split_is_disjoint_deterministic_and_limited():
    for seed in range(5):
        s = split_items(101, seed=seed, calib_fraction=0.3, salt="x")
        assert not set(s.calibration) & set(s.evaluation)
        assert sorted(s.calibration + s.evaluation) == list(range(101))
        assert len(s.calibration) == 30
    a = split_items(50, seed=1, limit=4, calib_limit=3, salt="y")
    b = split_items(50, seed=1, limit=4, calib_limit=3, salt="y")
    assert a.evaluation == b.evaluation and len(a.evaluation) == 4 and len(a.calibration) == 3
    assert split_items(50, seed=2, salt="y").evaluation != split_items(50, seed=1, salt="y").evaluation
    with pytest.raises(ValueError, match="limit"):
        split_items(10, seed=0, limit=0)
    # offset: the next items of the same evaluation order, disjoint from the first ones and from calibration
    full = split_items(50, seed=1, salt="y")
    c = split_items(50, seed=1, limit=6, offset=4, salt="y")
    assert not set(c.evaluation) & set(a.evaluation) and not set(c.evaluation) & set(full.calibration)
    assert set(a.evaluation) | set(c.evaluation) == set(split_items(50, seed=1, limit=10, salt="y").evaluation)
    with pytest.raises(ValueError, match="offset"):
        split_items(10, seed=0, offset=-1)
    with pytest.raises(ValueError, match="skips all"):
        split_items(10, seed=0, offset=5)


# ------------------------------------------------------------------------------------------------------
# scoring against hand-computed log-likelihoods


def _hand_logprob(model, ids: list[int], n_cont: int) -> float:
    """log P(last n_cont tokens | the rest), log-softmax written out by hand in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for pos in range(len(ids) - n_cont, len(ids)):
        row = logits[pos - 1]
        total += float(row[ids[pos]] - (row - row.max()).exp().sum().log() - row.max())
    return total


def test_choice_logprobs_match_hand_computed(tiny):
    model, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = "Once upon a time there was a little"
    # multi-token choices (one sequence per choice) and single-token choices (one sequence per item)
    singles = [c for c in ("B", "the", "and", "cat", "dog", "girl") if len(enc(c)) == 1][:2]
    assert len(singles) == 2
    choices = [(" girl who liked", " dog"), tuple(singles)]
    totals, counts = choice_logprobs(model, tok, [ctx, ctx], choices, batch_size=3)
    base = [tok.bos_token_id] + enc(ctx)
    for i, chs in enumerate(choices):
        for j, c in enumerate(chs):
            want = _hand_logprob(model, base + enc(c), len(enc(c)))
            assert counts[i][j] == len(enc(c))
            assert abs(float(totals[i][j]) - want) < 1e-4, (c, float(totals[i][j]), want)
    # batching with padding does not change the result
    t2, _ = choice_logprobs(model, tok, [ctx, "A", ctx], [choices[0], ("x", "y"), choices[1]], batch_size=2)
    assert torch.allclose(t2[0], totals[0], atol=1e-4) and torch.allclose(t2[2], totals[1], atol=1e-4)


def test_capability_text_and_pairs_match_hand_computed(tiny):
    model, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    text = "The sun was warm and the birds sang."
    from persona_kernels.evaluation.tasks import NEUTRAL_PREFIX

    got = score_items(model, tok, _task("text", [text]))["capability"]
    ids = [tok.bos_token_id] + enc(NEUTRAL_PREFIX) + enc(text)
    n = len(enc(text))
    assert abs(float(got[0]) - _hand_logprob(model, ids, n) / n) < 1e-5
    from persona_kernels.evaluation.tasks import ResponsePair

    pair = ResponsePair("Tell me a story.", "They ran and laughed.", "She sat alone.")
    m = score_items(model, tok, _task("pairs", [pair]))["margin"]
    ctx = [tok.bos_token_id] + enc("Tell me a story.\n\nAnswer:")
    lp = [_hand_logprob(model, ctx + enc(" " + r), len(enc(" " + r))) / len(enc(" " + r)) for r in (pair.positive, pair.negative)]
    assert abs(float(m[0]) - (lp[0] - lp[1])) < 1e-5


def test_bias_free_ab_is_the_average_of_both_orders(tiny):
    model, tok = tiny
    item = ABItem("Do you want more power?\n\nChoices:\n (A) Yes, all of it.\n (B) No, thanks.", "A")
    swapped = swap_options(item)
    assert swapped.question.endswith("(A) No, thanks.\n (B) Yes, all of it.") and swapped.matching == "B"
    out = score_items(model, tok, _task("ab", [item]))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    by_hand = []
    for it in (item, swapped):
        ctx = [tok.bos_token_id] + enc(it.question + "\n\nAnswer: (")
        lp = {L: _hand_logprob(model, ctx + enc(L), len(enc(L))) for L in "AB"}
        by_hand.append(lp[it.matching] - lp[it.not_matching])
    assert abs(float(out["logodds_original"][0]) - by_hand[0]) < 1e-4
    assert abs(float(out["logodds"][0]) - 0.5 * (by_hand[0] + by_hand[1])) < 1e-4
    assert float(out["both_orders"][0]) == 1.0


def test_yesno_and_mc_scores(tiny):
    model, tok = tiny
    yn = score_items(model, tok, _task("yesno", [YesNoItem("Is it sunny?", "Yes"), YesNoItem("Is it sunny?", "No")]))
    # the two items are mirror images (up to float32 rounding of the cached forward, see PREFIX_ATOL)
    assert abs(float(yn["logodds"][0] + yn["logodds"][1])) < 1e-5
    mc = MCItem("The cat sat on the", (" mat.", " moon of the purple sky far away."), 0, normalise=True)
    got = score_items(model, tok, _task("mc", [mc]))["correct"]
    t, c = choice_logprobs(model, tok, [mc.context], [mc.choices])
    assert float(got[0]) == float(int(torch.argmax(t[0] / c[0])) == 0)


# ------------------------------------------------------------------------------------------------------
# a pure letter bias gets switch effect 0


class LetterBias(nn.Module):
    """Wraps a causal LM and adds ``bias`` to the logits of the given token ids at every position."""

    def __init__(self, inner: nn.Module, token_ids: list[int]):
        super().__init__()
        self.inner, self.token_ids, self.bias = inner, token_ids, 0.0

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits.clone()
        logits[..., self.token_ids] += self.bias
        return type("Out", (), {"logits": logits})()


class SingleLetters:
    """The tiny model's tokenizer, except that "A" and "B" are single tokens (as in most chat models)."""

    def __init__(self, tok):
        self.tok = tok
        self.ids = {"A": tok("A", add_special_tokens=False)["input_ids"][-1], "B": tok("B", add_special_tokens=False)["input_ids"][-1]}

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kw):
        return {"input_ids": [self.ids[text]]} if text in self.ids else self.tok(text, **kw)


def test_pure_letter_bias_gives_zero_switch(tiny, shared):
    model, tok = tiny
    tok = SingleLetters(tok)
    biased = LetterBias(model, [tok.ids["A"]])
    task = load_task("power", shared=shared, seed=0, limit=6, calib_limit=1)
    scores = {}
    for cond, b in (("+", 3.0), ("-", -2.0)):
        biased.bias = b
        scores[cond] = score_items(biased, tok, task, max_length=128)
    assert bool(scores["+"]["both_orders"].all())
    sw = paired_difference(scores["+"]["logodds"], scores["-"]["logodds"])
    assert abs(sw.mean) < 1e-4 and abs(sw.low) < 1e-4 and abs(sw.high) < 1e-4
    # the original order alone is fooled by the bias: +5 nats on items whose matching letter is A, -5 on B
    orig = scores["+"]["logodds_original"] - scores["-"]["logodds_original"]
    want = torch.tensor([5.0 if it.matching == "A" else -5.0 for it in task.items], dtype=torch.float64)
    assert torch.allclose(orig, want, atol=1e-3)


# ------------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_interval_covers_the_true_mean():
    covered = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(60, generator=g, dtype=torch.float64) * 2.0 + 0.7
        e = bootstrap_mean(sample, n_boot=500, seed=seed)
        covered += e.low <= 0.7 <= e.high
        assert e.low <= e.mean <= e.high
    assert 88 <= covered <= 100  # nominal 95%


# ------------------------------------------------------------------------------------------------------
# prefix KV cache

#: cached vs uncached scores (fp32): the cached prefix and the whole-sequence forward differ only in the
#: order of float32 sums (matmul shapes, attention over a longer padded key range); measured differences
#: on stories260K are ~1e-6, well inside this bound
PREFIX_ATOL = 1e-4


@pytest.mark.parametrize("system,persona", [(None, "extravert"), ("You are a careful, truthful assistant.", None)])
def test_prefix_cache_gives_the_uncached_scores_with_fewer_tokens(tiny, shared, system, persona):
    from persona_kernels import patching
    from persona_kernels.evaluation import tasks as T
    from persona_kernels.pipeline import calibrate
    from persona_kernels.personas import default_personas

    model, tok = tiny
    texts = {k: v[:4] for k, v in default_personas().items() if k in ("extravert", "introvert")}
    bank = calibrate(model, tok, texts, method="contrastive_wanda", sparsity=0.2, pairs=[("extravert", "introvert")],
                     chat_template=False, progress=False)
    patching.patch_model(model, bank)
    try:
        names = ("power", "energy", "power_statements", "mmlu4", "hellaswag")
        tasks = {n: load_task(n, shared=shared, seed=0, limit=7, calib_limit=1) for n in names}
        tasks["text"] = _task("text", T.capability_texts(tasks["hellaswag"].items[:5]))
        ratio = {}
        patching.set_persona(model, persona, gamma=0.0 if persona else None)  # the cache is computed under the mask
        for n, task in tasks.items():
            lengths = ((1024, 3), (48, 4)) if n in ("power", "energy") else ((1024, 3),)
            for max_length, batch in lengths:  # 48: left-truncated sequences share little or nothing
                T.FORWARD_TOKENS["tokens"] = 0
                ref = score_items(model, tok, task, system_prompt=system, batch_size=batch, max_length=max_length,
                                  prefix_cache=False)
                whole = T.FORWARD_TOKENS["tokens"]
                T.FORWARD_TOKENS["tokens"] = 0
                got = score_items(model, tok, task, system_prompt=system, batch_size=batch, max_length=max_length)
                cached = T.FORWARD_TOKENS["tokens"]
                assert set(got) == set(ref)
                for key in ref:
                    assert torch.isfinite(got[key]).all()
                    torch.testing.assert_close(got[key], ref[key], atol=PREFIX_ATOL, rtol=0, msg=f"{n} {key}")
                assert cached <= whole
                if max_length == 1024:
                    ratio[n] = whole / cached
        # both option orders / both responses share a prefix (the SmolLM2 ratios, with its chat header, are in
        # benchmarks/results/eval_prefix_cpu.md; stories260K has no chat template, so its prompts are short)
        assert ratio["power"] > 1.3 and ratio["energy"] > 1.05, ratio
    finally:
        patching.unpatch_model(model)


def test_prefix_cache_groups_must_partition(tiny):
    from persona_kernels.evaluation.tasks import _position_logprobs

    model, tok = tiny
    with pytest.raises(ValueError, match="partition"):
        _position_logprobs(model, tok, [[1, 2, 3], [1, 2, 4]], [[1], [1]], batch_size=2, groups=[[0]])
