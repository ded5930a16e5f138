"""Entry points: a weight and a spec in, a :class:`Decomposition` out.

One dispatch table (:data:`DECOMPOSERS`), per weight kind from spec type to handler:

==========  ========================  =====================  ==================  ============
spec        Linear ``(out, in)``       Conv2d ``(O,I,kh,kw)``  Conv1d ``(O,I,k)``   Embedding
==========  ========================  =====================  ==================  ============
``TT``      TT-SVD (+ ALS with gram)  refused (TypeError)    refused             TT-SVD
``Tucker``  Tucker-2 / tensorized     Tucker-2 on channels   Tucker-2 (channels) refused
``LowRank`` truncated SVD             SVD of ``(O,I*kh*kw)``  SVD of ``(O,I*k)``   truncated SVD
``CP``      refused (use LowRank)     CP-ALS (parafac)       refused             refused
==========  ========================  =====================  ==================  ============

A Hugging Face ``Conv1D`` (GPT-2) is a Linear whose weight is stored
``(in, out)``: its layers pass the ``(out, in)`` transpose to
:func:`decompose_linear`, so it takes the ``'linear'`` row, data-aware too.

Everything is computed in float64 (:func:`~tnquant.decompose.svd.work_dtype`)
on the weight's device; the cores come back in the weight's dtype and
device, and ``rel_error`` is measured on those returned cores.

Data-aware (``gram = X^T X`` of the layer's inputs, Linear only): the
output error ``||X (W - What)^T||_F`` is minimized instead of the weight
error: closed form for LowRank and Tucker ``order=1`` (whitened SVD), ALS
started from the plain decomposition for TT and tensorized Tucker (never
worse than it). With a gram, ``tol`` bounds ``out_rel_error`` rather than
``rel_error``; for TT and tensorized Tucker the weight tolerance behind the
ranks is halved until it does (each try is a full ALS run).

Examples
--------
>>> import torch
>>> from tnquant.specs import TT
>>> w = torch.randn(64, 48)
>>> dec = decompose_linear(w, TT(rank=4, order=2))
>>> dec.format, dec.ranks, dec.out_shape, dec.in_shape
('tt', (4,), (8, 8), (8, 6))
>>> dec.cores[0].dtype
torch.float32
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tnquant.decompose import shapes
from tnquant.decompose.cp import cp_conv
from tnquant.decompose.dense import ROWS as _ROWS
from tnquant.decompose.dense import dense_of, out_rel, rel_blocks
from tnquant.decompose.dense import rel as _rel
from tnquant.decompose.lowrank import lowrank_matrix
from tnquant.decompose.ranks import (
    cap_ranks,
    expand_rank,
    ratio_note,
    tt_n_params,
    tt_rank_caps,
    uniform_ranks_for_ratio,
)
from tnquant.decompose.result import Decomposition, Part
from tnquant.decompose.svd import work_dtype
from tnquant.decompose.tt import tensorize, tt_als, tt_svd, tt_sweep
from tnquant.decompose.tucker import (
    data_aware_gram,
    tucker_als,
    tucker_conv,
    tucker_matrix,
    tucker_tensorized,
)
from tnquant.specs import CP, TT, LowRank, Tucker

__all__ = [
    "decompose_linear",
    "decompose_conv",
    "decompose_embedding",
    "reconstruct",
    "DECOMPOSERS",
    "spec_types",
]

#: Times the weight tolerance is halved (tol with a gram, TT / tensorized
#: Tucker) before falling back to full rank.
TIGHTEN_STEPS = 10

Handler = Callable[[Tensor, Any, "Tensor | None"], Part]


# --------------------------------------------------------------------------- #
# Input checks
# --------------------------------------------------------------------------- #


def _check_tensor(x: Any, ndim: int, name: str, layout: str, convert: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != ndim or x.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty {ndim}-D tensor {layout}, got shape {tuple(x.shape)}"
        )
    bad = sum(int((~torch.isfinite(x[i : i + _ROWS])).sum()) for i in range(0, len(x), _ROWS))
    if bad:
        raise ValueError(f"{name} has {bad} non-finite value(s) (nan or inf); cannot decompose it")
    return x.detach().to(work_dtype(x.device)) if convert else x.detach()


def _check_spec(spec: Any, weight_kind: str) -> Handler:
    table, layer = DECOMPOSERS[weight_kind], _LAYER_NAMES[weight_kind]
    handler = table.get(type(spec))
    if handler is None:
        valid = ", ".join(t.__name__ for t in table)
        raise TypeError(
            f"spec must be one of {valid} for a{layer} weight, got {type(spec).__name__}"
        )
    return handler


def _check_gram(gram: Any, n: int, like: Tensor) -> Tensor:
    g = _check_tensor(gram, 2, "gram", f"(in, in) = ({n}, {n})")
    if tuple(g.shape) != (n, n):
        raise ValueError(f"gram must have shape (in, in) = ({n}, {n}), got {tuple(g.shape)}")
    g = g.to(device=like.device, dtype=like.dtype)
    return (g + g.mT) / 2


# --------------------------------------------------------------------------- #
# Handlers
# --------------------------------------------------------------------------- #


def _shapes(spec: TT | Tucker, out: int, inn: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out_shape = (
        shapes.validate_shape(spec.out_shape, out, "out_shape")
        if spec.out_shape
        else shapes.choose_shape(out, spec.order)
    )
    in_shape = (
        shapes.validate_shape(spec.in_shape, inn, "in_shape")
        if spec.in_shape
        else shapes.choose_shape(inn, spec.order)
    )
    return out_shape, in_shape


def _pad(w: Tensor, rows: int, cols: int) -> Tensor:
    return torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))


def _fit_tol(
    fit: Callable[[float | None], Part], w: Tensor, gram: Tensor | None, tol: float | None
) -> Part:
    """``fit(weight_tol)``; with a gram and tol, halve weight_tol until out error <= tol."""
    if gram is None or tol is None:
        return fit(tol)
    weight_tol = tol
    for _ in range(TIGHTEN_STEPS):
        part = fit(weight_tol)
        if out_rel(w, _dense(part, w.shape), gram) <= tol:
            return part
        weight_tol /= 2
    return fit(None)  # the caps: exact


def _tt_linear(w: Tensor, spec: TT, gram: Tensor | None) -> Part:
    out, inn = w.shape
    out_shape, in_shape = _shapes(spec, out, inn)
    w_pad = _pad(w, math.prod(out_shape), math.prod(in_shape)) if gram is not None else w
    d = len(out_shape)
    caps = tt_rank_caps(out_shape, in_shape)
    note = None
    if spec.rank is not None:
        ranks, note = cap_ranks(expand_rank(spec.rank, d - 1, "TT"), caps, "TT", shown=spec.rank)
    elif spec.ratio is not None:
        count = lambda r: tt_n_params(out_shape, in_shape, r)  # noqa: E731
        ranks = uniform_ranks_for_ratio(caps, count, spec.ratio * out * inn)
        note = ratio_note(spec.ratio, count(ranks), out * inn, count(caps))
    else:
        ranks = caps
    gram_pad = None if gram is None else data_aware_gram(gram, w_pad.shape[1])
    tensor = None if gram is not None else tensorize(w, out_shape, in_shape, work_dtype(w.device))
    norm = float(w.norm()) if tensor is None else float(tensor.norm())

    def fit(tol: float | None) -> Part:
        delta = None if tol is None or d == 1 else tol * norm / math.sqrt(d - 1)
        if tensor is not None:  # no data: one tensorized copy, swept in place
            cores = tt_sweep(tensor, out_shape, in_shape, ranks, delta, spec.svd)
        else:
            cores = tt_svd(w_pad, out_shape, in_shape, ranks, delta, spec.svd)
        if gram is not None and gram_pad is not None:
            cores = tt_als(cores, w_pad, gram_pad, w, gram)
        used = tuple(c.shape[3] for c in cores[:-1])
        return Part("tt", cores, used, note, out_shape, in_shape)

    return _fit_tol(fit, w, gram, spec.tol)


def _tucker_linear(w: Tensor, spec: Tucker, gram: Tensor | None) -> Part:
    out, inn = w.shape
    if spec.order == 1:
        if spec.out_shape is not None or spec.in_shape is not None:
            _shapes(spec, out, inn)  # validated; a 1-factor shape is the matrix itself
        return tucker_matrix(w, spec, gram)
    out_shape, in_shape = _shapes(spec, out, inn)
    w_pad = _pad(w, math.prod(out_shape), math.prod(in_shape))
    gram_pad = None if gram is None else data_aware_gram(gram, w_pad.shape[1])

    def fit(tol: float | None) -> Part:
        part = tucker_tensorized(w_pad, out_shape, in_shape, spec, tol, out * inn)
        if gram is not None and gram_pad is not None:
            part.cores = tucker_als(part.cores, w_pad, gram_pad, w, gram)
        return part

    return _fit_tol(fit, w, gram, spec.tol)


def _lowrank_linear(w: Tensor, spec: LowRank, gram: Tensor | None) -> Part:
    return lowrank_matrix(w, spec, gram)


def _lowrank_conv(k: Tensor, spec: LowRank, gram: Tensor | None) -> Part:
    return lowrank_matrix(k.reshape(k.shape[0], -1), spec)


def _tucker_conv(k: Tensor, spec: Tucker, gram: Tensor | None) -> Part:
    if spec.order != 1 or spec.in_shape is not None or spec.out_shape is not None:
        raise ValueError(
            "Tucker on a conv kernel is Tucker-2 on the channel modes and takes no "
            f"order/in_shape/out_shape; got order={spec.order}, in_shape={spec.in_shape}, "
            f"out_shape={spec.out_shape}"
        )
    return tucker_conv(k, spec)


def _cp_conv(k: Tensor, spec: CP, gram: Tensor | None) -> Part:
    return cp_conv(k, spec)


#: weight kind -> spec type -> handler: the one dispatch table. A layer registry entry
#: (:class:`tnquant.registry.LayerKind`) names its dense weight's kind, one of these keys.
DECOMPOSERS: dict[str, dict[type, Handler]] = {
    "linear": {TT: _tt_linear, Tucker: _tucker_linear, LowRank: _lowrank_linear},
    "conv2d": {Tucker: _tucker_conv, CP: _cp_conv, LowRank: _lowrank_conv},
    "conv1d": {Tucker: _tucker_conv, LowRank: _lowrank_conv},
    "embedding": {TT: _tt_linear, LowRank: _lowrank_linear},
}
_LAYER_NAMES = {
    "linear": " Linear",
    "conv2d": " Conv2d",
    "conv1d": " Conv1d",
    "embedding": "n Embedding",
}
_CONV_LAYOUTS = {"conv2d": (4, "(O, I, kh, kw)"), "conv1d": (3, "(O, I, k)")}


def spec_types(weight_kind: str) -> tuple[type, ...]:
    """The spec types that decompose a weight of ``weight_kind`` (a :data:`DECOMPOSERS` key).

    Examples
    --------
    >>> [t.__name__ for t in spec_types("conv2d")]
    ['Tucker', 'CP', 'LowRank']
    """
    if weight_kind not in DECOMPOSERS:
        raise ValueError(f"weight kind must be one of {list(DECOMPOSERS)}, got {weight_kind!r}")
    return tuple(DECOMPOSERS[weight_kind])


# --------------------------------------------------------------------------- #
# Reconstruction and the result
# --------------------------------------------------------------------------- #


def _dense(part: Part, shape: Sequence[int]) -> Tensor:
    return dense_of(part.format, part.cores, part.in_shape, shape)


def reconstruct(dec: Decomposition) -> Tensor:
    """The dense weight (unpadded, in the cores' dtype) of a :class:`Decomposition`.

    Examples
    --------
    >>> import torch
    >>> from tnquant.specs import LowRank
    >>> w = torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(reconstruct(decompose_linear(w, LowRank(rank="full"))), w))
    True
    """
    shape = dec.shape
    if shape is None:  # a hand-built Decomposition: the padded / natural shape
        if dec.out_shape is not None and dec.in_shape is not None:
            shape = (math.prod(dec.out_shape), math.prod(dec.in_shape))
        else:
            shape = (dec.cores[0].shape[0], -1)
    return dense_of(dec.format, dec.cores, dec.in_shape, shape)


def _finish(part: Part, weight: Tensor, gram: Tensor | None) -> Decomposition:
    cores = [c.to(dtype=weight.dtype, device=weight.device).contiguous() for c in part.cores]
    work = work_dtype(weight.device)
    if gram is not None:
        w2 = weight.detach().to(work).reshape(weight.shape[0], -1)
        what = dense_of(part.format, [c.to(work) for c in cores], part.in_shape, weight.shape)
        out_err: float | None = out_rel(w2, what.reshape(w2.shape), gram)
        err = _rel(w2, what.reshape(w2.shape))
    else:
        out_err = None
        err = rel_blocks(part, [c.to(work) for c in cores], weight, work)
    return Decomposition(
        format=part.format,
        cores=cores,
        ranks=tuple(int(r) for r in part.ranks),
        out_shape=part.out_shape,
        in_shape=part.in_shape,
        rel_error=err,
        capped=part.note,
        n_params=sum(c.numel() for c in cores),
        out_rel_error=out_err,
        shape=tuple(weight.shape),
    )


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #


def decompose_linear(
    weight: Tensor, spec: TT | Tucker | LowRank, *, gram: Tensor | None = None, name: str = "weight"
) -> Decomposition:
    """Decompose a Linear weight ``(out, in)`` into TT, Tucker or low-rank cores.

    Parameters
    ----------
    weight
        ``(out, in)`` floating-point tensor, any dtype and device.
    spec
        :class:`~tnquant.specs.TT`, :class:`~tnquant.specs.Tucker` or
        :class:`~tnquant.specs.LowRank` (``CP`` raises ``TypeError``: a CP
        of a matrix is a low-rank factorization).
    gram
        Optional ``(in, in)`` Gram matrix ``X^T X`` of calibration inputs:
        minimize the output error instead of the weight error (and fill
        ``out_rel_error``; ``tol`` then bounds the output error).
    name
        The tensor's name, for error messages.

    Returns
    -------
    Decomposition
        Cores in the layout of :class:`Decomposition`, ranks, errors.

    Raises
    ------
    TypeError
        For a spec type that does not apply, or a non-tensor/non-float weight.
    ValueError
        For non-finite values, a wrong shape, or a tensorized shape whose
        product is below the dimension.

    Examples
    --------
    >>> import torch
    >>> from tnquant.specs import LowRank, Tucker
    >>> w = torch.randn(32, 16, dtype=torch.float64)
    >>> decompose_linear(w, LowRank(rank=4)).n_params
    192
    >>> x = torch.randn(100, 16, dtype=torch.float64)
    >>> dec = decompose_linear(w, Tucker(rank=4), gram=x.T @ x)
    >>> dec.out_rel_error is not None
    True
    """
    handler = _check_spec(spec, "linear")
    w = _check_tensor(weight, 2, name, "(out, in)")
    g = None if gram is None else _check_gram(gram, w.shape[1], w)
    with torch.no_grad():
        return _finish(handler(w, spec, g), weight, g)


def decompose_conv(
    kernel: Tensor, spec: Tucker | CP | LowRank, *, name: str = "weight"
) -> Decomposition:
    """Decompose a Conv2d kernel ``(O, I, kh, kw)`` or a Conv1d one ``(O, I, k)``.

    Parameters
    ----------
    kernel
        ``(O, I, kh, kw)`` (weight kind ``'conv2d'``) or ``(O, I, k)``
        (``'conv1d'``) floating-point tensor.
    spec
        :class:`~tnquant.specs.Tucker` (Tucker-2 on the channel modes;
        ``rank`` an int or ``(r_out, r_in)``, capped at ``(O, I)``,
        ``ratio`` proportional to ``(O, I)``), :class:`~tnquant.specs.CP`
        (Conv2d only), or :class:`~tnquant.specs.LowRank` (of the
        ``(O, I*kh*kw)`` matrix). ``TT`` raises ``TypeError``.
    name
        The tensor's name, for error messages.

    Returns
    -------
    Decomposition

    Examples
    --------
    >>> import torch
    >>> from tnquant.specs import Tucker
    >>> k = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    >>> dec = decompose_conv(k, Tucker(rank=30))
    >>> dec.ranks, dec.rel_error < 1e-12, dec.capped is not None
    ((5, 4), True, True)
    >>> [tuple(c.shape) for c in decompose_conv(k[..., 0], Tucker(rank=2)).cores]
    [(5, 2), (2, 2, 3), (4, 2)]
    """
    kind = "conv1d" if isinstance(kernel, Tensor) and kernel.ndim == 3 else "conv2d"
    handler = _check_spec(spec, kind)
    ndim, layout = _CONV_LAYOUTS[kind]
    k = _check_tensor(kernel, ndim, name, layout)
    with torch.no_grad():
        return _finish(handler(k, spec, None), kernel, None)


def decompose_embedding(
    weight: Tensor, spec: TT | LowRank, *, name: str = "weight"
) -> Decomposition:
    """Decompose an Embedding table ``(num, dim)``: TT (TT-Rec) or low rank.

    For TT, ``out`` stands for the rows (``num``) and ``in`` for the columns
    (``dim``): ``out_shape`` tensorizes ``num``.

    Parameters
    ----------
    weight
        ``(num, dim)`` floating-point tensor.
    spec
        :class:`~tnquant.specs.TT` or :class:`~tnquant.specs.LowRank`.
    name
        The tensor's name, for error messages.

    Returns
    -------
    Decomposition

    Examples
    --------
    >>> import torch
    >>> from tnquant.specs import TT
    >>> dec = decompose_embedding(torch.randn(1000, 64), TT(rank=8))
    >>> dec.out_shape, dec.in_shape
    ((10, 10, 10), (4, 4, 4))
    """
    handler = _check_spec(spec, "embedding")
    # a TT fit reads the table once into its tensorized copy (no converted copy first)
    w = _check_tensor(weight, 2, name, "(num, dim)", convert=not isinstance(spec, TT))
    with torch.no_grad():
        return _finish(handler(w, spec, None), weight, None)
