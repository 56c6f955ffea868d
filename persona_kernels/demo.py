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
from persona_kernels.evaluation.ab import letter_of
from persona_kernels.evaluation.metrics import Estimate

from persona_kernels.operating_point import DEFAULT as OPERATING_POINT
from persona_kernels.operating_point import default_method_kwargs


@dataclass
class DemoConfig:
    """Settings of the demo; method, sparsity, gamma and method kwargs default to the package's operating
    point (:mod:`persona_kernels.operating_point`)."""

    model: str | None = None
    out_dir: str = "runs/demo"
    method: str = OPERATING_POINT.method
    sparsity: float = OPERATING_POINT.sparsity
    gamma: float = OPERATING_POINT.gamma
    seed: int = 0
    calibration_texts: int = 64  # per persona
    heldout_pairs: int = 20  # per pair: prompt + both personas' responses, never calibrated on
    ab_questions: int = 12  # per pair, scored in both option orders
    neutral_texts: int = 12
    chunk_size: int = 8  # statistics are kept per chunk of texts so the shuffled control needs no extra forward
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


def split_pair(pos_items: Sequence, neg_items: Sequence, n_heldout: int, n_calibration: int, seed: int):
    """Index-paired split of two parallel persona lists: held-out (prompt, response) items and calibration items.

    Held-out indices are drawn (fixed seed) among items whose two sides share a prompt; calibration takes
    up to ``n_calibration`` of the remaining indices. The two sets are disjoint by construction.
    """
    n = min(len(pos_items), len(neg_items))
    rng = random.Random(seed)
    paired = [i for i in range(n) if pos_items[i].prompt and pos_items[i].prompt == neg_items[i].prompt]
    ev = sorted(rng.sample(paired, min(n_heldout, len(paired))))
    rest = [i for i in range(n) if i not in set(ev)]
    rng.shuffle(rest)
    cal = sorted(rest[:n_calibration])
    return ([pos_items[i] for i in cal], [neg_items[i] for i in cal]), ([pos_items[i] for i in ev], [neg_items[i] for i in ev]), {
        "calibration_indices": cal,
        "heldout_indices": ev,
    }


