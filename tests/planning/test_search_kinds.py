"""The search over every dense kind of the registry: GPT-2's Conv1D, Conv1d, tied weights.

References: a ``Conv1D`` is a ``Linear`` on its transposed weight, so its
candidates must measure exactly what the same candidates measure on that
``Linear``; a plan's applied size is its predicted size; a tied LM head and
its embedding get one choice and one stored copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tnquant import QuantSpec, apply, model_size_bits, search
from tnquant.planning import Candidates, sensitivity
from tnquant.planning.sensitivity import search_targets

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CANDS = Candidates(formats=("lowrank",), ratios=(0.5,), bits=(8, 4), ternary=False, binary=False)


def _twins() -> tuple[nn.Module, nn.Module]:
    """The same two-layer MLP, once with ``Conv1D`` and once with ``nn.Linear``."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(24, 16), nn.GELU(), Conv1D(8, 24))
    lin = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    with torch.no_grad():
        for c, lyr in ((conv[0], lin[0]), (conv[2], lin[2])):
            lyr.weight.copy_(c.weight.T)
            lyr.bias.copy_(c.bias)
    return conv, lin


@pytest.mark.parametrize("metric", ["layer", "output", "hessian"])
def test_conv1d_candidates_measure_what_the_same_linear_measures(metric):
    conv, lin = _twins()
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    assert [n for n, _ in search_targets(conv)] == [["0"], ["2"]]
    a = sensitivity(conv, data, CANDS, metric=metric, progress=False)
    b = sensitivity(lin, data, CANDS, metric=metric, progress=False)
    assert [[c.label() for c in cs] for cs in a.choices] == [
        [c.label() for c in cs] for cs in b.choices
    ]
    assert a.sizes == b.sizes and a.fixed_bits == b.fixed_bits
    for ea, eb in zip(a.errors, b.errors, strict=True):  # Hutchinson: the same probes too
        assert ea == pytest.approx(eb, rel=1e-4, abs=1e-9)
    assert any(e > 0 for es in a.errors for e in es)


def test_conv1d_plan_applies_to_its_predicted_size():
    conv, _ = _twins()
    data = [torch.randn(32, 16)]
    budget = model_size_bits(conv) // 5
    plan = search(conv, data, budget_bits=budget, candidates=CANDS, progress=False)
    applied = copy.deepcopy(conv)
    apply(applied, plan, progress=False)
    assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits
    assert model_size_bits(applied) <= budget
    assert {type(m).__name__ for m in applied} - {"GELU"} <= {"QuantHFConv1D", "LowRankHFConv1D"}


def test_conv1d_nn_layers_are_searched_on_their_own_batches():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3))
    data = [torch.randn(4, 3, 20)]
    cands = Candidates(formats=("tucker",), ratios=(0.5,), bits=(8, 4), ternary=False, binary=False)
    sens = sensitivity(model, data, cands, progress=False)
    assert sens.names == ["0", "2"]
    assert {c.label().split("/")[0] for c in sens.choices[0]} == {"dense", "Tucker(ratio=0.5)"}
    plan = search(
        model, data, budget_bits=model_size_bits(model) // 4, candidates=cands, progress=False
    )
    assert plan.measured_size_bits == plan.predicted_size_bits


def _tied_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=97,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_a_tied_head_takes_its_embeddings_choice_and_is_stored_once():
    model = _tied_gpt2()
    data = [
        {"input_ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(k))}
        for k in range(2)
    ]
    sens = sensitivity(model, data, CANDS, progress=False)
    assert "lm_head" not in sens.names and "transformer.wte" in sens.names
    assert sens.tied == {"transformer.wte": ["lm_head"]}
    rows = {(n, kind): why for n, kind, why in sens.skipped}
    assert "tied to 'transformer.wte'" in rows[("lm_head", "all")]
    conv1d = [n for n in sens.names if n.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(conv1d) == 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    for budget in (model_size_bits(model) // 3, model_size_bits(model) // 6):
        plan = search(model, data, budget_bits=budget, candidates=CANDS, progress=False)
        assert plan["lm_head"] == plan["transformer.wte"]
        assert "(tied to 'transformer.wte')" in plan.table()
        back = type(plan).from_json(plan.to_json())
        assert back.layers["lm_head"]["tied_to"] == "transformer.wte"
        applied = copy.deepcopy(model)
        apply(applied, plan, progress=False)
        head, wte = applied.lm_head, applied.transformer.wte
        if plan["lm_head"].weights is not None:
            assert head.weight_quantizer is wte.weight_quantizer
        assert model_size_bits(applied) == plan.predicted_size_bits == plan.measured_size_bits


def test_a_tied_embedding_keeps_only_quantize_only_candidates():
    model = _tied_gpt2()
    data = [{"input_ids": torch.randint(0, 97, (2, 12))}]
    cands = Candidates(formats=("tt",), ratios=(0.5,), bits=(8,), ternary=False, binary=False)
    sens = sensitivity(model, data, cands, include=["transformer.wte", "lm_head"], progress=False)
    assert sens.names == ["transformer.wte"]
    assert all(c.factorization is None for c in sens.choices[0])
    rows = {(n, kind): why for n, kind, why in sens.skipped}
    assert "factorizing one member would untie them" in rows[("transformer.wte", "factorized")]
    assert isinstance(sens.choices[0][-1].weights, QuantSpec)
