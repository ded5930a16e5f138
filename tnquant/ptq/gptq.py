"""GPTQ: round the weights of quantized Linear layers with second-order error feedback.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ (Frantar et
al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) quantizes the columns of a Linear
weight ``W`` (``out x in``) one at a time and spreads each column's rounding
error over the columns not yet quantized, minimising the layer's output
error on the calibration inputs ``X``:

    ``min_Q || X W^T - X Q^T ||_F^2``,  Hessian ``H = 2 X^T X`` (``in x in``).

Exactly, per layer:

- ``H`` is accumulated in float64 over every row the layer sees on the
  data (all leading dims flattened; a shared layer counts all its calls);
  input dims that never fire (``H_jj = 0``) get ``H_jj = 1`` and their
  weights are set to 0 before quantization; ``H += damp * mean(diag H) * I``;
- the columns are processed in order (``act_order=True``: by decreasing
  ``H_jj``), in blocks of ``block`` columns with lazy updates; with
  ``U`` the upper Cholesky factor of ``H^-1`` (in the processing order),
  column ``j`` is quantized by the layer's own quantizer arithmetic
  (``q = clamp(round(w / s) + zp, qmin, qmax)``, the stored qparams of
  that column: per-tensor, per-channel or per-group along the input dim)
  and the remaining columns are updated by
  ``W[:, k] -= (w_j - deq(q_j)) / U_jj * U_jk`` for ``k`` after ``j``;
- the layer's float ``weight`` is replaced by the dequantized result, so
  its weight quantizer (unchanged, qparams kept) maps it to itself: the
  quantized model computes exactly the GPTQ weights, and QAT can start
  from them.

Layers are processed **one at a time in forward order** (the order of their
first call on the first batch), each over the whole data, so each layer's
Hessian comes from inputs produced by already-rounded upstream layers (one
pass over the data per layer).

Which layers: dense ``QuantLinear`` s (and any module with a float
``weight`` parameter of 2 dims and a ``weight_quantizer``) and
:class:`~tnquant.layers.LowRankLinear` s whose quantizers are integer
:class:`~tnquant.QuantSpec` s with stored qparams (call
:func:`~tnquant.ptq.calibrate` first) and rounding ``'nearest_even'`` or
``'half_up'``. A low-rank layer ``y = U (V x)`` is two Linear weights in a
row: ``V`` is rounded with the Hessian of ``x``, then ``U`` with that of
the rounded ``V x``, ``Q(V) H Q(V)^T`` (no extra pass over the data; layers
with an ``'inter_0'`` activation quantizer are skipped). Everything else
(TT / Tucker / CP layers, convolutions, embeddings, binary/ternary/float
formats, converted layers, uncalibrated quantizers) is left unchanged and
listed in ``report.skipped`` with the reason.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec, calibrate, quantize
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(16, 8))
>>> _ = quantize(model, weights=QuantSpec(bits=3, granularity="channel"), progress=False)
>>> x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs
>>> _ = calibrate(model, [x], progress=False)
>>> row = gptq(model, [x], progress=False).rows[0]
>>> row["error"] < row["rtn_error"]
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import check_data, iterate_batches
from tnquant.checks import check_model
from tnquant.core.capture import Gram, capture_grams
from tnquant.layers.base import FactorizedLayer
from tnquant.layers.lowrank import LowRankLinear
from tnquant.ptq.bias_correction import layer_order
from tnquant.quant.codebook import column_rounder
from tnquant.quant.qparams import QParams, expand, to_blocks
from tnquant.quant.quantizer import Quantizer
from tnquant.quant.rounding import round_tensor
from tnquant.registry import weight_pairs
from tnquant.report import Report
from tnquant.specs import Codebook, QuantSpec

__all__ = ["gptq", "gptq_targets", "gptq_weight", "column_qparams"]

_ROUNDINGS = ("nearest_even", "half_up")


def _pair_reason(weight: Tensor | None, quantizer: Any) -> str | None:
    """Why ``quantizer(weight)`` cannot be rounded by GPTQ (``None``: it can)."""
    if not isinstance(quantizer, Quantizer):
        return "converted weights (no float reference)"
    if weight is None or weight.ndim != 2:
        return "not a Linear weight (GPTQ covers Linear layers)"
    spec = quantizer.spec
    if isinstance(spec, Codebook):
        if weight is not None and weight.dim() != 2:
            return f"a {weight.dim()}-d Codebook weight: GPTQ rounds 2-d ones"
    elif not isinstance(spec, QuantSpec) or spec.dtype is not None:
        return f"{type(spec).__name__} weights: GPTQ needs an integer QuantSpec or a Codebook"
    elif spec.rounding not in _ROUNDINGS:
        return f"rounding {spec.rounding!r}: GPTQ supports {list(_ROUNDINGS)}"
    if quantizer.mode != "quantize":
        return f"weight quantizer is {quantizer.mode!r}"
    if not quantizer.initialized:
        return "weight quantizer has no stored qparams: calibrate the model first"
    return None


def _reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be rounded by GPTQ (``None``: it can)."""
    if isinstance(module, FactorizedLayer):
        if not isinstance(module, LowRankLinear):
            return f"{type(module).__name__}: GPTQ covers dense Linear and LowRankLinear weights"
        acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
        if acts is not None and "inter_0" in acts:
            return "an 'inter_0' activation quantizer: the second core's inputs are quantized"
        quantizers = module._modules.get("core_quantizers")
        if quantizers is None:
            return "no core quantizers"
        for core, quantizer in zip(module.cores, cast(nn.ModuleList, quantizers), strict=True):
            reason = _pair_reason(core, quantizer)
            if reason is not None:
                return reason
        return None
    if isinstance(module, nn.Embedding):
        return "not a Linear weight (GPTQ covers Linear layers)"
    return _pair_reason(module._parameters.get("weight"), module._modules.get("weight_quantizer"))


