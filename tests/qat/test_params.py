"""Freezing options train exactly the intended parameters; optimizer groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.qat.models import batches, compressed, mlp
from tnquant import LowRank, QuantSpec, factorize
from tnquant.qat import finetune, parameter_sets
from tnquant.quantization import quantize

# Written out by hand from the model below (the independent reference).
CORES = {"1.cores.0", "1.cores.1", "3.weight"}
SCALES = {"1.core_quantizers.0.scale", "1.core_quantizers.1.scale", "3.weight_quantizer.scale"}
OTHER = {"0.weight", "0.bias", "1.bias", "3.bias", "5.weight", "5.bias", "6.weight"}
FROZEN_BY_USER = {"6.bias"}
EXPECTED = {
    "all": CORES | SCALES | OTHER,
    "cores": CORES,
    "scales": SCALES,
    "cores+scales": CORES | SCALES,
}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(8),
        nn.Linear(8, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 4),
        nn.Linear(4, 4),
    )
    factorize(model, {"1": LowRank(rank=3)}, progress=False)
    quantize(
        model,
        weights={"1": QuantSpec(bits=3, learnable=True), "3": QuantSpec(bits=3, learnable=True)},
        progress=False,
    )
    model[6].bias.requires_grad_(False)
    data = batches(0, 3)
    with torch.no_grad():
        model(data[0])  # initialise the LSQ scales, so every value can be compared
    return model, data


def test_parameter_sets_partition_the_model():
    model, _ = _model()
    sets = {k: {n for n, _ in v} for k, v in parameter_sets(model).items()}
    assert sets["cores"] == CORES
    assert sets["scales"] == SCALES
    assert sets["other"] == OTHER | FROZEN_BY_USER


@pytest.mark.parametrize("train", list(EXPECTED))
def test_train_option_changes_exactly_its_parameters(train):
    model, data = _model()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(
        model,
        data,
        teacher,
        train=train,
        optimizer="sgd",
        lr=0.05,
        schedule="constant",
        warmup=0,
        clip_grad_norm=None,
        progress=False,
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == EXPECTED[train]
    flags = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert flags == FROZEN_BY_USER  # every flag restored


def test_groups_decay_and_learning_rates():
    model, data = _model()
    seen = {}

    def make(groups):
        seen.update({g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in groups})
        return torch.optim.SGD(groups, lr=123.0)

    labelled = [(x, torch.zeros(x.shape[0], 4)) for x in data]
    finetune(
        model,
        labelled,
        task_loss=lambda out, y: (out - y).pow(2).mean(),
        optimizer=make,
        lr=0.01,
        scale_lr=0.002,
        weight_decay=0.1,
        progress=False,
    )
    assert seen == {
        "cores": (0.01, 0.1, 3),
        "scales": (0.002, 0.0, 3),
        "other": (0.01, 0.1, 2),
        "no_decay": (0.01, 0.0, 5),
    }


def test_nothing_to_train_and_bad_optimizer_are_clear_errors():
    teacher = mlp()
    student = compressed(teacher, bits=None)  # factorization only: no scales
    with pytest.raises(ValueError, match=r"train='scales' selects no trainable parameter"):
        finetune(student, batches(0, 2), teacher, train="scales", progress=False)
    with pytest.raises(ValueError, match=r"train must be one of \['all', 'cores'"):
        finetune(student, batches(0, 2), teacher, train="weights", progress=False)
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer, got list"):
        finetune(student, batches(0, 2), teacher, optimizer=lambda groups: groups, progress=False)
