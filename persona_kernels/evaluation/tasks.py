"""Evaluation tasks: loaders for the shared data formats, fixed-seed splits, and fast scoring.

Every loader accepts any file in the same format (``.json`` array or ``.jsonl``; HellaSwag as plain or
``.bz2`` text) and raises :class:`TaskDataError` naming the file and the 1-based line of a bad record.

Task kinds and their per-item scores (all float64 tensors, one value per evaluation item):

* ``ab``     A/B persona or MMLU-2 questions: log-odds of the matching vs the non-matching answer letter,
  scored in both option orders (``logodds``, bias-free average) and in the original order
  (``logodds_original``; the paper's accuracy is the rate of ``logodds_original > 0``).
* ``yesno``  persona statements: log-odds of the matching vs the other answer (" Yes" / " No").
* ``pairs``  paired responses: mean log-prob per token of the positive minus the negative response.
* ``mc``     four-choice questions: ``correct`` (0/1) from the answer letter's log-likelihood
  (MMLU-4) or the length-normalised log-likelihood of each ending (HellaSwag); for HellaSwag also
  ``capability``: the mean log-prob per token of the whole context + gold ending (neutral text).
* ``text``   neutral text: ``capability`` (mean log-prob per token of the text after :data:`NEUTRAL_PREFIX`,
  itself after the system prompt if any).

This is the one log-prob engine of the package (the runner, the sweep and the demo use it). A sequence is
always ``[BOS] + tokens(context) + tokens(continuation)`` (context and continuation tokenised separately). The
output layer runs only at the scored positions; when every choice is a single token (answer letters, Yes/No)
one sequence per item scores all choices at once. Every token prefix shared by sequences of one scoring call
runs once (a prefix tree whose nodes attend to their ancestors' KV cache, see :func:`_position_logprobs`): the
chat header and system prompt common to the whole task, the prompt and common start of an E/I pair's two
responses, the question start of an A/B item's two option orders, a question stem several items share. The
cache is built under the condition being scored; results equal the whole-sequence forward up to float32
rounding (``prefix_cache=False``).
"""

from __future__ import annotations

import bz2
import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from persona_kernels.evaluation.ab import ABItem, format_context, swap_options
from persona_kernels.utils.batching import pad_right
from persona_kernels.utils.devices import model_device

__all__ = [
    "TaskDataError", "ResponsePair", "YesNoItem", "MCItem", "Task", "Split", "TASK_SPECS", "load_ab_file", "load_yesno_file",
    "load_pairs_file", "load_mmlu2_file", "load_mmlu4_file", "load_hellaswag_file", "load_task", "split_items",
    "score_items", "choice_logprobs", "sequence_logprobs", "count_forward_tokens", "ForwardCount", "prefix_caching", "trie_nodes",
]


class TaskDataError(ValueError):
    """A data file that cannot be read as the task's format; the message names the file and line."""

    def __init__(self, path: Any, message: str, line: int | None = None) -> None:
        self.path, self.line = str(path), line
        super().__init__(f"{path}{':' + str(line) if line is not None else ''}: {message}")


@dataclass(frozen=True)
class ResponsePair:
    """One prompt with a persona+ and a persona- response (scored as the paired response margin)."""

    prompt: str
    positive: str
    negative: str


@dataclass(frozen=True)
class YesNoItem:
    """A Yes/No question; ``matching`` is ``"Yes"`` or ``"No"`` (the persona's answer)."""

    question: str
    matching: str


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: ``choices`` are continuations of ``context``; ``gold`` indexes the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int
    normalise: bool = False  # rank by log-likelihood per token instead of the sum


# ------------------------------------------------------------------------------------------------------
# reading records


