"""The main job: calibrate the default persona pairs on a real chat model and measure the switch.

For each pair (e.g. power_seeking / power_averse) it
1. splits the bundled persona texts into calibration and held-out items (fixed seed, paired);
2. records statistics on the calibration items (response tokens) and builds contrastive masks, plus
   masks from the same texts with persona labels shuffled (the control);
3. measures on held-out items, in one patched model (no weight copies, O(1) switching):
   - the paired response margin d (mean log-prob/token of persona+ minus persona- response),
   - bias-free A/B log-odds of the bundled A/B questions (both option orders),
   under base, persona system prompts, persona masks and control masks; the switch effect of a
   condition pair is the paired difference (+ minus -) with a bootstrap 95% interval;
4. measures the capability cost: mean log-prob per token on bundled neutral text;
5. generates one short answer per persona, and writes the bank, report.json and report.md.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from persona_kernels.evaluation import ABItem, ResponsePair, paired_difference, response_margin, score_ab, text_logprob
from persona_kernels.evaluation.metrics import Estimate

DEFAULT_METHOD_KWARGS = {"contrastive_wanda": {"phi": "softplus", "tau": 0.1}, "contrastive_sparse": {}, "wanda": {}}


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults are the operating point stated in the README."""

    model: str | None = None
    out_dir: str = "runs/demo"
    method: str = "contrastive_wanda"
    sparsity: float = 0.1
    gamma: float = 0.0
    holdout: float = 0.25
    seed: int = 0
    max_calibration: int | None = None
    max_eval: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 40
    dtype: str = "float32"
    method_kwargs: dict = field(default_factory=dict)
    control: bool = True
    progress: bool = True


def neutral_texts() -> list[str]:
    """Bundled neutral paragraphs (capability proxy), written for this project."""
    text = resources.files("persona_kernels").joinpath("data/neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_pair(pos_items: Sequence, neg_items: Sequence, holdout: float, seed: int):
    """Index-paired split of two parallel persona lists into (calibration, held-out) parts."""
    n = min(len(pos_items), len(neg_items))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(holdout * n)))
    ev, cal = sorted(order[:n_eval]), sorted(order[n_eval:])
    return ([pos_items[i] for i in cal], [neg_items[i] for i in cal]), ([pos_items[i] for i in ev], [neg_items[i] for i in ev]), {
        "calibration_indices": cal,
        "heldout_indices": ev,
    }


def shuffled_groups(pos_items: Sequence, neg_items: Sequence, seed: int):
    """The same calibration texts with persona labels assigned at random (equal group sizes)."""
    pool = list(pos_items) + list(neg_items)
    random.Random(seed + 1).shuffle(pool)
    half = len(pool) // 2
    return pool[:half], pool[half : 2 * half]


def _response_pairs(pos_items, neg_items) -> list[ResponsePair]:
    return [
        ResponsePair(p.prompt, p.response, n.response)
        for p, n in zip(pos_items, neg_items)
        if p.prompt and n.prompt and p.response and n.response and p.prompt == n.prompt
    ]


def _estimate(values) -> dict:
    from persona_kernels.evaluation.metrics import bootstrap_mean

    return bootstrap_mean(values).to_dict()


