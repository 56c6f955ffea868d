#!/usr/bin/env python
"""GPU check of the compiled backends ("triton", "cuda"): correctness first, then timings.

    python benchmarks/gpu_check.py [--budget 400] [--out DIR]
    python benchmarks/gpu_check.py --selftest     (CPU: this script's references against "torch"/"cpu")

(a) correctness, compiled (never the Triton interpreter): gated_linear, welford_partials and
    linear_with_stats of each backend against float64 references (odd K, N=1, M=1, 3-D and
    non-contiguous inputs, fp32/fp16/bf16); one PASS/FAIL/ERROR/SKIP line per case, failures don't stop it;
(b) timings in bf16 (triton.testing.do_bench medians, CUDA events when Triton is missing):
    gated_linear (triton, cuda) vs F.linear vs dense masking F.linear(x, W * G) at 4096x4096 and
    11008x4096 (N x K) for M in {1, 16, 512}; linear_with_stats vs F.linear (statistics overhead);
(c) a markdown table printed last, JSON + markdown written to $OUT when set (the GPU runner returns
    only files there), else benchmarks/results/gpu_<gpu-name>.{json,md}.

Each backend's correctness and timing runs in its own subprocess, so a kernel that corrupts the CUDA
context (illegal address) costs only that part. On a machine without CUDA it prints a notice, exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BACKENDS = ("triton", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max |out - ref| / sqrt(K) for unit-normal x, W (outputs are O(sqrt K)); output rounding dominates.
GATED_TOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2.5e-2}
CUDA_PATHS = ("auto", "gemv", "simt", "wmma")  # PERSONA_KERNELS_CUDA_GATED values
# Device of the checks; the hidden --selftest runs the correctness phase on the CPU ("torch"/"cpu" backends)
# to check this script itself where there is no GPU.
DEVICE = torch.device("cuda")


# ----------------------------------------------------------------------------------------------- references
def gated_ref(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, bias, gamma: float) -> torch.Tensor:
    """float64 ``x @ (w * G).T + b`` with the gate unpacked independently of the package."""
    n, k = w.shape
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    m = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, :k].double()
    y = x.double() @ (w.double() * (m + gamma * (1.0 - m))).t()
    return y if bias is None else y + bias.double()


def stats_ref(x: torch.Tensor, row_mask, seq_len: int) -> list[torch.Tensor]:
    """float64 two-pass (count, mean, m2, abs_mean, abs_m2, seq_sumsq) of x [R, K]."""
    xd = x.double()
    valid = torch.isfinite(xd)
    if row_mask is not None:
        valid &= row_mask[:, None]
    cnt = valid.sum(0)
    z = torch.where(valid, xd, torch.zeros_like(xd))
    c = cnt.clamp(min=1).double()
    out = [cnt]
    for v in (z, z.abs()):
        mean = v.sum(0) / c
        out += [mean, torch.where(valid, v - mean, torch.zeros_like(v)).pow(2).sum(0)]
    s = x.shape[0] // seq_len if seq_len > 0 else 0
    out.append((z[: s * seq_len] ** 2).reshape(s, seq_len, -1).sum(1) if s else xd.new_zeros(0, x.shape[1]))
    return out


def stats_error(got, ref) -> tuple[bool, str]:
    """Counts exact; float fields within 1e-4 relative to each field's scale."""
    if got[0].dtype != torch.int64 or not torch.equal(got[0].cpu(), ref[0].cpu()):
        return False, "count mismatch"
    worst = 0.0
    for name, g, r in zip(("mean", "m2", "abs_mean", "abs_m2", "seq_sumsq"), got[1:], ref[1:]):
        if g.dtype != torch.float32 or tuple(g.shape) != tuple(r.shape):
            return False, f"{name}: dtype/shape {g.dtype} {tuple(g.shape)} vs {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        scale = r.abs().max().item() + 1e-6
        err = (g.double() - r).abs().max().item() / scale
        worst = max(worst, err)
        if not math.isfinite(err) or err > 1e-4:
            return False, f"{name}: rel err {err:.2e}"
    return True, f"rel err {worst:.1e}"


