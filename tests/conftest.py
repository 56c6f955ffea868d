"""Test configuration: Triton runs through its interpreter when there is no GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before any @triton.jit is defined

import pytest  # noqa: E402

from persona_kernels.paths import shared_dir  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="session")
def shared():
    """The ../shared folder; skipped only outside CI when it is truly absent."""
    path = shared_dir()
    if path is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI=true but the shared data folder is missing; set PERSONA_KERNELS_SHARED")
        pytest.skip("shared data folder not found (set PERSONA_KERNELS_SHARED)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
