"""Bit packing of persona masks: layout, round trips, backend agreement and argument errors."""

from __future__ import annotations

import pytest
import torch

import persona_kernels as pk
from persona_kernels import dispatch
from persona_kernels.kernels import torch_ref

PACK_BACKENDS = [b for b in ("torch", "cpu") if dispatch.is_available(b, "cpu")]
SHAPES = [(1, 1), (1, 31), (3, 32), (5, 33), (7, 172), (0, 33), (0, 1), (2, 0), (1, 1000)]


def _kernel(backend: str, op: str):
    return dispatch.get_kernel(op, backend, "cpu")


def test_hand_built_layout_lsb_first() -> None:
    # Row 0 keeps k = 0, 1, 31 and 32; row 1 keeps only k = 33 (bit 1 of word 1); K = 40.
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, [0, 1, 31, 32]] = True
    mask[1, 33] = True
    expected = torch.tensor([[1 + 2 - 2**31, 1], [0, 2]], dtype=torch.int32)  # bit 31 set -> negative int32
    for backend in PACK_BACKENDS:
        packed = _kernel(backend, "pack_mask")(mask)
        assert packed.dtype == torch.int32 and packed.shape == (2, 2), backend
        assert torch.equal(packed, expected), backend
        assert torch.equal(_kernel(backend, "unpack_mask")(expected, 40), mask), backend
    assert torch.equal(pk.pack_mask(mask), expected)


def test_padding_bits_are_zero() -> None:
    mask = torch.ones(3, 33, dtype=torch.bool)
    for backend in PACK_BACKENDS:
        packed = _kernel(backend, "pack_mask")(mask)
        assert torch.equal(packed[:, 1], torch.ones(3, dtype=torch.int32)), backend  # only bit 0 of word 1
        assert torch.equal(packed[:, 0], torch.full((3,), -1, dtype=torch.int32)), backend


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_round_trip_and_backends_agree(n: int, k: int, density: float) -> None:
    mask = torch.rand(n, k) < density
    packed = pk.pack_mask(mask)
    assert packed.shape == (n, pk.packed_words(k)) and packed.dtype == torch.int32
    assert torch.equal(pk.unpack_mask(packed, k), mask)
    for backend in PACK_BACKENDS:
        assert torch.equal(_kernel(backend, "pack_mask")(mask), packed), backend
        unpacked = _kernel(backend, "unpack_mask")(packed, k)
        assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask), backend


def test_every_single_bit_position() -> None:
    k = 70
    mask = torch.eye(k, dtype=torch.bool)  # row j keeps only column j
    for backend in PACK_BACKENDS:
        packed = _kernel(backend, "pack_mask")(mask)
        for j in range(k):
            word, bit = divmod(j, 32)
            value = packed[j].to(torch.int64) & 0xFFFFFFFF
            assert value[word].item() == 1 << bit, (backend, j)
            assert int(value.sum().item()) == 1 << bit, (backend, j)


def test_non_contiguous_mask() -> None:
    base = torch.rand(40, 9) < 0.5
    mask = base.t()  # [9, 40], non-contiguous
    assert not mask.is_contiguous()
    assert torch.equal(pk.pack_mask(mask), torch_ref.pack_mask(mask.contiguous()))
    assert torch.equal(pk.unpack_mask(pk.pack_mask(mask), 40), mask)


def test_packed_words() -> None:
    assert [pk.packed_words(k) for k in (0, 1, 31, 32, 33, 64, 172)] == [0, 1, 1, 1, 2, 2, 6]


@pytest.mark.parametrize(
    "mask,exc,arg",
    [
        (torch.ones(2, 3, dtype=torch.int32), TypeError, "mask"),
        (torch.ones(3, dtype=torch.bool), ValueError, "mask"),
        (torch.ones(2, 3, 4, dtype=torch.bool), ValueError, "mask"),
        ([[True, False]], TypeError, "mask"),
    ],
)
def test_pack_errors_name_the_argument(mask, exc, arg) -> None:
    with pytest.raises(exc, match=f"'{arg}'"):
        pk.pack_mask(mask)


@pytest.mark.parametrize(
    "packed,k,exc,arg",
    [
        (torch.zeros(2, 2, dtype=torch.int64), 40, TypeError, "packed"),
        (torch.zeros(2, 2, dtype=torch.bool), 40, TypeError, "packed"),
        (torch.zeros(4, dtype=torch.int32), 40, ValueError, "packed"),
        (torch.zeros(2, 2, dtype=torch.int32), 70, ValueError, "in_features"),
        (torch.zeros(2, 2, dtype=torch.int32), 32, ValueError, "in_features"),
        (torch.zeros(2, 2, dtype=torch.int32), -1, ValueError, "in_features"),
        ("not a tensor", 40, TypeError, "packed"),
    ],
)
def test_unpack_errors_name_the_argument(packed, k, exc, arg) -> None:
    with pytest.raises(exc, match=f"'{arg}'"):
        pk.unpack_mask(packed, k)


@pytest.mark.skipif(not dispatch.is_available("cpu", "cpu"), reason="C++ extension not built")
def test_cpp_ops_check_their_arguments() -> None:
    ops = torch.ops.persona_kernels_C
    with pytest.raises(RuntimeError, match="argument 'mask'"):
        ops.pack_mask(torch.ones(2, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="argument 'mask'"):
        ops.pack_mask(torch.ones(3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="argument 'packed'"):
        ops.unpack_mask(torch.zeros(2, 2, dtype=torch.int64), 40)
    with pytest.raises(RuntimeError, match="argument 'packed'"):
        ops.unpack_mask(torch.zeros(2, 2, dtype=torch.int32), 70)
    with pytest.raises(RuntimeError, match="argument 'in_features'"):
        ops.unpack_mask(torch.zeros(2, 0, dtype=torch.int32), -3)


def test_packing_custom_ops_opcheck():
    mask = torch.rand(5, 70) < 0.5
    torch.library.opcheck(torch.ops.persona_kernels.pack_mask, (mask, "auto"))
    torch.library.opcheck(torch.ops.persona_kernels.unpack_mask, (pk.pack_mask(mask), 70, "auto"))
