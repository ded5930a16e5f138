"""The one road: run_pipeline against the verbs called by hand, stage order, checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tnquant import LowRank, QuantSpec, calibrate, convert, factorize, finetune, quantize
from tnquant.cli.recipe import Recipe as RecipeFile
from tnquant.cli.recipe import parse_recipe
from tnquant.pipeline import (
    STAGES,
    CalibrateSection,
    FactorizeSection,
    FinetuneSection,
    QuantizeSection,
    Recipe,
    run_pipeline,
)
from tnquant.qat.config import FinetuneConfig


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 12, generator=gen) for _ in range(n)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


FULL = Recipe(
    factorize=FactorizeSection({"0": LowRank(rank=3)}),
    quantize=QuantizeSection(weights={"*": QuantSpec(bits=4, learnable=True)}),
    calibrate=CalibrateSection(num_batches=2),
    finetune=FinetuneSection(epochs=2, lr=1e-2, loss="cosine"),
)


def test_the_road_is_the_verbs_in_order():
    model, data = _mlp(), _data()
    torch.manual_seed(3)
    result = run_pipeline(model, FULL, data, progress=False)
    torch.manual_seed(3)
    ref = copy.deepcopy(model)  # the same road, by hand
    factorize(ref, {"0": LowRank(rank=3)}, data=data, progress=False)
    quantize(ref, weights={"*": QuantSpec(bits=4, learnable=True)}, progress=False)
    calibrate(ref, data, 2, progress=False)
    finetune(ref, data, model, epochs=2, lr=1e-2, loss="cosine", progress=False)
    convert(ref, progress=False)
    assert _same(result.model, ref)
    ran = [s.name for s in STAGES if s.name not in ("rotate", "search", "gptq")]
    assert list(result.reports) == list(result.seconds) == ran
    assert all(t >= 0 for t in result.seconds.values())
    assert type(model[0]) is nn.Linear  # the input model is not changed


def test_stages_run_only_when_the_recipe_asks():
    only = Recipe(factorize=FactorizeSection({"0": LowRank(rank=3)}, data_aware=False))
    result = run_pipeline(_mlp(), only, _data(), progress=False)
    assert list(result.reports) == ["factorize"]
    kept = Recipe(quantize=QuantizeSection(weights={"*": QuantSpec(bits=8)}, convert=False))
    assert list(run_pipeline(_mlp(), kept, _data(), progress=False).reports) == [
        "quantize",
        "calibrate",
    ]


def test_after_sees_every_stage_in_order():
    seen = []
    run_pipeline(
        _mlp(),
        FULL,
        _data(),
        progress=False,
        after=lambda name, model, report, seconds: seen.append((name, seconds >= 0)),
    )
    assert seen == [(s.name, True) for s in STAGES if s.name not in ("rotate", "search", "gptq")]


def test_task_loss_reads_labels_and_distill_false_has_no_teacher():
    data = _data()
    labels = [
        torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i))
        for i in range(len(data))
    ]
    recipe = Recipe(
        quantize=QuantizeSection(weights={"*": QuantSpec(bits=8)}, convert=False),
        finetune=FinetuneSection(task_loss="cross_entropy", distill=False, epochs=1, lr=1e-2),
    )
    model = _mlp()
    torch.manual_seed(0)
    got = run_pipeline(model, recipe, data, labels=labels, progress=False)
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    quantize(ref, weights={"*": QuantSpec(bits=8)}, progress=False)
    calibrate(ref, data, progress=False)
    report = finetune(
        ref,
        list(zip(data, labels, strict=True)),
        task_loss=nn.functional.cross_entropy,
        epochs=1,
        lr=1e-2,
        progress=False,
    )
    assert _same(got.model, ref)
    assert got.reports["finetune"].history.distill == report.history.distill == []


@pytest.mark.parametrize(
    "recipe, kwargs, match",
    [
        (Recipe(), {}, "neither search, factorize nor quantize"),
        (
            Recipe(
                quantize=QuantizeSection(weights={"*": QuantSpec()}),
                finetune=FinetuneSection(task_loss="cross_entropy"),
            ),
            {},
            "needs labels=",
        ),
        (
            Recipe(
                quantize=QuantizeSection(weights={"*": QuantSpec()}),
                finetune=FinetuneSection(distill=False),
            ),
            {},
            "distill=True or a task_loss",
        ),
    ],
)
def test_bad_recipes_are_refused_before_any_work(recipe, kwargs, match):
    model = _mlp()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=match):
        run_pipeline(model, recipe, _data(), progress=False, **kwargs)
    assert calls == []


def test_sections_are_checked_when_built():
    with pytest.raises(TypeError, match="Recipe.quantize must be a QuantizeSection"):
        Recipe(quantize={"*": QuantSpec()})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        FinetuneSection(lr=0.0)
    with pytest.raises(TypeError, match="distill must be a bool"):
        FinetuneSection(distill=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="recipe must be a tnquant.pipeline.Recipe"):
        run_pipeline(_mlp(), {"quantize": {}}, _data())  # type: ignore[arg-type]


def test_finetune_section_is_a_finetune_config():
    section = FinetuneSection(lr=1e-3, loss="kl", distill=False)
    config = section.config(seed=5, progress=False)
    assert type(config) is FinetuneConfig
    assert (config.lr, config.loss, config.seed, config.progress) == (1e-3, "kl", 5, False)
    defaults = FinetuneConfig()
    assert all(
        getattr(FinetuneSection(), f) == getattr(defaults, f)
        for f in FinetuneConfig.__dataclass_fields__
    )


def test_a_recipe_file_runs_on_the_pipeline():
    recipe = parse_recipe(
        '[factorize]\n"0" = {format = "lowrank", rank = 3}\n'
        '[quantize.weights]\n"*" = {bits = 4}\n[finetune]\nepochs = 1\n'
    )
    assert isinstance(recipe, RecipeFile) and isinstance(recipe, Recipe)
    result = run_pipeline(_mlp(), recipe, _data(), progress=False)
    assert list(result.reports) == ["factorize", "quantize", "calibrate", "finetune", "convert"]
