"""Mask-method specs: ONE grammar for :func:`~persona_kernels.calibrate`, :func:`~persona_kernels.pipeline.build_bank`,
``persona-kernels calibrate --method`` and ``persona-kernels eval --methods``.

A spec is ``NAME[:key=value[,key=value...]]``. ``NAME`` is a base method or an alias:

* ``wanda``: each persona on its own statistics (``|W_ij| * E|x_j|``, keep the top k per row).
  Options: ``activation`` (``abs_mean`` | ``l2``), ``scope``.
* ``contrastive_wanda``: ``phi`` (``softplus`` | ``relu``), ``tau`` (float > 0), ``statistic``
  (``token`` | ``sequence``), ``eps``, ``scope``.
* ``contrastive_sparse``: ``activation``, ``variant`` (``difference`` | ``relative``), ``restrict``
  (float in (0, 1): rank only among the weights a Wanda mask at that sparsity, statistics of both personas
  averaged, would prune; the inner sparsity is ``sparsity / restrict`` so each persona still prunes
  ``sparsity`` of every row), ``eps``, ``scope``.
* aliases: ``contrastive_wanda_sharp`` (``tau=0.1``), ``contrastive_sparse_relative``
  (``variant=relative``), ``contrastive_sparse_restricted`` (``restrict=0.5``).

``scope`` (every method): ``all`` (default), ``mlp`` or ``attn``: only those Linears get masks; the others
keep every weight (they get no mask in the bank, so they stay dense).

Example: ``contrastive_sparse:restrict=0.5,scope=mlp``. A bank records the canonical spec it was built with in
``bank.metadata["method_spec"]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from persona_kernels.utils.errors import message

BASES = ("wanda", "contrastive_wanda", "contrastive_sparse")

#: alias -> (base, options)
ALIASES: dict[str, tuple[str, dict]] = {
    "contrastive_wanda_sharp": ("contrastive_wanda", {"phi": "softplus", "tau": 0.1}),
    "contrastive_sparse_relative": ("contrastive_sparse", {"variant": "relative"}),
    "contrastive_sparse_restricted": ("contrastive_sparse", {"variant": "difference", "restrict": 0.5}),
}

#: option -> allowed values (a tuple) or a float range (low, high, inclusive-low)
_CHOICES = {"activation": ("abs_mean", "l2"), "phi": ("softplus", "relu"), "statistic": ("token", "sequence"),
            "variant": ("difference", "relative"), "scope": ("all", "mlp", "attn")}
_FLOATS = {"tau": "> 0", "eps": ">= 0", "restrict": "in (0, 1)"}
ALLOWED: dict[str, tuple[str, ...]] = {
    "wanda": ("activation", "scope"),
    "contrastive_wanda": ("phi", "tau", "statistic", "eps", "scope"),
    "contrastive_sparse": ("activation", "variant", "restrict", "eps", "scope"),
}
#: options that select modules / rows rather than go to the scoring function
_STRUCTURAL = ("scope", "restrict")


def _where(spec: str) -> str:
    return message("methods", f"method {spec!r}")


@dataclass(frozen=True)
class MethodSpec:
    """A mask method: the user's ``label``, the scoring base and its (validated) options."""

    label: str
    base: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def options(self) -> dict:
        """All options (scoring keywords plus ``scope`` / ``restrict`` where given)."""
        return dict(self.kwargs)

    @property
    def contrastive(self) -> bool:
        return self.base != "wanda"

    @property
    def scope(self) -> str:
        return str(self.options.get("scope", "all"))

    @property
    def restrict(self) -> float | None:
        r = self.options.get("restrict")
        return float(r) if r else None

    @property
    def scoring_kwargs(self) -> dict:
        """Keyword arguments of the scoring function (without ``scope`` / ``restrict``)."""
        return {k: v for k, v in self.kwargs if k not in _STRUCTURAL}

    @property
    def canonical(self) -> str:
        """``base:key=value,...`` with sorted keys (``scope=all`` omitted): the same for equal methods."""
        opts = [f"{k}={v}" for k, v in self.kwargs if not (k == "scope" and v == "all")]
        return self.base + (":" + ",".join(opts) if opts else "")

    def max_sparsity(self) -> float:
        """Largest sparsity the method supports (Contrastive-Sparse prunes disjoint sets: 0.5, x restrict)."""
        if self.base != "contrastive_sparse":
            return 1.0
        return 0.5 * (self.restrict or 1.0)

    def check_sparsity(self, sparsity: float) -> None:
        limit = self.max_sparsity()
        if self.base == "contrastive_sparse" and sparsity > limit + 1e-12:
            raise ValueError(f"{_where(self.label)} supports sparsity <= {limit}, got {sparsity}")


def _typed(spec: str, key: str, value: Any) -> Any:
    if key in _FLOATS:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{_where(spec)}: option {key!r}: expected a number, got {value!r}") from None
        ok = {"tau": v > 0, "eps": v >= 0, "restrict": 0.0 < v < 1.0}[key]
        if not ok or v != v:
            raise ValueError(f"{_where(spec)}: {key} must be {_FLOATS[key]}, got {value!r}")
        return v
    if value not in _CHOICES[key]:
        raise ValueError(f"{_where(spec)}: {key} must be one of {_CHOICES[key]}, got {value!r}")
    return value


