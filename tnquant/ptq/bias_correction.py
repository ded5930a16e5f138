"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2).

Quantizing a layer's weights shifts the mean of its output: for a layer
``y = f(x; W) + b`` that is linear in ``x`` (dense, or any factorized
contraction), ``E[y_quant - y_float] = f(E[x]; W_q - W)``, which is not zero.
:func:`correct_biases` measures that shift per output channel on the
calibration data and subtracts it from the bias.

Exactly, for each layer that has weight quantizers (``weight_quantizer`` or
``core_quantizers``, at least one not ``'off'``) and a bias:

- the layer's inputs are the ones it receives in the quantized model
  (weights and activations quantized as at inference); the layers are
  corrected **one at a time in forward order** (the order of their first
  call on the first batch), each over the whole data, so a layer's inputs
  already come from corrected upstream layers (one pass over the data per
  layer);
- on each call, the layer's output is computed twice on the same input:
  ``y_float`` with its weight quantizers ``'off'`` and ``y_quant`` with
  them as they are; its ``'input'`` activation quantizer stays as it is and
  its other activation quantizers (``'inter_k'``, ``'output'``) are off in
  both, so the shift measured is that of the weights alone;
- ``shift[c] = mean(y_quant - y_float)`` over every element of output
  channel ``c`` (the last dim, or dim 1 for convolutions: layers with an
  ``out_channels`` attribute), accumulated in float64 over every call of
  the layer (a shared layer counts all its calls);
- ``bias -= shift``. On the same inputs the corrected layer's mean output
  error against the float layer with the original bias is then zero per
  channel (up to float rounding).

Layers without a bias are not corrected (no bias is added: that would change
the architecture); converted layers (any ``FrozenTensor`` weight) have no
float reference, and layers whose weight quantizers are all ``'off'`` have
nothing to correct; all three are listed in ``report.skipped``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> from tnquant.layers import LowRankLinear
>>> from tnquant.quant import Quantizer
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> layer = LowRankLinear([torch.randn(6, 3), torch.randn(3, 5)], bias=torch.zeros(6))
>>> layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=2)) for _ in range(2)])
>>> report = correct_biases(layer, [torch.randn(64, 5) + 1.0], progress=False)
>>> report[""]["bias_shift"] > 0
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import check_data, iterate_batches
from tnquant.checks import check_model
from tnquant.core.capture import hooks, run
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import weight_pairs
from tnquant.report import Report

__all__ = ["correct_biases", "bias_targets"]


def _weight_quantizers(module: nn.Module) -> list[Any]:
    """The weight quantizer slots of ``module`` (Quantizers, FrozenTensors, Identity)."""
    return [q for _, _, q in weight_pairs(module) if q is not None]


def bias_targets(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, str, str]]]:
    """Layers :func:`correct_biases` corrects, by name, and the skipped ones with reasons.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.layers import LowRankLinear
    >>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    >>> layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec()) for _ in range(2)])
    >>> bias_targets(nn.Sequential(layer))
    ({}, [('0', 'LowRankLinear', 'no bias: not corrected')])
    """
    targets: dict[str, nn.Module] = {}
    skipped: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        slots = _weight_quantizers(module)
        if not slots:
            continue
        kind = type(module).__name__
        if any(isinstance(q, FrozenTensor) for q in slots):
            skipped.append((name, kind, "converted weights (no float reference): not corrected"))
        elif not any(isinstance(q, Quantizer) and q.mode != "off" for q in slots):
            if any(isinstance(q, Quantizer) for q in slots):
                skipped.append((name, kind, "weight quantizers are off: not corrected"))
        elif not isinstance(getattr(module, "bias", None), Tensor):
            skipped.append((name, kind, "no bias: not corrected"))
        else:
            targets[name] = module
    return targets, skipped


@contextmanager
def _modes(quantizers: list[Quantizer], mode: str) -> Iterator[None]:
    saved = [q.mode for q in quantizers]
    try:
        for q in quantizers:
            q.mode = mode
        yield
    finally:
        for q, m in zip(quantizers, saved, strict=True):
            q.mode = m


def _channel_rows(y: Tensor, conv: bool) -> Tensor:
    """``y`` as ``(rows, channels)``: channel dim 1 for convolutions, else the last."""
    if conv and y.ndim >= 2:
        y = y.movedim(1, -1)
    return y.reshape(-1, y.shape[-1])


