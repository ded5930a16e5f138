"""GPTQ with nearest-codebook-entry rounding: on the codebook, and better than RTN on the data."""

from __future__ import annotations

import torch
from torch import nn

import tnquant
from tnquant import Codebook
from tnquant.ptq import gptq


def _output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - q).T).square().sum() / (x @ w.T).square().sum())


def test_gptq_rounds_to_codebook_entries_and_beats_rtn():
    torch.manual_seed(0)
    mix = torch.randn(64, 64) * 0.3 + torch.eye(64)  # correlated inputs: GPTQ's case
    data = [torch.randn(128, 64) @ mix for _ in range(4)]
    model = nn.Sequential(nn.Linear(64, 32))
    w0 = model[0].weight.detach().clone()
    tnquant.quantize(model, weights=Codebook(kind="kmeans", bits=3, granularity=("group", 32)))
    tnquant.calibrate(model, data, progress=False)
    q = model[0].weight_quantizer
    rtn = q(w0).detach()
    report = gptq(model, data, progress=False)
    (row,) = report.rows
    assert row["error"] < 0.8 * row["rtn_error"], row
    w = model[0].weight.detach()
    # the new weights sit on the stored grid: the quantizer maps them to themselves
    assert torch.equal(q(w), w)
    # every value is a table entry times its group's absmax scale
    qp = q.qparams()
    allowed = qp.codebook[None, None, :] * qp.scale.reshape(32, 2, 1)
    hits = (w.reshape(32, 2, 32, 1) == allowed[:, :, None, :]).any(-1)
    assert bool(hits.all())
    # an independent measure of the output error on fresh inputs
    x = torch.randn(512, 64) @ mix
    assert _output_error(w0, w, x) < _output_error(w0, rtn, x)
