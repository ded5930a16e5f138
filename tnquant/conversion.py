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
import warnings
from typing import cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.checks import check_model
from tnquant.core.modules import join
from tnquant.quant.frozen import FrozenTensor, spec_summary, tensor_bits
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup, store_frozen, weight_pairs
from tnquant.report import Report, Sizes
from tnquant.sizes import model_size_bits, same_frozen

__all__ = ["convert", "ConvertReport", "KERNEL_PATHS", "tensor_id", "weight_ties"]

_COLUMNS = ("name", "kind", "tensors", "bits_before", "bits_after", "note")

#: the ``kernels`` choices of :func:`convert`
KERNEL_PATHS = ("auto", "exact", "packed", "int8_dynamic")


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
    kernels: str = "auto",
    kernel_dtype: torch.dtype = torch.bfloat16,
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
    kernels
        How the converted layers compute (exactness measured in
        ``tests/quant/test_packed_kernels.py``, speed in ``BENCHMARKS.md``):

        - ``'exact'``: the ``FrozenTensor`` dequantizes its codes (one fused
          integer-times-scale pass for 4- and 8-bit codes), then the float op:
          **bit-identical** (``torch.equal``) to the fake-quant model;
        - ``'auto'`` (default): the fastest bit-identical path, which is
          ``'exact'`` (no kernel below is bit-identical);
        - ``'packed'``: weight-only int4 / int8 on torch's packed CPU kernels
          (:func:`tnquant.packed.to_packed_kernels`: dense ``QuantLinear``,
          ``LowRankLinear`` and matrix ``TuckerLinear``, the same codes and
          scales mapped exactly), computed in ``kernel_dtype``; **not**
          bit-identical: the kernel sums ``x * code`` and scales after, in its
          own order, and in bfloat16 rounds the activations and scales
          (relative error about ``2**-8`` per product, so ``atol`` of a few
          ``2**-8 * sum_k |x_k w_k|`` per output);
        - ``'int8_dynamic'``: torch's dynamic int8 ``Linear`` with the same
          int8 codes and scales, the inputs quantized to 8 bits per batch
          (:func:`tnquant.int8_kernels.to_int8_kernels`); **not**
          bit-identical (the activation rounding: ``|dy| <= step/2 *
          sum_k |w_k|``).

        The kernel paths are CPU only and not savable with :func:`tnquant.save`;
        the rows they changed say ``int4 kernel`` / ``int8 kernel`` in ``note``.
    kernel_dtype
        The compute dtype of ``kernels='packed'``: ``torch.bfloat16`` (the
        kernels' vectorised path) or ``torch.float32`` (a scalar loop in torch
        2.13, many times slower than ``F.linear``: ``BENCHMARKS.md``).
    int8_kernels
        Deprecated alias of ``kernels='int8_dynamic'`` (warns).
    progress
        Show a progress bar over layers.

    Returns
    -------
    ConvertReport
        Per layer: ``tensors`` (``name=spec`` of the frozen tensors),
        ``bits_before``/``bits_after`` (float storage before, real storage
        after); ``report.sizes``: the whole model and the converted layers
        (:class:`tnquant.report.Sizes`, the model "before" holding those
        weights float); ``report.model`` is the converted model.

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
    if int8_kernels:
        warnings.warn(
            "convert(int8_kernels=True) is deprecated; use convert(kernels='int8_dynamic')",
            DeprecationWarning,
            stacklevel=2,
        )
        if kernels not in ("auto", "int8_dynamic"):
            raise ValueError(f"int8_kernels=True conflicts with kernels={kernels!r}")
        kernels = "int8_dynamic"
    if kernels not in KERNEL_PATHS:
        raise ValueError(f"kernels must be one of {list(KERNEL_PATHS)}, got {kernels!r}")
    check_model(model, "convert", finite=True)
    if not inplace:
        model = copy.deepcopy(model)
    units = _units(model)
    _check_convertible(units, dynamic_activations)
    report = ConvertReport("convert", columns=_COLUMNS)
    report.model = model
    done: _Done = {}
    params = 0
    for name, module in tqdm(units, desc="convert", disable=not progress):
        pending = [
            (k, tname, t, q)
            for k, (tname, t, q) in enumerate(weight_pairs(module))
            if isinstance(q, Quantizer) and q.mode == "quantize"
        ]
        if not pending:
            continue
        before = sum(tensor_bits(t) for _, _, t, _ in pending if tensor_id(t) not in done)
        params += sum(t.numel() for _, _, t, _ in pending if tensor_id(t) not in done)
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
    if report.rows:
        after = model_size_bits(model)  # float storage before, real storage after
        layers = Sizes.from_rows(after, report.rows, before="bits_after", after="bits_before")
        report.sizes = Sizes(
            layers.model_after, after, params, layers.layers_after, layers.layers_before
        )
    if kernels in ("packed", "int8_dynamic"):
        _run_kernels(model, report, kernels, kernel_dtype, progress)
    return report


def _run_kernels(
    model: nn.Module, report: ConvertReport, kernels: str, dtype: torch.dtype, progress: bool
) -> None:
    """Swap the layers onto the kernel path ``kernels``; note the rows it changed."""
    if kernels == "packed":
        from tnquant.packed import to_packed_kernels

        rows = to_packed_kernels(model, compute_dtype=dtype, progress=progress).rows
    else:
        from tnquant.int8_kernels import to_int8_kernels

        rows = to_int8_kernels(model, progress=progress).rows
    fast = {row["name"]: row["status"] for row in rows if row["status"] != "kept"}
    for row in report.rows:
        if row["name"] in fast:
            row["note"] = "; ".join(filter(None, [row["note"], fast[row["name"]]]))
