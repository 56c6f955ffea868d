"""Up-front checks of every calibration argument, run before the first forward.

:func:`validate_calibration` is called once at the top of :func:`persona_kernels.calibrate`. Calibration
forwards are the expensive part; every mistake that can be seen from the arguments alone (texts, pairs,
method options, rho, gamma, tau, ``max_length``, texts longer than the model context) is reported here, each
error naming the argument, and for texts the persona and the item index.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from persona_kernels.personas import PersonaText
from persona_kernels.utils.errors import check_gamma, fail

__all__ = ["validate_calibration", "validate_texts", "validate_pairs", "validate_method", "model_context_length"]

_FN = "calibrate"
_TOKEN_MODES = ("auto", "all", "response")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_texts(texts_by_persona: Any) -> dict[str, list[PersonaText]]:
    """``{persona: [PersonaText, ...]}`` from the user's ``{persona: [str | PersonaText, ...]}``.

    Refuses a non-mapping, empty or ``/``-containing persona names, a bare string (or any non-list) in place of
    a list of texts, an empty list, and an item that is not a str / PersonaText or holds only whitespace; each
    error names the persona and the item index.
    """
    if not isinstance(texts_by_persona, Mapping):
        fail(_FN, "texts_by_persona", f"expected a {{persona: [texts]}} mapping, got {type(texts_by_persona).__name__}",
             TypeError)
    if not texts_by_persona:
        fail(_FN, "texts_by_persona", "no personas given")
    out: dict[str, list[PersonaText]] = {}
    for name, texts in texts_by_persona.items():
        if not isinstance(name, str) or not name.strip() or "/" in name:
            fail(_FN, "texts_by_persona", f"persona names must be non-empty strings without '/', got {name!r}")
        if isinstance(texts, (str, bytes, PersonaText)):
            fail(_FN, "texts_by_persona", f"persona {name!r}: expected a list of texts, got a single "
                 f"{type(texts).__name__} (it would be calibrated item by item); wrap it in a list: [{name!r}: [text]]",
                 TypeError)
        if not isinstance(texts, Sequence):
            fail(_FN, "texts_by_persona", f"persona {name!r}: expected a list of texts, got {type(texts).__name__}",
                 TypeError)
        if len(texts) == 0:
            fail(_FN, "texts_by_persona", f"persona {name!r} has no texts")
        items = []
        for i, text in enumerate(texts):
            where = f"persona {name!r}, item {i}"
            if isinstance(text, PersonaText):
                item = text
            elif isinstance(text, str):
                if not text.strip():
                    fail(_FN, "texts_by_persona", f"{where}: the text is empty or only whitespace")
                item = PersonaText(text=text)
            else:
                fail(_FN, "texts_by_persona", f"{where}: expected a str or PersonaText, got {type(text).__name__}",
                     TypeError)
            if not item.body.strip():
                fail(_FN, "texts_by_persona", f"{where}: the response is empty or only whitespace")
            items.append(item)
        out[name] = items
    return out


def validate_pairs(pairs: Any, personas: Sequence[str], method: str) -> list[tuple[str, str]]:
    """The pairs as a list of ``(positive, negative)`` tuples; contrastive methods need at least one.

    Each pair must be two different personas that have texts, and a persona may sit in one pair only (a
    second pair would overwrite its mask).
    """
    if pairs is None or (isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)) and len(pairs) == 0):
        if method != "wanda":
            fail(_FN, "pairs", f"method {method!r} needs (positive, negative) persona pairs, got {pairs!r}")
        return []
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        fail(_FN, "pairs", f"expected a list of (positive, negative) tuples, got {type(pairs).__name__}", TypeError)
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            fail(_FN, "pairs", f"item {i}: expected a (positive, negative) pair of persona names, got {pair!r}")
        pos, neg = pair
        for p in (pos, neg):
            if not isinstance(p, str):
                fail(_FN, "pairs", f"item {i}: persona names must be strings, got {p!r}", TypeError)
            if p not in personas:
                fail(_FN, "pairs", f"item {i}: persona {p!r} has no texts (have {list(personas)})")
        if pos == neg:
            fail(_FN, "pairs", f"item {i}: a pair needs two different personas, got ({pos!r}, {neg!r})")
        for p in (pos, neg):
            if p in seen:
                fail(_FN, "pairs", f"item {i}: persona {p!r} is already in pair {seen[p]}; each persona can be in one "
                     "pair only (its mask would be overwritten)")
            seen[p] = i
        out.append((pos, neg))
    return out


def _scoring_fn(method: str) -> Callable:
    from persona_kernels import scoring

    return {"wanda": scoring.wanda, "contrastive_wanda": scoring.contrastive_wanda,
            "contrastive_sparse": scoring.contrastive_sparse}[method]


def validate_method(method: Any, sparsity: Any, method_kwargs: Mapping | None) -> str:
    """Check the method spec (:mod:`persona_kernels.methods` grammar), rho and the method's options by running
    the scoring function on a 2x4 weight; returns the spec's scoring base (``wanda``, ``contrastive_*``).

    The same checks as the real scoring run (Contrastive-Sparse rho <= 0.5 x restrict, tau > 0, phi, statistic,
    activation, unknown option names), so nothing is reported differently after the forwards.
    """
    from persona_kernels import methods

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        fail(_FN, "sparsity", f"expected a float in [0, 1), got {type(sparsity).__name__}", TypeError)
    if not 0.0 <= float(sparsity) < 1.0:  # also NaN
        fail(_FN, "sparsity", f"expected a float in [0, 1), got {sparsity}")
    if method_kwargs is not None and not isinstance(method_kwargs, Mapping):
        fail(_FN, "method_kwargs", f"expected a dict of method options, got {type(method_kwargs).__name__}",
             TypeError)
    tensors = {k: v for k, v in dict(method_kwargs or {}).items() if isinstance(v, torch.Tensor)}
    plain = None if method_kwargs is None else {k: v for k, v in method_kwargs.items() if k not in tensors}
    for arg, overrides in (("method", {}), ("method_kwargs", plain)):  # blame the spec first, then the options
        try:
            spec = methods.resolve(method, overrides)
        except (TypeError, ValueError) as exc:
            fail(_FN, arg, str(exc).replace("persona_kernels.methods: ", ""))
    try:
        spec.check_sparsity(float(sparsity))
    except ValueError as exc:
        fail(_FN, "sparsity", str(exc).replace("persona_kernels.methods: ", ""))
    fn = _scoring_fn(spec.base)
    weight = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, 1.5, -1.0, 2.0]])
    stats_a, stats_b = torch.tensor([1.0, 0.5, 2.0, 0.1]), torch.tensor([0.2, 1.0, 0.3, 2.0])
    probe_sparsity = min(float(sparsity), spec.max_sparsity())
    try:
        if spec.base == "wanda":
            fn(weight, stats_a, probe_sparsity, **spec.scoring_kwargs)
        else:
            fn(weight, stats_a, stats_b, probe_sparsity, **spec.scoring_kwargs)
    except (TypeError, ValueError) as exc:
        detail = str(exc).split(": ", 1)[-1] if str(exc).startswith("persona_kernels.scoring") else str(exc)
        arg = "sparsity" if "'sparsity'" in str(exc) else "method_kwargs"
        raise type(exc)(f"persona_kernels.{_FN}: argument '{arg}': method {method!r}: {detail}") from None
    return spec.base


def model_context_length(model: Any) -> int | None:
    """The longest sequence the model was trained for (``config.max_position_embeddings`` or the like)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if _is_int(value) and value > 0:
            return value
    return None


