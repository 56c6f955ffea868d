"""Section "scoring": mask construction with ``persona_kernels.scoring`` vs the per-row Python loop.

Same setting as ``benchmarks/bench_scoring.py``: every Linear of a SmolLM2-135M-shaped model (q 576x576,
k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536 per layer) with random weights and random positive
statistics, sparsity 0.5. The baseline is the loop of the paper's public code: for each output row, sort
the row's scores and prune the lowest. Methods are interleaved module by module; a method's time per repeat
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


def loop_wanda(weight: torch.Tensor, stats: RandomStats, sparsity: float) -> torch.Tensor:
    """Baseline: a Python loop over output rows, sorting each row and pruning its lowest scores."""
    scores = weight.abs() * stats.abs_mean.to(weight.device, torch.float32)
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    n_prune = int(scores.shape[1] * sparsity)
    for i in range(scores.shape[0]):
        idx = torch.sort(scores[i], stable=True)[1][:n_prune]
        pruned[i, idx] = True
    return ~pruned


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
        "loop_wanda_x2": lambda n, w: [loop_wanda(w, stats[p][n], SPARSITY) for p in ("pos", "neg")],
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
        differ += sum(int((a ^ b).sum()) for a, b in zip(ours, loop))
    ratios = {}
    for m in ("wanda_x2", "contrastive_wanda", "contrastive_sparse"):
        ratios[f"{m}/loop_wanda_x2"] = {**ratio(totals[m], totals["loop_wanda_x2"]).to_dict(), "guard": True}
    n_weights = sum(w.numel() for w in weights.values())
    row = {"key": f"SmolLM2-135M-shaped|layers={s['layers']}",
           "params": {"layers": s["layers"], "modules": len(weights), "weights": n_weights,
                      "rows": sum(w.shape[0] for w in weights.values()), "sparsity": SPARSITY},
           "times": {m: t.to_dict() for m, t in totals.items()}, "ratios": ratios,
           "metrics": {"wanda_weights_differing_from_loop": differ}}
    return {"title": TITLE, "settings": s, "rows": [row], "skipped": [],
            "notes": ["wanda_x2 / loop_wanda_x2: two Wanda masks; contrastive_*: one pair (two masks) each, "
                      "all relative to the loop building two Wanda masks (target: >= 10x faster, ratio <= 0.1)",
                      "masks of the loop and ours may differ on exact score ties only (the loop prunes the lower index)"]}
