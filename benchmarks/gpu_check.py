#!/usr/bin/env python
"""GPU check: the compiled backends on real 8B model shapes, as ratios measured in one run.

    python benchmarks/gpu_check.py [--budget 330] [--out DIR] [--layers 32] [--sections gemm,multi,stats,model]
                                   [--suite [SECONDS]]
    python benchmarks/gpu_check.py --smoke [--out DIR]    (CPU, tiny shapes: checks this script itself)

Sections (each in its own subprocess on a GPU, so a kernel fault costs only that section; each row records
its numbers or why it was skipped):
  gemm    gated_linear (triton, cuda) vs cuBLAS F.linear vs dense masking F.linear(x, W * G) in bf16 at
          M = 1, 16, 512, 4096 on Llama-3-8B and Qwen2.5-7B Linear shapes (triton.testing.do_bench medians,
          L2 flushed); each backend's output checked against float64 on the same weights first;
  multi   mixed-persona batches (4 personas + base rows): gated_linear_multi (triton, cuda) vs dense masking
          (one F.linear(x_p, W * G_p) per persona) vs one F.linear;
  stats   linear_with_stats (triton, cuda fused, cuda via cuBLAS) and welford_partials vs F.linear at R = 4096;
  model   a random-weight bf16 Llama-3-8B-shaped model from a config dict: calibration tokens/s of the plain
          forward, of persona_kernels.collect_stats (statistics overhead) and of per-Linear hooks that copy each
          input's channel norms to the host one text at a time (the paper code's approach); set_persona latency;
          generate tok/s unpatched vs patched vs merged; a mixed-persona batch (persona_batch) vs the base batch.
Writes gpu_<gpu name>.json and .md to --out (default $OUT, else benchmarks/results). Only the public API of
persona_kernels is used (plus its dispatch module to name a backend's kernel). No internet, nothing loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
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

SECTIONS = ("gemm", "multi", "stats", "model")
# (model, module, N, K)
SHAPES = [
    ("llama3-8b", "q_proj/o_proj", 4096, 4096), ("llama3-8b", "gate/up_proj", 14336, 4096),
    ("llama3-8b", "down_proj", 4096, 14336),
    ("qwen2.5-7b", "q_proj/o_proj", 3584, 3584), ("qwen2.5-7b", "gate/up_proj", 18944, 3584),
    ("qwen2.5-7b", "down_proj", 3584, 18944),
]
GEMM_M = (1, 16, 512, 4096)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# --smoke: the same code paths on the CPU at toy sizes.
SMOKE_SHAPES = [("tiny", "mlp", 96, 64), ("tiny", "odd", 33, 172)]
SMOKE_M = (1, 16)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
                   tie_word_embeddings=False)
# max |out - ref| / sqrt(K) for unit-normal x, W in bf16 (outputs are O(sqrt K)).
BF16_TOL = 2.5e-2


class Ctx:
    """Device, sizes and the clock of one run (GPU, or --smoke on the CPU)."""

    def __init__(self, smoke: bool, deadline: float, layers: int):
        self.smoke = smoke
        self.deadline = deadline
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.bfloat16
        self.shapes = SMOKE_SHAPES if smoke else SHAPES
        self.ms = SMOKE_M if smoke else GEMM_M
        self.model_config = dict(SMOKE_MODEL if smoke else LLAMA3_8B)
        self.model_config["num_hidden_layers"] = 2 if smoke else layers
        # compiled backends on the GPU; the CPU stands in with its own ("cpu") and the reference ("torch")
        self.backends = ("cpu", "torch") if smoke else ("triton", "cuda")
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def bench_ms(self, fn: Callable[[], object]) -> float:
        """Median ms: triton.testing.do_bench (L2 flushed between calls) on a GPU, perf_counter on the CPU."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def wall_ms(self, fn: Callable[[], object], repeats: int) -> float:
        """Median wall-clock ms of ``fn`` over ``repeats`` runs (device synchronised), after one warm-up."""
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def row(self, section: str, name: str, fn: Callable[[], dict], min_left: float = 5.0) -> None:
        """Run one measurement; fn returns a dict of numbers. Errors and the time budget are recorded."""
        rec = {"section": section, "case": name}
        if self.left() < min_left:
            rec.update(status="SKIP", detail="time budget")
        else:
            try:
                rec.update(status="OK", **fn())
            except Exception as exc:  # noqa: BLE001 - report and continue with the next case
                rec.update(status="ERROR", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
        print(f"{rec['status']:5s} {section}: {name}  " + ", ".join(f"{k}={_fmt(v)}" for k, v in rec.items()
                                                                  if k not in ("section", "case", "status")),
              flush=True)
        self.rows.append(rec)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------- helpers
def random_packed(n: int, k: int, device, keep: float = 0.98) -> torch.Tensor:
    import persona_kernels as pk

    return pk.pack_mask(torch.rand(n, k, device=device) < keep)


def dense_gate(packed: torch.Tensor, k: int, gamma: float, dtype) -> torch.Tensor:
    """G = m + gamma (1 - m) as a dense [N, K] tensor (what dense masking multiplies W with)."""
    import persona_kernels as pk

    m = pk.unpack_mask(packed, k).to(dtype)
    return m + gamma * (1 - m)


def kernel(op: str, backend: str, device):
    from persona_kernels import dispatch

    if not dispatch.is_available(backend, device):
        raise RuntimeError(f"backend {backend!r} not available on {device}")
    return dispatch.get_kernel(op, backend, device)


def gemm_error(out: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    return (out.double() - ref).abs().max().item() / math.sqrt(k)


# ----------------------------------------------------------------------------------------------- sections
def section_gemm(ctx: Ctx) -> None:
    dev, dt = ctx.device, ctx.dtype
    for model, module, n, k in ctx.shapes:
        if ctx.left() < 10:
            ctx.row("gemm", f"{model} {module}", lambda: {}, min_left=1e9)
            continue
        w = torch.randn(n, k, device=dev, dtype=dt)
        packed = random_packed(n, k, dev)
        g = dense_gate(packed, k, 0.0, dt)
        # correctness on the same weights, float64 reference, M = 16
        x16 = torch.randn(16, k, device=dev, dtype=dt)
        ref = x16.double() @ (w.double() * g.double()).t()
        for backend in ctx.backends:
            def check(backend=backend):
                err = gemm_error(kernel("gated_linear", backend, dev)(x16, w, packed, None, 0.0), ref, k)
                if not err <= BF16_TOL:
                    raise AssertionError(f"err/sqrt(K) {err:.2e} > {BF16_TOL}")
                return {"err_over_sqrt_k": err}
            ctx.row("gemm", f"{model} {module} N={n} K={k} correctness[{backend}]", check)
        for m in ctx.ms:
            x = torch.randn(m, k, device=dev, dtype=dt)

            def measure(x=x, m=m):
                out = {"model": model, "module": module, "M": m, "N": n, "K": k}
                t_lin = ctx.bench_ms(lambda: F.linear(x, w))
                out["F.linear_ms"] = t_lin
                out["dense_mask_ms"] = ctx.bench_ms(lambda: F.linear(x, w * g))
                for backend in ctx.backends:
                    try:
                        fn = kernel("gated_linear", backend, dev)
                        out[f"{backend}_ms"] = ctx.bench_ms(lambda fn=fn: fn(x, w, packed, None, 0.0))
                    except Exception as exc:  # noqa: BLE001
                        out[f"{backend}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                for key in [k_ for k_ in out if k_.endswith("_ms") and k_ != "F.linear_ms"]:
                    out[key.replace("_ms", "_x_linear")] = out[key] / t_lin
                out["tflops_F.linear"] = 2 * m * n * k / t_lin / 1e9
                return out
            ctx.row("gemm", f"{model} {module} M={m} N={n} K={k}", measure)
        del w, packed, g


def section_multi(ctx: Ctx) -> None:
    dev, dt = ctx.device, ctx.dtype
    personas = 4
    for model, module, n, k in ctx.shapes[:2]:
        w = torch.randn(n, k, device=dev, dtype=dt)
        bank = torch.stack([random_packed(n, k, dev) for _ in range(personas)])
        gates = [dense_gate(bank[p], k, 0.0, dt) for p in range(personas)]
        gammas = [0.0] * personas
        for m in ctx.ms:
            x = torch.randn(m, k, device=dev, dtype=dt)
            index = torch.arange(m, device=dev) % (personas + 1) - 1  # base rows + 4 personas, interleaved
            rows = [(index == p).nonzero().flatten() for p in range(-1, personas)]

            def dense():
                y = torch.empty(m, n, device=dev, dtype=dt)
                for p, r in zip(range(-1, personas), rows):
                    if r.numel():
                        y[r] = F.linear(x[r], w if p < 0 else w * gates[p])
                return y

            def measure(x=x, m=m, index=index, dense=dense):
                out = {"model": model, "module": module, "M": m, "N": n, "K": k, "personas": personas}
                ref = dense().double()
                out["F.linear_ms"] = t_lin = ctx.bench_ms(lambda: F.linear(x, w))
                out["dense_mask_ms"] = ctx.bench_ms(dense)
                for backend in ctx.backends:
                    try:
                        fn = kernel("gated_linear_multi", backend, dev)
                        err = gemm_error(fn(x, w, bank, index, None, gammas), ref, k)
                        if not err <= BF16_TOL:
                            raise AssertionError(f"err/sqrt(K) {err:.2e} > {BF16_TOL}")
                        out[f"{backend}_ms"] = ctx.bench_ms(lambda fn=fn: fn(x, w, bank, index, None, gammas))
                    except Exception as exc:  # noqa: BLE001
                        out[f"{backend}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                for key in [k_ for k_ in out if k_.endswith("_ms") and k_ != "F.linear_ms"]:
                    out[key.replace("_ms", "_x_linear")] = out[key] / t_lin
                return out
            ctx.row("multi", f"{model} {module} M={m} N={n} K={k} P={personas}", measure)


def section_stats(ctx: Ctx) -> None:
    dev, dt = ctx.device, ctx.dtype
    rows_n = 64 if ctx.smoke else 4096
    seq_len = 16 if ctx.smoke else 512
    for model, module, n, k in ctx.shapes[:3]:
        w = torch.randn(n, k, device=dev, dtype=dt)
        x = torch.randn(rows_n, k, device=dev, dtype=dt)

        def measure(w=w, x=x, n=n, k=k, model=model, module=module):
            out = {"model": model, "module": module, "R": rows_n, "N": n, "K": k, "seq_len": seq_len}
            out["F.linear_ms"] = t_lin = ctx.bench_ms(lambda: F.linear(x, w))
            variants = [(b, b, None) for b in ctx.backends]
            if "cuda" in ctx.backends:
                variants.append(("cuda_cublas", "cuda", "cublas"))
            for label, backend, lws_mode in variants:
                try:
                    if lws_mode:
                        os.environ["PERSONA_KERNELS_CUDA_LWS"] = lws_mode
                    lws = kernel("linear_with_stats", backend, dev)
                    wp = kernel("welford_partials", backend, dev)
                    y = lws(x, w, None, None, seq_len)[0]
                    err = gemm_error(y, x.double() @ w.double().t(), k)
                    if not err <= BF16_TOL:
                        raise AssertionError(f"linear_with_stats y: err/sqrt(K) {err:.2e}")
                    out[f"lws_{label}_ms"] = ctx.bench_ms(lambda: lws(x, w, None, None, seq_len))
                    if lws_mode is None:
                        out[f"welford_{label}_ms"] = ctx.bench_ms(lambda: wp(x, None, seq_len))
                except Exception as exc:  # noqa: BLE001
                    out[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                finally:
                    os.environ.pop("PERSONA_KERNELS_CUDA_LWS", None)
            for key in [k_ for k_ in out if k_.endswith("_ms") and k_ != "F.linear_ms"]:
                out[key.replace("_ms", "_overhead")] = out[key] / t_lin - 1.0
            return out
        ctx.row("stats", f"{model} {module} R={rows_n} N={n} K={k}", measure)


def build_model(ctx: Ctx):
    """A random-weight bf16 Llama model built from a config dict, directly on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ctx.model_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def section_model(ctx: Ctx) -> None:
    import persona_kernels as pk

    dev = ctx.device
    holder: dict = {}

    def build():
        t = time.perf_counter()
        holder["model"] = build_model(ctx)
        ctx.sync()
        params = sum(p.numel() for p in holder["model"].parameters())
        return {"layers": ctx.model_config["num_hidden_layers"], "params_b": params / 1e9,
                "build_s": time.perf_counter() - t}
    ctx.row("model", "build random-weight Llama-3-8B-shaped model", build, min_left=60)
    model = holder.get("model")
    if model is None:
        return
    vocab = ctx.model_config["vocab_size"]
    bsz, seq = (2, 16) if ctx.smoke else (8, 512)
    batches = [{"input_ids": torch.randint(0, vocab, (bsz, seq), device=dev)} for _ in range(2 if ctx.smoke else 3)]
    tokens = bsz * seq * len(batches)
    call = {"logits_to_keep": 1, "use_cache": False}

    def calibration():
        out = {"batch": bsz, "seq_len": seq, "tokens": tokens}

        def plain():
            with torch.no_grad():
                for b in batches:
                    model(**b, **call)
        t_plain = ctx.wall_ms(plain, 2)
        t_ours = ctx.wall_ms(lambda: pk.collect_stats(model, batches, progress=False), 2)
        linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]

        def hooks():  # the paper code's approach: per-Linear hook, channel norms to the host, one text at a time
            acc: dict = {}

            def hook(mod, inputs, output):
                xx = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                sq = (torch.norm(xx, p=2, dim=0) ** 2).cpu()
                acc[mod] = acc[mod] + sq if mod in acc else sq
            handles = [m.register_forward_hook(hook) for m in linears]
            try:
                with torch.no_grad():
                    for b in batches:
                        for i in range(bsz):
                            model(input_ids=b["input_ids"][i:i + 1], **call)
            finally:
                for h in handles:
                    h.remove()
        t_hooks = ctx.wall_ms(hooks, 1)
        out.update(plain_tok_s=tokens / t_plain * 1e3, ours_tok_s=tokens / t_ours * 1e3,
                   hooks_tok_s=tokens / t_hooks * 1e3, stats_overhead=t_ours / t_plain - 1.0,
                   ours_x_hooks=t_hooks / t_ours)
        return out
    ctx.row("model", "calibration throughput (plain / collect_stats / hooks)", calibration, min_left=45)

    # a bank of two random personas (2 % of each row pruned) on every Linear but the LM head
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    bank = pk.MaskBank()
    for persona in ("a", "b"):
        bank.add(persona, {name: torch.rand(model.get_submodule(name).weight.shape, device=dev) > 0.02
                           for name in names})
    prompt = torch.randint(0, vocab, (1, 16), device=dev)
    new = 4 if ctx.smoke else 64

    def gen_tok_s(ids: torch.Tensor) -> float:
        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return ids.shape[0] * new / ctx.wall_ms(run, 2) * 1e3

    def generation():
        out = {"new_tokens": new, "unpatched_tok_s": gen_tok_s(prompt)}
        pk.patch_model(model, bank)
        pk.set_persona(model, "a")
        out["patched_tok_s"] = gen_tok_s(prompt)
        pk.merge_persona(model, "a")
        out["merged_tok_s"] = gen_tok_s(prompt)
        pk.unmerge_persona(model)
        pk.set_persona(model, None)
        out["patched_x_unpatched"] = out["patched_tok_s"] / out["unpatched_tok_s"]
        out["merged_x_unpatched"] = out["merged_tok_s"] / out["unpatched_tok_s"]
        return out
    ctx.row("model", "generate tok/s (unpatched / patched / merged)", generation, min_left=30)

    def switching():
        times = []
        for i in range(21):
            t = time.perf_counter()
            pk.set_persona(model, "ab"[i % 2])
            ctx.sync()
            times.append((time.perf_counter() - t) * 1e6)
        pk.set_persona(model, None)
        return {"set_persona_us_median": statistics.median(times[1:]), "set_persona_us_max": max(times[1:])}
    ctx.row("model", "set_persona latency", switching, min_left=10)

    def mixed():
        ids = prompt.expand(4, -1).contiguous()
        out = {"batch": 4}
        pk.set_persona(model, None)
        out["base_batch_tok_s"] = gen_tok_s(ids)
        with pk.persona_batch(model, ["a", "b", None, "a"]):
            out["mixed_batch_tok_s"] = gen_tok_s(ids)
        out["mixed_x_base"] = out["mixed_batch_tok_s"] / out["base_batch_tok_s"]
        return out
    ctx.row("model", "generate, mixed-persona batch (persona_batch) vs base batch", mixed, min_left=20)


# ----------------------------------------------------------------------------------------------- report
TARGETS = """Targets (issue 13): gated bf16 >= 0.95x cuBLAS throughput at M >= 512 (x_linear <= 1.053) and <= 1.10x
F.linear time at M = 1-16; statistics <= 5 % over the plain forward; whole-model calibration >= 3x the hook
approach; dense masking loses everywhere."""


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check: {env.get('gpu', 'cpu smoke')}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu"), "", TARGETS, ""]
    for section in SECTIONS:
        sec = [r for r in rows if r["section"] == section]
        if not sec:
            continue
        lines += [f"## {section}", ""]
        groups: dict[tuple, list[dict]] = {}  # rows with the same fields share one table
        for r in sec:
            keys = tuple(k for k in r if k not in ("section", "case", "status"))
            groups.setdefault(keys, []).append(r)
        for keys, group in groups.items():
            lines += ["| case | status | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
            for r in group:
                lines.append(f"| {r['case']} | {r['status']} | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def environment(ctx: Ctx) -> dict:
    from persona_kernels import _extension

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "missing"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
           "extension_with_cuda": _extension.has_cuda_kernels(), "smoke": ctx.smoke}
    if ctx.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    return env


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_section(name: str, ctx: Ctx) -> None:
    torch.manual_seed(0)
    {"gemm": section_gemm, "multi": section_multi, "stats": section_stats, "model": section_model}[name](ctx)


def run_in_subprocess(name: str, seconds: float, args) -> list[dict]:
    """One section in a fresh process (a CUDA fault there costs only that section)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result = tmp.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", result,
           "--deadline", str(time.time() + seconds), "--layers", str(args.layers)]
    print(f"\n=== {name} (budget {seconds:.0f} s) ===", flush=True)
    try:
        rc = subprocess.run(cmd, timeout=seconds + 60).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    try:
        rows = json.loads(Path(result).read_text() or "[]")
    except (OSError, json.JSONDecodeError):
        rows = []
    finally:
        Path(result).unlink(missing_ok=True)
    if rc != 0:
        rows.append({"section": name, "case": "section process", "status": "ERROR", "detail": f"exit {rc}"})
    return rows


# Shares of the budget per section (the model section builds an 8B model and generates).
SHARES = {"gemm": 0.25, "multi": 0.12, "stats": 0.13, "model": 0.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for all sections (default 330)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, all sections in this process")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B-shaped model (default 32)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--suite", type=float, nargs="?", const=150.0, default=None, metavar="SECONDS",
                    help="afterwards also run `persona-kernels bench --quick` (gated, switching, e2e) within SECONDS "
                         "(default 150) into OUT/suite_gpu/")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.section:  # worker process
        ctx = Ctx(False, args.deadline, args.layers)
        try:
            run_section(args.section, ctx)
        finally:
            Path(args.result).write_text(json.dumps(ctx.rows))
        return 0

    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured. "
              "Use --smoke to check this script on the CPU.")
        return 0
    start = time.time()
    ctx = Ctx(args.smoke, start + args.budget, args.layers)
    env = environment(ctx)
    print("gpu_check:", json.dumps(env), flush=True)
    rows: list[dict] = []
    for i, name in enumerate(sections):
        if args.smoke:
            run_section(name, ctx)
            continue
        left = ctx.deadline - time.time()
        share = SHARES[name] / sum(SHARES[s] for s in sections[i:])
        rows += run_in_subprocess(name, max(left * share, 20.0), args)
    rows = ctx.rows if args.smoke else rows

    from persona_kernels.utils.atomic import atomic_write

    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    base = out_dir / f"gpu_{slug(env.get('gpu', 'cpu-smoke'))}"
    md = markdown(env, rows)
    atomic_write(base.with_suffix(".json"), json.dumps({"env": env, "rows": rows}, indent=1))
    atomic_write(base.with_suffix(".md"), md)
    print(f"\ngpu_check: wrote {base}.json and {base}.md in {time.time() - start:.0f} s\n")
    print(md)
    if args.suite and not args.smoke:  # the benchmark suite, in a subprocess with a hard time limit; reported only
        cmd = [sys.executable, "-m", "persona_kernels.cli", "bench", "--quick", "--no-progress", "--sections",
               "gated,switching,e2e", "--max-seconds", str(args.suite / 4), "--out", str(out_dir / "suite_gpu")]
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=args.suite + 45).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"gpu_check: benchmark suite exit code {rc} -> {out_dir / 'suite_gpu'}", flush=True)
    return 1 if any(r["status"] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
