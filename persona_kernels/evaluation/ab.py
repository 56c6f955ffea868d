"""A/B questions scored by answer log-likelihood, in both option orders so letter bias cancels.

For an item whose matching answer is (A), the swapped item exchanges the two options' texts so the
matching answer becomes (B). A model with a constant preference for one letter gets log-odds
``+b`` in one order and ``-b`` in the other: the average is free of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from persona_kernels.evaluation.loglik import continuation_loglik

_OPTION = re.compile(r"^(\s*)\(([AB])\)[ \t]?(.*)$")


@dataclass(frozen=True)
class ABItem:
    """One A/B question; ``matching`` is the letter of the persona-matching answer."""

    question: str
    matching: str  # "A" or "B"
    source: str = ""

    @property
    def not_matching(self) -> str:
        return "B" if self.matching == "A" else "A"


def letter_of(answer: str, *, where: str = "answer") -> str:
    """'(A)', ' (B)', 'A' -> 'A' / 'B'."""
    m = re.fullmatch(r"\s*\(?\s*([AB])\s*\)?\s*", answer or "")
    if not m:
        raise ValueError(f"persona_kernels.evaluation: {where}: expected an A/B answer such as '(A)', got {answer!r}")
    return m.group(1)


def swap_options(item: ABItem) -> ABItem | None:
    """The same question with the texts of options (A) and (B) exchanged, or None if they cannot be found.

    Options are lines starting with ``(A)`` / ``(B)``; an option's text runs until the next option line
    or the end of the question.
    """
    lines = item.question.split("\n")
    starts = {}
    for i, line in enumerate(lines):
        m = _OPTION.match(line)
        if m and m.group(2) not in starts:
            starts[m.group(2)] = i
    if set(starts) != {"A", "B"}:
        return None
    a, b = starts["A"], starts["B"]
    first, second = sorted((a, b))
    block1, block2 = lines[first:second], lines[second:]
    # trailing non-option text (e.g. "Answer:") is not expected in these formats; keep it with block2.
    def retag(block, letter):
        m = _OPTION.match(block[0])
        return [f"{m.group(1)}({letter}) {m.group(3)}".rstrip() if m.group(3) else f"{m.group(1)}({letter})"] + block[1:]

    letter1, letter2 = lines[first].strip()[1], lines[second].strip()[1]
    new_first = retag(block2, letter1)
    new_second = retag(block1, letter2)
    swapped = "\n".join(lines[:first] + new_first + new_second)
    return replace(item, question=swapped, matching=item.not_matching)


def format_context(question: str, tokenizer=None, *, chat_template: bool = True, system_prompt: str | None = None) -> tuple[str, str]:
    """(context text, answer prefix): a chat turn when the tokenizer has a template, else 'Answer:' style."""
    if chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": question}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}{question}\n\nAnswer:", " "


@dataclass
class ABScores:
    """Per-item log-odds of the matching vs the non-matching answer."""

    logodds: torch.Tensor  # [n] averaged over the orders scored
    logodds_original: torch.Tensor  # [n] original order only
    both_orders: torch.Tensor  # bool [n]: whether a swapped order could be built

    @property
    def accuracy(self) -> float:
        """Rate of preferring the matching answer in the original order (the paper's metric)."""
        return float((self.logodds_original > 0).double().mean()) if self.logodds.numel() else float("nan")

    @property
    def debiased_accuracy(self) -> float:
        """Rate of preferring the matching answer after averaging both orders."""
        return float((self.logodds > 0).double().mean()) if self.logodds.numel() else float("nan")


def score_ab(
    model,
    tokenizer,
    items: Sequence[ABItem],
    *,
    system_prompt: str | None = None,
    chat_template: bool = True,
    both_orders: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> ABScores:
    """Score A/B items; with ``both_orders`` each item also runs with its options swapped."""
    variants: list[list[ABItem]] = []
    for it in items:
        sw = swap_options(it) if both_orders else None
        variants.append([it] + ([sw] if sw is not None else []))
    contexts, conts, owner = [], [], []
    for i, vs in enumerate(variants):
        for v in vs:
            ctx, pre = format_context(v.question, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
            for letter in (v.matching, v.not_matching):
                contexts.append(ctx)
                conts.append(f"{pre}({letter})")
                owner.append(i)
    ll = continuation_loglik(model, tokenizer, contexts, conts, batch_size=batch_size, progress=progress, desc="A/B")
    lo = (ll.total[0::2] - ll.total[1::2]).tolist()  # matching minus not matching, per variant
    per_item: list[list[float]] = [[] for _ in items]
    for value, i in zip(lo, owner[0::2]):
        per_item[i].append(value)
    logodds = torch.tensor([sum(v) / len(v) for v in per_item], dtype=torch.float64)
    original = torch.tensor([v[0] for v in per_item], dtype=torch.float64)
    both = torch.tensor([len(v) == 2 for v in per_item])
    return ABScores(logodds, original, both)
