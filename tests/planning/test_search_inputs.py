"""search / sensitivity / verify refuse unusable models and data up front, saying why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.planning.toys import batches, mlp
from tnquant import model_size_bits
from tnquant.planning import Candidates, Choice, Plan, search, sensitivity, verify
from tnquant.specs import LowRank, QuantSpec

INT8 = Candidates(formats=(), bits=(8,), ternary=False, binary=False)
LOWRANK = [Choice(None, QuantSpec(bits=8)), Choice(LowRank(ratio=0.5), QuantSpec(bits=8))]


def _budget(model: nn.Module) -> int:
    return model_size_bits(model) // 2


def test_one_shot_data_is_refused_where_it_is_read_twice():
    model = mlp()
    # before: sensitivities emptied the iterator and the plan was verified on nothing
    with pytest.raises(TypeError, match="search reads the data several times.*one-shot"):
        search(model, iter(batches()), budget_bits=_budget(model), candidates=INT8, progress=False)
    with pytest.raises(TypeError, match="search reads the data several times"):
        sensitivity(model, (b for b in batches()), INT8, "output", progress=False)


def test_one_shot_data_read_once_is_fine():
    model = mlp()
    once = search(
        model,
        iter(batches()),
        budget_bits=_budget(model),
        candidates=INT8,
        verify_plan=False,
        progress=False,
    )
    listed = search(
        model,
        batches(),
        budget_bits=_budget(model),
        candidates=INT8,
        verify_plan=False,
        progress=False,
    )
    assert once.predicted_error == listed.predicted_error
    assert once.predicted_size_bits == listed.predicted_size_bits


def test_one_shot_fit_data_is_refused_when_the_plan_is_verified():
    model = mlp()
    with pytest.raises(TypeError, match="search reads the data several times"):
        search(
            model,
            batches(),
            budget_bits=_budget(model),
            candidates=LOWRANK,
            fit_data=iter(batches()),
            progress=False,
        )


def test_verify_on_exhausted_data_is_refused_not_zero():
    model = mlp()
    plan = Plan({"0": Choice(None, QuantSpec(bits=2))})
    data = iter(batches())
    list(data)  # already read
    # before: measured_error came back 0.0
    with pytest.raises(
        ValueError, match="search needs at least one batch of data, got an empty list_iterator"
    ):
        verify(model, plan, data)


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_data_is_refused(empty):
    model = mlp()
    with pytest.raises(ValueError, match="search needs at least one batch of data"):
        search(model, empty, budget_bits=_budget(model), candidates=INT8, progress=False)
    with pytest.raises(ValueError, match="search needs at least one batch of fit_data"):
        search(
            model,
            batches(),
            budget_bits=_budget(model),
            candidates=LOWRANK,
            fit_data=empty,
            progress=False,
        )


@pytest.mark.parametrize("metric", [None, "output", "hessian", "scaled"])
def test_non_finite_data_names_the_batch_not_no_plan_fits(metric):
    model = mlp()
    data = batches(n=3)
    data[2][5, :4] = float("nan")
    data[2][6, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"search: batch 2 of data holds 5 non-finite values "
        r"\(NaN or inf\) in the batch, a float32 tensor of "
        r"shape \(64, 32\)",
    ):
        search(model, data, metric, budget_bits=_budget(model), candidates=INT8, progress=False)


def test_non_finite_fit_data_names_it():
    model = mlp()
    fit = batches()
    fit[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"search: batch 0 of fit_data holds 1 non-finite"):
        search(
            model,
            batches(),
            budget_bits=_budget(model),
            candidates=LOWRANK,
            fit_data=fit,
            progress=False,
        )


def test_non_finite_weights_name_the_parameter():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, :7] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"search: parameter '2.weight' holds 7 non-finite "
        r"values \(NaN or inf\) of 2304",
    ):
        search(model, batches(), budget_bits=_budget(model), candidates=INT8, progress=False)


def test_meta_model_is_refused_with_how_to_materialize():
    model = mlp().to("meta")
    with pytest.raises(
        ValueError,
        match=r"search needs the model's values, but parameter "
        r"'0.weight' is on the meta device.*to_empty",
    ):
        search(model, batches(), budget_bits=10**6, candidates=INT8, progress=False)


def test_an_overflow_inside_the_model_names_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.fill_(3e38)  # finite weights, an infinite output
    with pytest.raises(
        ValueError,
        match=r"search: layer '2' got a non-finite error for 1 of "
        r"its 2 candidates \(dense/int8/channel: nan\)",
    ):
        search(model, [torch.rand(16, 8) + 1], budget_bits=10**6, candidates=INT8, progress=False)


def test_a_bad_grid_is_not_reported_as_no_plan_fits():
    model = mlp()
    with pytest.raises(ValueError, match="grid must be a positive int"):
        search(
            model, batches(), budget_bits=_budget(model), candidates=INT8, grid=0, progress=False
        )


def test_pareto_refuses_one_shot_data_instead_of_warning_every_budget_away():
    from tnquant.planning import pareto

    model = mlp()
    with pytest.raises(TypeError, match="search reads the data several times"):
        pareto(model, iter(batches()), budgets=[0.3, 0.6], candidates=INT8, progress=False)
    points = pareto(
        model,
        iter(batches()),
        budgets=[0.3, 0.6],
        candidates=INT8,
        verify_plans=False,
        progress=False,
    )  # read once
    assert len(points) == 2


def test_pareto_raises_on_non_finite_errors():
    from tnquant.planning import pareto

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.fill_(3e38)
    with pytest.raises(ValueError, match=r"search: layer '2' got a non-finite error"):
        pareto(model, [torch.rand(16, 8) + 1], budgets=[0.5], candidates=INT8, progress=False)
