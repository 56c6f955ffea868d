"""Evaluation scoring with and without the shared-prefix KV cache (issue 17).

Two measurements, both with ``torch.set_num_threads(1)``:

1. **Forward tokens per item** (real, non-padding tokens through the decoder; a property of the tokenizer and
   the scorer, not of the weights): the four persona tasks of the SmolLM2 frontier (power, wealth,
   hallucination: A/B in both option orders; E/I: paired responses) with SmolLM2-135M-Instruct's tokenizer and
   chat template, without and with the pair's persona system prompt. Counted with a one-layer random Llama of
   SmolLM2's vocabulary, which runs the same scorer code on the same token sequences quickly. Next to it the
   **trie floor**: the distinct nodes of the token prefix trie of all sequences of the task (each up to its
   last scored position), per item — the fewest forward tokens any exact prefix-reusing scorer can need —
   computed from the real token sequences by a plain dict trie (:func:`tasks.trie_nodes`), independently
   of the scorer's radix tree; and the padded tokens (rows x width of every forward chunk), which the matrix
   products actually run on.
2. **One sweep point on SmolLM2-135M-Instruct** (the real model): what ``persona-kernels eval --sweep`` does per
   (pair, method, rho, gamma) point — the pair's task under the + and - masks and under the label-shuffled
   control masks, and the capability texts under the + and - masks — at the operating point
   (contrastive_wanda, rho 0.02, gamma 0), with and without the prefix cache, interleaved repeats, process CPU
   time (and the wall clock of the same calls, on a shared machine). The per-item scores of both modes are
   compared (max abs difference).

Usage: python benchmarks/bench_eval_prefix.py [--limit 8] [--count-limit 48] [--repeats 1] [--pairs power,energy]
Writes benchmarks/results/eval_prefix_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from persona_kernels.bench.timing import ratio, time_interleaved
from persona_kernels.evaluation import conditions as C
from persona_kernels.evaluation import sweep as S
from persona_kernels.evaluation import tasks as T
from persona_kernels.utils.atomic import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = ("power", "wealth", "hallucination", "energy")


def _counting_model(tokenizer):
    """A one-layer random Llama with SmolLM2's vocabulary (token counts do not depend on the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _item_split(sequences: list, kind: str, items: int) -> dict | None:
    """Mean tokens per item that both of its sequences share (after the task-wide common prefix) and that
    each has on its own: score_items passes an item's two sequences (A/B option orders, E/I responses) next
    to each other."""
    if len(sequences) != 2 * items:
        return None
    common = min(T._lcp(sequences[0], s) for s in sequences)
    shared = [T._lcp(sequences[2 * k], sequences[2 * k + 1]) - common for k in range(items)]
    own = [len(s) - common - shared[k // 2] for k, s in enumerate(sequences)]
    return {"task_prefix": common, "item_shared": sum(shared) / items, "own_each": sum(own) / len(own)}


def count_tokens(tokenizer, limit: int, shared) -> dict:
    """Forward tokens per item, uncached vs cached, and the trie floor, per task and system prompt (base
    condition)."""
    model = _counting_model(tokenizer)
    out = {}
    for pair in PAIRS:
        task = T.load_task(pair, shared=shared, seed=0, limit=limit)
        n = len(task.items)
        for label, system in (("no system prompt", None), ("persona system prompt", C.system_prompts(pair)[0])):
            counts = {}
            for mode in (False, True):
                with T.count_forward_tokens() as count:
                    T.score_items(model, tokenizer, task, system_prompt=system, batch_size=16, prefix_cache=mode)
                name = "cached" if mode else "uncached"
                counts[name], counts[f"{name}_padded"] = count.tokens / n, count.padded / n
            counts["floor"] = count.floor / n
            counts["ratio"] = counts["uncached"] / counts["cached"]
            counts["cached_fraction"] = counts["cached"] / counts["uncached"]
            counts["floor_fraction"] = counts["floor"] / counts["uncached"]
            counts["split"] = _item_split(count.sequences[0], task.kind, n) if len(count.sequences) == 1 else None
            out.setdefault(C.pair_label(pair), {"kind": task.kind, "items": n})[label] = counts
    return out


def sweep_point(limit: int, repeats: int, pairs, shared) -> dict:
    """Process CPU time of one sweep point on SmolLM2, cached vs uncached, and the score agreement."""
    from persona_kernels.models import load_model

    model, tok = load_model(None, dtype=torch.float32, padding_side="right")
    model.eval()
    tasks = {p: T.load_task(p, shared=shared, seed=0, limit=limit, calib_limit=8) for p in pairs}  # 2 blocks a side
    hs = T.load_task("hellaswag", shared=shared, seed=0, limit=limit)
    cap = T.Task("capability", "text", hs.path, None, False, hs.split, T.capability_texts(hs.items))
    texts = {p: C.calibration_texts(t) for p, t in tasks.items()}
    stats = C.pair_statistics(model, tok, texts, block=4, seed=0, batch_size=4, tokens="response", progress=False)
    method, rho, gamma = "contrastive_wanda", 0.02, 0.0
    C.install_masks(model, stats, [method], rho, control=True, backend="auto")
    with T.prefix_caching(False):
        base_cap = T.score_items(model, tok, cap)["capability"]
    results: dict = {}

    def point(pair: str, cached: bool) -> dict:
        with T.prefix_caching(cached):
            names = (C.mask_name(pair, method, "+"), C.mask_name(pair, method, "-"))
            p = S._switch_point(model, tok, tasks[pair], cap, names, gamma, base_cap, 16)
            S._add_control(model, tok, tasks[pair], pair, method, gamma, p, 16, 1024)
        results[(pair, cached)] = p
        return p

    tokens, wall = {}, {}

    def counted(name: str, pair: str, cached: bool) -> None:
        t0 = time.perf_counter()
        with T.count_forward_tokens() as count:
            point(pair, cached)
        wall.setdefault(name, []).append(time.perf_counter() - t0)
        tokens[name] = count.tokens  # the same in every repeat

    fns = {f"{C.pair_label(p)} {'cached' if c else 'uncached'}": (lambda p=p, c=c: counted(
        f"{C.pair_label(p)} {'cached' if c else 'uncached'}", p, c)) for p in pairs for c in (False, True)}
    # no separate warm-up: the model, masks and statistics are already built and used (base capability)
    timings = time_interleaved(fns, repeats=repeats, warmup=0, clock="process")
    out = {}
    for pair in pairs:
        lab = C.pair_label(pair)
        u, c = timings[f"{lab} uncached"], timings[f"{lab} cached"]
        pu, pc = results[(pair, False)], results[(pair, True)]
        diff = max([abs(a - b) for a, b in zip(pu["items"], pc["items"])]
                   + [abs(a - b) for a, b in zip(pu["control"]["items"], pc["control"]["items"])]
                   + [abs(a - b) for a, b in zip(pu["capability"], pc["capability"])])
        out[lab] = {"task": tasks[pair].name, "kind": tasks[pair].kind, "items": len(tasks[pair].items),
                    "capability_texts": len(cap.items), "uncached": u.to_dict(), "cached": c.to_dict(),
                    "speedup": ratio(u, c).to_dict(), "forward_tokens": {"uncached": tokens[f"{lab} uncached"],
                                                                       "cached": tokens[f"{lab} cached"]},
                    "wall_s": {"uncached": wall[f"{lab} uncached"], "cached": wall[f"{lab} cached"]},
                    "max_abs_score_difference": diff}
    return out


def render(res: dict) -> str:
    lines = ["# Evaluation scoring: shared-prefix KV cache", "",
             f"`{res['command']}` — {res['machine']}, torch {res['torch']}, **1 thread**. Token counts: real "
             "(non-padding) tokens through the decoder per evaluation item. Times: **process CPU time**, "
             f"median of {res['repeats']} interleaved repeats (wall clock of the same calls alongside; the machine "
             "is shared, so wall times carry other jobs' load).", "",
             f"## Forward tokens per item ({res['count_limit']} items per task, base condition)", "",
             "The **trie floor** is the number of distinct nodes of the token prefix trie over all sequences of the "
             "task (each up to its last scored position), divided by the items: the fewest forward tokens any exact "
             "prefix-reusing scorer can need. It is computed from the real token sequences. Target: cached / "
             "uncached <= 0.67.", "",
             "| pair | task | system prompt | uncached | cached | trie floor | cached / uncached | floor / uncached "
             "| fewer tokens | padded uncached / cached |", "|---|---|---|---|---|---|---|---|---|---|"]
    short = []
    for lab, e in res["tokens_per_item"].items():
        for sys_label in ("no system prompt", "persona system prompt"):
            c = e[sys_label]
            lines.append(f"| {lab} | {e['kind']} | {sys_label} | {c['uncached']:.1f} | {c['cached']:.1f} | "
                         f"{c['floor']:.1f} | {c['cached_fraction']:.3f} | {c['floor_fraction']:.3f} | {c['ratio']:.2f}x | "
                         f"{c['uncached_padded']:.1f} / {c['cached_padded']:.1f} |")
            if c["cached_fraction"] > 0.67:
                short.append((lab, e["kind"], sys_label, c))
    for lab, kind, sys_label, c in short:
        s = c.get("split")
        what = ("both option orders share the question up to the first option text; everything after it (both "
                "options, in the other order, and the chat template's end) differs" if kind == "ab" else
                "both responses share the prompt; the responses differ from their first tokens")
        detail = (f" Per item: {s['item_shared']:.1f} tokens shared by its two sequences after the "
                  f"{s['task_prefix']}-token prefix common to the whole task, then {s['own_each']:.1f} tokens of "
                  "each sequence's own, which every exact scorer must run twice." if s else "")
        lines += ["", f"**{lab} ({kind}, {sys_label}) misses 0.67x: the floor stops it.** The cached scorer runs "
                  f"{c['cached']:.1f} tokens per item, exactly the trie floor ({c['floor']:.1f}), which is "
                  f"{c['floor_fraction']:.3f} of the uncached {c['uncached']:.1f}: {what}.{detail} A token's key and "
                  "value depend on every token before it, so no exact scorer can share what follows the first "
                  "difference (a common suffix at other positions is not shared work)."]
    lines += ["", f"## One sweep point on SmolLM2-135M-Instruct ({res['limit']} items, operating point "
              "contrastive_wanda rho=0.02 gamma=0; + / - masks and their controls on the task, + / - masks on the "
              "capability texts)", "",
              "| pair | uncached CPU (s) | cached CPU (s) | CPU speedup | wall uncached / cached (s) | wall speedup "
              "| forward tokens uncached / cached | max abs score difference |",
              "|---|---|---|---|---|---|---|---|"]
    for lab, e in res["sweep_point"].items():
        ft, w = e["forward_tokens"], e["wall_s"]
        wu, wc = sorted(w["uncached"])[len(w["uncached"]) // 2], sorted(w["cached"])[len(w["cached"]) // 2]
        lines.append(f"| {lab} | {e['uncached']['median_s']:.1f} | {e['cached']['median_s']:.1f} | "
                     f"{e['speedup']['value']:.2f}x (noise {100 * e['speedup']['noise']:.0f}%) | {wu:.1f} / {wc:.1f} | "
                     f"{wu / wc:.2f}x | {ft['uncached']} / {ft['cached']} ({ft['uncached'] / ft['cached']:.2f}x) | "
                     f"{e['max_abs_score_difference']:.1e} |")
    lines += ["", "The cached scorer builds one prefix tree (radix tree) of all sequences of a scoring call — one "
              "task under one condition — and runs each node once, attending to its ancestors' KV cache: the chat "
              "header and system prompt shared by every item run once per condition, an item's shared prompt or "
              "question start once, and the rest of each sequence once. Sequences stop at their last scored "
              "position. Nodes run depth-first, a window of 2 x batch_size at a time, sorted by length and cut "
              "into chunks of at most batch_size rows that minimise padding; a node's KV is freed once its "
              "subtree ran (bounded memory). The sweep point also scores the capability texts, which share only "
              "a short neutral prefix, so its token gain is smaller than the task rows'. Everything is computed "
              "under the condition being scored (masks change every layer). Scores equal the uncached scorer's up "
              "to float32 rounding (tests/test_eval_tasks.py: stories260K under a persona mask, tolerance 1e-4, "
              "and a random-weight Llama on hand-made sequences against float64 whole-sequence forwards)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8, help="items per task in the sweep-point timing (default 8)")
    ap.add_argument("--count-limit", type=int, default=48, help="items per task in the token counts (default 48)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1: one SmolLM2 sweep point "
                    "takes about a minute of CPU time per mode)")
    ap.add_argument("--pairs", default="power,energy", help="pairs timed on SmolLM2 (default power,energy)")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--out", default=str(RESULTS / "eval_prefix_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from persona_kernels.models import load_model
    from persona_kernels.paths import shared_dir

    shared = args.shared or shared_dir(required=True)
    t0 = time.perf_counter()
    _, tok = load_model(None, dtype=torch.float32, padding_side="right")
    res = {"command": "python benchmarks/bench_eval_prefix.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
           "threads": 1, "clock": "process CPU time", "repeats": args.repeats, "limit": args.limit,
           "count_limit": args.count_limit}
    res["tokens_per_item"] = count_tokens(tok, args.count_limit, shared)
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    res["sweep_point"] = sweep_point(args.limit, args.repeats, pairs, shared)
    res["wall_s"] = time.perf_counter() - t0
    atomic_write(Path(args.out + ".json"), json.dumps(res, indent=1))
    atomic_write(Path(args.out + ".md"), render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
