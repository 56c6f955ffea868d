"""Report of an evaluation run: JSON, a markdown table in the paper's layout, and figures (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from persona_kernels.utils.atomic import atomic_savefig, atomic_write
from persona_kernels.evaluation.metrics import Estimate, bootstrap_mean, paired_difference
from persona_kernels.evaluation.conditions import pair_label
from persona_kernels.evaluation.sweep import SWITCH_KEY, capability_loss, common_operating_point, operating_points

PAPER_TASKS = ("power", "wealth", "hallucination")

METHOD_DOCS = {
    "wanda": "Wanda per persona: S_ij = |W_ij| * E|x_j| on that persona's calibration tokens; each row keeps its top (1 - rho) K.",
    "contrastive_wanda": "Contrastive-Wanda as defined: S±_ij = |W_ij| * softplus(±z_j), z_j = (mu+_j - mu-_j) / sqrt(var+_j + var-_j) "
                         "of |x_j| over tokens (tau = 1).",
    "contrastive_wanda_sharp": "Contrastive-Wanda with the sharper factor softplus(±z_j / 0.1).",
    "contrastive_sparse": "Contrastive-Sparse as defined: D = S~+ - S~- of row-normalised Wanda scores; + prunes the rho K most "
                          "negative D of each row, - the rho K most positive (disjoint pruned sets).",
    "contrastive_sparse_relative": "Contrastive-Sparse ranked by the relative difference D / (S~+ + S~-).",
    "contrastive_sparse_restricted": "Contrastive-Sparse restricted to the half of each row a Wanda mask (both personas' "
                                     "statistics averaged) would prune at sparsity 0.5; each persona still prunes rho K per row.",
}


def _method_doc(spec: str) -> str:
    name, _, opts = spec.partition(":")
    doc = METHOD_DOCS.get(name, name)
    if opts:
        doc += f" Options changed: {opts.replace(',', ', ')}"
        if "scope=" in opts:
            doc += " (scope: only the MLP or attention Linears are masked; the others keep every weight)"
        doc += "."
    return f"- `{spec}`: {doc}"


def _est(values) -> dict | None:
    v = torch.as_tensor(values, dtype=torch.float64)
    return bootstrap_mean(v).to_dict() if v.numel() else None


def _fmt(e: dict | None, pct: bool = False, digits: int = 3) -> str:
    if not e:
        return "—"
    if pct:
        return f"{100 * e['mean']:.1f} [{100 * e['low']:.0f}, {100 * e['high']:.0f}]"
    return str(Estimate(e["mean"], e["low"], e["high"], e["n"])) if digits == 3 else f"{e['mean']:+.{digits}f}"


def _own_rate(scores: dict, kind: str, sign: str, key: str | None = None) -> dict | None:
    """Rate at which the condition picks its own persona's answer (sign - picks the negative one)."""
    key = key or SWITCH_KEY[kind]
    v = torch.tensor(scores[key], dtype=torch.float64)
    hit = (v < 0) if sign == "-" else (v > 0)
    return _est(hit.double())


