"""Build the persona_kernels C++ extension (CPU always; CUDA when torch has CUDA and nvcc exists)."""

from __future__ import annotations

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
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
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            **common,
        ), cpp_extension.BuildExtension
    return cpp_extension.CppExtension(
        sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common
    ), cpp_extension.BuildExtension


ext, build_ext = _extension()
setup(ext_modules=[ext], cmdclass={"build_ext": build_ext.with_options(use_ninja=True)})
