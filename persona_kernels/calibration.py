"""Whole-model calibration: per-input-channel statistics of every targeted ``nn.Linear``'s input.

While recording, each targeted Linear runs :func:`persona_kernels.ops.welford.linear_with_stats` in place
of its forward (the module's ``forward`` is overridden temporarily and restored exactly afterwards, also
when an exception escapes), so the statistics are accumulated on the module's own device inside the
forward pass: no Python hook copies activations to the host and nothing synchronises per layer.

Padding never enters the statistics: the recorder keeps the current batch's token mask (the
``attention_mask`` as bool ``[B, T]``, AND-ed with an optional per-token ``"stats_mask"``, e.g. "response
tokens only") and every Linear whose input is ``[B, T, K]`` uses it.

Linears that read the same tensor (q/k/v projections, gate/up projections) share one accumulation: when
a targeted Linear's input is the very tensor object (same shape, not modified in place) that the
previous recording Linear of the same forward read, it runs a plain ``F.linear`` and its entry in the
result refers to the *same* :class:`~persona_kernels.stats.ActivationStats` object as that Linear's
entry. ``shared_groups`` lists these groups.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_kernels.targeting import TargetSpec, select_linears
from persona_kernels.targeting import is_output_head as _is_output_head
from persona_kernels.utils.devices import model_embedding

__all__ = [
    "StatsRecorder",
    "CalibrationStats",
    "NonFiniteActivationsError",
    "collect_stats",
    "resolve_target_modules",
    "shared_groups",
]

_ON_NONFINITE = ("warn", "raise", "ignore")
STATS_MASK_KEY = "stats_mask"


class NonFiniteActivationsError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"`` when some module inputs held inf/NaN values (``.counts`` maps names)."""

    def __init__(self, message: str, counts: dict[str, int]):
        super().__init__(message)
        self.counts = counts


