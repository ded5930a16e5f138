"""Embeddings in the search: low-bit per-row / per-group tables and ``TTEmbedding``.

References: an embedding's error is the relative MSE of its lookups on the
token ids the data sends it, recomputed here from the applied layer's dense
table (numpy, no search code); a plan's applied size is its predicted and
measured size (:func:`tnquant.model_size_bits`); a tied LM head keeps one
stored table.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import TT, QuantSpec, apply, convert, model_size_bits, search
from tnquant.layers import TTEmbedding
from tnquant.planning import Candidates, Choice, Plan, sensitivity

VOCAB, DIM = 512, 64

CANDS = Candidates(
    formats=("tt",),
    ratios=(0.25,),
    bits=(8, 4, 3, 2),
    ternary=False,
    binary=False,
    embedding_granularity=("channel", ("group", 16)),
)


class Tiny(nn.Module):
    """Embedding -> Linear -> ReLU -> LayerNorm (float, never searched) -> Linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.fc2 = nn.Linear(DIM, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(torch.relu(self.fc1(self.emb(ids)))))


class TiedLM(nn.Module):
    """Embedding -> Linear -> LM head whose weight is the embedding's table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def _ids(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (8, 32), generator=g) for _ in range(n)]


def test_an_embedding_gets_per_row_per_group_and_tt_candidates():
    sens = sensitivity(Tiny().eval(), _ids(), CANDS, progress=False)
    assert sens.names == ["emb", "fc1", "fc2"]
    labels = [c.label() for c in sens.choices[0]]
    assert "dense/int3/channel" in labels and "TT(ratio=0.25)/int4/channel" in labels
    groups = [
        c.weights for c in sens.choices[0] if c.weights is not None and c.factorization is None
    ]
    grouped = [q for q in groups if q.granularity == ("group", 16)]
    assert len(grouped) == 4 and all(q.axis == 1 for q in grouped)  # along a row
    sizes = dict(zip(labels, sens.sizes[0], strict=True))
    # per group of 16 along a row: 4-bit codes + 4 float32 scales per row
    assert sizes["dense/int4/group16(axis=1)"] == VOCAB * DIM * 4 + VOCAB * 4 * 32
    assert sizes["dense/int4/channel"] == VOCAB * DIM * 4 + VOCAB * 32
    # the Linear layers keep the Linear grid (no per-group candidates)
    assert not any(isinstance(c.weights.granularity, tuple) for c in sens.choices[1] if c.weights)


@pytest.mark.parametrize("label", ["dense/int3/channel", "dense/int2/group16(axis=1)"])
def test_an_embeddings_error_is_its_lookup_error_on_the_captured_ids(label):
    model, data = Tiny().eval(), _ids()
    sens = sensitivity(model, data, CANDS, progress=False)
    c = [x.label() for x in sens.choices[0]].index(label)
    applied = copy.deepcopy(model)
    apply(applied, Plan({"emb": sens.choices[0][c]}), progress=False)
    convert(applied, progress=False)
    table = applied.emb.weight.detach().double().numpy()  # the stored codes, dequantized
    ref = model.emb.weight.detach().double().numpy()
    ids = torch.cat([b.reshape(-1) for b in data]).numpy()
    expected = ((table[ids] - ref[ids]) ** 2).sum() / (ref[ids] ** 2).sum()
    assert 0 < expected and sens.errors[0][c] == pytest.approx(expected, rel=1e-6)


def test_a_tight_whole_model_budget_compresses_the_embedding_and_fits():
    model, data = Tiny().eval(), _ids()
    whole = model_size_bits(model)
    budget = whole // 9  # below int8 everywhere (~3.9x): the table must go low-bit or TT
    plan = search(model, data, budget_bits=budget, candidates=CANDS, progress=False)
    emb = plan["emb"]
    assert emb.factorization is not None or (emb.weights is not None and emb.weights.bits <= 4)
    applied = copy.deepcopy(model)
    report = apply(applied, plan, progress=False)
    assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits
    assert plan.predicted_size_bits <= budget
    assert report.sizes is not None and report.sizes.model_after == model_size_bits(applied)
    assert report.sizes.model_before == whole == plan.original_size_bits
    assert plan.sizes() is not None and plan.sizes().model_after == plan.predicted_size_bits
    assert "whole model" in plan.table() and "compressed layers" in plan.table()
    assert Plan.from_json(plan.to_json()).sizes() == plan.sizes()  # original size travels


def test_a_tt_embedding_plan_applies_to_its_predicted_size():
    model, data = Tiny().eval(), _ids()
    cands = {
        "emb": [Choice(TT(ratio=0.25), QuantSpec(bits=8, granularity="channel"))],
        "fc*": CANDS,
    }
    plan = search(
        model, data, budget_bits=model_size_bits(model) // 6, candidates=cands, progress=False
    )
    applied = copy.deepcopy(model)
    apply(applied, plan, progress=False)
    assert isinstance(applied.emb, TTEmbedding)
    assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits
    assert plan.layers["emb"]["size_bits"] < VOCAB * DIM * 8  # smaller than an int8 table


def test_a_tied_head_follows_its_embeddings_table_choice_and_is_stored_once():
    model, data = TiedLM().eval(), _ids()
    sens = sensitivity(model, data, CANDS, progress=False)
    assert sens.names == ["emb", "fc"] and sens.tied == {"emb": ["head"]}
    assert all(c.factorization is None for c in sens.choices[0])  # TT would untie it
    assert any(
        c.weights is not None and c.weights.granularity == ("group", 16) for c in sens.choices[0]
    )
    budget = model_size_bits(model) // 7
    plan = search(model, data, budget_bits=budget, precomputed=sens, progress=False)
    assert plan["head"] == plan["emb"] and plan["emb"].weights is not None
    assert plan["emb"].weights.bits <= 4
    applied = copy.deepcopy(model)
    report = apply(applied, plan, progress=False)
    assert applied.head.weight_quantizer is applied.emb.weight_quantizer
    assert report.sizes is not None and report.sizes.model_after == model_size_bits(applied)
    assert report["head"]["bits_after"] == 0  # the shared table counts in its leader's row
    assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits
    assert plan.predicted_size_bits <= budget


def test_a_budget_over_the_searched_layers_alone_adds_the_rest():
    model, data = Tiny().eval(), _ids()
    sens = sensitivity(model, data, CANDS, progress=False)
    assert sens.fixed_bits == 2 * DIM * 32  # the LayerNorm
    layers_budget = (model_size_bits(model) - sens.fixed_bits) // 8
    plan = search(
        model,
        data,
        budget_bits=layers_budget,
        precomputed=sens,
        budget_scope="layers",
        progress=False,
    )
    assert plan.budget_bits == layers_budget + sens.fixed_bits
    assert plan.predicted_size_bits - sens.fixed_bits <= layers_budget
    with pytest.raises(ValueError, match="budget_scope must be 'model' or 'layers', got 'all'"):
        search(
            model,
            data,
            budget_bits=layers_budget,
            precomputed=sens,
            budget_scope="all",
            progress=False,
        )


def test_an_embedding_group_that_does_not_divide_its_rows_is_skipped_with_the_reason():
    cands = Candidates(
        formats=(),
        bits=(4,),
        ternary=False,
        binary=False,
        embedding_granularity=("channel", ("group", 48)),
    )
    sens = sensitivity(Tiny().eval(), _ids(1), cands, progress=False)
    rows = [r for r in sens.skipped if r[0] == "emb"]
    assert len(rows) == 1 and "group48" in rows[0][1] and "64" in rows[0][2]
    assert np.isfinite(sens.errors[0]).all()


@pytest.mark.parametrize("metric", ["scaled", "output", "hessian"])
def test_every_metric_measures_the_table_and_the_plan_applies_to_its_size(metric):
    model, data = Tiny().eval(), _ids()
    cands = Candidates(
        formats=("tt",),
        ratios=(0.25,),
        bits=(8, 3),
        ternary=False,
        binary=False,
        embedding_granularity=("channel",),
    )
    plan = search(
        model,
        data,
        metric=metric,
        budget_bits=model_size_bits(model) // 8,
        candidates=cands,
        progress=False,
    )
    assert plan["emb"].quantized and plan.layers["emb"]["error"] > 0  # measured, not free
    applied = copy.deepcopy(model)
    apply(applied, plan, progress=False)
    assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits
