"""Weight-only int8 / int4 matmuls on torch's packed CPU kernels, from tnquant's codes.

Two ATen kernels compute ``y = x @ W^T`` from integer weights:

- ``torch.ops.aten._weight_int8pack_mm(x, w, scales)``: ``w`` int8 ``(N, K)``,
  ``scales`` ``(N,)`` in ``x``'s dtype; ``y[m, n] = (sum_k x[m, k] w[n, k]) * s[n]``;
- ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros)``:
  ``packed`` from ``_convert_weight_to_int4pack_for_cpu(q, 1)`` of unsigned
  nibbles ``q`` in ``[0, 15]`` (int32 ``(N, K)``), group size ``G`` in 32, 64,
  128, 256 along ``K``, ``scales_and_zeros`` ``(K // G, N, 2)`` in ``x``'s dtype;
  the weight it stands for is ``(q - 8) * scale + zero``.

The mapping from tnquant's symmetric codes ``c`` (``W = c * scale``) is exact:
int8 takes ``c`` itself and the scale per output row (any scale constant
along ``K``: per tensor, per output channel); int4 takes ``q = c + 8`` (codes in
``[-8, 7]``), ``zero = 0`` and the scale of the group, so ``(q - 8) * s + 0 =
c * s`` bit for bit. Per-channel (or per-tensor) 4-bit scales become groups of
the largest ``G`` dividing ``K``; a per-group scale of block ``b`` along ``K``
needs ``G`` dividing ``b``.

What is **not** exact is the product: the kernels accumulate
``sum_k x c`` and multiply by the scale after (int8), or accumulate in their
own tile order, so results differ from ``F.linear(x, c * s)`` in the last bits;
and they are only vectorised for bfloat16 inputs on this torch build (float32
runs a scalar loop, about 11x slower than float on the LowRank layer of
``BENCHMARKS.md``), so the fast path rounds the activations and scales to
bfloat16 (``compute_dtype``), a relative error of about ``2**-8`` per element.

The weight-only kernels win where the matmul is memory-bound (few rows); from
:data:`DENSE_ROWS` rows up :func:`packed_linear` reads the weight back from the
same bytes (:func:`dequantize_operands`: int8 codes as they are, int4 from
torch's 64-row nibble interleave, which is checked byte for byte against
torch's own packing when the operands are built) and runs one ``F.linear`` in
the compute dtype.

Examples
--------
>>> import torch
>>> codes = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
>>> scale = torch.rand(64, 1) + 0.5
>>> ops = int4pack_operands(codes, scale, torch.float32)
>>> ops.kind, ops.group
('int4', 128)
>>> x = torch.randn(3, 128)
>>> bool(torch.allclose(packed_linear(x, ops), x @ (codes * scale).T, rtol=1e-4, atol=1e-3))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GROUPS",
    "PackedOperands",
    "available",
    "DENSE_ROWS",
    "dequantize_operands",
    "int4_group",
    "int4pack_operands",
    "int8pack_operands",
    "packed_linear",
]

#: group sizes ``_weight_int4pack_mm_for_cpu`` takes, largest first
GROUPS = (256, 128, 64, 32)


def available() -> dict[str, bool]:
    """Which packed kernels this torch build has.

    Examples
    --------
    >>> sorted(available())
    ['int4', 'int8']
    """
    ops = torch.ops.aten
    return {
        "int8": hasattr(ops, "_weight_int8pack_mm"),
        "int4": hasattr(ops, "_weight_int4pack_mm_for_cpu")
        and hasattr(ops, "_convert_weight_to_int4pack_for_cpu"),
    }


@dataclass(frozen=True)
class PackedOperands:
    """The kernel operands of one ``(N, K)`` weight (see the module docs).

    Attributes
    ----------
    kind
        ``'int8'`` or ``'int4'``.
    weight
        int8 ``(N, K)`` codes, or the uint8 int4pack layout.
    scales
        ``(N,)`` (int8) or ``(K // group, N, 2)`` scales and zeros (int4), in
        ``compute_dtype``.
    group
        int4 group size along ``K`` (0 for int8).
    shape
        ``(N, K)``.
    unpackable
        Whether :func:`dequantize_operands` can read the weight back (int8
        always; int4 when the kernel's layout is the known 64-row interleave,
        checked byte for byte against torch's packing when built).
    """

    kind: str
    weight: Tensor
    scales: Tensor
    group: int
    shape: tuple[int, int]
    unpackable: bool = True

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the kernel runs in (the scales' dtype)."""
        return self.scales.dtype

    def nbits(self) -> int:
        """Bits the operands hold (codes at 8 or 4 bits each, plus the scales).

        Examples
        --------
        >>> ops = int8pack_operands(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1))
        >>> ops.nbits()  # 32 int8 codes + 4 float32 scales
        384
        """
        n, k = self.shape
        codes = n * k * (8 if self.kind == "int8" else 4)
        return codes + self.scales.numel() * self.scales.element_size() * 8


def _check(codes: Tensor, scale: Tensor, lo: int, hi: int) -> tuple[int, int]:
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a 2-d (N, K) integer tensor, got {got}")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.device.type != "cpu":
        raise ValueError(f"the packed kernels are CPU kernels; codes are on {codes.device}")
    n, k = codes.shape
    if (
        not isinstance(scale, Tensor)
        or scale.dim() != 2
        or n % scale.shape[0]
        or k % scale.shape[1]
    ):
        got = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"scale must be a 2-d block grid of the ({n}, {k}) codes, got {got}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(
            f"codes must be in [{lo}, {hi}], got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    return n, k


def int8pack_operands(
    codes: Tensor, scale: Tensor, compute_dtype: torch.dtype = torch.float32
) -> PackedOperands:
    """Operands of ``_weight_int8pack_mm`` for ``W = codes * scale``.

    Parameters
    ----------
    codes
        Integer ``(N, K)`` codes in ``[-128, 127]``.
    scale
        ``(N, 1)`` or ``(1, 1)``: one scale per output row (constant along ``K``).
    compute_dtype
        The dtype of the scales and the matmul (the activations are cast to it).

    Examples
    --------
    >>> ops = int8pack_operands(torch.tensor([[1, -2], [3, 4]]), torch.tensor([[0.5], [2.0]]))
    >>> ops.weight.dtype, ops.scales.tolist()
    (torch.int8, [0.5, 2.0])
    """
    n, k = _check(codes, scale, -128, 127)
    if scale.shape[1] != 1:
        raise ValueError(
            f"int8pack needs one scale per output row (constant along K), got a scale "
            f"grid of shape {tuple(scale.shape)} for ({n}, {k}) codes"
        )
    w = codes.to(torch.int8).contiguous()
    s = scale.to(compute_dtype).repeat_interleave(n // scale.shape[0], dim=0).reshape(n)
    return PackedOperands("int8", w, s, 0, (n, k))


def int4_group(k: int, block: int) -> int | None:
    """The int4pack group size for ``K = k`` and a scale block of ``block`` along ``K``.

    The largest of :data:`GROUPS` dividing both (every kernel group inside one
    scale block), or ``None``.

    Examples
    --------
    >>> int4_group(384, 384), int4_group(384, 64), int4_group(48, 48)
    (128, 64, None)
    """
    return next((g for g in GROUPS if k % g == 0 and block % g == 0), None)


def int4pack_operands(
    codes: Tensor, scale: Tensor, compute_dtype: torch.dtype = torch.float32
) -> PackedOperands:
    """Operands of ``_weight_int4pack_mm_for_cpu`` for ``W = codes * scale``.

    Parameters
    ----------
    codes
        Integer ``(N, K)`` codes in ``[-8, 7]``.
    scale
        ``(N or 1, K // block)``: a scale grid constant within blocks of
        ``block`` along ``K`` (one block: per channel / per tensor).
    compute_dtype
        The dtype of the scales and the matmul.

    Raises
    ------
    ValueError
        When no kernel group size fits (:func:`int4_group` is ``None``) or ``N``
        is not a multiple of 16 (the kernel's packing tile).

    Examples
    --------
    >>> codes = torch.randint(-8, 8, (32, 64))
    >>> ops = int4pack_operands(codes, torch.full((32, 2), 0.1))
    >>> ops.group, tuple(ops.scales.shape), tuple(ops.weight.shape)
    (32, (2, 32, 2), (32, 32))
    """
    n, k = _check(codes, scale, -8, 7)
    block = k // scale.shape[1]
    group = int4_group(k, block)
    if group is None:
        raise ValueError(
            f"int4pack needs K and the scale block along K divisible by one of {GROUPS}, "
            f"got K={k}, block={block}"
        )
    if n % 16:
        raise ValueError(f"int4pack needs N (output rows) divisible by 16, got N={n}")
    q = (codes.to(torch.int32) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    known = n % 64 == 0 and torch.equal(_interleave64(q), packed)
    s = scale.to(compute_dtype).repeat_interleave(n // scale.shape[0], dim=0)
    s = s.repeat_interleave(block // group, dim=1)  # (N, K // group)
    sz = torch.stack((s.t(), torch.zeros_like(s.t())), dim=-1).contiguous()
    return PackedOperands("int4", packed, sz, group, (n, k), known)


def _interleave64(q: Tensor) -> Tensor:
    """The int4pack CPU layout of AVX-512 builds for ``N % 64 == 0``: bytes ``(N/64, K, 32)``,
    byte ``[b, k, j]`` = ``q[64b + j, k] | q[64b + 32 + j, k] << 4``."""
    n, k = q.shape
    blocks = q.reshape(n // 64, 2, 32, k).to(torch.uint8)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).permute(0, 2, 1).reshape(n, k // 2)


def dequantize_operands(ops: PackedOperands) -> Tensor:
    """The ``(N, K)`` weight of ``ops`` in its compute dtype: ``codes * scale`` rounded once.

    Examples
    --------
    >>> codes = torch.randint(-8, 8, (64, 64))
    >>> scale = torch.rand(64, 1)
    >>> ops = int4pack_operands(codes, scale)
    >>> torch.equal(dequantize_operands(ops), codes * scale)
    True
    """
    n, k = ops.shape
    dtype = ops.compute_dtype
    if ops.kind == "int8":
        return ops.weight.to(dtype) * ops.scales[:, None]
    if not ops.unpackable:
        raise ValueError("this int4pack layout is not the known interleave; it cannot be read back")
    b = ops.weight.reshape(n // 64, k, 32)
    q = torch.stack((b & 15, b >> 4), dim=1).permute(0, 1, 3, 2).reshape(n, k)
    c = q.view(torch.int8) - 8
    s = ops.scales[..., 0].t()  # (N, K // group)
    return (c.reshape(n, -1, ops.group).to(dtype) * s[:, :, None]).reshape(n, k)


#: from this many rows up, :func:`packed_linear` multiplies by the weight read back in the
#: compute dtype (a GEMM, compute-bound) instead of the weight-only kernel (memory-bound);
#: the crossovers measured for a 1536 x 384 weight, bf16, one thread (BENCHMARKS.md)
DENSE_ROWS = {"int8": 32, "int4": 128}


def packed_linear(x: Tensor, ops: PackedOperands, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` on the packed kernel, in ``ops.compute_dtype``, returned in ``x``'s.

    From :data:`DENSE_ROWS` rows up (compute-bound sizes), the weight is read
    back (:func:`dequantize_operands`) and multiplied by ``F.linear`` in the
    compute dtype: the same codes and scales, a GEMM the weight-only kernels
    are slower at.

    Examples
    --------
    >>> ops = int8pack_operands(torch.tensor([[1, -2], [3, 4]]), torch.tensor([[0.5], [2.0]]))
    >>> packed_linear(torch.tensor([[1.0, 1.0]]), ops, torch.tensor([0.0, 1.0])).tolist()
    [[-0.5, 15.0]]
    """
    n, k = ops.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features in its last dim, got {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(ops.compute_dtype).contiguous()
    if x2.shape[0] >= DENSE_ROWS[ops.kind] and ops.unpackable:
        y = torch.nn.functional.linear(x2, dequantize_operands(ops))
    elif ops.kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, ops.weight, ops.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, ops.weight, ops.group, ops.scales)
    y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias) if y.dtype == bias.dtype else y + bias
    return y.reshape(*lead, n)
