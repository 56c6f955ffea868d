"""Trade-off sweep: switch effect vs capability-proxy loss over sparsity rho and soft gate gamma.

Statistics are computed once (by the caller); masks are rebuilt once per rho (every method of every grid,
every pair, in the one patched model) and gamma is switched without rebuilding anything. Each point scores
the pair's primary task under the + and - masks (switch effect, paired bootstrap CI) and the neutral text
(capability proxy: mean log-prob per token, loss relative to the base model). Where asked, the same point
is also scored under the label-shuffled control masks, and the switch net of the control is estimated on
the same items (per-item difference, paired bootstrap).

The operating point of a pair is chosen among points that have a control: the largest switch net of the
control whose capability loss is within the bound. Choosing the best of many points on the same items
overstates it (winner's curse), so :func:`confirm` re-measures the chosen point on fresh items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from persona_kernels.evaluation import conditions as C
from persona_kernels.evaluation.metrics import bootstrap_mean, paired_difference
from persona_kernels.evaluation.tasks import Task, score_items

#: the per-item score whose (+ minus -) difference is the switch effect, per task kind
SWITCH_KEY = {"ab": "logodds", "yesno": "logodds", "pairs": "margin"}


@dataclass(frozen=True)
class Grid:
    """A block of sweep points: every method x sparsity x gamma; controls at ``control_gammas`` (None = all)."""

    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    gammas: tuple[float, ...]
    control_gammas: tuple[float, ...] | None = None

    def wants_control(self, gamma: float) -> bool:
        return self.control_gammas is None or any(abs(gamma - g) < 1e-12 for g in self.control_gammas)


def parse_floats(text: str, low: float, high: float) -> list[float]:
    """``"0.01, 0.1"`` -> ``[0.01, 0.1]``; ValueError (saying what was expected) when empty, not numbers or
    outside ``[low, high]``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not low <= v <= high for v in values):
        raise ValueError(f"expected values in [{low}, {high}], got {text!r}")
    return values


def parse_grid(text: str) -> Grid:
    """``"m1;m2@0.01,0.1@0,0.5[@0]"`` -> :class:`Grid` (methods ';'-separated, then rhos, gammas, control gammas)."""
    parts = text.split("@")
    if len(parts) not in (3, 4) or not all(p.strip() for p in parts[:3]):
        raise ValueError(f"persona_kernels.evaluation: sweep grid {text!r}: expected 'METHOD[;METHOD...]@RHO,...@GAMMA,...[@CONTROL_GAMMA,...]'")
    methods = tuple(m.strip() for m in parts[0].split(";") if m.strip())
    for m in methods:
        C.parse_method(m)

    def floats(s: str, what: str, high: float) -> tuple[float, ...]:
        head = f"persona_kernels.evaluation: sweep grid {text!r}: {what}"
        try:
            vals = tuple(parse_floats(s, float("-inf"), float("inf")))
        except ValueError:
            raise ValueError(f"{head} must be numbers, got {s!r}") from None
        if any(not 0.0 <= v <= high for v in vals):
            raise ValueError(f"{head} must lie in [0, {high}], got {s!r}")
        return vals

    ctrl = None
    if len(parts) == 4:
        ctrl = () if parts[3].strip() in ("", "none") else floats(parts[3], "control gammas", 1.0)
    return Grid(methods, floats(parts[1], "sparsities", 0.5), floats(parts[2], "gammas", 1.0), ctrl)


def capability_loss(base: torch.Tensor, cond: torch.Tensor) -> float:
    """Relative loss of mean log-prob per token: ``(mean(base) - mean(cond)) / |mean(base)|`` (> 0 = worse)."""
    b = float(base.mean())
    return (b - float(cond.mean())) / abs(b) if b else float("nan")