class _ShiftMeter:
    """Forward hook: accumulates ``sum(y_quant - y_float)`` per channel of one layer."""

    def __init__(self, module: nn.Module) -> None:
        self.weights = [q for q in _weight_quantizers(module) if isinstance(q, Quantizer)]
        acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
        self.acts = [
            q
            for k, q in (acts.items() if acts is not None else ())
            if k != "input" and isinstance(q, Quantizer)
        ]
        self.conv = hasattr(module, "out_channels")
        self.total: Tensor | None = None
        self.count = 0

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        with _modes(self.acts, "off"):
            y_quant = module.forward(*args, **kwargs)
            with _modes(self.weights, "off"):
                y_float = module.forward(*args, **kwargs)
        diff = _channel_rows(y_quant.to(torch.float64) - y_float.to(torch.float64), self.conv)
        part = diff.sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += diff.shape[0]

    def shift(self) -> Tensor | None:
        return None if self.total is None or self.count == 0 else self.total / self.count


def _forward_order(model: nn.Module, targets: dict[str, nn.Module], batch: Any) -> list[str]:
    """Names of ``targets`` in the order of their first call on ``batch``."""
    order: list[str] = []
    names = {id(m): n for n, m in targets.items()}

    def first_call(_name: str, module: nn.Module, _args: Any) -> None:
        name = names[id(module)]
        if name not in order:
            order.append(name)

    with hooks(targets, pre=first_call):
        run(model, [batch])
    return order


def layer_order(
    model: nn.Module,
    data: Any,
    num_batches: int | None,
    targets: dict[str, nn.Module],
    report: Report,
    *,
    what: str,
    unreached: str,
) -> list[str]:
    """Names of ``targets`` in forward order on the first batch; the others skipped.

    Raises ``ValueError`` (naming ``what``) when ``data`` has no batch; each
    target the first batch does not reach goes to ``report.skipped`` with
    the reason ``unreached``.
    """
    first = next(iter(iterate_batches(data, num_batches, what=what)), None)
    if first is None:
        raise ValueError(f"{what} needs at least one batch of data, got an empty iterable")
    order = _forward_order(model, targets, first)
    for name in targets:
        if name not in order:
            report.skip(name, type(targets[name]).__name__, unreached)
    return order


def correct_biases(
    model: nn.Module, data: Any, num_batches: int | None = None, *, progress: bool = True
) -> Report:
    """Subtract from each quantized layer's bias the mean output shift of its weights.

    See the module docs for exactly what is measured and in which order.
    Call it after the quantizers are calibrated (``calibrate(...,
    bias_correction=True)`` does); it changes biases in place.

    Parameters
    ----------
    model
        The quantized model.
    data
        Calibration batches (read once per corrected layer, plus once to
        find the forward order: a list or a DataLoader, not a one-shot
        iterator).
    num_batches
        Use at most this many batches.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        One row per corrected layer: ``name``, ``kind='bias'``, ``layer``
        (its class), ``bias_shift`` (2-norm of the subtracted shift) and
        ``max_shift`` (its largest absolute entry); skipped layers with
        the reason.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.layers import LowRankLinear
    >>> from tnquant.quant import Quantizer
    >>> layer = LowRankLinear([torch.randn(4, 2), torch.randn(2, 3)])
    >>> layer.core_quantizers = nn.ModuleList([Quantizer(QuantSpec()) for _ in range(2)])
    >>> correct_biases(nn.Sequential(layer), [torch.randn(2, 3)], progress=False).skipped[0]
    {'name': '0', 'kind': 'LowRankLinear', 'reason': 'no bias: not corrected'}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_model(model, "bias correction", finite=True)
    check_data(data, "bias correction", reiterable=True)
    report = Report("bias_correction", columns=("name", "kind", "layer", "bias_shift", "max_shift"))
    targets, skipped = bias_targets(model)
    for name, kind, reason in skipped:
        report.skip(name, kind, reason)
    if not targets:
        return report
    order = layer_order(
        model,
        data,
        num_batches,
        targets,
        report,
        what="bias correction",
        unreached="not reached by the data: not corrected",
    )
    for name in tqdm(order, desc="bias correction", disable=not progress):
        module = targets[name]
        meter = _ShiftMeter(module)
        handle = module.register_forward_hook(meter, with_kwargs=True)
        try:
            run(model, iterate_batches(data, num_batches, what="bias correction"), desc=name)
        finally:
            handle.remove()
        shift = meter.shift()
        if shift is None:
            continue
        bias = cast(Tensor, module.bias)
        with torch.no_grad():
            bias.sub_(shift.to(device=bias.device, dtype=bias.dtype))
        report.add(
            name=name,
            kind="bias",
            layer=type(module).__name__,
            bias_shift=float(shift.norm()),
            max_shift=float(shift.abs().max()),
        )
    return report
