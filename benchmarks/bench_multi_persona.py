"""Benchmark: one mixed-persona batch vs one call per persona vs dense masking (CPU).

A batch of ``--rows`` rows (default 16) spread round-robin over ``--personas`` personas (default 4) through one
``--n x --k`` Linear (default 4096 x 4096, fp32). Timed, interleaved repeat by repeat (medians):

* ``multi``: ``gated_linear_multi(x, W, bank, index)`` with the ``cpu`` backend: one call, rows grouped inside;
* ``multi_sorted``: the same with the batch rows ordered by persona (each persona's rows consecutive: the
  C++ backend runs on views of x, no gather / scatter);
* ``separate``: the rows already grouped by persona, one ``gated_linear`` call per persona (the best case of
  a server without mixed batches: it must also gather the rows; not counted here);
* ``dense``: per persona ``F.linear(x_p, W * G_p)`` with the dense gate built once (weight dtype): the
  masked weight is re-materialised every call;
* ``plain``: ``F.linear(x, W)`` on the whole batch (no persona; the floor every ratio refers to).

Each case runs with ``--tokens 1`` (decode, one row per sequence) and ``--tokens`` > 1 (prefill: each of the
rows holds that many tokens of its persona). Writes ``benchmarks/results/multi_persona_cpu.{json,md}``.

    python benchmarks/bench_multi_persona.py [--repeats 7] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import persona_kernels as pk  # noqa: E402
from persona_kernels import _extension  # noqa: E402
from persona_kernels.bench.report import markdown_table  # noqa: E402
from persona_kernels.bench.timing import clock_for_threads, time_interleaved, timing_context  # noqa: E402
from persona_kernels.utils.atomic import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("plain", "multi", "multi_sorted", "separate", "dense")


def make_fns(rows: int, tokens: int, n: int, k: int, personas: int, gamma: float) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, tokens, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    masks = [torch.rand(n, k, generator=gen) < 0.9 for _ in range(personas)]
    bank = torch.stack([pk.pack_mask(m) for m in masks])
    row_persona = torch.arange(rows) % personas
    index = row_persona[:, None].expand(rows, tokens).contiguous()
    groups = [x[row_persona == p].reshape(-1, k).contiguous() for p in range(personas)]
    gates = [(m.float() + gamma * (1 - m.float())) for m in masks]
    x2 = x.reshape(-1, k)
    by_persona = torch.argsort(row_persona, stable=True)
    x_sorted, index_sorted = x[by_persona].contiguous(), index[by_persona].contiguous()
    return {
        "plain": lambda: F.linear(x2, w),
        "multi": lambda: pk.gated_linear_multi(x, w, bank, index, None, gamma, backend="cpu", validate_index=False),
        "multi_sorted": lambda: pk.gated_linear_multi(x_sorted, w, bank, index_sorted, None, gamma, backend="cpu",
                                                      validate_index=False),
        "separate": lambda: [pk.gated_linear(g, w, bank[p], None, gamma, backend="cpu") for p, g in enumerate(groups)],
        "dense": lambda: [F.linear(g, w * gates[p]) for p, g in enumerate(groups)],
    }


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per method through the suite's one timing helper (interleaved)."""
    clock = clock_for_threads(torch.get_num_threads())
    return {name: t.median * 1e3 for name, t in time_interleaved(fns, repeats, clock=clock).items()}


def run(args: argparse.Namespace) -> dict:
    cases = []
    for tokens in (1, args.tokens):
        ms = timed(make_fns(args.rows, tokens, args.n, args.k, args.personas, args.gamma), args.repeats)
        cases.append({
            "rows": args.rows, "tokens_per_row": tokens, "personas": args.personas, "n": args.n, "k": args.k,
            "gamma": args.gamma, "median_ms": ms,
            "ratio_to_plain": {m: ms[m] / ms["plain"] for m in METHODS},
            "multi_speedup_vs_separate": ms["separate"] / ms["multi"],
            "multi_speedup_vs_dense": ms["dense"] / ms["multi"],
        })
    return {
        "benchmark": "multi_persona_cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timing": timing_context(clock_for_threads(torch.get_num_threads())),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_isa": _extension.cpu_isa(), "torch": torch.__version__},
        "repeats": args.repeats,
        "dtype": "float32",
        "cases": cases,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Mixed-persona batch vs per-persona calls vs dense masking (CPU)",
        "",
        f"{report['date']}, {m['processor']}, {m['threads']} threads, ISA {m['cpu_isa']}, torch {m['torch']}; "
        f"clock: {report['timing']['clock_name']}; fp32, median of {report['repeats']} interleaved repeats. Ratios are to plain `F.linear` on the whole batch.",
        "",
    ]
    header = ["rows x tokens", "personas", "N x K", "plain ms", "multi ms (ratio)", "multi, rows sorted ms (ratio)",
              "separate ms (ratio)", "dense ms (ratio)", "multi vs separate", "multi vs dense"]
    rows = []
    for c in report["cases"]:
        ms, r = c["median_ms"], c["ratio_to_plain"]
        rows.append([f"{c['rows']} x {c['tokens_per_row']}", str(c["personas"]), f"{c['n']} x {c['k']}",
                     f"{ms['plain']:.2f}",
                     *(f"{ms[k]:.2f} ({r[k]:.2f})" for k in ("multi", "multi_sorted", "separate", "dense")),
                     f"{c['multi_speedup_vs_separate']:.2f}x", f"{c['multi_speedup_vs_dense']:.2f}x"])
    lines += markdown_table(header, rows)
    lines += [
        "",
        "`multi`: one `gated_linear_multi` call (rows grouped by persona inside, one C++ pass per group; "
        "`rows sorted`: the batch ordered by persona, no gather). "
        "`separate`: one `gated_linear` call per persona on pre-grouped rows. `dense`: `F.linear(x_p, W * G_p)` "
        "per persona. Timings on a shared machine are noisy: compare ratios within one run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row of the prefill case (default 32)")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, 3 repeats, print only")
    parser.add_argument("--output", default=None, help="path stem (default benchmarks/results/multi_persona_cpu)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n = args.k = 1024
        args.repeats = 3
    report = run(args)
    text = markdown(report)
    print(text)
    if not args.quick or args.output:
        stem = Path(args.output) if args.output else RESULTS / "multi_persona_cpu"
        atomic_write(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        atomic_write(stem.with_suffix(".md"), text)
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
