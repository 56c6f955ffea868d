"""Triton backend edge cases against float64 references (CPU: through TRITON_INTERPRET=1)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")

from persona_kernels.kernels import torch_ref  # noqa: E402
from persona_kernels.kernels import triton as tk  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(not tk.is_available(DEVICE), reason=f"triton backend unavailable on {DEVICE}"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # NaN inputs in the interpreter
]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# ----------------------------------------------------------------------------------------------- gated linear


def _gated_case(m, n, k, dtype, keep=0.5, bias=True):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = torch.randn(n, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    mask = torch.rand(n, k, device=DEVICE) < keep
    return x, w, b, mask


def _gated_ref64(x, w, b, mask, gamma):
    """float64 result and an error bound: output rounding + (GPU) rounding of gamma*w + fp32 accumulation."""
    m = mask.double()
    g = m + gamma * (1.0 - m)
    y = x.double() @ (w.double() * g).T
    scale = x.double().abs() @ (w.double().abs() * g).T
    if b is not None:
        y = y + b.double()
        scale = scale + b.double().abs()
    u = UNIT_ROUNDOFF[x.dtype]
    bound = u * y.abs() + 1e-5 * scale + 1e-30
    if 0.0 < gamma < 1.0 and x.dtype != torch.float32:  # compiled kernels round gamma*w to the input dtype
        bound = bound + u * (x.double().abs() @ (w.double().abs() * (1.0 - m) * gamma).T)
    return y, bound


def _check(y, ref, bound):
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the bound (ratio {worst:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    "shape", [(7, 33, 172), (70, 130, 172), (1, 1, 1), (1, 5, 32), (3, 1, 65), (17, 64, 64)]
)
def test_gated_linear_matches_float64(shape, gamma, dtype):
    m, n, k = shape
    x, w, b, mask = _gated_case(m, n, k, dtype)
    y = tk.gated_linear(x, w, torch_ref.pack_mask(mask), b, gamma)
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    ref, bound = _gated_ref64(x, w, b, mask, gamma)
    _check(y, ref, bound)


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_gated_linear_all_pruned_or_all_kept(keep):
    # all-ones words are -1 as int32: bit 31 must still read as "keep"
    x, w, _, mask = _gated_case(5, 40, 96, torch.float32, keep=keep)
    packed = torch_ref.pack_mask(mask)
    for gamma in (0.0, 0.3):
        y = tk.gated_linear(x, w, packed, None, gamma)
        ref, bound = _gated_ref64(x, w, None, mask, gamma)
        _check(y, ref, bound)
    if keep == 0.0:
        assert torch.equal(tk.gated_linear(x, w, packed, None, 0.0), torch.zeros(5, 40, device=DEVICE))


def test_gated_linear_single_bit_is_seen():
    # a single kept connection per row: any misread bit or shift changes the output by O(1)
    n, k = 6, 172
    x = torch.randn(3, k, device=DEVICE)
    w = torch.randn(n, k, device=DEVICE)
    mask = torch.zeros(n, k, dtype=torch.bool, device=DEVICE)
    cols = torch.tensor([0, 31, 32, 63, 100, 171])
    mask[torch.arange(n), cols] = True
    y = tk.gated_linear(x, w, torch_ref.pack_mask(mask), None, 0.0)
    expected = x[:, cols] * w[torch.arange(n), cols]
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_gated_linear_strided_rows_and_empty():
    x, w, b, mask = _gated_case(9, 20, 172, torch.float32)
    packed = torch_ref.pack_mask(mask)
    wide = torch.randn(9, 200, device=DEVICE)
    wide[:, :172] = x
    y = tk.gated_linear(wide[:, :172], w, packed, b, 0.3)  # row stride 200 != K
    ref, bound = _gated_ref64(x, w, b, mask, 0.3)
    _check(y, ref, bound)
    assert tk.gated_linear(x[:0], w, packed, b, 0.3).shape == (0, 20)


def test_gated_linear_op_wrapper_m0_and_3d():
    from persona_kernels.ops.gated_linear import gated_linear

    x, w, b, mask = _gated_case(12, 24, 172, torch.float16)
    packed = torch_ref.pack_mask(mask)
    assert gated_linear(x[:0], w, packed, b, 0.3, backend="triton").shape == (0, 24)
    x3 = x.reshape(3, 4, 172).transpose(0, 1)  # non-contiguous 3-D input
    y3 = gated_linear(x3, w, packed, b, 0.3, backend="triton")
    ref, bound = _gated_ref64(x3.reshape(-1, 172), w, b, mask, 0.3)
    assert y3.shape == (4, 3, 24)
    _check(y3.reshape(-1, 24), ref, bound)


def test_gated_linear_deterministic():
    x, w, b, mask = _gated_case(33, 70, 172, torch.bfloat16)
    packed = torch_ref.pack_mask(mask)
    assert torch.equal(tk.gated_linear(x, w, packed, b, 0.3), tk.gated_linear(x, w, packed, b, 0.3))



def test_gpu_configs_pruned_by_row_bucket():
    import importlib

    gl = importlib.import_module("persona_kernels.kernels.triton.gated_linear")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(0, dtype=dtype)
        for m, allowed in ((1, {16}), (16, {16}), (17, {32}), (64, {32, 64}), (65, {64, 128}), (5000, {64, 128})):
            kept = gl._prune(gl.CONFIGS, {"M_BUCKET": gl.m_bucket(m), "x_ptr": x})
            assert kept and {c.kwargs["BLOCK_M"] for c in kept} <= allowed, (m, kept)
            assert (dtype == torch.float32) == all(c in gl.FP32_CONFIGS for c in kept)
        assert any(c.kwargs["SWAP_AB"] for c in gl._prune(gl.CONFIGS, {"M_BUCKET": 16, "x_ptr": x}))
    for c in gl.CONFIGS + gl.FP32_CONFIGS:  # word-aligned K tiles and tl.dot's minimum tile of 16
        assert c.kwargs["BLOCK_K"] % 32 == 0 and min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 16

# ----------------------------------------------------------------------------------------------------- welford


def _stats_ref64(x, row_mask, seq_len):
    x = x.double()
    r, k = x.shape
    valid = torch.isfinite(x)
    if row_mask is not None:
        valid &= row_mask[:, None]
    cnt = valid.sum(0)
    den = cnt.clamp(min=1)

    def moments(v):
        mean = torch.where(valid, v, 0.0).sum(0) / den
        return mean, torch.where(valid, (v - mean) ** 2, 0.0).sum(0)

    mean, m2 = moments(x)
    amean, am2 = moments(x.abs())
    s = r // seq_len if seq_len > 0 else 0
    sq = torch.where(valid, x * x, 0.0)[: s * seq_len].reshape(s, seq_len, k).sum(1) if s else x.new_zeros(0, k)
    return cnt, mean, m2, amean, am2, sq, valid


def _check_stats(got, x, row_mask, seq_len):
    cnt, mean, m2, amean, am2, sq, valid = _stats_ref64(x, row_mask, seq_len)
    g_cnt, g_mean, g_m2, g_amean, g_am2, g_sq = got
    k = x.shape[1]
    assert g_cnt.dtype == torch.int64 and g_cnt.shape == (k,)
    for t in (g_mean, g_m2, g_amean, g_am2):
        assert t.dtype == torch.float32 and t.shape == (k,) and t.device == x.device
    assert g_sq.dtype == torch.float32 and g_sq.shape == sq.shape
    assert torch.equal(g_cnt.cpu(), cnt.cpu())
    big = torch.where(valid, x.double().abs(), 0.0).amax(0) if x.shape[0] else mean.abs()
    # means: fp32 rounding of the result; M2: fp32 accumulation of well-centred deviations
    assert ((g_mean.double() - mean).abs() <= 2e-7 * big + 1e-30).all(), (g_mean.double() - mean).abs().max()
    assert ((g_amean.double() - amean).abs() <= 2e-7 * big + 1e-30).all()
    assert ((g_m2.double() - m2).abs() <= 1e-5 * m2 + 1e-30).all(), ((g_m2.double() - m2).abs() / m2).max()
    assert ((g_am2.double() - am2).abs() <= 1e-5 * am2 + 1e-30).all()
    assert ((g_sq.double() - sq).abs() <= 1e-5 * sq + 1e-30).all()


@pytest.mark.parametrize("offset,std", [(0.0, 1.0), (1e3, 1e-2), (-5.0, 3.0)])
def test_welford_partials_fp32_matches_float64(offset, std):
    x = offset + std * torch.randn(300, 172, device=DEVICE)
    got = tk.welford_partials(x, None, 0)
    assert got[5].shape == (0, 172)
    _check_stats(got, x, None, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_welford_partials_half_inputs(dtype):
    x = (2.0 + torch.randn(150, 70, device=DEVICE)).to(dtype)
    _check_stats(tk.welford_partials(x, None, 30), x, None, 30)


@pytest.mark.parametrize("seq_len", [40, 64])  # 40: separate seq kernel; 64: sums of whole row blocks
def test_welford_partials_row_mask_nonfinite_and_seq(seq_len):
    r, k = 300, 172  # trailing rows that belong to no sequence
    x = 1e3 + 1e-2 * torch.randn(r, k, device=DEVICE)
    x[5, 3] = float("nan")
    x[7, 4] = float("inf")
    x[200, 4] = float("-inf")
    x[:, 9] = float("nan")  # a channel without any finite value: count 0, mean = m2 = 0
    row_mask = torch.rand(r, device=DEVICE) < 0.7
    row_mask[7] = True
    row_mask[:2] = False
    x[0] = 1e30  # a masked-out row, far off-scale, must not disturb the precision
    got = tk.welford_partials(x, row_mask, seq_len)
    _check_stats(got, x, row_mask, seq_len)
    assert got[0][9] == 0 and got[1][9] == 0 and got[2][9] == 0 and got[3][9] == 0
    assert got[0][4] == int(row_mask.sum()) - 1 - int(row_mask[200])


def test_welford_partials_empty_and_tiny():
    x = torch.randn(0, 37, device=DEVICE)
    cnt, mean, m2, amean, am2, sq = tk.welford_partials(x, None, 4)
    assert cnt.shape == (37,) and int(cnt.abs().sum()) == 0 and float(mean.abs().sum()) == 0
    assert sq.shape == (0, 37)
    x1 = torch.randn(1, 1, device=DEVICE)
    _check_stats(tk.welford_partials(x1, None, 1), x1, None, 1)


def test_welford_partials_deterministic():
    x = 3.0 + torch.randn(300, 172, device=DEVICE)
    mask = torch.rand(300, device=DEVICE) < 0.9
    a = tk.welford_partials(x, mask, 50)
    b = tk.welford_partials(x, mask, 50)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


# -------------------------------------------------------------------------------------------- linear_with_stats


@pytest.mark.parametrize("dtype,seq_len", [(torch.float32, 50), (torch.bfloat16, 64)])
def test_linear_with_stats(dtype, seq_len):
    r, k, n = 150, 172, 70  # several row blocks, two column blocks, ragged K
    x = (1e2 + torch.randn(r, k, device=DEVICE)).to(dtype)
    x[3, 5] = float("nan")  # propagates to y (like F.linear) but is excluded from the statistics
    w = (0.1 * torch.randn(n, k, device=DEVICE)).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    row_mask = torch.rand(r, device=DEVICE) < 0.8
    y, *stats = tk.linear_with_stats(x, w, b, row_mask, seq_len)
    assert y.shape == (r, n) and y.dtype == dtype
    assert torch.isnan(y[3]).all() and not torch.isnan(y[4:]).any()
    ref, bound = _gated_ref64(x, w, b, torch.ones(n, k, dtype=torch.bool, device=DEVICE), 1.0)
    keep = torch.ones(r, dtype=torch.bool)
    keep[3] = False
    _check(y[keep], ref[keep], bound[keep])
    _check_stats(stats, x, row_mask, seq_len)
    again = tk.linear_with_stats(x, w, b, row_mask, seq_len)
    for s, t in zip((y, *stats), again):  # bit-identical reruns
        torch.testing.assert_close(s, t, rtol=0, atol=0, equal_nan=True)


def test_linear_with_stats_small_and_no_bias():
    x = torch.randn(3, 40, device=DEVICE)
    w = torch.randn(1, 40, device=DEVICE)
    y, *stats = tk.linear_with_stats(x, w, None, None, 0)
    ref, bound = _gated_ref64(x, w, None, torch.ones(1, 40, dtype=torch.bool, device=DEVICE), 1.0)
    _check(y, ref, bound)
    _check_stats(stats, x, None, 0)
    y0, cnt0, *_ = tk.linear_with_stats(x[:0], w, None, None, 0)
    assert y0.shape == (0, 1) and int(cnt0.sum()) == 0


def test_custom_ops_opcheck_with_triton_backend():
    import persona_kernels.ops.gated_linear  # noqa: F401  (registers the custom ops)
    import persona_kernels.ops.welford  # noqa: F401

    x = torch.randn(5, 40, device=DEVICE)
    w = torch.randn(7, 40, device=DEVICE)
    b = torch.randn(7, device=DEVICE)
    packed = torch_ref.pack_mask(torch.rand(7, 40, device=DEVICE) < 0.5)
    ops = torch.ops.persona_kernels
    torch.library.opcheck(ops.gated_linear, (x, w, packed, b, 0.3, "triton"))
    x3 = torch.randn(2, 6, 40, device=DEVICE)
    mask = torch.rand(2, 6, device=DEVICE) < 0.7
    torch.library.opcheck(ops.welford_partials, (x3, mask, 6, "triton"))
    torch.library.opcheck(ops.linear_with_stats, (x3, w, b, mask, 6, "triton"))

def test_is_available():
    assert tk.is_available(DEVICE)
    assert not tk.is_available(torch.device("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            assert not tk.is_available(torch.device("cuda"))


# ------------------------------------------------------------------------------------ GPU compile (no GPU needed)


def test_kernels_compile_for_sm90():
    """The interpreter skips the compiler: lower every kernel to an sm_90 cubin (bundled ptxas) instead."""
    import json
    import os
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton wheel without the NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "persona_kernels.kernels.triton.aot_check", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_gated_linear_kernel", "_gated_linear_multi_kernel", "_partials_kernel", "_seq_sumsq_kernel",
                       "_linear_stats_kernel", "_merge_kernel"}
    gated = [r for r in rows if r["kernel"] == "_gated_linear_kernel"]
    assert any(r["mma"] == "wgmma" for r in gated)  # Hopper tensor-core path for decode (SWAP_AB) and prefill
    assert all(r.get("spill_stack_bytes", 0) == 0 for r in rows), [r for r in rows if r.get("spill_stack_bytes")]