# ----------------------------------------------------------------------------------------------- helpers
def make_packed(n: int, k: int, device, keep: float = 0.6) -> torch.Tensor:
    from persona_kernels.ops.packing import pack_mask

    return pack_mask(torch.rand(n, k) < keep).to(device)


class Recorder:
    def __init__(self, deadline: float):
        self.deadline = deadline
        self.records: list[dict] = []

    def case(self, name: str, fn: Callable[[], tuple]) -> None:
        """Run one case; fn returns (ok, detail) or (ok, detail, timing dict)."""
        extra = None
        if time.time() > self.deadline:
            status, detail = "SKIP", "time budget"
        else:
            try:
                ok, detail, *rest = fn()
                extra = rest[0] if rest else None
                status = "PASS" if ok else "FAIL"
            except Exception as exc:  # noqa: BLE001 - report and continue
                status, detail = "ERROR", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
        print(f"{status:5s} {name}  {detail}", flush=True)
        self.records.append({"case": name, "status": status, "detail": detail})
        if extra is not None:
            self.records[-1]["timing"] = extra


# ----------------------------------------------------------------------------------------------- (a) correctness
def correctness(backend: str, rec: Recorder) -> None:
    from persona_kernels import dispatch
    from persona_kernels.ops.gated_linear import gated_linear as gated_linear_op
    from persona_kernels.ops.welford import welford_partials as welford_op

    dev = DEVICE
    if not dispatch.is_available(backend, dev):
        rec.case(f"{backend}: available", lambda: (False, "backend not available on this machine"))
        return
    gl = dispatch.get_kernel("gated_linear", backend, dev)
    wp = dispatch.get_kernel("welford_partials", backend, dev)
    lws = dispatch.get_kernel("linear_with_stats", backend, dev)
    paths = CUDA_PATHS if backend == "cuda" else ("auto",)

    gl_shapes = [(1, 1, 172, 0.25, True), (1, 300, 4096, 0.25, True), (3, 37, 172, 0.0, False),
                 (16, 64, 256, 1.0, True), (17, 65, 172, 0.25, True), (300, 257, 1000, 0.25, True)]
    for dname, dtype in DTYPES.items():
        for (m, n, k, gamma, with_bias) in gl_shapes:
            for path in paths:
                def run(m=m, n=n, k=k, gamma=gamma, with_bias=with_bias, dtype=dtype, dname=dname, path=path):
                    os.environ["PERSONA_KERNELS_CUDA_GATED"] = path
                    try:
                        x = torch.randn(m, k, device=dev).to(dtype)
                        w = torch.randn(n, k, device=dev).to(dtype)
                        b = torch.randn(n, device=dev).to(dtype) if with_bias else None
                        packed = make_packed(n, k, dev)
                        out = gl(x, w, packed, b, gamma)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                    finally:
                        os.environ.pop("PERSONA_KERNELS_CUDA_GATED", None)
                    if out.dtype != dtype or tuple(out.shape) != (m, n):
                        return False, f"got {out.dtype} {tuple(out.shape)}"
                    err = (out.double() - gated_ref(x, w, packed, b, gamma)).abs().max().item() / math.sqrt(k)
                    return err <= GATED_TOL[dname] and math.isfinite(err), f"err/sqrt(K) {err:.2e}"
                tag = f" path={path}" if backend == "cuda" else ""
                rec.case(f"{backend} gated_linear {dname} M={m} N={n} K={k} gamma={gamma} bias={with_bias}{tag}", run)

    # 3-D, non-contiguous x through the public op (reshape + contiguous happen there).
    for dname, dtype in DTYPES.items():
        def run3d(dtype=dtype, dname=dname):
            x = torch.randn(5, 172, 2, device=dev).to(dtype).transpose(1, 2)  # [5, 2, 172], non-contiguous
            w = torch.randn(70, 172, device=dev).to(dtype)
            packed = make_packed(70, 172, dev)
            out = gated_linear_op(x, w, packed, None, 0.5, backend=backend)
            ref = gated_ref(x.reshape(-1, 172), w, packed, None, 0.5).reshape(5, 2, 70)
            err = (out.double() - ref).abs().max().item() / math.sqrt(172)
            return err <= GATED_TOL[dname] and out.shape == (5, 2, 70), f"err/sqrt(K) {err:.2e}"
        rec.case(f"{backend} gated_linear 3-D non-contiguous {dname}", run3d)

    st_shapes = [(1, 172, 0, False), (37, 65, 0, True), (300, 172, 50, True), (1200, 96, 300, False),
                 (130, 33, 7, True), (4096, 256, 2048, True)]
    for dname, dtype in DTYPES.items():
        for (r, k, seq_len, masked) in st_shapes:
            def run_st(r=r, k=k, seq_len=seq_len, masked=masked, dtype=dtype):
                x = (torch.randn(r, k, device=dev) * 3 + 1).to(dtype)
                x[0, 0] = float("nan")
                if r > 2:
                    x[2, 1] = float("inf")
                mask = (torch.rand(r, device=dev) > 0.3) if masked else None
                got = wp(x, mask, seq_len)
                return stats_error(got, stats_ref(x, mask, seq_len))
            rec.case(f"{backend} welford_partials {dname} R={r} K={k} seq_len={seq_len} mask={masked}", run_st)

    for dname, dtype in DTYPES.items():
        for (r, n, k, seq_len, masked) in [(1, 1, 172, 0, False), (300, 96, 172, 50, True), (512, 257, 1000, 128, False)]:
            def run_lws(r=r, n=n, k=k, seq_len=seq_len, masked=masked, dtype=dtype, dname=dname):
                x = torch.randn(r, k, device=dev).to(dtype)
                w = torch.randn(n, k, device=dev).to(dtype)
                b = torch.randn(n, device=dev).to(dtype)
                mask = (torch.rand(r, device=dev) > 0.3) if masked else None
                y, *parts = lws(x, w, b, mask, seq_len)
                ref_y = x.double() @ w.double().t() + b.double()
                err = (y.double() - ref_y).abs().max().item() / math.sqrt(k)
                if y.dtype != dtype or tuple(y.shape) != (r, n) or not err <= GATED_TOL[dname]:
                    return False, f"y: {y.dtype} {tuple(y.shape)} err/sqrt(K) {err:.2e}"
                ok, detail = stats_error(parts, stats_ref(x, mask, seq_len))
                return ok, f"y err/sqrt(K) {err:.1e}; stats {detail}"
            rec.case(f"{backend} linear_with_stats {dname} R={r} N={n} K={k} seq_len={seq_len} mask={masked}", run_lws)

    for dname, dtype in DTYPES.items():
        def run_st3d(dtype=dtype):
            x = torch.randn(3, 40, 172, device=dev).to(dtype)
            tok = torch.rand(3, 40, device=dev) > 0.2
            got = welford_op(x, tok, backend=backend)
            return stats_error(list(got), stats_ref(x.reshape(-1, 172), tok.reshape(-1), 40))
        rec.case(f"{backend} welford_partials 3-D token_mask {dname}", run_st3d)


