"""``persona-kernels eval``: prompt vs Wanda vs contrastive persona masks on the shared evaluation data.

One model is patched once; every condition (base, persona prompt, each method's masks, label-shuffled
control masks, prompt + mask, any gamma and sparsity) is a switch of the active mask and/or system prompt.
Calibration statistics are computed once (per text block) and masks rebuilt per sparsity.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from persona_kernels.evaluation import conditions as C
from persona_kernels.evaluation import sweep as S
from persona_kernels.evaluation.tasks import TASK_SPECS, Split, Task, capability_texts, load_task, score_items
from persona_kernels.utils.cli_args import ArgumentParser, HelpFormatter

DEFAULT_METHODS = ("wanda", "contrastive_wanda", "contrastive_wanda_sharp", "contrastive_sparse",
                   "contrastive_sparse_relative", "contrastive_sparse_restricted")
DEFAULT_TASKS = tuple(TASK_SPECS)
SWEEP_SPARSITY = (0.005, 0.01, 0.02, 0.05, 0.1)
SWEEP_GAMMA = (0.0, 0.25, 0.5, 0.75)


class EvalError(ValueError):
    """A bad command-line value; printed as ``persona-kernels eval: error: ...``."""


def _floats(text: str, name: str, low: float, high: float) -> list[float]:
    try:
        return S.parse_floats(text, low, high)
    except ValueError as e:
        raise EvalError(f"--{name}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="persona-kernels eval", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="model path or name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--shared", default=None, help="shared data folder (default $PERSONA_KERNELS_SHARED or ../shared)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from {', '.join(DEFAULT_TASKS)}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated mask methods: aliases or specs such as contrastive_wanda:tau=0.2,phi=relu")
    p.add_argument("--sparsity", default="0.05", help="sparsity rho of the main comparison")
    p.add_argument("--gamma", default="0", help="soft gate gamma of the main comparison")
    p.add_argument("--limit", type=int, default=None, help="evaluation items per task")
    p.add_argument("--calib-limit", type=int, default=None, help="calibration texts per persona")
    p.add_argument("--capability-limit", type=int, default=None, help="neutral texts of the capability proxy (default --limit)")
    p.add_argument("--calib-source", choices=("task", "default"), default="task",
                   help="calibrate on the task's calibration split (task) or on the bundled persona texts (default)")
    p.add_argument("--prompt-mask", default=None, help="methods also run as prompt + mask (default: the first contrastive one)")
    p.add_argument("--capability-pair", default=None, help="pair whose + masks are scored on MMLU/HellaSwag (default: first)")
    p.add_argument("--no-control", action="store_true", help="skip the label-shuffled control masks")
    p.add_argument("--sweep", action="store_true", help="trade-off sweep over sparsity and gamma")
    p.add_argument("--sweep-only", action="store_true", help="skip the main comparison (sweep, with its prompt points, only)")
    p.add_argument("--sweep-sparsity", default=",".join(map(str, SWEEP_SPARSITY)),
                   help="comma-separated sparsities rho of the sweep grid")
    p.add_argument("--sweep-gamma", default=",".join(map(str, SWEEP_GAMMA)),
                   help="comma-separated soft gates gamma of the sweep grid")
    p.add_argument("--sweep-control-gamma", default="all",
                   help="gammas at which the sweep also scores the label-shuffled control ('all', 'none' or a list)")
    p.add_argument("--sweep-grid", action="append", default=None, metavar="M1;M2@RHOS@GAMMAS[@CONTROL_GAMMAS]",
                   help="a sweep block (repeatable); replaces the --methods x --sweep-sparsity x --sweep-gamma grid")
    p.add_argument("--confirm-limit", type=int, default=None,
                   help="re-measure each pair's operating point on this many fresh items (after the --limit ones)")
    p.add_argument("--bound", type=float, default=0.02, help="operating point: max capability loss (fraction of base)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the shuffled-label controls and the bootstrap")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (calibration and scoring)")
    p.add_argument("--max-length", type=int, default=1024, help="max tokens per scored/calibration sequence (left-truncated)")
    p.add_argument("--block", type=int, default=4, help="texts per statistics block (shuffled control granularity)")
    p.add_argument("--backend", default="torch", help="gated-linear backend of the patched model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny run: --limit 8 --calib-limit 8, two methods")
    p.add_argument("--no-figures", action="store_true", help="write JSON and markdown only (no PNG figures)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def split_methods(text: str | None) -> list[str]:
    """``"wanda,contrastive_wanda:tau=0.2,phi=relu"`` -> ``["wanda", "contrastive_wanda:tau=0.2,phi=relu"]``
    (a ``key=value`` part belongs to the method before it)."""
    methods: list[str] = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and methods:
            methods[-1] += "," + part
        else:
            methods.append(part)
    return methods


def _config(args: argparse.Namespace) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_SPECS]
    if bad or not tasks:
        raise EvalError(f"--tasks: unknown task(s) {bad}; expected a comma-separated subset of {list(TASK_SPECS)}")
    methods = split_methods(args.methods)
    for m in methods:
        try:
            C.parse_method(m)
        except ValueError as e:
            raise EvalError(f"--methods: {e}") from None
    if args.quick:
        args.limit = args.limit or 8
        args.calib_limit = args.calib_limit or 8
        if args.methods == ",".join(DEFAULT_METHODS):
            methods = ["wanda", "contrastive_wanda_sharp"]
    for name in ("limit", "calib_limit", "capability_limit", "batch_size", "block", "max_length", "confirm_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')}: expected a positive integer, got {v}")
    if args.sweep_only and not args.sweep:
        raise EvalError("--sweep-only needs --sweep")
    if (args.sweep_grid or args.confirm_limit) and not args.sweep:
        raise EvalError("--sweep-grid and --confirm-limit need --sweep")
    if args.confirm_limit and not args.limit:
        raise EvalError("--confirm-limit needs --limit (the confirmation items come after the first --limit items)")
    grids = None
    if args.sweep_grid:
        try:
            grids = [S.parse_grid(g) for g in args.sweep_grid]
        except ValueError as e:
            raise EvalError(f"--sweep-grid: {e}") from None
        methods = list(dict.fromkeys(methods + [m for g in grids for m in g.methods]))
    cg = args.sweep_control_gamma.strip()
    control_gamma = None if cg == "all" else [] if cg == "none" else _floats(cg, "sweep-control-gamma", 0.0, 1.0)
    sparsity = _floats(args.sparsity, "sparsity", 0.0, 0.99)
    gamma = _floats(args.gamma, "gamma", 0.0, 1.0)
    if len(sparsity) != 1 or len(gamma) != 1:
        raise EvalError("--sparsity/--gamma take one value for the main comparison; use --sweep for several")
    if args.prompt_mask is None:
        pm = [next((m for m in methods if C.parse_method(m).contrastive), methods[0])] if methods else []
    else:
        pm = [m.strip() for m in args.prompt_mask.split(",") if m.strip()]
        if any(m not in methods for m in pm):
            raise EvalError(f"--prompt-mask: {pm} must be among --methods {methods}")
    return {
        "tasks": tasks, "methods": methods, "sparsity": sparsity[0], "gamma": gamma[0], "prompt_mask": pm,
        "sweep_sparsity": _floats(args.sweep_sparsity, "sweep-sparsity", 0.0, 0.5),
        "sweep_gamma": _floats(args.sweep_gamma, "sweep-gamma", 0.0, 1.0),
        "sweep_grids": [dataclasses.asdict(g) for g in grids] if grids else None, "sweep_control_gamma": control_gamma,
    }


def load_tasks(names: Sequence[str], args) -> tuple[dict[str, Task], dict[str, Task]]:
    """(evaluated tasks, calibration task per pair). A pair's calibration task is the task named like the pair."""
    tasks = {n: load_task(n, shared=args.shared, seed=args.seed, limit=args.limit, calib_limit=args.calib_limit)
             for n in names}
    pairs = sorted({t.pair for t in tasks.values() if t.pair}, key=C.PAIRS.index)
    calib = {}
    for pair in pairs:
        calib[pair] = tasks[pair] if pair in tasks else load_task(
            pair, shared=args.shared, seed=args.seed, limit=args.limit, calib_limit=args.calib_limit)
    return tasks, calib


