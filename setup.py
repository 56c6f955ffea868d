"""Build the persona_kernels C++ extension (CPU always; CUDA when torch has CUDA and nvcc exists).

The compiler flags follow the installed torch: its headers set the C++ standard they need (C++17 up to
torch 2.13, C++20 from torch 2.14 on, whose c10 headers use std::strong_ordering), and the same standard
goes to nvcc. ``PERSONA_KERNELS_CXX_STD=c++17|c++20`` overrides it. ``PERSONA_KERNELS_NO_CUDA=1`` builds
the CPU kernels only. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (torch's rules; see README).
"""

from __future__ import annotations

import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# First torch release (major, minor) whose headers need a newer standard -> that standard.
_CXX_STD_BY_TORCH = ((2, 14), "c++20")
_DEFAULT_CXX_STD = "c++17"


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.14.1+cu130`` or ``2.15.0.dev20260101``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"setup.py: cannot parse the torch version {version!r}")
    return int(found.group(1)), int(found.group(2))


def cxx_standard(torch_version: str | None = None) -> str:
    """The C++ standard to compile against ``torch_version`` (default: the installed torch) with."""
    forced = os.environ.get("PERSONA_KERNELS_CXX_STD", "").strip()
    if forced:
        if forced not in ("c++17", "c++20", "c++23"):
            raise ValueError(f"setup.py: PERSONA_KERNELS_CXX_STD must be c++17, c++20 or c++23; got {forced!r}")
        return forced
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    first, std = _CXX_STD_BY_TORCH
    return std if torch_release(torch_version) >= first else _DEFAULT_CXX_STD


def compile_flags(torch_version: str | None = None) -> dict[str, list[str]]:
    """``extra_compile_args`` for the host compiler ("cxx") and nvcc ("nvcc")."""
    std = f"-std={cxx_standard(torch_version)}"
    return {
        "cxx": ["-O3", std, "-fopenmp", "-fno-math-errno"],
        # nvcc takes exactly one -std; torch's BuildExtension adds its own only when none is given.
        "nvcc": ["-O3", std, "--expt-relaxed-constexpr", "-Xptxas", "-warn-spills"],
    }


_NO_TORCH = """
persona_kernels: torch is not installed in the build environment.
The C++ extension is compiled against the torch you run, so install torch first and build without isolation:
    pip install torch==2.13.0        # CPU machine (on a stock index add: --index-url https://download.pytorch.org/whl/cpu)
    pip install torch==2.14.1        # or your CUDA torch; then CUDA_HOME=/usr/local/cuda for the CUDA kernels
    pip install setuptools wheel ninja pybind11
    pip install --no-build-isolation .
"""


def _extension():
    try:
        import torch
    except ImportError:
        raise SystemExit(_NO_TORCH) from None
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    flags = compile_flags(torch.__version__)
    want_cuda = (
        os.environ.get("PERSONA_KERNELS_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    common = dict(
        name="persona_kernels._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if want_cuda:
        return cpp_extension.CUDAExtension(
            sources=cpp_sources + cuda_sources,
            define_macros=[("PK_WITH_CUDA", "1")],
            extra_compile_args=flags,
            **common,
        ), cpp_extension.BuildExtension
    return cpp_extension.CppExtension(
        sources=cpp_sources, extra_compile_args={"cxx": flags["cxx"]}, **common
    ), cpp_extension.BuildExtension


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers above
    ext, build_ext = _extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext.with_options(use_ninja=True)})
