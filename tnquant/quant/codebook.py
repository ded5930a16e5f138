"""Codebook quantization: absmax block scales, nearest-entry indices, k-means tables.

The pure functions under :class:`~tnquant.specs.Codebook` (the handler in
:mod:`tnquant.quant.handlers` calls them):

- :func:`codebook_qparams` chooses the qparams of a tensor: the absmax
  ``scale`` of every block (rounded to ``spec.scale_dtype``; 0 for an
  all-zero block) and the ``codebook`` (the published table, or k-means
  centroids of the normalized weights, :func:`kmeans_codebook`);
- :func:`codebook_codes` gives the indices of the nearest entries
  (ties go to the lower entry);
- :func:`codebook_dequantize` gives ``codebook[index] * scale``;
- :func:`codebook_fake_quantize` gives the same value with a straight-through
  gradient to ``x`` and the true gradients to the codebook and scales.

Layout: blocks are rows (:func:`to_rows`): ``(n_blocks, block_numel)``. The
codebook is ``(K,)`` (``centroids='tensor'``) or the qparam shape plus
``(K,)`` (``'block'``), in the compute dtype of the tensor.

Examples
--------
>>> import torch
>>> from tnquant.specs import Codebook
>>> x = torch.tensor([[0.9, -0.2, 0.05, -1.8]])
>>> qp = codebook_qparams(x, Codebook(granularity="tensor", scale_dtype="float32"))
>>> codes = codebook_codes(x, qp)
>>> codes.tolist()
[[12, 6, 7, 0]]
>>> codebook_dequantize(codes, qp).tolist()  # NF4 values times absmax 1.8
[[0.7932776808738708, -0.1638900637626648, 0.0, -1.7999999523162842]]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tnquant.quant.qparams import QParams, block_size, expand, qparam_shape, to_blocks
from tnquant.quant.ranges import code_dtype, compute_dtype
from tnquant.specs.codebook import Codebook

__all__ = [
    "codebook_shape",
    "codebook_qparams",
    "codebook_codes",
    "codebook_dequantize",
    "codebook_fake_quantize",
    "kmeans_codebook",
    "to_rows",
    "from_rows",
    "scale_torch_dtype",
    "column_rounder",
]

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scale_torch_dtype(spec: Codebook) -> torch.dtype:
    """The torch dtype block scales are stored in.

    Examples
    --------
    >>> scale_torch_dtype(Codebook())
    torch.float16
    """
    return _SCALE_DTYPES[spec.scale_dtype]


def codebook_shape(spec: Codebook, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the codebook of a tensor of ``shape``: ``(K,)`` or qparam shape + ``(K,)``.

    Examples
    --------
    >>> codebook_shape(Codebook(centroids="block", granularity=("group", 4)), (2, 8))
    (2, 2, 16)
    """
    if spec.centroids == "tensor":
        return (spec.entries,)
    block = block_size(shape, spec.granularity, spec.axis)
    return qparam_shape(shape, block) + (spec.entries,)


def _perm(ndim: int) -> list[int]:
    return list(range(0, 2 * ndim, 2)) + list(range(1, 2 * ndim, 2))


def to_rows(x: Tensor, block: tuple[int, ...]) -> Tensor:
    """``x`` as ``(n_blocks, block_numel)``, blocks in qparam row-major order.

    Examples
    --------
    >>> to_rows(torch.arange(8).reshape(2, 4), (1, 2)).tolist()
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    """
    if x.dim() == 0:
        return x.reshape(1, 1)
    return to_blocks(x, block).permute(_perm(x.dim())).reshape(-1, math.prod(block))


