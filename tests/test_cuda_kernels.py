"""The "cuda" backend's kernels against float64 references.

GPU tests (marked ``gpu``) run where the extension was built with CUDA and a device is visible (benchmarks/
gpu_check.sh collects them); elsewhere they are skipped. The CPU tests below them check what can be checked
without a GPU: the backend's op list against the other backends (parity), the registration check CI runs
on the CUDA build, and a step-by-step simulation of the fused linear_with_stats' tiling (segments of <= 64
rows, thread groups, Chan merges, the ordered fp64 merge and the per-sequence slots) in float32.
"""

from __future__ import annotations

import math

import pytest
import torch

import persona_kernels as pk
import persona_kernels.kernels.cpu as cpu_backend
import persona_kernels.kernels.cuda as cuda_backend
import persona_kernels.kernels.torch_ref as torch_backend
from persona_kernels.ops.packing import pack_mask
from persona_kernels.stats import ActivationStats

_GPU = torch.cuda.is_available() and cuda_backend.is_available(torch.device("cuda"))
gpu = pytest.mark.skipif(not _GPU, reason="needs a CUDA device and the extension built with CUDA")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |err| / sqrt(K) for unit-normal x and W (outputs are O(sqrt K)); output rounding dominates.
GATED_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
PATHS = ("auto", "gemv", "simt", "wmma")


