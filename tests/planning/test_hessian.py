"""Hutchinson Hessian traces vs an exact Jacobian; the 'hessian' metric vs 'output'."""

import pytest
import torch
from torch import nn

from tnquant import LowRank, QuantSpec
from tnquant.planning import Choice, sensitivity
from tnquant.planning.hessian import candidate_weight, hutchinson_traces


def test_trace_matches_exact_gauss_newton_of_a_nonlinear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(32, 3)
    w0 = model[0].weight.detach().clone()

    def outputs(w):  # the model as a function of its first weight only
        h = torch.tanh(x @ w.T + model[0].bias.detach())
        return model[2](h)

    jac = torch.autograd.functional.jacobian(outputs, w0)  # (32, 2, 4, 3)
    exact = float(jac.pow(2).sum())  # Tr(J^T J)
    traces, den = hutchinson_traces(model, [model[0]], [x], probes=2000)
    assert traces[0] == pytest.approx(exact, rel=0.05)
    assert den == pytest.approx(float(model(x).detach().pow(2).sum()))
    assert model[0].weight.requires_grad  # restored


def test_hessian_metric_agrees_with_output_metric():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    data = [torch.randn(128, 16) for _ in range(2)]
    choices = [Choice(None, QuantSpec(bits=b, granularity="channel")) for b in (8, 6, 4)]
    hess = sensitivity(model, data, choices, metric="hessian", progress=False)
    out = sensitivity(model, data, choices, metric="output", progress=False)
    assert hess.metric == "hessian"
    for h, o in zip(hess.errors, out.errors, strict=True):
        assert h[0] < h[1] < h[2]  # fewer bits, more error
        for he, oe in zip(h, o, strict=True):
            assert 0.2 < he / oe < 5  # second order, isotropic: the right magnitude


def test_candidate_weight_of_each_layer_kind():
    torch.manual_seed(2)
    dense = nn.Linear(6, 5)
    assert torch.equal(candidate_weight(dense), dense.weight)
    sens = sensitivity(
        nn.Sequential(dense),
        [torch.randn(8, 6)],
        [Choice(LowRank(rank=2), None)],
        metric="hessian",
        progress=False,
    )
    assert sens.errors[0][0] > 0
    with pytest.raises(ValueError, match="probes"):
        hutchinson_traces(nn.Sequential(dense), [dense], [torch.randn(2, 6)], probes=0)
