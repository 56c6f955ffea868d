"""Shared pieces of the benchmark suite: configuration, timed cases, machine information, small helpers."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from persona_kernels.bench.timing import Timing, ratio, resolve_clock, time_interleaved


@dataclass
class Config:
    """Options shared by every section (filled from the command line)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quick: bool = False
    tiny: bool = False
    repeats: int = 5
    clock: str = "auto"
    progress: bool = True
    max_seconds: Optional[float] = None  # per section; remaining cases are skipped past it
    seed: int = 0

    @property
    def resolved_clock(self) -> str:
        return resolve_clock(self.clock, self.device)


@dataclass
class Case:
    """One timed comparison: methods run interleaved, ratios ``(name, numerator, denominator, guarded)``.

    ``setup`` builds the inputs lazily and returns ``{method: zero-argument callable}``; ``metrics`` turns the
    timings into derived numbers (GB/s, tokens/s, ...). ``guarded`` ratios are the ones the regression guard
    watches (ours over a baseline; lower is better).
    """

    key: str
    params: dict[str, Any]
    setup: Callable[[], Mapping[str, Callable[[], object]]]
    ratios: list[tuple[str, str, str, bool]]
    metrics: Optional[Callable[[dict[str, Timing]], dict[str, Any]]] = None
    repeats: Optional[int] = None
    warmup: int = 1
    min_time: float = 0.0
    teardown: Optional[Callable[[], None]] = None


def run_case(case: Case, cfg: Config) -> dict[str, Any]:
    """Time ``case`` and return its result row (times, ratios with noise, metrics)."""
    fns = case.setup()
    try:
        timings = time_interleaved(fns, case.repeats or cfg.repeats, warmup=case.warmup,
                                   clock=cfg.resolved_clock, min_time=case.min_time)
    finally:
        if case.teardown is not None:
            case.teardown()
    ratios = {}
    for name, num, den, guarded in case.ratios:
        if num in timings and den in timings:
            ratios[name] = {**ratio(timings[num], timings[den]).to_dict(), "guard": guarded}
    row = {"key": case.key, "params": dict(case.params), "times": {n: t.to_dict() for n, t in timings.items()},
           "ratios": ratios}
    if case.metrics is not None:
        row["metrics"] = case.metrics(timings)
    return row


def run_cases(cases: Iterable[Case], cfg: Config, desc: str, total: Optional[int] = None) -> tuple[list[dict], list[str]]:
    """Run cases in order with a progress bar; stop (recording the skipped keys) past ``cfg.max_seconds``."""
    from tqdm.auto import tqdm

    cases = list(cases)
    rows: list[dict] = []
    skipped: list[str] = []
    start = time.perf_counter()
    bar = tqdm(cases, desc=desc, unit="case", disable=not cfg.progress, total=total or len(cases), leave=False)
    for case in bar:
        if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
            skipped.append(case.key)
            continue
        bar.set_postfix_str(case.key[:40])
        rows.append(run_case(case, cfg))
    bar.close()
    return rows, skipped


def static_row(key: str, params: dict[str, Any], values: Mapping[str, float],
               ratios: Iterable[tuple[str, str, str, bool]], metrics: Optional[dict] = None) -> dict[str, Any]:
    """A row of exact (untimed) quantities, e.g. bytes; its ratios have zero noise."""
    out = {}
    for name, num, den, guarded in ratios:
        v = values[num] / values[den] if values[den] else float("inf")
        out[name] = {"value": v, "noise": 0.0, "samples": [v], "guard": guarded}
    return {"key": key, "params": dict(params), "values": dict(values), "ratios": out, "metrics": metrics or {}}


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, versions, kernel ISA, GPU name if any."""
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and cpu_model in ("unknown", "", "x86_64"):
                    cpu_model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - missing or broken triton
        triton_version = None
    from persona_kernels import __version__, _extension
    from persona_kernels.dispatch import available_backends

    info = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa": _extension.cpu_isa(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "triton": triton_version,
        "persona_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "backends": available_backends(device),
        "gpu": None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        idx = device.index if device.type == "cuda" and device.index is not None else 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: Mapping[str, Any]) -> str:
    """One line naming the machine a run came from."""
    parts = [f"{info.get('cpu_model')} ({info.get('logical_cpus')} logical CPUs, {info.get('torch_threads')} torch threads, "
             f"kernel ISA {info.get('cpu_isa')})"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']} (CUDA {info.get('cuda')})")
    parts.append(f"torch {info.get('torch')}, triton {info.get('triton')}, persona_kernels {info.get('persona_kernels')}")
    return "; ".join(parts)


def random_keep_mask(n: int, k: int, keep: float = 0.5, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random bool keep-mask [n, k] on the CPU keeping about ``keep`` of the weights."""
    return torch.rand(n, k, generator=generator) < keep


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear of ``model`` but the LM head, by name (what collect_stats targets by default)."""
    from persona_kernels.calibration import resolve_target_modules

    return dict(resolve_target_modules(model))


def load_default_model(cfg: Config, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (cached safetensors after the first load) on the configured device."""
    from persona_kernels.models import load_model

    return load_model(None, dtype=dtype, device=cfg.device)
