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
                with T.count_forward_tokens() as whole:
                    ref = score_items(model, tok, task, system_prompt=system, batch_size=batch, max_length=max_length,
                                      prefix_cache=False)
                with T.count_forward_tokens() as cached:
                    got = score_items(model, tok, task, system_prompt=system, batch_size=batch, max_length=max_length)
                assert set(got) == set(ref)
                for key in ref:
                    assert torch.isfinite(got[key]).all()
                    torch.testing.assert_close(got[key], ref[key], atol=PREFIX_ATOL, rtol=0, msg=f"{n} {key}")
                # the cached scorer runs exactly the prefix trie's tokens: the floor
                assert cached.tokens == cached.floor == whole.floor <= whole.tokens
                if max_length == 1024:
                    ratio[n] = whole.tokens / cached.tokens
        # both option orders / both responses share a prefix (the SmolLM2 ratios, with its chat header, are in
        # benchmarks/results/eval_prefix_cpu.md; stories260K has no chat template, so its prompts are short)
        assert ratio["power"] > 1.3 and ratio["energy"] > 1.05, ratio
    finally:
        patching.unpatch_model(model)


# random-weight tiny Llama: the prefix tree on hand-made token sequences


@pytest.fixture(scope="module")
def rand_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(11)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # sharp distributions: a wrong prefix shows up clearly
    return model


class _Tok:
    pad_token_id = 0


def _tree_cases():
    g = torch.Generator().manual_seed(5)
    rnd = lambda n: torch.randint(1, 61, (n,), generator=g).tolist()  # noqa: E731
    head, stem, other = rnd(9), rnd(13), rnd(17)
    seqs = [
        head + stem + rnd(6),  # two continuations of one stem (an E/I pair)
        head + stem + rnd(11),
        head + stem,  # a continuation that is a prefix of the others: it ends inside the tree
        head + stem + rnd(1),
        head + rnd(5),  # shares only the head
        other,  # shares nothing
        other[:7] + rnd(3),  # shares the first 7 tokens with the previous one
        rnd(1),  # a single token
        head + stem,  # a duplicate sequence
        rnd(29),
        head + stem + rnd(6),
    ]
    positions, targets = [], []
    for i, s in enumerate(seqs):
        if i % 3 == 0:  # every position: the scored positions span several tree nodes, from position 0
            ps = list(range(len(s)))
        elif i % 3 == 1:  # the continuation part only
            ps = list(range(max(0, len(s) - 4), len(s)))
        else:  # one position, several targets (answer letters)
            ps = [len(s) - 1]
        positions.append(ps)
        targets.append([[int(s[p + 1]) if p + 1 < len(s) else 3] + ([7, 50] if len(ps) == 1 else []) for p in ps])
    return seqs, positions, targets


def _by_hand(model, seqs, positions, targets) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for s, ps, ts in zip(seqs, positions, targets):
            lp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].double(), -1)
            out.append(torch.tensor([float(lp[p, t]) for p, tt in zip(ps, ts) for t in tt], dtype=torch.float64))
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 16])
def test_prefix_tree_scores_equal_whole_sequences(rand_llama, batch_size):
    from persona_kernels.evaluation import tasks as T

    seqs, positions, targets = _tree_cases()
    want = _by_hand(rand_llama, seqs, positions, targets)
    for cache in (False, True):
        with T.count_forward_tokens() as count:
            got = T._position_logprobs(rand_llama, _Tok(), seqs, positions, targets, batch_size=batch_size,
                                       prefix_cache=cache)
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=0, msg=f"cache={cache} sequence {i}")
        need = [s[: max(p) + 1] for s, p in zip(seqs, positions)]
        assert count.floor == T.trie_nodes(need) == len({tuple(s[:k]) for s in need for k in range(1, len(s) + 1)})
        assert count.tokens == (count.floor if cache else sum(map(len, seqs)))