# ----------------------------------------------------------------------------------------------- (b) timings
def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn (triton.testing.do_bench when available, else CUDA events)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        pass
    for _ in range(5):
        fn()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


GEMM_SHAPES = [(4096, 4096), (11008, 4096)]  # (N, K)
GEMM_MS = (1, 16, 512)
STATS_ROWS = (512, 4096)


def timings(part: str, rec: Recorder) -> None:
    """part: "ref" (F.linear, dense masking) or a backend name."""
    from persona_kernels import dispatch
    from persona_kernels.kernels.torch_ref import gate

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    if part != "ref" and not dispatch.is_available(part, dev):
        rec.case(f"time {part}", lambda: (False, "backend not available"))
        return
    for (n, k) in GEMM_SHAPES:
        w = torch.randn(n, k, device=dev, dtype=dtype)
        packed = make_packed(n, k, dev)
        g = gate(packed, k, 0.0, dtype)
        for m in GEMM_MS:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            if part == "ref":
                fns = {"F.linear": lambda: F.linear(x, w), "dense mask F.linear(x, W*G)": lambda: F.linear(x, w * g)}
            else:
                kern = dispatch.get_kernel("gated_linear", part, dev)
                fns = {f"gated_linear[{part}]": lambda kern=kern: kern(x, w, packed, None, 0.0)}
            for label, fn in fns.items():
                def run(fn=fn, label=label, m=m, n=n, k=k):
                    ms = bench_ms(fn)
                    nbytes = (n * k + m * k + m * n) * 2 + packed.numel() * 4
                    res = {"op": "gated_linear", "impl": label, "M": m, "N": n, "K": k, "ms": ms,
                           "tflops": 2 * m * n * k / ms / 1e9, "gbps": nbytes / ms / 1e6}
                    return True, f"{ms * 1e3:.1f} us  {res['tflops']:.1f} TFLOP/s  {res['gbps']:.0f} GB/s", res
                rec.case(f"time gated_linear {label} M={m} N={n} K={k}", run)
    n, k = 4096, 4096
    w = torch.randn(n, k, device=dev, dtype=dtype)
    for r in STATS_ROWS:
        x = torch.randn(r, k, device=dev, dtype=dtype)
        if part == "ref":
            fns = {"F.linear": lambda: F.linear(x, w)}
        else:
            lws = dispatch.get_kernel("linear_with_stats", part, dev)
            wpk = dispatch.get_kernel("welford_partials", part, dev)
            fns = {f"linear_with_stats[{part}]": lambda lws=lws: lws(x, w, None, None, 512),
                   f"welford_partials[{part}]": lambda wpk=wpk: wpk(x, None, 512)}
        for label, fn in fns.items():
            def run(fn=fn, label=label, r=r):
                ms = bench_ms(fn)
                res = {"op": "linear_with_stats", "impl": label, "M": r, "N": n, "K": k, "ms": ms,
                       "tflops": 2 * r * n * k / ms / 1e9, "gbps": (n * k + r * k + r * n) * 2 / ms / 1e6}
                return True, f"{ms * 1e3:.1f} us", res
            rec.case(f"time stats {label} R={r} N={n} K={k} seq_len=512", run)


