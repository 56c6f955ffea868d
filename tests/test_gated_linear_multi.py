"""gated_linear_multi: mixed-persona rows, every backend against a float64 reference, custom op, errors."""

from __future__ import annotations

import pytest
import torch

import persona_kernels as pk
from persona_kernels.ops import gated_linear_multi as _multi_module  # noqa: F401  (registers the custom op)
from persona_kernels.ops.packing import packed_words

from _gated_common import BACKENDS, DTYPES, FAST_BACKENDS, assert_close, assert_error_names_argument


def make_case(m_shape, n, k, p, dtype, bias=True, density=0.6):
    x = torch.randn(*m_shape, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    masks = torch.rand(p, n, k) < density
    bank = torch.stack([pk.pack_mask(m) for m in masks]) if p else torch.zeros((0, n, packed_words(k)), dtype=torch.int32)
    return x, w, b, masks, bank


def reference(x, w, masks, index, b, gammas):
    """float64, row by row: row i uses mask index[i] (-1: dense)."""
    k = w.shape[1]
    x2 = x.reshape(-1, k).double()
    out = torch.empty(x2.shape[0], w.shape[0], dtype=torch.float64)
    for i, p in enumerate(index.reshape(-1).tolist()):
        if p < 0:
            wg = w.double()
        else:
            m = masks[p].double()
            wg = w.double() * (m + gammas[p] * (1 - m))
        out[i] = wg @ x2[i]
    if b is not None:
        out += b.double()
    return out.reshape(*x.shape[:-1], w.shape[0])


def check(backend, m_shape, n, k, p, dtype, gamma, index=None, bias=True):
    x, w, b, masks, bank = make_case(m_shape, n, k, p, dtype, bias)
    if index is None:
        index = torch.randint(-1, p, m_shape)
    gammas = [float(gamma)] * p if not isinstance(gamma, (list, tuple)) else list(gamma)
    y = pk.gated_linear_multi(x, w, bank, index, b, gamma, backend=backend)
    assert_close(y, reference(x, w, masks, index, b, gammas), dtype, k)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(backend, dtype):
    shape = (37,) if backend != "triton" else (19,)
    check(backend, shape, 50, 172, 4, dtype, [0.0, 0.25, 1.0, 0.5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 172), (5, 1, 33), (1, 7, 32), (9, 3, 1)])
