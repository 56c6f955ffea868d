"""Benchmark of the bitmask-gated linear on the CPU.

Compares, in one run and interleaved repeat by repeat:

* ``gated_linear`` with the ``cpu`` backend (C++ kernels),
* plain ``F.linear(x, W)`` (the baseline every ratio refers to; for bf16 it is torch's bf16 linear),
* with ``--all-methods`` also the ``torch`` reference backend and dense masking ``F.linear(x, W * G)`` (a dense
  gate ``G`` in the weight dtype, built once, multiplied into the weight every call). They stream large
  temporaries that evict the caches the next method then refills, so they are off by default.

Each ratio is the median of the per-repeat ratios ours / plain (persona_kernels.bench.timing); one sample lasts
at least ``--min-time`` seconds. The first pass uses ``--threads`` torch threads (the wall clock with more than
one thread, process CPU time with one); ``--also-single-thread`` adds a 1-thread pass timed by process CPU
time. Every pass names its clock and thread count. Targets (issue 17): bf16 M = 1, 16, 128 at <= 1.10x with
2 threads; bf16 M = 16 and fp32 M = 1 at <= 1.06x with 1 thread.

Writes ``benchmarks/results/gated_linear_cpu.{json,md}`` (``--quick``: a subset, printed only unless
``--output`` is given) and prints the markdown table. The committed results come from

    OMP_NUM_THREADS=2 python benchmarks/bench_gated_linear.py --threads 2 --also-single-thread
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
from persona_kernels.bench.timing import clock_for_threads, ratio, time_interleaved, timing_context  # noqa: E402
from persona_kernels.kernels import torch_ref  # noqa: E402
from persona_kernels.utils.atomic import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (1024, 4096), (11008, 4096)]  # (N, K) = (out_features, in_features)
QUICK_SHAPES = SHAPES[:2]
ROWS = [1, 16, 128]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GAMMAS = [0.0, 0.5]
METHODS = ("plain", "cpu", "torch", "dense")


def target(dtype: str, m: int, threads: int) -> float | None:
    """Issue 17's bound on cpu / plain for this configuration (None: no target)."""
    if threads == 1:
        return 1.06 if (dtype, m) in (("bfloat16", 16), ("float32", 1)) else None
    return 1.10 if dtype == "bfloat16" and m in (1, 16, 128) else None


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "kernel_isa": _extension.cpu_isa(),
        "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def make_fns(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, gamma: float,
             all_methods: bool) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {
        "plain": lambda: F.linear(x, w),
        "cpu": lambda: pk.gated_linear(x, w, packed, None, gamma, backend="cpu"),
    }
    if all_methods:
        g = torch_ref.gate(packed, w.shape[1], gamma, w.dtype)  # dense gate, built once
        fns["torch"] = lambda: pk.gated_linear(x, w, packed, None, gamma, backend="torch")
        fns["dense"] = lambda: F.linear(x, w * g)
    return fns


def timed(fns: dict[str, Callable[[], object]], repeats: int, clock: str, min_time: float) -> dict:
    """Per method: median seconds and the samples; per baseline method: the median per-repeat ratio to plain."""
    res = time_interleaved(fns, repeats, warmup=2, clock=clock, min_time=min_time)
    out = {n: {"median_s": t.median, "min_s": min(t.samples), "all_s": list(t.samples)} for n, t in res.items()}
    for n, t in res.items():
        r = ratio(t, res["plain"])
        out[n]["ratio"], out[n]["ratio_noise"] = r.value, r.noise
    return out


def run(args: argparse.Namespace, threads: int, cpu_time: bool | None = None) -> dict:
    """One pass over every configuration with ``threads`` torch threads (0: unchanged); the clock is process
    CPU time with one thread and the wall clock with more, unless ``cpu_time`` says otherwise."""
    if threads:
        torch.set_num_threads(threads)
    clock = clock_for_threads(torch.get_num_threads()) if cpu_time is None else ("process" if cpu_time else "wall")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    gammas = GAMMAS
    info = machine_info()
    info.update(timing_context(clock))
    info["clock"] = info.pop("clock_name")
    rows = []
    torch.manual_seed(0)
    for n, k in shapes:
        for dname, dtype in DTYPES.items():
            w = torch.randn(n, k).to(dtype)
            packed = pk.pack_mask(torch.rand(n, k) < 0.5)
            for m in args.rows:
                x = torch.randn(m, k).to(dtype)
                for gamma in gammas:
                    fns = make_fns(x, w, packed, gamma, args.all_methods)
                    res = timed(fns, args.repeats, clock, args.min_time)
                    row = {"N": n, "K": k, "dtype": dname, "M": m, "gamma": gamma,
                           "target": target(dname, m, torch.get_num_threads())}
                    for name in METHODS:
                        if name in res:
                            row[f"{name}_ms"] = res[name]["median_s"] * 1e3
                            row[f"{name}_ratio"] = res[name]["ratio"]
                            row[f"{name}_ratio_noise"] = res[name]["ratio_noise"]
                            row[f"{name}_all_ms"] = [t * 1e3 for t in res[name]["all_s"]]
                    rows.append(row)
                    print(format_row(row), flush=True)
    info["load_average_end"] = os.getloadavg()
    return {"machine": info, "repeats": args.repeats, "min_time_s": args.min_time, "quick": args.quick,
            "all_methods": args.all_methods, "results": rows}


