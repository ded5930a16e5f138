"""Data-aware k-means codebooks: refit ``Codebook(kind='kmeans')`` weights on the input Gram.

The output error of a Linear layer ``y = W x`` is ``sum_i H_ii (W_oi - Q_oi)^2``
plus cross terms, ``H = X^T X`` over the calibration inputs. Keeping the
diagonal (as the factorization's data-aware fit and GPTQ's importance do),
every weight ``W_oi`` gets the importance ``H_ii``: the k-means objective of
:func:`~tnquant.quant.codebook.codebook_qparams` becomes
``sum H_ii s^2 (W_oi / s - c)^2``. :func:`fit_codebooks` collects ``H`` of
every dense layer (``weight_quantizer`` with a k-means ``Codebook`` whose
weight is 2-d) in one hooked pass per layer and stores the refitted scales
and centroids in the quantizer (as ``freeze`` does). Published tables
(``nf4``/``fp4``), factorized cores and other specs are left as they are.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import Codebook, quantize
>>> model = nn.Sequential(nn.Linear(8, 4))
>>> _ = quantize(model, weights=Codebook(kind="kmeans", bits=2, granularity="channel"),
...              progress=False)
>>> fit_codebooks(model, [torch.randn(16, 8)], progress=False).rows[0]["kind"]
'kmeans'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnquant.batches import check_data, iterate_batches
from tnquant.checks import check_model
from tnquant.core.capture import capture_grams
from tnquant.quant.codebook import codebook_qparams
from tnquant.quant.quantizer import Quantizer
from tnquant.report import Report
from tnquant.specs import Codebook

__all__ = ["fit_codebooks"]


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        q = module._modules.get("weight_quantizer")
        w = module._parameters.get("weight")
        if (
            isinstance(q, Quantizer)
            and isinstance(q.spec, Codebook)
            and q.spec.kind == "kmeans"
            and q.mode == "quantize"
            and w is not None
            and w.dim() == 2
            and isinstance(module, nn.Linear)
        ):
            out[name] = module
    return out


def fit_codebooks(
    model: nn.Module, data: Any, num_batches: int | None = None, *, progress: bool = True
) -> Report:
    """Refit the k-means codebooks of ``model``'s dense layers weighted by ``diag(X^T X)``.

    Parameters
    ----------
    model
        A model quantized with ``Codebook(kind='kmeans')`` weights.
    data
        Calibration batches (a list or a DataLoader; read once per layer).
    num_batches
        Use at most this many batches.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        One row per refitted layer: ``name``, ``kind='kmeans'``, ``rows``
        (input rows seen), ``error_before`` / ``error`` (the diagonal-weighted
        relative weight error ``sum H_ii (W - Q)^2 / sum H_ii W^2`` of the
        unweighted and the refitted codebook).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> fit_codebooks(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False).rows
    []
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_model(model, "fit_codebooks", finite=True)
    check_data(data, "fit_codebooks", reiterable=True)
    report = Report("fit_codebooks", columns=("name", "kind", "rows", "error_before", "error"))
    targets = _targets(model)
    for name, module in tqdm(targets.items(), desc="fit codebooks", disable=not progress):
        gram = capture_grams(
            model, {name: module}, iterate_batches(data, num_batches, what="fit_codebooks")
        )[name]
        if gram.h is None:
            report.skip(name, "kmeans", "not reached by the data")
            continue
        q: Quantizer = module.weight_quantizer
        w = module.weight.detach()
        diag = torch.diagonal(gram.h).to(device=w.device, dtype=w.dtype)
        importance = diag.expand_as(w)
        with torch.no_grad():
            before = (q(w) - w).square().mul(importance).sum()
            q.freeze(qparams=codebook_qparams(w, q.spec, importance))
            after = (q(w) - w).square().mul(importance).sum()
        total = float(w.square().mul(importance).sum().clamp_min(1e-30))
        report.add(
            name=name,
            kind="kmeans",
            rows=gram.rows,
            error_before=float(before) / total,
            error=float(after) / total,
        )
    return report
