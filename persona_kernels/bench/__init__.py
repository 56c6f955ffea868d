"""``persona-kernels bench``: the benchmark suite, against dense masking and the paper's pipeline.

Sections (``--sections``, default all): ``gated`` (gated_linear vs dense masking vs F.linear over Llama-3-8B
and Qwen2.5-14B layer shapes), ``calibration`` (collect_stats vs a plain forward vs per-Linear hooks),
``scoring`` (vectorised masks vs the per-row loop), ``switching`` (set_persona vs reloading / in-place
multiplying weights; memory per persona), ``e2e`` (generate() tokens/s). Writes ``results.json``,
``report.md`` and one PNG per section under ``--out``; ``--baseline`` flags guarded ratios that got worse
than a saved run by more than the measured noise (exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from persona_kernels.utils.cli_args import ArgumentParser, HelpFormatter

SECTIONS = ("gated", "calibration", "scoring", "switching", "e2e")
_MODEL_SECTIONS = ("calibration", "switching", "e2e")

__all__ = ["SECTIONS", "main", "run_suite"]


def _parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="persona-kernels bench",
        description="The persona_kernels benchmark suite: ours vs dense masking and the paper's pipeline, as ratios measured in one run.",
        epilog="examples:\n  persona-kernels bench --quick\n  persona-kernels bench --sections gated --device cuda\n"
               "  persona-kernels bench --quick --baseline benchmarks/results/suite_cpu/results.json",
        formatter_class=HelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="a subset that finishes in a few minutes on a small CPU")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests: tiny shapes
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per comparison (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--clock", default="auto", choices=("auto", "wall", "process", "cuda"),
                    help="auto: CUDA events on a GPU, process CPU time with --threads 1, else wall clock")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="time budget per section; cases past it are skipped (and listed)")
    ap.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    ap.add_argument("--baseline", default=None, help="results.json of an earlier run to compare against")
    ap.add_argument("--save-baseline", default=None, nargs="?", const="",
                    help="also copy this run's JSON to FILE (default: OUT/baseline.json)")
    ap.add_argument("--noise-factor", type=float, default=2.0,
                    help="guard tolerance = factor x (noise now + noise baseline) + --min-tolerance (default 2)")
    ap.add_argument("--min-tolerance", type=float, default=0.05, help="guard tolerance floor (default 0.05)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return ap


def _error(msg: str) -> int:
    print(f"persona-kernels bench: error: {msg}", file=sys.stderr)
    return 2


def run_suite(cfg, sections: Sequence[str], command: str = "") -> dict[str, Any]:
    """Run ``sections`` with ``cfg`` (a :class:`persona_kernels.bench.common.Config`); returns the result dict."""
    from persona_kernels.bench.common import load_default_model, machine_info

    result: dict[str, Any] = {
        "suite": "persona_kernels.bench", "format_version": 1, "command": command,
        "machine": machine_info(cfg.device),
        "config": {"device": str(cfg.device), "quick": cfg.quick, "tiny": cfg.tiny, "repeats": cfg.repeats,
                   "clock": cfg.resolved_clock, "max_seconds": cfg.max_seconds, "seed": cfg.seed},
        "sections": {},
    }
    model = None
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"persona_kernels.bench.{name}")
            if name in _MODEL_SECTIONS:
                if model is None:
                    model = load_default_model(cfg)
                sec = module.run(cfg, model)
            else:
                sec = module.run(cfg)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            sec = {"title": name, "error": f"{type(exc).__name__}: {exc}"}
        sec["seconds"] = time.perf_counter() - t0
        result["sections"][name] = sec
        print(f"[bench] {name} done in {sec['seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``persona-kernels bench``; returns the exit code (1: regression flagged, 2: bad usage)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        return _error(f"argument --sections: unknown section(s) {unknown}; expected a comma list of {', '.join(SECTIONS)}")
    if args.repeats < 1:
        return _error(f"argument --repeats: expected >= 1, got {args.repeats}")
    if args.threads < 0:
        return _error(f"argument --threads: expected >= 0, got {args.threads}")
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return _error(f"argument --baseline: cannot read {args.baseline}: {exc}")
        if not isinstance(baseline, dict) or "sections" not in baseline:
            return _error(f"argument --baseline: {args.baseline} is not a results.json of this suite")

    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, sections, baseline, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, sections, baseline, argv) -> int:
    import torch

    from persona_kernels.bench.common import Config
    from persona_kernels.bench.guard import compare, markdown as guard_markdown
    from persona_kernels.bench.report import write_all, write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("argument --device: CUDA is not available on this machine")
    cfg = Config(device=device, quick=args.quick, tiny=args.tiny, repeats=args.repeats, clock=args.clock,
                 progress=not args.no_progress, max_seconds=args.max_seconds, seed=args.seed)
    try:
        cfg.resolved_clock
    except ValueError as exc:
        return _error(str(exc))
    command = "persona-kernels bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = run_suite(cfg, sections, command.strip())
    code = 0
    if baseline is not None:
        result["guard"] = compare(result, baseline, factor=args.noise_factor, floor=args.min_tolerance)
        result["guard"]["baseline"] = str(args.baseline)
        if result["guard"]["flagged"]:
            code = 1
    out = Path(args.out)
    paths = write_all(result, out)
    if args.save_baseline is not None:
        target = Path(args.save_baseline) if args.save_baseline else out / "baseline.json"
        write_json(result, target)
        paths["baseline"] = target
    print(paths["md"].read_text(encoding="utf-8"))
    if "guard" in result:
        print(guard_markdown(result["guard"]), file=sys.stderr if code else sys.stdout)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = [n for n, s in result["sections"].items() if "error" in s]
    if failed and code == 0:
        print(f"persona-kernels bench: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        code = 1
    return code
