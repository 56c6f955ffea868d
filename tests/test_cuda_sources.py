"""The "cuda" backend on a CPU: unavailable with clear errors; the build flags setup.py derives from torch;
the spill check of the Triton AOT compile. The kernels' GPU tests are in test_cuda_kernels.py; the CUDA
sources are compile-checked by scripts/check_cuda_sources.sh and built by scripts/ci_cuda.sh.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import persona_kernels.kernels.cuda as cuda_backend
from persona_kernels import dispatch
from persona_kernels.ops.gated_linear import gated_linear
from persona_kernels.ops.packing import pack_mask

ROOT = Path(__file__).resolve().parents[1]


def test_unavailable_for_cpu_tensors():
    assert not cuda_backend.is_available(torch.device("cpu"))
    assert not dispatch.is_available("cuda", "cpu")
    assert "cuda" not in dispatch.available_backends("cpu")


def test_gated_linear_cuda_backend_on_cpu_raises_clearly():
    x = torch.randn(3, 40)
    w = torch.randn(5, 40)
    packed = pack_mask(torch.rand(5, 40) > 0.5)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for cpu tensors"):
        gated_linear(x, w, packed, None, 0.0, backend="cuda")


def test_auto_never_picks_cuda_on_cpu():
    assert dispatch.resolve_backend("auto", "cpu", "gated_linear") != "cuda"


# ------------------------------------------------------------------------------------------------ build flags
def _setup_module():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="persona_kernels_setup")


@pytest.mark.parametrize("version,std", [("2.11.0+cu130", "c++17"), ("2.13.0+cpu", "c++17"), ("2.14.1+cu130", "c++20"),
                                         ("2.15.0.dev20260101", "c++20"), ("3.0.0", "c++20")])
def test_cxx_standard_follows_the_torch_version(monkeypatch, version, std):
    monkeypatch.delenv("PERSONA_KERNELS_CXX_STD", raising=False)
    setup = _setup_module()
    assert setup["cxx_standard"](version) == std
    flags = setup["compile_flags"](version)
    assert f"-std={std}" in flags["cxx"] and f"-std={std}" in flags["nvcc"]
    assert sum(f.startswith("-std=") for f in flags["nvcc"]) == 1  # nvcc rejects two


def test_cxx_standard_override_and_bad_values(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("PERSONA_KERNELS_CXX_STD", "c++20")
    assert setup["cxx_standard"]("2.13.0") == "c++20"
    monkeypatch.setenv("PERSONA_KERNELS_CXX_STD", "gnu++14")
    with pytest.raises(ValueError, match="PERSONA_KERNELS_CXX_STD"):
        setup["cxx_standard"]("2.13.0")
    monkeypatch.delenv("PERSONA_KERNELS_CXX_STD")
    with pytest.raises(ValueError, match="torch version"):
        setup["cxx_standard"]("nightly")


def test_installed_torch_gets_the_standard_its_headers_need(monkeypatch):
    monkeypatch.delenv("PERSONA_KERNELS_CXX_STD", raising=False)
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert _setup_module()["cxx_standard"]() == ("c++20" if (major, minor) >= (2, 14) else "c++17")


# ------------------------------------------------------------------------------------------------ aot_check
def test_aot_check_flags_spills_and_missing_resource_usage():
    pytest.importorskip("triton")
    from persona_kernels.kernels.triton import aot_check

    rows = [{"kernel": "a", "constexprs": {}, "registers": 96, "spill_stack_bytes": 0},
            {"kernel": "b", "constexprs": {"BLOCK_M": 64}, "registers": 255, "spill_stack_bytes": 24},
            {"kernel": "c", "constexprs": {}}]
    found = aot_check.problems(rows, fail_on_spill=True)
    assert len(found) == 2 and "24 bytes of spill" in found[0] and "resource usage unavailable" in found[1]
    assert aot_check.problems(rows[:1], fail_on_spill=True) == []
    assert aot_check.problems(rows, fail_on_spill=False) == []


def test_aot_check_known_spills_are_allowed_per_architecture_and_reported():
    pytest.importorskip("triton")
    from persona_kernels.kernels.triton import aot_check

    arch, kernel, constexprs = aot_check.KNOWN_SPILLS[0]
    row = {"kernel": kernel, "constexprs": dict(constexprs), "registers": 255, "spill_stack_bytes": 8}
    assert aot_check.problems([row], fail_on_spill=True, arch=arch) == []
    assert len(aot_check.problems([row], fail_on_spill=True, arch=arch + 1)) == 1  # only on its architecture
    still, stale = aot_check.known_spills([row], arch)
    assert len(still) == 1 and kernel in still[0]
    assert len(stale) == sum(a == arch for a, _, _ in aot_check.KNOWN_SPILLS) - 1
