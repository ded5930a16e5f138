"""``convert``: freeze a fake-quant model into real low-bit storage.

Every weight quantizer in ``'quantize'`` mode becomes a
:class:`~tnquant.quant.frozen.FrozenTensor` (layout and the dropped float
tensors: :mod:`tnquant.quant.frozen`); activation quantizers stay fake-quant
modules with their calibrated qparams. Re-exported as ``tnquant.quantization.convert``.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec
>>> from tnquant.quantization import quantize
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> _ = quantize(model, weights=QuantSpec(bits=2), progress=False)
>>> x = torch.randn(2, 8)
>>> y = model(x)
>>> report = convert(model, progress=False)
>>> torch.equal(model(x), y), report["0"]["bits_after"]  # 32 2-bit codes, 1 float32 scale
(True, 96)
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.checks import check_model
from tnquant.core.modules import join
from tnquant.quant.frozen import FrozenTensor, spec_summary, tensor_bits
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup, store_frozen, weight_pairs
from tnquant.report import Report
from tnquant.sizes import same_frozen

__all__ = ["convert", "ConvertReport", "tensor_id", "weight_ties"]

_COLUMNS = ("name", "kind", "tensors", "bits_before", "bits_after", "note")


class ConvertReport(Report):
    """The :func:`convert` report; ``model`` is the converted model (a copy if not in place)."""

    model: nn.Module | None = None


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers holding weight quantizers (their registry entries say so)."""
    return [
        (name, cast(nn.Module, m))
        for name, m in model.named_modules()
        if (kind := lookup(m)) is not None and kind.holds_quantizers
    ]


def _check_convertible(units: list[tuple[str, nn.Module]], dynamic_activations: bool) -> None:
    observing, dynamic = [], []
    for name, module in units:
        weight_ids = set()
        for tname, _, q in weight_pairs(module):
            if isinstance(q, Quantizer):
                weight_ids.add(id(q))
                if q.mode == "observe":
                    observing.append(join(name, tname))
        for qname, q in module.named_modules():
            if isinstance(q, Quantizer) and id(q) not in weight_ids:
                if q.mode == "observe":
                    observing.append(join(name, qname))
                elif q.mode == "quantize" and q.dynamic and not dynamic_activations:
                    dynamic.append(join(name, qname))
    if observing:
        raise ValueError(
            f"quantizers {observing} are still observing; finish calibration "
            f"(tnquant.calibrate, or freeze()) before convert()"
        )
    if dynamic:
        raise ValueError(
            f"activation quantizers {dynamic} have no calibrated ranges (they would "
            f"compute scales from every input); run tnquant.calibrate(model, data) "
            f"first, or pass dynamic_activations=True to keep per-input ranges"
        )


#: id(float tensor) -> [(where, frozen, placeholder, tensor)] stored for it in this convert
_Done = dict[int, list[tuple[str, FrozenTensor, nn.Parameter, Tensor]]]


def tensor_id(t: Tensor) -> int:
    """A tensor's identity (a view, as a transposed kind's ``weight.mT``, is its base's)."""
    return id(t._base if t._base is not None else t)


