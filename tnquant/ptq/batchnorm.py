"""Fold eval-mode BatchNorm into the layer before it: the same function, one layer fewer.

In eval mode a BatchNorm is a fixed affine map per channel,
``y = s * (x - mean) + beta`` with ``s = gamma / sqrt(var + eps)`` (``gamma = 1``,
``beta = 0`` without ``affine``). When ``x`` is the output of a layer whose
output channel ``o`` is ``W[o] . input + b[o]``, the two are one layer:
``W'[o] = s[o] W[o]`` and ``b'[o] = s[o] (b[o] - mean[o]) + beta[o]``
(``b = 0`` for a layer without bias; it gets one). Fold before
:func:`~tnquant.quantize`, so that the quantizer's ranges and per-channel
scales are those of the weights the deployed model runs.

Which layer feeds a BatchNorm is the rule of :mod:`tnquant.core.feeds`: the
module before it in an ``nn.Sequential`` model; in any other model, the
``torch.fx`` graph (the registry's layer kinds kept whole), where the
BatchNorm's one input must be the output of one layer, called once and read
by the BatchNorm alone (a model ``torch.fx`` cannot trace falls back to the
``nn.Sequential`` chains inside it, and its other BatchNorms are skipped
with the reason).

The layers it folds into (exactly, up to float rounding; the arithmetic is
float64, cast back to the layer's dtype):

- ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (any ``groups``, stride,
  padding, padding mode: the scale is per output channel), Hugging Face's
  ``Conv1D`` (weight ``(in, out)``: its columns are scaled);
- the factorized layers whose first core is a dense map onto the outputs:
  ``LowRankLinear`` / ``LowRankHFConv1D`` (rows of ``U``), ``TuckerLinear`` /
  ``TuckerHFConv1D`` of order 1, ``TuckerConv2d``, ``TuckerConv1d`` (rows of
  ``U_out``), ``CPConv2d`` (rows of ``A_out``).

Everything else is a ``skipped`` row with the reason, and that BatchNorm
and its layer are left as they were: a TT layer (its output index is spread
over all its cores), a tensorized Tucker layer, a quantized layer (fold
before quantize), a BatchNorm in training mode (call ``model.eval()``
first: folding uses the running statistics, as eval mode does) or without
running statistics, a producer whose output is read elsewhere or whose
weight is tied to another layer, a kind or size mismatch.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
>>> _ = model[1].running_var.fill_(4.0)
>>> x = torch.randn(2, 3, 6, 6)
>>> before = model(x)
>>> fold_batchnorm(model, progress=False).rows[0]["into"]
'0'
>>> type(model[1]).__name__, torch.allclose(model(x), before, atol=1e-5)
('Identity', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.core.feeds import BATCHNORMS, Feed, feeds
from tnquant.core.modules import find_module, replace_module
from tnquant.core.ties import tied_names
from tnquant.registry import kind_of, lookup
from tnquant.report import Report

__all__ = ["fold_batchnorm", "folded_tensors"]

QUANTIZED = "fold BatchNorm before quantize (quantize after folding)"
#: the BatchNorm that normalises the output channels of each dense weight kind
_BN_OF_KIND: dict[str, type[nn.Module]] = {
    "linear": nn.BatchNorm1d,
    "conv1d": nn.BatchNorm1d,
    "conv2d": nn.BatchNorm2d,
}
#: factorized formats whose cores[0] maps onto the output channels, one row per output:
#: low-rank ``U (out, r)``, Tucker ``U_out (out, r_out)``, CP ``A_out (O, R)``
_OUTPUT_CORE = ("lowrank", "tucker", "cp")
_SUPPORTED = (
    "Linear, Conv1d, Conv2d, Conv1D, LowRankLinear, TuckerLinear (order 1), TuckerConv1d, "
    "TuckerConv2d, CPConv2d"
)
_ANY_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_COLUMNS = ("name", "kind", "into", "layer", "note")


@dataclass
class _Fold:
    """One planned fold: everything computed, nothing changed yet."""

    name: str
    bn: nn.Module
    into: str
    layer: nn.Module
    tensor: Tensor
    weight: Tensor
    bias: Tensor


def _output_map(layer: nn.Module, name: str) -> tuple[Tensor, int, type[nn.Module]] | str:
    """``(tensor, output axis, the BatchNorm class)`` of the layer's output map, or why none."""
    kind = lookup(layer)
    cls = type(layer).__name__
    if kind is None or kind.role in ("part", "other"):
        return (
            f"its input is the output of '{name}' ({cls}), not of a layer it folds into "
            f"({_SUPPORTED})"
        )
    quantizers = ("weight_quantizer", "core_quantizers", "act_quantizers")
    if kind.role == "quantized" or any(layer._modules.get(q) is not None for q in quantizers):
        return QUANTIZED
    dense = kind_of(kind.dense) if kind.dense is not None else None
    bn_cls = _BN_OF_KIND.get(getattr(dense, "weight_kind", None) or "")
    if bn_cls is None:
        return f"{cls} has no output channels a BatchNorm normalises"
    if kind.role == "dense":
        return cast(Tensor, layer.weight), (1 if kind.transposed else 0), bn_cls
    fmt = str(getattr(layer, "format", ""))
    if fmt == "tt":
        return (
            f"{cls}: the output index of a TT-matrix is spread over all its cores, so no "
            f"one core's rows scale the output channels"
        )
    order = getattr(layer, "order", 1)
    if order != 1:
        return (
            f"{cls} of order {order} spreads the output index over {order} factors; only "
            f"order 1 (one U_out) folds"
        )
    if fmt not in _OUTPUT_CORE:
        return f"{cls}: no rule folds a BatchNorm into a {fmt!r} layer ({_SUPPORTED})"
    return cast(nn.ParameterList, layer.cores)[0], 0, bn_cls


