"""Quantization parameters and the one ``block_size`` idea under granularity.

Every granularity reduces to a ``block_size``: the shape of the block of
elements that share one scale (and zero point), as in torchao.

- ``'tensor'``: ``block_size == x.shape``;
- ``'channel'`` along ``axis``: ``1`` at ``axis``, the full size elsewhere;
- ``('group', n)`` along ``axis``: ``n`` at ``axis``, ``1`` elsewhere.

``axis=None`` is the weight convention (:func:`default_axis`): a channel is
an index of axis 0 (a weight's output axis) and a group runs along axis 1
(the input, reduction, axis of an ``(out, in, ...)`` weight, as in torchao,
GPTQ and optimum-quanto), axis 0 of a 1-d tensor.

Scales are stored in the *qparam shape* ``x.shape[d] // block_size[d]`` and
broadcast back through :func:`expand`, which views ``x`` as
``(n_0, b_0, n_1, b_1, ...)`` (no copies).

Examples
--------
>>> block_size((4, 6), ("group", 3), axis=1)
(1, 3)
>>> qparam_shape((4, 6), (1, 3))
(4, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from tnquant.specs import Granularity, normalize_granularity

__all__ = [
    "QParams",
    "all_finite",
    "block_size",
    "qparam_shape",
    "expand",
    "to_blocks",
    "normalize_axis",
    "default_axis",
]


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or Inf: one fused min/max pass, no temporaries.

    NaN propagates through ``aminmax`` and an Inf is its own min or max, so
    checking the two results is enough (about 4x cheaper than
    ``torch.isfinite(x).all()``). An empty tensor is finite.

    Examples
    --------
    >>> all_finite(torch.tensor([1.0, float("inf")]))
    False
    """
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def normalize_axis(axis: int, ndim: int) -> int:
    """Return ``axis`` in ``0..ndim-1`` or raise a ``ValueError``.

    Examples
    --------
    >>> normalize_axis(-1, 3)
    2
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got {axis}")
    return axis % ndim


def default_axis(granularity: Granularity, ndim: int) -> int:
    """The axis ``axis=None`` means: 0 for ``'channel'``, 1 for a group (0 on a 1-d tensor).

    tnquant's weights are seen as ``(out, in, ...)`` (Hugging Face's
    ``Conv1D`` through its transposed view), so per channel is per output
    channel and a group runs along the input (reduction) axis: a Linear's
    ``in``, a convolution's input channels, an embedding row's ``dim``.

    Examples
    --------
    >>> default_axis(("group", 32), 2), default_axis("channel", 4), default_axis(("group", 4), 1)
    (1, 0, 0)
    """
    if isinstance(granularity, tuple) and ndim >= 2:
        return 1
    return 0


def block_size(
    shape: tuple[int, ...], granularity: Granularity, axis: int | None = None
) -> tuple[int, ...]:
    """The block of elements sharing one scale, for a tensor of ``shape``.

    ``axis=None`` is :func:`default_axis`. Raises ``ValueError`` for an axis
    out of range or a group size that does not divide the axis.

    Examples
    --------
    >>> block_size((8, 16), "channel", axis=0)
    (1, 16)
    >>> block_size((8, 16), "tensor")
    (8, 16)
    >>> block_size((8, 64), ("group", 32))  # along the input axis
    (1, 32)
    """
    shape = tuple(int(s) for s in shape)
    granularity = normalize_granularity(granularity)
    if granularity == "tensor":
        return shape
    if not shape:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one axis")
    if axis is None:
        axis = default_axis(granularity, len(shape))
    ax = normalize_axis(axis, len(shape))
    if granularity == "channel":
        return tuple(1 if d == ax else s for d, s in enumerate(shape))
    size = int(granularity[1])
    if shape[ax] % size:
        raise ValueError(
            f"group size {size} does not divide axis {ax} of size {shape[ax]} (shape {shape})"
        )
    return tuple(size if d == ax else 1 for d in range(len(shape)))


def qparam_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale tensor: ``shape[d] // block[d]``."""
    if len(shape) != len(block):
        raise ValueError(f"block_size {block} does not match shape {shape}")
    out = []
    for s, b in zip(shape, block, strict=True):
        if b < 1 or s % b:
            raise ValueError(f"block_size {block} does not tile shape {shape}")
        out.append(s // b)
    return tuple(out)


def _interleaved(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    dims: list[int] = []
    for s, b in zip(shape, block, strict=True):
        dims += [s // b, b]
    return tuple(dims)


def expand(q: Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> Tensor:
    """Broadcast a qparam-shaped tensor to a view that multiplies ``x``.

    The result has shape ``(n_0, 1, n_1, 1, ...)``; use it against
    ``x.reshape(n_0, b_0, n_1, b_1, ...)`` (see :func:`to_blocks`), or call
    ``expand_like`` semantics via ``(x_blocks * e).reshape(shape)``.
    """
    dims: list[int] = []
    for s, b in zip(shape, block, strict=True):
        dims += [s // b, 1]
    return q.reshape(dims)


def to_blocks(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """View ``x`` as ``(n_0, b_0, n_1, b_1, ...)`` for block-wise arithmetic."""
    return x.reshape(_interleaved(tuple(x.shape), block))


def block_reduce_dims(ndim: int) -> tuple[int, ...]:
    """The dims of :func:`to_blocks`' view to reduce over within a block."""
    return tuple(2 * d + 1 for d in range(ndim))


@dataclass(frozen=True)
class QParams:
    """Everything needed to dequantize codes: ``(codes - zero_point) * scale``.

    Attributes
    ----------
    scale
        Positive float tensor of the qparam shape (the step of one code).
        For ``Ternary(method='ttq')`` the positive-side scale.
    zero_point
        Integer-valued tensor of the qparam shape, or ``None`` (symmetric).
    qmin, qmax
        The code range.
    block_size
        See the module docs.
    shape
        Shape of the quantized tensor.
    dtype
        Dtype of the dequantized tensor (the original float dtype).
    scale_neg
        Negative-side scale of a TTQ ternary tensor, else ``None``.
    cast_dtype
        For float-format specs: the dtype codes are stored in; ``scale`` is
        then all ones.
    codebook
        For :class:`~tnquant.specs.Codebook` specs: the table the codes index
        (``(K,)``, or the qparam shape plus ``(K,)``); values are then
        ``codebook[codes] * scale``.
    """

    scale: Tensor
    zero_point: Tensor | None
    qmin: int
    qmax: int
    block_size: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale_neg: Tensor | None = None
    cast_dtype: torch.dtype | None = None
    codebook: Tensor | None = None

    def replace(self, **changes: Any) -> QParams:
        return replace(self, **changes)

    def expanded_scale(self) -> Tensor:
        """``scale`` broadcast view against ``to_blocks(x, block_size)``."""
        return expand(self.scale, self.shape, self.block_size)

    def expanded_zero_point(self) -> Tensor | None:
        if self.zero_point is None:
            return None
        return expand(self.zero_point, self.shape, self.block_size)