def from_rows(rows: Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_rows`.

    Examples
    --------
    >>> x = torch.arange(8).reshape(2, 4)
    >>> torch.equal(from_rows(to_rows(x, (2, 2)), (2, 4), (2, 2)), x)
    True
    """
    if not shape:
        return rows.reshape(())
    nb = [s // b for s, b in zip(shape, block, strict=True)]
    inv = [0] * (2 * len(shape))
    for i, p in enumerate(_perm(len(shape))):
        inv[p] = i
    return rows.reshape(*nb, *block).permute(inv).reshape(shape)


def _normalized(rows: Tensor, scale_rows: Tensor) -> Tensor:
    """``rows / scale`` per row, 0 where the scale is 0 (an all-zero block)."""
    safe = torch.where(scale_rows > 0, scale_rows, torch.ones_like(scale_rows))
    return torch.where(scale_rows > 0, rows / safe, torch.zeros_like(rows))


def _nearest(xn: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest entry of ``codebook`` ((K,) or (rows, K)) to each of ``xn``.

    Through the midpoints of the sorted entries: a value on a midpoint goes to
    the lower entry (as ``argmin`` of the distances picks the first).
    """
    values, order = codebook.sort(dim=-1, stable=True)
    mids = (values[..., 1:] + values[..., :-1]) / 2
    if codebook.dim() == 1:
        return order[torch.searchsorted(mids, xn.contiguous())]
    pos = torch.searchsorted(mids.contiguous(), xn.contiguous())
    return order.gather(-1, pos)


def _rows_of(qp: QParams, n_rows: int, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """The scale as ``(rows, 1)`` and the codebook as ``(K,)`` or ``(rows, K)``."""
    if qp.codebook is None:
        raise ValueError("codebook qparams need a codebook tensor")
    cb = qp.codebook.to(cd)
    if cb.dim() > 1:
        cb = cb.reshape(n_rows, -1)
    return qp.scale.to(cd).reshape(n_rows, 1), cb


def _absmax_scale(x: Tensor, spec: Codebook, block: tuple[int, ...]) -> Tensor:
    rows = to_rows(x.detach().to(compute_dtype(x.dtype)), block)
    amax = rows.abs().amax(dim=1)
    sdt = scale_torch_dtype(spec)
    amax = amax.clamp_max(torch.finfo(sdt).max).to(sdt).to(rows.dtype)
    return amax.reshape(qparam_shape(tuple(x.shape), block))


def kmeans_codebook(xn: Tensor, entries: int, iters: int, weights: Tensor | None = None) -> Tensor:
    """Lloyd's k-means on each row of ``xn`` (``(rows, n)``): ``(rows, entries)`` centroids.

    Starts from the quantiles ``(k + 0.5) / entries`` of each row; ``weights``
    (same shape, >= 0) weight every value's squared error. In one dimension a
    cluster is an interval between midpoints of sorted centroids, so each
    iteration is a ``searchsorted`` into the once-sorted row and differences
    of prefix sums (float64). An empty cluster keeps its centroid;
    deterministic; the result is sorted ascending.

    Examples
    --------
    >>> xn = torch.tensor([[-1.0, -0.9, 0.1, 0.2, 0.9, 1.0]])
    >>> [round(v, 3) for v in kmeans_codebook(xn, 3, 10)[0].tolist()]
    [-0.95, 0.15, 0.95]
    """
    rows, n = xn.shape
    srt, order = xn.sort(dim=1)
    pick = ((torch.arange(entries, device=xn.device) + 0.5) * n / entries).long().clamp_max(n - 1)
    c = srt[:, pick].to(torch.float64)
    w = torch.ones_like(srt) if weights is None else weights.gather(1, order).to(srt.dtype)
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=xn.device)
    cw = torch.cat((zero, w.to(torch.float64).cumsum(1)), dim=1)
    cwx = torch.cat((zero, (w.to(torch.float64) * srt.to(torch.float64)).cumsum(1)), dim=1)
    srt64 = srt.to(torch.float64).contiguous()
    ends = torch.full((rows, 1), n, dtype=torch.int64, device=xn.device)
    for _ in range(iters):
        mids = (c[:, 1:] + c[:, :-1]) / 2
        cut = torch.searchsorted(srt64, mids.contiguous(), right=True)
        bounds = torch.cat((torch.zeros_like(ends), cut, ends), dim=1)
        mass = cw.gather(1, bounds[:, 1:]) - cw.gather(1, bounds[:, :-1])
        sums = cwx.gather(1, bounds[:, 1:]) - cwx.gather(1, bounds[:, :-1])
        new = torch.where(mass > 0, sums / mass.clamp_min(1e-300), c).sort(dim=1).values
        if torch.equal(new, c):
            break
        c = new
    return c.to(xn.dtype)


def codebook_qparams(x: Tensor, spec: Codebook, weights: Tensor | None = None) -> QParams:
    """Absmax scales and the codebook of ``x`` under ``spec``.

    ``weights`` (``x``'s shape, >= 0): the importance of every element in
    the k-means objective ``sum w * s^2 * (x/s - c)^2`` (e.g. the diagonal of
    the input Gram matrix broadcast over the rows of a Linear weight);
    ignored by the published tables.

    Examples
    --------
    >>> qp = codebook_qparams(torch.randn(4, 64), Codebook(kind="kmeans", bits=2))
    >>> qp.scale.shape, qp.codebook.shape, qp.qmax
    (torch.Size([4, 1]), torch.Size([4]), 3)
    """
    shape = tuple(x.shape)
    cd = compute_dtype(x.dtype)
    block = block_size(shape, spec.granularity, spec.axis)
    scale = _absmax_scale(x, spec, block)
    if spec.table is not None:
        table = torch.tensor(spec.table, dtype=cd, device=x.device)
        cb = table.expand(codebook_shape(spec, shape)).clone()
    else:
        rows = to_rows(x.detach().to(cd), block)
        s_rows = scale.reshape(-1, 1)
        xn = _normalized(rows, s_rows)
        w = None
        if weights is not None:
            w = to_rows(weights.detach().to(cd), block) * s_rows.square()
        if spec.centroids == "tensor":
            xn = xn.reshape(1, -1)
            w = None if w is None else w.reshape(1, -1)
        cb = kmeans_codebook(xn, spec.entries, spec.iters, w).reshape(codebook_shape(spec, shape))
    return QParams(scale, None, 0, spec.qmax, block, shape, x.dtype, codebook=cb)


def codebook_codes(x: Tensor, qp: QParams) -> Tensor:
    """Indices of the nearest codebook entries to ``x / scale``, in ``x``'s shape.

    Examples
    --------
    >>> qp = codebook_qparams(torch.tensor([0.5, -1.0]), Codebook(granularity="tensor"))
    >>> codebook_codes(torch.tensor([0.5, -1.0]), qp).tolist()
    [12, 0]
    """
    cd = torch.promote_types(compute_dtype(x.dtype), qp.scale.dtype)
    rows = to_rows(x.detach().to(cd), qp.block_size)
    s, cb = _rows_of(qp, rows.shape[0], cd)
    idx = _nearest(_normalized(rows, s), cb)
    return from_rows(idx, qp.shape, qp.block_size).to(code_dtype(qp.qmin, qp.qmax))


def _values(idx: Tensor, s: Tensor, cb: Tensor) -> Tensor:
    entries = cb[idx] if cb.dim() == 1 else cb.gather(1, idx)
    return entries * s


def codebook_dequantize(codes: Tensor, qp: QParams) -> Tensor:
    """``codebook[codes] * scale`` per block, in ``qp.dtype``.

    Examples
    --------
    >>> x = torch.tensor([0.5, -1.0])
    >>> qp = codebook_qparams(x, Codebook(granularity="tensor"))
    >>> codebook_dequantize(codebook_codes(x, qp), qp).tolist()
    [0.44070982933044434, -1.0]
    """
    cd = torch.promote_types(compute_dtype(qp.dtype), qp.scale.dtype)
    idx = to_rows(codes.to(torch.int64), qp.block_size)
    s, cb = _rows_of(qp, idx.shape[0], cd)
    return from_rows(_values(idx, s, cb), qp.shape, qp.block_size).to(qp.dtype)


def codebook_fake_quantize(x: Tensor, qp: QParams) -> Tensor:
    """The value of ``codebook_dequantize(codebook_codes(x))``, differentiable.

    Gradients: identity (straight-through) to ``x``; to ``qp.codebook`` and
    ``qp.scale`` when they require grad, the gradients of
    ``codebook[index] * scale`` (the index held fixed).

    Examples
    --------
    >>> x = torch.tensor([0.5, -1.0], requires_grad=True)
    >>> y = codebook_fake_quantize(x, codebook_qparams(x, Codebook(granularity="tensor")))
    >>> y.sum().backward(); x.grad.tolist()
    [1.0, 1.0]
    """
    cd = torch.promote_types(compute_dtype(x.dtype), qp.scale.dtype)
    rows = to_rows(x.to(cd), qp.block_size)
    s, cb = _rows_of(qp, rows.shape[0], cd)
    with torch.no_grad():
        idx = _nearest(_normalized(rows.detach(), s.detach()), cb.detach())
    out = _values(idx, s, cb) + (rows - rows.detach())
    return from_rows(out, qp.shape, qp.block_size).to(x.dtype)


def column_rounder(qp: QParams) -> Callable[[Tensor, int], Tensor]:
    """Nearest-entry rounding of one column of an ``(out, in)`` matrix (for GPTQ), in float64.

    ``round(col, j)`` gives ``codebook[index] * scale`` for column ``j`` under
    the block scales and codebook(s) of ``qp``.

    Examples
    --------
    >>> w = torch.tensor([[0.5, -1.0], [0.2, 0.1]])
    >>> qp = codebook_qparams(w, Codebook(granularity="channel", scale_dtype="float32"))
    >>> rnd = column_rounder(qp)
    >>> torch.allclose(torch.stack([rnd(w[:, j].double(), j) for j in range(2)], 1).float(),
    ...                codebook_dequantize(codebook_codes(w, qp), qp))
    True
    """
    if qp.codebook is None or len(qp.shape) != 2:
        raise ValueError("column_rounder needs the codebook qparams of a 2-d weight")
    shape, block = qp.shape, qp.block_size
    dt = torch.float64
    full = to_blocks(torch.ones(shape, dtype=dt, device=qp.scale.device), block)
    scale = (full * expand(qp.scale.to(dt), shape, block)).reshape(shape)
    cb = qp.codebook.to(dt)
    ids = None
    if cb.dim() > 1:
        nb = math.prod(qparam_shape(shape, block))
        ids_q = torch.arange(nb, dtype=dt, device=cb.device).reshape(qparam_shape(shape, block))
        ids = (full * expand(ids_q, shape, block)).reshape(shape).long()
        cb = cb.reshape(nb, -1)

    def round_column(col: Tensor, j: int) -> Tensor:
        s = scale[:, j]
        xn = _normalized(col.to(dt), s)
        if ids is None:
            return cb[_nearest(xn, cb)] * s
        c = cb[ids[:, j]]
        return c.gather(1, _nearest(xn[:, None], c))[:, 0] * s

    return round_column
