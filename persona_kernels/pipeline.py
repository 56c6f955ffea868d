"""Calibration pipeline: persona texts -> token batches -> statistics -> scores -> MaskBank.

``calibrate`` is the one-call API; ``persona_stats`` and ``build_bank`` are its two halves, kept
separate so sweeps can compute the statistics once and rebuild masks per sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from persona_kernels.methods import BASES as METHODS  # noqa: F401  (the base method names, kept public)
from persona_kernels.methods import MethodSpec, in_scope, pair_masks, persona_mask, resolve
from persona_kernels.operating_point import DEFAULT as OPERATING_POINT
from persona_kernels.personas import PersonaText, render
from persona_kernels.utils.batching import pad_right
from persona_kernels.utils.devices import model_device
TOKEN_MODES = ("auto", "all", "response")


@dataclass
class EncodedText:
    """One tokenised calibration text and which of its tokens enter the statistics."""

    input_ids: list[int]
    stats_mask: list[bool]


def _as_item(text: PersonaText | str) -> PersonaText:
    if isinstance(text, PersonaText):
        return text
    if isinstance(text, str):
        return PersonaText(text=text)
    raise TypeError(f"persona_kernels.calibrate: expected persona texts as str or PersonaText, got {type(text).__name__}")


def resolve_token_mode(texts: Iterable[PersonaText], tokens: str | Callable) -> str | Callable:
    """Validate ``tokens``. ``"auto"`` stays per item: response tokens for (prompt, response) items, all
    tokens for statements (a statement is entirely the persona's own words)."""
    if callable(tokens):
        return tokens
    if tokens not in TOKEN_MODES:
        raise ValueError(f"persona_kernels.calibrate: argument 'tokens': expected 'auto', 'all', 'response' or a callable, got {tokens!r}")
    return tokens


def encode_texts(
    tokenizer,
    texts: Sequence[PersonaText | str],
    *,
    max_length: int = 256,
    chat_template: bool = True,
    tokens: str | Callable = "auto",
    system_prompt: str | None = None,
) -> list[EncodedText]:
    """Tokenise persona texts and mark the tokens whose activations enter the statistics.

    ``tokens="response"`` keeps only tokens that start at or after the response's first character
    (the prompt still runs through the model as context); a callable gets ``(item, offsets)`` and
    returns one bool per token.
    """
    items = [_as_item(t) for t in texts]
    mode = resolve_token_mode(items, tokens)
    encoded: list[EncodedText] = []
    for item in items:
        full, start = render(item, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
        end = start + len(item.body)  # end-of-turn markers after the response are not persona tokens
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        # too long: cut from the left, so the prompt shortens and the response (at the end) survives
        ids, offsets = list(enc["input_ids"])[-max_length:], list(enc["offset_mapping"])[-max_length:]
        if callable(mode):
            keep = [bool(v) for v in mode(item, offsets)]
            if len(keep) != len(offsets):
                raise ValueError("persona_kernels.calibrate: argument 'tokens': the callable must return one bool per token")
        elif mode == "response" or (mode == "auto" and item.prompt):
            keep = [s >= start and e > s and s < end for s, e in offsets]
        else:
            keep = [True] * len(offsets)
        if not any(keep):
            continue  # nothing of this text survived truncation
        encoded.append(EncodedText(ids, keep))
    return encoded


def iter_batches(encoded: Sequence[EncodedText], batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict]:
    """Right-padded batches with ``attention_mask`` and ``stats_mask`` (bool, padding False)."""
    if batch_size < 1:
        raise ValueError(f"persona_kernels.calibrate: argument 'batch_size': expected >= 1, got {batch_size}")
    # sort by length so padding stays small; statistics do not depend on the order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for b in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[b : b + batch_size]]
        ids, att = pad_right([e.input_ids for e in chunk], pad_id)
        smask = torch.zeros(ids.shape, dtype=torch.bool)
        for r, e in enumerate(chunk):
            smask[r, : len(e.stats_mask)] = torch.tensor(e.stats_mask)
        yield {"input_ids": ids.to(device), "attention_mask": att.to(device), "stats_mask": smask.to(device)}


def persona_stats(
    model: nn.Module,
    tokenizer,
    texts_by_persona: Mapping[str, Sequence[PersonaText | str]],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    chat_template: bool = True,
    tokens: str | Callable = "auto",
    target_modules=None,
    backend: str = "auto",
    progress: bool = True,
    distributed: str | None = None,
) -> tuple[dict[str, dict], dict[str, int]]:
    """Statistics of every targeted Linear's input per persona, and the tokens counted per persona.

    ``distributed="auto"``: when ``torch.distributed`` is initialised with several ranks, each rank takes the
    disjoint shard ``texts[rank::world_size]`` of every persona's texts and the statistics are merged exactly
    across ranks (:func:`persona_kernels.distributed.all_reduce_stats`); every rank returns the full result.
    Collective: call it on every rank with the same arguments. ``None``: this process uses all texts.
    """
    from persona_kernels.calibration import collect_stats

    if not texts_by_persona:
        raise ValueError("persona_kernels.calibrate: argument 'texts_by_persona': no personas given")
    if distributed not in (None, "auto"):
        raise ValueError(f"persona_kernels.calibrate: argument 'distributed': expected None or 'auto', got {distributed!r}")
    rank, world = _dist_rank_world() if distributed == "auto" else (0, 1)
    if world > 1:
        tokens = resolve_token_mode([_as_item(t) for ts in texts_by_persona.values() for t in ts], tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = model_device(model)
    stats: dict[str, dict] = {}
    tokens_seen: dict[str, int] = {}
    for name, texts in texts_by_persona.items():
        if not texts:
            raise ValueError(f"persona_kernels.calibrate: persona {name!r} has no texts")
        if world > 1:
            if len(texts) < world:
                raise ValueError(f"persona_kernels.calibrate: persona {name!r} has {len(texts)} texts, fewer than the "
                                 f"{world} distributed ranks (each rank needs at least one)")
            texts = list(texts)[rank::world]
        encoded = encode_texts(tokenizer, texts, max_length=max_length, chat_template=chat_template, tokens=tokens)
        tokens_seen[name] = sum(sum(e.stats_mask) for e in encoded)
        if world > 1:
            counts = _all_gather_ints(tokens_seen[name])
            if min(counts) == 0:
                raise ValueError(f"persona_kernels.calibrate: persona {name!r}: the shard of some rank kept no "
                                 f"calibration token (tokens per rank: {counts}); use fewer ranks or more texts")
            tokens_seen[name] = sum(counts)
        if not encoded:
            raise ValueError(f"persona_kernels.calibrate: persona {name!r}: no text kept any calibration token")
        batches = list(iter_batches(encoded, batch_size, pad_id, device))
        stats[name] = collect_stats(model, batches, target_modules=target_modules, backend=backend, progress=progress)
        if world > 1:
            from persona_kernels.distributed import all_reduce_stats

            all_reduce_stats(stats[name])  # exact merge, on each module's own device
    return stats, tokens_seen


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_ints(value: int) -> list[int]:
    """One int from every rank (on the collective backend's device: CUDA for nccl, else CPU)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


class _Weights(dict):
    """name -> 2-D weight. Weights offloaded by accelerate (meta device) are read from the module's offload hook
    on access, one module at a time, onto the hook's execution device (never all at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.offloaded: dict[str, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        hook = self.offloaded.get(name)
        if hook is not None:
            return hook.weights_map["weight"].detach().to(torch.device(hook.execution_device))
        return super().__getitem__(name)


def merge_stats(parts: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Merge several ``{module: ActivationStats}`` results (e.g. chunks of one persona's texts) into one.

    Exact (Chan's formula, counts summed). Modules that shared one accumulation in the inputs share one
    merged object in the output.
    """
    from persona_kernels.stats import ActivationStats

    if not parts:
        raise ValueError("persona_kernels.merge_stats: argument 'parts': nothing to merge")
    names = list(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if list(part) != names:
            raise ValueError(f"persona_kernels.merge_stats: argument 'parts': item {i} covers other modules than item 0")
    merged: dict[str, object] = {}
    by_group: dict[tuple[int, ...], object] = {}
    for name in names:
        key = tuple(id(part[name]) for part in parts)
        if key not in by_group:
            by_group[key] = ActivationStats.merge_all([part[name] for part in parts])
        merged[name] = by_group[key]
    return merged


def _linear_weights(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    from persona_kernels.patching import _offload_hook

    modules = dict(model.named_modules())
    out = _Weights()
    for n in names:
        mod = modules[n]
        weight = getattr(mod, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"persona_kernels.calibrate: module {n!r} has no 2-D weight")
        if weight.device.type == "meta":
            hook = _offload_hook(mod)
            if hook is None:
                raise ValueError(f"persona_kernels.calibrate: module {n!r}: weight on the meta device without an "
                                 "accelerate offload hook; load the model with device_map / offloading")
            out.offloaded[n] = hook
        out[n] = weight.detach()
    return out


def build_bank(
    model: nn.Module,
    stats_by_persona: Mapping[str, Mapping[str, object]],
    *,
    method: str | MethodSpec = OPERATING_POINT.method,
    sparsity: float = OPERATING_POINT.sparsity,
    pairs: Sequence[tuple[str, str]] | None = None,
    method_kwargs: Mapping | None = None,
    default_gamma: float = 0.0,
    tokens_seen: Mapping[str, int] | None = None,
    extra_metadata: Mapping | None = None,
    progress: bool = False,
):
    """Score every targeted Linear and pack the keep-masks into a :class:`~persona_kernels.bank.MaskBank`.

    ``method`` is a method spec (:mod:`persona_kernels.methods`, e.g. ``"contrastive_sparse:restrict=0.5,scope=mlp"``);
    ``method_kwargs`` override its options. Modules outside the spec's ``scope`` get no mask (they stay dense).
    The bank's metadata records ``method`` (the base), ``method_spec`` (canonical spec) and ``method_kwargs``.
    """
    from tqdm.auto import tqdm

    from persona_kernels.bank import MaskBank

    try:
        spec = resolve(method, method_kwargs)
    except ValueError as e:
        raise ValueError(f"persona_kernels.calibrate: argument 'method': {e}") from None
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"persona_kernels.calibrate: argument 'sparsity': expected a float in [0, 1), got {sparsity}")
    try:
        spec.check_sparsity(float(sparsity))
    except ValueError as e:
        raise ValueError(f"persona_kernels.calibrate: argument 'sparsity': {e}") from None
    personas = list(stats_by_persona)
    if not spec.contrastive:
        jobs = [(p,) for p in personas]
    else:
        if not pairs:
            raise ValueError(f"persona_kernels.calibrate: argument 'pairs': method {spec.label!r} needs (positive, negative) persona pairs")
        for pos, neg in pairs:
            for p in (pos, neg):
                if p not in stats_by_persona:
                    raise ValueError(f"persona_kernels.calibrate: argument 'pairs': persona {p!r} has no texts (have {personas})")
        jobs = [tuple(p) for p in pairs]
    module_names = list(next(iter(stats_by_persona.values())))
    scoped = [n for n in module_names if in_scope(spec, n)]
    if not scoped:
        raise ValueError(f"persona_kernels.calibrate: argument 'method': scope {spec.scope!r} of {spec.label!r} selects "
                         f"none of the {len(module_names)} calibrated modules (e.g. {module_names[:2]})")
    weights = _linear_weights(model, scoped)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    unit = "pair" if spec.contrastive else "persona"
    for job in tqdm(jobs, desc=f"masks {spec.label} rho={sparsity}", unit=unit, disable=not progress, leave=False):
        for name in scoped:
            w = weights[name]
            if len(job) == 1:
                masks.setdefault(job[0], {})[name] = persona_mask(w, stats_by_persona[job[0]][name], spec, sparsity, packed=True)
            else:
                pos, neg = job
                m_pos, m_neg = pair_masks(w, stats_by_persona[pos][name], stats_by_persona[neg][name], spec, sparsity,
                                          packed=True)
                masks.setdefault(pos, {})[name] = m_pos
                masks.setdefault(neg, {})[name] = m_neg
    options = {k: v for k, v in spec.options.items() if not (k == "scope" and v == "all")}
    metadata = {
        "method": spec.base,
        "method_spec": spec.canonical,
        "sparsity": float(sparsity),
        "method_kwargs": options,
        "pairs": [list(j) for j in jobs] if spec.contrastive else [],
        "tokens_seen": dict(tokens_seen or {}),
        **dict(extra_metadata or {}),
    }
    shapes = {n: tuple(weights[n].shape) for n in scoped}
    bank = MaskBank.from_bool_masks(masks, metadata=metadata, default_gamma=default_gamma, shapes=shapes)
    return bank.record_weights(model)  # lets patch_model tell another checkpoint of this architecture


def calibrate(
    model: nn.Module,
    tokenizer,
    texts_by_persona: Mapping[str, Sequence[PersonaText | str]],
    method: str | MethodSpec = OPERATING_POINT.method,
    sparsity: float = OPERATING_POINT.sparsity,
    pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    *,
    chat_template: bool = True,
    tokens: str | Callable = "auto",
    target_modules=None,
    method_kwargs: Mapping | None = None,
    default_gamma: float = 0.0,
    backend: str = "auto",
    progress: bool = True,
    distributed: str | None = None,
):
    """Calibrate persona masks for ``model`` and return a :class:`~persona_kernels.bank.MaskBank`.

    Args:
        texts_by_persona: persona name -> texts (``str`` or :class:`~persona_kernels.personas.PersonaText`).
        method: a method spec (:mod:`persona_kernels.methods`): ``"wanda"`` (each persona alone),
            ``"contrastive_wanda"`` or ``"contrastive_sparse"`` (pairs), an alias, or options such as
            ``"contrastive_sparse:restrict=0.5,scope=mlp"``. Method, sparsity and (for a bare base name with
            ``method_kwargs=None``) its options default to :data:`persona_kernels.operating_point.DEFAULT`.
        method_kwargs: options applied over the spec's (e.g. ``{"tau": 0.5}``).
        sparsity: fraction of each output row's connections a persona prunes.
        pairs: ``[(positive, negative), ...]`` for the contrastive methods.
        tokens: which tokens enter the statistics: ``"all"``, ``"response"`` (prompt runs as context only),
            a callable ``(item, offsets) -> list[bool]``, or ``"auto"`` (response when all texts are pairs).
        distributed: ``"auto"`` shards the texts over the ``torch.distributed`` ranks and merges the statistics
            exactly (see :func:`persona_stats`); every rank returns the same bank.

    The model is left unchanged (statistics are recorded in a fused forward that is undone afterwards).
    """
    from persona_kernels.validation import validate_calibration

    validate_calibration(model, tokenizer, texts_by_persona, method=method, sparsity=sparsity, pairs=pairs,
                         batch_size=batch_size, max_length=max_length, tokens=tokens, method_kwargs=method_kwargs,
                         default_gamma=default_gamma)  # all that can be checked before the first forward
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"persona_kernels.calibrate: argument 'sparsity': expected a float in [0, 1), got {sparsity}")
    try:
        spec = resolve(method, method_kwargs)  # fail before the forward passes
        spec.check_sparsity(float(sparsity))
    except ValueError as e:
        raise ValueError(f"persona_kernels.calibrate: argument 'method': {e}") from None
    all_items = [_as_item(t) for ts in texts_by_persona.values() for t in ts]
    mode = resolve_token_mode(all_items, tokens)
    stats, seen = persona_stats(
        model, tokenizer, texts_by_persona, batch_size=batch_size, max_length=max_length,
        chat_template=chat_template, tokens=mode, target_modules=target_modules, backend=backend, progress=progress,
        distributed=distributed,
    )
    return build_bank(
        model, stats, method=spec, sparsity=sparsity, pairs=pairs,
        default_gamma=default_gamma, tokens_seen=seen,
        extra_metadata={"tokens": mode if isinstance(mode, str) else "callable", "chat_template": bool(chat_template),
                        "max_length": int(max_length)},
        progress=progress,
    )