# ----------------------------------------------------------------------------------------------- orchestration
def worker(phase: str, part: str, deadline: float, result: str) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only
    torch.manual_seed(0)
    rec = Recorder(deadline)
    try:
        if phase == "correct":
            correctness(part, rec)
        else:
            timings(part, rec)
    finally:
        Path(result).write_text(json.dumps(rec.records))
    return 0


def run_worker(phase: str, part: str, seconds: float) -> list[dict]:
    deadline = time.time() + seconds
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result = tmp.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--part", part,
           "--deadline", str(deadline), "--result", result]
    print(f"\n=== {phase} {part} (budget {seconds:.0f} s) ===", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=seconds + 60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    try:
        records = json.loads(Path(result).read_text() or "[]")
    except (OSError, json.JSONDecodeError):
        records = []
    finally:
        Path(result).unlink(missing_ok=True)
    if rc != 0:
        records.append({"case": f"{phase} {part} worker", "status": "ERROR", "detail": f"exit {rc}"})
        print(f"ERROR {phase} {part} worker exited with {rc}", flush=True)
    return records


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def markdown(gpu: str, correct: list[dict], timed: list[dict], env: dict) -> str:
    counts = {s: sum(r["status"] == s for r in correct) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    lines = [f"# GPU check: {gpu}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, extension with CUDA: {env['cuda_ext']}", "",
             "## Correctness vs float64", "",
             "PASS {PASS}, FAIL {FAIL}, ERROR {ERROR}, SKIP {SKIP}".format(**counts), ""]
    bad = [r for r in correct if r["status"] in ("FAIL", "ERROR")]
    if bad:
        lines += ["| case | status | detail |", "| --- | --- | --- |"]
        lines += [f"| {r['case']} | {r['status']} | {r['detail']} |" for r in bad]
        lines.append("")
    rows = [r["timing"] for r in timed if "timing" in r]
    base = {(t["op"], t["M"], t["N"], t["K"]): t["ms"] for t in rows if t["impl"] == "F.linear"}
    lines += ["## Timings (bf16, median)", "", "| op | impl | M | N | K | us | x F.linear | TFLOP/s | GB/s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in rows:
        ref = base.get((t["op"], t["M"], t["N"], t["K"]))
        ratio = f"{t['ms'] / ref:.2f}" if ref else "-"
        lines.append(f"| {t['op']} | {t['impl']} | {t['M']} | {t['N']} | {t['K']} | {t['ms'] * 1e3:.1f} | {ratio} | "
                     f"{t['tflops']:.1f} | {t['gbps']:.0f} |")
    skipped = [r for r in timed if r["status"] != "PASS"]
    if skipped:
        lines += ["", "Timing cases not measured: " + "; ".join(f"{r['case']} ({r['status']}: {r['detail']})" for r in skipped)]
    return "\n".join(lines) + "\n"


def selftest() -> int:
    """Check this script on the CPU: correctness cases of the "torch" and "cpu" backends + the report."""
    global DEVICE
    DEVICE = torch.device("cpu")
    torch.manual_seed(0)
    records: list[dict] = []
    for part in ("torch", "cpu"):
        rec = Recorder(time.time() + 600)
        correctness(part, rec)
        records += rec.records
    fake = [{"case": "t", "status": "PASS", "detail": "", "timing": {"op": "gated_linear", "impl": impl, "M": 1,
             "N": 8, "K": 8, "ms": ms, "tflops": 1.0, "gbps": 1.0}} for impl, ms in (("F.linear", 1.0), ("x", 2.0))]
    env = {"torch": torch.__version__, "triton": "-", "cuda": None, "cuda_ext": False}
    print(markdown("selftest", records, fake, env))
    return 1 if any(r["status"] in ("FAIL", "ERROR") for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for all phases (default 400)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results)")
    ap.add_argument("--worker", choices=("correct", "time"), help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--selftest", action="store_true", help="check this script on the CPU (no GPU needed)")
    ap.add_argument("--suite", type=float, nargs="?", const=150.0, default=None, metavar="SECONDS",
                    help="also run `persona-kernels bench --quick` (gated, switching, e2e) within SECONDS (default "
                         "150, taken from --budget) into OUT/suite_gpu/")
    args = ap.parse_args(argv)
    if args.selftest:
        return selftest()
    if args.worker:
        return worker(args.worker, args.part, args.deadline, args.result)

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check.")
        return 0
    from persona_kernels import _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    gpu = torch.cuda.get_device_name(0)
    env = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "cuda_ext": _extension.has_cuda_kernels(), "capability": list(torch.cuda.get_device_capability(0))}
    print(f"gpu_check: {gpu} (sm_{env['capability'][0]}{env['capability'][1]}), torch {env['torch']}, "
          f"triton {triton_version}, extension built with CUDA: {env['cuda_ext']}", flush=True)

    start = time.time()
    if args.suite:
        args.budget = max(args.budget - args.suite, 120.0)
    # Shares of the budget: correctness triton 35 %, cuda 20 %, timings the rest.
    correct = run_worker("correct", "triton", 0.35 * args.budget)
    correct += run_worker("correct", "cuda", 0.20 * args.budget)
    timed: list[dict] = []
    for part in ("ref", "cuda", "triton"):
        left = args.budget - (time.time() - start)
        share = {"ref": 0.15, "cuda": 0.3, "triton": 1.0}[part] * left
        timed += run_worker("time", part, max(share, 20.0))

    md = markdown(gpu, correct, timed, env)
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"gpu_{slug(gpu)}"
    for suffix, text in ((".json", json.dumps({"env": env, "correctness": correct, "timings": timed}, indent=1)),
                         (".md", md)):
        tmp = base.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, base.with_suffix(suffix))
    print(f"\ngpu_check: wrote {base}.json and {base}.md in {time.time() - start:.0f} s\n")
    if args.suite:  # the benchmark suite, in a subprocess with a hard time limit; its failure is reported only
        cmd = [sys.executable, "-m", "persona_kernels.cli", "bench", "--quick", "--no-progress", "--sections",
               "gated,switching,e2e", "--max-seconds", str(args.suite / 4), "--out", str(out_dir / "suite_gpu")]
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=args.suite + 45).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"gpu_check: benchmark suite exit code {rc} -> {out_dir / 'suite_gpu'}", flush=True)
    print(md)
    failed = sum(r["status"] in ("FAIL", "ERROR") for r in correct)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