# ----------------------------------------------------------------------------------------------- references
def unpack_ref(packed: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., N, K] of an int32 [..., N, ceil(K/32)] mask, independent of the package."""
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :k].bool()


def gated_ref(x, w, packed, bias, gamma) -> torch.Tensor:
    m = unpack_ref(packed, w.shape[1]).double()
    y = x.double() @ (w.double() * (m + gamma * (1.0 - m))).t()
    return y if bias is None else y + bias.double()


def multi_ref(x, w, bank, index, bias, gammas) -> torch.Tensor:
    y = x.double() @ w.double().t()
    for p, g in enumerate(gammas):
        rows = (index == p).nonzero().flatten()
        if rows.numel():
            y[rows] = gated_ref(x[rows], w, bank[p], None, g)
    return y if bias is None else y + bias.double()


def stats_ref(x, row_mask, seq_len) -> list[torch.Tensor]:
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


def assert_stats(got, ref, rel=1e-4):
    assert got[0].dtype == torch.int64 and torch.equal(got[0].cpu(), ref[0].cpu())
    for name, g, r in zip(("mean", "m2", "abs_mean", "abs_m2", "seq_sumsq"), got[1:], ref[1:]):
        assert g.dtype == torch.float32 and tuple(g.shape) == tuple(r.shape), name
        if r.numel():
            scale = r.abs().max().item() + 1e-6
            err = (g.double() - r).abs().max().item() / scale
            assert math.isfinite(err) and err <= rel, f"{name}: relative error {err:.2e}"


def assert_gemm(out, ref, k, dtype):
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max().item() / math.sqrt(max(k, 1)) if ref.numel() else 0.0
    assert math.isfinite(err) and err <= GATED_TOL[dtype], f"max err / sqrt(K) = {err:.2e}"


def rand_bank(p, n, k, device, keep=0.6):
    return torch.stack([pack_mask(torch.rand(n, k) < keep) for _ in range(p)]).to(device) if p else \
        torch.zeros(0, n, (k + 31) // 32, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------- GPU tests
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 172), (3, 37, 172), (16, 64, 256), (17, 65, 172), (130, 96, 512)])
@pytest.mark.parametrize("path", PATHS)
def test_gated_linear(monkeypatch, dtype, m, n, k, path):
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_GATED", path)
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    packed = pack_mask(torch.rand(n, k) > 0.4).to(dev)
    out = cuda_backend.gated_linear(x, w, packed, b, 0.25)
    assert out.shape == (m, n)
    assert_gemm(out, gated_ref(x, w, packed, b, 0.25), k, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,p", [(1, 1, 172, 1), (5, 37, 172, 3), (16, 64, 256, 2), (17, 65, 172, 3),
                                     (200, 96, 512, 4), (70, 33, 40, 0)])
@pytest.mark.parametrize("path", PATHS)
def test_gated_linear_multi(monkeypatch, dtype, m, n, k, p, path):
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_GATED", path)
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(dtype)
    w = torch.randn(n, k, device=dev).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    bank = rand_bank(p, n, k, dev)
    index = torch.randint(-1, p, (m,), device=dev)
    gammas = [0.1 * (i + 1) % 1.0 for i in range(p)]
    for idx in (index, index.int()):
        out = cuda_backend.gated_linear_multi(x, w, bank, idx, b, gammas)
        assert out.shape == (m, n)
        assert_gemm(out, multi_ref(x, w, bank, index, b, gammas), k, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,seq_len,masked", [(1, 172, 0, False), (37, 65, 0, True), (6 * 50, 172, 50, True),
                                                   (4 * 300, 96, 300, False), (130, 33, 7, True)])
def test_welford_partials(dtype, rows, k, seq_len, masked):
    dev = torch.device("cuda")
    x = (torch.randn(rows, k, device=dev) * 3 + 1).to(dtype)
    x[0, 0] = float("nan")
    if rows > 2:
        x[2, 1] = float("inf")
    row_mask = (torch.rand(rows, device=dev) > 0.3) if masked else None
    assert_stats(cuda_backend.welford_partials(x, row_mask, seq_len), stats_ref(x, row_mask, seq_len))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,seq_len,masked", [(1, 1, 172, 0, False), (37, 65, 172, 0, True),
                                                     (300, 96, 172, 50, True), (200, 33, 96, 130, False),
                                                     (130, 257, 1000, 7, True), (64 * 3, 64, 64, 64, False)])
@pytest.mark.parametrize("mode", ["fused", "fused-simt", "cublas"])
def test_linear_with_stats(monkeypatch, dtype, rows, n, k, seq_len, masked, mode):
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_LWS", "cublas" if mode == "cublas" else "fused")
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_GATED", "simt" if mode == "fused-simt" else "auto")
    dev = torch.device("cuda")
    x = (torch.randn(rows, k, device=dev) * 2 + 0.5).to(dtype)
    x[0, 0] = float("nan")
    w = torch.randn(n, k, device=dev).to(dtype)
    b = torch.randn(n, device=dev).to(dtype)
    row_mask = (torch.rand(rows, device=dev) > 0.3) if masked else None
    y, *parts = cuda_backend.linear_with_stats(x, w, b, row_mask, seq_len)
    assert y.shape == (rows, n)
    xf = torch.nan_to_num(x, nan=0.0)  # y of the NaN row is NaN in every implementation: compare the others
    assert_gemm(y[1:], (xf.double() @ w.double().t() + b.double())[1:], k, dtype)
    assert torch.isnan(y[0]).all()
    assert_stats(parts, stats_ref(x, row_mask, seq_len))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_3d_noncontiguous_and_empty(dtype):
    """Through the public ops with backend="cuda": 3-D and non-contiguous x, M = 0."""
    dev = torch.device("cuda")
    k, n = 172, 70
    x = torch.randn(5, k, 2, device=dev).to(dtype).transpose(1, 2)  # [5, 2, 172], non-contiguous
    w = torch.randn(n, k, device=dev).to(dtype)
    packed = pack_mask(torch.rand(n, k) > 0.5).to(dev)
    out = pk.gated_linear(x, w, packed, None, 0.5, backend="cuda")
    assert out.shape == (5, 2, n)
    assert_gemm(out.reshape(-1, n), gated_ref(x.reshape(-1, k), w, packed, None, 0.5), k, dtype)

    bank = rand_bank(3, n, k, dev)
    index = torch.tensor([[0, -1], [2, 2], [1, 0], [-1, -1], [1, 2]], device=dev)
    out = pk.gated_linear_multi(x, w, bank, index, None, [0.0, 0.5, 1.0], backend="cuda")
    ref = multi_ref(x.reshape(-1, k), w, bank, index.reshape(-1), None, [0.0, 0.5, 1.0])
    assert_gemm(out.reshape(-1, n), ref, k, dtype)

    stats = ActivationStats(k, device=dev)
    tok = torch.rand(5, 2, device=dev) > 0.3
    y = pk.linear_with_stats(x, w, None, stats, tok, backend="cuda")
    assert_gemm(y.reshape(-1, n), x.reshape(-1, k).double() @ w.double().t(), k, dtype)
    ref = stats_ref(x.reshape(-1, k), tok.reshape(-1), 2)
    assert torch.equal(stats.count.cpu(), ref[0].cpu())
    torch.testing.assert_close(stats.mean.double().cpu(), ref[1].cpu(), rtol=1e-4, atol=1e-4)

    empty = torch.randn(0, k, device=dev).to(dtype)
    assert pk.gated_linear(empty, w, packed, None, 0.0, backend="cuda").shape == (0, n)
    assert pk.gated_linear_multi(empty, w, bank, torch.zeros(0, dtype=torch.long, device=dev), None, 0.0,
                                 backend="cuda").shape == (0, n)


@gpu
@pytest.mark.gpu
def test_opcheck_custom_ops_with_cuda_backend():
    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 40, device=dev).to(dtype)
        w = torch.randn(5, 40, device=dev).to(dtype)
        b = torch.randn(5, device=dev).to(dtype)
        packed = pack_mask(torch.rand(5, 40) > 0.5).to(dev)
        bank = rand_bank(3, 5, 40, dev)
        index = torch.tensor([[0, -1, 2], [2, 2, 0]], device=dev)
        mask = torch.rand(2, 3, device=dev) > 0.3
        torch.library.opcheck(torch.ops.persona_kernels.gated_linear, (x, w, packed, b, 0.3, "cuda"))
        torch.library.opcheck(torch.ops.persona_kernels.gated_linear_multi,
                              (x, w, bank, index, b, [0.0, 0.5, 0.1], "cuda"))
        torch.library.opcheck(torch.ops.persona_kernels.welford_partials, (x, mask, 3, "cuda"))
        torch.library.opcheck(torch.ops.persona_kernels.linear_with_stats, (x, w, b, mask, 3, "cuda"))


# ----------------------------------------------------------------------------------------------- CPU tests
def _public_ops(module) -> set[str]:
    skip = {"is_available", "pack_mask", "unpack_mask"}
    return {name for name, obj in vars(module).items()
            if callable(obj) and not name.startswith("_") and getattr(obj, "__module__", "") == module.__name__} - skip


def test_cuda_backend_offers_every_kernel_op():
    """Parity: every op of the reference and C++ backends has a CUDA kernel, listed in OPS."""
    cuda_ops = _public_ops(cuda_backend) - {"registration_problems", "main"}
    assert set(cuda_backend.OPS) == cuda_ops
    assert _public_ops(cpu_backend) <= cuda_ops
    assert (_public_ops(torch_backend) & {"gated_linear", "gated_linear_multi", "welford_partials",
                                          "linear_with_stats"}) <= cuda_ops


def test_registration_check_reports_a_cpu_build_clearly():
    from persona_kernels import _extension

    problems = cuda_backend.registration_problems()
    if _extension.has_cuda_kernels():  # a CUDA build (CI's torch 2.14.1+cu130 stage): everything registered
        assert problems == []
        for op in cuda_backend.OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"persona_kernels_C::{op}_cuda", "CUDA")
    else:
        assert len(problems) == 1 and "without its CUDA kernels" in problems[0]
        assert cuda_backend.main(["--check-registration"]) == 1


# Simulation of csrc/cuda/welford.cu's fused linear_with_stats statistics (SegmentTiles + TileStats +
# PartialsWork.finish), step by step in float32 with the same segment bounds, thread groups and merge order.
def _segments(rows, seq_len, length):
    num_seq = rows // seq_len if seq_len > 0 else 0
    per_seq = -(-seq_len // length) if seq_len > 0 else 0
    segs = []
    for g in range(num_seq * per_seq + -(-(rows - num_seq * seq_len) // length)):
        if g < num_seq * per_seq:
            seq, p = divmod(g, per_seq)
            row0 = seq * seq_len + p * length
            segs.append((row0, min(row0 + length, (seq + 1) * seq_len), seq))
        else:
            row0 = num_seq * seq_len + (g - num_seq * per_seq) * length
            segs.append((row0, min(row0 + length, rows), -1))
    return segs, num_seq, per_seq


def _chan_merge(a, b):
    na, ma, m2a, ama, am2a = a
    nb, mb, m2b, amb, am2b = b
    if nb == 0:
        return a
    n = na + nb
    f32 = torch.float32
    fb = torch.tensor(nb, dtype=f32) / n
    cross = na * fb
    d, ad = mb - ma, amb - ama
    return (n, ma + d * fb, m2a + m2b + d * d * cross, ama + ad * fb, am2a + am2b + ad * ad * cross)


def _simulate_fused_stats(x, row_mask, seq_len, bm=64, groups=4):
    rows, k = x.shape
    segs, num_seq, per_seq = _segments(rows, seq_len, bm)
    zero = torch.tensor(0.0)
    partials, seg_sq = [], {}
    for g, (row0, row1, seq) in enumerate(segs):
        assert 0 < row1 - row0 <= bm and (seq < 0 or row1 <= (seq + 1) * seq_len)
        per_chan = []
        for j in range(k):
            acc, sqs = (0, zero, zero, zero, zero), zero
            for grp in range(groups):  # rows [grp * bm / groups, ...) of the tile, exact in registers
                r = torch.arange(row0 + grp * bm // groups, row0 + (grp + 1) * bm // groups)
                r = r[r < row1]
                v = x[r, j].float()
                ok = torch.isfinite(v) & (row_mask[r] if row_mask is not None else True)
                v = v[ok]
                st = (0, zero, zero, zero, zero)
                if v.numel():
                    mb, amb = v.mean(), v.abs().mean()
                    st = (v.numel(), mb, ((v - mb) ** 2).sum(), amb, ((v.abs() - amb) ** 2).sum())
                acc = _chan_merge(acc, st)
                sqs = sqs + (v * v).sum()
            per_chan.append(acc)
            if seq >= 0:
                seg_sq[(seq if per_seq == 1 else g, j)] = sqs
        partials.append(per_chan)
    out = [torch.zeros(k, dtype=torch.int64)] + [torch.zeros(k, dtype=torch.float64) for _ in range(4)]
    for j in range(k):  # pass 2: ordered fp64 merge of the segment partials
        n, mu, s2, amu, as2 = 0, 0.0, 0.0, 0.0, 0.0
        for per_chan in partials:
            nb, mb, m2b, amb, am2b = (float(t) for t in per_chan[j])
            if nb == 0:
                continue
            nn = n + int(nb)
            fb, d, ad = nb / nn, mb - mu, amb - amu
            mu, s2 = mu + d * fb, s2 + m2b + d * d * n * fb
            amu, as2 = amu + ad * fb, as2 + am2b + ad * ad * n * fb
            n = nn
        for i, v in enumerate((n, mu, s2, amu, as2)):
            out[i][j] = v
    seq_sumsq = torch.zeros(num_seq, k)
    for s in range(num_seq):
        for j in range(k):
            seq_sumsq[s, j] = seg_sq[(s, j)] if per_seq == 1 else sum(seg_sq[(s * per_seq + p, j)] for p in range(per_seq))
    return [out[0]] + [t.float() for t in out[1:]] + [seq_sumsq]


@pytest.mark.parametrize("rows,k,seq_len,masked,groups", [(1, 3, 0, False, 4), (150, 5, 0, True, 16),
                                                          (200, 4, 130, True, 4), (96, 3, 7, False, 16),
                                                          (192, 3, 64, True, 4)])
def test_fused_stats_tiling_simulation_matches_float64(rows, k, seq_len, masked, groups):
    x = torch.randn(rows, k) * 3 + 1
    x[0, 0] = float("nan")
    if rows > 5:
        x[5, 1] = float("inf")
    row_mask = torch.rand(rows) > 0.3 if masked else None
    assert_stats(_simulate_fused_stats(x, row_mask, seq_len, groups=groups), stats_ref(x, row_mask, seq_len))