def test_odd_shapes(backend, m, n, k):
    check(backend, (m,), n, k, 3, torch.float32, 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x, w, b, _, bank = make_case((0,), 6, 40, 2, torch.float32)
    y = pk.gated_linear_multi(x, w, bank, torch.zeros(0, dtype=torch.long), b, backend=backend)
    assert y.shape == (0, 6)
    x3 = torch.randn(2, 0, 40)
    assert pk.gated_linear_multi(x3, w, bank, torch.zeros(2, 0, dtype=torch.int32), b, backend=backend).shape == (2, 0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_minus_one_is_the_base_model(backend):
    x, w, b, _, bank = make_case((6,), 20, 70, 2, torch.float32)
    y = pk.gated_linear_multi(x, w, bank, torch.full((6,), -1), b, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_match_single_persona_op(backend):
    """Each row equals the single-persona gated_linear of its persona; absent personas cost nothing."""
    x, w, b, _, bank = make_case((12,), 24, 100, 5, torch.float32)
    index = torch.tensor([3, 0, 3, -1, 0, 0, 3, -1, 3, 0, 3, 3], dtype=torch.int32)  # personas 1, 2, 4 absent
    y = pk.gated_linear_multi(x, w, bank, index, b, 0.2, backend=backend)
    for i, p in enumerate(index.tolist()):
        want = torch.nn.functional.linear(x[i], w, b) if p < 0 else pk.gated_linear(x[i : i + 1], w, bank[p], b, 0.2, backend="torch")[0]
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-4)
    # a different persona's gate gives a different row: the test can fail
    other = pk.gated_linear(x[:1], w, bank[1], b, 0.2, backend="torch")[0]
    assert not torch.allclose(y[0], other, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_and_non_contiguous(backend, dtype):
    x, w, b, masks, bank = make_case((3, 5), 17, 96, 3, dtype)
    x = torch.randn(5, 3, 96).to(dtype).transpose(0, 1)  # non-contiguous [3, 5, 96]
    index = torch.randint(-1, 3, (3, 5))
    y = pk.gated_linear_multi(x, w, bank, index, b, 0.1, backend=backend)
    assert_close(y, reference(x, w, masks, index, b, [0.1] * 3), dtype, 96)
    y_flat_index = pk.gated_linear_multi(x, w, bank, index.reshape(-1), b, 0.1, backend=backend)
    torch.testing.assert_close(y_flat_index, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gamma_tensor_and_no_bias(backend):
    gammas = torch.tensor([0.0, 0.7, 1.0])
    check(backend, (13,), 9, 64, 3, torch.float32, gammas.tolist(), bias=False)
    x, w, b, masks, bank = make_case((13,), 9, 64, 3, torch.float32)
    index = torch.randint(-1, 3, (13,))
    y = pk.gated_linear_multi(x, w, bank, index, b, gammas, backend=backend)
    assert_close(y, reference(x, w, masks, index, b, gammas.tolist()), torch.float32, 64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    for dtype, bias in ((torch.float32, True), (torch.bfloat16, False)):
        x, w, b, _, bank = make_case((2, 3), 5, 40, 3, dtype, bias)
        index = torch.tensor([[0, -1, 2], [2, 2, 0]])
        torch.library.opcheck(torch.ops.persona_kernels.gated_linear_multi, (x, w, bank, index, b, [0.0, 0.5, 0.1], backend))


def _base():
    x, w, b, _, bank = make_case((4,), 6, 40, 2, torch.float32)
    return dict(x=x, weight=w, packed_bank=bank, persona_index=torch.tensor([0, 1, -1, 0]), bias=b, gamma=0.0)


@pytest.mark.parametrize(
    "change,exc,arg",
    [
        (lambda a: a.update(packed_bank=a["packed_bank"][0]), ValueError, "packed_bank"),
        (lambda a: a.update(packed_bank=a["packed_bank"].long()), TypeError, "packed_bank"),
        (lambda a: a.update(packed_bank=a["packed_bank"][:, :5]), ValueError, "packed_bank"),
        (lambda a: a.update(persona_index=a["persona_index"].float()), TypeError, "persona_index"),
        (lambda a: a.update(persona_index=torch.tensor([0, 1, -1])), ValueError, "persona_index"),
        (lambda a: a.update(persona_index=torch.tensor([0, 2, -1, 0])), ValueError, "persona_index"),
        (lambda a: a.update(persona_index=torch.tensor([0, -2, -1, 0])), ValueError, "persona_index"),
        (lambda a: a.update(persona_index=[0, 1, -1, 0]), TypeError, "persona_index"),
        (lambda a: a.update(gamma=[0.1]), ValueError, "gamma"),
        (lambda a: a.update(gamma=1.5), ValueError, "gamma"),
        (lambda a: a.update(gamma=[0.1, -0.1]), ValueError, "gamma"),
        (lambda a: a.update(gamma="x"), TypeError, "gamma"),
        (lambda a: a.update(x=a["x"][:, :10]), ValueError, "x"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, "bias"),
    ],
)
def test_errors_name_the_argument(change, exc, arg):
    assert_error_names_argument(pk.gated_linear_multi, _base(), change, exc, arg)


def test_unimplemented_backend_is_reported():
    args = _base()
    with pytest.raises((RuntimeError, ValueError), match="backend"):
        pk.gated_linear_multi(**args, backend="nope")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension not built")
def test_cpu_op_checks_its_arguments():
    x, w, b, _, bank = make_case((4,), 6, 40, 2, torch.float32)
    op = torch.ops.persona_kernels_C.gated_linear_multi_cpu
    with pytest.raises(RuntimeError, match="persona_index"):
        op(x, w, bank, torch.tensor([0, 5, 0, 0]), b, [0.0, 0.0])
    with pytest.raises(RuntimeError, match="gamma"):
        op(x, w, bank, torch.tensor([0, 1, 0, 0]), b, [0.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorted_runs_and_single_persona_batches(backend):
    """Consecutive runs per persona (no-gather path of the C++ backend) and a batch of one persona only."""
    index = torch.tensor([-1, -1, 0, 0, 0, 2, 2, 1, 1, 1, 1])
    check(backend, (11,), 20, 70, 3, torch.float32, [0.0, 0.4, 1.0], index=index)
    check(backend, (11,), 20, 70, 3, torch.float32, 0.2, index=torch.full((11,), 1))
    check(backend, (2, 4), 20, 70, 3, torch.float32, 0.0, index=torch.tensor([[2, 2, 2, 2], [0, 0, 0, 0]]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_eager_inference_runs_the_kernel_without_the_custom_op(backend, monkeypatch):
    # As for gated_linear: eager inference calls the kernel directly (same bits as the op); a call that needs
    # autograd still goes through the op.
    x, w, b, _, bank = make_case((3, 4), 9, 70, 2, torch.float32)
    index = torch.randint(-1, 2, (3, 4))
    via_op = torch.ops.persona_kernels.gated_linear_multi(x, w, bank, index, b, [0.2, 0.0], backend)
    real_op = _multi_module._gated_linear_multi_op
    calls = []
    monkeypatch.setattr(_multi_module, "_gated_linear_multi_op", lambda *a: calls.append(1) or real_op(*a))
    assert torch.equal(pk.gated_linear_multi(x, w, bank, index, b, [0.2, 0.0], backend=backend), via_op)
    assert calls == []
    y = pk.gated_linear_multi(x.requires_grad_(), w, bank, index, b, [0.2, 0.0], backend=backend)
    assert calls == [1] and y.requires_grad