def summarise(result: dict, tasks: dict, cap_task) -> dict:
    """Accuracies, bias-free scores, switch effects (with control) and capability, per pair and task."""
    out: dict[str, Any] = {"pairs": {}, "general": {}}
    conds = result["conditions"]
    for pair, by_task in result["scores"].items():
        if pair == "general":
            continue
        cinfo = {c["name"]: c for c in conds[pair]}
        entry: dict[str, Any] = {"tasks": {}, "capability": {}}
        for tname, by_cond in by_task.items():
            if tname == "capability":
                base = torch.tensor(by_cond["base"]["capability"], dtype=torch.float64)
                for cname, s in by_cond.items():
                    v = torch.tensor(s["capability"], dtype=torch.float64)
                    entry["capability"][cname] = {
                        "mean_logprob_per_token": float(v.mean()), "perplexity": math.exp(-float(v.mean())),
                        "change_vs_base": paired_difference(v, base).to_dict(), "relative_loss": capability_loss(base, v)}
                continue
            kind = tasks[tname].kind
            key = SWITCH_KEY[kind]
            t: dict[str, Any] = {"kind": kind, "conditions": {}, "switch": {}}
            for cname, s in by_cond.items():
                sign = cinfo[cname]["sign"]
                row = {"persona_rate": _own_rate(s, kind, sign), "mean_" + key: _est(s[key])}
                if kind == "ab":
                    row["accuracy_paper"] = _own_rate(s, kind, sign, "logodds_original")
                    row["accuracy_bias_free"] = row["persona_rate"]
                    lo = torch.tensor(s["logodds_original"], dtype=torch.float64)
                    row["letter_preference_original_order"] = _est(lo)
                t["conditions"][cname] = row
            seen_groups = [c["group"] for c in conds[pair] if c["sign"] == "+"]
            groups = [g for i, g in enumerate(seen_groups) if g not in seen_groups[:i] and not g.startswith("control/")]
            for g in groups:
                plus, minus = by_cond.get(f"{g}+"), by_cond.get(f"{g}-")
                if g == "prompt":
                    plus, minus = by_cond.get("prompt+"), by_cond.get("prompt-")
                if plus is None or minus is None:
                    continue
                a, b = torch.tensor(plus[key], dtype=torch.float64), torch.tensor(minus[key], dtype=torch.float64)
                sw = {"switch": paired_difference(a, b).to_dict()}
                if kind == "ab":
                    sw["switch_original_order"] = paired_difference(plus["logodds_original"], minus["logodds_original"]).to_dict()
                ctrl_p, ctrl_m = by_cond.get(f"control/{g}+"), by_cond.get(f"control/{g}-")
                if ctrl_p is not None and ctrl_m is not None:
                    c_a, c_b = torch.tensor(ctrl_p[key], dtype=torch.float64), torch.tensor(ctrl_m[key], dtype=torch.float64)
                    sw["control_switch"] = paired_difference(c_a, c_b).to_dict()
                    sw["net_of_control"] = bootstrap_mean((a - b) - (c_a - c_b)).to_dict()
                t["switch"][g] = sw
            entry["tasks"][tname] = t
        out["pairs"][pair] = entry
    for tname, by_cond in result["scores"].get("general", {}).items():
        kind = tasks[tname].kind
        rows = {}
        for cname, s in by_cond.items():
            if kind == "ab":
                rows[cname] = {"accuracy": _own_rate(s, kind, "+", "logodds_original"),
                               "accuracy_bias_free": _own_rate(s, kind, "+"), "mean_logodds": _est(s["logodds"])}
            else:
                rows[cname] = {"accuracy": _est(s["correct"])}
        out["general"][tname] = rows
    return out


def build_report(*, command: str, model: str, cfg: dict, args: dict, tasks: dict, cap, calib: dict, masks: dict,
                 result: dict, sweep: dict | None, bound: float, timings: dict) -> dict:
    """The JSON-serialisable report of a run."""
    summary = summarise(result, tasks, cap)
    rep = {
        "command": command, "model": model, "config": cfg,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "tasks": {n: {"kind": t.kind, "path": t.path, "pair": t.pair, "chat": t.chat, "split": t.split.to_dict()}
                  for n, t in tasks.items()},
        "capability_texts": {"path": cap.path, "hellaswag_indices": cap.split.evaluation, "n": len(cap.items)},
        "calibration": calib, "masks": masks, "conditions": result["conditions"],
        "capability_pair": result.get("capability_pair"), "summary": summary, "scores": result["scores"],
        "bound": bound, "timings": timings,
    }
    if sweep is not None:
        rep["sweep"] = sweep
    _derive(rep)
    return rep


def _derive(rep: dict) -> None:
    """Operating points (per pair and one common setting) and the verdict, from the sweep and the summary."""
    sweep = rep.get("sweep")
    if sweep is not None:
        rep["operating_points"] = operating_points(sweep, rep["bound"])
        common = common_operating_point(sweep, rep["bound"])
        if common is not None:
            common = {**common, "pairs": {pair: {k: p[k] for k in ("switch", "net", "capability_loss")}
                                          for pair, p in common["pairs"].items()}}
        rep["common_operating_point"] = common
    rep["verdict"] = verdict(rep)


def rerender(out: str | Path, *, bound: float | None = None, figures: bool = True) -> list[str]:
    """Re-derive the operating points and verdict of a written report (optionally under a new ``bound``) and
    write its markdown and figures again."""
    out = Path(out)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    if bound is not None:
        rep["bound"] = float(bound)
    _derive(rep)
    return write_report(rep, out, figures=figures)


def _pair_loss(entry: dict, group: str) -> float | None:
    losses = [entry["capability"][c]["relative_loss"] for c in (f"{group}+", f"{group}-") if c in entry["capability"]]
    return sum(losses) / len(losses) if losses else None