def chunked(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def shuffled_chunk_groups(n_pos: int, n_neg: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Shuffled-label control at chunk level, stratified: each control group receives half of the positive
    persona's chunks and half of the negative's, chosen at random, so its expected persona content is equal."""
    rng = random.Random(seed + 1)
    pos, neg = [("+", i) for i in range(n_pos)], [("-", i) for i in range(n_neg)]
    rng.shuffle(pos)
    rng.shuffle(neg)
    a = pos[: n_pos // 2] + neg[n_neg - n_neg // 2 :]
    b = pos[n_pos // 2 :] + neg[: n_neg - n_neg // 2]
    return a, b


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
    from persona_kernels.pipeline import build_bank, merge_stats, persona_stats

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
    method_kwargs = {**default_method_kwargs(config.method), **config.method_kwargs}
    report: dict = {
        "model": config.model or "SmolLM2-135M-Instruct",
        "config": {k: v for k, v in vars(config).items() if k != "progress"},
        "method_kwargs": method_kwargs,
        "operating_point": {"method": OPERATING_POINT.method, "sparsity": OPERATING_POINT.sparsity,
                            "gamma": OPERATING_POINT.gamma, "method_kwargs": dict(OPERATING_POINT.method_kwargs),
                            "evidence": OPERATING_POINT.evidence, "finding": OPERATING_POINT.finding},
        "pairs": {},
    }
    ab_all = personas.load_ab_questions()
    neutral = neutral_texts()[: config.neutral_texts]
    heldout: dict[str, tuple] = {}
    chunks: dict[str, list] = {}  # "persona@i" -> texts
    chunk_names: dict[str, dict[str, list[str]]] = {}
    for pair, (pos, neg) in pair_names.items():
        (cal_p, cal_n), (ev_p, ev_n), split = split_pair(
            texts[pos], texts[neg], config.heldout_pairs, config.calibration_texts, config.seed
        )
        heldout[pair] = (pos, neg, ev_p, ev_n)
        chunk_names[pair] = {}
        for sign, persona, items in (("+", pos, cal_p), ("-", neg, cal_n)):
            names = []
            for i, chunk in enumerate(chunked(items, config.chunk_size)):
                chunks[f"{persona}@{i}"] = chunk
                names.append(f"{persona}@{i}")
            chunk_names[pair][sign] = names
        report["pairs"][pair] = {"positive": pos, "negative": neg, "split": {**split, "seed": config.seed}}

    from tqdm.auto import tqdm

    t = time.perf_counter()
    chunk_stats, chunk_seen = {}, {}
    for name in tqdm(list(chunks), desc="calibration statistics", disable=not config.progress):
        st, seen = persona_stats(model, tokenizer, {name: chunks[name]}, batch_size=config.batch_size, progress=False)
        chunk_stats[name], chunk_seen[name] = st[name], seen[name]
    stats: dict[str, dict] = {}
    seen: dict[str, int] = {}
    pairs = []
    for pair, (pos, neg) in pair_names.items():
        names = chunk_names[pair]
        for persona, sign in ((pos, "+"), (neg, "-")):
            stats[persona] = merge_stats([chunk_stats[c] for c in names[sign]])
            seen[persona] = sum(chunk_seen[c] for c in names[sign])
        pairs.append((pos, neg))
        if config.control:
            group_a, group_b = shuffled_chunk_groups(len(names["+"]), len(names["-"]), config.seed)
            for persona, group in ((f"control:{pos}", group_a), (f"control:{neg}", group_b)):
                members = [names[sign][i] for sign, i in group]
                stats[persona] = merge_stats([chunk_stats[c] for c in members])
                seen[persona] = sum(chunk_seen[c] for c in members)
            pairs.append((f"control:{pos}", f"control:{neg}"))
            report["pairs"][pair]["control_chunks"] = {"control:" + pos: [names[s][i] for s, i in group_a],
                                                       "control:" + neg: [names[s][i] for s, i in group_b]}
    timings["statistics_s"] = time.perf_counter() - t
    t = time.perf_counter()
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
    base_capability = None
    for pair, (pos, neg, ev_p, ev_n) in heldout.items():
        entry = report["pairs"][pair]
        cmp = compare(bank, pos, neg)
        entry["mask_difference"] = {"overall": cmp.difference_rate, "attention": cmp.attn_difference_rate,
                                    "mlp": cmp.mlp_difference_rate, "jaccard": cmp.jaccard}
        if config.control:
            entry["control_mask_difference"] = {"overall": compare(bank, f"control:{pos}", f"control:{neg}").difference_rate}
        rp = _response_pairs(ev_p, ev_n)
        ab = []
        for q in [q for q in ab_all if q.pair == pair][: config.ab_questions]:
            letter = letter_of(q.answer_matching if q.persona == pos else q.answer_not_matching, where=f"A/B question {q.question[:40]!r}")
            ab.append(ABItem(q.question, letter, pair))
        # condition -> (mask persona, system prompt, scored on: response margin / A/B / neutral text)
        conditions = {
            "base": (None, None, True, True, True),
            "prompt+": (None, personas.system_prompt(pos), True, True, False),
            "prompt-": (None, personas.system_prompt(neg), True, True, False),
            "mask+": (pos, None, True, True, True),
            "mask-": (neg, None, True, True, True),
        }
        if config.control:
            conditions["control+"] = (f"control:{pos}", None, True, False, True)
            conditions["control-"] = (f"control:{neg}", None, True, False, True)
        margins, logodds, capability = {}, {}, {}
        for cond, (mask, system, do_margin, do_ab, do_neutral) in tqdm(
            conditions.items(), desc=f"evaluating {pair}", disable=not config.progress
        ):
            with patching.persona(model, mask, gamma=config.gamma if mask else None):
                margins[cond] = response_margin(model, tokenizer, rp, system_prompt=system, batch_size=config.batch_size)
                if do_ab and ab:
                    logodds[cond] = score_ab(model, tokenizer, ab, system_prompt=system, batch_size=config.batch_size).logodds
                if do_neutral:
                    if cond == "base" and base_capability is not None:
                        capability[cond] = base_capability
                    else:
                        capability[cond] = text_logprob(model, tokenizer, neutral, batch_size=config.batch_size)
        base_capability = capability["base"]
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
        if "control" in switch:
            # persona effect beyond what relabelled calibration texts produce (paired on the same items)
            switch["mask minus control"] = {"response_margin": paired_difference(
                margins["mask+"] - margins["mask-"], margins["control+"] - margins["control-"]).to_dict()}
        entry["switch"] = switch
        entry["capability"] = {
            c: {"mean_logprob_per_token": float(v.mean()), "change_vs_base": paired_difference(v, base_capability).to_dict()}
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


def _point_sentence(report: dict) -> str:
    cfg, op = report["config"], report.get("operating_point")
    if not op:
        return "Mask setting chosen by the caller."
    same = (cfg["method"] == op["method"] and cfg["sparsity"] == op["sparsity"] and cfg["gamma"] == op["gamma"]
            and report["method_kwargs"] == op["method_kwargs"])
    where = f"the package's operating point, chosen on the SmolLM2 frontier (evidence: {op['evidence']})"
    if same:
        return f"Mask setting: {where}. {op.get('finding', '')}".rstrip()
    return f"Mask setting chosen by the caller (the operating point is {op['method']} rho={op['sparsity']} gamma={op['gamma']}: {where})."


def render_markdown(report: dict) -> str:
    """A short human-readable report of :func:`run_demo`'s results."""
    cfg = report["config"]
    lines = [
        f"# persona_kernels demo — {report['model']}",
        "",
        _point_sentence(report),
        "",
        f"Method {cfg['method']} ({report['method_kwargs']}), sparsity {cfg['sparsity']}, gamma {cfg['gamma']}, "
        f"statistics on response tokens of {cfg['calibration_texts']} texts per persona; {cfg['heldout_pairs']} held-out "
        f"response pairs per persona pair (seed {cfg['seed']}, disjoint from calibration).",
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