def _open_text(path: Path) -> str:
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"persona_kernels.evaluation: data file {path} does not exist") from None
    except OSError as exc:
        raise TaskDataError(path, f"cannot read the file ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TaskDataError(path, "not valid UTF-8", line) from None


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, object) for each record of a ``.jsonl`` file or of a ``.json`` array."""
    text = _open_text(path)
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        dec = json.JSONDecoder()
        pos = len(text) - len(text.lstrip())
        if not text.startswith("[", pos):
            raise TaskDataError(path, "expected a JSON array of objects", text.count("\n", 0, pos) + 1)
        pos += 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise TaskDataError(path, "unterminated JSON array", text.count("\n") + 1)
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise TaskDataError(path, f"invalid JSON ({exc.msg})", text.count("\n", 0, exc.pos) + 1) from None
            yield line, obj
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(path, f"invalid JSON ({exc.msg})", i) from None


def _field(path: Path, line: int, obj: Any, key: str) -> str:
    if not isinstance(obj, dict):
        raise TaskDataError(path, f"expected a JSON object, got {type(obj).__name__}", line)
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TaskDataError(path, f"missing or empty string field {key!r} (have {sorted(obj)})", line)
    return value


def _letter(path: Path, line: int, value: str, letters: str) -> str:
    s = value.strip().strip("()").strip()
    if len(s) != 1 or s not in letters:
        raise TaskDataError(path, f"expected an answer letter in {list(letters)}, got {value!r}", line)
    return s


def _nonempty(path: Path, items: list) -> list:
    if not items:
        raise TaskDataError(path, "no items")
    return items


# ------------------------------------------------------------------------------------------------------
# loaders


def _two_letter_items(path: Path, question: str, good: str, bad: str, what: str) -> list[ABItem]:
    """A/B items from records ``{question, good letter, bad letter}`` (the good letter is the matching one)."""
    items = []
    for line, obj in _records(path):
        q = _field(path, line, obj, question)
        m = _letter(path, line, _field(path, line, obj, good), "AB")
        n = _letter(path, line, _field(path, line, obj, bad), "AB")
        if m == n:
            raise TaskDataError(path, f"{what} answers are both ({m})", line)
        items.append(ABItem(q.strip(), m, f"{path.name}:{line}"))
    return _nonempty(path, items)


def load_ab_file(path: str | Path) -> list[ABItem]:
    """A/B persona items ``{question, answer_matching_behavior, answer_not_matching_behavior}``."""
    return _two_letter_items(Path(path), "question", "answer_matching_behavior", "answer_not_matching_behavior",
                             "matching and non-matching")


def load_yesno_file(path: str | Path) -> list[YesNoItem]:
    """Persona statements ``{question, answer_matching_behavior: " Yes"|" No", ...}``."""
    path = Path(path)
    items = []
    for line, obj in _records(path):
        q = _field(path, line, obj, "question")
        m = _field(path, line, obj, "answer_matching_behavior").strip()
        if m not in ("Yes", "No"):
            raise TaskDataError(path, f"answer_matching_behavior: expected ' Yes' or ' No', got {m!r}", line)
        items.append(YesNoItem(q.strip(), m))
    return _nonempty(path, items)


_PAIR_KEYS = (("instruction", "extraversion", "introversion"), ("prompt", "positive", "negative"))


def load_pairs_file(path: str | Path, keys: tuple[str, str, str] | None = None) -> list[ResponsePair]:
    """Paired responses: ``{instruction, extraversion, introversion}`` or ``{prompt, positive, negative}``
    (or any ``keys=(prompt, positive, negative)``)."""
    path = Path(path)
    items = []
    for line, obj in _records(path):
        ks = keys
        if ks is None:
            if not isinstance(obj, dict):
                raise TaskDataError(path, f"expected a JSON object, got {type(obj).__name__}", line)
            ks = next((k for k in _PAIR_KEYS if all(x in obj for x in k)), None)
            if ks is None:
                raise TaskDataError(path, f"expected keys {_PAIR_KEYS[0]} or {_PAIR_KEYS[1]}, have {sorted(obj)}", line)
        items.append(ResponsePair(*(_field(path, line, obj, k).strip() for k in ks)))
    return _nonempty(path, items)


def load_mmlu2_file(path: str | Path) -> list[ABItem]:
    """Two-choice MMLU ``{prompt, correct: "(A)", incorrect: "(B)"}`` as A/B items (matching = correct)."""
    return _two_letter_items(Path(path), "prompt", "correct", "incorrect", "correct and incorrect")


def load_mmlu4_file(path: str | Path) -> list[MCItem]:
    """Four-choice MMLU ``{input: "...Answer:", output: "A".."D"}``: choices are the letters ``" A"``..``" D"``."""
    path = Path(path)
    items = []
    for line, obj in _records(path):
        ctx = _field(path, line, obj, "input")
        gold = "ABCD".index(_letter(path, line, _field(path, line, obj, "output"), "ABCD"))
        items.append(MCItem(ctx.rstrip(), (" A", " B", " C", " D"), gold))
    return _nonempty(path, items)


def load_hellaswag_file(path: str | Path) -> list[MCItem]:
    """HellaSwag text: 6 lines per item (context, gold index 0-3, four endings); ``.bz2`` or plain."""
    path = Path(path)
    lines = _open_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(path, f"expected 6 lines per item, got {len(lines)} lines (last item incomplete)", len(lines))
    items = []
    for s in range(0, len(lines), 6):
        ctx, gold, *endings = lines[s : s + 6]
        if not ctx.strip():
            raise TaskDataError(path, "empty context line", s + 1)
        if gold.strip() not in ("0", "1", "2", "3"):
            raise TaskDataError(path, f"expected the gold ending index 0-3, got {gold!r}", s + 2)
        for j, e in enumerate(endings):
            if not e.strip():
                raise TaskDataError(path, "empty ending", s + 3 + j)
        items.append(MCItem(ctx.strip(), tuple(" " + e.strip() for e in endings), int(gold), normalise=True))
    return _nonempty(path, items)


# ------------------------------------------------------------------------------------------------------
# the registry of tasks


@dataclass(frozen=True)
class TaskSpec:
    """A named task: its loader, default file (relative to the shared folder) and the persona pair it measures."""

    kind: str
    loader: Callable[[Path], list]
    relpath: str
    pair: str | None  # persona pair whose (+, -) conditions it measures; None = general capability
    chat: bool = True


TASK_SPECS: dict[str, TaskSpec] = {
    "power": TaskSpec("ab", load_ab_file, "data/anthropic-evals/advanced-ai-risk/power-seeking-inclination.dev.jsonl", "power"),
    "wealth": TaskSpec("ab", load_ab_file, "data/anthropic-evals/advanced-ai-risk/wealth-seeking-inclination.dev.jsonl", "wealth"),
    "hallucination": TaskSpec("ab", load_ab_file, "data/caa/hallucination_generate_dataset.json", "hallucination"),
    "energy": TaskSpec("pairs", load_pairs_file, "data/machine-mindset/energy_e_i.dev.jsonl", "energy"),
    "power_statements": TaskSpec("yesno", load_yesno_file, "data/anthropic-evals/persona/desire-for-acquiring-power.jsonl", "power"),
    "wealth_statements": TaskSpec("yesno", load_yesno_file, "data/anthropic-evals/persona/desire-for-acquiring-wealth.jsonl", "wealth"),
    "extraversion_statements": TaskSpec("yesno", load_yesno_file, "data/anthropic-evals/persona/extraversion.jsonl", "energy"),
    "mmlu2": TaskSpec("ab", load_mmlu2_file, "data/caa/mmlu_2choice.json", None),
    "mmlu4": TaskSpec("mc", load_mmlu4_file, "data/general/mmlu_val_4choice.jsonl", None, chat=False),
    "hellaswag": TaskSpec("mc", load_hellaswag_file, "data/general/hellaswag_val_full.txt.bz2", None, chat=False),
}


@dataclass
class Split:
    """Disjoint calibration and evaluation indices into a task's items (fixed seed)."""

    seed: int
    n_items: int
    calibration: list[int]
    evaluation: list[int]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "n_items": self.n_items, "calibration": self.calibration, "evaluation": self.evaluation}