def verdict(rep: dict) -> list[str]:
    """Plain statements per pair task: the best usable mask's switch vs the prompt's switch.

    A mask is usable when its capability-proxy loss (mean of its + and - masks) is within the report's bound.
    It "beats" the prompt only when its switch interval lies above the prompt's AND its switch net of the
    label-shuffled control excludes 0.
    """
    lines = []
    methods = rep["config"]["methods"]
    bound = rep["bound"]
    for pair, entry in rep["summary"]["pairs"].items():
        for tname, t in entry["tasks"].items():
            p = t["switch"].get("prompt")
            if not p:
                continue
            ps = p["switch"]
            usable, broken = [], []
            for m in methods:
                s = t["switch"].get(m)
                if not s:
                    continue
                loss = _pair_loss(entry, m)
                (usable if loss is None or loss <= bound else broken).append((m, s, loss))
            note = ""
            if broken:
                note = " Over the capability bound (not usable): " + ", ".join(
                    f"{m} (loss {100 * loss:.1f}%)" for m, _, loss in broken) + "."
            if not usable:
                lines.append(f"{tname}: no mask within the capability bound; prompt switch {_fmt(ps)}.{note}")
                continue
            m, s, loss = max(usable, key=lambda u: u[1]["switch"]["mean"])
            ms, net = s["switch"], s.get("net_of_control")
            if ms["low"] > ps["high"] and (net is None or net["low"] > 0):
                word = "beats"
            elif ms["high"] < ps["low"]:
                word = "is weaker than"
            else:
                word = "does not beat (intervals overlap or the control explains it)"
            ctrl = f", control {_fmt(s.get('control_switch'))}, net {_fmt(net)}" if net else ""
            lo = f", capability loss {100 * loss:+.2f}%" if loss is not None else ""
            lines.append(f"{tname}: best usable mask {m}: switch {_fmt(ms)}{ctrl}{lo} — {word} the prompt's switch "
                         f"{_fmt(ps)}.{note}")
    common = rep.get("common_operating_point")
    if common:
        lines.append(
            f"One setting for all pairs (largest mean paired effect size d_z of the net switch, within the bound on "
            f"every pair): {common['method']} rho={common['sparsity']} gamma={common['gamma']}, mean d_z "
            f"{common['score']:+.2f} (" + ", ".join(f"{p} {v:+.2f}" for p, v in common["standardised_net"].items()) + ").")
    conf = (rep.get("sweep") or {}).get("confirmation", {}).get("pairs", {})
    for pair, op in rep.get("operating_points", {}).items():
        pr = rep["sweep"]["prompt"][pair]
        ctrl = (f", control {_fmt(op['control']['switch'])}, net {_fmt(op['net'])}" if "net" in op
                else " (sweep without label-shuffled control)")
        lines.append(
            f"{pair} operating point (capability loss <= {100 * rep['bound']:.0f}%, chosen on the sweep items): "
            f"{op['method']} rho={op['sparsity']} gamma={op['gamma']}, switch {_fmt(op['switch'])}{ctrl} at loss "
            f"{100 * op['capability_loss']:.2f}%; prompt {_fmt(pr['switch'])} at loss {100 * pr['capability_loss']:.2f}%.")
        c = conf.get(pair)
        if c:
            lines.append(f"{pair} confirmation on {c['n']} fresh items: {confirmation_sentence(c)}")
    return lines


def confirmation_sentence(c: dict) -> str:
    """One plain sentence on a re-measured operating point: mask vs control vs prompt."""
    mk, pr = c["mask"], c["prompt"]
    net, vs = Estimate(**mk["net"]), Estimate(**c["mask_vs_prompt"])
    if net.low > 0 and vs.low > 0:
        word = "the mask switches more than the prompt and more than its control"
        if Estimate(**pr["switch"]).high < 0:
            word += " (the prompt moves the wrong way)"
    elif net.low > 0:
        word = ("the mask switches more than its label-shuffled control" +
                (" but less than the prompt" if vs.high < 0 else ", not distinguishable from the prompt"))
    elif net.high < 0:
        word = "the mask switches less than its label-shuffled control"
    else:
        word = "the mask's switch is not distinguishable from its label-shuffled control"
    return (f"mask switch {_fmt(mk['switch'])}, control {_fmt(mk['control']['switch'])}, net {_fmt(mk['net'])}, "
            f"capability loss {100 * mk['capability_loss']:.2f}%; prompt {_fmt(pr['switch'])} at "
            f"{100 * pr['capability_loss']:.2f}%; mask minus prompt {_fmt(c['mask_vs_prompt'])} — {word}.")