def parse_method(spec: "str | MethodSpec", overrides: Mapping[str, Any] | None = None) -> MethodSpec:
    """``"contrastive_sparse:restrict=0.5,scope=mlp"`` (or an alias, or a :class:`MethodSpec`) -> MethodSpec.

    ``overrides`` (e.g. ``method_kwargs`` of :func:`~persona_kernels.calibrate`) are applied over the spec's
    options. Raises ValueError naming the spec and the bad part.
    """
    if isinstance(spec, MethodSpec):
        label, base, kw = spec.label, spec.base, spec.options
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(message("methods", f"expected a method spec such as 'contrastive_wanda:tau=0.2', got {spec!r}",
                                     "method"))
        label = spec.strip()
        name, _, rest = label.partition(":")
        name = name.strip()
        if name in ALIASES:
            base, kw = ALIASES[name][0], dict(ALIASES[name][1])
        elif name in BASES:
            base, kw = name, {}
        else:
            raise ValueError(f"persona_kernels.methods: unknown method {name!r}; expected one of "
                             f"{list(BASES) + sorted(ALIASES)} (optionally with ':key=value,...')")
        for part in filter(None, (p.strip() for p in rest.split(","))):
            if not re.fullmatch(r"[a-z_]+=[^=,]+", part):
                raise ValueError(f"{_where(label)}: expected 'key=value', got {part!r}")
            k, v = part.split("=")
            kw[k] = v
    for k, v in dict(overrides or {}).items():
        kw[k] = v
    for k in kw:
        if k not in ALLOWED[base]:
            raise ValueError(f"{_where(label)}: option {k!r} not in {sorted(ALLOWED[base])}")
    kw = {k: _typed(label, k, v) for k, v in kw.items()}
    return MethodSpec(label, base, tuple(sorted(kw.items())))


def in_scope(spec: MethodSpec, module_name: str) -> bool:
    """Whether ``module_name`` gets a mask under ``spec``'s scope."""
    if spec.scope == "all":
        return True
    from persona_kernels.analysis import module_info

    return module_info(module_name)[1] == spec.scope


def persona_mask(weight: torch.Tensor, stats: Any, spec: MethodSpec, sparsity: float, *, packed: bool = False) -> torch.Tensor:
    """Keep-mask of one persona for a non-contrastive method (``wanda``)."""
    from persona_kernels import scoring

    if spec.contrastive:
        raise ValueError(f"{_where(spec.label)} is contrastive: use pair_masks")
    return scoring.wanda(weight, stats, sparsity, packed=packed, **spec.scoring_kwargs)


def pair_masks(weight: torch.Tensor, stats_pos: Any, stats_neg: Any, spec: MethodSpec, sparsity: float, *,
               packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks ``(keep_pos, keep_neg)`` of a persona pair for one module under ``spec``."""
    from persona_kernels import scoring

    kw = spec.scoring_kwargs
    if spec.base == "wanda":
        return (scoring.wanda(weight, stats_pos, sparsity, packed=packed, **kw),
                scoring.wanda(weight, stats_neg, sparsity, packed=packed, **kw))
    if spec.base == "contrastive_wanda":
        return scoring.contrastive_wanda(weight, stats_pos, stats_neg, sparsity, packed=packed, **kw)
    spec.check_sparsity(sparsity)
    if spec.restrict:
        act = 0.5 * (stats_pos.abs_mean + stats_neg.abs_mean)
        prunable = ~scoring.wanda(weight, act.to(weight.device), spec.restrict)
        return scoring.contrastive_sparse(weight, stats_pos, stats_neg, min(0.5, sparsity / spec.restrict),
                                          restrict_to=prunable, packed=packed, **kw)
    return scoring.contrastive_sparse(weight, stats_pos, stats_neg, sparsity, packed=packed, **kw)


def resolve(method: "str | MethodSpec", method_kwargs: Mapping[str, Any] | None = None) -> MethodSpec:
    """The spec that :func:`~persona_kernels.calibrate` builds: ``method`` parsed, with ``method_kwargs`` over its
    options. A bare base name with ``method_kwargs=None`` takes the operating point's options for that base
    (:func:`persona_kernels.operating_point.default_method_kwargs`)."""
    if method_kwargs is None and isinstance(method, str) and method.strip() in BASES:
        from persona_kernels.operating_point import default_method_kwargs

        method_kwargs = default_method_kwargs(method.strip())
    return parse_method(method, method_kwargs)


def cli_type(text: str) -> str:
    """argparse ``type=`` for ``--method``: validates the spec (clear message on error) and returns it unchanged."""
    import argparse

    try:
        parse_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


#: one-line grammar for help texts
HELP = ("mask method spec NAME[:key=value,...]; NAME in " + ", ".join(list(BASES) + sorted(ALIASES))
        + "; options: scope=all|mlp|attn (every method), activation=abs_mean|l2 (wanda, contrastive_sparse), "
          "phi=softplus|relu, tau=FLOAT, statistic=token|sequence (contrastive_wanda), variant=difference|relative, "
          "restrict=FLOAT in (0,1) (contrastive_sparse); e.g. contrastive_sparse:restrict=0.5,scope=mlp")
