"""Section "scoring": mask construction with ``persona_kernels.scoring`` vs the paper's per-row loop.

Same setting as ``benchmarks/bench_scoring.py``: every Linear of a SmolLM2-135M-shaped model (q 576x576,
k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536 per layer) with random weights and random positive
statistics, sparsity 0.5. Baselines: the loop of the paper's public code (for each output row,
``torch.topk(W_metric[i], k, largest=False)`` prunes the k smallest scores) and one batched
``torch.topk(S, k, dim=1)``. Methods are interleaved module by module; a method's time per repeat
is the sum over modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from persona_kernels.bench.common import Case, Config, run_case
from persona_kernels.bench.timing import Timing, ratio

TITLE = "Mask construction: vectorised scoring vs the per-row loop"
SPARSITY = 0.5
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


@dataclass
class RandomStats:
    """Stand-in for ActivationStats: random positive per-channel statistics."""

    abs_mean: torch.Tensor
    abs_var: torch.Tensor
    l2_norm: torch.Tensor


def _stats(k: int, gen: torch.Generator) -> RandomStats:
    def r():
        return torch.rand(k, generator=gen, dtype=torch.float64) + 0.05

    return RandomStats(r(), r(), r() * 30)


def _scores(weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * a.to(weight.device, torch.float32)


def paper_loop_wanda(weight: torch.Tensor, a: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Baseline: the paper's public code. Scores ``|W| * A``, then for each output row
    ``torch.topk(W_metric[i], k, largest=False)`` marks the k smallest as pruned."""
    from persona_kernels.scoring import num_pruned

    w_metric = _scores(weight, a)
    k = num_pruned(sparsity, w_metric.shape[1])
    pruned = torch.zeros_like(w_metric, dtype=torch.bool)
    for i in range(w_metric.shape[0]):
        pruned[i, torch.topk(w_metric[i], k, largest=False)[1]] = True
    return ~pruned


def batched_topk_wanda(weight: torch.Tensor, a: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Baseline a user would write: one ``torch.topk(S, k, dim=1, largest=False)`` over all rows, scatter."""
    from persona_kernels.scoring import num_pruned

    w_metric = _scores(weight, a)
    k = num_pruned(sparsity, w_metric.shape[1])
    idx = torch.topk(w_metric, k, dim=1, largest=False)[1]
    return ~torch.zeros_like(w_metric, dtype=torch.bool).scatter_(1, idx, True)


def tie_only_differences(ours: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, a: torch.Tensor) -> bool:
    """True when two keep-masks keep the same count per row and differ only on scores equal to the
    row's threshold (topk's order among equal scores is unspecified; persona_kernels keeps the lower index)."""
    diff = ours ^ other
    if not bool(diff.any()):
        return True
    s = _scores(weight, a)
    kth = s.masked_fill(~ours, float("inf")).amin(dim=1, keepdim=True)
    return torch.equal(ours.sum(1), other.sum(1)) and bool((s[diff] == kth.expand_as(s)[diff]).all())


def settings(cfg: Config) -> dict[str, Any]:
    if cfg.tiny:
        return {"layers": 1, "repeats": 2}
    if cfg.quick:
        return {"layers": 4, "repeats": 3}
    return {"layers": 30, "repeats": cfg.repeats}


def build(cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Callable[[str, torch.Tensor], object]]]:
    """Random SmolLM2-shaped weights (name -> [N, K]) and the methods ``name -> fn(module_name, weight)``."""
    from persona_kernels import scoring

    s = settings(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = {f"model.layers.{i}.{name}": (torch.randn(*shape, generator=gen) * 0.02).to(cfg.device)
               for i in range(s["layers"]) for name, shape in SHAPES.items()}
    stats = {p: {n: _stats(w.shape[1], gen) for n, w in weights.items()} for p in ("pos", "neg")}
    methods = {
        "wanda_x2": lambda n, w: [scoring.wanda(w, stats[p][n], SPARSITY) for p in ("pos", "neg")],
        "contrastive_wanda": lambda n, w: scoring.contrastive_wanda(w, stats["pos"][n], stats["neg"][n], SPARSITY),
        "contrastive_sparse": lambda n, w: scoring.contrastive_sparse(w, stats["pos"][n], stats["neg"][n], SPARSITY),
        "loop_wanda_x2": lambda n, w: [paper_loop_wanda(w, stats[p][n].abs_mean, SPARSITY) for p in ("pos", "neg")],
        "topk_wanda_x2": lambda n, w: [batched_topk_wanda(w, stats[p][n].abs_mean, SPARSITY) for p in ("pos", "neg")],
    }
    return weights, methods


def run(cfg: Config) -> dict[str, Any]:
    from tqdm.auto import tqdm

    s = settings(cfg)
    weights, methods = build(cfg)
    totals = {m: Timing([0.0] * s["repeats"]) for m in methods}
    # agreement of our Wanda masks with the loop (may differ on exact score ties only)
    differ = 0
    for n, w in tqdm(list(weights.items()), desc="scoring", unit="module", disable=not cfg.progress, leave=False):
        case = Case(key=n, params={}, setup=lambda n=n, w=w: {m: (lambda f=f: f(n, w)) for m, f in methods.items()},
                    ratios=[], repeats=s["repeats"])
        row = run_case(case, cfg)
        for m in methods:
            for i, v in enumerate(row["times"][m]["samples_s"]):
                totals[m].samples[i] += v
        ours, loop = methods["wanda_x2"](n, w), methods["loop_wanda_x2"](n, w)
        differ += sum(int((x ^ y).sum()) for x, y in zip(ours, loop))
    ratios = {}
    for m in ("wanda_x2", "contrastive_wanda", "contrastive_sparse"):
        ratios[f"{m}/loop_wanda_x2"] = {**ratio(totals[m], totals["loop_wanda_x2"]).to_dict(), "guard": True}
    ratios["wanda_x2/topk_wanda_x2"] = {**ratio(totals["wanda_x2"], totals["topk_wanda_x2"]).to_dict(), "guard": True}
    n_weights = sum(w.numel() for w in weights.values())
    row = {"key": f"SmolLM2-135M-shaped|layers={s['layers']}",
           "params": {"layers": s["layers"], "modules": len(weights), "weights": n_weights,
                      "rows": sum(w.shape[0] for w in weights.values()), "sparsity": SPARSITY},
           "times": {m: t.to_dict() for m, t in totals.items()}, "ratios": ratios,
           "metrics": {"wanda_weights_differing_from_loop": differ}}
    return {"title": TITLE, "settings": s, "rows": [row], "skipped": [],
            "notes": ["wanda_x2 / loop_wanda_x2: two Wanda masks; contrastive_*: one pair (two masks) each, "
                      "all relative to the paper's per-row topk loop building two Wanda masks (target: >= 10x "
                      "faster, ratio <= 0.1); wanda_x2 / topk_wanda_x2: vs one batched topk (target <= 0.33)",
                      "masks of the loop and ours may differ on exact score ties only (topk's order among equal "
                      "scores is unspecified)"]}
