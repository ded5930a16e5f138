"""Learning-rate schedules against the formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tnquant.qat.optim import make_optimizer, make_scheduler, warmup_steps


def _expected(kind, total, warmup):
    out = []
    for s in range(total):
        if s < warmup:
            out.append((s + 1) / (warmup + 1))
            continue
        p = (s - warmup) / (total - warmup)
        out.append(
            {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[
                kind
            ]
        )
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_scheduler_follows_the_formula(kind, warmup):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer("sgd", [{"params": [p], "lr": 0.5}])
    sched = make_scheduler(opt, kind, total=10, warmup=warmup)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * f for f in _expected(kind, 10, warmup)], rel=1e-12)
    assert min(seen) > 0  # no step is wasted at a zero rate


def test_warmup_forms_and_errors():
    assert warmup_steps(0.1, 50) == 5 and warmup_steps(7, 50) == 7 and warmup_steps(0.0, 9) == 0
    with pytest.raises(ValueError, match=r"fraction of the steps in \[0, 1\], got 1.5"):
        warmup_steps(1.5, 10)
    with pytest.raises(TypeError, match="got str"):
        warmup_steps("5", 10)
    with pytest.raises(ValueError, match=r"schedule must be one of \['cosine', 'linear'"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), "step", 5, 0)