def _capability_task(tasks: dict[str, Task], args, offset: int = 0) -> Task:
    """The neutral-text capability proxy: HellaSwag contexts + gold endings (evaluation split, after
    ``offset`` items)."""
    n = args.capability_limit or args.limit
    hs = None if offset else tasks.get("hellaswag")
    if hs is not None and n is not None and len(hs.items) < n:
        hs = None
    hs = hs or load_task("hellaswag", shared=args.shared, seed=args.seed, limit=n, offset=offset)
    n = n or len(hs.items)
    texts = capability_texts(hs.items[:n])
    split = Split(args.seed, hs.split.n_items, [], hs.split.evaluation[:n])
    return Task("capability", "text", hs.path, None, False, split, texts)


def evaluate(model, tokenizer, cfg: dict, tasks: dict[str, Task], cap: Task, args, *, progress: bool) -> dict:
    """Per-item scores ``{pair or "general": {task: {condition: {key: list}}}}`` plus the conditions used."""
    pairs = sorted({t.pair for t in tasks.values() if t.pair}, key=C.PAIRS.index)
    conds_used: dict = {}
    jobs = []
    for pair in pairs:
        conds = C.pair_conditions(pair, cfg["methods"], gamma=cfg["gamma"], control=not args.no_control,
                                  prompt_mask=cfg["prompt_mask"])
        conds_used[pair] = [c.__dict__ for c in conds]
        for c in conds:
            for t in (t for t in tasks.values() if t.pair == pair):
                jobs.append((pair, t, c))
            if not c.group.startswith(("prompt+", "control/")):
                jobs.append((pair, cap, c))
    general = [t for t in tasks.values() if t.pair is None]
    cap_pair = args.capability_pair or (pairs[0] if pairs else None)
    if general:
        gconds = [C.Condition("base", "base", "0")]
        if cap_pair:
            gconds += [C.Condition(f"{m}+", m, "+", C.mask_name(cap_pair, m, "+"), cfg["gamma"]) for m in cfg["methods"]]
        conds_used["general"] = [c.__dict__ for c in gconds] + [{"capability_pair": cap_pair}]
        for c in gconds:
            for t in general:
                jobs.append(("general", t, c))
    scores = score_jobs(model, tokenizer, jobs, batch_size=args.batch_size, max_length=args.max_length, progress=progress)
    return {"scores": scores, "conditions": conds_used, "capability_pair": cap_pair}