def weight_ties(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """Tensor id -> ``[(layer, tensor name, layer module)]`` of a weight held by 2+ layers.

    Examples
    --------
    >>> emb, head = nn.Embedding(6, 2), nn.Linear(2, 6)
    >>> head.weight = emb.weight
    >>> [(n, t) for n, t, _ in next(iter(weight_ties(nn.ModuleList([emb, head])).values()))]
    [('0', 'weight'), ('1', 'weight')]
    """
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for tname, t, _ in weight_pairs(module):
            if t.numel():
                holders.setdefault(tensor_id(t), []).append((name, tname, module))
    return {k: v for k, v in holders.items() if len({id(m) for _, _, m in v}) > 1}


def _freeze_weight(
    module: nn.Module, k: int, t: Tensor, q: Quantizer, where: str, done: _Done
) -> tuple[FrozenTensor, str | None]:
    """Freeze slot ``k`` of ``module``; a tied ``t`` that freezes the same shares one copy.

    Returns the frozen tensor and, when it is shared, the name of the layer
    tensor that stored it first.
    """
    with torch.no_grad():
        ref = q(t)  # also initialises a learnable quantizer, as the fake forward would
        frozen = FrozenTensor.from_quantizer(q, t, name=where)
        stochastic = getattr(q.spec, "rounding", None) == "stochastic"
        if not stochastic and not torch.equal(frozen(), ref):
            raise RuntimeError(
                f"the stored codes of {where} do not reproduce the fake-quant "
                f"values of {q.spec}; please report this"
            )
    for first, stored, placeholder, _ in done.get(tensor_id(t), []):
        if same_frozen(frozen, stored):
            store_frozen(module, k, stored, placeholder)
            return stored, first
    placeholder = nn.Parameter(t.detach().new_empty(0), requires_grad=False)
    store_frozen(module, k, frozen, placeholder)
    done.setdefault(tensor_id(t), []).append(
        (where, frozen, placeholder, t)
    )  # t kept: its id holds
    return frozen, None


def convert(
    model: nn.Module,
    *,
    inplace: bool = True,
    dynamic_activations: bool = False,
    int8_kernels: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Freeze every fake-quant weight into integer storage (:class:`FrozenTensor`).

    Each weight quantizer in ``'quantize'`` mode is replaced by a
    ``FrozenTensor`` of its codes (``Quantizer.quantize_codes``) and the float
    weight/core by an empty placeholder (layout:
    :mod:`tnquant.quant.frozen`). The converted model's forward equals the
    fake-quant model's bitwise (checked per tensor; stochastic rounding draws
    its codes once, here). Activation quantizers stay fake-quant modules with
    their calibrated qparams; quantizers in mode ``'off'`` and their tensors
    stay as they are. A tied weight (one parameter in several layers, as an
    LM head tied to its embedding) whose quantizers freeze it the same (one
    shared quantizer: ``quantize`` gives tied members one) becomes one
    ``FrozenTensor`` shared by those layers, counted in the first row.

    Parameters
    ----------
    model
        A model after :func:`quantize` (and calibration).
    inplace
        Convert ``model`` itself; ``False`` converts a deep copy (returned as
        ``report.model``).
    dynamic_activations
        Accept activation quantizers without calibrated ranges (they keep
        computing their scale from every input).
    int8_kernels
        The explicit **inexact** fast path: afterwards, run every eligible
        int8 dense ``QuantLinear`` on torch's int8 GEMM with the same codes
        and scales, its inputs quantized per batch
        (:func:`tnquant.int8_kernels.to_int8_kernels`; CPU only, not
        bit-identical to the fake-quant model, not savable with
        :func:`tnquant.save`). The rows it changed say ``int8 kernel`` in
        ``note``.
    progress
        Show a progress bar over layers.

    Returns
    -------
    ConvertReport
        Per layer: ``tensors`` (``name=spec`` of the frozen tensors),
        ``bits_before``/``bits_after`` (float storage before, real storage
        after); ``report.model`` is the converted model.

    Raises
    ------
    ValueError
        A quantizer still observing, an uncalibrated activation quantizer
        (see ``dynamic_activations``), a model on the meta device (no
        values to store: ``model.to_empty(device=...)`` and load the
        weights first) or with a parameter holding NaN or inf; checked
        before anything is converted.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec
    >>> from tnquant.quantization import quantize
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = quantize(model, weights=QuantSpec(bits=8), progress=False)
    >>> report = convert(model, inplace=False, progress=False)
    >>> report.model[0].weight_quantizer.packed.dtype, model[0].converted
    (torch.uint8, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_model(model, "convert", finite=True)
    if not inplace:
        model = copy.deepcopy(model)
    units = _units(model)
    _check_convertible(units, dynamic_activations)
    report = ConvertReport("convert", columns=_COLUMNS)
    report.model = model
    done: _Done = {}
    for name, module in tqdm(units, desc="convert", disable=not progress):
        pending = [
            (k, tname, t, q)
            for k, (tname, t, q) in enumerate(weight_pairs(module))
            if isinstance(q, Quantizer) and q.mode == "quantize"
        ]
        if not pending:
            continue
        before = sum(tensor_bits(t) for _, _, t, _ in pending if tensor_id(t) not in done)
        frozen, shared, after = [], [], 0
        for k, tname, t, q in pending:
            f, first = _freeze_weight(module, k, t, q, repr(join(name, tname)), done)
            frozen.append((tname, f))
            if first is None:
                after += f.nbits()
            else:
                shared.append(f"{tname} tied to {first}: one stored copy, counted there")
        report.add(
            name=name,
            kind=type(module).__name__,
            tensors=", ".join(f"{tname}={spec_summary(f.spec)}" for tname, f in frozen),
            bits_before=before,
            bits_after=after,
            note="; ".join(shared) or None,
        )
    if int8_kernels:
        from tnquant.int8_kernels import to_int8_kernels

        fast = {
            row["name"]
            for row in to_int8_kernels(model, progress=progress).rows
            if row["status"] == "int8 kernel"
        }
        for row in report.rows:
            if row["name"] in fast:
                row["note"] = "int8 kernel"
    return report
