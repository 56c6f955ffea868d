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
one sequence per item scores all choices at once. Shared prefixes run once (KV cache expanded to each
continuation, see :func:`_position_logprobs`): the chat header common to a batch, the prompt of an E/I pair's
two responses, the question start of an A/B item's two option orders. The cache is built under the condition
being scored; results equal the whole-sequence forward up to float rounding (``prefix_cache=False``).
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
from persona_kernels.utils.devices import model_device

__all__ = [
    "TaskDataError", "ResponsePair", "YesNoItem", "MCItem", "Task", "Split", "TASK_SPECS", "load_ab_file", "load_yesno_file",
    "load_pairs_file", "load_mmlu2_file", "load_mmlu4_file", "load_hellaswag_file", "load_task", "split_items",
    "score_items", "choice_logprobs", "sequence_logprobs",
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


#: forward tokens of the scorer (real, non-padding tokens run through the decoder), for benchmarks and tests
FORWARD_TOKENS = {"tokens": 0}
#: whether scoring reuses shared prefixes when a caller does not say (see :func:`prefix_caching`)
_PREFIX_CACHE = {"enabled": True}


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


def _rows(seqs: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of token lists."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        att[r, : len(x)] = 1
    FORWARD_TOKENS["tokens"] += sum(len(x) for x in seqs)
    return ids.to(device), att.to(device)


def _gather_logprobs(model, split, hidden_or_logits, rows, cols) -> torch.Tensor:
    logits = split[1](hidden_or_logits[rows, cols]) if split is not None else hidden_or_logits[rows, cols]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


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


@torch.no_grad()
def _position_logprobs(model: nn.Module, tokenizer, seqs: Sequence[list[int]], positions: Sequence[list[int]],
                       *, batch_size: int, progress: bool = False, desc: str = "scoring",
                       groups: Sequence[Sequence[int]] | None = None, prefix_cache: bool | None = None) -> list[torch.Tensor]:
    """For each sequence, the log-softmax rows ``[len(positions[i]), vocab]`` (float32, CPU) at the given
    positions (the distribution of the token that follows each position).

    ``prefix_cache`` (default): shared prefixes run once and their KV cache is expanded to the sequences that
    share them, at two levels: the prefix common to a whole batch (chat header, system prompt) and, within a
    ``group`` of sequences (one item: its choices, both option orders), the group's common prefix. Only the
    tokens up to the first scored position are shared, so every scored position is computed in the last
    chunk. Same numbers as ``prefix_cache=False`` (one forward per whole sequence) up to float rounding; the
    cache is computed under the model's current persona/condition and never reused across calls.
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    split = _split_model(model)
    out: list[torch.Tensor | None] = [None] * len(seqs)
    if prefix_cache is None:
        prefix_cache = _PREFIX_CACHE["enabled"]
    if not prefix_cache or not _can_cache(model, split):  # a model without a KV cache runs whole sequences
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[b : b + batch_size]
            ids, att = _rows([seqs[i] for i in idx], pad, device)
            rows = torch.tensor([r for r, i in enumerate(idx) for _ in positions[i]], dtype=torch.long, device=device)
            cols = torch.tensor([p for i in idx for p in positions[i]], dtype=torch.long, device=device)
            lp = _gather_logprobs(model, split, _forward(model, split, ids, att)[0], rows, cols)
            _scatter(out, idx, positions, lp)
        return out  # type: ignore[return-value]

    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(seqs))]
    if sorted(i for g in groups for i in g) != list(range(len(seqs))):
        raise ValueError("persona_kernels.evaluation: 'groups' must partition the sequences")
    # per group: the shared length P (common prefix, never past the first scored position)
    shared = [min(_common(seqs[i] for i in g), min(min(positions[i]) for i in g)) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: max(len(seqs[i]) for i in groups[k]))
    batches, cur, n = [], [], 0
    for k in order:
        cur.append(k)
        n += len(groups[k])
        if n >= batch_size:
            batches.append(cur)
            cur, n = [], 0
    if cur:
        batches.append(cur)
    for ks in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        members = [i for k in ks for i in groups[k]]
        owner = torch.tensor([j for j, k in enumerate(ks) for _ in groups[k]], dtype=torch.long, device=device)
        p_grp = [shared[k] for k in ks]
        # level 1: the batch's common prefix, strictly shorter than every group's P so that every level-2 row
        # keeps a real token (a fully masked attention row would give NaN)
        g_len = min(_common(seqs[i] for i in members), min(p_grp) - 1) if min(p_grp) > 1 else 0
        if min(p_grp) == 0:  # a group with nothing to share: one plain forward for the batch
            p_grp = [0] * len(ks)
        cache, past_att = None, torch.zeros((1, 0), dtype=torch.long, device=device)
        if g_len > 0:
            ids, att = _rows([seqs[members[0]][:g_len]], pad, device)
            _, cache = _forward(model, split, ids, att, use_cache=True)
            past_att = att
        # level 2: each group's own shared part, after the batch prefix
        select = torch.zeros(len(members), dtype=torch.long, device=device)  # cache row of each sequence
        if max(p_grp) > g_len:
            select = owner
            parts = [seqs[groups[k][0]][g_len:p] for k, p in zip(ks, p_grp)]
            ids, att = _rows(parts, pad, device)
            if cache is not None:
                cache.batch_select_indices(torch.zeros(len(ks), dtype=torch.long, device=device))
            past_att = past_att.expand(len(ks), -1)
            pos = g_len + torch.arange(ids.shape[1], device=device).expand(len(ks), -1)
            _, cache = _forward(model, split, ids, torch.cat([past_att, att], 1), pos=pos, cache=cache, use_cache=True)
            past_att = torch.cat([past_att, att], 1)
            base = list(p_grp)
        else:
            base = [g_len] * len(ks)
        # level 3: every sequence's rest, attending to its group's cached prefix
        if cache is not None:
            cache.batch_select_indices(select)
        rests = [seqs[i][base[j]:] for j, k in enumerate(ks) for i in groups[k]]
        ids, att = _rows(rests, pad, device)
        offs = torch.tensor([base[j] for j, k in enumerate(ks) for _ in groups[k]], dtype=torch.long, device=device)
        pos = offs[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
        hidden, _ = _forward(model, split, ids, torch.cat([past_att[select], att], 1), pos=pos, cache=cache)
        rows = torch.tensor([r for r, i in enumerate(members) for _ in positions[i]], dtype=torch.long, device=device)
        cols = torch.tensor([p - int(offs[r]) for r, i in enumerate(members) for p in positions[i]], dtype=torch.long,
                            device=device)
        _scatter(out, members, positions, _gather_logprobs(model, split, hidden, rows, cols))
    return out  # type: ignore[return-value]


def _common(items) -> int:
    """Length of the longest common prefix of token lists."""
    items = list(items)
    first, n = items[0], min(len(x) for x in items)
    for other in items[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


def _scatter(out: list, idx: Sequence[int], positions: Sequence[list[int]], lp: torch.Tensor) -> None:
    start = 0
    for i in idx:
        k = len(positions[i])
        out[i] = lp[start : start + k]
        start += k


def choice_logprobs(model: nn.Module, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], *,
                    batch_size: int = 16, max_length: int = 1024, progress: bool = False, desc: str = "choices",
                    groups: Sequence[Sequence[int]] | None = None, prefix_cache: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per item: (summed log-prob, token count) of each choice as a continuation of its context, as float64
    and int64 tensors ``[n_choices]``. Items whose choices are all single tokens take one forward pass.
    Sequences longer than ``max_length`` lose tokens from the left (context first).

    ``groups``: lists of item indices whose contexts share a long prefix (e.g. both option orders of one A/B
    question); with ``prefix_cache`` their shared tokens run once (see :func:`_position_logprobs`)."""
    if max_length < 2:
        raise ValueError(f"persona_kernels.evaluation: argument 'max_length': expected >= 2, got {max_length}")
    if len(contexts) != len(choices):
        raise ValueError(f"persona_kernels.evaluation: 'contexts' and 'choices' differ in length ({len(contexts)} vs {len(choices)})")
    pre = _prefix(tokenizer)
    seqs, pos, plan = [], [], []  # plan[i] = ("single", seq index, token ids) | ("multi", [(seq index, n)])
    for ctx, chs in zip(contexts, choices):
        c_ids = pre + _encode(tokenizer, ctx)
        if not c_ids:
            raise ValueError("persona_kernels.evaluation: an empty context needs a tokenizer with a BOS token")
        ch_ids = [_encode(tokenizer, c) for c in chs]
        if any(not c for c in ch_ids):
            raise ValueError(f"persona_kernels.evaluation: a choice has no tokens: {list(chs)!r}")
        if all(len(c) == 1 for c in ch_ids):
            plan.append(("single", len(seqs), [c[0] for c in ch_ids]))
            seqs.append(c_ids[-(max_length - 1):])
            pos.append([len(seqs[-1]) - 1])
        else:
            entries = []
            for c in ch_ids:
                seq = (c_ids + c)[-max_length:]
                c = c[-(len(seq) - 1):]
                entries.append((len(seqs), c))
                seqs.append(seq)
                pos.append(list(range(len(seq) - len(c) - 1, len(seq) - 1)))
            plan.append(("multi", entries))
    seq_of_item = [[p[1]] if p[0] == "single" else [e[0] for e in p[1]] for p in plan]
    item_groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(plan))]
    lps = _position_logprobs(model, tokenizer, seqs, pos, batch_size=batch_size, progress=progress, desc=desc,
                             groups=[[s for i in g for s in seq_of_item[i]] for g in item_groups], prefix_cache=prefix_cache)
    totals, counts = [], []
    for p in plan:
        if p[0] == "single":
            row = lps[p[1]][0]
            totals.append(row[p[2]].double())
            counts.append(torch.ones(len(p[2]), dtype=torch.int64))
        else:
            t = [float(lps[s].gather(1, torch.tensor(c)[:, None]).sum()) for s, c in p[1]]
            totals.append(torch.tensor(t, dtype=torch.float64))
            counts.append(torch.tensor([len(c) for _, c in p[1]], dtype=torch.int64))
    return totals, counts


def sequence_logprobs(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """Mean log-prob per token of each whole text (after BOS), float64 [n]: the capability proxy."""
    pre = _prefix(tokenizer)
    if not pre:
        raise ValueError("persona_kernels.evaluation: the capability proxy needs a tokenizer with a BOS token")
    seqs = [pre + _encode(tokenizer, t) for t in texts]
    pos = [list(range(0, len(s) - 1)) for s in seqs]
    lps = _position_logprobs(model, tokenizer, seqs, pos, batch_size=batch_size, progress=progress, desc="text")
    return torch.tensor([float(lp.gather(1, torch.tensor(s[1:])[:, None]).mean()) for lp, s in zip(lps, seqs)],
                        dtype=torch.float64)


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
        groups, k = [], 0
        for vs in variants:  # both option orders of an item share the question's start
            groups.append(list(range(k, k + len(vs))))
            k += len(vs)
        totals, _ = choice_logprobs(model, tokenizer, ctxs, chs, batch_size=batch_size, max_length=max_length,
                                    progress=progress, desc=task.name, groups=groups, prefix_cache=prefix_cache)
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
