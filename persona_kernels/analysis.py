"""Mask analysis between two personas of a :class:`~persona_kernels.bank.MaskBank`.

All counts are taken on the packed int32 words (popcount of XOR / AND), never on unpacked masks:

- difference rate: fraction of weights whose keep-bit differs between the two masks;
- Jaccard overlap of the kept sets: |A and B| / |A or B|;
- cosine similarity of the 0/1 mask vectors: |A and B| / sqrt(|A| |B|);
- optionally the cosine similarity of score vectors (e.g. Wanda scores) when they are given.

Each is reported overall, per module, per layer, by module family (attention q/k/v/o vs MLP
gate/up/down) and by module type; layer index and type are inferred from names such as
``model.layers.3.self_attn.q_proj`` (unknown -> ``"other"``). Rates are weight-weighted: "Avg
difference" is (differing weights) / (weights) over all masked weights, "Attn" over the attention
modules' weights, "MLP" over the MLP modules' weights (the layout of the paper's mask-analysis table).
A module for which a persona has no mask counts as dense (all kept), as when the bank is patched in.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from persona_kernels.utils.atomic import atomic_savefig

__all__ = [
    "popcount32",
    "module_info",
    "Counts",
    "MaskComparison",
    "compare",
    "comparison_table",
    "ATTN_TYPES",
    "MLP_TYPES",
]

ATTN_TYPES = ("q", "k", "v", "o", "qkv")
MLP_TYPES = ("gate", "up", "down", "gate_up")
TYPE_ORDER = ATTN_TYPES + MLP_TYPES + ("other",)
_TYPE_BY_LEAF = {
    "q_proj": "q", "query": "q", "wq": "q", "to_q": "q", "q": "q",
    "k_proj": "k", "key": "k", "wk": "k", "to_k": "k", "k": "k",
    "v_proj": "v", "value": "v", "wv": "v", "to_v": "v", "v": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o", "to_out": "o", "o": "o",
    "qkv_proj": "qkv", "c_attn": "qkv", "wqkv": "qkv", "query_key_value": "qkv",
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up",
    "down_proj": "down", "w2": "down", "fc2": "down", "dense_4h_to_h": "down",
    "gate_up_proj": "gate_up",
}
_ATTN_PARENTS = {"self_attn", "attn", "attention", "self_attention", "selfattention"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn", "feedforward", "block_sparse_moe"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

_M1 = 0x55555555
_M2 = 0x33333333
_M4 = 0x0F0F0F0F


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of every int32 word (SWAR bit tricks; int32 result, same shape/device).

    Only arithmetic shifts are available on int32, so each step masks away the copied sign bits.
    """
    if words.dtype != torch.int32:
        raise TypeError(f"persona_kernels.analysis: argument 'words': expected int32 words, got {words.dtype}")
    x = words - ((words >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # each byte holds its count (<= 8): x is now non-negative
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def module_info(name: str) -> tuple[int | None, str, str]:
    """``(layer index or None, family "attn"|"mlp"|"other", type)`` inferred from a module name.

    Types: q/k/v/o/qkv (attention), gate/up/down/gate_up (MLP), or "other".
    """
    match = _LAYER_RE.search(name)
    layer = int(match.group(1)) if match else None
    parts = name.split(".")
    leaf = parts[-1].lower()
    kind = _TYPE_BY_LEAF.get(leaf)
    parents = {p.lower() for p in parts[:-1]}
    if kind is None and leaf in ("c_proj", "dense"):  # GPT-2 / NeoX names depend on the parent
        kind = "o" if parents & _ATTN_PARENTS else ("down" if parents & _MLP_PARENTS else None)
    if kind in ("q", "k", "v", "o") and leaf in ("q", "k", "v", "o") and not parents & _ATTN_PARENTS:
        kind = None  # one-letter names only count inside an attention block
    if kind is None:
        family = "attn" if parents & _ATTN_PARENTS else ("mlp" if parents & _MLP_PARENTS else "other")
        return layer, family, "other"
    return layer, ("attn" if kind in ATTN_TYPES else "mlp"), kind


@dataclass
class Counts:
    """Bit counts of a set of weights for two masks A and B (kept = bit set)."""

    weights: int = 0
    differ: int = 0
    kept_a: int = 0
    kept_b: int = 0
    kept_both: int = 0

    def __iadd__(self, other: "Counts") -> "Counts":
        self.weights += other.weights
        self.differ += other.differ
        self.kept_a += other.kept_a
        self.kept_b += other.kept_b
        self.kept_both += other.kept_both
        return self

    @property
    def difference_rate(self) -> float:
        return self.differ / self.weights if self.weights else float("nan")

    @property
    def jaccard(self) -> float:
        union = self.kept_a + self.kept_b - self.kept_both
        return self.kept_both / union if union else float("nan")

    @property
    def mask_cosine(self) -> float:
        denom = math.sqrt(self.kept_a) * math.sqrt(self.kept_b)
        return self.kept_both / denom if denom else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "differ": self.differ,
            "kept_a": self.kept_a,
            "kept_b": self.kept_b,
            "kept_both": self.kept_both,
            "difference_rate": _clean(self.difference_rate),
            "jaccard": _clean(self.jaccard),
            "mask_cosine": _clean(self.mask_cosine),
        }


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _layer_key(layer: int | None) -> str:
    return "other" if layer is None else str(layer)


def _sorted_layers(keys: Iterable[int | None]) -> list[int | None]:
    keys = set(keys)
    return sorted(k for k in keys if k is not None) + ([None] if None in keys else [])


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.{digits}f}"