def _check_lengths(tokenizer: Any, model: Any, texts: Mapping[str, list[PersonaText]], max_length: int) -> None:
    """Error when a text would still be longer than the model context after truncation to ``max_length``;
    a warning (naming persona and item) when a text is longer than the context and will be truncated."""
    context = model_context_length(model)
    if context is None or tokenizer is None or not callable(tokenizer):
        return
    for name, items in texts.items():
        for i, item in enumerate(items):
            raw = (item.prompt + "\n\n" if item.prompt else "") + item.body
            if len(raw.encode("utf-8")) <= min(context, max_length) // 2:  # cannot be long (bounded work)
                continue
            n = len(tokenizer(raw, add_special_tokens=False)["input_ids"])
            if n > context:
                kept = min(n, max_length)
                if kept > context:
                    fail(_FN, "max_length", f"persona {name!r}, item {i}: {n} tokens, truncated to max_length="
                         f"{max_length} still exceeds the model context of {context} tokens; use max_length <= {context}")
                warnings.warn(
                    f"persona_kernels.calibrate: persona {name!r}, item {i}: {n} tokens, longer than the model context "
                    f"of {context}; it is truncated from the left to its last {kept} tokens (max_length={max_length})",
                    stacklevel=3,
                )


def validate_calibration(
    model: Any,
    tokenizer: Any,
    texts_by_persona: Any,
    *,
    method: Any,
    sparsity: Any,
    pairs: Any = None,
    batch_size: Any = 8,
    max_length: Any = 256,
    tokens: Any = "auto",
    method_kwargs: Mapping | None = None,
    default_gamma: Any = 0.0,
) -> None:
    """Every check :func:`persona_kernels.calibrate` can make before its first forward; raises ``ValueError``
    / ``TypeError`` naming the argument (and persona / item for texts) or warns about truncated long texts."""
    if not _is_int(max_length) or max_length <= 0:
        fail(_FN, "max_length", f"expected a positive int (tokens kept per text), got {max_length!r}")
    if not _is_int(batch_size) or batch_size < 1:
        fail(_FN, "batch_size", f"expected a positive int, got {batch_size!r}")
    if not callable(tokens) and tokens not in _TOKEN_MODES:
        fail(_FN, "tokens", f"expected 'auto', 'all', 'response' or a callable, got {tokens!r}")
    check_gamma(_FN, default_gamma, arg="default_gamma")
    base = validate_method(method, sparsity, method_kwargs)
    texts = validate_texts(texts_by_persona)
    validate_pairs(pairs, list(texts), base)
    _check_lengths(tokenizer, model, texts, max_length)
