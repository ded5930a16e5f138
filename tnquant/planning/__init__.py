"""Planning: search per-layer formats, ranks and bit widths under a size budget or an error target.

- :func:`search` -> :class:`Plan`: sensitivities, an exact DP allocation,
  verification on the data;
- :func:`apply`: carry a plan out (``factorize`` + ``quantize``, in place);
- :func:`pareto`: one plan per budget, the size-error trade-off (and a plot);
- :class:`Candidates` / :class:`Choice`: what each layer may become.

``tnquant.search``, ``tnquant.apply``, ``tnquant.Plan`` and ``tnquant.pareto``
are re-exported at the top level (``tnquant.search`` is the function, and
only the function); import the rest by name:
``from tnquant.planning import Candidates, sensitivity``.

This subpackage was called ``tnquant.search`` before: ``from tnquant.search import
Candidates`` and ``from tnquant.search.plan import Plan`` now read
``from tnquant.planning import Candidates`` and ``from tnquant.planning.plan
import Plan`` (no alias is possible: ``tnquant.search`` is the function).

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

from tnquant.planning.allocate import Allocation, Table, allocate, lagrangian
from tnquant.planning.api import plan_from, search, verify
from tnquant.planning.candidates import Candidates
from tnquant.planning.pareto import pareto, plot_pareto
from tnquant.planning.plan import Choice, Plan, apply
from tnquant.planning.sensitivity import Sensitivity, sensitivity

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
