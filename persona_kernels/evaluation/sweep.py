"""Trade-off sweep: switch effect vs capability-proxy loss over sparsity rho and soft gate gamma.

Statistics are computed once (by the caller); masks are rebuilt once per rho (every method, every pair, in
the one patched model) and gamma is switched without rebuilding anything. Each point scores the pair's
primary task under the + and - masks (switch effect, paired bootstrap CI) and the neutral text
(capability proxy: mean log-prob per token, loss relative to the base model).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from persona_kernels.evaluation import conditions as C
from persona_kernels.evaluation.metrics import paired_difference
from persona_kernels.evaluation.tasks import Task, score_items

#: the per-item score whose (+ minus -) difference is the switch effect, per task kind
SWITCH_KEY = {"ab": "logodds", "yesno": "logodds", "pairs": "margin"}


def capability_loss(base: torch.Tensor, cond: torch.Tensor) -> float:
    """Relative loss of mean log-prob per token: ``(mean(base) - mean(cond)) / |mean(base)|`` (> 0 = worse)."""
    b = float(base.mean())
    return (b - float(cond.mean())) / abs(b) if b else float("nan")


def _switch_point(model, tokenizer, task: Task, cap: Task, names: tuple, gamma: float, base_cap: torch.Tensor,
                  batch_size: int, systems: tuple = (None, None), max_length: int = 1024) -> dict:
    from persona_kernels import patching

    key = SWITCH_KEY[task.kind]
    vals, caps = [], []
    for name, system in zip(names, systems):
        if patching.is_patched(model):
            patching.set_persona(model, name, gamma=gamma if name else None)
        vals.append(score_items(model, tokenizer, task, system_prompt=system, batch_size=batch_size, max_length=max_length)[key])
        caps.append(score_items(model, tokenizer, cap, system_prompt=system, batch_size=batch_size, max_length=max_length)["capability"])
    sw = paired_difference(vals[0], vals[1])
    loss = 0.5 * (capability_loss(base_cap, caps[0]) + capability_loss(base_cap, caps[1]))
    return {"switch": sw.to_dict(), "capability_loss": loss,
            "capability": [float(c.mean()) for c in caps]}


def run_sweep(model, tokenizer, stats: Mapping[str, C.PairStats], tasks: Mapping[str, Task], cap: Task,
              methods: Sequence[str], sparsities: Sequence[float], gammas: Sequence[float], *, batch_size: int = 16, max_length: int = 1024,
              progress: bool = True) -> dict:
    """The sweep's points ``{"points": [...], "prompt": {pair: point}, "base_capability": float}``.

    ``tasks[pair]`` is the task scored for each pair (its primary persona task).
    """
    from tqdm.auto import tqdm

    from persona_kernels import patching

    patching.set_persona(model, None)
    base_cap = score_items(model, tokenizer, cap, batch_size=batch_size, max_length=max_length)["capability"]
    prompt = {}
    for pair, task in tasks.items():
        prompt[pair] = _switch_point(model, tokenizer, task, cap, (None, None), 0.0, base_cap, batch_size,
                                     systems=C.system_prompts(pair), max_length=max_length)
        prompt[pair]["task"] = task.name
    points = []
    total = sum(len(gammas) * len(tasks) * len(_valid(methods, rho)) for rho in sparsities)
    bar = tqdm(total=total, desc="sweep", disable=not progress)
    for rho in sparsities:
        valid = _valid(methods, rho)
        if not valid:
            continue
        info = C.install_masks(model, stats, valid, rho, control=False)
        for gamma in gammas:
            for pair, task in tasks.items():
                for m in valid:
                    names = (C.mask_name(pair, m, "+"), C.mask_name(pair, m, "-"))
                    p = _switch_point(model, tokenizer, task, cap, names, gamma, base_cap, batch_size, max_length=max_length)
                    p.update(pair=pair, task=task.name, method=m, sparsity=rho, gamma=gamma,
                             difference_rate=info[pair][m]["difference_rate"])
                    points.append(p)
                    bar.update(1)
    bar.close()
    patching.set_persona(model, None)
    return {"points": points, "prompt": prompt, "base_capability": float(base_cap.mean()),
            "sparsity": list(sparsities), "gamma": list(gammas), "methods": list(methods)}


def _valid(methods: Sequence[str], rho: float) -> list[str]:
    out = []
    for m in methods:
        spec = C.parse_method(m)
        if spec.base == "contrastive_sparse" and rho > 0.5 * float(spec.options.get("restrict", 1.0)) + 1e-12:
            continue
        out.append(m)
    return out


def operating_points(sweep: dict, bound: float) -> dict:
    """Per pair: the point with the largest switch whose capability loss is at most ``bound``."""
    best: dict = {}
    for p in sweep.get("points", []):
        if not p["capability_loss"] <= bound:
            continue
        cur = best.get(p["pair"])
        if cur is None or p["switch"]["mean"] > cur["switch"]["mean"]:
            best[p["pair"]] = p
    return best
