"""gated_linear: every backend against a float64 reference, ISA fallbacks, custom-op integration, errors."""

from __future__ import annotations

import pytest
import torch

import persona_kernels as pk
from persona_kernels import _extension, dispatch
from persona_kernels.kernels import torch_ref
from persona_kernels.ops import gated_linear as _gated_linear_module  # noqa: F401  (registers the custom op)

from _gated_common import BACKENDS, DTYPES, FAST_BACKENDS, assert_close, assert_error_names_argument

HAS_CPU = "cpu" in BACKENDS
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")


def make_case(m_shape, n, k, dtype, gamma, bias=True, density=0.6):
    x = torch.randn(*m_shape, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    mask = torch.rand(n, k) < density
    return x, w, pk.pack_mask(mask), b, mask


def reference(x, w, mask, b, gamma):
    g = mask.double() + gamma * (1.0 - mask.double())
    y = x.double() @ (w.double() * g).T
    return y + b.double() if b is not None else y


def check(backend, m_shape, n, k, dtype, gamma, bias=True, x_transform=None):
    x, w, packed, b, mask = make_case(m_shape, n, k, dtype, gamma, bias)
    if x_transform is not None:
        x = x_transform(x)
    y = pk.gated_linear(x, w, packed, b, gamma, backend=backend)
    assert_close(y, reference(x, w, mask, b, gamma), dtype, k)
    return y


# ---- correctness on every backend ------------------------------------------------------------

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 172, 257])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_matches_float64_reference(backend, dtype, k, gamma):
    for m, n, bias in ((1, 1, True), (7, 9, False), (3, 13, True)):
        check(backend, (m,), n, k, dtype, gamma, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduced_shapes_all_backends(backend, dtype):
    for m, n, k, gamma, bias in ((1, 1, 33, 0.0, True), (5, 7, 172, 0.3, False), (2, 3, 31, 1.0, True)):
        check(backend, (m,), n, k, dtype, gamma, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_order_single_kept_weight(backend):
    # One kept weight per row at k in {0, 31, 32, 33, K-1}: with gamma = 0 and x = 1 the output is that weight.
    k, cols = 70, [0, 31, 32, 33, 69]
    w = torch.randn(len(cols), k)
    mask = torch.zeros(len(cols), k, dtype=torch.bool)
    mask[torch.arange(len(cols)), cols] = True
    y = pk.gated_linear(torch.ones(1, k), w, pk.pack_mask(mask), None, 0.0, backend=backend)
    torch.testing.assert_close(y[0], w[torch.arange(len(cols)), cols], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x, w, packed, b, _ = make_case((0,), 5, 33, torch.float32, 0.3)
    y = pk.gated_linear(x, w, packed, b, 0.3, backend=backend)
    assert y.shape == (0, 5) and y.dtype == torch.float32
    y3 = pk.gated_linear(torch.randn(2, 0, 33), w, packed, b, 0.3, backend=backend)
    assert y3.shape == (2, 0, 5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_3d_and_non_contiguous_inputs(backend, dtype):
    check(backend, (2, 3), 5, 172, dtype, 0.3)                                   # 3-D
    check(backend, (4, 3), 6, 40, dtype, 0.0, x_transform=lambda x: x.transpose(0, 1))  # transposed view
    x, w, packed, b, mask = make_case((9,), 7, 100, dtype, 1.0)
    xs = torch.randn(9, 230).to(dtype)[::2, 5:105]  # strided slice of a wider tensor, K = 100
    assert not xs.is_contiguous()
    assert_close(pk.gated_linear(xs, w, packed, b, 1.0, backend=backend), reference(xs, w, mask, b, 1.0), dtype, 100)
    x, w, packed, b, mask = make_case((4,), 6, 64, dtype, 0.5)
    wt = w.t().contiguous().t()  # non-contiguous weight with the same values
    y = pk.gated_linear(x, wt, packed, b, 0.5, backend=backend)
    assert_close(y, reference(x, w, mask, b, 0.5), dtype, 64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gate_changes_the_result(backend):
    # Guards against a kernel that ignores the mask: gamma = 0 must differ from the dense product.
    x, w, packed, b, _ = make_case((3,), 8, 96, torch.float32, 0.0, density=0.5)
    y_masked = pk.gated_linear(x, w, packed, b, 0.0, backend=backend)
    y_dense = pk.gated_linear(x, w, packed, b, 1.0, backend=backend)
    torch.testing.assert_close(y_dense, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert (y_masked - y_dense).abs().max() > 1e-2


# ---- the C++ backend: paths, ISA fallbacks -------------------------------------------------------

ISA_MODES = ["native", "avx512-no-bf16dot", "avx2", "portable"]


@pytest.fixture(params=ISA_MODES)
def isa_mode(request, monkeypatch):
    mode = request.param
    monkeypatch.delenv("PERSONA_KERNELS_CPU_NO_BF16DOT", raising=False)
    if mode == "native":
        monkeypatch.delenv("PERSONA_KERNELS_CPU_ISA", raising=False)
    elif mode == "avx512-no-bf16dot":
        monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", "avx512")
        monkeypatch.setenv("PERSONA_KERNELS_CPU_NO_BF16DOT", "1")
    else:
        monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", mode)
    return mode


@needs_cpu
def test_isa_cap_is_honoured(monkeypatch):
    native = _extension.cpu_isa()
    order = ["portable", "avx2", "avx512"]
    for cap in order:
        monkeypatch.setenv("PERSONA_KERNELS_CPU_ISA", cap)
        expected = order[min(order.index(cap), order.index(native))]
        assert _extension.cpu_isa() == expected


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["blocks", "gemm"])
def test_cpu_isa_fallbacks_and_paths(isa_mode, dtype, path, monkeypatch):
    # "blocks" forces the register-blocked small-M kernels, "gemm" the gated panels + BLAS GEMM.
    monkeypatch.setenv("PERSONA_KERNELS_GATED_LINEAR_GEMM_M", "1000000000" if path == "blocks" else "1")
    for m, n, k, gamma, bias in (
        (1, 1, 1, 0.3, True), (13, 9, 172, 0.0, True), (7, 6, 33, 0.3, False), (2, 5, 64, 1.0, True),
        (8, 4, 31, 0.3, True),
    ):
        check("cpu", (m,), n, k, dtype, gamma, bias)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_panels_and_default_threshold(dtype):
    # Several GEMM panels (N > 128 rows) and an M large enough for the default GEMM path (96 rows for bf16
    # with AVX512_BF16, 128 otherwise); below it the block kernels.
    check("cpu", (130,), 300, 100, dtype, 0.3, True)
    check("cpu", (20,), 131, 65, dtype, 0.0, False)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_cpu_block_kernels_over_several_passes_of_x(dtype, gamma, monkeypatch):
    # M above one pass of x rows (8 for the bf16 dot kernel, 6 for fp32 lanes): with bf16 the first pass
    # gates each block of weight rows into scratch and the later passes read it. Odd K (tail lanes of the
    # stored vectors), a row tail N % 3, and the scratch reused across calls of different K.
    monkeypatch.setenv("PERSONA_KERNELS_GATED_LINEAR_GEMM_M", "1000000000")
    for m, n, k in ((9, 7, 31), (16, 64, 172), (17, 11, 257), (40, 5, 64), (95, 13, 33)):
        x, w, packed, b, mask = make_case((m,), n, k, dtype, gamma)
        y = pk.gated_linear(x, w, packed, b, gamma, backend="cpu")
        assert_close(y, reference(x, w, mask, b, gamma), dtype, k)
        # every row as computed in a call of its own 8-row slice (single pass, gated in registers): same bits
        slices = torch.cat([pk.gated_linear(x[i:i + 8], w, packed, b, gamma, backend="cpu") for i in range(0, m, 8)])
        torch.testing.assert_close(y, slices, rtol=0, atol=0)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_many_row_chunks_and_concurrent_callers(dtype):
    # Enough weight rows for many work chunks (shared with helper threads), an odd row tail, and
    # several Python threads calling at once.
    import concurrent.futures

    x, w, packed, b, mask = make_case((3,), 1001, 64, dtype, 0.3)
    ref = reference(x, w, mask, b, 0.3)
    assert_close(pk.gated_linear(x, w, packed, b, 0.3, backend="cpu"), ref, dtype, 64)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: pk.gated_linear(x, w, packed, b, 0.3, backend="cpu"), range(8)))
    for y in outs:
        assert_close(y, ref, dtype, 64)


@needs_cpu
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_cpu_gemm_path_tiles_and_threads(gamma, monkeypatch):
    # The GEMM path for every M (bf16 with AVX512_BF16: our own GEMM over 32-row tiles of x and 12-row blocks
    # of W; otherwise gated panels + the BLAS GEMM): partial tiles in M and N, odd K (the column pair that
    # straddles the end of a row), bias. Every output element is computed in a fixed order, so 1 and 2 torch
    # threads give the same bits.
    monkeypatch.setenv("PERSONA_KERNELS_GATED_LINEAR_GEMM_M", "1")
    before = torch.get_num_threads()
    try:
        for m, n, k in ((1, 1, 1), (31, 12, 2), (32, 13, 33), (33, 25, 64), (70, 37, 129), (5, 100, 4096)):
            x, w, packed, b, mask = make_case((m,), n, k, torch.bfloat16, gamma)
            torch.set_num_threads(1)
            y1 = pk.gated_linear(x, w, packed, b, gamma, backend="cpu")
            assert_close(y1, reference(x, w, mask, b, gamma), torch.bfloat16, k)
            torch.set_num_threads(2)
            y2 = pk.gated_linear(x, w, packed, b, gamma, backend="cpu")
            torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thread")
def torch_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_thread_split_boundaries(dtype, torch_threads, monkeypatch):
    # The row blocks (small M) and GEMM panels (large M) are shared out among torch's threads in
    # chunks: N of 1, of one chunk, of many chunks with a partial last block and a partial last panel.
    monkeypatch.setenv("PERSONA_KERNELS_GATED_LINEAR_PANEL", "16")  # many panels with a short last one
    for n in (1, 2, 5, 64, 199, 1001):
        for m_shape in ((0,), (1,), (9,), (2, 15), (40,), (130,)):  # 130 rows: GEMM path (default threshold)
            check("cpu", m_shape, n, 67, dtype, 0.3, bias=n % 2 == 1)
    # non-contiguous x through both paths
    check("cpu", (33, 2), 199, 40, dtype, 0.0, x_transform=lambda x: x.transpose(0, 1))
    check("cpu", (3, 40), 199, 40, dtype, 0.5, x_transform=lambda x: x.transpose(0, 1))


@needs_cpu
def test_cpu_op_checks_its_arguments():
    op = torch.ops.persona_kernels_C.gated_linear_cpu
    x, w, packed, b, _ = make_case((2,), 3, 40, torch.float32, 0.0)
    cases = [
        ((x, w, packed[:, :1], b, 0.0), "packed"),
        ((x, w, packed.long(), b, 0.0), "packed"),
        ((x[:, :39], w, packed, b, 0.0), "x"),
        ((x.double(), w, packed, b, 0.0), "x"),
        ((x, w.int(), packed, b, 0.0), "weight"),
        ((x, w, packed, b[:2], 0.0), "bias"),
        ((x, w, packed, b.half(), 0.0), "bias"),
        ((x, w, packed, b, 1.5), "gamma"),
        ((x, w, packed, b, -0.1), "gamma"),
        ((x[None], w, packed, b, 0.0), "x"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=f"argument '{name}'"):
            op(*args)


# ---- custom op integration: opcheck, autograd, torch.compile -------------------------------------

def _opcheck(backend, requires_grad):
    for dtype, gamma, bias in ((torch.float32, 0.3, True), (torch.bfloat16, 0.0, False)):
        x, w, packed, b, _ = make_case((2, 3), 5, 40, dtype, gamma, bias)
        if requires_grad and dtype == torch.float32:
            for t in (x, w, b):
                t.requires_grad_()
        torch.library.opcheck(torch.ops.persona_kernels.gated_linear, (x, w, packed, b, gamma, backend))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    _opcheck(backend, requires_grad=False)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_with_grad(backend):
    _opcheck(backend, requires_grad=True)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_autograd_matches_reference(backend, gamma):
    x, w, packed, b, mask = make_case((2, 3), 5, 40, torch.float32, gamma)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    upstream = torch.randn(2, 3, 5)
    (pk.gated_linear(xs, ws, packed, bs, gamma, backend=backend) * upstream).sum().backward()
    (reference(xd, wd, mask, bd, gamma) * upstream.double()).sum().backward()
    for got, want in ((xs.grad, xd.grad), (ws.grad, wd.grad), (bs.grad, bd.grad)):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    g = mask.float() + gamma * (1 - mask.float())
    assert torch.all(ws.grad[g == 0] == 0)  # pruned weights get no gradient with a hard mask


@needs_cpu
def test_torch_compile_fullgraph():
    x, w, packed, b, mask = make_case((3,), 4, 40, torch.float32, 0.3)

    def f(inp):
        return pk.gated_linear(inp, w, packed, b, 0.3, backend="cpu") * 2.0

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(x)
    assert_close(y, 2.0 * reference(x, w, mask, b, 0.3), torch.float32, 40)


# ---- argument errors through the public API -----------------------------------------------------

def _valid():
    x, w, packed, b, _ = make_case((2,), 3, 40, torch.float32, 0.0)
    return dict(x=x, weight=w, packed_mask=packed, bias=b, gamma=0.5)


@pytest.mark.parametrize(
    "change,exc,arg",
    [
        (lambda a: a.update(packed_mask=a["packed_mask"][:, :1]), ValueError, "packed_mask"),
        (lambda a: a.update(packed_mask=torch.zeros(4, 2, dtype=torch.int32)), ValueError, "packed_mask"),
        (lambda a: a.update(packed_mask=a["packed_mask"].to(torch.int64)), TypeError, "packed_mask"),
        (lambda a: a.update(packed_mask=a["packed_mask"].bool()), TypeError, "packed_mask"),
        (lambda a: a.update(x=a["x"][:, :39]), ValueError, "x"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x"),
        (lambda a: a.update(x=a["x"].to(torch.bfloat16)), TypeError, "x"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x"),
        (lambda a: a.update(packed_mask=a["packed_mask"].to("meta")), ValueError, "packed_mask"),
        (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias"),
        (lambda a: a.update(bias=a["bias"].half()), TypeError, "bias"),
        (lambda a: a.update(bias=a["bias"][:2]), ValueError, "bias"),
        (lambda a: a.update(weight=a["weight"].int()), TypeError, "weight"),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight"),
        (lambda a: a.update(gamma=1.5), ValueError, "gamma"),
        (lambda a: a.update(gamma=-0.01), ValueError, "gamma"),
        (lambda a: a.update(gamma="0.5"), TypeError, "gamma"),
        (lambda a: a.update(gamma=True), TypeError, "gamma"),
        (lambda a: a.update(gamma=None), TypeError, "gamma"),
    ],
)
def test_errors_name_the_argument(change, exc, arg):
    assert_error_names_argument(pk.gated_linear, _valid(), change, exc, arg)


def test_unknown_and_unavailable_backends():
    args = _valid()
    with pytest.raises(ValueError, match="argument 'backend'"):
        pk.gated_linear(**args, backend="fortran")
    unavailable = [b for b in dispatch.BACKENDS if not dispatch.is_available(b, "cpu")]
    if not unavailable:
        pytest.skip("every backend is available for CPU tensors on this machine")
    with pytest.raises(RuntimeError, match="argument 'backend'"):
        pk.gated_linear(**args, backend=unavailable[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_in_features_gives_the_bias(backend, bias):
    # K = 0: x @ W.T is a sum over nothing; the result is the bias broadcast over the rows (or zeros)
    x, w = torch.randn(2, 3, 0), torch.randn(5, 0)
    b = torch.randn(5) if bias else None
    packed = torch.zeros(5, 0, dtype=torch.int32)
    got = pk.gated_linear(x, w, packed, b, 0.3, backend=backend)
    want = (b if bias else torch.zeros(5)).expand(2, 3, 5)
    assert torch.equal(got, want)
    multi = pk.gated_linear_multi(x, w, packed[None], torch.zeros(2, 3, dtype=torch.int32), b, 0.3, backend=backend)
    assert torch.equal(multi, want)


@needs_cpu
def test_cpu_tensors_are_dispatched_to_the_cpp_kernel(monkeypatch):
    from persona_kernels.kernels import cpu as cpu_backend

    calls = []
    real = cpu_backend.gated_linear
    monkeypatch.setattr(cpu_backend, "gated_linear", lambda *a: calls.append(1) or real(*a))
    dispatch._cached_kernel.cache_clear()
    try:
        x, w, packed, b, _ = make_case((3,), 4, 40, torch.float32, 0.0)
        torch.ops.persona_kernels.gated_linear(x, w, packed, b, 0.0, "auto")  # the op itself: torch.library routes CPU
        assert calls == [1]
        pk.gated_linear(x, w, packed, b, 0.0, backend="torch")  # the override bypasses it
        assert calls == [1]
    finally:
        dispatch._cached_kernel.cache_clear()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_eager_inference_runs_the_kernel_without_the_custom_op(backend, monkeypatch):
    # Eager calls with nothing to record (no grad, no tracing, no subclass or Python mode) run the backend kernel
    # directly, skipping the custom op's dispatch; every other call must still go through the op. Both give the
    # same bits.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, packed, b, _ = make_case((2, 5), 7, 45, torch.float32, 0.3)
    via_op = torch.ops.persona_kernels.gated_linear(x, w, packed, b, 0.3, backend)
    real_op = _gated_linear_module._gated_linear_op
    calls = []
    monkeypatch.setattr(_gated_linear_module, "_gated_linear_op", lambda *a: calls.append(1) or real_op(*a))

    direct = pk.gated_linear(x, w, packed, b, 0.3, backend=backend)
    with torch.no_grad():
        direct_no_grad = pk.gated_linear(x, w.requires_grad_(), packed, b, 0.3, backend=backend)
    assert calls == []
    assert torch.equal(direct, via_op) and torch.equal(direct_no_grad, via_op)

    y = pk.gated_linear(x, w, packed, b, 0.3, backend=backend)  # w requires grad: autograd needs the op
    assert calls == [1] and y.requires_grad
    w.requires_grad_(False)
    with torch.device("cpu"):  # a torch function mode
        pk.gated_linear(x, w, packed, b, 0.3, backend=backend)
    assert calls == [1, 1]
    with FakeTensorMode() as mode:  # fake tensors and a dispatch mode: shape propagation through the op's fake
        fx, fw, fp, fb = (mode.from_tensor(t) for t in (x, w, packed, b))
        assert pk.gated_linear(fx, fw, fp, fb, 0.3, backend=backend).shape == (2, 5, 7)
    assert calls == [1, 1, 1]