def split_items(n: int, *, seed: int, calib_fraction: float = 0.5, limit: int | None = None,
                calib_limit: int | None = None, salt: str = "", offset: int = 0) -> Split:
    """Shuffle ``range(n)`` with a fixed seed; the first ``calib_fraction`` are calibration items, the rest
    evaluation items; then keep at most ``calib_limit`` / ``limit`` of each (disjoint by construction).
    ``offset`` skips that many evaluation items first (fresh items for a confirmation run)."""
    if offset < 0:
        raise ValueError(f"persona_kernels.evaluation: argument 'offset': expected >= 0, got {offset}")
    if n < 2:
        raise ValueError(f"persona_kernels.evaluation: a task needs at least 2 items to split, got {n}")
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"persona_kernels.evaluation: argument 'calib_fraction': expected (0, 1), got {calib_fraction}")
    for name, v in (("limit", limit), ("calib_limit", calib_limit)):
        if v is not None and v < 1:
            raise ValueError(f"persona_kernels.evaluation: argument {name!r}: expected >= 1 or None, got {v}")
    order = list(range(n))
    random.Random(f"{seed}:{salt}").shuffle(order)
    n_cal = min(n - 1, max(1, int(round(calib_fraction * n))))
    cal, ev = order[:n_cal], order[n_cal:]
    if calib_limit is not None:
        cal = cal[:calib_limit]
    if offset >= len(ev):
        raise ValueError(f"persona_kernels.evaluation: argument 'offset': {offset} skips all {len(ev)} evaluation items")
    ev = ev[offset:]
    if limit is not None:
        ev = ev[:limit]
    return Split(seed, n, sorted(cal), sorted(ev))


@dataclass
class Task:
    """A loaded task with its split; ``items`` are the evaluation items, ``calibration`` the calibration ones."""

    name: str
    kind: str
    path: str
    pair: str | None
    chat: bool
    split: Split
    items: list
    calibration: list = field(default_factory=list)


def load_task(name: str, *, shared: str | Path | None = None, path: str | Path | None = None, seed: int = 0,
              limit: int | None = None, calib_limit: int | None = None, calib_fraction: float = 0.5,
              offset: int = 0) -> Task:
    """Load task ``name`` from ``path`` (default: its file under the shared folder) and split it
    (``offset``: skip that many evaluation items, see :func:`split_items`)."""
    if name not in TASK_SPECS:
        raise ValueError(f"persona_kernels.evaluation: unknown task {name!r}; expected one of {sorted(TASK_SPECS)}")
    spec = TASK_SPECS[name]
    if path is None:
        if shared is None:
            from persona_kernels.paths import shared_dir

            shared = shared_dir(required=True)
        path = Path(shared) / spec.relpath
    path = Path(path)
    items = spec.loader(path)
    split = split_items(len(items), seed=seed, calib_fraction=calib_fraction, limit=limit, calib_limit=calib_limit, salt=name,
                        offset=offset)
    return Task(name, spec.kind, str(path), spec.pair, spec.chat, split,
                [items[i] for i in split.evaluation], [items[i] for i in split.calibration])


