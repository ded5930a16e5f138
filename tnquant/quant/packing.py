"""Pack low-bit integer codes into bytes, and back, losslessly.

Layout: the codes are flattened (row-major) and written as one **little-endian
bit stream**: code ``j`` occupies stream bits ``j*bits .. (j+1)*bits - 1``,
least significant bit first, and stream bit ``t`` is bit ``t % 8`` of byte
``t // 8``. For ``bits`` in 1, 2, 4 that is ``8 // bits`` codes per byte,
element 0 in the least significant bits; 8 is a plain byte copy; 3, 5, 6
and 7 bits straddle bytes (8 codes of 3 bits fill exactly 3 bytes). A
signed code is stored as its ``bits``-bit two's complement (``-1`` in 2 bits
is ``0b11``). The stream is padded with zero bits to a whole byte; a tensor
of ``n`` codes packs to ``ceil(n * bits / 8)`` bytes. ``bits`` is 1..8.

Binary codes ``{-1, +1}`` pack to one bit each, ``+1 -> 1`` and ``-1 -> 0``
(:func:`pack_binary`); ternary codes ``{-1, 0, 1}`` to two bits each, as
signed 2-bit integers (``0b10`` is never written; :func:`unpack_ternary`
rejects it).

Examples
--------
>>> import torch
>>> packed = pack(torch.tensor([1, -1, 0, -2, 1]), bits=2, signed=True)
>>> packed                      # 0b10_00_11_01, then 0b01
tensor([141,   1], dtype=torch.uint8)
>>> unpack(packed, bits=2, numel=5, signed=True)
tensor([ 1, -1,  0, -2,  1], dtype=torch.int8)
>>> pack(torch.tensor([1, 2, 3]), bits=3, signed=False)   # 0b11_010_001, then 0b0
tensor([209,   0], dtype=torch.uint8)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "code_range",
    "packed_size",
    "pack",
    "unpack",
    "pack_binary",
    "unpack_binary",
    "pack_ternary",
    "unpack_ternary",
]

_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return bits


def _check_int(codes: Any, name: str = "codes") -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {codes.dtype}")
    return codes


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The codes a ``bits``-bit field holds: ``[-(2**(b-1)), 2**(b-1) - 1]`` or ``[0, 2**b - 1]``.

    Examples
    --------
    >>> code_range(2, signed=True), code_range(4, signed=False)
    ((-2, 1), (0, 15))
    """
    _check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_size(numel: int, bits: int) -> int:
    """Number of bytes ``numel`` codes of ``bits`` bits pack into: ``ceil(numel * bits / 8)``.

    Examples
    --------
    >>> packed_size(5, 2), packed_size(9, 1), packed_size(3, 8)
    (2, 2, 3)
    """
    _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    return (numel * bits + 7) // 8