@dataclass
class MaskComparison:
    """Result of :func:`compare`: counts per module, layer, family and type, plus score similarities."""

    persona_a: str
    persona_b: str
    modules: dict[str, Counts]
    info: dict[str, tuple[int | None, str, str]]
    score_cosine_per_layer: dict[int | None, float] | None = None
    score_cosine_overall: float | None = None
    overall: Counts = field(init=False)
    by_family: dict[str, Counts] = field(init=False)
    by_type: dict[str, Counts] = field(init=False)
    per_layer: dict[int | None, Counts] = field(init=False)
    per_layer_type: dict[int | None, dict[str, Counts]] = field(init=False)

    def __post_init__(self) -> None:
        self.overall = Counts()
        self.by_family, self.by_type, self.per_layer, self.per_layer_type = {}, {}, {}, {}
        for name, c in self.modules.items():
            layer, family, kind = self.info[name]
            self.overall += c
            self.by_family.setdefault(family, Counts()).__iadd__(c)
            self.by_type.setdefault(kind, Counts()).__iadd__(c)
            self.per_layer.setdefault(layer, Counts()).__iadd__(c)
            self.per_layer_type.setdefault(layer, {}).setdefault(kind, Counts()).__iadd__(c)

    # ----------------------------------------------------------------- headline numbers

    @property
    def difference_rate(self) -> float:
        return self.overall.difference_rate

    @property
    def attn_difference_rate(self) -> float:
        return self.by_family.get("attn", Counts()).difference_rate

    @property
    def mlp_difference_rate(self) -> float:
        return self.by_family.get("mlp", Counts()).difference_rate

    @property
    def jaccard(self) -> float:
        return self.overall.jaccard

    def layers(self) -> list[int | None]:
        return _sorted_layers(self.per_layer)

    def types(self) -> list[str]:
        return [t for t in TYPE_ORDER if t in self.by_type]

    # ----------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "persona_a": self.persona_a,
            "persona_b": self.persona_b,
            "overall": self.overall.to_dict(),
            "by_family": {k: v.to_dict() for k, v in sorted(self.by_family.items())},
            "by_type": {k: self.by_type[k].to_dict() for k in self.types()},
            "per_layer": {_layer_key(k): self.per_layer[k].to_dict() for k in self.layers()},
            "per_layer_type": {
                _layer_key(k): {t: c.to_dict() for t, c in self.per_layer_type[k].items()} for k in self.layers()
            },
            "modules": {name: {"layer": self.info[name][0], "family": self.info[name][1], "type": self.info[name][2],
                               **c.to_dict()} for name, c in self.modules.items()},
        }
        if self.score_cosine_per_layer is not None:
            out["score_cosine"] = {
                "overall": _clean(self.score_cosine_overall),
                "per_layer": {_layer_key(k): _clean(v) for k, v in self.score_cosine_per_layer.items()},
            }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, detail: bool = True) -> str:
        """The paper's table (Avg difference %, Attn, MLP), then per-type and per-layer tables."""
        lines = [comparison_table([self])]
        if not detail:
            return lines[0]
        lines += ["", "| Module type | Difference (%) | Jaccard | Mask cosine |", "|---|---|---|---|"]
        for t in self.types():
            c = self.by_type[t]
            lines.append(f"| {t} | {_pct(c.difference_rate)} | {c.jaccard:.4f} | {c.mask_cosine:.4f} |")
        has_scores = self.score_cosine_per_layer is not None
        head = "| Layer | Difference (%) | Attn (%) | MLP (%) | Jaccard | Mask cosine |" + (" Score cosine |" if has_scores else "")
        lines += ["", head, "|---" * (6 + has_scores) + "|"]
        for layer in self.layers():
            c = self.per_layer[layer]
            fam: dict[str, Counts] = {}
            for t, tc in self.per_layer_type[layer].items():
                fam.setdefault("attn" if t in ATTN_TYPES else "mlp" if t in MLP_TYPES else "other", Counts()).__iadd__(tc)
            row = (f"| {_layer_key(layer)} | {_pct(c.difference_rate)} | "
                   f"{_pct(fam['attn'].difference_rate) if 'attn' in fam else 'n/a'} | "
                   f"{_pct(fam['mlp'].difference_rate) if 'mlp' in fam else 'n/a'} | "
                   f"{c.jaccard:.4f} | {c.mask_cosine:.4f} |")
            if has_scores:
                v = self.score_cosine_per_layer.get(layer)
                row += f" {'n/a' if v is None else f'{v:.4f}'} |"
            lines.append(row)
        return "\n".join(lines)

    # ----------------------------------------------------------------- figures

    def plot(self, path_prefix: str | os.PathLike) -> list[Path]:
        """Write ``<prefix>_heatmap.png`` (layer x module type difference rate) and ``<prefix>_attn_mlp.png``
        (attention vs MLP difference rate per layer). Uses the Agg canvas, no global pyplot state."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        prefix = Path(path_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        layers, types = self.layers(), self.types()
        title = f"{self.persona_a} vs {self.persona_b}"

        grid = torch.full((len(layers), len(types)), float("nan"), dtype=torch.float64)
        for i, layer in enumerate(layers):
            for j, t in enumerate(types):
                c = self.per_layer_type[layer].get(t)
                if c is not None and c.weights:
                    grid[i, j] = 100.0 * c.difference_rate
        fig = Figure(figsize=(1.2 + 0.8 * len(types), 1.5 + 0.25 * len(layers)), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(layers)), [_layer_key(k) for k in layers])
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: difference rate (%)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        heat = _save_figure(fig, prefix.with_name(prefix.name + "_heatmap.png"))

        fig = Figure(figsize=(max(4.0, 0.35 * len(layers) + 2.0), 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(layers)))
        for offset, family, label in ((-0.2, ("attn",), "Attention"), (0.2, ("mlp",), "MLP")):
            values = []
            for layer in layers:
                c = Counts()
                for t, tc in self.per_layer_type[layer].items():
                    fam = "attn" if t in ATTN_TYPES else "mlp" if t in MLP_TYPES else "other"
                    if fam in family:
                        c += tc
                values.append(100.0 * c.difference_rate if c.weights else 0.0)
            ax.bar([x + offset for x in xs], values, width=0.4, label=label)
        ax.set_xticks(xs, [_layer_key(k) for k in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("difference rate (%)")
        ax.set_title(f"{title}: attention {_pct(self.attn_difference_rate)}% vs MLP {_pct(self.mlp_difference_rate)}%")
        ax.legend()
        fig.tight_layout()
        bars = _save_figure(fig, prefix.with_name(prefix.name + "_attn_mlp.png"))
        return [heat, bars]


def _save_figure(fig, path: Path) -> Path:
    return atomic_savefig(fig, path, format="png")


def comparison_table(comparisons: Sequence[MaskComparison], digits: int = 2) -> str:
    """Markdown table in the paper's layout, one row per persona pair:
    ``| Pair | Avg difference (%) | Attn | MLP |``."""
    lines = ["| Pair | Avg difference (%) | Attn | MLP |", "|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c.persona_a} vs. {c.persona_b} | {_pct(c.difference_rate, digits)} | "
                     f"{_pct(c.attn_difference_rate, digits)} | {_pct(c.mlp_difference_rate, digits)} |")
    return "\n".join(lines)


def _module_counts(pa: torch.Tensor | None, pb: torch.Tensor | None, n: int, k: int) -> Counts:
    total = n * k
    if pa is None and pb is None:
        return Counts(total, 0, total, total, total)
    if pa is None or pb is None:
        present = pb if pa is None else pa
        kept = int(popcount32(present).sum())
        return Counts(total, total - kept, total if pa is None else kept, total if pb is None else kept, kept)
    pb = pb.to(pa.device)
    kept_a = int(popcount32(pa).sum())
    kept_b = int(popcount32(pb).sum())
    both = int(popcount32(pa & pb).sum())
    differ = int(popcount32(pa ^ pb).sum())
    return Counts(total, differ, kept_a, kept_b, both)


def compare(
    bank: Any,
    a: str,
    b: str,
    scores: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    modules: Iterable[str] | None = None,
) -> MaskComparison:
    """Compare the masks of personas ``a`` and ``b`` of ``bank`` (see the module docstring).

    ``scores``: optional ``{persona: {module: score tensor [N, K]}}`` holding ``a`` and ``b``; adds the
    per-layer cosine similarity of the two personas' score vectors. ``modules`` restricts the comparison.
    """
    for arg, p in (("a", a), ("b", b)):
        if p not in bank.personas:
            raise KeyError(f"persona_kernels.analysis.compare: argument '{arg}': unknown persona {p!r}; bank has {bank.personas}")
    shapes = bank.shapes
    names = list(shapes) if modules is None else list(modules)
    for name in names:
        if name not in shapes:
            raise KeyError(f"persona_kernels.analysis.compare: argument 'modules': unknown module {name!r}")
    counts: dict[str, Counts] = {}
    info: dict[str, tuple[int | None, str, str]] = {}
    for name in names:
        n, k = shapes[name]
        counts[name] = _module_counts(bank.get(a, name), bank.get(b, name), n, k)
        info[name] = module_info(name)
    per_layer_cos = overall_cos = None
    if scores is not None:
        per_layer_cos, overall_cos = _score_cosines(scores, a, b, names, shapes, info)
    return MaskComparison(a, b, counts, info, per_layer_cos, overall_cos)


def _score_cosines(scores, a, b, names, shapes, info):
    for arg, p in (("a", a), ("b", b)):
        if p not in scores:
            raise KeyError(f"persona_kernels.analysis.compare: argument 'scores': no scores for persona {p!r}")
    acc: dict[int | None, list[float]] = {}
    for name in names:
        sa, sb = scores[a].get(name), scores[b].get(name)
        if sa is None or sb is None:
            continue
        if tuple(sa.shape) != tuple(shapes[name]) or tuple(sb.shape) != tuple(shapes[name]):
            raise ValueError(
                f"persona_kernels.analysis.compare: argument 'scores': {name!r} scores have shapes "
                f"{tuple(sa.shape)} / {tuple(sb.shape)}, the module is {tuple(shapes[name])}"
            )
        sa = sa.detach().double().flatten()
        sb = sb.detach().to(sa.device).double().flatten()
        dot, na, nb = float(sa @ sb), float(sa @ sa), float(sb @ sb)
        row = acc.setdefault(info[name][0], [0.0, 0.0, 0.0])
        row[0] += dot
        row[1] += na
        row[2] += nb

    def cos(v: list[float]) -> float:
        return v[0] / math.sqrt(v[1] * v[2]) if v[1] > 0 and v[2] > 0 else float("nan")

    per_layer = {layer: cos(acc[layer]) for layer in _sorted_layers(acc)}
    total = [sum(v[i] for v in acc.values()) for i in range(3)]
    return per_layer, (cos(total) if acc else None)
