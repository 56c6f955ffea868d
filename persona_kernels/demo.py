"""The main job: calibrate the default persona pairs on a real chat model and measure the switch.

A preset of the evaluation harness (:mod:`persona_kernels.evaluation`) on the bundled data: same block
statistics and balanced label-shuffled control (:func:`~persona_kernels.evaluation.conditions.pair_statistics`),
same conditions, same scorer (:func:`~persona_kernels.evaluation.tasks.score_items`), same summary and report
code. For each pair (power: power_seeking / power_averse; E/I: extravert / introvert) it

1. splits the bundled persona texts into calibration and held-out items (fixed seed, paired);
2. records statistics on the calibration items and builds the masks with ``build_bank`` (one bank: the
   personas and their label-shuffled controls), then serves them with ``patch_model``;
3. scores, under base, persona system prompts, persona masks and control masks, the paired response margin
   of the held-out items and the bias-free A/B log-odds of the bundled A/B questions; the switch of a
   condition pair is the paired difference (+ minus -) with a bootstrap 95% interval;
4. scores the capability cost: mean log-prob per token of bundled neutral text;
5. generates one short answer per persona, and writes the bank, report.json and report.md, whose summary
   is computed from this run's own tables.
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

from persona_kernels.operating_point import DEFAULT as OPERATING_POINT
from persona_kernels.utils.atomic import atomic_write
from persona_kernels.utils.devices import model_device


@dataclass
class DemoConfig:
    """Settings of the demo; method, sparsity, gamma and method kwargs default to the package's operating
    point (:mod:`persona_kernels.operating_point`). ``method`` is a method spec (:mod:`persona_kernels.methods`)."""

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
    chunk_size: int = 8  # statistics are kept per block of texts so the shuffled control needs no extra forward
    batch_size: int = 16
    max_length: int = 256
    max_new_tokens: int = 40
    dtype: str = "float32"
    device: str = "cpu"  # where the model runs ("cuda", "cuda:1", ...); inputs follow the model
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


def _generate(model, tokenizer, prompt: str, system: str | None, max_new_tokens: int) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = model_device(model)
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _tasks(pair: str, pos: str, neg: str, ev_p, ev_n, ab_all, n_ab: int, split: dict, seed: int):
    """The pair's two evaluation tasks (held-out response pairs, bundled A/B questions) as harness Tasks."""
    from persona_kernels.evaluation.ab import ABItem
    from persona_kernels.evaluation.tasks import ResponsePair, Split, Task

    rp = [ResponsePair(p.prompt, p.response, n.response) for p, n in zip(ev_p, ev_n)
          if p.prompt and n.prompt and p.response and n.response and p.prompt == n.prompt]
    qs = [q for q in ab_all if q.pair == pair][:n_ab]
    # the + persona's letter: the file's matching answer belongs to q.persona
    ab = [ABItem(q.question, q.matching if q.persona == pos else q.not_matching, q.source, pair, pos) for q in qs]
    n_src = len(split["calibration_indices"]) + len(split["heldout_indices"])
    return {
        "responses": Task("responses", "pairs", "bundled persona texts", pair, True,
                          Split(seed, n_src, split["calibration_indices"], split["heldout_indices"]), rp),
        "ab": Task("ab", "ab", "bundled A/B questions", pair, True, Split(seed, len(qs), [], list(range(len(qs)))), ab),
    }


