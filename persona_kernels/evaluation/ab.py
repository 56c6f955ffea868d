"""The one A/B item type and its formatting; scored (in both option orders, so letter bias cancels) by
:func:`persona_kernels.evaluation.tasks.score_items`.

For an item whose matching answer is (A), the swapped item exchanges the two options' texts so the
matching answer becomes (B). A model with a constant preference for one letter gets log-odds
``+b`` in one order and ``-b`` in the other: the average is free of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_OPTION = re.compile(r"^(\s*)\(([AB])\)[ \t]?(.*)$")


@dataclass(frozen=True)
class ABItem:
    """One A/B question; ``matching`` is the letter of the persona-matching answer.

    The evaluation files and the bundled demo questions (:func:`persona_kernels.personas.load_ab_questions`,
    which also fill ``pair`` and ``persona``: the persona whose answer ``matching`` is) share this type.
    """

    question: str
    matching: str  # "A" or "B"
    source: str = ""
    pair: str = ""
    persona: str = ""

    @property
    def not_matching(self) -> str:
        return "B" if self.matching == "A" else "A"

    @property
    def answer_matching(self) -> str:
        """The matching answer as written in the files: ``"(A)"`` or ``"(B)"``."""
        return f"({self.matching})"

    @property
    def answer_not_matching(self) -> str:
        return f"({self.not_matching})"


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