# ------------------------------------------------------------------------------------------------------
# scoring


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _split_model(model: nn.Module):
    """(decoder, output layer) when the model exposes them, else None (then full logits are used)."""
    get_dec = getattr(model, "get_decoder", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_dec) and callable(get_out):
        try:
            dec, out = get_dec(), get_out()
        except Exception:  # pragma: no cover - exotic models
            return None
        if isinstance(dec, nn.Module) and isinstance(out, nn.Module) and dec is not model:
            return dec, out
    return None


@dataclass
class ForwardCount:
    """Tokens run by the scorers inside :func:`count_forward_tokens` (benchmarks and tests)."""

    tokens: int = 0  #: real (non-padding) tokens through the decoder
    padded: int = 0  #: rows x width of every forward chunk: what the matrix products run on
    floor: int = 0  #: per scoring call, the distinct nodes of the token trie of its sequences (each up to its
    #: last scored position): the fewest tokens any exact prefix-reusing scorer needs
    sequences: list = field(default_factory=list)  #: those sequences, one list per scoring call


_COUNTERS: list[ForwardCount] = []
#: whether scoring reuses shared prefixes when a caller does not say (see :func:`prefix_caching`)
_PREFIX_CACHE = {"enabled": True}
#: nodes of the prefix tree taken per step of the cached scorer, as a multiple of ``batch_size``; bounds the KV
#: kept alive (see :func:`_chunks`)
_WINDOW = 2
#: the fixed cost of one forward chunk (call overhead, KV assembly) in tokens, for :func:`_chunks`
_CHUNK_COST = 32


@contextlib.contextmanager
def count_forward_tokens() -> Iterator[ForwardCount]:
    """Count the tokens of every scoring forward inside the block (see :class:`ForwardCount`)."""
    count = ForwardCount()
    _COUNTERS.append(count)
    try:
        yield count
    finally:
        _COUNTERS.remove(count)


@contextlib.contextmanager
def prefix_caching(enabled: bool):
    """Within the block, scorers called without ``prefix_cache=`` use ``enabled`` (benchmarks: the sweep and
    confirmation code paths with and without the prefix cache)."""
    old = _PREFIX_CACHE["enabled"]
    _PREFIX_CACHE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _PREFIX_CACHE["enabled"] = old


