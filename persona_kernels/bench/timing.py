"""The one timing helper of every benchmark (``persona-kernels bench`` and benchmarks/*.py).

:func:`time_interleaved` runs methods *interleaved* (each repeat runs every method once, in a rotating
order), so slow drifts of a shared machine hit all methods alike; a ratio is the median of the per-repeat
ratios and its noise is the relative inter-quartile range of those per-repeat ratios. One sample is taken
with ``torch.utils.benchmark.Timer`` on the CPU (clock ``"process"``: process CPU time, robust to other
processes, used with one thread; ``"wall"``: ``perf_counter``, used with more threads, see
:func:`clock_for_threads`) and with ``triton.testing.do_bench`` on a GPU (clock ``"cuda"``; CUDA events when
Triton is missing). Every output names its clock and thread count (:func:`timing_context`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

CLOCKS = ("auto", "wall", "process", "cuda")


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``values`` (non-empty)."""
    if not values:
        raise ValueError("persona_kernels.bench.quantile: argument 'values': expected a non-empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"persona_kernels.bench.quantile: argument 'q': expected a float in [0, 1], got {q}")
    s = sorted(float(v) for v in values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def relative_iqr(values: Sequence[float]) -> float:
    """(Q3 - Q1) / median: the spread of repeated measurements relative to their centre (0 for one value)."""
    med = statistics.median(values)
    if len(values) < 2 or med == 0:
        return 0.0
    return (quantile(values, 0.75) - quantile(values, 0.25)) / abs(med)


@dataclass
class Timing:
    """Repeated timings of one method, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def noise(self) -> float:
        """Relative inter-quartile range of the samples."""
        return relative_iqr(self.samples)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "q1_s": self.q1, "q3_s": self.q3, "noise": self.noise,
                "samples_s": list(self.samples)}


@dataclass
class Ratio:
    """A ratio of two methods' times measured in the same run: median of per-repeat ratios, and its noise."""

    value: float
    noise: float
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"value": self.value, "noise": self.noise, "samples": list(self.samples)}


def ratio(num: Timing | Sequence[float], den: Timing | Sequence[float]) -> Ratio:
    """``num / den`` from paired repeats (same repeat index = same machine state)."""
    a = num.samples if isinstance(num, Timing) else list(num)
    b = den.samples if isinstance(den, Timing) else list(den)
    if not a or len(a) != len(b):
        raise ValueError(f"persona_kernels.bench.ratio: expected paired, non-empty samples, got {len(a)} and {len(b)}")
    per = [x / y if y > 0 else float("inf") for x, y in zip(a, b)]
    return Ratio(statistics.median(per), relative_iqr(per), per)


def clock_for_threads(threads: int) -> str:
    """The CPU clock a timing with ``threads`` torch threads uses: process CPU time for one thread (robust to
    other processes on a shared machine), the wall clock for more (process time would add the threads up)."""
    return "process" if int(threads) == 1 else "wall"


def resolve_clock(clock: str, device: torch.device) -> str:
    """``auto``: CUDA events on a GPU, process CPU time with one torch thread, else the wall clock."""
    if clock not in CLOCKS:
        raise ValueError(f"persona_kernels.bench: argument 'clock': expected one of {CLOCKS}, got {clock!r}")
    if clock == "cuda" and device.type != "cuda":
        raise ValueError("persona_kernels.bench: argument 'clock': 'cuda' needs a CUDA device")
    if clock != "auto":
        return clock
    if device.type == "cuda":
        return "cuda"
    return clock_for_threads(torch.get_num_threads())


def _sampler(fn: Callable[[], object], clock: str) -> Callable[[int], float]:
    """``calls -> seconds per call of fn`` over that many calls (no extra calls): a
    ``torch.utils.benchmark.Timer`` on the CPU (its ``timer`` is ``time.process_time`` or
    ``time.perf_counter``, its thread count the current torch one), ``triton.testing.do_bench`` (median,
    CUDA events) on a GPU when Triton is installed, else a pair of CUDA events."""
    if clock == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            # do_bench repeats for ``rep`` ms after ``warmup`` ms (L2 cache flushed between calls)
            return lambda calls: float(do_bench(fn, warmup=1, rep=max(1, calls), return_mode="median")) / 1e3

        def cuda_events(calls: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls

        return cuda_events
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, timer=time.process_time if clock == "process" else time.perf_counter,
                  num_threads=torch.get_num_threads())
    # Timer._timeit runs the statement exactly ``calls`` times (Timer.timeit would add its own warm-up calls;
    # time_interleaved does the warm-up itself)
    return lambda calls: float(timer._timeit(calls)) / calls


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    *,
    warmup: int = 1,
    clock: str = "wall",
    calls: int = 1,
    min_time: float = 0.0,
) -> dict[str, Timing]:
    """Time every function of ``fns`` ``repeats`` times, interleaved in a rotating order.

    Args:
        fns: name -> zero-argument callable.
        repeats: samples per method (>= 1).
        warmup: untimed calls of each method first (allocator, autotuning, lazy loading).
        clock: ``"wall"`` (perf_counter), ``"process"`` (process CPU time of all threads) or ``"cuda"``
            (``triton.testing.do_bench``); :func:`clock_for_threads` picks the CPU one.
        calls: calls per sample (the sample is the mean per call).
        min_time: if > 0, raise each method's calls per sample so that one sample lasts about this long.
    """
    if repeats < 1:
        raise ValueError(f"persona_kernels.bench.time_interleaved: argument 'repeats': expected >= 1, got {repeats}")
    if clock not in ("wall", "process", "cuda"):
        raise ValueError(f"persona_kernels.bench.time_interleaved: argument 'clock': expected wall, process or cuda, got {clock!r}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if clock == "cuda":
        torch.cuda.synchronize()
    samplers = {n: _sampler(fns[n], clock) for n in names}
    per_call = {n: calls for n in names}
    if min_time > 0:  # each method gets enough calls per sample to last about min_time
        for n in names:
            once = samplers[n](1)
            per_call[n] = max(calls, min(10000, int(min_time / max(once, 1e-7)) + 1))
    out = {n: Timing() for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            out[name].samples.append(samplers[name](per_call[name]))
    return out


def timing_context(clock: str) -> dict:
    """What a benchmark output must say about its timings: the clock and the torch thread count."""
    names = {"process": "process CPU time", "wall": "wall clock", "cuda": "CUDA events (triton.testing.do_bench)"}
    return {"clock": clock, "clock_name": names.get(clock, clock), "threads": torch.get_num_threads()}


def sync(device: Optional[torch.device]) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