def pack(codes: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Pack integer codes into a 1-D uint8 tensor, ``bits`` bits per code.

    Parameters
    ----------
    codes
        Integer tensor of any shape (flattened row-major), on any device.
    bits
        1..8.
    signed
        Codes are in ``[-(2**(bits-1)), 2**(bits-1) - 1]`` (stored in two's
        complement) or, unsigned, in ``[0, 2**bits - 1]``.

    Returns
    -------
    uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes (see the module
    docs for the bit order).

    Raises
    ------
    ValueError
        For codes outside the range of ``bits`` (and ``signed``).

    Examples
    --------
    >>> pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), bits=1, signed=False)
    tensor([13,  1], dtype=torch.uint8)
    >>> pack(torch.tensor([-8, 7, 3]), bits=4)
    tensor([120,   3], dtype=torch.uint8)
    """
    _check_bits(bits)
    _check_int(codes)
    lo, hi = code_range(bits, signed)
    flat = codes.reshape(-1)
    if flat.numel():
        cmin, cmax = int(flat.min()), int(flat.max())
        if cmin < lo or cmax > hi:
            kind = "signed" if signed else "unsigned"
            raise ValueError(
                f"{kind} {bits}-bit codes must be in [{lo}, {hi}], got values in [{cmin}, {cmax}]"
            )
    n = flat.numel()
    nbytes = packed_size(n, bits)
    u = flat.to(torch.int32) & ((1 << bits) - 1)
    if 8 % bits == 0:  # whole codes per byte: one shift-and-add per byte
        per = 8 // bits
        u = torch.cat([u, u.new_zeros(nbytes * per - n)]).reshape(nbytes, per)
        shifts = torch.arange(per, dtype=torch.int32, device=u.device) * bits
        return (u << shifts).sum(dim=1).to(torch.uint8)
    # codes straddle bytes: spell out the bit stream, then gather it 8 bits a byte
    lanes = torch.arange(bits, dtype=torch.int32, device=u.device)
    stream = ((u.reshape(-1, 1) >> lanes) & 1).reshape(-1).to(torch.uint8)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=u.device)
    return (stream.reshape(nbytes, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack(
    packed: Tensor, bits: int, numel: int, signed: bool = True, dtype: torch.dtype | None = None
) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes, as a 1-D tensor.

    Parameters
    ----------
    packed
        uint8 tensor of exactly ``ceil(numel * bits / 8)`` bytes (any shape;
        flattened).
    bits, signed
        As given to :func:`pack`.
    numel
        Number of codes to read back; reshape the result as needed.
    dtype
        Result dtype; default ``torch.int8`` for signed codes and
        ``torch.uint8`` for unsigned ones.

    Examples
    --------
    >>> unpack(torch.tensor([13, 1], dtype=torch.uint8), bits=1, numel=9, signed=False)
    tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8)
    """
    _check_bits(bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor, got {got}")
    expected = packed_size(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"{numel} codes of {bits} bits need {expected} packed bytes, got {packed.numel()}"
        )
    if dtype is None:
        dtype = torch.int8 if signed else torch.uint8
    flat = packed.reshape(-1)
    if bits == 8:
        u8 = flat
    elif 8 % bits == 0:  # whole codes per byte: shift and mask in uint8
        lanes = [(flat >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)]
        u8 = torch.stack(lanes, dim=-1).reshape(-1)[:numel]
    else:  # g bytes hold 8g/bits whole codes: one int64 word per g bytes, then shifts
        g = bits if bits % 2 else bits // 2
        pad = (-flat.numel()) % g
        grouped = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, g).to(torch.int64)
        word = grouped[:, 0].clone()
        for i in range(1, g):
            word |= grouped[:, i] << (8 * i)
        lanes = [(word >> (j * bits)) & ((1 << bits) - 1) for j in range(8 * g // bits)]
        u8 = torch.stack(lanes, dim=-1).reshape(-1)[:numel].to(torch.uint8)
    if signed:  # sign-extend in int8: (u ^ h) - h
        half = 1 << (bits - 1)
        s8 = u8.view(torch.int8)
        return (s8 if bits == 8 else (s8 ^ half) - half).to(dtype)
    return u8.to(dtype)


def pack_binary(codes: Tensor) -> Tensor:
    """Pack binary codes ``{-1, +1}`` one bit each (``+1 -> 1``, ``-1 -> 0``).

    Examples
    --------
    >>> pack_binary(torch.tensor([1, -1, 1, 1], dtype=torch.int8))
    tensor([13], dtype=torch.uint8)
    """
    _check_int(codes)
    if bool(((codes != 1) & (codes != -1)).any()):
        bad = codes[(codes != 1) & (codes != -1)].unique()[:5].tolist()
        raise ValueError(f"binary codes must be -1 or +1, got {bad}")
    return pack((codes > 0).to(torch.int8), 1, signed=False)


def unpack_binary(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_binary`: int8 codes in ``{-1, +1}``.

    Examples
    --------
    >>> unpack_binary(torch.tensor([13], dtype=torch.uint8), 4)
    tensor([ 1, -1,  1,  1], dtype=torch.int8)
    """
    bits = unpack(packed, 1, numel, signed=False, dtype=torch.int8)
    return bits * 2 - 1


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes ``{-1, 0, 1}`` two bits each (signed 2-bit integers).

    Examples
    --------
    >>> pack_ternary(torch.tensor([1, -1, 0, 1]))
    tensor([77], dtype=torch.uint8)
    """
    _check_int(codes)
    if codes.numel() and (int(codes.min()) < -1 or int(codes.max()) > 1):
        raise ValueError(
            f"ternary codes must be in {{-1, 0, 1}}, got values in "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    return pack(codes, 2, signed=True)


def unpack_ternary(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes in ``{-1, 0, 1}``.

    Raises ``ValueError`` if a field holds ``0b10`` (-2), which
    :func:`pack_ternary` never writes.

    Examples
    --------
    >>> unpack_ternary(torch.tensor([77], dtype=torch.uint8), 4)
    tensor([ 1, -1,  0,  1], dtype=torch.int8)
    """
    codes = unpack(packed, 2, numel, signed=True)
    if bool((codes == -2).any()):
        raise ValueError("packed ternary data holds the code -2 (0b10); it is not ternary")
    return codes
