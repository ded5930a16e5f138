"""``calibrate``: post-training quantization of a model whose quantizers are attached.

What it does, in order:

1. **Weights.** Every weight quantizer (``weight_quantizer`` of a quantized
   dense layer, each entry of a factorized layer's ``core_quantizers``: see
   :func:`find_quantizers`) stores qparams computed from its current tensor
   by its spec's observer (:meth:`~tnquant.quant.quantizer.Quantizer.freeze`
   with the tensor; ``'ema'`` is min-max on one tensor). A learnable (LSQ)
   quantizer takes them as its starting point.
2. **Activations.** Every other :class:`~tnquant.quant.quantizer.Quantizer`
   is an activation quantizer. Those with an observer (integer
   ``QuantSpec`` s) have it reset, are switched to ``'observe'``, and the data
   runs through the model once (``torch.no_grad``, eval mode; the training
   flag is restored afterwards). Observing quantizers pass their input
   through unchanged, so each one sees the activations of the model with
   **quantized weights and unquantized (float) activations** upstream (one
   pass; downstream ranges do not see upstream activation rounding, which
   at 8 bits moves them by about one step). Then each is frozen
   (:meth:`~tnquant.quant.quantizer.Quantizer.freeze`), so the model is
   static: the same input always gives the same output.
3. **Bias correction** (optional, :mod:`tnquant.ptq.bias_correction`).

Quantizers in ``'off'`` mode are left off (listed as skipped). An activation
quantizer the data never reached keeps its previous state (skipped, with the
reason). Binary/Ternary activation quantizers have no observer: their scale
stays computed per input (skipped). Converted weights
(:class:`~tnquant.quant.frozen.FrozenTensor`) are not quantizers and are left
as they are.

Same data in the same order gives bitwise identical qparams (nothing is
random, except weight quantizers with ``rounding='stochastic'`` during bias
correction).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.quant import Quantizer
>>> model = nn.Sequential(nn.Linear(4, 3), Quantizer(QuantSpec(bits=8)))
>>> report = calibrate(model, [torch.randn(8, 4) for _ in range(2)], progress=False)
>>> model[1].initialized, report["1"]["kind"]
(True, 'activation')
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.batches import check_data, check_reiterable, iterate_batches
from tnquant.checks import check_model
from tnquant.core.capture import run
from tnquant.ptq.bias_correction import correct_biases
from tnquant.quant.observers import Observer
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import weight_pairs
from tnquant.report import Report
from tnquant.specs import QuantSpec

__all__ = ["calibrate", "QuantizerRole", "find_quantizers", "run_batches", "check_reiterable"]

_COLUMNS = (
    "name",
    "kind",
    "spec",
    "observer",
    "bits",
    "range_min",
    "range_max",
    "scale_min",
    "scale_max",
    "layer",
    "bias_shift",
    "max_shift",
)


@dataclass
class QuantizerRole:
    """One quantizer of a model and what it quantizes.

    Attributes
    ----------
    name
        Its name in ``model.named_modules()``.
    quantizer
        The module.
    kind
        ``'weight'`` or ``'activation'``.
    owner
        The layer holding a weight quantizer (``None`` for activations).
    tensor
        The weight or core a weight quantizer quantizes (``None`` for activations).
    """

    name: str
    quantizer: Quantizer
    kind: str
    owner: nn.Module | None = None
    tensor: Tensor | None = None


def find_quantizers(model: nn.Module) -> list[QuantizerRole]:
    """Every :class:`Quantizer` of ``model`` (once each), tagged weight or activation.

    Weight quantizers are exactly those
    :func:`~tnquant.layers.anatomy.weight_pairs` names: ``weight_quantizer``
    of ``QuantLinear``/``QuantConv2d``/``QuantEmbedding`` and the entries of a
    :class:`~tnquant.layers.base.FactorizedLayer`'s ``core_quantizers``; every
    other ``Quantizer`` is an activation quantizer.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.layers import LowRankLinear
    >>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    >>> layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec()) for _ in range(2)])
    >>> layer.act_quantizers = nn.ModuleDict({"input": Quantizer(QuantSpec())})
    >>> for role in find_quantizers(layer):
    ...     print(role.name, role.kind)
    core_quantizers.0 weight
    core_quantizers.1 weight
    act_quantizers.input activation
    """
    weights: dict[int, tuple[nn.Module, Tensor]] = {}
    for module in model.modules():
        for _, tensor, q in weight_pairs(module):
            if isinstance(q, Quantizer):
                weights[id(q)] = (module, tensor)
    roles = []
    for name, module in model.named_modules():
        if not isinstance(module, Quantizer):
            continue
        if id(module) in weights:
            owner, tensor = weights[id(module)]
            roles.append(QuantizerRole(name, module, "weight", owner, tensor))
        else:
            roles.append(QuantizerRole(name, module, "activation"))
    return roles


def _spec_fields(q: Quantizer) -> dict[str, Any]:
    spec = q.spec
    observer = spec.observer if isinstance(spec, QuantSpec) and spec.dtype is None else None
    return {"spec": type(spec).__name__, "observer": observer, "bits": spec.bits}


def _summary(q: Quantizer, lo: Tensor | None, hi: Tensor | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lo is not None and hi is not None and lo.numel():
        out["range_min"] = float(lo.min())
        out["range_max"] = float(hi.max())
    if q.initialized:
        scale = q.qparams().scale
        out["scale_min"] = float(scale.min())
        out["scale_max"] = float(scale.max())
    return out


def _freeze_weights(roles: list[QuantizerRole], report: Report) -> None:
    for role in roles:
        q, tensor = role.quantizer, role.tensor
        if role.kind != "weight" or tensor is None:
            continue
        if q.mode == "off":
            report.skip(role.name, "weight", "quantizer is off; left off")
            continue
        with torch.no_grad():
            q.freeze(tensor.detach())
        t = tensor.detach()
        lo, hi = (t.min(), t.max()) if t.numel() else (None, None)
        report.add(name=role.name, kind="weight", **_spec_fields(q), **_summary(q, lo, hi))


def run_batches(
    model: nn.Module,
    data: Any,
    num_batches: int | None,
    *,
    desc: str,
    progress: bool,
    what: str = "calibrate",
) -> int:
    """Run ``data`` through ``model`` (:func:`tnquant.core.capture.run`); count batches.

    Eval mode and no grad inside, every module's train/eval flag restored.
    Batches are checked as they are read (:func:`tnquant.batches.iterate_batches`,
    ``what`` names the caller in its messages): data without a batch, or
    with NaN or inf in a float tensor, raises ``ValueError``.

    Examples
    --------
    >>> import torch
    >>> run_batches(torch.nn.Identity(), [torch.ones(1)] * 3, 2, desc="", progress=False)
    2
    """
    return run(model, iterate_batches(data, num_batches, what=what), desc=desc, progress=progress)


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    bias_correction: bool = False,
    progress: bool = True,
) -> Report:
    """Calibrate the quantizers of ``model`` on ``data`` (PTQ), in place.

    Parameters
    ----------
    model
        A model with quantizers attached (by ``tnquant.quantize`` or by hand).
    data
        Calibration batches, passed to the model as described in
        :mod:`tnquant.batches` (a single tensor is one batch). Checked up
        front when read (not empty; a list or a DataLoader with bias
        correction, which reads it several times) and batch by batch
        (float tensors finite). A model without observing activation
        quantizers and without bias correction does not read it.
    num_batches
        Use at most this many batches (all when ``None``).
    bias_correction
        After calibration, correct the bias of every quantized layer that
        has one for the mean output shift its weight quantization causes
        on ``data`` (empirical bias correction, Nagel et al. 2019; see
        :func:`tnquant.ptq.bias_correction.correct_biases`). Costs one
        more pass over ``data`` per corrected layer.
    progress
        Show progress bars.

    Returns
    -------
    Report
        One row per quantizer: ``name``, ``kind`` (``'weight'``/
        ``'activation'``), ``spec``, ``observer``, ``bits``, the observed
        range (``range_min``/``range_max``: the weight's for weights, the
        observer's for activations) and the stored scales
        (``scale_min``/``scale_max``); with bias correction, one row of
        kind ``'bias'`` per corrected layer holding ``bias_shift``, the
        2-norm of the shift subtracted from its bias. Quantizers left
        unchanged are in ``report.skipped`` with the reason.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``, ``data`` is not iterable, or
        ``bias_correction`` is asked with ``data`` a one-shot iterator (it
        is read several times).
    ValueError
        If ``data`` yields no batch while activation quantizers need it, a
        batch holds NaN or inf, or the model is on the meta device or has
        non-finite parameters; nothing is changed then.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.quant import Quantizer
    >>> q = Quantizer(QuantSpec(bits=8, symmetric=False))
    >>> model = nn.Sequential(nn.ReLU(), q)
    >>> _ = calibrate(model, [torch.tensor([[-1.0, 2.0]]), torch.tensor([[4.0, 0.5]])],
    ...               progress=False)
    >>> round(q.qparams().scale.item() * 255, 4), q.mode
    (4.0, 'quantize')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    check_model(model, "calibrate", finite=True)
    report = Report("calibrate", columns=_COLUMNS)
    roles = find_quantizers(model)
    activations = Report("calibrate", columns=_COLUMNS)  # their skips follow the weights'
    observed = _select_activations(roles, activations)
    if observed or bias_correction:
        check_data(data, "calibrate")
    if bias_correction:
        check_reiterable(data, "bias correction")
    _freeze_weights(roles, report)
    report.skipped.extend(activations.skipped)
    _calibrate_activations(model, data, num_batches, progress, observed, report)
    if bias_correction:
        bias_report = correct_biases(model, data, num_batches, progress=progress)
        report.rows.extend(bias_report.rows)
        report.skipped.extend(bias_report.skipped)
    return report


def _select_activations(roles: list[QuantizerRole], report: Report) -> list[QuantizerRole]:
    """The activation quantizers calibrate observes; the others go to ``report.skipped``."""
    observed = []
    for role in roles:
        q = role.quantizer
        if role.kind != "activation":
            continue
        if q.mode == "off":
            report.skip(role.name, "activation", "quantizer is off; left off")
        elif q.observer is None:
            reason = (
                "no observer: the scale stays computed from each input"
                if q.dynamic
                else "fixed format: nothing to calibrate"
            )
            report.skip(role.name, "activation", reason)
        else:
            observed.append(role)
    return observed


def _calibrate_activations(
    model: nn.Module,
    data: Any,
    num_batches: int | None,
    progress: bool,
    observed: list[QuantizerRole],
    report: Report,
) -> None:
    """Observe ``data`` with the ``observed`` quantizers, then freeze those that saw some."""
    if not observed:
        return
    snapshots: dict[int, tuple[str, dict[str, Tensor]]] = {}
    try:
        for role in observed:
            q = role.quantizer
            obs = cast(Observer, q.observer)
            snapshots[id(q)] = (q.mode, {k: v.clone() for k, v in obs.state_dict().items()})
            obs.reset()
            q.observe()
        count = run_batches(model, data, num_batches, desc="calibrate", progress=progress)
        if count == 0:
            raise ValueError("calibrate needs at least one batch of data, got an empty iterable")
    except BaseException:
        _restore(observed, snapshots)
        raise
    for role in observed:
        q = role.quantizer
        obs = cast(Observer, q.observer)
        if not obs.has_data:
            _restore([role], snapshots)
            report.skip(role.name, "activation", "not reached by the data; left as it was")
            continue
        q.freeze()
        report.add(
            name=role.name,
            kind="activation",
            **_spec_fields(q),
            **_summary(q, obs.min_val, obs.max_val),
        )


def _restore(
    roles: list[QuantizerRole], snapshots: dict[int, tuple[str, dict[str, Tensor]]]
) -> None:
    """Put observers and modes back as they were before calibrate touched them."""
    for role in roles:
        q = role.quantizer
        if id(q) not in snapshots or q.observer is None:
            continue
        mode, state = snapshots[id(q)]
        q.observer.load_state_dict(state)
        q.mode = mode
