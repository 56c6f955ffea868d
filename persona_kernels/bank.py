"""MaskBank: persona -> module -> bit-packed keep-mask, saved as one safetensors file.

In memory and on disk a mask costs 1 bit per weight: int32 ``[N, ceil(K/32)]`` words as produced by
:func:`persona_kernels.pack_mask` (padding bits zero). The file holds one tensor per (persona, module),
named ``"<persona>/<module>"``, and in the safetensors header metadata:

- ``persona_kernels.mask_bank``: JSON with ``format_version``, ``package_version``, ``fingerprint``,
  ``personas``, ``modules`` (``{name: [N, K]}``) and the user ``metadata`` (method, sparsity, method
  options, ``tokens_seen`` per persona, ``default_gamma``, composites, ...);
- ``persona_kernels.payload_sha256``: sha256 over every tensor (sorted by name: name, shape, bytes);
- ``persona_kernels.header_sha256``: sha256 of the JSON above.

Loading checks all of it (format version, checksums, tensor names, dtypes, shapes, zero padding bits,
fingerprint) and refuses a damaged or foreign file with a :class:`MaskBankError` naming the file.
Writes are atomic (temporary file in the same folder + ``os.replace``). No pickle is ever used.
"""

from __future__ import annotations

import copy
import hashlib
import math
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from persona_kernels.ops.packing import packed_words
from persona_kernels.utils.atomic import atomic_write
from persona_kernels.utils.errors import check_gamma, message

