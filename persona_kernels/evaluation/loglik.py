"""Batched log-likelihood of continuations given contexts — the measuring stick of every evaluation.

Context and continuation are tokenised separately and concatenated (so the continuation's tokens
are the same whatever the context), and only the continuation tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class LogLik:
    """Per item: summed log-probability of the continuation and its token count."""

    total: torch.Tensor  # float64 [n]
    tokens: torch.Tensor  # int64 [n]

    @property
    def per_token(self) -> torch.Tensor:
        return self.total / self.tokens.clamp(min=1)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def logits_to_keep_arg(model: nn.Module) -> str | None:
    """Name of the forward argument that limits the logits to the last positions (HF causal LMs), if any."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


@torch.no_grad()
def continuation_loglik(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    bos: bool = True,
    progress: bool = False,
    desc: str = "scoring",
) -> LogLik:
    """Log P(continuation | context) for each pair, batched with right padding.

    ``bos`` prepends the tokenizer's BOS token when it has one. Contexts are truncated from the left
    when context + continuation exceed ``max_length``.
    """
    from tqdm.auto import tqdm

    if len(contexts) != len(continuations):
        raise ValueError(
            f"persona_kernels.evaluation: arguments 'contexts' and 'continuations' differ in length "
            f"({len(contexts)} vs {len(continuations)})"
        )
    prefix = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    ctx_cache: dict[str, list[int]] = {}
    seqs: list[tuple[list[int], int]] = []  # (ids, number of continuation tokens)
    for ctx, cont in zip(contexts, continuations):
        if ctx not in ctx_cache:
            ctx_cache[ctx] = prefix + _encode(tokenizer, ctx)
        c_ids = _encode(tokenizer, cont)
        if not c_ids:
            raise ValueError(f"persona_kernels.evaluation: continuation {cont!r} has no tokens")
        ids = (ctx_cache[ctx] + c_ids)[-max_length:]
        seqs.append((ids, min(len(c_ids), len(ids) - 1)))
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_arg = logits_to_keep_arg(model)
    total = torch.zeros(len(seqs), dtype=torch.float64)
    count = torch.zeros(len(seqs), dtype=torch.int64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[b : b + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        # left padding puts every continuation at the end, so only the last `keep` logits are needed
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i][0]
            ids[r, width - len(s) :] = torch.tensor(s)
            att[r, width - len(s) :] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        keep = max(seqs[i][1] for i in idx) + 1
        kwargs = {"input_ids": ids.to(device), "attention_mask": att.to(device), "position_ids": pos.to(device)}
        if keep_arg:
            kwargs[keep_arg] = keep
        logits = model(**kwargs).logits[:, -keep:]
        for r, i in enumerate(idx):
            s, n = seqs[i]
            lp = torch.log_softmax(logits[r, keep - n - 1 : keep - 1].float(), dim=-1)
            target = torch.tensor(s[len(s) - n :], device=logits.device)
            total[i] = lp.gather(1, target[:, None]).sum().double().cpu()
            count[i] = n
    return LogLik(total, count)
