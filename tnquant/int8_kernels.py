"""An explicit, inexact fast path: run converted int8 Linear layers on torch's int8 kernels.

:func:`tnquant.convert` stores codes and dequantizes them on every call: it
is exact (bitwise the fake-quant model) and saves memory, not time.
:func:`to_int8_kernels` swaps each eligible dense ``QuantLinear`` for
``torch.ao.nn.quantized.dynamic.Linear`` built from **the same int8 codes and
scales**, so the matmul runs on the CPU's int8 GEMM (fbgemm on x86, qnnpack
on ARM). The inputs are then quantized to 8 bits on the fly, per batch
(dynamic quantization): the result is close to, and **not bit-identical
with**, the fake-quant / converted model. Use it for CPU inference speed;
keep the exact model for accuracy numbers, export and :func:`tnquant.save`
(which cannot describe torch's quantized modules). torch 2.13 marks its
quantized tensors deprecated in favour of torchao; this path uses them while
they exist and says so when they do not.

Eligible: ``QuantLinear`` whose weight quantizer is an integer symmetric
``QuantSpec`` of at most 8 bits, per tensor or per output channel (axis 0),
with no activation quantizers (they would be bypassed). Others stay as they
are and are listed in the report with the reason. Factorized layers stay on
their exact path.

Examples
--------
>>> import torch
>>> from tnquant import QuantSpec, quantize, convert
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
>>> _ = quantize(model, weights=QuantSpec(bits=8, granularity="channel"), progress=False)
>>> _ = convert(model, progress=False)
>>> x = torch.randn(4, 64)
>>> exact = model(x)
>>> report = to_int8_kernels(model, progress=False)
>>> type(model[0]).__name__, report.rows[0]["status"]
('Linear', 'int8 kernel')
>>> bool((model(x) - exact).abs().max() < 0.05)
True
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from tnquant.core.modules import replace_module
from tnquant.layers.quantized import QuantLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import lookup
from tnquant.report import Report
from tnquant.specs import QuantSpec

__all__ = ["to_int8_kernels", "int8_kernels_available"]


def int8_kernels_available() -> bool:
    """Whether this torch build has a quantized engine (fbgemm, x86 or qnnpack).

    Examples
    --------
    >>> isinstance(int8_kernels_available(), bool)
    True
    """
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    return bool(engines)


def _quantized_linear(module: nn.Module) -> bool:
    """Whether the registry says ``module`` is a quantized ``nn.Linear`` (``QuantLinear``)."""
    kind = lookup(module)
    return kind is not None and kind.role == "quantized" and kind.dense is nn.Linear


def _why_not(module: QuantLinear) -> str | None:
    """The reason ``module`` cannot take the int8 kernel, or ``None``."""
    q = module._modules.get("weight_quantizer")
    if not isinstance(q, (Quantizer, FrozenTensor)):
        return "no weight quantizer"
    spec = q.spec
    if not isinstance(spec, QuantSpec) or spec.dtype is not None:
        return f"weight spec {type(spec).__name__} is not an integer QuantSpec"
    if spec.bits > 8 or not spec.symmetric:
        return (
            f"needs symmetric codes of <= 8 bits, got bits={spec.bits}, symmetric={spec.symmetric}"
        )
    if spec.granularity not in ("tensor", "channel") or (
        spec.granularity == "channel" and spec.axis not in (None, 0)
    ):
        return (
            f"needs per-tensor or per-output-channel scales, got {spec.granularity!r} "
            f"axis {spec.axis}"
        )
    if isinstance(q, Quantizer) and q.mode != "quantize":
        return f"weight quantizer in mode {q.mode!r} (calibrate first)"
    if module.act_quantizers is not None and len(module.act_quantizers):
        return "has activation quantizers (the int8 kernel would bypass them)"
    return None


def _dynamic_linear(module: QuantLinear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    q = module._modules["weight_quantizer"]
    if isinstance(q, FrozenTensor):
        codes, qp = q.codes(), q.qparams()
    else:
        q = cast(Quantizer, q)
        with torch.no_grad():
            codes, qp = q.quantize_codes(module.weight.detach())
    codes = codes.to(torch.int8).cpu()
    scale = qp.scale.detach().double().cpu().reshape(-1)
    out_features = codes.shape[0]
    if scale.numel() == 1:
        scale = scale.expand(out_features).contiguous()
    zero = torch.zeros(out_features, dtype=torch.long)
    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated (-> torchao)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(codes, scale, zero, 0)
        dyn = DynamicLinear(
            module.in_features, out_features, bias_=module.bias is not None, dtype=torch.qint8
        )
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        dyn.set_weight_bias(qweight, bias)
    return dyn


def to_int8_kernels(model: nn.Module, *, progress: bool = True) -> Report:
    """Replace eligible int8 ``QuantLinear`` layers by torch's dynamic int8 ``Linear`` (CPU).

    Inexact by design (see the module docs): the weights keep their codes
    and scales; the activations are quantized per batch by torch.

    Parameters
    ----------
    model
        A quantized (calibrated or converted) model, on the CPU; changed in place.
    progress
        Show a progress bar.

    Returns
    -------
    Report
        One row per ``QuantLinear``: ``name``, ``status`` (``'int8 kernel'``
        or ``'kept'``), ``reason``.

    Raises
    ------
    RuntimeError
        When torch has no quantized engine here.

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec, quantize
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> _ = quantize(model, weights={"0": QuantSpec(bits=8), "1": QuantSpec(bits=4,
    ...              symmetric=False)}, progress=False)
    >>> [row["status"] for row in to_int8_kernels(model, progress=False).rows]
    ['int8 kernel', 'kept']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not int8_kernels_available():
        raise RuntimeError(
            "this torch build has no quantized engine (fbgemm/x86/qnnpack): "
            "int8 kernels are unavailable; keep the exact converted model"
        )
    report = Report("int8 kernels", columns=("name", "status", "reason"))
    targets = [(n, cast(QuantLinear, m)) for n, m in model.named_modules() if _quantized_linear(m)]
    for name, module in tqdm(targets, desc="int8 kernels", disable=not progress):
        reason = _why_not(module) if name else "the model itself cannot be replaced; wrap it"
        if reason is None and any(p.device.type != "cpu" for p in module.parameters()):
            reason = "not on the CPU (torch's int8 dynamic Linear is CPU-only)"
        if reason is not None:
            report.add(name=name, status="kept", reason=reason)
            continue
        replace_module(model, name, _dynamic_linear(module))
        report.add(name=name, status="int8 kernel", reason="")
    return report