def folded_tensors(
    bn: nn.Module, weight: Tensor, axis: int, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(s * weight, s * (bias - mean) + beta)``: ``bn`` folded into a layer's output map.

    ``s = gamma / sqrt(running_var + eps)`` scales ``weight`` along ``axis``
    (the output channels). The arithmetic is float64 (float32 on MPS, which
    has no float64); the results take ``weight``'s dtype (the bias:
    ``bias``'s, when given) and device.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> bn = nn.BatchNorm1d(2, eps=0.0).eval()
    >>> _ = bn.running_var.fill_(4.0), bn.running_mean.fill_(1.0)
    >>> w, b = folded_tensors(bn, torch.ones(2, 3), 0, None)
    >>> w[0].tolist(), b.tolist()
    ([0.5, 0.5, 0.5], [-0.5, -0.5])
    """
    work = torch.float32 if weight.device.type == "mps" else torch.float64

    def f64(t: Any) -> Tensor:
        return cast(Tensor, t).detach().to(device=weight.device, dtype=work)

    mean = f64(bn.running_mean)
    scale = torch.rsqrt(f64(bn.running_var) + float(cast(Any, bn).eps))
    if bn.weight is not None:
        scale = scale * f64(bn.weight)
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = (f64(weight) * scale.view(shape)).to(weight.dtype)
    b = f64(bias) if bias is not None else torch.zeros_like(mean)
    new_bias = scale * (b - mean) + (f64(bn.bias) if bn.bias is not None else 0.0)
    return new_weight, new_bias.to(bias.dtype if bias is not None else weight.dtype)


def _tied(model_ties: dict[str, list[str]], name: str) -> str | None:
    for holder, others in model_ties.items():
        if holder == name or holder.startswith(name + "."):
            return (
                f"a parameter of '{name}' is tied to {', '.join(others)}: folding would change "
                f"them too; untie it first"
            )
    return None


def _plan(model: nn.Module, name: str, bn: Any, feed: Feed, ties: dict[str, list[str]]) -> Any:
    """A :class:`_Fold` for the BatchNorm ``name``, or the reason it is skipped."""
    kind = type(bn).__name__
    if type(bn) not in BATCHNORMS:
        return f"{kind} is not folded: fold_batchnorm takes BatchNorm1d and BatchNorm2d"
    if bn.running_mean is None or bn.running_var is None:
        return (
            "it has no running statistics (track_running_stats=False): it normalises "
            "with each batch's own statistics, which no weight can hold"
        )
    if bn.training:
        return (
            "it is in training mode (it normalises with batch statistics): call "
            "model.eval() first; folding uses the running statistics, as eval mode does"
        )
    if not name:
        return "it is the model itself: no layer comes before it"
    if feed.name is None:
        return feed.reason
    layer = cast(nn.Module, find_module(model, feed.name))
    target = _output_map(layer, feed.name)
    if isinstance(target, str):
        return target
    tensor, axis, bn_cls = target
    where = f"'{feed.name}' ({type(layer).__name__})"
    if type(bn) is not bn_cls:
        return f"the output of {where} is normalised by a {bn_cls.__name__}, not a {kind}"
    if tensor.shape[axis] != bn.num_features:
        return (
            f"{kind} has {bn.num_features} features, but {where} has "
            f"{tensor.shape[axis]} output channels"
        )
    tied = _tied(ties, feed.name)
    if tied is not None:
        return tied
    bias = cast("Tensor | None", getattr(layer, "bias", None))
    weight, new_bias = folded_tensors(bn, tensor, axis, bias)
    if not (torch.isfinite(weight).all() and torch.isfinite(new_bias).all()):
        return "the folded weight or bias is not finite (running_var + eps <= 0, or a NaN)"
    return _Fold(name, bn, feed.name, layer, tensor, weight, new_bias)


def _apply(model: nn.Module, fold: _Fold) -> str | None:
    """Write the planned tensors and put ``nn.Identity`` at the BatchNorm; the row's note."""
    layer, note = fold.layer, None
    bias = cast("Tensor | None", getattr(layer, "bias", None))
    with torch.no_grad():
        fold.tensor.copy_(fold.weight)
        if bias is None:
            layer.bias = nn.Parameter(fold.bias, requires_grad=fold.tensor.requires_grad)
            note = "bias added"
        else:
            bias.copy_(fold.bias)
    for clear in ("clear_weight_cache", "clear_cache"):  # the factorized layers' eval caches
        method = getattr(layer, clear, None)
        if callable(method):
            method()
    replace_module(model, fold.name, nn.Identity())
    return note


def fold_batchnorm(model: nn.Module, *, progress: bool = True) -> Report:
    """Fold every eval-mode BatchNorm1d/2d into the layer that feeds it, in place.

    Each folded BatchNorm becomes ``nn.Identity()``; its layer keeps its
    class (a factorized layer stays factorized: only its output core
    changes) and gets a bias when it had none. Every BatchNorm is checked
    and every new tensor computed before anything is changed, so a
    BatchNorm that cannot be folded leaves it and its layer untouched.

    Parameters
    ----------
    model
        Any ``nn.Module``, in eval mode (``model.eval()``): a BatchNorm in
        training mode is skipped (see the module doc for what folds).
    progress
        Show a progress bar over the folds.

    Returns
    -------
    Report
        One row per folded BatchNorm: ``name``, ``kind`` (``'BatchNorm2d'``),
        ``into`` (the layer's name), ``layer`` (its class), ``note``
        (``'bias added'``); ``skipped`` holds one row per BatchNorm left as
        it was, with the reason.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.

    Notes
    -----
    A ``Linear`` (or ``Conv1D``, or a factorized Linear) followed by a
    ``BatchNorm1d`` is folded on the reading that the BatchNorm sees
    ``(N, C)`` inputs, its features being the layer's outputs; a
    ``BatchNorm1d`` on the ``(N, C, L)`` output of a Linear applied to
    ``(N, C, L_in)`` normalises another axis, which the model's structure
    alone does not show.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant.layers import TTLinear
    >>> tt = TTLinear([torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)])
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), tt, nn.BatchNorm1d(4)).eval()
    >>> report = fold_batchnorm(model, progress=False)
    >>> [(row["name"], row["into"]) for row in report]
    [('1', '0')]
    >>> report.skipped[0]["reason"].split(":")[0]
    'TTLinear'
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = Report("fold_batchnorm", columns=_COLUMNS)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _ANY_BATCHNORM)]
    feeds_of = feeds(model, [n for n, _ in found], leaf=lambda m: lookup(m) is not None)
    ties = tied_names(model)
    plans: list[_Fold] = []
    for name, bn in found:
        plan = _plan(model, name, bn, feeds_of[name], ties)
        if isinstance(plan, _Fold) and any(p.layer is plan.layer for p in plans):
            plan = f"'{plan.into}' is folded into already"
        if isinstance(plan, _Fold):
            plans.append(plan)
        else:
            report.skip(name, type(bn).__name__, str(plan))
    for fold in tqdm(plans, desc="fold batchnorm", disable=not progress):
        note = _apply(model, fold)
        report.add(
            name=fold.name,
            kind=type(fold.bn).__name__,
            into=fold.into,
            layer=type(fold.layer).__name__,
            note=note,
        )
    return report