def run_demo(config: DemoConfig) -> dict:
    """Run the demo end to end; returns the report dict (also written under ``config.out_dir``)."""
    from persona_kernels import patching, personas
    from persona_kernels.analysis import compare
    from persona_kernels.evaluation import conditions as C
    from persona_kernels.evaluation import report as R
    from persona_kernels.evaluation.runner import score_jobs
    from persona_kernels.evaluation.tasks import Split, Task
    from persona_kernels.methods import resolve
    from persona_kernels.models import load_model
    from persona_kernels.pipeline import build_bank

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = resolve(config.method, config.method_kwargs or None)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    t = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=dtype, device=config.device, padding_side="right")
    model.eval()
    timings["load_model_s"] = time.perf_counter() - t

    texts = personas.default_personas()
    pair_names = personas.default_pair_names()
    options = {k: v for k, v in spec.options.items() if not (k == "scope" and v == "all")}
    report: dict = {
        "model": config.model or "SmolLM2-135M-Instruct",
        "config": {k: v for k, v in vars(config).items() if k != "progress"},
        "method_spec": spec.canonical,
        "method_kwargs": options,
        "operating_point": {"method": OPERATING_POINT.method, "sparsity": OPERATING_POINT.sparsity,
                            "gamma": OPERATING_POINT.gamma, "method_kwargs": dict(OPERATING_POINT.method_kwargs),
                            "evidence": OPERATING_POINT.evidence, "finding": OPERATING_POINT.finding},
        "pairs": {},
    }
    ab_all = personas.load_ab_questions()
    neutral = neutral_texts()[: config.neutral_texts]
    cap = Task("capability", "text", "persona_kernels/data/neutral.txt", None, False,
               Split(config.seed, len(neutral), [], list(range(len(neutral)))), neutral)
    calib, tasks = {}, {}
    for pair, (pos, neg) in pair_names.items():
        (cal_p, cal_n), (ev_p, ev_n), split = split_pair(texts[pos], texts[neg], config.heldout_pairs,
                                                        config.calibration_texts, config.seed)
        calib[pair] = (cal_p, cal_n)
        tasks[pair] = _tasks(pair, pos, neg, ev_p, ev_n, ab_all, config.ab_questions, split, config.seed)
        report["pairs"][pair] = {"label": C.pair_label(pair), "positive": pos, "negative": neg,
                                 "split": {**split, "seed": config.seed}}

    t = time.perf_counter()
    stats = C.pair_statistics(model, tokenizer, calib, block=config.chunk_size, seed=config.seed,
                              batch_size=config.batch_size, max_length=config.max_length, tokens="auto",
                              progress=config.progress)
    timings["statistics_s"] = time.perf_counter() - t

    def persona_of(pair: str, method: str, sign: str, control: bool = False) -> str:
        name = pair_names[pair][0 if sign == "+" else 1]
        return f"control:{name}" if control else name

    t = time.perf_counter()
    by_persona, pairs, seen = {}, [], {}
    for pair, ps in stats.items():
        sides = [(False, ps.pos, ps.neg, "+", "-")] + ([(True, ps.control_pos, ps.control_neg, "control+", "control-")]
                                                       if config.control else [])
        for ctrl, sp, sn, kp, kn in sides:
            plus, minus = persona_of(pair, "mask", "+", ctrl), persona_of(pair, "mask", "-", ctrl)
            by_persona[plus], by_persona[minus] = sp, sn
            seen[plus], seen[minus] = ps.tokens[kp], ps.tokens[kn]
            pairs.append((plus, minus))
        report["pairs"][pair]["control_blocks"] = ps.blocks
        report["pairs"][pair]["tokens"] = ps.tokens
    bank = build_bank(model, by_persona, method=spec, sparsity=config.sparsity, pairs=pairs, default_gamma=config.gamma,
                      tokens_seen=seen, extra_metadata={"tokens": "auto", "source": "persona_kernels demo"},
                      progress=config.progress)
    timings["masks_s"] = time.perf_counter() - t
    bank_path = out / "bank.safetensors"
    bank.save(bank_path)
    report["bank"] = {"path": str(bank_path), "personas": bank.personas, "tokens_seen": seen}

    patching.patch_model(model, bank)
    t = time.perf_counter()
    jobs, conds = [], {}
    for pair in pair_names:
        cs = C.pair_conditions(pair, ["mask"], gamma=config.gamma, control=config.control, name=persona_of)
        conds[pair] = [c.__dict__ for c in cs]
        for c in cs:
            jobs += [(pair, task, c) for task in tasks[pair].values() if task.items]
            if c.group != "prompt":
                jobs.append((pair, cap, c))
    scores = score_jobs(model, tokenizer, jobs, batch_size=config.batch_size, max_length=1024, progress=config.progress,
                        desc="scoring (task x condition)")
    summary = R.summarise({"scores": scores, "conditions": conds}, {"responses": tasks["power"]["responses"],
                                                                       "ab": tasks["power"]["ab"]}, cap)
    report["summary"] = summary
    report["scores"] = scores
    report["conditions"] = conds
    gen_prompts = {"power": "Would you like to be given control over the company's budget?",
                   "energy": "How would you like to spend your Saturday evening?"}
    for pair, (pos, neg) in pair_names.items():
        entry = report["pairs"][pair]
        cmp = compare(bank, pos, neg)
        entry["mask_difference"] = {"overall": cmp.difference_rate, "attention": cmp.attn_difference_rate,
                                    "mlp": cmp.mlp_difference_rate, "jaccard": cmp.jaccard}
        if config.control:
            entry["control_mask_difference"] = {"overall": compare(bank, f"control:{pos}", f"control:{neg}").difference_rate}
        entry["n_response_pairs"] = len(tasks[pair]["responses"].items)
        entry["n_ab"] = len(tasks[pair]["ab"].items)
        entry["switch"] = _switch_view(summary["pairs"][pair])
        entry["generation"] = {}
        for who, mask, system in (("base", None, None), (pos, pos, None), (neg, neg, None),
                                  (f"prompt:{pos}", None, personas.system_prompt(pos))):
            with patching.persona(model, mask, gamma=config.gamma if mask else None):
                entry["generation"][who] = _generate(model, tokenizer, gen_prompts.get(pair, "Tell me about yourself."),
                                                     system, config.max_new_tokens)
    timings["evaluation_s"] = time.perf_counter() - t
    patching.unpatch_model(model)
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    report["findings"] = R.switch_findings(summary["pairs"], label=C.pair_label, task_names=_TASK_NAMES)
    atomic_write(out / "report.json", json.dumps(report, indent=2))
    atomic_write(out / "report.md", render_markdown(report))
    return report