def _generate(model, tokenizer, prompt: str, system: str | None, max_new_tokens: int) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(config: DemoConfig) -> dict:
    """Run the demo end to end; returns the report dict (also written under ``config.out_dir``)."""
    from persona_kernels import patching, personas
    from persona_kernels.models import load_model
    from persona_kernels.pipeline import build_bank, persona_stats

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    t = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=dtype)
    model.eval()
    timings["load_model_s"] = time.perf_counter() - t

    texts = personas.default_personas()
    pair_names = personas.default_pair_names()
    method_kwargs = {**DEFAULT_METHOD_KWARGS.get(config.method, {}), **config.method_kwargs}
    report: dict = {
        "model": config.model or "SmolLM2-135M-Instruct",
        "config": {k: v for k, v in vars(config).items() if k != "progress"},
        "method_kwargs": method_kwargs,
        "pairs": {},
    }
    ab_all = personas.load_ab_questions()
    neutral = neutral_texts()
    calib_sets: dict[str, list] = {}
    heldout: dict[str, tuple] = {}
    for pair, (pos, neg) in pair_names.items():
        (cal_p, cal_n), (ev_p, ev_n), split = split_pair(texts[pos], texts[neg], config.holdout, config.seed)
        if config.max_calibration:
            cal_p, cal_n = cal_p[: config.max_calibration], cal_n[: config.max_calibration]
        if config.max_eval:
            ev_p, ev_n = ev_p[: config.max_eval], ev_n[: config.max_eval]
        calib_sets[pos], calib_sets[neg] = cal_p, cal_n
        if config.control:
            sh_p, sh_n = shuffled_groups(cal_p, cal_n, config.seed)
            calib_sets[f"control:{pos}"], calib_sets[f"control:{neg}"] = sh_p, sh_n
        heldout[pair] = (pos, neg, ev_p, ev_n)
        report["pairs"][pair] = {"positive": pos, "negative": neg, "split": {**split, "seed": config.seed}}

    t = time.perf_counter()
    stats, seen = persona_stats(model, tokenizer, calib_sets, batch_size=config.batch_size, progress=config.progress)
    timings["statistics_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pairs = [(pos, neg) for pos, neg in pair_names.values()]
    if config.control:
        pairs += [(f"control:{pos}", f"control:{neg}") for pos, neg in pair_names.values()]
    bank = build_bank(
        model, stats, method=config.method, sparsity=config.sparsity, pairs=pairs, method_kwargs=method_kwargs,
        default_gamma=config.gamma, tokens_seen=seen, extra_metadata={"tokens": "response", "source": "persona_kernels demo"},
    )
    timings["masks_s"] = time.perf_counter() - t
    bank_path = out / "bank.safetensors"
    bank.save(bank_path)
    report["bank"] = {"path": str(bank_path), "personas": bank.personas, "tokens_seen": seen}

    from persona_kernels.analysis import compare

    patching.patch_model(model, bank)
    t = time.perf_counter()
    gen_prompts = {"power": "Would you like to be given control over the company's budget?",
                   "energy": "How would you like to spend your Saturday evening?"}
    for pair, (pos, neg, ev_p, ev_n) in heldout.items():
        entry = report["pairs"][pair]
        cmp = compare(bank, pos, neg)
        entry["mask_difference"] = {"overall": cmp.difference_rate, "attention": cmp.attn_difference_rate,
                                    "mlp": cmp.mlp_difference_rate, "jaccard": cmp.jaccard}
        ctl = compare(bank, f"control:{pos}", f"control:{neg}") if config.control else None
        if ctl is not None:
            entry["control_mask_difference"] = {"overall": ctl.difference_rate}
        rp = _response_pairs(ev_p, ev_n)
        ab = [ABItem(q.question, q.answer_matching.strip("() "), pair) for q in ab_all if q.pair == pair]
        # ABQuestion.answer_matching is the positive persona's letter when q.persona == pos
        ab = [it if q.persona == pos else ABItem(it.question, it.not_matching, pair) for it, q in
              zip(ab, [q for q in ab_all if q.pair == pair])]
        conditions = {
            "base": (None, None),
            "prompt+": (None, personas.system_prompt(pos)),
            "prompt-": (None, personas.system_prompt(neg)),
            "mask+": (pos, None),
            "mask-": (neg, None),
        }
        if config.control:
            conditions["control+"] = (f"control:{pos}", None)
            conditions["control-"] = (f"control:{neg}", None)
        margins, logodds, capability = {}, {}, {}
        for cond, (mask, system) in conditions.items():
            with patching.persona(model, mask, gamma=config.gamma if mask else None):
                margins[cond] = response_margin(model, tokenizer, rp, system_prompt=system, batch_size=config.batch_size)
                if ab:
                    logodds[cond] = score_ab(model, tokenizer, ab, system_prompt=system, batch_size=config.batch_size).logodds
                if system is None and (cond == "base" or pair == next(iter(heldout)) or mask is not None):
                    capability[cond] = text_logprob(model, tokenizer, neutral, batch_size=config.batch_size)
        entry["n_response_pairs"] = len(rp)
        entry["n_ab"] = len(ab)
        entry["response_margin"] = {c: _estimate(v) for c, v in margins.items()}
        entry["ab_logodds"] = {c: _estimate(v) for c, v in logodds.items()}
        switch = {}
        for name, plus, minus in (("prompt", "prompt+", "prompt-"), ("mask", "mask+", "mask-"), ("control", "control+", "control-")):
            if plus in margins:
                switch[name] = {"response_margin": paired_difference(margins[plus], margins[minus]).to_dict()}
                if plus in logodds:
                    switch[name]["ab_logodds"] = paired_difference(logodds[plus], logodds[minus]).to_dict()
        entry["switch"] = switch
        base_cap = capability["base"]
        entry["capability"] = {
            c: {"mean_logprob_per_token": float(v.mean()), "change_vs_base": paired_difference(v, base_cap).to_dict()}
            for c, v in capability.items()
        }
        entry["generation"] = {}
        for who, mask, system in (("base", None, None), (pos, pos, None), (neg, neg, None), (f"prompt:{pos}", None, personas.system_prompt(pos))):
            with patching.persona(model, mask, gamma=config.gamma if mask else None):
                entry["generation"][who] = _generate(model, tokenizer, gen_prompts.get(pair, "Tell me about yourself."), system, config.max_new_tokens)
    timings["evaluation_s"] = time.perf_counter() - t
    patching.unpatch_model(model)
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    _write_atomic(out / "report.json", json.dumps(report, indent=2))
    _write_atomic(out / "report.md", render_markdown(report))
    return report


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _fmt(est: dict) -> str:
    return str(Estimate(est["mean"], est["low"], est["high"], est["n"]))


def render_markdown(report: dict) -> str:
    """A short human-readable report of :func:`run_demo`'s results."""
    cfg = report["config"]
    lines = [
        f"# persona_kernels demo — {report['model']}",
        "",
        f"Method {cfg['method']} ({report['method_kwargs']}), sparsity {cfg['sparsity']}, gamma {cfg['gamma']}, "
        f"statistics on response tokens; held-out fraction {cfg['holdout']} (seed {cfg['seed']}).",
        "",
        "Switch effect = condition(+) minus condition(-) on the same held-out items, mean with bootstrap 95% interval. "
        "`response margin`: mean log-prob/token of the persona+ response minus the persona- response. "
        "`A/B log-odds`: matching minus non-matching answer, averaged over both option orders (letter bias cancels). "
        "`control`: masks calibrated on the same texts with persona labels shuffled.",
        "",
    ]
    for pair, e in report["pairs"].items():
        lines += [f"## {pair}: {e['positive']} vs {e['negative']}", ""]
        lines += [f"Held-out response pairs: {e['n_response_pairs']}, A/B questions: {e['n_ab']}; "
                  f"mask difference rate: {100 * e['mask_difference']['overall']:.2f}% "
                  f"(attention {100 * e['mask_difference']['attention']:.2f}%, MLP {100 * e['mask_difference']['mlp']:.2f}%)"
                  + (f"; shuffled-label control masks: {100 * e['control_mask_difference']['overall']:.2f}%"
                     if "control_mask_difference" in e else ""), ""]
        lines += ["| switch | response margin | A/B log-odds |", "|---|---|---|"]
        for name, s in e["switch"].items():
            ab = _fmt(s["ab_logodds"]) if "ab_logodds" in s else "—"
            lines.append(f"| {name} | {_fmt(s['response_margin'])} | {ab} |")
        lines += ["", "| condition | mean log-prob/token on neutral text | change vs base |", "|---|---|---|"]
        for c, v in e["capability"].items():
            lines.append(f"| {c} | {v['mean_logprob_per_token']:.3f} | {_fmt(v['change_vs_base'])} |")
        lines += ["", "Generations (greedy):", ""]
        for who, text in e["generation"].items():
            lines.append(f"- **{who}**: {text!r}")
        lines.append("")
    t = report.get("timings", {})
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines) + "\n"
