"""Section "gated": ``gated_linear`` (each backend) vs dense masking vs the plain ``F.linear``.

Dense masking is ``F.linear(x, W * G)``: the masked weight is materialised every call (G, the dense gate in the
weight dtype, is built once). Shapes are (N, K) = (out_features, in_features) of Llama-3-8B and Qwen2.5-14B
layers; M is the number of rows of x (tokens). Every ratio is measured in one run, methods interleaved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from persona_kernels.bench.common import Case, Config, run_cases
from persona_kernels.bench.timing import Timing
from persona_kernels.ops.packing import packed_words

TITLE = "Gated linear vs dense masking vs plain F.linear"
SHAPES = {
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "qwen2.5-14b": [(5120, 5120), (13824, 5120), (5120, 13824)],
}
ROWS_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GAMMAS = [0.0, 0.5]
SMALL_M = 16  # GB/s reported up to this M, GFLOP/s above


def grid(cfg: Config) -> dict[str, Any]:
    """The (shapes, rows, dtypes, gammas) grid of a run."""
    if cfg.tiny:
        return {"shapes": [("tiny", 64, 172)], "rows": [1, 8], "dtypes": ["float32"], "gammas": [0.5]}
    all_shapes = [(model, n, k) for model, shapes in SHAPES.items() for n, k in shapes]
    if not cfg.quick:
        return {"shapes": all_shapes, "rows": ROWS_FULL, "dtypes": list(DTYPES), "gammas": GAMMAS}
    if cfg.device.type == "cuda":
        return {"shapes": all_shapes, "rows": [1, 16, 256, 2048], "dtypes": list(DTYPES), "gammas": GAMMAS}
    return {"shapes": [("llama3-8b", 4096, 4096), ("llama3-8b", 1024, 4096)], "rows": [1, 16, 128],
            "dtypes": list(DTYPES), "gammas": GAMMAS}


def backends(cfg: Config) -> list[str]:
    """gated_linear backends timed on the device: every available one, except Triton's CPU interpreter."""
    from persona_kernels.dispatch import available_backends, triton_interpreting

    out = []
    for b in available_backends(cfg.device):
        if b == "triton" and (cfg.device.type != "cuda" or triton_interpreting()):
            continue
        out.append(b)
    return out


def _bytes(m: int, n: int, k: int, elem: int, masked: bool) -> int:
    words = packed_words(k)
    return (n * k + m * k + m * n) * elem + (n * words * 4 if masked else 0)


def make_case(model: str, n: int, k: int, m: int, dtype_name: str, gamma: float, cfg: Config,
              backend_names: list[str]) -> Case:
    """One (shape, M, dtype, gamma) comparison."""
    from persona_kernels import gated_linear, pack_mask

    dtype = DTYPES[dtype_name]
    dev = cfg.device
    methods = ["plain", "dense", *backend_names]
    state: dict[str, Any] = {}

    def setup():
        gen = torch.Generator(device=dev).manual_seed(cfg.seed + n * 7 + k)  # data made on the device: fast setup
        w = (torch.randn(n, k, generator=gen, device=dev) * 0.02).to(dtype)
        mask = torch.rand(n, k, generator=gen, device=dev) < 0.5
        packed = pack_mask(mask)
        gate = (mask.to(dtype) + gamma * (~mask).to(dtype)).to(dtype)
        del mask
        x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
        state.update(w=w, packed=packed, gate=gate, x=x)
        fns = {"plain": lambda: F.linear(x, w), "dense": lambda: F.linear(x, w * gate)}
        for b in backend_names:
            fns[b] = lambda b=b: gated_linear(x, w, packed, None, gamma, backend=b)
        return fns

    def teardown():
        state.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    elem = torch.finfo(dtype).bits // 8

    def metrics(t: dict[str, Timing]) -> dict[str, Any]:
        out = {}
        for name in methods:
            if name not in t:
                continue
            sec = t[name].median
            nbytes = _bytes(m, n, k, elem, masked=name != "plain")
            out[name] = {"gb_per_s": nbytes / sec / 1e9, "gflop_per_s": 2.0 * m * n * k / sec / 1e9}
        return out

    ratios = [("dense/plain", "dense", "plain", False)]
    for b in backend_names:
        ratios += [(f"{b}/plain", b, "plain", True), (f"{b}/dense", b, "dense", False)]
    # Fast small calls: several calls per sample (>= 20 ms) so timer resolution, launch jitter and, with
    # several CPU threads, the wake-up of the thread pool do not dominate (a bf16 M=1 call takes ~0.3 ms).
    min_time = 0.02
    return Case(key=f"{n}x{k}|{dtype_name}|M={m}|gamma={gamma:g}",
                params={"model": model, "N": n, "K": k, "M": m, "dtype": dtype_name, "gamma": gamma},
                setup=setup, ratios=ratios, metrics=metrics, teardown=teardown, min_time=min_time)


def cases(cfg: Config) -> list[Case]:
    g = grid(cfg)
    names = backends(cfg)
    return [make_case(model, n, k, m, d, gamma, cfg, names)
            for model, n, k in g["shapes"] for d in g["dtypes"] for m in g["rows"] for gamma in g["gammas"]]


def run(cfg: Config) -> dict[str, Any]:
    rows, skipped = run_cases(cases(cfg), cfg, "gated linear")
    return {"title": TITLE, "backends": backends(cfg), "grid": {k: v for k, v in grid(cfg).items()},
            "small_m": SMALL_M, "rows": rows, "skipped": skipped,
            "notes": ["dense = F.linear(x, W * G) with the masked weight materialised every call",
                      "ratios: median of per-repeat time ratios (lower is faster for the numerator)",
                      f"GB/s (M <= {SMALL_M}): minimum bytes moved (weights, 1 bit/weight mask for masked methods, x, y) "
                      "per second; GFLOP/s (larger M): 2*M*N*K per second"]}