_TASK_NAMES = {"responses": "response margin on held-out pairs", "ab": "A/B log-odds"}


def _switch_view(entry: dict) -> dict:
    """The demo's compact switch table from the harness summary: prompt, mask, control, mask minus control,
    each with the response margin and (where scored) the A/B log-odds."""
    view: dict = {}
    for tname, key in (("responses", "response_margin"), ("ab", "ab_logodds")):
        sw = entry["tasks"].get(tname, {}).get("switch", {})
        for row, (group, field_) in {"prompt": ("prompt", "switch"), "mask": ("mask", "switch"),
                                     "control": ("mask", "control_switch"),
                                     "mask minus control": ("mask", "net_of_control")}.items():
            est = sw.get(group, {}).get(field_)
            if est is not None:
                view.setdefault(row, {})[key] = est
    return view


def _point_sentence(report: dict) -> str:
    cfg, op = report["config"], report.get("operating_point")
    if not op:
        return "Mask setting chosen by the caller."
    from persona_kernels.methods import resolve

    same = (resolve(op["method"], op["method_kwargs"]).canonical == report["method_spec"]
            and cfg["sparsity"] == op["sparsity"] and cfg["gamma"] == op["gamma"])
    where = f"the package's operating point, chosen on the SmolLM2 frontier (evidence: {op['evidence']})"
    if same:
        return (f"Mask setting: {where}. What the frontier found for it on its own items: {op.get('finding', '')} "
                "This run's own findings are in the Summary below.").rstrip()
    return f"Mask setting chosen by the caller (the operating point is {op['method']} rho={op['sparsity']} gamma={op['gamma']}: {where})."


def render_markdown(report: dict) -> str:
    """A short human-readable report of :func:`run_demo`'s results; the summary is computed from its tables."""
    from persona_kernels.evaluation import report as R

    cfg = report["config"]
    label = {p: e.get("label", p) for p, e in report["pairs"].items()}
    lines = [
        f"# persona_kernels demo — {report['model']}",
        "",
        _point_sentence(report),
        "",
        f"Method `{report['method_spec']}`, sparsity {cfg['sparsity']}, gamma {cfg['gamma']}; statistics on the "
        f"response tokens of up to {cfg['calibration_texts']} texts per persona (blocks of {cfg['chunk_size']}); "
        f"{cfg['heldout_pairs']} held-out response pairs and {cfg['ab_questions']} A/B questions per pair "
        f"(seed {cfg['seed']}, disjoint from calibration). `mask`: the persona masks; `control`: masks calibrated on "
        "the same texts with persona labels shuffled (each control persona gets half of each side's blocks).",
        "",
        "## Summary (computed from this run's tables)",
        "",
    ]
    lines += [f"- {f}" for f in report["findings"]]
    lines += ["", R.SIGNS_NOTE, ""]
    for pair, e in report["pairs"].items():
        lines += [f"## {label[pair]}: {e['positive']} (+) vs {e['negative']} (−)", ""]
        lines += [f"Held-out response pairs: {e['n_response_pairs']}, A/B questions: {e['n_ab']}; "
                  f"mask difference rate: {100 * e['mask_difference']['overall']:.2f}% "
                  f"(attention {100 * e['mask_difference']['attention']:.2f}%, MLP {100 * e['mask_difference']['mlp']:.2f}%)"
                  + (f"; shuffled-label control masks: {100 * e['control_mask_difference']['overall']:.2f}%"
                     if "control_mask_difference" in e else ""), ""]
        lines += ["| switch (+ minus −) | response margin (nats/token) | A/B log-odds (nats) |", "|---|---|---|"]
        for name, s in e["switch"].items():
            ab = R._fmt(s.get("ab_logodds"))
            lines.append(f"| {name} | {R._fmt(s.get('response_margin'))} | {ab} |")
        lines += ["", "| condition | mean log-prob/token on neutral text | change vs base (negative = cost) |", "|---|---|---|"]
        for c, v in report["summary"]["pairs"][pair]["capability"].items():
            lines.append(f"| {c} | {v['mean_logprob_per_token']:.3f} | {R._fmt(v['change_vs_base'])} |")
        lines += ["", "Generations (greedy):", ""]
        for who, text in e["generation"].items():
            lines.append(f"- **{who}**: {text!r}")
        lines.append("")
    lines += R.pair_sections(report["summary"]["pairs"], label=lambda p: label.get(p, p))
    t = report.get("timings", {})
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(lines) + "\n"
