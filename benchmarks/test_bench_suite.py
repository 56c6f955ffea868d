"""The benchmark suite of ``persona-kernels bench`` under pytest-benchmark (run on demand, not in CI):

    pytest benchmarks/                                   # the --quick grid
    PK_BENCH_FULL=1 pytest benchmarks/ -k gated          # the full gated-linear grid (for GPUs)
    PK_BENCH_THREADS=1 pytest benchmarks/                # one torch thread (stabler on a shared CPU)
    pytest benchmarks/ --benchmark-group-by=group --benchmark-json=bench.json

Each test times one method of one case built by the same code as the CLI (``persona_kernels.bench``);
``benchmark.group`` is the case, so pytest-benchmark's table compares the methods of a case side by side.
The CLI measures the same things interleaved in one run, with ratios, JSON, markdown and plots.
"""

from __future__ import annotations

import os

import pytest
import torch

from persona_kernels.bench import calibration, e2e, gated, scoring, switching
from persona_kernels.bench.common import Config, load_default_model

if os.environ.get("PK_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PK_BENCH_THREADS"]))
CFG = Config(device=torch.device(os.environ.get("PK_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")),
             quick=not os.environ.get("PK_BENCH_FULL"), progress=False)
_SYNC = torch.cuda.synchronize if CFG.device.type == "cuda" else (lambda: None)


def _synced(fn):
    def call():
        out = fn()
        _SYNC()
        return out
    return call


def _heavy(benchmark, fn, rounds: int = 3):
    """Slow calls (seconds): a few rounds, one warm-up."""
    return benchmark.pedantic(_synced(fn), rounds=rounds, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------------------------------- gated
GATED_CASES = gated.cases(CFG)
GATED_METHODS = ["plain", "dense", *gated.backends(CFG)]


@pytest.mark.parametrize("method", GATED_METHODS)
@pytest.mark.parametrize("case", GATED_CASES, ids=[c.key for c in GATED_CASES])
def test_gated_linear(benchmark, case, method):
    fns = case.setup()
    try:
        benchmark.group = f"gated {case.key}"
        benchmark.extra_info.update(case.params)
        benchmark(_synced(fns[method]))
    finally:
        case.teardown()


# ----------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def scoring_setup():
    return scoring.build(CFG)


@pytest.mark.parametrize("method", ["wanda_x2", "contrastive_wanda", "contrastive_sparse", "loop_wanda_x2"])
def test_scoring(benchmark, scoring_setup, method):
    weights, methods = scoring_setup
    benchmark.group = f"scoring {len(weights)} modules"
    _heavy(benchmark, lambda: [methods[method](n, w) for n, w in weights.items()])


# ----------------------------------------------------------------------------- model-based sections
@pytest.fixture(scope="module")
def model_and_tokenizer():
    try:
        return load_default_model(CFG)
    except Exception as exc:  # noqa: BLE001 - no default model on this machine
        pytest.skip(f"default model unavailable: {exc}")


@pytest.mark.parametrize("method", ["plain", "stats", "hooks"])
def test_calibration(benchmark, model_and_tokenizer, method):
    model, tok = model_and_tokenizer
    case = calibration.make_cases(CFG, model, tok, check={"skip": 0.0})[0]
    benchmark.group = f"calibration {case.key}"
    benchmark.extra_info.update(case.params)
    _heavy(benchmark, case.setup()[method])


@pytest.mark.parametrize("method", ["set_persona", "reload_safetensors", "inplace_multiply"])
def test_switching(benchmark, model_and_tokenizer, method):
    model, _ = model_and_tokenizer
    with switching.switch_methods(CFG, model) as fns:
        benchmark.group = "switching SmolLM2-135M"
        benchmark(_synced(fns[method]))


@pytest.fixture(scope="module")
def e2e_models(model_and_tokenizer):
    models = e2e.models_for(CFG, model_and_tokenizer[0])
    yield models
    del models


@pytest.mark.parametrize("method", ["unpatched", "patched", "merged"])
@pytest.mark.parametrize("batch", e2e.settings(CFG)["batch_sizes"])
def test_e2e_generate(benchmark, model_and_tokenizer, e2e_models, batch, method):
    cases = {c.params["batch_size"]: c for c in e2e.make_cases(CFG, e2e_models, model_and_tokenizer[1])}
    case = cases[batch]
    benchmark.group = f"e2e {case.key}"
    benchmark.extra_info.update(case.params)
    _heavy(benchmark, case.setup()[method])
