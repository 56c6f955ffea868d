"""Mask building speed: persona_kernels.scoring vs the paper's per-row topk loop and a batched topk.

Baselines (both form the same fp32 scores ``|W| * A`` first, as the paper's code does):
  - paper loop: for each output row, ``torch.topk(W_metric[i], k, largest=False)`` marks the k smallest
    scores as pruned (the paper's public code);
  - batched topk: one ``torch.topk(S, k, dim=1, largest=False)`` over all rows, then a scatter.

Settings: (1) one 2048x5632 layer, two personas (two Wanda masks), at sparsity 0.5 and 0.02; (2) every Linear
of the first ``--layers`` layers of a SmolLM2-135M-shaped model (q 576x576, k/v 192x576, o 576x576, gate/up
1536x576, down 576x1536), two personas, same sparsities, plus one Contrastive-Wanda and one Contrastive-Sparse
pair; each on every thread count of ``--threads``. Methods run interleaved (``persona_kernels.bench.timing``);
1 thread is timed with process CPU time, more threads with the wall clock (process time would add the
threads up); the clock is named in the output. Random weights and statistics (seeded).
``--large`` also times one 128256x4096 bf16 layer and its peak memory.

    python benchmarks/bench_scoring.py [--repeats 7] [--threads 1,2] [--layers 4] [--large] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_kernels import scoring  # noqa: E402
from persona_kernels.bench.scoring import SHAPES, _stats, batched_topk_wanda, paper_loop_wanda  # noqa: E402
from persona_kernels.bench.scoring import tie_only_differences  # noqa: E402
from persona_kernels.bench.timing import clock_for_threads, ratio, time_interleaved  # noqa: E402
from persona_kernels.utils.atomic import atomic_write  # noqa: E402

SPARSITIES = (0.5, 0.02)
LAYER_SHAPE = (2048, 5632)


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def large_layer(gen: torch.Generator) -> dict:
    """One 128256x4096 bf16 layer (a Llama-3 lm_head): time (wall) and peak-RSS growth of the masks."""
    w = torch.empty(128256, 4096, dtype=torch.bfloat16).normal_(generator=gen)
    a_pos, a_neg = (torch.rand(4096, generator=gen, dtype=torch.float64) + 0.05 for _ in range(2))
    out = {"shape": [128256, 4096], "dtype": "bfloat16", "weight_mib": w.numel() * 2 / 2**20, "clock": "wall",
           "threads": torch.get_num_threads()}
    for key, fn in (
        ("wanda_packed", lambda: scoring.wanda(w, a_pos, 0.5, packed=True)),
        ("wanda_bool", lambda: scoring.wanda(w, a_pos, 0.5)),
        ("contrastive_sparse_packed", lambda: scoring.contrastive_sparse(w, a_pos, a_neg, 0.5, packed=True)),
    ):
        reset = _reset_peak_rss()
        before = _proc_status_mib("VmRSS") if reset else _proc_status_mib("VmHWM")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        peak = _proc_status_mib("VmHWM")
        outputs = result if isinstance(result, tuple) else (result,)
        out[key] = {"seconds": seconds, "output_mib": sum(t.numel() * t.element_size() for t in outputs) / 2**20,
                    "peak_rss_growth_mib": None if peak is None or before is None else peak - before}
        del result, outputs
        print(f"large layer {key:28s} {seconds:7.2f} s, peak RSS growth {out[key]['peak_rss_growth_mib']} MiB")
    return out


def _methods(weights: dict[str, torch.Tensor], stats: dict, rho: float, contrastive: bool) -> dict[str, Callable]:
    personas = ("pos", "neg")

    def over(fn):
        return lambda: [fn(w, stats[p][n].abs_mean) for n, w in weights.items() for p in personas]

    out = {
        "ours": over(lambda w, a: scoring.wanda(w, a, rho)),
        "paper_loop": over(lambda w, a: paper_loop_wanda(w, a, rho)),
        "batched_topk": over(lambda w, a: batched_topk_wanda(w, a, rho)),
    }
    if contrastive:
        out["contrastive_wanda_pair"] = lambda: [
            scoring.contrastive_wanda(w, stats["pos"][n], stats["neg"][n], rho) for n, w in weights.items()]
        out["contrastive_sparse_pair"] = lambda: [
            scoring.contrastive_sparse(w, stats["pos"][n], stats["neg"][n], min(rho, 0.5)) for n, w in weights.items()]
    return out


def run_setting(label: str, weights: dict[str, torch.Tensor], stats: dict, threads: int, repeats: int,
                contrastive: bool) -> list[dict]:
    torch.set_num_threads(threads)
    clock = clock_for_threads(threads)
    rows = []
    for rho in SPARSITIES:
        fns = _methods(weights, stats, rho, contrastive)
        # the masks agree with both baselines up to the order among exactly tied scores
        agree = all(
            tie_only_differences(scoring.wanda(w, stats[p][n].abs_mean, rho), base(w, stats[p][n].abs_mean, rho),
                                 w, stats[p][n].abs_mean)
            for n, w in weights.items() for p in ("pos", "neg") for base in (paper_loop_wanda, batched_topk_wanda))
        times = time_interleaved(fns, repeats, clock=clock)
        row = {"setting": label, "sparsity": rho, "threads": threads, "clock": clock, "repeats": repeats,
               "median_s": {m: t.median for m, t in times.items()},
               "paper_loop_over_ours": ratio(times["paper_loop"], times["ours"]).to_dict(),
               "batched_topk_over_ours": ratio(times["batched_topk"], times["ours"]).to_dict(),
               "masks_equal_up_to_ties": agree}
        print(f"{label} rho={rho} threads={threads} ({clock}): ours {row['median_s']['ours'] * 1e3:.1f} ms, "
              f"paper loop {row['median_s']['paper_loop'] * 1e3:.1f} ms "
              f"({row['paper_loop_over_ours']['value']:.1f}x), batched topk "
              f"{row['median_s']['batched_topk'] * 1e3:.1f} ms ({row['batched_topk_over_ours']['value']:.1f}x)",
              flush=True)
        rows.append(row)
    return rows


def thread_scaling(weights: dict[str, torch.Tensor], stats: dict, repeats: int) -> list[dict]:
    """``scoring.wanda`` with 1 vs 2 torch threads in one process, wall clock, interleaved repeats (same clock
    for both, so the question "does a second thread slow it down?" is answered on a loaded machine too)."""
    import statistics

    rows = []
    for name, w in weights.items():
        a = stats["pos"][name].abs_mean
        for rho in SPARSITIES:
            fns = {}
            for th in (1, 2):
                def run(th=th):
                    torch.set_num_threads(th)
                    return scoring.wanda(w, a, rho)
                fns[th] = run
            t = {th: [] for th in fns}
            for fn in fns.values():
                fn()
            for r in range(repeats):
                for th in ((1, 2) if r % 2 == 0 else (2, 1)):
                    t0 = time.perf_counter()
                    fns[th]()
                    t[th].append(time.perf_counter() - t0)
            rows.append({"layer": list(w.shape), "sparsity": rho, "clock": "wall",
                         "one_thread_ms": statistics.median(t[1]) * 1e3, "two_threads_ms": statistics.median(t[2]) * 1e3,
                         "two_over_one": statistics.median(b / x for x, b in zip(t[1], t[2]))})
            print(f"threads {list(w.shape)} rho={rho}: 2 threads / 1 thread = {rows[-1]['two_over_one']:.2f} (wall)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--layers", type=int, default=4, help="SmolLM2-shaped layers of setting (2)")
    parser.add_argument("--large", action="store_true", help="also time one 128256x4096 bf16 layer (~2 GiB)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    gen = torch.Generator().manual_seed(0)
    large = large_layer(gen) if args.large else None  # first, while the peak RSS is still low
    layer = {"layer": torch.randn(*LAYER_SHAPE, generator=gen) * 0.02}
    layer_stats = {p: {"layer": _stats(LAYER_SHAPE[1], gen)} for p in ("pos", "neg")}
    smol = {f"model.layers.{i}.{name}": torch.randn(*shape, generator=gen) * 0.02
            for i in range(args.layers) for name, shape in SHAPES.items()}
    smol_stats = {p: {n: _stats(w.shape[1], gen) for n, w in smol.items()} for p in ("pos", "neg")}
    rows = []
    for threads in thread_counts:
        rows += run_setting(f"{LAYER_SHAPE[0]}x{LAYER_SHAPE[1]}", layer, layer_stats, threads, args.repeats, False)
        rows += run_setting(f"SmolLM2-135M-shaped, {args.layers} layers ({len(smol)} Linears)", smol, smol_stats,
                            threads, args.repeats, True)
    scaling = thread_scaling({"layer": layer["layer"], "q_proj": smol["model.layers.0.self_attn.q_proj"]},
                             {p: {"layer": layer_stats[p]["layer"], "q_proj": smol_stats[p]["model.layers.0.self_attn.q_proj"]}
                              for p in ("pos", "neg")}, max(args.repeats, 9))
    command = "python benchmarks/bench_scoring.py" + "".join(" " + a for a in sys.argv[1:] if not a.startswith("--out"))
    report = {"benchmark": "bench_scoring", "command": command, "torch": torch.__version__,
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
              "targets": "paper_loop/ours >= 10x and batched_topk/ours >= 3x at sparsity 0.5 and 0.02, every "
                         "thread count", "rows": rows, "thread_scaling": scaling, "large_layer": large}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scoring_cpu.json", json.dumps(report, indent=2) + "\n")
    lines = [
        "# Scoring benchmark (CPU)", "",
        f"Command: `{command}`; torch {torch.__version__}, {os.cpu_count()} logical CPUs (a shared machine; load "
        f"average at the end {os.getloadavg()[0]:.1f}). Two personas = two Wanda masks, random weights and statistics. "
        "Baselines form the same fp32 scores, then: the paper's per-row `torch.topk(W_metric[i], k, largest=False)` "
        "loop, or one batched `torch.topk(S, k, dim=1)`. Medians of interleaved repeats; a ratio is the median of "
        "per-repeat ratios (noise = its relative IQR). Clock: process CPU time on 1 thread, wall clock otherwise.", "",
        "| setting | sparsity | threads | clock | ours (ms) | paper loop (ms) | paper loop / ours (>= 10x) "
        "| batched topk (ms) | batched topk / ours (>= 3x) | masks equal up to ties |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, pl, bt = r["median_s"], r["paper_loop_over_ours"], r["batched_topk_over_ours"]
        lines.append(
            f"| {r['setting']} | {r['sparsity']} | {r['threads']} | {r['clock']} | {m['ours'] * 1e3:.1f} | "
            f"{m['paper_loop'] * 1e3:.1f} | {pl['value']:.1f}x ±{pl['noise'] * 100:.0f} % "
            f"{'ok' if pl['value'] >= 10 else 'MISSED'} | {m['batched_topk'] * 1e3:.1f} | {bt['value']:.1f}x "
            f"±{bt['noise'] * 100:.0f} % {'ok' if bt['value'] >= 3 else 'MISSED'} | {r['masks_equal_up_to_ties']} |")
    lines += ["", "No slowdown with more threads: `scoring.wanda` with 1 and 2 torch threads in one process, both on the "
              "wall clock, interleaved (median of per-repeat ratios; < 1 = the second thread helps):", "",
              "| layer | sparsity | 1 thread (ms) | 2 threads (ms) | 2 threads / 1 thread |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer'][0]}x{r['layer'][1]} | {r['sparsity']} | {r['one_thread_ms']:.2f} | {r['two_threads_ms']:.2f} | "
              f"{r['two_over_one']:.2f} |" for r in scaling]
    contrastive = [r for r in rows if "contrastive_wanda_pair" in r["median_s"]]
    if contrastive:
        lines += ["", "Contrastive pairs on the SmolLM2-shaped Linears (two masks each, ms):", "",
                  "| sparsity | threads | contrastive_wanda | contrastive_sparse |", "|---|---|---|---|"]
        lines += [f"| {r['sparsity']} | {r['threads']} | {r['median_s']['contrastive_wanda_pair'] * 1e3:.1f} | "
                  f"{r['median_s']['contrastive_sparse_pair'] * 1e3:.1f} |" for r in contrastive]
    if large is not None:
        lines += ["", f"One 128256x4096 bf16 layer ({large['weight_mib']:.0f} MiB of weights, wall clock, "
                  f"{large['threads']} threads; `--large`):", "",
                  "| Masks | Time (s) | Output (MiB) | Peak RSS growth (MiB) |", "|---|---|---|---|"]
        for key in ("wanda_packed", "wanda_bool", "contrastive_sparse_packed"):
            r = large[key]
            growth = "n/a" if r["peak_rss_growth_mib"] is None else f"{r['peak_rss_growth_mib']:.0f}"
            lines.append(f"| {key} | {r['seconds']:.1f} | {r['output_mib']:.0f} | {growth} |")
    atomic_write(out / "scoring_cpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