class CalibrationStats(dict):
    """``{module name: ActivationStats}`` in model order, plus :attr:`shared_groups`.

    Entries of Linears that read the same input tensor are the same object (one accumulation).
    """

    shared_groups: list[list[str]]

    def __init__(self, *args: Any, shared_groups: Optional[list[list[str]]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shared_groups = shared_groups if shared_groups is not None else shared_groups_of(self)


def shared_groups_of(stats: Mapping[str, Any]) -> list[list[str]]:
    """Groups (of two or more names, in mapping order) whose entries are the same statistics object."""
    groups: dict[int, list[str]] = {}
    for name, value in stats.items():
        groups.setdefault(id(value), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


shared_groups = shared_groups_of


# ----------------------------------------------------------------------------------------------- targets
def resolve_target_modules(model: nn.Module, target_modules: TargetSpec = None) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of the ``nn.Linear`` modules selected by ``target_modules``, in model order.

    The grammar and the default (the architecture's preset, else every Linear but the output head) are those of
    :mod:`persona_kernels.targeting`, shared with :func:`persona_kernels.patch_model`.
    """
    return select_linears(model, target_modules, fn="collect_stats")


# ---------------------------------------------------------------------------------------------- recorder
class _StopForward(Exception):
    """Raised inside a forward once every targeted Linear has been recorded (see ``stop_early``)."""


class _Slot:
    """Per-module recording state."""

    __slots__ = ("name", "module", "stats", "leader", "attr", "saved", "had_saved", "warned", "checked", "fast",
                 "wrapper", "wrapped")

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.stats = None  # ActivationStats, created on the first call on the input's device
        self.leader: Optional[_Slot] = None  # set when this Linear reads its leader's input
        self.attr = "forward"
        self.saved: Any = None
        self.had_saved = False
        self.warned = False
        self.checked = None  # (dtype, device, weight dtype) of inputs that passed linear_with_stats' checks
        self.fast: Optional[tuple] = None  # the lean CPU path's (raw op, input dtype, weight dtype), once it applies
        self.wrapper: Optional[Callable] = None  # the recording forward, reused by later contexts ...
        self.wrapped: Any = None  # ... while the forward it wraps is this same one: (attr, function)


def _to_bool_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"persona_kernels.collect_stats: {what}: expected a [B, T] tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"persona_kernels.collect_stats: {what}: expected shape [B, T], got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


class StatsRecorder:
    """Context manager recording per-input-channel statistics of the targeted Linears of ``model``.

    >>> with StatsRecorder(model) as rec:
    ...     rec.run(batch)          # or model(**batch): the attention_mask is picked up automatically
    >>> stats = rec.stats           # CalibrationStats {name: ActivationStats}

    Args:
        model: the model (a Hugging Face causal LM or any ``nn.Module``; its call receives the batch).
        target_modules: which ``nn.Linear`` modules to record, see :func:`resolve_target_modules`.
        backend: kernel backend for :func:`~persona_kernels.ops.welford.linear_with_stats`.
        on_nonfinite: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what to do on leaving the
            context when inf/NaN inputs were excluded from some module's statistics.
        share_inputs: let Linears that read the same tensor share one accumulation (default True).
        skip_logits: in :meth:`run`, pass ``logits_to_keep=1`` and ``use_cache=False`` when the model's forward
            takes them and the batch does not set them (calibration needs no logits nor KV cache); never when
            the output head itself is recorded.
        stop_early: in :meth:`run`, end each forward as soon as every targeted Linear has been recorded (the
            last one's product, the rest of the network and the output head are skipped; ``run`` then returns
            None). It is learnt from the first forward, which runs whole: it applies only when every targeted
            Linear ran exactly once there, the last one is reached again after all the others, and no module
            carries an accelerate hook (their offload steps must run). Off by default; ``collect_stats``
            turns it on.

    Calling the model directly inside the context uses its ``attention_mask`` keyword (2-D) as the token
    mask, unless :meth:`set_token_mask` set one. Statistics persist across contexts of the same recorder.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: TargetSpec = None,
        *,
        backend: str = "auto",
        on_nonfinite: str = "warn",
        share_inputs: bool = True,
        skip_logits: bool = True,
        stop_early: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"persona_kernels.StatsRecorder: argument 'model': expected an nn.Module, got {type(model).__name__}"
            )
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(
                f"persona_kernels.StatsRecorder: argument 'on_nonfinite': expected one of {_ON_NONFINITE}, "
                f"got {on_nonfinite!r}"
            )
        if not isinstance(backend, str):
            raise TypeError(f"persona_kernels.StatsRecorder: argument 'backend': expected a string, got {backend!r}")
        from persona_kernels.ops import welford  # noqa: F401  (fail early if the kernels are missing)

        self.model = model
        self.backend = backend
        self.on_nonfinite = on_nonfinite
        self.share_inputs = bool(share_inputs)
        self._slots = [_Slot(n, m) for n, m in resolve_target_modules(model, target_modules)]
        self._extra_kwargs = _calibration_kwargs(model, self._slots) if skip_logits else {}
        self._installed = False
        self._handles: list[Any] = []
        self._explicit_mask: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._reset_forward_state()  # the per-forward caches and the last recorded input
        # early stop: None = not learnt yet, False = never, else the slot whose recording ends a forward
        hooked = any(hasattr(m, "_hf_hook") for m in model.modules())
        self._terminal: Any = None if (stop_early and not hooked) else False
        self._in_run = False
        self._called: list[_Slot] = []  # slots called in the current forward (order of the first calls)

    # -- public ---------------------------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        """Names of the targeted Linears, in model order."""
        return [s.name for s in self._slots]

    @property
    def stats(self) -> CalibrationStats:
        """``{name: ActivationStats}`` of the targeted Linears that have run (shared entries are one object)."""
        return CalibrationStats((s.name, s.stats) for s in self._slots if s.stats is not None)

    @property
    def shared_groups(self) -> list[list[str]]:
        """Lists of module names sharing one accumulation (leader first), in model order."""
        return shared_groups_of(self.stats)

    def set_token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Use ``mask`` (bool or 0/1 ``[B, T]``; True = record the token) for the following forwards.

        ``None`` returns to the default: the ``attention_mask`` the model is called with, else every token.
        """
        self._explicit_mask = None if mask is None else _to_bool_mask(mask, "token mask")

    def run(self, batch: Union[torch.Tensor, Mapping[str, Any]], device: Optional[torch.device] = None) -> Any:
        """Call the model on one batch under ``torch.no_grad()`` and return its output.

        ``batch`` is a tensor of input ids or a mapping with ``input_ids`` / ``attention_mask`` (padded) and an
        optional ``"stats_mask"`` ``[B, T]`` (recorded tokens, AND-ed with the attention mask; it is not passed
        to the model). Tensors are moved to ``device`` when given.
        """
        if not self._installed:
            raise RuntimeError(
                "persona_kernels.StatsRecorder.run: the recorder is not active; use it as a context manager"
            )
        args, kwargs, mask = _split_batch(batch, device)
        for key, value in self._extra_kwargs.items():
            kwargs.setdefault(key, value)
        previous = self._explicit_mask
        self._explicit_mask = mask
        self._in_run = True
        try:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        except _StopForward:
            return None
        finally:
            self._in_run = False
            self._explicit_mask = previous

    def nonfinite_counts(self) -> dict[str, int]:
        """``{name of a recording Linear: values excluded as inf/NaN}`` for modules with a nonzero count.

        Synchronises once per device (call it after the run, not per batch)."""
        leaders = [s for s in self._slots if s.stats is not None and s.leader is None]
        counts: dict[str, int] = {}
        by_device: dict[torch.device, list[tuple[_Slot, torch.Tensor]]] = {}
        for s in leaders:
            count = s.stats.nonfinite  # a 0-d int64 tensor
            by_device.setdefault(count.device, []).append((s, count))
        for pairs in by_device.values():
            values = torch.stack([count for _, count in pairs]).cpu().tolist()
            counts.update({s.name: int(v) for (s, _), v in zip(pairs, values) if v})
        order = {s.name: i for i, s in enumerate(self._slots)}
        return dict(sorted(counts.items(), key=lambda kv: order[kv[0]]))

    def check_nonfinite(self, on_nonfinite: Optional[str] = None) -> dict[str, int]:
        """Warn about / raise on inf/NaN inputs per module (``on_nonfinite`` defaults to the recorder's)."""
        mode = on_nonfinite or self.on_nonfinite
        if mode not in _ON_NONFINITE:
            raise ValueError(
                f"persona_kernels.StatsRecorder: argument 'on_nonfinite': expected one of {_ON_NONFINITE}, got {mode!r}"
            )
        if mode == "ignore":
            return {}
        counts = self.nonfinite_counts()
        if counts:
            followers: dict[str, list[str]] = {}
            for s in self._slots:
                if s.leader is not None:
                    followers.setdefault(s.leader.name, []).append(s.name)
            parts = []
            for name, n in counts.items():
                also = f" (shared with {', '.join(followers[name])})" if name in followers else ""
                parts.append(f"{name}{also}: {n}")
            msg = (
                f"persona_kernels.collect_stats: non-finite (inf/NaN) input values were excluded from the statistics "
                f"of {len(counts)} module(s): " + "; ".join(parts)
            )
            if mode == "raise":
                raise NonFiniteActivationsError(msg, counts)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return counts

    # -- context --------------------------------------------------------------------------------------
    def __enter__(self) -> "StatsRecorder":
        if self._installed:
            raise RuntimeError("persona_kernels.StatsRecorder: the recorder is already active (not re-entrant)")
        try:
            for slot in self._slots:
                self._install(slot)
            self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post_forward, always_call=True))
        except BaseException:
            self._uninstall()
            raise
        self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._uninstall()
        if exc_type is None:
            self.check_nonfinite()

    def close(self) -> None:
        """Restore the model (same as leaving the context, without the non-finite check)."""
        self._uninstall()

    # -- internals ------------------------------------------------------------------------------------
    def _install(self, slot: _Slot) -> None:
        module = slot.module
        # Accelerate hooks (device_map / offload) wrap ``forward`` and call ``_old_forward`` after moving the
        # weights and inputs: override the inner one so those hooks keep running.
        slot.attr = "_old_forward" if ("_old_forward" in module.__dict__ and hasattr(module, "_hf_hook")) else "forward"
        slot.had_saved = slot.attr in module.__dict__
        slot.saved = module.__dict__.get(slot.attr)
        original = getattr(module, slot.attr)
        wrapped = (slot.attr, getattr(original, "__func__", original))
        if slot.wrapper is None or slot.wrapped != wrapped:
            if slot.attr == "forward":  # an instance-level forward of the user's is called as it is
                fused = not slot.had_saved and type(module).forward is nn.Linear.forward
            else:
                fused = wrapped[1] is nn.Linear.forward
            slot.wrapper, slot.wrapped = self._make_forward(slot, original, fused), wrapped
            slot.fast = None  # the lean path belongs to the replaced wrapper's forward
        # a plain function attribute (not a parameter, buffer or submodule): nn.Module.__setattr__'s
        # bookkeeping has nothing to do, so the instance dict is written directly (~5 us per Linear)
        module.__dict__[slot.attr] = slot.wrapper

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for slot in self._slots:
            module = slot.module
            if slot.had_saved:
                module.__dict__[slot.attr] = slot.saved
            else:
                module.__dict__.pop(slot.attr, None)
            slot.saved = None
            slot.had_saved = False
        self._installed = False
        self._reset_forward_state()
        self._mask = None

    def _reset_forward_state(self) -> None:
        self._fast_lead: Optional[torch.Size] = None  # the lean path's mask and sequence length are for this shape
        self._fast_mask: Optional[torch.Tensor] = None
        self._fast_seq = 0
        self._last_input: Optional[torch.Tensor] = None
        self._last_slot: Optional[_Slot] = None
        self._last_version = -1
        self._mask_cache: dict[Any, torch.Tensor] = {}

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._reset_forward_state()
        self._called = []
        mask = self._explicit_mask
        if mask is None:
            am = kwargs.get("attention_mask")
            if isinstance(am, torch.Tensor) and am.dim() == 2:
                mask = _to_bool_mask(am, "attention_mask")
        self._mask = mask

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._terminal is None and self._in_run:
            # a forward ran whole: learn where the next ones may stop (dense models: each Linear ran once)
            once = len(self._called) == len(self._slots) and len(set(map(id, self._called))) == len(self._slots)
            self._terminal = self._called[-1] if once else False
        self._called = []
        self._reset_forward_state()
        self._mask = None

    def _mask_for(self, slot: _Slot, x: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._mask
        if mask is None:
            return None
        lead = x.shape[:-1]
        key = (x.device, lead)
        cached = self._mask_cache.get(key)
        if cached is not None:
            return cached
        if lead == mask.shape:
            m = mask
        elif len(lead) == 2 and lead[0] == mask.shape[0] and lead[1] < mask.shape[1]:
            m = mask[:, mask.shape[1] - lead[1]:]  # incremental decoding: the mask covers the cached tokens too
        elif len(lead) == 1 and lead[0] == mask.numel():
            m = mask.reshape(-1)
        else:
            if not slot.warned:
                slot.warned = True
                warnings.warn(
                    f"persona_kernels.collect_stats: input of {slot.name} has shape {tuple(x.shape)}, which does not "
                    f"fit the token mask {tuple(mask.shape)}; recording all its tokens",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        if m.device != x.device:
            m = m.to(x.device, non_blocking=True)
        self._mask_cache[key] = m
        return m

    def _record_only(self, slot: _Slot, input: torch.Tensor) -> None:
        """Record ``input`` into ``slot``'s statistics without computing the Linear (the forward stops here)."""
        from persona_kernels.ops.welford import welford_update

        if slot.leader is not None:
            return  # the leader has recorded this same input
        welford_update(slot.stats, input.detach(), self._mask_for(slot, input), backend=self.backend)

    def _set_lean_layout(self, slot: _Slot, x: torch.Tensor, lead: torch.Size) -> None:
        """The flat row mask and sequence length the lean path passes for inputs with leading shape ``lead``
        (computed once per forward and shape)."""
        mask = self._mask_for(slot, x)
        self._fast_mask = None if mask is None else mask.reshape(-1)
        self._fast_seq = int(lead[-1]) if len(lead) >= 2 else 0
        self._fast_lead = lead

    def _make_forward(self, slot: _Slot, original: Callable, fused: bool) -> Callable:
        from persona_kernels.ops.welford import (_linear_with_stats_checked, _one_call_cpu_merge, linear_with_stats,
                                                 welford_update)
        from persona_kernels.stats import ActivationStats

        rec = self
        module = slot.module
        cls = type(module)
        # ``module.weight``/``module.bias`` read from the parameter dict directly (nn.Module.__getattr__ is a
        # Python call per read) while they are plain entries of it and the module's class is unchanged
        params = module._parameters if fused and _plain_weight_and_bias(module) else None
        grad_enabled = torch.is_grad_enabled
        compiling = torch.compiler.is_compiling

        def forward(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # Hot paths first (followers, then leaders on the CPU): they run on every Linear call, so they are
            # inline, call no Python helper and reach the C++ op without the dispatcher.
            if args or kwargs or not isinstance(input, torch.Tensor):
                return original(input, *args, **kwargs)
            if rec._in_run and rec._terminal is not False:
                rec._called.append(slot)
                # the learnt last Linear, and every other one already ran in this forward: record, then stop
                if slot is rec._terminal and len({id(s) for s in rec._called}) == len(rec._slots):
                    rec._record_only(slot, input)
                    raise _StopForward
                if slot is rec._terminal:
                    rec._terminal = False  # this forward took another path: always run whole from now on
            weight = params.get("weight") if params is not None and type(module) is cls else None
            if weight is None:
                weight, bias = module.weight, module.bias
            else:
                bias = params.get("bias")
            last = rec._last_input
            if input is last:
                # a follower: same tensor as the previous recording Linear, whose statistics it shares
                if slot.leader is not None and slot.leader is rec._last_slot and input._version == rec._last_version:
                    return F.linear(input, weight, bias) if fused else original(input)
            else:
                lean = slot.fast
                if (lean is not None and input.dtype is lean[1] and weight.dtype is lean[2] and input.is_cpu
                        and weight.is_cpu and not (grad_enabled() and (input.requires_grad or weight.requires_grad or
                                                                       (bias is not None and bias.requires_grad)))
                        and not compiling()):
                    # a leader on the CPU after its first checked call: GEMM + statistics + merge in one C++ call
                    lead = input.shape[:-1]
                    if lead != rec._fast_lead:
                        rec._set_lean_layout(slot, input, lead)
                    stats = slot.stats
                    y = lean[0](input.reshape(-1, input.shape[-1]), weight, bias, rec._fast_mask, rec._fast_seq,
                                stats._n, stats._mean, stats._m2, stats._nonfinite)
                    rec._last_input = input
                    rec._last_version = input._version
                    rec._last_slot = slot
                    return y.view(lead + y.shape[-1:])
            # general path: first calls, sharing set-up, other devices and dtypes, autograd, compiling
            if input is last and rec.share_inputs and input._version == rec._last_version:
                leader = rec._last_slot
                if slot.stats is None:  # first call: join the leader's accumulation
                    slot.leader = leader
                    slot.stats = leader.stats
                if slot.leader is leader:
                    return F.linear(input, weight, bias) if fused else original(input)
            if slot.leader is not None:
                raise RuntimeError(
                    f"persona_kernels.collect_stats: {slot.name} read the same input as {slot.leader.name} in an "
                    "earlier forward but not in this one, so their shared statistics cannot stay exact; "
                    "record with share_inputs=False"
                )
            if slot.stats is None:
                slot.stats = ActivationStats(input.shape[-1], device=input.device)
            if input is not last:
                rec._last_input = input
                rec._last_version = input._version
                rec._last_slot = slot
            if fused and not (grad_enabled() and (input.requires_grad or weight.requires_grad or
                                                 (bias is not None and bias.requires_grad))):
                # the argument checks run on a module's first call; later calls with inputs of the same dtype
                # and device (the recorder builds the mask itself) skip them
                if slot.checked is not None and slot.checked == (input.dtype, input.device, weight.dtype):
                    return _linear_with_stats_checked(input, weight, bias, slot.stats, rec._mask_for(slot, input),
                                                      rec.backend)
                y = linear_with_stats(input, weight, bias, slot.stats, rec._mask_for(slot, input), backend=rec.backend)
                slot.checked = (input.dtype, input.device, weight.dtype)
                if slot.fast is None and not compiling():
                    op = _one_call_cpu_merge(input, slot.stats, rec.backend)
                    if op is not None:  # the lean path's plan: the raw op and the dtypes of this checked call
                        slot.fast = (op, input.dtype, weight.dtype)
                return y
            mask = rec._mask_for(slot, input)
            welford_update(slot.stats, input.detach(), mask, backend=rec.backend)
            return F.linear(input, weight, bias) if fused else original(input)

        forward.__wrapped__ = original  # type: ignore[attr-defined]
        return forward


def _plain_weight_and_bias(module: nn.Module) -> bool:
    """``module.weight`` and ``module.bias`` are the entries of ``module._parameters`` (no instance attribute or
    class-level descriptor, e.g. a parametrization, shadows them)."""
    names = {"weight", "bias"}
    return (names <= module._parameters.keys() and not names & module.__dict__.keys()
            and not any(names & vars(c).keys() for c in type(module).__mro__))


# ------------------------------------------------------------------------------------------------ batches
def _calibration_kwargs(model: nn.Module, slots: list[_Slot]) -> dict[str, Any]:
    """Keyword arguments that skip the logits and the KV cache, if the model's forward names them."""
    head = model_embedding(model, "output")
    if any(_is_output_head(s.name, s.module, head) for s in slots):
        return {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    wanted = {"logits_to_keep": 1, "use_cache": False}
    return {k: v for k, v in wanted.items() if k in params and params[k].kind != inspect.Parameter.VAR_KEYWORD}


def _split_batch(
    batch: Union[torch.Tensor, Mapping[str, Any]], device: Optional[torch.device]
) -> tuple[tuple, dict[str, Any], Optional[torch.Tensor]]:
    """``(model args, model kwargs, token mask or None)`` for one batch (the ``stats_mask`` key is removed)."""
    if isinstance(batch, torch.Tensor):  # input ids (or any single input), passed positionally
        return ((batch.to(device, non_blocking=True) if device is not None else batch),), {}, None
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
    else:
        raise TypeError(
            "persona_kernels.collect_stats: argument 'batches': each batch must be a tensor of input ids or a mapping "
            f"(input_ids, attention_mask, optional stats_mask); got {type(batch).__name__}"
        )
    if device is not None:
        kwargs = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    stats_mask = kwargs.pop(STATS_MASK_KEY, None)
    ids = kwargs.get("input_ids")
    attention = kwargs.get("attention_mask")
    mask = None
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        mask = _to_bool_mask(attention, "batch['attention_mask']")
    if stats_mask is not None:
        sm = _to_bool_mask(stats_mask, f"batch[{STATS_MASK_KEY!r}]")
        ref = ids if isinstance(ids, torch.Tensor) else attention
        if isinstance(ref, torch.Tensor) and tuple(sm.shape) != tuple(ref.shape[:2]):
            raise ValueError(
                f"persona_kernels.collect_stats: batch[{STATS_MASK_KEY!r}]: expected shape {tuple(ref.shape[:2])} "
                f"(that of input_ids), got {tuple(sm.shape)}"
            )
        mask = sm if mask is None else (sm & mask.to(sm.device))
    return (), kwargs, mask


def _input_device(model: nn.Module) -> Optional[torch.device]:
    """Device of the input embeddings (None when unknown, meta/offloaded, or the model is dispatched)."""
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return None  # accelerate's hooks move inputs
    param = getattr(model_embedding(model, "input"), "weight", None)
    if param is None:
        param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    return param.device


def collect_stats(
    model: nn.Module,
    batches: Iterable[Union[torch.Tensor, Mapping[str, Any]]],
    target_modules: TargetSpec = None,
    *,
    backend: str = "auto",
    token_mask_fn: Optional[Callable[[Any], Optional[torch.Tensor]]] = None,
    on_nonfinite: str = "warn",
    progress: bool = True,
    share_inputs: bool = True,
    skip_logits: bool = True,
    stop_early: bool = True,
) -> CalibrationStats:
    """Run ``model`` over ``batches`` (under ``torch.no_grad()``, in eval mode) and return the statistics.

    Args:
        model: the model; called as ``model(**batch)`` (a tensor batch is passed positionally as the input ids).
        batches: any iterable of tensors of input ids or mappings with ``input_ids``, ``attention_mask``
            (padded; padding tokens never enter the statistics) and optionally ``"stats_mask"`` [B, T]
            (only those tokens are recorded; not passed to the model).
        target_modules: see :func:`resolve_target_modules` (default: every nn.Linear but the LM head).
        backend: kernel backend of the fused linear + statistics op.
        token_mask_fn: optional ``batch -> [B, T] mask or None`` used instead of the batch's ``stats_mask``
            (still AND-ed with the attention mask).
        on_nonfinite: ``"warn"``, ``"raise"`` (:class:`NonFiniteActivationsError`, naming the modules, after
            the last batch) or ``"ignore"`` for inputs holding inf/NaN (excluded from the statistics).
        progress: show a tqdm progress bar over the batches.
        share_inputs: Linears reading the same tensor share one ActivationStats object.
        skip_logits: pass ``logits_to_keep=1, use_cache=False`` when the model takes them (see StatsRecorder).
        stop_early: end each forward after the last targeted Linear's input is recorded (see StatsRecorder;
            the statistics are the same, the rest of the network is not computed).

    Returns:
        :class:`CalibrationStats`: ``{module name: ActivationStats}`` in model order; each lives on its module's
        device; names in one entry of ``.shared_groups`` map to the same object.
    """
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(
            f"persona_kernels.collect_stats: argument 'on_nonfinite': expected one of {_ON_NONFINITE}, "
            f"got {on_nonfinite!r}"
        )
    if token_mask_fn is not None and not callable(token_mask_fn):
        raise TypeError(
            f"persona_kernels.collect_stats: argument 'token_mask_fn': expected a callable, got {token_mask_fn!r}"
        )
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            "persona_kernels.collect_stats: argument 'batches': expected an iterable of batches (a list of tensors or "
            f"of dicts), got {type(batches).__name__}; wrap a single batch in a list"
        )
    recorder = StatsRecorder(model, target_modules, backend=backend, on_nonfinite=on_nonfinite,
                             share_inputs=share_inputs, skip_logits=skip_logits, stop_early=stop_early)
    device = _input_device(model)
    training = {m: m.training for m in model.modules()}
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        iterator = tqdm(batches, total=total, desc="calibration", unit="batch")
    model.eval()
    try:
        with recorder:
            for batch in iterator:
                if token_mask_fn is not None:
                    custom = token_mask_fn(batch)
                    if isinstance(batch, torch.Tensor):
                        batch = {"input_ids": batch}
                    batch = {k: v for k, v in batch.items() if k != STATS_MASK_KEY}
                    if custom is not None:
                        batch[STATS_MASK_KEY] = custom
                recorder.run(batch, device)
    finally:
        for m, flag in training.items():
            m.training = flag
        if progress and hasattr(iterator, "close"):
            iterator.close()
    stats = recorder.stats
    missing = [n for n in recorder.module_names if n not in stats]
    if missing:
        warnings.warn(
            f"persona_kernels.collect_stats: {len(missing)} targeted module(s) never ran, no statistics for: "
            + ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else ""),
            RuntimeWarning,
            stacklevel=2,
        )
    return stats
