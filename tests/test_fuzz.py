"""Property-based fuzzing (hypothesis, derandomized so CI is deterministic).

- The bank reader: random bytes, byte-mutated valid files and structure-aware header mutations (valid checksums,
  random field values) always give a valid bank or a :class:`MaskBankError`, never another exception.
- ``gated_linear`` / ``gated_linear_multi``: random shapes (K = 0, not a multiple of 32, 1-3 leading dims, empty
  rows), dtypes, gamma, bias and strides against float64: 1000 examples per fast backend (``torch``, ``cpu``);
  Triton runs under its CPU interpreter here (about 0.15 s per example), so it gets 25 to keep CI short.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import persona_kernels as pk  # noqa: E402
from persona_kernels import dispatch  # noqa: E402
from persona_kernels.bank import MaskBank, MaskBankError  # noqa: E402

FAST = [b for b in ("torch", "cpu") if dispatch.is_available(b, "cpu")]
TRITON = dispatch.is_available("triton", "cpu")
_FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def fuzz(examples: int) -> settings:
    """Deterministic settings (derandomized, no example database) with ``examples`` examples."""
    return settings(_FUZZ, max_examples=examples)
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


# -- the bank reader --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_bank_bytes(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    bank = MaskBank.from_bool_masks(
        {p: {"a.q_proj": torch.rand(6, 40, generator=gen) < 0.5, "a.down": torch.rand(3, 33, generator=gen) < 0.5}
         for p in ("x", "y")}, metadata={"method": "wanda", "tokens_seen": {"x": 3}}, default_gamma=0.2)
    bank.record_weights({"a.q_proj": torch.randn(6, 40, generator=gen)})
    path = bank.save(tmp_path_factory.mktemp("fuzz") / "valid.safetensors")
    return path.read_bytes(), bank


def _load_is_clean(path) -> None:
    try:
        bank = MaskBank.load(path)
    except MaskBankError:
        return
    # accepted: it must be a consistent bank
    for p in bank.personas:
        for m in bank.module_names:
            t = bank.get(p, m)
            assert t is None or (t.dtype == torch.int32 and t.shape[1] == (bank.shapes[m][1] + 31) // 32)
    assert 0.0 <= bank.default_gamma <= 1.0


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "random.safetensors"

    @fuzz(1000)
    @given(st.binary(max_size=600))
    def run(data):
        path.write_bytes(data)
        _load_is_clean(path)

    run()


def test_mutated_valid_files_are_refused_or_valid(tmp_path, valid_bank_bytes):
    data, _ = valid_bank_bytes
    path = tmp_path / "mutated.safetensors"

    @fuzz(1000)
    @given(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255), st.sampled_from("fit")),
                    min_size=1, max_size=4))
    def run(edits):
        buf = bytearray(data)
        for pos, value, kind in edits:
            pos %= max(len(buf), 1)
            if kind == "f" and buf:
                buf[pos] = value
            elif kind == "i":
                buf.insert(pos, value)
            elif kind == "t":
                del buf[pos:]
        path.write_bytes(bytes(buf))
        _load_is_clean(path)

    run()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def test_header_fields_with_valid_checksums_are_refused_or_valid(tmp_path, valid_bank_bytes):
    """Reaches the validation behind the checksums: one header field replaced by an arbitrary JSON value."""
    from safetensors.torch import save_file

    from persona_kernels.bank import _KEY_HEADER, _KEY_JSON, _KEY_PAYLOAD, _payload_sha256

    _, bank = valid_bank_bytes
    header = bank._header()
    tensors = {f"{p}/{m}": bank.get(p, m).clone() for p in bank.personas for m in bank.module_names}
    path = tmp_path / "crafted.safetensors"
    fields = sorted(header) + ["metadata.default_gamma", "metadata.tokens_seen", "weight_sample.values"]

    @fuzz(1000)
    @given(st.sampled_from(fields), _JSON)
    def run(field, value):
        crafted = json.loads(json.dumps(header))
        if "." in field:
            outer, inner = field.split(".")
            crafted[outer][inner] = value
        else:
            crafted[field] = value
        text = json.dumps(crafted, sort_keys=True)
        save_file(tensors, str(path), metadata={_KEY_JSON: text, _KEY_PAYLOAD: _payload_sha256(tensors),
                                                _KEY_HEADER: hashlib.sha256(text.encode()).hexdigest()})
        _load_is_clean(path)

    run()


# -- gated_linear against float64 ------------------------------------------------------------------------
@st.composite
def gated_cases(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    n = draw(st.integers(1, 24))
    k = draw(st.sampled_from([0, 1, 7, 31, 32, 33, 64, 65, 100]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    gamma = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    return dict(lead=lead, n=n, k=k, dtype=dtype, gamma=gamma, bias=draw(st.booleans()),
                strided=draw(st.booleans()), personas=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**31 - 1)))


def _tensors(case):
    gen = torch.Generator().manual_seed(case["seed"])
    lead, n, k, dtype = case["lead"], case["n"], case["k"], case["dtype"]
    if case["strided"] and k:  # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(*lead, 2 * k, generator=gen).to(dtype)[..., ::2]
    else:
        x = torch.randn(*lead, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if case["bias"] else None
    masks = torch.rand(case["personas"], n, k, generator=gen) < 0.5
    index = torch.randint(-1, case["personas"], tuple(lead), generator=gen)
    return x, w, b, masks, index


def _close(y, ref, dtype, k):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = ATOL[dtype] * math.sqrt(max(k, 1)) + RTOL[dtype] * ref.abs()
    assert bool((err <= bound).all()), f"max error {err.max().item() if err.numel() else 0:.3g}"


def _reference(x, w, b, mask, gamma):
    g = mask.double() + gamma * (1.0 - mask.double()) if mask is not None else 1.0
    y = x.double() @ (w.double() * g).T
    return y + b.double() if b is not None else y


def _check_case(backend, case):
    x, w, b, masks, index = _tensors(case)
    gamma, dtype, k = case["gamma"], case["dtype"], case["k"]
    y = pk.gated_linear(x, w, pk.pack_mask(masks[0]) if k else torch.zeros(w.shape[0], 0, dtype=torch.int32),
                        b, gamma, backend=backend)
    _close(y, _reference(x, w, b, masks[0], gamma), dtype, k)
    packed = torch.stack([pk.pack_mask(m) for m in masks]) if k else torch.zeros(masks.shape[0], w.shape[0], 0, dtype=torch.int32)
    ym = pk.gated_linear_multi(x, w, packed, index, b, gamma, backend=backend)
    ref = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float64)
    for p in range(-1, masks.shape[0]):
        rows = index == p
        if rows.any():
            ref[rows] = _reference(x[rows], w, b, masks[p] if p >= 0 else None, gamma)
    _close(ym, ref, dtype, k)


@pytest.mark.parametrize("backend", FAST)
def test_gated_linear_matches_float64(backend):
    @fuzz(1000)
    @given(gated_cases())
    def run(case):
        _check_case(backend, case)

    run()


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable (needs TRITON_INTERPRET=1 or a GPU)")
def test_gated_linear_matches_float64_triton():
    @fuzz(25)  # the Triton interpreter is slow on the CPU
    @given(gated_cases())
    def run(case):
        _check_case("triton", case)

    run()
