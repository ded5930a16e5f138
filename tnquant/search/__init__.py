"""Search per-layer formats, ranks and bit widths under a size budget or an error target.

- :func:`search` -> :class:`Plan`: sensitivities, an exact DP allocation,
  verification on the data;
- :func:`apply`: carry a plan out (``factorize`` + ``quantize``, in place);
- :func:`pareto`: one plan per budget, the size-error trade-off (and a plot);
- :class:`Candidates` / :class:`Choice`: what each layer may become.

``tnquant.search``, ``tnquant.apply``, ``tnquant.Plan`` and ``tnquant.pareto``
are re-exported at the top level (``tnquant.search`` there is the function);
import the rest by name: ``from tnquant.search import Candidates, sensitivity``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import model_size_bits
>>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
>>> plan = search(model, [torch.randn(64, 32)], budget_bits=model_size_bits(model) // 8,
...               progress=False)
>>> _ = apply(model, plan, progress=False)
>>> model_size_bits(model) <= plan.budget_bits
True
"""

from tnquant.search.allocate import Allocation, Table, allocate, lagrangian
from tnquant.search.api import plan_from, search, verify
from tnquant.search.candidates import Candidates
from tnquant.search.pareto import pareto, plot_pareto
from tnquant.search.plan import Choice, Plan, apply
from tnquant.search.sensitivity import Sensitivity, sensitivity

__all__ = [
    "search",
    "apply",
    "Plan",
    "Choice",
    "pareto",
    "plot_pareto",
    "Candidates",
    "Sensitivity",
    "sensitivity",
    "allocate",
    "lagrangian",
    "Table",
    "Allocation",
    "plan_from",
    "verify",
]