def run_all(args: argparse.Namespace) -> dict:
    passes = [run(args, args.threads, True if args.cpu_time else None)]
    if args.also_single_thread:
        print("\nsingle thread, process CPU time:")
        passes.append(run(args, 1, True))
    return {"passes": passes}


def _cell(row: dict, name: str) -> str:
    if f"{name}_ms" not in row:
        return "-"
    return f"{row[f'{name}_ms']:.2f} ({row[f'{name}_ratio']:.2f}x ±{row[f'{name}_ratio_noise'] * 50:.0f}%)"


def format_row(row: dict) -> str:
    target = row["target"]
    ok = "" if target is None else ("yes" if row["cpu_ratio"] <= target else "no")
    return (
        f"| {row['N']}x{row['K']} | {row['dtype']} | {row['M']} | {row['gamma']} | {row['plain_ms']:.2f} | "
        f"{_cell(row, 'cpu')} | {_cell(row, 'torch')} | {_cell(row, 'dense')} | "
        f"{'-' if target is None else f'<= {target:.2f}x'} | {ok} |"
    )


def markdown_pass(report: dict) -> list[str]:
    info = report["machine"]
    return [
        f"## {info['threads']} thread(s), {info['clock']}",
        "",
        f"Load average {info['load_average_start']} at start, {info['load_average_end']} at end "
        f"({info['date_utc']}).",
        "",
        "| W (N x K) | dtype | M | gamma | plain ms | cpu | torch | dense | target (cpu) | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[format_row(r) for r in report["results"]],
        "",
    ]


def markdown(full: dict) -> str:
    info = full["passes"][0]["machine"]
    lines = [
        "# gated_linear on the CPU",
        "",
        f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch_version']} "
        f"(MKL {info['mkl']}), kernel ISA {info['kernel_isa']}, AVX512_BF16 {info['avx512_bf16']}.",
        "",
        f"Median of {full['passes'][0]['repeats']} interleaved repeats (each sample at least "
        f"{full['passes'][0]['min_time_s'] * 1e3:.0f} ms of calls), milliseconds per call; in brackets the median "
        "of the per-repeat ratios to plain `F.linear(x, W)` in the same run (for bf16 torch's bf16 linear) and "
        "half its inter-quartile range. `cpu`: `persona_kernels.gated_linear` with the C++ backend"
        + ("; `torch`: the reference backend (rebuilds the gate from the packed bits each call); `dense`: "
           "`F.linear(x, W * G)` with a dense gate G built once and multiplied into W each call"
           if full["passes"][0]["all_methods"] else "")
        + ". Weight N x K, x M x K, no bias, half of the weights kept. Each section names its torch thread "
        "count and clock (wall clock with 2 threads, process CPU time with 1). On a machine shared with other "
        "jobs, wall-clock times with several threads mostly measure scheduling: check the load averages.",
        "",
        f"Command: `{full['command']}`",
        "",
    ]
    for report in full["passes"]:
        lines += markdown_pass(report)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096x4096 and 1024x4096 only")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats per configuration")
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="seconds of calls per sample at least (short calls are repeated within a sample)")
    parser.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")], default=ROWS,
                        help="comma-separated rows M of x (default: 1,16,128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall clock (robust on a shared machine with "
                             "--threads 1)")
    parser.add_argument("--also-single-thread", action="store_true",
                        help="add a second pass with one thread timed by process CPU time")
    parser.add_argument("--all-methods", action="store_true",
                        help="also time the torch reference backend and dense masking (slow; evict caches)")
    parser.add_argument("--output", type=Path, default=None,
                        help="path stem for .json/.md (default: benchmarks/results/gated_linear_cpu; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    if not pk.dispatch.is_available("cpu", "cpu"):
        print("the C++ extension is not built; run `python setup.py build_ext --inplace`", file=sys.stderr)
        return 1
    print("| W (N x K) | dtype | M | gamma | plain ms | cpu | torch | dense | target (cpu) | met |")
    report = run_all(args)
    omp = os.environ.get("OMP_NUM_THREADS")
    report["command"] = " ".join([*([f"OMP_NUM_THREADS={omp}"] if omp else []), "python benchmarks/bench_gated_linear.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    text = markdown(report)
    print()
    print(text)
    stem = args.output if args.output is not None else (None if args.quick else RESULTS / "gated_linear_cpu")
    if stem is not None:
        atomic_write(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        atomic_write(stem.with_suffix(".md"), text)
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