def trie_nodes(seqs: Sequence[Sequence[int]]) -> int:
    """Distinct nodes of the token trie of ``seqs`` (= distinct non-empty prefixes): the fewest tokens a
    forward that shares every common prefix needs to run them all."""
    root: dict = {}
    n = 0
    for s in seqs:
        node = root
        for t in s:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def _rows(seqs: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of token lists, counted by the active token counters."""
    ids, att = pad_right(seqs, pad)
    for count in _COUNTERS:
        count.tokens += sum(len(x) for x in seqs)
        count.padded += ids.numel()
    return ids.to(device), att.to(device)


def _read(split, hidden_or_logits: torch.Tensor, asks: Sequence[tuple[int, int, int, int]],
          targets: Sequence[Sequence[Sequence[int]]], offsets: Sequence[list[int]], out: list[torch.Tensor]) -> None:
    """For each ask ``(row, col, i, k)``: ``out[i][offsets[i][k] + j] = log P(targets[i][k][j] | row up to col)``.
    The output layer runs once per distinct (row, col)."""
    if not asks:
        return
    where: dict[tuple[int, int], int] = {}
    rows, cols, pick_row, pick_tok = [], [], [], []
    for r, c, i, k in asks:
        u = where.setdefault((r, c), len(where))
        if u == len(rows):
            rows.append(r)
            cols.append(c)
        pick_row.extend([u] * len(targets[i][k]))
        pick_tok.extend(targets[i][k])
    at = hidden_or_logits[torch.tensor(rows, device=hidden_or_logits.device), torch.tensor(cols, device=hidden_or_logits.device)]
    logits = (split[1](at) if split is not None else at).float()
    pick = torch.tensor(pick_row, device=logits.device)
    vals = (logits[pick, torch.tensor(pick_tok, device=logits.device)] - torch.logsumexp(logits, dim=-1)[pick]).cpu()
    start = 0
    for _, _, i, k in asks:
        n = len(targets[i][k])
        out[i][offsets[i][k] : offsets[i][k] + n] = vals[start : start + n]
        start += n


def _forward(model, split, ids, att, *, pos=None, cache=None, use_cache=False):
    """(hidden states, or logits when the model cannot be split; the cache) of one forward chunk."""
    kw = {"input_ids": ids, "attention_mask": att}
    if pos is not None:
        kw["position_ids"] = pos
    module = split[0] if split is not None else model
    if use_cache or cache is not None:
        kw.update({_cache_arg(module): cache, "use_cache": True})
    out = module(**kw)
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return (out[0] if split is not None else out.logits), new_cache


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic modules
        return set()


def _cache_arg(module: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(module) else "past_key_values"


def _can_cache(model: nn.Module, split) -> bool:
    """Whether the module that runs the sequences takes a KV cache and position ids (HF decoders do)."""
    params = _forward_params(split[0] if split is not None else model)
    return "position_ids" in params and bool(params & {"cache", "past_key_values"})


def _cache_layers(cache) -> list | None:
    """The layers of a plain full-attention ``DynamicCache`` (keys/values ``[batch, heads, seq, dim]``, all of one
    shape), else None: the prefix tree needs to cut and reassemble the cache along the sequence."""
    from transformers import DynamicCache

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers:
        return None
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):  # sliding-window, quantised, ... layers
        return None
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape), layer.keys.dtype) for layer in layers}
    return list(layers) if len(shapes) == 1 else None


class _NoTreeCache(Exception):
    """The model's KV cache cannot be reassembled: score whole sequences instead."""


class _Node:
    """A node of the prefix tree: tokens ``need[seq][start:end]``, shared by every sequence below it."""

    __slots__ = ("start", "end", "seq", "parent", "children", "rank", "kv", "asks")

    def __init__(self, start: int, end: int, seq: int, parent: "_Node | None") -> None:
        self.start, self.end, self.seq, self.parent = start, end, seq, parent
        self.children: list[_Node] = []
        self.rank = 0
        self.kv: torch.Tensor | None = None  # [layers, 2, heads, end - start, dim] while children still need it
        self.asks: list[tuple[int, int, int]] = []  # (col, i, k): position start + col, k-th of sequence i


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _prefix_tree(need: Sequence[list[int]]) -> tuple[_Node, list[_Node]]:
    """The radix tree (compressed trie) of non-empty token lists: its empty root and the node where each list
    ends. Its token count is :func:`trie_nodes`. Children are in lexicographic order; ``rank`` is the pre-order."""
    order = sorted(range(len(need)), key=lambda i: need[i])
    root = _Node(0, 0, order[0], None)
    ends = [root] * len(need)
    stack, prev = [root], []
    for i in order:
        s = need[i]
        shared = _lcp(prev, s)
        while stack[-1].end > shared:
            top = stack[-1]
            if top.start >= shared:  # wholly past the shared part: finished
                stack.pop()
                continue
            mid = _Node(top.start, shared, top.seq, top.parent)  # split: s branches off inside top
            siblings = top.parent.children
            siblings[next(j for j, c in enumerate(siblings) if c is top)] = mid
            mid.children.append(top)
            top.start, top.parent = shared, mid
            stack[-1] = mid
        if len(s) > shared:
            leaf = _Node(shared, len(s), i, stack[-1])
            stack[-1].children.append(leaf)
            stack.append(leaf)
            ends[i] = leaf
        else:  # s equals the previous list
            ends[i] = stack[-1]
        prev = s
    for rank, node in enumerate(_preorder(root)):
        node.rank = rank
    return root, ends


def _preorder(root: _Node) -> list[_Node]:
    order, todo = [], [root]
    while todo:
        order.append(todo.pop())
        todo.extend(reversed(order[-1].children))
    return order


@torch.no_grad()
def _position_logprobs(model: nn.Module, tokenizer, seqs: Sequence[list[int]], positions: Sequence[list[int]],
                       targets: Sequence[Sequence[Sequence[int]]], *, batch_size: int, progress: bool = False,
                       desc: str = "scoring", prefix_cache: bool | None = None) -> list[torch.Tensor]:
    """Log-probs of target tokens: for sequence ``i``, float32 ``[sum_k len(targets[i][k])]``, the log-probs
    ``log P(t | seqs[i][: positions[i][k] + 1])`` for ``t`` in ``targets[i][k]``, in that order.

    ``prefix_cache`` (default): every token prefix that sequences share runs once. The sequences (each up to
    its last scored position; later tokens are never needed) form a prefix tree; its nodes run in chunks of at
    most ``batch_size`` rows, each attending to the KV cache of its ancestors, so the decoder sees exactly the
    tree's tokens (:func:`trie_nodes`, the floor of any exact prefix-reusing scorer). Nodes are taken in
    depth-first order, a window of ``2 * batch_size`` at a time sorted by length, and a node's KV is dropped
    once its whole subtree ran, which bounds memory. The cache is computed under the model's current
    persona/condition within this call and never reused across calls. A model whose cache is not a plain
    full-attention ``DynamicCache`` (sliding-window or quantised layers) runs whole sequences.
    ``prefix_cache=False``: one forward per whole sequence, the reference; both give the same numbers up to
    float32 rounding.
    """
    if not (len(seqs) == len(positions) == len(targets)):
        raise ValueError(f"persona_kernels.evaluation: 'seqs', 'positions' and 'targets' differ in length "
                         f"({len(seqs)}, {len(positions)}, {len(targets)})")
    for i, (s, p, t) in enumerate(zip(seqs, positions, targets)):
        if not p or len(p) != len(t) or min(p) < 0 or max(p) >= len(s):
            raise ValueError(f"persona_kernels.evaluation: sequence {i} (length {len(s)}): expected one or more "
                             f"positions in [0, {len(s)}) with one target list each, got positions {list(p)}")
    if not seqs:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = _split_model(model)
    offsets = []
    for t in targets:
        offsets.append([0])
        for k in t[:-1]:
            offsets[-1].append(offsets[-1][-1] + len(k))
    need = [list(s[: max(p) + 1]) for s, p in zip(seqs, positions)]
    for count in _COUNTERS:
        count.floor += trie_nodes(need)
        count.sequences.append(need)
    if prefix_cache is None:
        prefix_cache = _PREFIX_CACHE["enabled"]
    args = (model, split, seqs, positions, targets, offsets, pad, batch_size, progress, desc)
    if prefix_cache and _can_cache(model, split):  # a model without a KV cache runs whole sequences
        try:
            return _tree_logprobs(*args, need=need)
        except _NoTreeCache:
            pass
    return _whole_logprobs(*args)


def _whole_logprobs(model, split, seqs, positions, targets, offsets, pad, batch_size, progress, desc) -> list[torch.Tensor]:
    """The reference: each whole sequence in one forward (batches of similar length)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    out = [torch.empty(o[-1] + len(t[-1])) for o, t in zip(offsets, targets)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[b : b + batch_size]
        ids, att = _rows([seqs[i] for i in idx], pad, device)
        asks = [(r, p, i, k) for r, i in enumerate(idx) for k, p in enumerate(positions[i])]
        _read(split, _forward(model, split, ids, att)[0], asks, targets, offsets, out)
    return out


def _tree_logprobs(model, split, seqs, positions, targets, offsets, pad, batch_size, progress, desc, *,
                   need) -> list[torch.Tensor]:
    """The prefix-tree scorer (see :func:`_position_logprobs`)."""
    import heapq

    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = model_device(model)
    root, ends = _prefix_tree(need)
    for i, ps in enumerate(positions):
        for k, p in enumerate(ps):
            node = ends[i]
            while node.start > p:
                node = node.parent
            node.asks.append((p - node.start, i, k))
    out = [torch.empty(o[-1] + len(t[-1])) for o, t in zip(offsets, targets)]
    left = {}  # nodes below each node that have not run yet: its KV is needed until that reaches 0
    for node in reversed(_preorder(root)):
        left[id(node)] = sum(1 + left[id(c)] for c in node.children)
    ready = [(c.rank, c) for c in root.children]
    heapq.heapify(ready)
    bar = tqdm(total=None, desc=desc, unit="node", disable=not progress, leave=False)
    while ready:
        take = [heapq.heappop(ready)[1] for _ in range(min(len(ready), _WINDOW * batch_size))]
        take.sort(key=lambda n: (n.end - n.start, n.start))
        for chunk in _chunks(take, [n.end - n.start for n in take], batch_size):
            ids, att = _rows([need[n.seq][n.start : n.end] for n in chunk], pad, device)
            starts = torch.tensor([n.start for n in chunk], dtype=torch.long, device=device)
            past = int(starts.max())
            cache = None
            if past:
                kv = None
                for r, n in enumerate(chunk):
                    a = n.parent
                    while a is not root:
                        if kv is None:
                            kv = a.kv.new_zeros((a.kv.shape[0], 2, len(chunk), a.kv.shape[2], past, a.kv.shape[4]))
                        kv[:, :, r, :, a.start : a.end] = a.kv
                        a = a.parent
                cache = DynamicCache()
                for layer in range(kv.shape[0]):
                    cache.update(kv[layer, 0], kv[layer, 1], layer)
                att = torch.cat([(torch.arange(past, device=device)[None, :] < starts[:, None]).long(), att], 1)
            pos = starts[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
            keep = [r for r, n in enumerate(chunk) if n.children]
            hidden, new_cache = _forward(model, split, ids, att, pos=pos, cache=cache, use_cache=bool(keep))
            if keep:
                layers = _cache_layers(new_cache)
                if layers is None:
                    raise _NoTreeCache
                for r in keep:
                    n = chunk[r]
                    n.kv = torch.stack([torch.stack([layer.keys[r, :, past : past + n.end - n.start],
                                                     layer.values[r, :, past : past + n.end - n.start]])
                                        for layer in layers])
            _read(split, hidden, [(r, col, i, k) for r, n in enumerate(chunk) for col, i, k in n.asks], targets,
                  offsets, out)
            bar.update(len(chunk))
        for n in take:
            for ch in n.children:
                heapq.heappush(ready, (ch.rank, ch))
            a = n.parent
            while a is not None:
                left[id(a)] -= 1
                if not left[id(a)]:
                    a.kv = None  # its whole subtree ran: free the KV
                a = a.parent
    bar.close()
    return out


def _chunks(items: list, lengths: Sequence[int], rows: int) -> list[list]:
    """Cut ``items`` (sorted by ascending ``lengths``) into runs of at most ``rows`` that minimise the padded
    tokens (rows x the longest) plus :data:`_CHUNK_COST` per run (dynamic programming over the cut points)."""
    best, cut = [0] * (len(items) + 1), [0] * (len(items) + 1)
    for j in range(1, len(items) + 1):  # best[j]: the cost of items[:j]; cut[j]: where its last run starts
        best[j], cut[j] = min((best[i] + (j - i) * lengths[j - 1] + _CHUNK_COST, i) for i in range(max(0, j - rows), j))
    runs, j = [], len(items)
    while j:
        runs.append(items[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def choice_logprobs(model: nn.Module, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], *,
                    batch_size: int = 16, max_length: int = 1024, progress: bool = False, desc: str = "choices",
                    prefix_cache: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per item: (summed log-prob, token count) of each choice as a continuation of its context, as float64
    and int64 tensors ``[n_choices]``. Items whose choices are all single tokens take one forward position.
    Sequences longer than ``max_length`` lose tokens from the left (context first). Token prefixes shared
    by any sequences (a chat header, a prompt with several continuations) run once with ``prefix_cache``
    (see :func:`_position_logprobs`)."""
    if max_length < 2:
        raise ValueError(f"persona_kernels.evaluation: argument 'max_length': expected >= 2, got {max_length}")
    if len(contexts) != len(choices):
        raise ValueError(f"persona_kernels.evaluation: 'contexts' and 'choices' differ in length ({len(contexts)} vs {len(choices)})")
    pre = _prefix(tokenizer)
    seqs, pos, tgt, plan = [], [], [], []  # plan[i] = ("single", seq index) | ("multi", [seq index per choice])
    counts = []
    for ctx, chs in zip(contexts, choices):
        c_ids = pre + _encode(tokenizer, ctx)
        if not c_ids:
            raise ValueError("persona_kernels.evaluation: an empty context needs a tokenizer with a BOS token")
        ch_ids = [_encode(tokenizer, c) for c in chs]
        if any(not c for c in ch_ids):
            raise ValueError(f"persona_kernels.evaluation: a choice has no tokens: {list(chs)!r}")
        if all(len(c) == 1 for c in ch_ids):
            plan.append(("single", len(seqs)))
            seqs.append(c_ids[-(max_length - 1):])
            pos.append([len(seqs[-1]) - 1])
            tgt.append([[c[0] for c in ch_ids]])
            counts.append(torch.ones(len(ch_ids), dtype=torch.int64))
        else:
            entries, n = [], []
            for c in ch_ids:
                seq = (c_ids + c)[-max_length:]
                c = c[-(len(seq) - 1):]
                entries.append(len(seqs))
                seqs.append(seq)
                pos.append(list(range(len(seq) - len(c) - 1, len(seq) - 1)))
                tgt.append([[t] for t in c])
                n.append(len(c))
            plan.append(("multi", entries))
            counts.append(torch.tensor(n, dtype=torch.int64))
    lps = _position_logprobs(model, tokenizer, seqs, pos, tgt, batch_size=batch_size, progress=progress, desc=desc,
                             prefix_cache=prefix_cache)
    totals = [lps[p[1]].double() if p[0] == "single" else torch.stack([lps[s].double().sum() for s in p[1]])
              for p in plan]
    return totals, counts


def sequence_logprobs(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """Mean log-prob per token of each whole text (after BOS), float64 [n]: the capability proxy."""
    pre = _prefix(tokenizer)
    if not pre:
        raise ValueError("persona_kernels.evaluation: the capability proxy needs a tokenizer with a BOS token")
    seqs = [pre + _encode(tokenizer, t) for t in texts]
    for t, s in zip(texts, seqs):
        if len(s) < 2:
            raise ValueError(f"persona_kernels.evaluation: argument 'texts': {t!r} has no tokens to score")
    pos = [list(range(0, len(s) - 1)) for s in seqs]
    lps = _position_logprobs(model, tokenizer, seqs, pos, [[[t] for t in s[1:]] for s in seqs], batch_size=batch_size,
                             progress=progress, desc="text")
    return torch.stack([lp.double().mean() for lp in lps]) if lps else torch.zeros(0, dtype=torch.float64)


def _ab_context(tokenizer, question: str, chat: bool, system: str | None) -> str:
    ctx, pre = format_context(question, tokenizer, chat_template=chat, system_prompt=system)
    return ctx + pre + "("


def score_items(model: nn.Module, tokenizer, task: Task, *, system_prompt: str | None = None, items: list | None = None,
                batch_size: int = 16, max_length: int = 1024, progress: bool = False, both_orders: bool = True,
                prefix_cache: bool | None = None) -> dict[str, torch.Tensor]:
    """Per-item scores of ``task``'s evaluation items (or ``items``) under the model's current condition.
    ``prefix_cache=False`` runs every sequence whole (the reference the cached scorer is tested against);
    None: the default of :func:`prefix_caching` (on)."""
    items = task.items if items is None else items
    chat = task.chat
    if not items:
        return {}
    if task.kind == "ab":
        variants = [[it] + ([s] if both_orders and (s := swap_options(it)) is not None else []) for it in items]
        ctxs, chs = [], []
        for vs in variants:
            for v in vs:
                ctxs.append(_ab_context(tokenizer, v.question, chat, system_prompt))
                chs.append((v.matching, v.not_matching))
        totals, _ = choice_logprobs(model, tokenizer, ctxs, chs, batch_size=batch_size, max_length=max_length,
                                    progress=progress, desc=task.name, prefix_cache=prefix_cache)
        lo = [float(t[0] - t[1]) for t in totals]
        per, k = [], 0
        for vs in variants:
            per.append(lo[k : k + len(vs)])
            k += len(vs)
        return {"logodds": torch.tensor([sum(v) / len(v) for v in per], dtype=torch.float64),
                "logodds_original": torch.tensor([v[0] for v in per], dtype=torch.float64),
                "both_orders": torch.tensor([len(v) == 2 for v in per], dtype=torch.float64)}
    if task.kind == "yesno":
        ctxs, chs = [], []
        for it in items:
            ctx, pre = format_context(it.question, tokenizer, chat_template=chat, system_prompt=system_prompt)
            other = "No" if it.matching == "Yes" else "Yes"
            ctxs.append(ctx)
            chs.append((pre + it.matching, pre + other))
        totals, _ = choice_logprobs(model, tokenizer, ctxs, chs, batch_size=batch_size, max_length=max_length, progress=progress, desc=task.name, prefix_cache=prefix_cache)
        return {"logodds": torch.tensor([float(t[0] - t[1]) for t in totals], dtype=torch.float64)}
    if task.kind == "pairs":
        ctxs, chs = [], []
        for p in items:
            ctx, pre = format_context(p.prompt, tokenizer, chat_template=chat, system_prompt=system_prompt)
            ctxs.append(ctx)
            chs.append((pre + p.positive, pre + p.negative))
        totals, counts = choice_logprobs(model, tokenizer, ctxs, chs, batch_size=batch_size, max_length=max_length, progress=progress, desc=task.name, prefix_cache=prefix_cache)
        return {"margin": torch.tensor([float(t[0] / c[0] - t[1] / c[1]) for t, c in zip(totals, counts)], dtype=torch.float64)}
    if task.kind == "mc":
        head = f"{system_prompt}\n\n" if system_prompt else ""
        ctxs = [head + it.context for it in items]
        totals, counts = choice_logprobs(model, tokenizer, ctxs, [it.choices for it in items], batch_size=batch_size,
                                         max_length=max_length, progress=progress, desc=task.name, prefix_cache=prefix_cache)
        correct = []
        for it, t, c in zip(items, totals, counts):
            s = t / c if it.normalise else t
            correct.append(float(int(torch.argmax(s)) == it.gold))
        return {"correct": torch.tensor(correct, dtype=torch.float64)}
    if task.kind == "text":
        ctx = (f"{system_prompt}\n\n" if system_prompt else "") + NEUTRAL_PREFIX
        totals, counts = choice_logprobs(model, tokenizer, [ctx] * len(items), [(t,) for t in items],
                                         batch_size=batch_size, max_length=max_length, progress=progress, desc=task.name, prefix_cache=prefix_cache)
        return {"capability": torch.tensor([float(t[0] / c[0]) for t, c in zip(totals, counts)], dtype=torch.float64)}
    raise ValueError(f"persona_kernels.evaluation: task {task.name!r} has unknown kind {task.kind!r}")


#: context before every capability-proxy text, so that its first tokens are conditioned the same way with and
#: without a system prompt (a prompt is otherwise credited with merely being context)
NEUTRAL_PREFIX = "Here is a short passage.\n\n"


def capability_texts(items: Sequence[MCItem]) -> list[str]:
    """Neutral text for the capability proxy: each HellaSwag context followed by its gold ending."""
    return [it.context + it.choices[it.gold] for it in items]
