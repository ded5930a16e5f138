"""Plan / Choice: JSON round trip, validation, and apply == factorize + quantize by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.planning.toys import batches, cnn, mlp
from tnquant import (
    TT,
    Binary,
    FixedPoint,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    factorize,
    model_size_bits,
    quantize,
)
from tnquant.planning import Choice, Plan, apply


def full_plan() -> Plan:
    return Plan(
        {
            "0": Choice(LowRank(ratio=0.25), QuantSpec(bits=4, granularity="channel")),
            "2": Choice(TT(ratio=0.5, order=2), Ternary(), cores={1: QuantSpec(bits=8)}),
            "4": Choice(None, Binary(granularity="channel")),
        },
        layers={"0": {"size_bits": 123, "error": 0.5, "ranks": [4]}},
        metric="layer",
        budget_bits=1000,
        predicted_size_bits=900,
        predicted_error=0.1,
        measured_size_bits=900,
        measured_error=0.2,
        measured_output_error=0.3,
    )


def test_json_round_trip():
    plan = full_plan()
    text = plan.to_json()
    json.loads(text)  # plain JSON
    back = Plan.from_json(text)
    assert back == plan
    assert back["2"].cores == ((1, QuantSpec(bits=8)),)
    assert back["2"].factorization == TT(ratio=0.5, order=2)
    assert back.budget_bits == 1000 and back.layers["0"]["ranks"] == [4]


def test_round_trip_of_every_spec_kind():
    plan = Plan(
        {
            "a": Choice(Tucker(rank=(3, 2)), FixedPoint(8, 3)),
            "b": Choice(None, QuantSpec(bits=6, symmetric=False, granularity=("group", 4))),
            "c": Choice(None, None),
        }
    )
    assert Plan.from_json(plan.to_json()) == plan


def test_choice_validation():
    with pytest.raises(TypeError, match="factorization"):
        Choice(QuantSpec())
    with pytest.raises(TypeError, match="weights"):
        Choice(None, LowRank(rank=2))
    with pytest.raises(ValueError, match="factorized layers only"):
        Choice(None, None, cores={0: QuantSpec()})
    with pytest.raises(TypeError, match="int core indices"):
        Choice(LowRank(rank=2), None, cores={"0": QuantSpec()})
    with pytest.raises(TypeError, match="Choice"):
        Plan({"x": QuantSpec()})
    with pytest.raises(ValueError, match="unknown Plan field"):
        Plan.from_dict({"choices": {}, "bogus": 1})


def test_apply_equals_factorize_and_quantize_by_hand():
    model = mlp()
    by_hand = copy.deepcopy(model)
    plan = full_plan()
    report = apply(model, plan, progress=False)

    factorize(by_hand, {"0": LowRank(ratio=0.25), "2": TT(ratio=0.5, order=2)}, progress=False)
    quantize(
        by_hand,
        weights={
            "0": QuantSpec(bits=4, granularity="channel"),
            "2": Ternary(),
            "4": Binary(granularity="channel"),
        },
        cores={"2.cores.1": QuantSpec(bits=8)},
        progress=False,
    )
    x = batches()[0]
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))
    assert model_size_bits(model) == model_size_bits(by_hand)
    assert [r["name"] for r in report] == ["0", "2", "4"]
    assert report["0"]["format"] == "lowrank" and report["4"]["format"] == "dense"
    assert sum(r["bits_after"] for r in report) <= model_size_bits(model)


def test_apply_with_data_fits_the_factorized_layers_to_their_inputs():
    # correlated inputs (a few strong directions), where the data-aware fit differs from SVD
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32).unsqueeze(1)
    data = [torch.randn(128, 32, generator=g) @ mix for _ in range(2)]
    model = mlp()
    plan = Plan({"0": Choice(LowRank(ratio=0.25), None), "2": Choice(None, QuantSpec(bits=8))})
    plain, fitted, by_hand = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    apply(plain, plan, progress=False)
    apply(fitted, plan, data=data, progress=False)
    factorize(by_hand, {"0": LowRank(ratio=0.25)}, data=data, progress=False)
    quantize(by_hand, weights={"0": None, "2": QuantSpec(bits=8)}, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.equal(fitted(x), by_hand(x))
        assert fitted[0].ranks == plain[0].ranks
        # output error of the factorized layer alone: the data-aware fit is the better one
        ref = model[0](x)
        err_fit = (fitted[0](x) - ref).norm() / ref.norm()
        err_svd = (plain[0](x) - ref).norm() / ref.norm()
    assert err_fit < 0.8 * err_svd
    assert model_size_bits(fitted) == model_size_bits(plain)


def test_apply_on_a_cnn():
    model = cnn()
    by_hand = copy.deepcopy(model)
    plan = Plan(
        {
            "2": Choice(Tucker(ratio=0.5), QuantSpec(bits=4)),
            "6": Choice(None, QuantSpec(bits=8, granularity="channel")),
        }
    )
    apply(model, plan, progress=False)
    factorize(by_hand, {"2": Tucker(ratio=0.5)}, progress=False)
    quantize(
        by_hand,
        weights={"2": QuantSpec(bits=4), "6": QuantSpec(bits=8, granularity="channel")},
        progress=False,
    )
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))


def test_apply_rejects_unknown_layers():
    with pytest.raises(ValueError, match="does not have"):
        apply(mlp(), Plan({"nope": Choice(None, QuantSpec())}), progress=False)
    with pytest.raises(TypeError, match="Plan"):
        apply(mlp(), {"0": Choice()}, progress=False)
