"""The "cuda" backend: unavailable (with clear errors) on CPU; on a GPU, checked against float64 references.

The GPU tests run only where the extension was built with CUDA and a device is visible; on the CPU-only
CI they are skipped. The CUDA sources themselves are compile-checked by scripts/check_cuda_sources.sh.
"""

from __future__ import annotations

import pytest
import torch

import persona_kernels.kernels.cuda as cuda_backend
from persona_kernels import dispatch
from persona_kernels.ops.gated_linear import gated_linear
from persona_kernels.ops.packing import pack_mask

_GPU = cuda_backend.is_available(torch.device("cuda")) if torch.cuda.is_available() else False
gpu = pytest.mark.skipif(not _GPU, reason="needs a CUDA device and the extension built with CUDA")


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


# ------------------------------------------------------------------------------------------------ GPU only
_TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def _gated_ref(x, w, packed, bias, gamma):
    k = w.shape[1]
    bits = (packed.unsqueeze(-1) >> torch.arange(32, device=packed.device, dtype=torch.int32)) & 1
    m = bits.reshape(w.shape[0], -1)[:, :k].double()
    g = m + gamma * (1.0 - m)
    y = x.double() @ (w.double() * g).t()
    return y if bias is None else y + bias.double()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 172), (3, 37, 172), (16, 64, 256), (17, 65, 172), (130, 96, 512)])
@pytest.mark.parametrize("path", ["auto", "gemv", "simt", "wmma"])
def test_gated_linear_matches_float64(monkeypatch, dtype, m, n, k, path):
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_GATED", path)
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    packed = pack_mask((torch.rand(n, k) > 0.4)).to(dev)
    out = cuda_backend.gated_linear(x, w, packed, b, 0.25)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = _gated_ref(x, w, packed, b, 0.25)
    rtol, atol = _TOL[dtype]
    scale = (k ** 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * scale)


def _stats_ref(x, row_mask, seq_len):
    xd = x.double()
    valid = torch.isfinite(xd)
    if row_mask is not None:
        valid &= row_mask[:, None]
    cnt = valid.sum(0)
    z = torch.where(valid, xd, torch.zeros_like(xd))
    c = cnt.clamp(min=1).double()
    mean = z.sum(0) / c
    m2 = torch.where(valid, (xd - mean) ** 2, torch.zeros_like(xd)).sum(0)
    az = z.abs()
    amean = az.sum(0) / c
    am2 = torch.where(valid, (xd.abs() - amean) ** 2, torch.zeros_like(xd)).sum(0)
    s = x.shape[0] // seq_len if seq_len > 0 else 0
    seq = (z[: s * seq_len] ** 2).reshape(s, seq_len, -1).sum(1) if s else xd.new_zeros(0, x.shape[1])
    return cnt, mean, m2, amean, am2, seq


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,k,seq_len,masked", [(1, 172, 0, False), (37, 65, 0, True), (6 * 50, 172, 50, True),
                                                   (4 * 300, 96, 300, False)])
def test_welford_partials_matches_float64(dtype, rows, k, seq_len, masked):
    dev = torch.device("cuda")
    x = (torch.randn(rows, k, device=dev) * 3 + 1).to(dtype)
    x[0, 0] = float("nan")
    if rows > 2:
        x[2, 1] = float("inf")
    row_mask = (torch.rand(rows, device=dev) > 0.3) if masked else None
    got = cuda_backend.welford_partials(x, row_mask, seq_len)
    ref = _stats_ref(x, row_mask, seq_len)
    assert torch.equal(got[0].cpu(), ref[0].cpu())
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-3)