def score_jobs(model, tokenizer, jobs: Sequence[tuple[str, Task, C.Condition]], *, batch_size: int = 16,
               max_length: int = 1024, progress: bool = True, desc: str = "evaluation") -> dict:
    """Score every ``(pair, task, condition)`` job: ``{pair: {task: {condition: {key: list}}}}``.

    Jobs are grouped by condition, so each mask is switched on once; a (task, mask, gamma, system prompt)
    scored for one pair is reused for another (e.g. the base model's capability texts).
    """
    from tqdm.auto import tqdm

    from persona_kernels import patching

    scores: dict = {}
    done: dict[tuple, dict] = {}
    jobs = sorted(jobs, key=lambda j: (j[2].mask or "", j[2].system or ""))
    bar = tqdm(jobs, desc=desc, unit="task x condition", disable=not progress)
    for pair, task, c in bar:
        bar.set_postfix_str(f"{C.pair_label(pair)}: {task.name} under {c.name}", refresh=False)
        key = (id(task), c.mask, c.gamma if c.mask else None, c.system)
        if key not in done:
            if patching.is_patched(model):
                patching.set_persona(model, c.mask, gamma=c.gamma if c.mask else None)
            out = score_items(model, tokenizer, task, system_prompt=c.system, batch_size=batch_size, max_length=max_length)
            done[key] = {k: v.tolist() for k, v in out.items()}
        scores.setdefault(pair, {}).setdefault(task.name, {})[c.name] = done[key]
    if patching.is_patched(model):
        patching.set_persona(model, None)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args, list(sys.argv[1:] if argv is None else argv))
    except EvalError as e:
        print(f"persona-kernels eval: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"persona-kernels eval: error: {e}", file=sys.stderr)
        return 2


def _run(args, argv: list[str]) -> int:
    from persona_kernels.evaluation import report as R
    from persona_kernels.models import load_model

    cfg = _config(args)
    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, calib_tasks = load_tasks(cfg["tasks"], args)
    cap = _capability_task(tasks, args)
    timings["load_data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tokenizer = load_model(args.model, dtype=dtype, padding_side="right")
    model.eval()
    timings["load_model_s"] = time.perf_counter() - t

    texts = {}
    calib_info = {}
    for pair, task in calib_tasks.items():
        if args.calib_source == "default" and pair in ("power", "energy"):
            pos, neg = C.default_calibration_texts(pair)
            if args.calib_limit:
                pos, neg = pos[: args.calib_limit], neg[: args.calib_limit]
            calib_info[pair] = {"source": "bundled persona texts", "n": [len(pos), len(neg)]}
        else:
            pos, neg = C.calibration_texts(task)
            calib_info[pair] = {"source": f"{task.name} calibration split", "task": task.name, "n": [len(pos), len(neg)]}
        texts[pair] = (pos, neg)

    stats = {}
    if not cfg["methods"]:
        raise EvalError("--methods: no mask method given")
    if cfg["methods"] and texts:
        t = time.perf_counter()
        stats = C.pair_statistics(model, tokenizer, texts, block=args.block, seed=args.seed,
                                  batch_size=max(args.block, 1), tokens="response", max_length=args.max_length,
                                  progress=progress)
        timings["statistics_s"] = time.perf_counter() - t
        for pair, ps in stats.items():
            calib_info[pair]["tokens"] = ps.tokens
    t = time.perf_counter()
    if stats and not args.sweep_only:  # the sweep builds its own masks per sparsity
        mask_info = C.install_masks(model, stats, cfg["methods"], cfg["sparsity"], backend=args.backend,
                                    control=not args.no_control, progress=progress)
    elif args.sweep_only:
        mask_info = {}
    else:
        mask_info = {}
        cfg["methods"], cfg["prompt_mask"] = [], []
    timings["masks_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if args.sweep_only:
        if not args.sweep:
            raise EvalError("--sweep-only needs --sweep")
        result = {"scores": {}, "conditions": {}, "capability_pair": None}
    else:
        result = evaluate(model, tokenizer, cfg, tasks, cap, args, progress=progress)
    timings["evaluation_s"] = time.perf_counter() - t

    sweep = None
    if args.sweep and stats:
        t = time.perf_counter()
        sweep = S.run_sweep(model, tokenizer, stats, {p: calib_tasks[p] for p in stats}, cap, cfg["methods"],
                            cfg["sweep_sparsity"], cfg["sweep_gamma"], grids=[S.Grid(**g) for g in cfg["sweep_grids"]] if cfg["sweep_grids"] else None,
                            control_gammas=cfg["sweep_control_gamma"], batch_size=args.batch_size,
                            max_length=args.max_length, backend=args.backend, progress=progress)
        timings["sweep_s"] = time.perf_counter() - t
        if args.confirm_limit:
            t = time.perf_counter()
            ops = S.operating_points(sweep, args.bound)
            fresh = {p: load_task(calib_tasks[p].name, shared=args.shared, seed=args.seed, limit=args.confirm_limit,
                                  calib_limit=args.calib_limit, offset=args.limit) for p in ops}
            fresh_cap = _capability_task(tasks, args, offset=args.capability_limit or args.limit)
            sweep["confirmation"] = S.confirm(model, tokenizer, stats, ops, fresh, fresh_cap, batch_size=args.batch_size,
                                              max_length=args.max_length, backend=args.backend, progress=progress)
            sweep["confirmation"]["items"] = {p: fresh[p].split.evaluation for p in fresh}
            sweep["confirmation"]["capability_indices"] = fresh_cap.split.evaluation
            timings["confirm_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    command = "persona-kernels eval " + " ".join(shlex.quote(a) for a in argv)
    report = R.build_report(
        command=command, model=args.model or "SmolLM2-135M-Instruct", cfg=cfg, args=vars(args), tasks=tasks, cap=cap,
        calib=calib_info, masks=mask_info, result=result, sweep=sweep, bound=args.bound, timings=timings,
    )
    R.write_report(report, out, figures=not args.no_figures)
    print(f"persona-kernels eval: wrote {out / 'report.json'} and {out / 'report.md'} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
