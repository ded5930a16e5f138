"""search / pareto end to end: budgets as model_size_bits counts them, sensitive layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.planning.toys import TwoBranch, batches, cnn, mlp
from tnquant import model_size_bits
from tnquant.planning import Candidates, Choice, Plan, apply, pareto, search, sensitivity

QUANT_ONLY = Candidates(formats=(), bits=(8, 4, 2), ternary=True, binary=True)


@pytest.fixture(scope="module")
def mlp_sens():
    model = mlp()
    return model, sensitivity(model, batches(), progress=False)


def applied_size(model, plan):
    new = copy.deepcopy(model)
    apply(new, plan, progress=False)
    return model_size_bits(new)


def test_budget_is_respected_as_model_size_bits_counts_it(mlp_sens):
    model, sens = mlp_sens
    dense = model_size_bits(model)
    for frac in (0.05, 0.1, 0.2, 0.4):
        budget = int(frac * dense)
        plan = search(model, batches(), budget_bits=budget, precomputed=sens, progress=False)
        size = applied_size(model, plan)
        assert size <= budget
        assert size == plan.predicted_size_bits == plan.measured_size_bits
        assert plan.measured_error is not None and plan.measured_output_error is not None


def test_tighter_budget_never_gives_a_larger_model(mlp_sens):
    model, sens = mlp_sens
    dense = model_size_bits(model)
    sizes, errors = [], []
    for frac in np.linspace(0.5, 0.035, 12):
        plan = search(
            model,
            batches(),
            budget_bits=int(frac * dense),
            precomputed=sens,
            verify_plan=False,
            progress=False,
        )
        sizes.append(applied_size(model, plan))
        errors.append(plan.predicted_error)
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert all(a <= b for a, b in zip(errors, errors[1:], strict=False))


def test_dominant_branch_gets_more_bits():
    model = TwoBranch(scale=100.0).eval()
    data = batches()
    budget = model_size_bits(model) // 5
    plan = search(
        model, data, metric="output", budget_bits=budget, candidates=QUANT_ONLY, progress=False
    )
    big, small = plan.layers["big"]["size_bits"], plan.layers["small"]["size_bits"]
    assert big > small, plan.table()
    # the same layers, unscaled, are treated alike
    even = search(
        TwoBranch(scale=1.0).eval(),
        data,
        metric="output",
        budget_bits=budget,
        candidates=QUANT_ONLY,
        progress=False,
    )
    assert abs(even.layers["big"]["size_bits"] - even.layers["small"]["size_bits"]) < big - small


def test_scaled_metric_weights_layers_by_their_effect_on_the_output():
    model = TwoBranch(scale=100.0).eval()
    data = batches()
    layer = sensitivity(model, data, QUANT_ONLY, progress=False)
    scaled = sensitivity(model, data, QUANT_ONLY, metric="scaled", progress=False)
    big, small = scaled.names.index("big"), scaled.names.index("small")
    for k in (big, small):  # one factor per layer
        ratios = [s / e for s, e in zip(scaled.errors[k], layer.errors[k], strict=True) if e > 0]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    # big dominates the output: its errors weigh ~1, small's ~1e-4
    assert scaled.errors[big][-1] > 100 * scaled.errors[small][-1]
    plan = search(
        model,
        data,
        metric="scaled",
        budget_bits=model_size_bits(model) // 5,
        candidates=QUANT_ONLY,
        progress=False,
    )
    assert plan.layers["big"]["size_bits"] > plan.layers["small"]["size_bits"]
    assert plan.measured_error == plan.measured_output_error


def test_low_rank_layer_gets_the_lower_rank():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():  # layer 0 is exactly rank 4, layer 1 full rank
        model[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
    cands = [Choice(None)] + [
        Choice(__import__("tnquant").LowRank(ratio=r)) for r in (0.5, 0.25, 0.125)
    ]
    plan = search(
        model,
        batches(shape=(128, 64)),
        budget_bits=model_size_bits(model) * 6 // 10,
        candidates=cands,
        progress=False,
    )
    assert plan["0"].factorization is not None
    size0, size1 = plan.layers["0"]["size_bits"], plan.layers["1"]["size_bits"]
    assert size0 < size1, plan.table()
    assert plan.layers["0"]["error"] < 1e-10


def test_target_gives_the_smallest_plan_within_it(mlp_sens):
    model, sens = mlp_sens
    loose = search(model, batches(), target=0.05, precomputed=sens, progress=False)
    tight = search(model, batches(), target=0.005, precomputed=sens, progress=False)
    assert loose.predicted_error <= 0.05 and tight.predicted_error <= 0.005
    assert tight.predicted_size_bits >= loose.predicted_size_bits


def test_lagrangian_method_is_feasible(mlp_sens):
    model, sens = mlp_sens
    budget = model_size_bits(model) // 8
    lag = search(
        model, batches(), budget_bits=budget, precomputed=sens, method="lagrangian", progress=False
    )
    dp = search(model, batches(), budget_bits=budget, precomputed=sens, progress=False)
    assert lag.measured_size_bits <= budget
    assert lag.predicted_error >= dp.predicted_error - 1e-12


def test_plan_survives_json_and_gives_the_same_model(mlp_sens):
    model, sens = mlp_sens
    plan = search(
        model, batches(), budget_bits=model_size_bits(model) // 6, precomputed=sens, progress=False
    )
    back = Plan.from_json(plan.to_json())
    assert back == plan
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply(a, plan, progress=False)
    apply(b, back, progress=False)
    x = batches()[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_cnn_search_and_errors():
    model = cnn()
    data = [torch.randn(16, 1, 8, 8)]
    plan = search(model, data, budget_bits=model_size_bits(model) // 6, progress=False)
    assert plan.measured_size_bits <= model_size_bits(model) // 6
    with pytest.raises(ValueError, match="smallest model the candidates give"):
        search(model, data, budget_bits=100, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        search(model, data, progress=False)
    with pytest.raises(ValueError, match="budget_bits"):
        search(model, data, budget_bits=0.5, progress=False)


def test_pareto_points_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = mlp()
    out = tmp_path / "pareto.png"
    points = pareto(
        model, batches(), budgets=[0.1, 0.2, 0.4], candidates=QUANT_ONLY, path=out, progress=False
    )
    assert len(points) == 3
    dense = model_size_bits(model)
    for (size, err, plan), frac in zip(points, (0.1, 0.2, 0.4), strict=False):
        assert size == applied_size(model, plan) <= int(frac * dense)
        assert err == plan.measured_error
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.warns(UserWarning, match="skipped"):
        assert pareto(model, batches(), budgets=[10], candidates=QUANT_ONLY, progress=False) == []
