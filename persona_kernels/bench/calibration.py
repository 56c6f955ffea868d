"""Section "calibration": plain forward vs forward with ``collect_stats`` vs per-Linear host-copy hooks.

Same modes as ``benchmarks/bench_calibration.py`` so the numbers are comparable: (a) plain padded batched
forwards, (b) the same batches through ``persona_kernels.calibration.collect_stats``, (c) the approach of
the paper's public code: a forward hook on every Linear computing ``torch.norm`` of its input per channel and
copying it to the host on every call, one text at a time. Every mode calls the model with
``logits_to_keep=1, use_cache=False`` (what collect_stats passes by default). Texts: short statements of the
bundled extravert / introvert personas.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from persona_kernels.bench.common import Case, Config, linear_modules, load_default_model, run_cases
from persona_kernels.utils.batching import pad_right

TITLE = "Calibration statistics: plain forward vs collect_stats vs per-Linear hooks"
CALL_KWARGS = {"logits_to_keep": 1, "use_cache": False}
PERSONAS = ("extravert", "introvert")


def texts(per_persona: int) -> dict[str, list[str]]:
    """Up to ``per_persona`` short texts of each bundled persona (statements, else responses)."""
    from persona_kernels.personas import default_personas

    data = default_personas()
    out = {}
    for p in PERSONAS:
        items = [it.text or it.response or "" for it in data[p]]
        out[p] = [t for t in items if t][:per_persona]
    return out


def make_batches(token_lists: list[list[int]], batch_size: int, pad_id: int, device: torch.device) -> list[dict]:
    """Right-padded batches grouped by length (less padding; statistics do not depend on the order)."""
    ordered = sorted(token_lists, key=len)
    out = []
    for i in range(0, len(ordered), batch_size):
        ids, mask = pad_right(ordered[i:i + batch_size], pad_id)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), **CALL_KWARGS})
    return out


def run_plain(model: nn.Module, batches: dict[str, list[dict]]) -> None:
    with torch.no_grad():
        for bl in batches.values():
            for b in bl:
                model(**b)


def run_stats(model: nn.Module, batches: dict[str, list[dict]], stop_early: bool = True) -> dict:
    """``collect_stats`` per persona (``stop_early=False``: every forward runs whole, the head included)."""
    from persona_kernels.calibration import collect_stats

    return {p: collect_stats(model, bl, progress=False, stop_early=stop_early) for p, bl in batches.items()}


def run_singles(model: nn.Module, singles: dict[str, list[torch.Tensor]]) -> None:
    """Plain forwards one text at a time, no hooks: the hook approach's cost with free hooks, i.e. the most any
    statistics method gains over it by batching alone."""
    with torch.no_grad():
        for ids_list in singles.values():
            for ids in ids_list:
                model(input_ids=ids, **CALL_KWARGS)


def run_hooks(model: nn.Module, singles: dict[str, list[torch.Tensor]]) -> dict:
    """The hook approach: squared per-channel L2 norm of each Linear input, copied to the host every call."""
    linears = list(linear_modules(model).items())
    result = {}
    with torch.no_grad():
        for persona, ids_list in singles.items():
            acc: dict[str, torch.Tensor] = {}
            rows = {n: 0 for n, _ in linears}

            def make_hook(name):
                def hook(mod, inputs, output):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                    sq = (torch.norm(x, p=2, dim=0) ** 2).cpu()
                    acc[name] = acc[name] + sq if name in acc else sq
                    rows[name] += x.shape[0]
                return hook

            handles = [m.register_forward_hook(make_hook(n)) for n, m in linears]
            try:
                for ids in ids_list:
                    model(input_ids=ids, **CALL_KWARGS)
            finally:
                for h in handles:
                    h.remove()
            result[persona] = {n: (acc[n] / rows[n]).sqrt() for n in acc}
    return result


def settings(cfg: Config) -> dict[str, Any]:
    if cfg.tiny:
        return {"texts_per_persona": 4, "batch_sizes": [4], "repeats": 2}
    if cfg.quick:
        return {"texts_per_persona": 16, "batch_sizes": [16], "repeats": 3}
    return {"texts_per_persona": 64, "batch_sizes": [16, 64], "repeats": cfg.repeats}


def make_cases(cfg: Config, model: nn.Module, tok, check: dict[str, float] | None = None) -> list[Case]:
    """One case per batch size: methods ``plain``, ``stats``, ``hooks``. ``check`` (if given) receives the
    cross-check of the two statistics (max relative difference of the per-channel RMS) on first setup."""
    s = settings(cfg)
    check = {} if check is None else check
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    token_lists = {p: [tok(t)["input_ids"] for t in ts] for p, ts in texts(s["texts_per_persona"]).items()}
    singles = {p: [torch.tensor([ids], device=cfg.device) for ids in tl] for p, tl in token_lists.items()}
    n_tokens = sum(len(ids) for tl in token_lists.values() for ids in tl)

    def make(bs: int) -> Case:
        batches = {p: make_batches(tl, bs, pad_id, cfg.device) for p, tl in token_lists.items()}

        def setup():
            if not check:
                hooks = run_hooks(model, singles)
                stats = run_stats(model, batches)
                worst = 0.0
                for p in stats:
                    for name, rms_h in hooks[p].items():
                        rms_s = stats[p][name].sq_mean.sqrt().float().cpu()
                        worst = max(worst, float(((rms_s - rms_h).abs() / rms_h.abs().clamp_min(1e-6)).max()))
                check["max_rel_diff_rms"] = worst
            return {"plain": lambda: run_plain(model, batches), "stats": lambda: run_stats(model, batches),
                    "whole": lambda: run_stats(model, batches, stop_early=False),
                    "hooks": lambda: run_hooks(model, singles)}

        padded = sum(int(b["input_ids"].numel()) for bl in batches.values() for b in bl)
        return Case(key=f"SmolLM2-135M|batch={bs}",
                    params={"model": "SmolLM2-135M-Instruct", "batch_size": bs, "texts": sum(map(len, token_lists.values())),
                            "tokens": n_tokens, "padded_tokens": padded, "dtype": str(next(model.parameters()).dtype)},
                    setup=setup, repeats=s["repeats"],
                    ratios=[("whole/plain", "whole", "plain", True), ("stats/hooks", "stats", "hooks", True)])

    return [make(bs) for bs in s["batch_sizes"]]


def run(cfg: Config, model_and_tokenizer=None) -> dict[str, Any]:
    model, tok = model_and_tokenizer or load_default_model(cfg)
    check: dict[str, float] = {}
    rows, skipped = run_cases(make_cases(cfg, model, tok, check), cfg, "calibration")
    return {"title": TITLE, "settings": settings(cfg), "rows": rows, "skipped": skipped, "check": dict(check),
            "notes": ["whole/plain - 1 = statistics overhead with every forward run whole; stats = collect_stats as "
                      "called by default (forwards stop after the last recorded Linear); hooks/stats = speed-up over "
                      "the hook approach run one text at a time",
                      "the targets (overhead <= 3 %, >= 3x over hooks) are measured by benchmarks/bench_calibration.py "
                      "at full size: 64 texts per persona and the overhead from per-batch pairs. --quick times a few "
                      "whole passes over 16 texts per persona (one batch each): a smoke test whose spread is wider "
                      "than the overhead itself",
                      "check: max relative difference of the per-channel RMS, collect_stats vs hooks"]}
