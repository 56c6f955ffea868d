"""Benchmark of the bitmask-gated linear on the CPU.

Compares, in one run and interleaved repeat by repeat:

* ``gated_linear`` with the ``cpu`` backend (C++ kernels) and the ``torch`` reference backend,
* dense masking ``F.linear(x, W * G)``: a dense gate ``G`` (weight dtype, built once) multiplied into the
  weight every call (the ``torch`` backend instead rebuilds ``G`` from the packed bits every call),
* plain ``F.linear(x, W)`` (the baseline every ratio refers to; for bf16 it is torch's bf16 linear).

Writes ``benchmarks/results/gated_linear_cpu.{json,md}`` (``--quick``: a subset, printed only unless
``--output`` is given) and prints the markdown table.

    python benchmarks/bench_gated_linear.py [--quick] [--repeats 9] [--threads N] [--cpu-time]
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
from persona_kernels.bench.timing import time_interleaved, timing_context  # noqa: E402
from persona_kernels.kernels import torch_ref  # noqa: E402
from persona_kernels.utils.atomic import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (11008, 4096)]  # (N, K) = (out_features, in_features)
ROWS = [1, 16, 512]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GAMMAS = [0.0, 0.5]
TARGETS = {1: 1.15, 16: 1.15, 512: 1.10}  # max ratio cpu / plain
METHODS = ("plain", "cpu", "torch", "dense")


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


def make_fns(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, gamma: float) -> dict[str, Callable[[], object]]:
    g = torch_ref.gate(packed, w.shape[1], gamma, w.dtype)  # dense gate, built once
    return {
        "plain": lambda: F.linear(x, w),
        "cpu": lambda: pk.gated_linear(x, w, packed, None, gamma, backend="cpu"),
        "torch": lambda: pk.gated_linear(x, w, packed, None, gamma, backend="torch"),
        "dense": lambda: F.linear(x, w * g),
    }


def timed(fns: dict[str, Callable[[], object]], repeats: int, clock: str) -> dict:
    """Median seconds per method through the suite's one timing helper (interleaved, rotating order)."""
    res = time_interleaved(fns, repeats, clock=clock)
    return {n: {"median_s": t.median, "min_s": min(t.samples), "all_s": list(t.samples)} for n, t in res.items()}


def run(args: argparse.Namespace, threads: int, cpu_time: bool) -> dict:
    """One pass over every configuration with ``threads`` torch threads (0: unchanged)."""
    if threads:
        torch.set_num_threads(threads)
    clock = "process" if cpu_time else "wall"
    shapes = SHAPES[:1] if args.quick else SHAPES
    gammas = [0.5] if args.quick else GAMMAS
    info = machine_info()
    info.update(timing_context(clock))
    info["clock"] = info.pop("clock_name")
    rows = []
    torch.manual_seed(0)
    for n, k in shapes:
        for dname, dtype in DTYPES.items():
            w = torch.randn(n, k).to(dtype)
            packed = pk.pack_mask(torch.rand(n, k) < 0.5)
            for m in ROWS:
                x = torch.randn(m, k).to(dtype)
                for gamma in gammas:
                    fns = make_fns(x, w, packed, gamma)
                    if m == ROWS[-1] and args.skip_slow_reference:
                        fns.pop("torch")
                    res = timed(fns, args.repeats, clock)
                    plain = res["plain"]["median_s"]
                    row = {"N": n, "K": k, "dtype": dname, "M": m, "gamma": gamma, "target": TARGETS.get(m)}
                    for name in METHODS:
                        if name in res:
                            row[f"{name}_ms"] = res[name]["median_s"] * 1e3
                            row[f"{name}_ratio"] = res[name]["median_s"] / plain
                            row[f"{name}_all_ms"] = [t * 1e3 for t in res[name]["all_s"]]
                    rows.append(row)
                    print(format_row(row), flush=True)
    info["load_average_end"] = os.getloadavg()
    return {"machine": info, "repeats": args.repeats, "quick": args.quick, "results": rows}


def run_all(args: argparse.Namespace) -> dict:
    passes = [run(args, args.threads, args.cpu_time)]
    if args.also_single_thread:
        print("\nsingle thread, process CPU time:")
        passes.append(run(args, 1, True))
    return {"passes": passes}


def _cell(row: dict, name: str) -> str:
    if f"{name}_ms" not in row:
        return "-"
    return f"{row[f'{name}_ms']:.2f} ({row[f'{name}_ratio']:.2f}x)"


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
        f"## {info['torch_threads']} thread(s), {info['clock']}",
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
        f"Median of {full['passes'][0]['repeats']} interleaved repeats, milliseconds (ratio to plain "
        "`F.linear(x, W)` in the same run; for bf16 that is torch's bf16 linear). `cpu` / `torch`: "
        "`persona_kernels.gated_linear` backends (`torch` rebuilds the gate from the packed bits each call); "
        "`dense`: `F.linear(x, W * G)` with a dense gate G built once and multiplied into W each call. "
        "Weight N x K, x M x K, no bias, half of the weights kept. On a machine shared with "
        "other jobs, wall-clock times with several threads mostly measure scheduling; the single-thread "
        "CPU-time pass (when present) compares the kernels themselves.",
        "",
    ]
    for report in full["passes"]:
        lines += markdown_pass(report)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, gamma 0.5 only")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall clock (robust on a shared machine with "
                             "--threads 1)")
    parser.add_argument("--also-single-thread", action="store_true",
                        help="add a second pass with one thread timed by process CPU time")
    parser.add_argument("--skip-slow-reference", action="store_true", help="skip the torch backend at M=512")
    parser.add_argument("--output", type=Path, default=None,
                        help="path stem for .json/.md (default: benchmarks/results/gated_linear_cpu; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    if not pk.dispatch.is_available("cpu", "cpu"):
        print("the C++ extension is not built; run `python setup.py build_ext --inplace`", file=sys.stderr)
        return 1
    print("| W (N x K) | dtype | M | gamma | plain ms | cpu | torch | dense | target (cpu) | met |")
    report = run_all(args)
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