def _scores(model, tokenizer, task: Task, names: tuple, gamma: float, systems: tuple, batch_size: int, max_length: int,
            cap: Task | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from persona_kernels import patching

    key = SWITCH_KEY[task.kind]
    vals, caps = [], []
    for name, system in zip(names, systems):
        if patching.is_patched(model):
            patching.set_persona(model, name, gamma=gamma if name else None)
        vals.append(score_items(model, tokenizer, task, system_prompt=system, batch_size=batch_size, max_length=max_length)[key])
        if cap is not None:
            caps.append(score_items(model, tokenizer, cap, system_prompt=system, batch_size=batch_size, max_length=max_length)["capability"])
    return vals, caps


def _point(vals, caps, base_cap) -> dict:
    diff = vals[0] - vals[1]
    out = {"switch": bootstrap_mean(diff).to_dict(), "items": [round(float(v), 6) for v in diff]}
    if caps:
        out["capability_loss"] = 0.5 * (capability_loss(base_cap, caps[0]) + capability_loss(base_cap, caps[1]))
        out["capability"] = [float(c.mean()) for c in caps]
    return out


def _switch_point(model, tokenizer, task: Task, cap: Task, names: tuple, gamma: float, base_cap: torch.Tensor,
                  batch_size: int, systems: tuple = (None, None), max_length: int = 1024) -> dict:
    vals, caps = _scores(model, tokenizer, task, names, gamma, systems, batch_size, max_length, cap)
    return _point(vals, caps, base_cap)


def _add_control(model, tokenizer, task: Task, pair: str, method: str, gamma: float, p: dict, batch_size: int,
                 max_length: int) -> None:
    """Score ``task`` under the label-shuffled control masks of (pair, method) and add ``control`` and ``net``
    (per-item switch minus control switch) to the point ``p``."""
    names = (C.mask_name(pair, method, "+", True), C.mask_name(pair, method, "-", True))
    vals, _ = _scores(model, tokenizer, task, names, gamma, (None, None), batch_size, max_length, None)
    c = (vals[0] - vals[1]).to(torch.float64)
    p["control"] = {"switch": bootstrap_mean(c).to_dict(), "items": [round(float(v), 6) for v in c]}
    p["net"] = bootstrap_mean(torch.tensor(p["items"], dtype=torch.float64) - c).to_dict()


def run_sweep(model, tokenizer, stats: Mapping[str, C.PairStats], tasks: Mapping[str, Task], cap: Task,
              methods: Sequence[str] = (), sparsities: Sequence[float] = (), gammas: Sequence[float] = (), *,
              grids: Sequence[Grid] | None = None, control_gammas: Sequence[float] | None = None,
              batch_size: int = 16, max_length: int = 1024, backend: str = "auto", progress: bool = True) -> dict:
    """The sweep's points ``{"points": [...], "prompt": {pair: point}, "base_capability": float, ...}``.

    ``tasks[pair]`` is the task scored for each pair (its primary persona task). The points are the union of
    ``grids`` (default: one grid of ``methods x sparsities x gammas`` with controls at ``control_gammas``,
    None = every gamma). Each point has ``switch``, per-item ``items``, ``capability_loss`` and, where a
    control was run, ``control`` and ``net`` (switch minus control switch, per item).
    """
    from tqdm.auto import tqdm

    if grids is None:
        grids = [Grid(tuple(methods), tuple(sparsities), tuple(gammas),
                      None if control_gammas is None else tuple(control_gammas))]
    # (rho, method, gamma) -> wants control; one entry per distinct point
    plan: dict[float, dict[tuple[str, float], bool]] = {}
    for g in grids:
        for rho in g.sparsities:
            for m in _valid(g.methods, rho):
                for gamma in g.gammas:
                    key = (m, float(gamma))
                    by_rho = plan.setdefault(float(rho), {})
                    by_rho[key] = by_rho.get(key, False) or g.wants_control(gamma)
    _base(model)
    base_cap = score_items(model, tokenizer, cap, batch_size=batch_size, max_length=max_length)["capability"]
    prompt = {}
    for pair, task in tqdm(list(tasks.items()), desc="sweep prompt points", unit="pair", disable=not progress):
        prompt[pair] = _switch_point(model, tokenizer, task, cap, (None, None), 0.0, base_cap, batch_size,
                                     systems=C.system_prompts(pair), max_length=max_length)
        prompt[pair]["task"] = task.name
    points = []
    total = sum(len(tasks) * len(v) for v in plan.values())
    bar = tqdm(total=total, desc="sweep points (pair x method x rho x gamma)", unit="point", disable=not progress)
    for rho in sorted(plan):
        entries = plan[rho]
        ms = list(dict.fromkeys(m for m, _ in entries))
        need_ctrl = [m for m in ms if any(c for (mm, _), c in entries.items() if mm == m)]
        bar.set_postfix_str(f"building masks rho={rho}")
        info = C.install_masks(model, stats, ms, rho, control=set(need_ctrl), backend=backend)  # one bank per rho
        bar.set_postfix_str(f"rho={rho}")
        for (m, gamma), ctrl in sorted(entries.items(), key=lambda e: (e[0][1], ms.index(e[0][0]))):
            for pair, task in tasks.items():
                names = (C.mask_name(pair, m, "+"), C.mask_name(pair, m, "-"))
                p = _switch_point(model, tokenizer, task, cap, names, gamma, base_cap, batch_size, max_length=max_length)
                p.update(pair=pair, task=task.name, method=m, sparsity=rho, gamma=gamma,
                         difference_rate=info[pair][m]["difference_rate"])
                if ctrl:
                    _add_control(model, tokenizer, task, pair, m, gamma, p, batch_size, max_length)
                    p["control_difference_rate"] = info[pair][m].get("control_difference_rate")
                points.append(p)
                bar.update(1)
    bar.close()
    _base(model)
    all_methods = list(dict.fromkeys(m for g in grids for m in g.methods))
    return {"points": points, "prompt": prompt, "base_capability": float(base_cap.mean()),
            "sparsity": sorted({float(r) for g in grids for r in g.sparsities}),
            "gamma": sorted({float(x) for g in grids for x in g.gammas}), "methods": all_methods,
            "grids": [g.__dict__ for g in grids]}


def _base(model) -> None:
    """Switch a patched model to the base model (an unpatched one is the base model)."""
    from persona_kernels import patching

    if patching.is_patched(model):
        patching.set_persona(model, None)


def _valid(methods: Sequence[str], rho: float) -> list[str]:
    out = []
    for m in methods:
        spec = C.parse_method(m)
        if spec.base == "contrastive_sparse" and rho > 0.5 * float(spec.options.get("restrict", 1.0)) + 1e-12:
            continue
        out.append(m)
    return out


def operating_points(sweep: dict, bound: float, *, require_control: bool | None = None) -> dict:
    """Per pair: the point with the largest switch (net of its control where the sweep ran controls) whose
    capability loss is at most ``bound``.

    ``require_control`` (default: True when any point has a control) restricts the choice to points with a
    control and ranks them by ``net``; otherwise points are ranked by their raw ``switch``.
    """
    pts = sweep.get("points", [])
    if require_control is None:
        require_control = any("net" in p for p in pts)
    best: dict = {}
    for p in pts:
        if not p.get("capability_loss", float("inf")) <= bound:
            continue
        if require_control and "net" not in p:
            continue
        score = p["net"]["mean"] if require_control else p["switch"]["mean"]
        cur = best.get(p["pair"])
        if cur is None or score > cur[0]:
            best[p["pair"]] = (score, p)
    return {pair: p for pair, (_, p) in best.items()}


def confirm(model, tokenizer, stats: Mapping[str, C.PairStats], points: Mapping[str, dict], tasks: Mapping[str, Task],
            cap: Task, *, batch_size: int = 16, max_length: int = 1024, backend: str = "auto",
            progress: bool = True) -> dict:
    """Re-measure each pair's chosen point on fresh items: prompt, the point's masks and their control.

    ``tasks[pair]`` holds items disjoint from the ones the point was chosen on. Returns
    ``{pair: {"prompt": point, "mask": point (with control and net), "mask_vs_prompt": estimate}}``.
    """
    from tqdm.auto import tqdm

    from persona_kernels import patching

    out: dict = {}
    _base(model)
    base_cap = score_items(model, tokenizer, cap, batch_size=batch_size, max_length=max_length)["capability"]
    for pair in tqdm([p for p in points if p in tasks], desc="confirmation on fresh items", unit="pair", disable=not progress):
        op, task = points[pair], tasks[pair]
        pr = _switch_point(model, tokenizer, task, cap, (None, None), 0.0, base_cap, batch_size,
                           systems=C.system_prompts(pair), max_length=max_length)
        C.install_masks(model, {pair: stats[pair]}, [op["method"]], op["sparsity"], control=True, backend=backend)
        names = (C.mask_name(pair, op["method"], "+"), C.mask_name(pair, op["method"], "-"))
        mk = _switch_point(model, tokenizer, task, cap, names, op["gamma"], base_cap, batch_size, max_length=max_length)
        _add_control(model, tokenizer, task, pair, op["method"], op["gamma"], mk, batch_size, max_length)
        mk.update(method=op["method"], sparsity=op["sparsity"], gamma=op["gamma"])
        out[pair] = {"task": task.name, "n": len(task.items), "prompt": pr, "mask": mk,
                     "mask_vs_prompt": paired_difference(mk["items"], pr["items"]).to_dict()}
    _base(model)
    return {"pairs": out, "base_capability": float(base_cap.mean())}


def common_operating_point(sweep: dict, bound: float) -> dict | None:
    """One setting (method, rho, gamma) for every pair: the one with the largest mean standardised net switch.

    Only settings that were run with a control on every pair of the sweep and stay within ``bound`` on every
    pair qualify. A pair's standardised net switch is ``mean(net items) / sd(net items)`` (the paired effect
    size d_z), so A/B log-odds and response margins, whose scales differ, weigh equally. Returns
    ``{"method", "sparsity", "gamma", "score", "pairs": {pair: point}}`` or None when nothing qualifies.
    """
    pairs = list(sweep.get("prompt", {})) or sorted({p["pair"] for p in sweep.get("points", [])})
    by_setting: dict[tuple, dict] = {}
    for p in sweep.get("points", []):
        if "net" in p:
            by_setting.setdefault((p["method"], p["sparsity"], p["gamma"]), {})[p["pair"]] = p
    best = None
    for (m, rho, gamma), pts in by_setting.items():
        if set(pts) != set(pairs) or any(not pt["capability_loss"] <= bound for pt in pts.values()):
            continue
        scores = []
        for pt in pts.values():
            net = torch.tensor(pt["items"], dtype=torch.float64) - torch.tensor(pt["control"]["items"], dtype=torch.float64)
            sd = float(net.std()) if net.numel() > 1 else 0.0
            scores.append(float(net.mean()) / sd if sd > 0 else 0.0)
        score = sum(scores) / len(scores)
        if best is None or score > best["score"]:
            best = {"method": m, "sparsity": rho, "gamma": gamma, "score": score,
                    "standardised_net": dict(zip(pts, scores)), "pairs": pts}
    return best