def test_prefix_tree_with_a_wrong_cache_gives_wrong_scores(rand_llama, monkeypatch):
    """The equality test above can fail: rows that attend to another row's prefix change the scores."""
    import transformers

    from persona_kernels.evaluation import tasks as T

    def rolled(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # the assembled past: each row gets the previous row's prefix
            key_states, value_states = key_states.roll(1, 0), value_states.roll(1, 0)
        return update(self, key_states, value_states, *args, **kwargs)

    seqs, positions, targets = _tree_cases()
    ref = T._position_logprobs(rand_llama, _Tok(), seqs, positions, targets, batch_size=4, prefix_cache=False)
    update = transformers.cache_utils.DynamicLayer.update
    monkeypatch.setattr(transformers.cache_utils.DynamicLayer, "update", rolled)
    got = T._position_logprobs(rand_llama, _Tok(), seqs, positions, targets, batch_size=4)
    assert max(float((g - r).abs().max()) for g, r in zip(got, ref)) > 1e-2


def test_prefix_tree_is_the_trie():
    from persona_kernels.evaluation.tasks import _preorder, _prefix_tree, trie_nodes

    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        n = int(torch.randint(1, 12, (1,), generator=g))
        vocab = int(torch.randint(2, 5, (1,), generator=g))  # few symbols: many shared prefixes
        seqs = [torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
        root, ends = _prefix_tree(seqs)
        nodes = _preorder(root)[1:]
        assert sum(x.end - x.start for x in nodes) == trie_nodes(seqs)
        for i, s in enumerate(seqs):  # each sequence's path spells it
            path, x = [], ends[i]
            while x is not root:
                path = seqs[x.seq][x.start : x.end] + path
                assert x.end > x.start and x.parent.end == x.start
                x = x.parent
            assert path == s, (trial, seqs)
        for x in nodes:  # branches differ in their first token
            firsts = [seqs[c.seq][c.start] for c in x.children]
            assert len(firsts) == len(set(firsts))


def test_scores_do_not_depend_on_the_padding_side(tiny):
    from transformers import AutoTokenizer

    model, _ = tiny
    from persona_kernels.evaluation.tasks import ResponsePair

    items = [ResponsePair("Tell me a story.", "They ran and laughed.", "She sat alone."),
             ResponsePair("Say hi.", "Hi there, friend!", "Hi.")]
    scores = []
    for side in ("left", "right"):
        tok = AutoTokenizer.from_pretrained(model.name_or_path, padding_side=side)
        scores.append(score_items(model, tok, _task("pairs", items), batch_size=3)["margin"])
    torch.testing.assert_close(scores[0], scores[1], atol=0, rtol=0)


def test_position_logprobs_checks_its_arguments(tiny):
    from persona_kernels.evaluation.tasks import _position_logprobs

    model, tok = tiny
    with pytest.raises(ValueError, match="sequence 1 .*positions"):
        _position_logprobs(model, tok, [[1, 2, 3], [1, 2, 4]], [[1], [3]], [[[2]], [[2]]], batch_size=2)
    with pytest.raises(ValueError, match="differ in length"):
        _position_logprobs(model, tok, [[1, 2, 3]], [[1], [1]], [[[2]]], batch_size=2)


def test_prefix_tree_keeps_a_bounded_kv(rand_llama, monkeypatch):
    """Many items under one header: the KV alive at any forward stays within the window, not the item count."""
    from persona_kernels.evaluation import tasks as T

    g = torch.Generator().manual_seed(9)
    rnd = lambda n: torch.randint(1, 61, (n,), generator=g).tolist()  # noqa: E731
    head = rnd(6)
    seqs = []
    for _ in range(60):  # an item: a stem shared by two continuations (an A/B question in both orders)
        stem = head + rnd(5)
        seqs += [stem + rnd(3), stem + rnd(4)]
    positions = [[len(s) - 1] for s in seqs]
    targets = [[[1, 2]] for _ in seqs]
    seen, live = {}, []
    tree, forward = T._prefix_tree, T._forward

    def spy_tree(need):
        seen["root"], ends = tree(need)
        return seen["root"], ends

    def spy_forward(*args, **kwargs):
        live.append(sum(n.kv is not None for n in T._preorder(seen["root"])))
        return forward(*args, **kwargs)

    monkeypatch.setattr(T, "_prefix_tree", spy_tree)
    monkeypatch.setattr(T, "_forward", spy_forward)
    with T.count_forward_tokens() as count:
        got = T._position_logprobs(rand_llama, _Tok(), seqs, positions, targets, batch_size=4)
    assert count.tokens == count.floor <= len(head) + 60 * (5 + 3 + 4)  # less where random tokens coincide
    assert 1 < max(live) <= 2 * T._WINDOW * 4 + 1  # the header and at most the stems of two windows
    want = _by_hand(rand_llama, seqs[:6], positions[:6], targets[:6])
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_.double(), w, atol=2e-5, rtol=0)
