"""Bit packing: round trips, sizes, and the byte layout against a pure-Python packer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.quant.packing import (
    code_range,
    pack,
    pack_binary,
    pack_ternary,
    packed_size,
    unpack,
    unpack_binary,
    unpack_ternary,
)


def py_pack(codes: list[int], bits: int) -> list[int]:
    """Reference: one big integer, code k at bit k * bits (two's complement fields)."""
    acc = 0
    for k, c in enumerate(codes):
        acc |= (c % (1 << bits)) << (k * bits)
    n = math.ceil(len(codes) * bits / 8)
    return [(acc >> (8 * i)) & 0xFF for i in range(n)]


@st.composite
def code_lists(draw: st.DrawFn) -> tuple[list[int], int, bool]:
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return draw(st.lists(st.integers(lo, hi), max_size=67)), bits, signed


@settings(max_examples=300, deadline=None)
@given(code_lists(), st.sampled_from([torch.int8, torch.int16, torch.int64]))
def test_round_trip_and_layout(case: tuple[list[int], int, bool], dtype: torch.dtype) -> None:
    codes, bits, signed = case
    if not signed and bits == 8 and dtype == torch.int8:
        dtype = torch.int16
    t = torch.tensor(codes, dtype=dtype)
    packed = pack(t, bits, signed=signed)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(len(codes) * bits / 8) == packed_size(len(codes), bits)
    assert packed.tolist() == py_pack(codes, bits)
    out = unpack(packed, bits, len(codes), signed=signed)
    assert out.tolist() == codes
    assert out.dtype == (torch.int8 if signed else torch.uint8)


def test_shapes_and_dtype_argument() -> None:
    codes = torch.tensor([[1, -2, 0], [-1, 1, 0]])
    packed = pack(codes, 2)
    assert unpack(packed, 2, 6, dtype=torch.int64).reshape(2, 3).tolist() == codes.tolist()
    assert pack(torch.tensor([], dtype=torch.int8), 4).numel() == 0


def test_layout_by_hand() -> None:
    # 2-bit signed: 1 -> 01, -1 -> 11, 0 -> 00, -2 -> 10; element 0 in the low bits
    assert pack(torch.tensor([1, -1, 0, -2, 1]), 2).tolist() == [0b10001101, 0b01]
    assert pack(torch.tensor([-8, 7, 3]), 4).tolist() == [0x78, 0x03]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1, signed=False).tolist() == [129, 1]
    assert pack(torch.tensor([-1, 127, -128]), 8).tolist() == [255, 127, 128]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([-1, 1]), max_size=40))
def test_binary_round_trip(codes: list[int]) -> None:
    t = torch.tensor(codes, dtype=torch.int8)
    packed = pack_binary(t)
    assert packed.numel() == math.ceil(len(codes) / 8)
    assert packed.tolist() == py_pack([int(c > 0) for c in codes], 1)
    assert unpack_binary(packed, len(codes)).tolist() == codes


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([-1, 0, 1]), max_size=40))
def test_ternary_round_trip(codes: list[int]) -> None:
    packed = pack_ternary(torch.tensor(codes, dtype=torch.int8))
    assert packed.numel() == math.ceil(len(codes) / 4)
    assert unpack_ternary(packed, len(codes)).tolist() == codes


def test_code_range() -> None:
    assert code_range(1, True) == (-1, 0) and code_range(1, False) == (0, 1)
    assert code_range(8, True) == (-128, 127) and code_range(4, False) == (0, 15)


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"signed 2-bit codes must be in \[-2, 1\]"):
        pack(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"unsigned 4-bit codes must be in \[0, 15\]"):
        pack(torch.tensor([-1, 3]), 4, signed=False)
    with pytest.raises(ValueError, match="bits must be an int in 1..8, got 9"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="bits must be an int in 1..8, got 0"):
        unpack(torch.tensor([1], dtype=torch.uint8), 0, 1)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.tensor([1]), 4, 2)
    with pytest.raises(ValueError, match="need 2 packed bytes, got 1"):
        unpack(torch.tensor([1], dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match="binary codes"):
        pack_binary(torch.tensor([1, 0, -1]))
    with pytest.raises(ValueError, match="ternary codes"):
        pack_ternary(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="not ternary"):
        unpack_ternary(torch.tensor([0b10], dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="numel"):
        packed_size(-1, 2)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_widths_match_numpy_bit_stream(bits: int) -> None:
    # independent reference: numpy's packbits over the little-endian bit matrix
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001)
    bit_matrix = (codes[:, None] >> np.arange(bits)) & 1
    expected = np.packbits(bit_matrix.reshape(-1).astype(np.uint8), bitorder="little")
    packed = pack(torch.from_numpy(codes), bits, signed=False)
    assert packed.numpy().tolist() == expected.tolist()
    assert (
        unpack(packed, bits, codes.size, signed=False, dtype=torch.int64).tolist() == codes.tolist()
    )
