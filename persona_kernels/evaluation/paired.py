"""Paired response likelihood: how much more a model likes persona+'s response than persona-'s.

For each item (prompt, response+, response-), ``d = mean log-prob per token of response+ minus that of
response-`` given the prompt. Comparing ``d`` between two conditions on the same items gives a paired,
bias-free switch effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from persona_kernels.evaluation.ab import format_context
from persona_kernels.evaluation.loglik import continuation_loglik


@dataclass(frozen=True)
class ResponsePair:
    """One prompt with a persona+ and a persona- response."""

    prompt: str
    positive: str
    negative: str


def response_margin(
    model,
    tokenizer,
    pairs: Sequence[ResponsePair],
    *,
    system_prompt: str | None = None,
    chat_template: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Per item: mean log-prob per token of the positive minus the negative response (float64 [n])."""
    contexts, conts = [], []
    for p in pairs:
        ctx, pre = format_context(p.prompt, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
        contexts += [ctx, ctx]
        conts += [pre + p.positive, pre + p.negative]
    ll = continuation_loglik(model, tokenizer, contexts, conts, batch_size=batch_size, progress=progress, desc="pairs")
    per_tok = ll.per_token
    return per_tok[0::2] - per_tok[1::2]


def text_logprob(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Mean log-prob per token of each whole text (a capability proxy on neutral text), float64 [n]."""
    contexts = [""] * len(texts)
    ll = continuation_loglik(model, tokenizer, contexts, list(texts), batch_size=batch_size, progress=progress, desc="neutral")
    return ll.per_token