# ------------------------------------------------------------------------------------------------------
# markdown


def render_markdown(rep: dict) -> str:
    rep["verdict"] = verdict(rep)
    s = rep["summary"]
    cfg = rep["config"]
    pairs = s["pairs"]
    methods = cfg["methods"]
    lines = [f"# persona_kernels evaluation — {rep['model']}", "", "Command:", "", "```", rep["command"], "```", "",
             f"Sparsity rho = {cfg['sparsity']}, gamma = {cfg['gamma']}; methods: {', '.join(methods) or 'none'}; "
             f"calibration on response tokens; label-shuffled controls: {'no' if rep['args'].get('no_control') else 'yes'}. "
             f"Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in rep["timings"].items()), ""]
    lines += ["## Verdict", ""] + [f"- {v}" for v in rep["verdict"]] + [""]

    def acc(pair, task, cond, field="accuracy_paper"):
        t = pairs.get(pair, {}).get("tasks", {}).get(task)
        if not t or cond not in t["conditions"]:
            return "—"
        return _fmt(t["conditions"][cond].get(field) or t["conditions"][cond].get("persona_rate"), pct=True)

    def gen(task, cond):
        g = s["general"].get(task, {}).get(cond)
        return _fmt(g["accuracy"], pct=True) if g else "—"

    cap_pair = rep.get("capability_pair")
    if pairs or s["general"]:
        gen_cols = [t for t in ("mmlu2", "mmlu4", "hellaswag") if t in s["general"]]
        gen_names = {"mmlu2": "MMLU-2", "mmlu4": "MMLU-4", "hellaswag": "HellaSwag"}
        sw_tasks = [(p, p) for p in (*PAPER_TASKS, "energy") if p in pairs and p in pairs[p]["tasks"]]
        lines += ["## Accuracy (the paper's layout) with bias-free switch columns", "",
                  "Accuracy = rate of the persona-matching answer under the + condition, original option order (the "
                  "paper's metric; % with 95% bootstrap CI); E/I = rate at which the + condition prefers the extraverted "
                  f"response; MMLU/HellaSwag under the + mask of the `{cap_pair}` pair. Switch columns: bias-free switch "
                  "effect of the row's (+, −) pair (see below), with the label-shuffled control's switch in parentheses. "
                  "Capability loss: mean relative loss of the ± conditions on neutral text, over pairs.", "",
                  "| Method | Power-Seeking | Wealth-Seeking | Hallucination | E/I | " + " | ".join(gen_names[t] for t in gen_cols)
                  + "".join(f" | switch {t}" for _, t in sw_tasks) + " | capability loss |",
                  "|---" * (6 + len(gen_cols) + len(sw_tasks)) + "|"]
        rows = [("Base", "base", "base"), ("Prompt", "prompt+", "prompt")] + [(m, f"{m}+", m) for m in methods] + \
               [(f"prompt + {m}", f"prompt+{m}+", f"prompt+{m}") for m in cfg.get("prompt_mask", [])]
        for label, cond, group in rows:
            cells = [acc(p, p, cond) for p in PAPER_TASKS] + [acc("energy", "energy", cond, "persona_rate")]
            cells += [gen(t, cond) for t in gen_cols]
            for p, t in sw_tasks:
                sw = pairs[p]["tasks"][t]["switch"].get(group)
                if not sw:
                    cells.append("—")
                    continue
                ctl = sw.get("control_switch")
                cells.append(f"{sw['switch']['mean']:+.3f}" + (f" ({ctl['mean']:+.3f})" if ctl else "")
                             + ("*" if Estimate(**sw["switch"]).excludes_zero else ""))
            losses = [e["capability"][c]["relative_loss"] for e in pairs.values() for c in (cond, cond[:-1] + "-")
                      if c in e["capability"]]
            cells.append(f"{100 * sum(losses) / len(losses):+.2f}%" if losses and group != "base" else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "`*`: the switch's 95% interval excludes 0.", ""]

    if pairs:
        lines += pair_sections(pairs, label=pair_label)
    return _tail(rep, lines)


#: what a task's per-item score is, in words and units (+ = toward the + persona)
SCORE_UNITS = {
    "ab": "A/B log-odds (nats; matching minus non-matching answer letter, both option orders averaged; + = the + persona's answer)",
    "yesno": "Yes/No log-odds (nats; + = the + persona's answer)",
    "pairs": "response margin (nats per token; mean log-prob/token of the + persona's response minus the - persona's)",
}

SIGNS_NOTE = ("Signs and units: a switch is score(+ condition) − score(− condition) on the same items, so a positive switch "
              "moves the model toward the + persona; `net` = switch − its label-shuffled control's switch (positive = the "
              "persona labels matter). Capability: mean log-prob per token of neutral text (nats, higher is better); "
              "`change vs base` = condition − base, so **negative is a capability cost**; `relative loss` = "
              "(base − condition) / |base|, so **positive is a cost**. Intervals: 95% paired bootstrap.")


def pair_sections(pairs: dict, label=None) -> list[str]:
    """Markdown: per pair task, the switch table (switch, control, net, original order) and the capability table.
    ``label(pair)`` gives the pair's display name."""
    label = label or (lambda p: p)
    lines = ["## Switch effects (bias-free)", "",
              "Switch = score(+ condition) − score(− condition) on the same held-out items, paired bootstrap 95% CI. "
              "Score: A/B log-odds matching vs non-matching letter averaged over both option orders (a constant letter "
              "preference cancels); Yes/No log-odds; E/I mean log-prob/token of the extraverted minus the introverted "
              "response. `control`: the same method on label-shuffled calibration blocks; `net` = switch − control.", "",
              SIGNS_NOTE, ""]
    for pair, entry in pairs.items():
        for tname, t in entry["tasks"].items():
            lines += [f"### {tname} ({t['kind']}, pair {label(pair)})", "", "| condition pair | switch | control switch | net of control | switch, original order only |",
                      "|---|---|---|---|---|"]
            for g, sw in t["switch"].items():
                lines.append(f"| {g} | {_fmt(sw['switch'])} | {_fmt(sw.get('control_switch'))} | {_fmt(sw.get('net_of_control'))} | "
                             f"{_fmt(sw.get('switch_original_order'))} |")
            base = t["conditions"].get("base", {})
            if t["kind"] == "ab" and base:
                lines += ["", f"Base model: paper accuracy {_fmt(base.get('accuracy_paper'), pct=True)}, bias-free "
                          f"{_fmt(base.get('accuracy_bias_free'), pct=True)}; original-order log-odds {_fmt(base.get('letter_preference_original_order'))} "
                          f"vs bias-free {_fmt(base.get('mean_logodds'))}."]
            lines.append("")
    lines += ["## Capability proxy", "",
              "Mean log-prob per token of neutral text, change vs base (condition − base, paired CI; negative = cost), "
              "relative loss = (base − condition) / |base| (positive = cost).", "",
              "| pair | condition | mean log-prob/token | perplexity | change vs base | relative loss |", "|---|---|---|---|---|---|"]
    for pair, entry in pairs.items():
        for cname, c in entry["capability"].items():
            lines.append(f"| {label(pair)} | {cname} | {c['mean_logprob_per_token']:.3f} | {c['perplexity']:.1f} | "
                         f"{_fmt(c['change_vs_base'])} | {100 * c['relative_loss']:+.2f}% |")
    lines.append("")
    return lines


def switch_findings(pairs: dict, label=None, task_names: dict | None = None) -> list[str]:
    """Plain sentences computed from a summary's tables: for every pair task and condition pair (prompt, masks),
    the switch with its interval, whether a mask's switch exceeds its label-shuffled control (net interval
    above 0), and the masks' capability cost (change vs base with interval, relative loss). The last sentence
    lists the switches that exceed their controls (or says that none does)."""
    label = label or (lambda p: p)
    lines, exceed = [], []
    for pair, entry in pairs.items():
        for tname, t in entry["tasks"].items():
            what = (task_names or {}).get(tname, tname)
            head = f"**{label(pair)}**, {what}: "
            parts = []
            for g, sw in t["switch"].items():
                s = Estimate(**sw["switch"])
                direction = "toward the + persona" if s.mean > 0 else "toward the − persona"
                moved = f"moves the score {direction} (interval excludes 0)" if s.excludes_zero else "no measurable switch (interval includes 0)"
                text = f"{g} switch {s}: {moved}"
                net = sw.get("net_of_control")
                if net is not None:
                    n = Estimate(**net)
                    if n.low > 0:
                        verdict = "exceeds its label-shuffled control"
                        exceed.append(f"{label(pair)} {what} ({g}, net {n})")
                    elif n.high < 0:
                        verdict = "is below its label-shuffled control"
                    else:
                        verdict = "does not exceed its label-shuffled control"
                    text += f"; control {_fmt(sw.get('control_switch'))}, net {n}: {verdict}"
                cost = _cost(entry.get("capability", {}), g)
                if cost:
                    text += f"; capability {cost}"
                parts.append(text)
            lines.append(head + ". ".join(parts) + ".")
    lines.append("Switches that exceed their label-shuffled controls: " + ("; ".join(exceed) if exceed else "none") + ".")
    return lines


def _cost(capability: dict, group: str) -> str:
    """``"mask+ -0.001 [-0.006, +0.004] (+0.02%), mask- ..."``: the capability change of a group's two conditions."""
    out, hurt = [], False
    for sign in "+-":
        c = capability.get(f"{group}{sign}")
        if c is None:
            continue
        ch = Estimate(**c["change_vs_base"])
        hurt |= ch.high < 0
        out.append(f"{group}{sign} {ch} nats/token ({100 * c['relative_loss']:+.2f}% loss)")
    if not out:
        return ""
    return "change vs base " + ", ".join(out) + (": a measurable cost" if hurt else ": no measurable cost")


def _tail(rep: dict, lines: list[str]) -> str:
    cfg = rep["config"]
    methods = cfg["methods"]
    if rep.get("masks"):
        lines += ["## Mask difference rates", "", "| pair | method | + vs − differ | control + vs − differ |", "|---|---|---|---|"]
        for pair, by_m in rep["masks"].items():
            for m, d in by_m.items():
                cd = d.get("control_difference_rate")
                lines.append(f"| {pair} | {m} | {100 * d['difference_rate']:.2f}% | {'—' if cd is None else f'{100 * cd:.2f}%'} |")
        lines.append("")
    if rep.get("sweep"):
        sw = rep["sweep"]
        n_items = sorted({p["switch"]["n"] for p in sw["points"]})
        lines += ["## Trade-off sweep", "", f"Base capability {sw['base_capability']:.3f} nats/token; bound "
                  f"{100 * rep['bound']:.0f}% of it; {', '.join(map(str, n_items))} items per point. Figures: "
                  "`frontier.png` (switch vs capability loss; × = label-shuffled control), `frontier_net.png` (switch net "
                  "of the control). The operating point is the largest net switch within the bound, chosen on these "
                  "items; the confirmation below re-measures it on fresh items.", "",
                  "| pair | method | rho | gamma | switch | control switch | net of control | capability loss | masks differ (control) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for pair, pr in sw["prompt"].items():
            lines.append(f"| {pair} | prompt | — | — | {_fmt(pr['switch'])} | — | — | {100 * pr['capability_loss']:+.2f}% | — |")
        for p in sorted(sw["points"], key=lambda p: (list(sw["prompt"]).index(p["pair"]) if p["pair"] in sw["prompt"] else 0,
                                                     sw["methods"].index(p["method"]) if p["method"] in sw["methods"] else 0,
                                                     p["sparsity"], p["gamma"])):
            cd = p.get("control_difference_rate")
            lines.append(f"| {p['pair']} | {p['method']} | {p['sparsity']} | {p['gamma']} | {_fmt(p['switch'])} | "
                         f"{_fmt((p.get('control') or {}).get('switch'))} | {_fmt(p.get('net'))} | "
                         f"{100 * p['capability_loss']:+.2f}% | {100 * p['difference_rate']:.2f}%"
                         + (f" ({100 * cd:.2f}%)" if cd is not None else "") + " |")
        lines.append("")
        conf = sw.get("confirmation", {}).get("pairs", {})
        if conf:
            lines += ["## Confirmation of the operating points on fresh items", "",
                      "Each pair's chosen point re-measured on evaluation items not used by the sweep (and fresh neutral "
                      "texts), beside the prompt and the label-shuffled control on the same items.", "",
                      "| pair | point | n | mask switch | control switch | net of control | mask − prompt | prompt switch | capability loss (mask / prompt) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for pair, c in conf.items():
                mk, pr = c["mask"], c["prompt"]
                lines.append(f"| {pair} | {mk['method']} rho={mk['sparsity']} gamma={mk['gamma']} | {c['n']} | {_fmt(mk['switch'])} | "
                             f"{_fmt(mk['control']['switch'])} | {_fmt(mk['net'])} | {_fmt(c['mask_vs_prompt'])} | "
                             f"{_fmt(pr['switch'])} | {100 * mk['capability_loss']:+.2f}% / {100 * pr['capability_loss']:+.2f}% |")
            lines += [""] + [f"- {pair}: {confirmation_sentence(c)}" for pair, c in conf.items()] + [""]
    lines += ["## Method definitions", ""] + [_method_doc(m) for m in methods] + [""]
    lines += ["## Data", "", "Calibration and evaluation items are disjoint (fixed-seed split; indices in report.json).", "",
              "| task | file | items | calibration | evaluation |", "|---|---|---|---|---|"]
    for n, t in rep["tasks"].items():
        sp = t["split"]
        lines.append(f"| {n} | {Path(t['path']).name} | {sp['n_items']} | {len(sp['calibration'])} | {len(sp['evaluation'])} |")
    lines += ["", "Calibration: " + "; ".join(f"{p}: {c['source']} {c['n']} texts, tokens {c.get('tokens')}"
                                              for p, c in rep["calibration"].items()), ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# figures


def write_figures(rep: dict, out: Path) -> list[str]:
    """accuracy.png, switch.png, and with a sweep switch_vs_gamma.png, switch_vs_sparsity.png, frontier.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    s = rep["summary"]
    methods = rep["config"]["methods"]
    conds = [("base", "base"), ("prompt", "prompt+")] + [(m, f"{m}+") for m in methods]
    tasks = [(p, t) for p, e in s["pairs"].items() for t in e["tasks"]]
    if tasks:
        written += _bar_figures(plt, s, methods, conds, tasks, out)
    _sweep_figures(plt, rep, out, written)
    return written


def _bar_figures(plt, s: dict, methods, conds, tasks, out: Path) -> list[str]:
    def rate(cname):
        def estimate(p, t):
            row = s["pairs"][p]["tasks"][t]["conditions"].get(cname)
            return row and (row.get("accuracy_paper") or row.get("persona_rate"))
        return estimate

    def switch(g):
        def estimate(p, t):
            sw = s["pairs"][p]["tasks"][t]["switch"].get(g)
            return sw["switch"] if sw else None
        return estimate

    return [
        _grouped_bars(plt, tasks, [(label, rate(cname)) for label, cname in conds], 50,
                      "persona-matching rate of + condition (%)", out / "accuracy.png", scale=100),
        _grouped_bars(plt, tasks, [(g, switch(g)) for g in ["prompt"] + methods], 0,
                      "switch effect (+ minus −), bias-free", out / "switch.png", errors=True),
    ]


def _grouped_bars(plt, tasks, groups, baseline: float, ylabel: str, path: Path, *, scale: float = 1.0,
                  errors: bool = False) -> str:
    """One bar per (group, task), grouped by task: ``groups`` = [(label, estimate(pair, task))] where an
    estimate is ``{"mean", "low", "high"}`` or empty (a NaN bar); ``errors`` draws the low/high interval."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    width = 0.8 / max(len(groups), 1)
    for i, (label, estimate) in enumerate(groups):
        es = [estimate(p, t) for p, t in tasks]
        ys = [scale * e["mean"] if e else float("nan") for e in es]
        bars = {}
        if errors:
            bars = {"yerr": [[e["mean"] - e["low"] if e else 0 for e in es],
                             [e["high"] - e["mean"] if e else 0 for e in es]], "capsize": 2}
        ax.bar([j + i * width for j in range(len(tasks))], ys, width, label=label, **bars)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [t for _, t in tasks], rotation=20, fontsize=8)
    ax.axhline(baseline, color="grey", lw=0.5)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _sweep_figures(plt, rep: dict, out: Path, written: list[str]) -> None:
    sw = rep.get("sweep")
    if sw and sw["points"]:
        pairs = list(sw["prompt"])
        for axis, fname in (("gamma", "switch_vs_gamma.png"), ("sparsity", "switch_vs_sparsity.png")):
            other = "sparsity" if axis == "gamma" else "gamma"
            fix = max(sw[other]) if axis == "gamma" else min(sw[other])
            fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.5), squeeze=False)
            for ax, pair in zip(axes[0], pairs):
                for m in sw["methods"]:
                    pts = sorted((p for p in sw["points"] if p["pair"] == pair and p["method"] == m and p[other] == fix),
                                 key=lambda p: p[axis])
                    if pts:
                        ax.errorbar([p[axis] for p in pts], [p["switch"]["mean"] for p in pts],
                                    yerr=[[p["switch"]["mean"] - p["switch"]["low"] for p in pts],
                                          [p["switch"]["high"] - p["switch"]["mean"] for p in pts]], label=m, marker="o", capsize=2)
                ax.axhline(sw["prompt"][pair]["switch"]["mean"], color="k", ls="--", lw=1, label="prompt")
                ax.set_title(f"{pair} ({other}={fix})", fontsize=9)
                ax.set_xlabel(axis)
                if axis == "sparsity":
                    ax.set_xscale("log")
            axes[0][0].set_ylabel("switch effect")
            axes[0][-1].legend(fontsize=6)
            fig.tight_layout()
            written.append(_save(fig, out / fname))
        for key, fname in (("switch", "frontier.png"), ("net", "frontier_net.png")):
            if key == "net" and not any("net" in p for p in sw["points"]):
                continue
            written.append(_frontier(plt, rep, pairs, key, out / fname))


def _frontier(plt, rep: dict, pairs: list, key: str, path: Path) -> str:
    """Switch (or switch net of control) vs capability loss per pair; colour = method, marker = gamma, size = rho."""
    sw = rep["sweep"]
    markers = "osD^v<>P"
    gammas = sw["gamma"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rhos = sorted(sw["sparsity"])
    for ax, pair in zip(axes[0], pairs):
        for i, m in enumerate(sw["methods"]):
            for j, g in enumerate(gammas):
                pts = sorted((p for p in sw["points"] if p["pair"] == pair and p["method"] == m and p["gamma"] == g
                              and key in p), key=lambda p: p["sparsity"])
                if not pts:
                    continue
                xs = [100 * p["capability_loss"] for p in pts]
                ys = [p[key]["mean"] for p in pts]
                ax.plot(xs, ys, color=colours[i % len(colours)], lw=0.6, alpha=0.6)
                ax.scatter(xs, ys, s=[12 + 10 * rhos.index(p["sparsity"]) for p in pts], marker=markers[j % len(markers)],
                           color=colours[i % len(colours)], label=f"{m} γ={g}")
                if key == "switch":
                    cp = [p for p in pts if "control" in p]
                    ax.scatter([100 * p["capability_loss"] for p in cp], [p["control"]["switch"]["mean"] for p in cp],
                               marker="x", s=14, color=colours[i % len(colours)], alpha=0.5)
        if key == "switch":
            pr = sw["prompt"][pair]
            ax.errorbar([100 * pr["capability_loss"]], [pr["switch"]["mean"]],
                        yerr=[[pr["switch"]["mean"] - pr["switch"]["low"]], [pr["switch"]["high"] - pr["switch"]["mean"]]],
                        marker="*", ms=12, color="k", label="prompt", capsize=3)
        ax.axvline(100 * rep["bound"], color="grey", ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        op = rep.get("operating_points", {}).get(pair)
        if op and key in op:
            ax.errorbar([100 * op["capability_loss"]], [op[key]["mean"]],
                        yerr=[[op[key]["mean"] - op[key]["low"]], [op[key]["high"] - op[key]["mean"]]],
                        marker="o", ms=10, mfc="none", mec="r", ecolor="r", capsize=3, label="operating point")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("capability-proxy loss (% of base, symlog)")
        ax.set_title(f"{pair}: {'switch' if key == 'switch' else 'switch net of control'}", fontsize=9)
    axes[0][0].set_ylabel("switch effect" if key == "switch" else "switch − control switch")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=min(6, max(1, len(labels))))
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 6), 1, 1))
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(rep: dict, out: str | Path, *, figures: bool = True) -> list[str]:
    """Write report.json, report.md and (optionally) the figures under ``out``; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    if figures:
        rep["figures"] = write_figures(rep, out)
        names += rep["figures"]
    atomic_write(out / "report.json", json.dumps(rep, indent=1))
    atomic_write(out / "report.md", render_markdown(rep))
    return ["report.json", "report.md"] + names


def main(argv=None) -> int:
    """``python -m persona_kernels.evaluation.report DIR [--bound B]``: re-render a written report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m persona_kernels.evaluation.report", description=rerender.__doc__.splitlines()[0])
    p.add_argument("out", help="folder holding report.json")
    p.add_argument("--bound", type=float, default=None, help="new capability-loss bound (fraction of base)")
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    names = rerender(args.out, bound=args.bound, figures=not args.no_figures)
    print(f"wrote {', '.join(names)} under {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