def gptq_targets(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, str, str]]]:
    """Layers :func:`gptq` rounds, by name, and the skipped ones with reasons.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec, quantize
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> _ = quantize(model, weights=QuantSpec(), progress=False)
    >>> gptq_targets(model)[1][0][2]
    'weight quantizer has no stored qparams: calibrate the model first'
    """
    targets: dict[str, nn.Module] = {}
    skipped: list[tuple[str, str, str]] = []
    for name, module in model.named_modules():
        if not any(q is not None for _, _, q in weight_pairs(module)):
            continue
        reason = _reason(module)
        if reason is None:
            targets[name] = module
        else:
            skipped.append((name, type(module).__name__, reason))
    return targets, skipped


def column_qparams(qp: QParams, shape: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """The scale (and zero point) of every weight of an ``out x in`` matrix, full shape.

    Examples
    --------
    >>> import torch
    >>> from tnquant.quant.qparams import QParams
    >>> qp = QParams(torch.tensor([[1.0], [2.0]]), None, -4, 3, (1, 3), (2, 3), torch.float32)
    >>> column_qparams(qp, (2, 3))[0].tolist()
    [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """
    block = tuple(qp.block_size)
    ones = to_blocks(torch.ones(shape, dtype=qp.scale.dtype, device=qp.scale.device), block)
    scale = (ones * expand(qp.scale, shape, block)).reshape(shape)
    zp = None
    if qp.zero_point is not None:
        zp = (ones * expand(qp.zero_point.to(qp.scale.dtype), shape, block)).reshape(shape)
    return scale, zp


def _fake(w: Tensor, s: Tensor, zp: Tensor | None, qmin: int, qmax: int, rounding: str) -> Tensor:
    """``(clamp(round(w / s) + zp, qmin, qmax) - zp) * s``: the quantizer's arithmetic."""
    r = round_tensor(w / s, rounding)
    if zp is not None:
        return (r + zp).clamp(qmin, qmax).sub(zp).mul(s)
    return r.clamp(qmin, qmax).mul(s)


def gptq_weight(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    *,
    rounding: str = "nearest_even",
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    round_fn: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """GPTQ-rounded ``weight`` (dequantized values on the quantizer's grid).

    Parameters
    ----------
    weight
        ``out x in`` float weight.
    hessian
        ``in x in`` matrix ``X^T X`` of the layer's inputs (any positive
        multiple: only its directions matter; ``damp`` is relative).
    scale, zero_point
        Full-shape (``out x in``) scale and zero point (``None``:
        symmetric), e.g. from :func:`column_qparams`.
    qmin, qmax, rounding
        The code range and rounding mode of the quantizer.
    damp
        Dampening, as a fraction of the mean diagonal of ``hessian``.
    block
        Columns per lazy-update block (the result does not depend on it up
        to float rounding).
    act_order
        Quantize columns in order of decreasing ``H_jj``.
    round_fn
        Any rounding ``round_fn(column, j) -> values`` of the (float64)
        column ``j`` of the original order, used instead of the uniform grid
        (``scale``/``zero_point``/``qmin``/``qmax``/``rounding`` are then
        ignored): e.g. the nearest codebook entry
        (:func:`tnquant.quant.codebook.column_rounder`). The result is then
        the float64 values cast to ``weight.dtype``; pass it through the
        quantizer once more for its own arithmetic.

    Returns
    -------
    Tensor
        Same shape and dtype as ``weight``; every entry is ``(q - zp) * s``
        for an integer code ``q`` in ``[qmin, qmax]``.

    Examples
    --------
    >>> import torch
    >>> w = torch.tensor([[0.3, -0.2]])
    >>> s = torch.full((1, 2), 0.25)
    >>> gptq_weight(w, torch.eye(2), s, None, -2, 1).tolist()  # H = I: plain rounding
    [[0.25, -0.25]]
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"need an (out, in) weight and an (in, in) hessian, got "
            f"{tuple(weight.shape)} and {tuple(hessian.shape)}"
        )
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    dtype = torch.float64
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()
    s = (scale if round_fn is None else torch.ones_like(w)).to(dtype)
    zp = None if zero_point is None else zero_point.to(dtype)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    cols = w.shape[1]
    perm = (
        torch.argsort(torch.diagonal(h), descending=True)
        if act_order
        else torch.arange(cols, device=w.device)
    )
    w, h, s = w[:, perm], h[perm][:, perm], s[:, perm]
    zp = None if zp is None else zp[:, perm]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=dtype, device=h.device)
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            if round_fn is not None:
                qc = round_fn(col, int(perm[i1 + i]))
            else:
                qc = _fake(
                    col, s[:, i1 + i], None if zp is None else zp[:, i1 + i], qmin, qmax, rounding
                )
            q[:, i1 + i] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    if round_fn is not None:
        return out.to(weight.dtype)
    # the float32 cast of (q - zp) * s computed in float64 can differ from the
    # quantizer's float32 arithmetic by an ulp: recompute it in the weight's dtype
    wd = weight.dtype
    return _fake(
        out.to(wd),
        scale.to(wd),
        None if zero_point is None else zero_point.to(wd),
        qmin,
        qmax,
        rounding,
    )


def _output_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)``: relative output error on the inputs."""
    d = (w - q).to(torch.float64)
    w64 = w.to(torch.float64)
    den = float(torch.einsum("oi,ij,oj->", w64, h, w64))
    return float(torch.einsum("oi,ij,oj->", d, h, d)) / max(den, 1e-300)


def _round_weight(
    weight: Tensor, quantizer: Quantizer, hessian: Tensor, damp: float, block: int, act_order: bool
) -> dict[str, float]:
    """GPTQ-round one 2-D ``weight`` in place; its RTN and GPTQ relative output errors."""
    spec = quantizer.spec
    qp = quantizer.qparams()
    with torch.no_grad():
        h = hessian.to(device=weight.device, dtype=torch.float64)
        rtn = quantizer(weight)
    if isinstance(spec, Codebook):
        with torch.no_grad():
            rounder = column_rounder(qp)
            new = gptq_weight(
                weight, h, qp.scale, None, 0, 0, damp=damp, block=block, act_order=act_order,
                round_fn=rounder,
            )  # fmt: skip
            new = quantizer(new)  # on the quantizer's own float arithmetic
            errors = {"rtn_error": _output_error(weight, rtn, h)}
            errors["error"] = _output_error(weight, new, h)
            weight.copy_(new)
        return errors
    scale, zp = column_qparams(qp, (weight.shape[0], weight.shape[1]))
    with torch.no_grad():
        new = gptq_weight(
            weight,
            h,
            scale,
            zp,
            qp.qmin,
            qp.qmax,
            rounding=spec.rounding,
            damp=damp,
            block=block,
            act_order=act_order,
        )
        errors = {
            "rtn_error": _output_error(weight, rtn, h),
            "error": _output_error(weight, new, h),
        }
        weight.copy_(new)
    return errors


def gptq(
    model: nn.Module,
    data: Any,
    num_batches: int | None = None,
    *,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = True,
    progress: bool = True,
) -> Report:
    """Re-round the weights of the calibrated quantized Linear layers of ``model`` by GPTQ.

    See the module docs for exactly what is computed. Call it after
    :func:`~tnquant.ptq.calibrate` (the weight qparams must be stored; they
    are kept); it changes the float weights in place.

    Parameters
    ----------
    model
        The quantized, calibrated model.
    data
        Calibration batches (read once per layer plus once to find the
        forward order: a list or a DataLoader, not a one-shot iterator).
    num_batches
        Use at most this many batches.
    damp, block, act_order
        See :func:`gptq_weight`.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        One row per layer: ``name``, ``kind='gptq'``, ``layer``, ``rows``
        (input rows seen), ``rtn_error`` and ``error``: the relative output
        error ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` on the calibration
        inputs of round-to-nearest and of GPTQ; skipped layers with the reason.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> gptq(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False).rows
    []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_model(model, "GPTQ", finite=True)
    check_data(data, "GPTQ", reiterable=True)
    report = Report("gptq", columns=("name", "kind", "layer", "rows", "rtn_error", "error"))
    targets, skipped = gptq_targets(model)
    for name, kind, reason in skipped:
        report.skip(name, kind, reason)
    if not targets:
        return report
    order = layer_order(
        model, data, num_batches, targets, report, what="GPTQ", unreached="not reached by the data"
    )
    for name in tqdm(order, desc="GPTQ", disable=not progress):
        module = targets[name]
        gram = capture_grams(
            model, {name: module}, iterate_batches(data, num_batches, what="GPTQ"), desc=name
        )[name]
        if gram.h is not None:
            _round_layer(name, module, gram, report, damp, block, act_order)
    return report


def _round_layer(
    name: str,
    module: nn.Module,
    gram: Gram,
    report: Report,
    damp: float,
    block: int,
    act_order: bool,
) -> None:
    """GPTQ-round one target layer on its input Gram matrix; one report row per weight."""
    h = cast(Tensor, gram.h)
    if isinstance(module, LowRankLinear):
        # x -> V x -> U (V x): V sees the layer's inputs, U the rounded V's outputs
        u, v = module.cores
        qu, qv = (cast(Quantizer, q) for q in cast(nn.ModuleList, module.core_quantizers))
        h_x = h.to(v.device)
        report.add(
            name=f"{name}.cores.1",
            kind="gptq",
            layer="LowRankLinear",
            rows=gram.rows,
            **_round_weight(v, qv, h_x, damp, block, act_order),
        )
        with torch.no_grad():
            vq = qv(v).to(torch.float64)
        report.add(
            name=f"{name}.cores.0",
            kind="gptq",
            layer="LowRankLinear",
            rows=gram.rows,
            **_round_weight(u, qu, vq @ h_x @ vq.T, damp, block, act_order),
        )
    else:
        report.add(
            name=name,
            kind="gptq",
            layer=type(module).__name__,
            rows=gram.rows,
            **_round_weight(
                weight_pairs(module)[0][1],  # (out, in): a Conv1D's weight.mT, written through
                cast(Quantizer, module.weight_quantizer),
                h,
                damp,
                block,
                act_order,
            ),
        )
