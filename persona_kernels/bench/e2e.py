"""Section "e2e": tokens/s of ``generate()`` on SmolLM2-135M.

Three models side by side, interleaved: the unpatched model, the patched model with a persona active
(gated kernels, weights untouched) and a model with the persona's masked weights written in
(``merge_persona``: plain ``F.linear`` on modified weights). Greedy decoding of a fixed number of new
tokens, batch 1 and 8. Masks are random (half of each Linear's weights kept), which does not change speed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from persona_kernels.bench.common import Case, Config, load_default_model, run_cases
from persona_kernels.bench.timing import Timing

TITLE = "End to end: generate() tokens/s"
PROMPTS = [
    "What do you like to do on a free evening?",
    "Describe your ideal weekend.",
    "How do you feel about large parties?",
    "Tell me about a book you enjoyed.",
    "What is the best way to make new friends?",
    "How do you prepare for a long trip?",
    "What does a good morning look like to you?",
    "Give one tip for working in a team.",
]


def settings(cfg: Config) -> dict[str, Any]:
    if cfg.tiny:
        return {"new_tokens": 4, "batch_sizes": [1], "repeats": 2}
    if cfg.quick:
        return {"new_tokens": 16, "batch_sizes": [1, 8], "repeats": 3}
    return {"new_tokens": 64, "batch_sizes": [1, 8], "repeats": cfg.repeats}


def models_for(cfg: Config, base) -> dict[str, Any]:
    """``unpatched`` (``base`` itself), ``patched`` (a copy, persona active) and ``merged`` (a copy, persona
    written into the weights)."""
    from persona_kernels.bench.switching import PERSONAS, random_bank
    from persona_kernels.patching import merge_persona, patch_model, set_persona

    bank = random_bank(base, cfg.seed)
    patched = patch_model(copy.deepcopy(base), bank)
    set_persona(patched, PERSONAS[0])
    merged = patch_model(copy.deepcopy(base), bank)
    merge_persona(merged, PERSONAS[0])
    return {"unpatched": base, "patched": patched, "merged": merged}


def make_cases(cfg: Config, models: dict[str, Any], tok) -> list[Case]:
    """One case per batch size; methods = the names of ``models``."""
    s = settings(cfg)
    base = models["unpatched"]
    t_new = s["new_tokens"]

    def make(bs: int) -> Case:
        enc = tok(PROMPTS[:bs], return_tensors="pt", padding=True).to(cfg.device)
        gen_kwargs = dict(max_new_tokens=t_new, min_new_tokens=t_new, do_sample=False,
                          pad_token_id=tok.pad_token_id)

        def setup():
            fns = {}
            for name, m in models.items():
                def fn(m=m):
                    with torch.no_grad():
                        out = m.generate(**enc, **gen_kwargs)
                    assert out.shape[1] == enc["input_ids"].shape[1] + t_new
                fns[name] = fn
            return fns

        def metrics(t: dict[str, Timing]) -> dict[str, Any]:
            return {n: {"tokens_per_s": bs * t_new / t[n].median} for n in t}

        return Case(key=f"SmolLM2-135M|batch={bs}|new={t_new}",
                    params={"model": "SmolLM2-135M-Instruct", "batch_size": bs, "new_tokens": t_new,
                            "prompt_tokens": int(enc["input_ids"].shape[1]), "dtype": str(next(base.parameters()).dtype)},
                    setup=setup, metrics=metrics, repeats=s["repeats"],
                    ratios=[("patched/unpatched", "patched", "unpatched", True),
                            ("merged/unpatched", "merged", "unpatched", False),
                            ("patched/merged", "patched", "merged", True)])

    return [make(bs) for bs in s["batch_sizes"]]


def run(cfg: Config, model_and_tokenizer=None) -> dict[str, Any]:
    base, tok = model_and_tokenizer or load_default_model(cfg)
    models = models_for(cfg, base)
    try:
        rows, skipped = run_cases(make_cases(cfg, models, tok), cfg, "end to end")
    finally:
        del models
    s = settings(cfg)
    return {"title": TITLE, "settings": s, "rows": rows, "skipped": skipped,
            "notes": ["ratios are time ratios (tokens/s of the denominator / tokens/s of the numerator)"]}