__all__ = ["MaskBank", "MaskBankError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_KEY_JSON = "persona_kernels.mask_bank"
_KEY_PAYLOAD = "persona_kernels.payload_sha256"
_KEY_HEADER = "persona_kernels.header_sha256"

Shape = tuple  # (N, K)


class MaskBankError(ValueError):
    """A mask bank file (or its contents) is invalid, damaged, or built for another model."""


def _err(arg: str, msg: str) -> str:
    return f"persona_kernels.MaskBank: argument '{arg}': {msg}"


def check_persona_name(fn: str, name: Any, arg: str = "name") -> str:
    """The one persona-name rule (banks and patched models): a non-empty str without '/' (the file's key separator)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(message(fn, f"expected a non-empty persona name without '/', got {name!r}", arg))
    return name


#: Weight sample recorded in new banks: up to this many modules, rows and columns per module.
_SAMPLE_MODULES, _SAMPLE_ROWS, _SAMPLE_COLS = 16, 3, 8
#: Two values are the same weight when they agree to bf16 precision (any dtype of one checkpoint passes).
_SAMPLE_RTOL, _SAMPLE_ATOL = 2.0**-7, 1e-6


def _sample_positions(n: int, k: int) -> tuple[list[int], list[int]]:
    rows = sorted({min(n - 1, (i * n) // _SAMPLE_ROWS) for i in range(_SAMPLE_ROWS)}) if n else []
    cols = sorted({min(k - 1, (j * k) // _SAMPLE_COLS) for j in range(_SAMPLE_COLS)}) if k else []
    return rows, cols


def _sampled_values(weight: torch.Tensor) -> list[float]:
    rows, cols = _sample_positions(*weight.shape)
    if not rows or not cols:
        return []
    w = weight.detach()
    idx_r = torch.tensor(rows, device=w.device)
    idx_c = torch.tensor(cols, device=w.device)
    return w.index_select(0, idx_r).index_select(1, idx_c).float().cpu().reshape(-1).tolist()


def _model_weights(model: Any) -> dict[str, torch.Tensor]:
    """``{name: 2-D weight}`` of a model's Linear-like modules, or the mapping itself when given one."""
    if isinstance(model, Mapping):
        return {str(n): w for n, w in model.items() if isinstance(w, torch.Tensor)}
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            out[name] = w
    return out


def _package_version() -> str:
    try:
        from persona_kernels import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def _padding_ok(packed: torch.Tensor, k: int) -> bool:
    """True when the bits past ``k`` in the last word of every row are 0."""
    rem = k % 32
    if rem == 0 or packed.numel() == 0:
        return True
    high = (~((1 << rem) - 1)) & 0xFFFFFFFF
    high = high - (1 << 32) if high >= 1 << 31 else high
    return not bool((packed[:, -1] & high).any())


def _payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(key.encode("utf-8") + b"\0")
        h.update(struct.pack("<" + "q" * t.dim(), *t.shape))
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _shape_of(value: Any, name: str) -> Shape:
    if isinstance(value, torch.Tensor):
        value = tuple(value.shape)
    try:
        n, k = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(_err("model", f"module {name!r}: expected an (N, K) shape, got {value!r}")) from None
    if n < 0 or k < 0:
        raise ValueError(_err("model", f"module {name!r}: negative shape {(n, k)}"))
    return (n, k)


def _linear_shapes(model: Any) -> dict[str, Shape]:
    """``{name: (out_features, in_features)}`` of every Linear-like module (2-D ``weight``) of a model."""
    if isinstance(model, Mapping):
        return {str(name): _shape_of(v, str(name)) for name, v in model.items()}
    if not hasattr(model, "named_modules"):
        raise TypeError(_err("model", f"expected an nn.Module or a {{name: (N, K)}} mapping, got {type(model).__name__}"))
    shapes: dict[str, Shape] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or (
            isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
        ):
            shapes[name] = (int(module.out_features), int(module.in_features))
    return shapes


def _fingerprint(shapes: Mapping[str, Shape]) -> str:
    items = sorted([name, int(n), int(k)] for name, (n, k) in shapes.items())
    blob = json.dumps(items, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _to_bool(value: Any, where: str) -> torch.Tensor:
    """A 0/1 mask of any dtype as bool (used when importing foreign files)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"persona_kernels.MaskBank: {where}: expected a tensor, got {type(value).__name__}")
    if value.dtype == torch.bool:
        return value
    if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"persona_kernels.MaskBank: {where}: expected a bool (or 0/1) mask, got {value.dtype} values")
    return value != 0


def _parse_header(header: Any):
    """The validated parts of a bank file's JSON header (ValueError / TypeError / KeyError naming the bad field)."""
    if not isinstance(header, dict):
        raise TypeError(f"expected a JSON object, got {type(header).__name__}")

    def typed(value: Any, kind: type, what: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise TypeError(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    shapes: dict[str, Shape] = {}
    for entry in typed(header["modules"], list, "modules"):
        name, n, k = typed(entry, list, "modules entry")
        typed(name, str, "module name")
        if not name or name in shapes:
            raise ValueError(f"module name {name!r} is empty or repeated")
        if typed(n, int, f"{name} N") < 0 or typed(k, int, f"{name} K") < 0:
            raise ValueError(f"module {name!r}: negative shape {(n, k)}")
        shapes[name] = (n, k)
    personas = [check_persona_name("MaskBank.load", typed(p, str, "persona"), "personas")
                for p in typed(header["personas"], list, "personas")]
    if len(set(personas)) != len(personas):
        raise ValueError("repeated persona names")
    persona_modules = {}
    for p, ms in typed(header["persona_modules"], dict, "persona_modules").items():
        if p not in personas:
            raise ValueError(f"persona_modules names unknown persona {p!r}")
        persona_modules[p] = [typed(m, str, "module name") for m in typed(ms, list, f"persona_modules[{p!r}]")]
    user_meta = typed(header.get("metadata", {}), dict, "metadata")
    check_gamma("MaskBank.load", user_meta.get("default_gamma", 0.0), arg="metadata.default_gamma")
    for p, t in typed(user_meta.get("tokens_seen", {}), dict, "metadata.tokens_seen").items():
        if typed(t, int, f"tokens_seen[{p!r}]") < 0:
            raise ValueError(f"tokens_seen[{p!r}] is negative")
    stored_fp = typed(header["fingerprint"], str, "fingerprint")
    sample = header.get("weight_sample")
    if sample is not None:
        typed(sample, dict, "weight_sample")
        mods = [typed(m, str, "weight_sample module") for m in typed(sample.get("modules"), list, "weight_sample.modules")]
        values = typed(sample.get("values"), list, "weight_sample.values")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("weight_sample.values: expected finite numbers")
        sample = {"modules": mods, "values": [float(v) for v in values]}
    return shapes, personas, persona_modules, user_meta, stored_fp, sample


class MaskBank:
    """Persona -> module -> bit-packed int32 keep-mask, plus JSON metadata.

    Args:
        metadata: free-form JSON-serialisable dict. Conventional keys: ``method``, ``sparsity``,
            ``method_kwargs`` (statistic options), ``pairs``, ``tokens_seen`` ({persona: int}).
        default_gamma: soft-gate value for pruned weights used when a persona is switched on without
            an explicit gamma (0 = hard mask).
    """

    def __init__(self, metadata: Mapping[str, Any] | None = None, *, default_gamma: float = 0.0) -> None:
        self._masks: dict[str, dict[str, torch.Tensor]] = {}
        self._shapes: dict[str, Shape] = {}
        self.metadata: dict[str, Any] = copy.deepcopy(dict(metadata or {}))
        if "default_gamma" not in self.metadata or default_gamma:
            self.default_gamma = default_gamma
        else:
            self.default_gamma = self.metadata["default_gamma"]  # validated like the setter
        #: Sampled weight values of the model the bank was built for (see :meth:`record_weights`), or None.
        self.weight_sample: dict[str, Any] | None = None
        self.saved_with: dict[str, Any] | None = None  # package/format version of the file it was loaded from

    # ------------------------------------------------------------------ basic accessors

    @property
    def default_gamma(self) -> float:
        return float(self.metadata.get("default_gamma", 0.0))

    @default_gamma.setter
    def default_gamma(self, value: float) -> None:
        self.metadata["default_gamma"] = check_gamma("MaskBank", value, arg="default_gamma")

    @property
    def personas(self) -> list[str]:
        return list(self._masks)

    @property
    def module_names(self) -> list[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, Shape]:
        """``{module: (N, K)}`` of the weights the masks apply to."""
        return dict(self._shapes)

    @property
    def fingerprint(self) -> str:
        """Hash of the (module name, N, K) list; equals ``model_fingerprint(model, bank.module_names)``."""
        return _fingerprint(self._shapes)

    @property
    def method(self) -> str | None:
        return self.metadata.get("method")

    @property
    def sparsity(self) -> float | None:
        return self.metadata.get("sparsity")

    @property
    def tokens_seen(self) -> dict[str, int]:
        return dict(self.metadata.get("tokens_seen", {}))

    @property
    def composites(self) -> dict[str, dict[str, Any]]:
        return dict(self.metadata.get("composites", {}))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for m in self._masks.values() for t in m.values())

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, persona: object) -> bool:
        return persona in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._masks))

    def __repr__(self) -> str:
        weights = sum(n * k for n, k in self._shapes.values())
        shown = ", ".join(repr(p) for p in self.personas[:6]) + (", ..." if len(self._masks) > 6 else "")
        extras = []
        for key in ("method", "sparsity"):
            if self.metadata.get(key) is not None:
                extras.append(f"{key}={self.metadata[key]!r}")
        extras.append(f"default_gamma={self.default_gamma:g}")
        devices = sorted({str(t.device) for m in self._masks.values() for t in m.values()}) or ["cpu"]
        return (
            f"MaskBank({len(self._masks)} personas [{shown}], {len(self._shapes)} modules, "
            f"{weights / 1e6:.2f}M weights per persona, {', '.join(extras)}, "
            f"{self.nbytes / 2**20:.2f} MiB packed on {'/'.join(devices)}, fingerprint={self.fingerprint})"
        )

    def _check_persona(self, persona: Any) -> None:
        if persona not in self._masks:
            raise KeyError(f"persona_kernels.MaskBank: unknown persona {persona!r}; the bank has {self.personas}")

    def get(self, persona: str, module: str) -> torch.Tensor | None:
        """Packed int32 ``[N, ceil(K/32)]`` mask, or None when ``persona`` has no mask for ``module``.

        Raises KeyError for an unknown persona or a module the bank knows nothing about.
        """
        self._check_persona(persona)
        if module not in self._shapes:
            raise KeyError(f"persona_kernels.MaskBank: unknown module {module!r} (the bank has {len(self._shapes)} modules)")
        return self._masks[persona].get(module)

    def masks(
        self,
        persona: str,
        device: torch.device | str | None = None,
        device_map: Mapping[str, torch.device | str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{module: packed int32 mask}`` of one persona, optionally moved to ``device`` or, per module,
        to ``device_map[module]`` (modules absent from the map go to ``device`` / stay where they are)."""
        self._check_persona(persona)
        out = {}
        for name, t in self._masks[persona].items():
            target = device_map.get(name, device) if device_map is not None else device
            out[name] = t if target is None else t.to(target)
        return out

    def unpacked(self, persona: str, module: str) -> torch.Tensor:
        """The bool ``[N, K]`` keep-mask of one (persona, module)."""
        from persona_kernels.ops.packing import unpack_mask

        packed = self.get(persona, module)
        if packed is None:
            raise KeyError(f"persona_kernels.MaskBank: persona {persona!r} has no mask for {module!r}")
        return unpack_mask(packed, self._shapes[module][1])

    def to(self, device: torch.device | str) -> "MaskBank":
        """Move every mask to ``device`` (in place); returns self."""
        for m in self._masks.values():
            for name in m:
                m[name] = m[name].to(device)
        return self

    # ------------------------------------------------------------------ editing

    def add(
        self,
        persona: str,
        masks: Mapping[str, torch.Tensor],
        *,
        shapes: Mapping[str, Shape] | None = None,
        tokens_seen: int | None = None,
    ) -> "MaskBank":
        """Add persona ``persona`` with ``{module: bool [N, K] or packed int32 [N, ceil(K/32)]}``; an existing
        persona of that name is **replaced whole** (its masks on modules absent from ``masks`` are dropped), as
        :func:`persona_kernels.patching.add_persona` with ``overwrite=True`` does.

        A packed mask needs its K: from the bank (module already known) or from ``shapes[module]``.
        Shapes must agree with the bank's. Masks keep their device. Returns self.
        """
        check_persona_name("MaskBank.add", persona, "persona")
        if not isinstance(masks, Mapping):
            raise TypeError(_err("masks", f"expected a {{module: mask}} mapping, got {type(masks).__name__}"))
        from persona_kernels.ops.packing import pack_mask

        staged: dict[str, torch.Tensor] = {}
        new_shapes: dict[str, Shape] = {}
        for name, mask in masks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(_err("masks", f"module names must be non-empty strings, got {name!r}"))
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(_err("masks", f"{name!r}: expected a 2-D tensor, got {getattr(mask, 'shape', mask)!r}"))
            known = self._shapes.get(name) or new_shapes.get(name)
            given = tuple(int(v) for v in shapes[name]) if shapes is not None and name in shapes else None
            if known is not None and given is not None and known != given:
                raise ValueError(_err("shapes", f"{name!r}: {given} differs from the bank's {known}"))
            if mask.dtype == torch.bool:
                shape = (int(mask.shape[0]), int(mask.shape[1]))
                expected = known or given
                if expected is not None and shape != expected:
                    raise ValueError(_err("masks", f"{name!r}: mask shape {shape}, but the module is {expected}"))
                packed = pack_mask(mask)
            elif mask.dtype == torch.int32:
                expected = known or given
                if expected is None:
                    raise ValueError(
                        _err("shapes", f"{name!r}: a packed mask needs the module's (N, K); pass shapes={{name: (N, K)}}")
                    )
                shape = expected
                if tuple(mask.shape) != (shape[0], packed_words(shape[1])):
                    raise ValueError(
                        _err("masks", f"{name!r}: packed shape {tuple(mask.shape)}, expected {(shape[0], packed_words(shape[1]))}")
                    )
                if not _padding_ok(mask, shape[1]):
                    raise ValueError(_err("masks", f"{name!r}: padding bits past K={shape[1]} are not zero"))
                packed = mask.contiguous().clone()
            else:
                raise TypeError(_err("masks", f"{name!r}: expected a bool mask or packed int32 words, got {mask.dtype}"))
            staged[name] = packed
            new_shapes[name] = shape
        self._shapes.update({n: s for n, s in new_shapes.items() if n not in self._shapes})
        self._masks[persona] = staged
        self._forget_unused_modules()
        if tokens_seen is not None:
            self.metadata.setdefault("tokens_seen", {})[persona] = int(tokens_seen)
        return self

    def _forget_unused_modules(self) -> None:
        used = {n for m in self._masks.values() for n in m}
        self._shapes = {n: s for n, s in self._shapes.items() if n in used}

    def remove(self, persona: str) -> None:
        """Drop a persona (modules no persona uses any more are forgotten too)."""
        self._check_persona(persona)
        del self._masks[persona]
        self._forget_unused_modules()
        self.metadata.get("tokens_seen", {}).pop(persona, None)
        self.metadata.get("composites", {}).pop(persona, None)

    def add_composite(self, name: str, personas: Sequence[str], op: str = "and") -> "MaskBank":
        """Add persona ``name`` as the AND (intersection of kept weights) or OR of other personas' masks,
        computed on the packed words (e.g. an MBTI type = AND of its four dimension masks).
        The components must cover the same modules. Recorded in ``metadata["composites"]``."""
        from persona_kernels.scoring import compose

        if isinstance(personas, str) or not personas:
            raise ValueError(_err("personas", "expected a non-empty list of persona names"))
        for p in personas:
            self._check_persona(p)
        if op not in ("and", "or"):
            raise ValueError(_err("op", f"expected 'and' or 'or', got {op!r}"))
        modules = list(self._masks[personas[0]])
        for p in personas[1:]:
            if set(self._masks[p]) != set(modules):
                raise ValueError(_err("personas", f"{p!r} and {personas[0]!r} do not cover the same modules"))
        combined = {}
        for module in modules:
            parts = [self._masks[p][module] for p in personas]
            dev = parts[0].device
            combined[module] = compose([t.to(dev) for t in parts], op=op)
        self.add(name, combined)
        self.metadata.setdefault("composites", {})[name] = {"op": op, "of": list(personas)}
        return self

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_bool_masks(
        cls,
        masks: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        metadata: Mapping[str, Any] | None = None,
        default_gamma: float = 0.0,
        shapes: Mapping[str, Shape] | None = None,
    ) -> "MaskBank":
        """A bank from ``{persona: {module: bool [N, K] (or packed int32 with shapes)}}``."""
        if not isinstance(masks, Mapping):
            raise TypeError(_err("masks", f"expected {{persona: {{module: mask}}}}, got {type(masks).__name__}"))
        bank = cls(metadata, default_gamma=default_gamma)
        for persona, per_module in masks.items():
            bank.add(persona, per_module, shapes=shapes)
        return bank

    @classmethod
    def from_state_dict_file(
        cls,
        path: str | os.PathLike,
        persona: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        default_gamma: float = 0.0,
    ) -> "MaskBank":
        """Import plain dict-of-bool-tensor masks (interoperability with other code).

        Accepts a safetensors file, or a torch file (``.pt``/``.pth``/``.bin``) read with
        ``torch.load(weights_only=True)``. Layouts: ``{module: mask}`` (one persona, named ``persona``
        or the file stem), ``{persona: {module: mask}}`` (torch files), or flat ``"persona/module"``
        keys. Masks may be bool or 0/1 integer/float tensors; a trailing ``.weight`` on module names is
        dropped (parameter names -> module names).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"persona_kernels.MaskBank: mask file {str(path)!r} does not exist")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                raw: Any = load_file(str(path), device="cpu")
            else:
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MaskBankError(f"persona_kernels.MaskBank: cannot read masks from {str(path)!r}: {exc}") from exc
        if not isinstance(raw, Mapping) or not raw:
            raise MaskBankError(f"persona_kernels.MaskBank: {str(path)!r} holds no dict of masks")

        def strip(name: str) -> str:
            return name[: -len(".weight")] if name.endswith(".weight") else name

        nested: dict[str, dict[str, torch.Tensor]] = {}
        if all(isinstance(v, Mapping) for v in raw.values()):
            for p, per_module in raw.items():
                nested[str(p)] = {strip(str(m)): _to_bool(t, f"{str(path)!r} [{p!r}][{m!r}]") for m, t in per_module.items()}
        elif persona is None and all(isinstance(k, str) and "/" in k for k in raw):
            for key, t in raw.items():
                p, m = key.split("/", 1)
                nested.setdefault(p, {})[strip(m)] = _to_bool(t, f"{str(path)!r} [{key!r}]")
        else:
            name = persona or path.name.split(".")[0]
            nested[name] = {strip(str(m)): _to_bool(t, f"{str(path)!r} [{m!r}]") for m, t in raw.items()}
        meta = {"imported_from": path.name, **dict(metadata or {})}
        return cls.from_bool_masks(nested, metadata=meta, default_gamma=default_gamma)

    # ------------------------------------------------------------------ fingerprint

    @staticmethod
    def model_fingerprint(model: Any, module_names: Iterable[str] | None = None) -> str:
        """Fingerprint of a model from its Linear module names and (N, K) shapes.

        ``model`` is an ``nn.Module`` (every module with a 2-D weight and in/out_features) or a
        ``{name: (N, K)}`` mapping. With ``module_names`` only those modules count (all must exist), so
        ``MaskBank.model_fingerprint(model, bank.module_names) == bank.fingerprint`` when the bank fits.
        """
        shapes = _linear_shapes(model)
        if module_names is not None:
            names = list(module_names)
            missing = [n for n in names if n not in shapes]
            if missing:
                raise MaskBankError(
                    f"persona_kernels.MaskBank: the model has no Linear module {missing[0]!r}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                )
            shapes = {n: shapes[n] for n in names}
        return _fingerprint(shapes)

    # ------------------------------------------------------------------ weight digest

    def record_weights(self, model: Any) -> "MaskBank":
        """Record a sample of the weights the masks were built from (``model``: an ``nn.Module`` or ``{name:
        weight}``), saved with the bank so that :meth:`check_weights` can tell another checkpoint of the same
        architecture. Deterministic: up to 16 modules (evenly spaced in name order), 3 rows x 8 columns each;
        offloaded (meta) weights are skipped. Returns self."""
        weights = {n: w for n, w in _model_weights(model).items() if w.device.type != "meta" and w.numel()}
        names = sorted(weights)
        if len(names) > _SAMPLE_MODULES:
            names = [names[(i * len(names)) // _SAMPLE_MODULES] for i in range(_SAMPLE_MODULES)]
        values = {n: _sampled_values(weights[n]) for n in names}
        self.weight_sample = {"modules": names, "values": [v for n in names for v in values[n]]} if names else None
        return self

    def check_weights(self, model: Any) -> str | None:
        """None when ``model``'s weights agree with :attr:`weight_sample` (to bf16 precision, so every dtype of one
        checkpoint passes) or when there is nothing to compare; else a sentence describing the difference."""
        sample = self.weight_sample
        if not sample:
            return None
        weights = _model_weights(model)
        compared = bad = 0
        first = None
        offset = 0
        for name in sample["modules"]:
            w = weights.get(name)
            rows, cols = _sample_positions(*self._shapes.get(name, tuple(w.shape) if w is not None else (0, 0)))
            count = len(rows) * len(cols)
            stored = sample["values"][offset: offset + count]
            offset += count
            if w is None or w.device.type == "meta" or len(stored) != count:
                continue
            if tuple(_sample_positions(*w.shape)) != (rows, cols):
                continue  # a shape difference is reported by the fingerprint
            got = _sampled_values(w)
            for i, (a, b) in enumerate(zip(stored, got)):
                compared += 1
                if not abs(a - b) <= _SAMPLE_RTOL * max(abs(a), abs(b)) + _SAMPLE_ATOL:
                    bad += 1
                    if first is None:
                        first = f"{name}[{rows[i // len(cols)]}, {cols[i % len(cols)]}]: bank {a:.6g}, model {b:.6g}"
        if compared and bad > 0.01 * compared:
            return f"{bad} of {compared} sampled weight values differ (e.g. {first})"
        return None

    # ------------------------------------------------------------------ save / load

    def _header(self) -> dict[str, Any]:
        header = {
            "format_version": FORMAT_VERSION,
            "package_version": _package_version(),
            "fingerprint": self.fingerprint,
            "personas": self.personas,
            "modules": [[n, s[0], s[1]] for n, s in self._shapes.items()],  # a list: keeps the order
            "persona_modules": {p: list(m) for p, m in self._masks.items()},
            "metadata": self.metadata,
        }
        if self.weight_sample:
            header["weight_sample"] = self.weight_sample
        return header

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank as one safetensors file, atomically, with the umask's permissions. Returns the path.
        Errors name ``path``."""
        from safetensors.torch import save as to_bytes

        path = Path(path)
        tensors = {f"{p}/{m}": t.detach().to("cpu").contiguous() for p, mods in self._masks.items() for m, t in mods.items()}
        try:
            header = json.dumps(self._header(), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(_err("metadata", f"must be JSON-serialisable (str/int/float/bool/list/dict): {exc}")) from exc
        meta = {
            _KEY_JSON: header,
            _KEY_PAYLOAD: _payload_sha256(tensors),
            _KEY_HEADER: hashlib.sha256(header.encode("utf-8")).hexdigest(),
        }
        return atomic_write(path, to_bytes(tensors, metadata=meta))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        model: Any = None,
        *,
        device: torch.device | str = "cpu",
    ) -> "MaskBank":
        """Read and fully validate a bank written by :meth:`save`.

        ``expected_fingerprint`` (a string) or ``model`` (``nn.Module`` or ``{name: (N, K)}``) make the
        load fail when the bank was built for another model. Raises :class:`MaskBankError` naming the
        file for any corruption (truncation, flipped bytes, wrong shapes, non-zero padding bits) and for any
        value the setters would refuse (persona names, shapes, ``default_gamma``, ...).
        """
        from safetensors import safe_open

        path = Path(path)
        where = f"mask bank file {str(path)!r}"
        if path.is_dir():
            raise MaskBankError(f"persona_kernels.MaskBank: {where} is a folder, not a file (pass the .safetensors file in it)")
        if not path.is_file():
            raise FileNotFoundError(f"persona_kernels.MaskBank: {where} does not exist")

        def fail(msg: str) -> MaskBankError:
            return MaskBankError(f"persona_kernels.MaskBank: {where}: {msg}")

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:
            raise fail(f"not a readable safetensors file (truncated or corrupted?): {exc}") from exc
        if _KEY_JSON not in meta:
            raise fail("not a persona_kernels mask bank (no bank metadata in the safetensors header)")
        header_text = meta[_KEY_JSON]
        if hashlib.sha256(header_text.encode("utf-8")).hexdigest() != meta.get(_KEY_HEADER):
            raise fail("header checksum mismatch: the metadata is corrupted")
        try:
            header = json.loads(header_text)
            version = int(header["format_version"])
        except Exception as exc:
            raise fail(f"unreadable bank metadata: {exc}") from exc
        if version != FORMAT_VERSION:
            raise fail(f"format version {version} is not supported (this package reads version {FORMAT_VERSION})")
        if _payload_sha256(tensors) != meta.get(_KEY_PAYLOAD):
            raise fail("payload checksum mismatch: the mask data is corrupted")
        try:
            shapes, personas, persona_modules, user_meta, stored_fp, sample = _parse_header(header)
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"invalid bank metadata: {exc}") from exc
        expected_keys = {f"{p}/{m}" for p in personas for m in persona_modules.get(p, [])}
        if set(tensors) != expected_keys:
            extra = sorted(set(tensors) ^ expected_keys)[:3]
            raise fail(f"tensor names do not match the bank metadata (e.g. {extra})")
        for p in personas:
            for m in persona_modules.get(p, []):
                t = tensors[f"{p}/{m}"]
                if m not in shapes:
                    raise fail(f"mask {p}/{m} has no module shape in the metadata")
                n, k = shapes[m]
                if t.dtype != torch.int32 or tuple(t.shape) != (n, packed_words(k)):
                    raise fail(f"mask {p}/{m}: {t.dtype} {tuple(t.shape)}, expected int32 {(n, packed_words(k))} for K={k}")
                if not _padding_ok(t, k):
                    raise fail(f"mask {p}/{m}: padding bits past K={k} are not zero")
        if _fingerprint(shapes) != stored_fp:
            raise fail(f"stored fingerprint {stored_fp} does not match its own module shapes")
        if expected_fingerprint is not None and str(expected_fingerprint) != stored_fp:
            raise fail(f"built for another model: fingerprint {stored_fp}, expected {expected_fingerprint}")
        if model is not None:
            model_shapes = _linear_shapes(model)
            problems = []
            for m, s in shapes.items():
                if m not in model_shapes:
                    problems.append(f"{m} missing from the model")
                elif model_shapes[m] != s:
                    problems.append(f"{m}: bank (N, K) = {s}, model {model_shapes[m]}")
            if problems:
                raise fail(
                    f"built for another model ({len(problems)} of {len(shapes)} modules differ, e.g. {problems[0]})"
                )
        try:
            bank = cls(user_meta)
        except (TypeError, ValueError) as exc:
            raise fail(f"invalid bank metadata: {exc}") from exc
        bank.weight_sample = sample
        bank._shapes = shapes
        for p in personas:
            bank._masks[p] = {m: tensors[f"{p}/{m}"].to(device) for m in persona_modules.get(p, [])}
        bank.saved_with = {"package_version": header.get("package_version"), "format_version": version}
        return bank

    # ------------------------------------------------------------------ adapter folders (Hugging Face style)

    ADAPTER_CONFIG_FILE = "persona_config.json"
    ADAPTER_BANK_FILE = "persona_bank.safetensors"

    def save_pretrained(self, save_directory: str | os.PathLike, *, base_model: Any = None) -> Path:
        """Write the bank as an adapter folder, atomically: ``persona_config.json`` + ``persona_bank.safetensors``.

        The config names the base model (``base_model``: a name / path, or a loaded model whose
        ``config._name_or_path`` and ``_commit_hash`` are used; default ``metadata["base_model"]``) and its
        revision where known, the fingerprint, the method (and its spec when the metadata holds one), rho,
        default gamma, the targeted module types, the personas, pairs and the package version. The safetensors
        file is the same as :meth:`save` writes, so the folder loads with :meth:`from_pretrained` and the file
        alone with :meth:`load`. Returns the folder.
        """
        from persona_kernels.utils.atomic import atomic_directory

        name, revision = self.metadata.get("base_model"), self.metadata.get("base_model_revision")
        if base_model is not None:
            if isinstance(base_model, (str, os.PathLike)):
                name = str(base_model)
            else:
                config = getattr(base_model, "config", None)
                name = getattr(config, "_name_or_path", None) or getattr(base_model, "name_or_path", None) or name
                revision = getattr(config, "_commit_hash", None) or revision
        leaves = sorted({m.rsplit(".", 1)[-1] for m in self._shapes})
        config = {
            "adapter_type": "persona_kernels.mask_bank",
            "bank_file": self.ADAPTER_BANK_FILE,
            "base_model_name_or_path": name,
            "base_model_revision": revision,
            "fingerprint": self.fingerprint,
            "method": self.metadata.get("method"),
            "method_spec": self.metadata.get("method_spec", self.metadata.get("spec")),
            "method_kwargs": self.metadata.get("method_kwargs", {}),
            "rho": self.metadata.get("sparsity"),
            "gamma": self.default_gamma,
            "target_modules": leaves,
            "num_modules": len(self._shapes),
            "personas": self.personas,
            "pairs": self.metadata.get("pairs", []),
            "persona_kernels_version": _package_version(),
            "format_version": FORMAT_VERSION,
        }
        try:
            text = json.dumps(config, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(_err("metadata", f"must be JSON-serialisable: {exc}")) from exc
        target = Path(save_directory)
        with atomic_directory(target) as tmp:
            self.save(tmp / self.ADAPTER_BANK_FILE)
            (tmp / self.ADAPTER_CONFIG_FILE).write_text(text, encoding="utf-8")
        return target

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        model: Any = None,
        *,
        device: torch.device | str = "cpu",
    ) -> "MaskBank":
        """Load an adapter folder written by :meth:`save_pretrained`, or a single bank file (:meth:`load`).

        The folder's ``persona_config.json`` must agree with the bank file it names (fingerprint, personas);
        ``expected_fingerprint`` / ``model`` / ``device`` as in :meth:`load`. The config's base model and
        revision are kept in ``metadata["base_model"]`` / ``["base_model_revision"]``.
        """
        path = Path(path)
        if not path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"persona_kernels.MaskBank: {str(path)!r} does not exist (expected a bank "
                                        f"file or an adapter folder with {cls.ADAPTER_CONFIG_FILE})")
            return cls.load(path, expected_fingerprint, model, device=device)
        config_path = path / cls.ADAPTER_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"persona_kernels.MaskBank: folder {str(path)!r} has no {cls.ADAPTER_CONFIG_FILE} "
                                    "(not an adapter folder written by MaskBank.save_pretrained)")
        where = f"adapter folder {str(path)!r}"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            bank_file = str(config.get("bank_file", cls.ADAPTER_BANK_FILE))
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise MaskBankError(f"persona_kernels.MaskBank: {where}: unreadable {cls.ADAPTER_CONFIG_FILE}: {exc}") from exc
        if Path(bank_file).name != bank_file:
            raise MaskBankError(f"persona_kernels.MaskBank: {where}: bank_file {bank_file!r} must be a file name")
        bank = cls.load(path / bank_file, expected_fingerprint, model, device=device)
        if config.get("fingerprint") != bank.fingerprint or list(config.get("personas", [])) != bank.personas:
            raise MaskBankError(f"persona_kernels.MaskBank: {where}: {cls.ADAPTER_CONFIG_FILE} does not match "
                                f"{bank_file} (fingerprint or persona list differ)")
        for key, meta_key in (("base_model_name_or_path", "base_model"), ("base_model_revision", "base_model_revision")):
            if config.get(key) and not bank.metadata.get(meta_key):
                bank.metadata[meta_key] = config[key]
        return bank
