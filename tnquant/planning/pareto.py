"""``pareto``: the size-error trade-off of a model, one searched plan per budget.

The sensitivities are measured once; every budget then costs one DP
lookup and (with ``verify_plans``) one pass of the applied copy over the
data. ``path=`` saves a plot (matplotlib, imported only then).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant.planning import Candidates
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> cands = Candidates(formats=(), bits=(8, 4, 2), ternary=False, binary=False)
>>> points = pareto(model, [torch.randn(32, 16)], budgets=[0.2, 0.5], candidates=cands,
...                 progress=False)  # fractions of the float model's size
>>> points[0][0] <= points[1][0]
True
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, cast

from torch import nn
from tqdm.auto import tqdm

from tnquant.planning.api import search
from tnquant.planning.inputs import check_errors, check_inputs, data_passes
from tnquant.planning.plan import Plan
from tnquant.planning.sensitivity import Metric, _metric_name, sensitivity

__all__ = ["pareto", "plot_pareto"]


def _budget_bits(budget: Any, dense_bits: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(
            f"budgets must be ints (bits) or floats in (0, 1] (fractions of the "
            f"model's size), got {budget!r}"
        )
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"a float budget is a fraction of the model size, in (0, 1]; got {budget}"
            )
        return int(budget * dense_bits)
    if budget < 1:
        raise ValueError(f"budgets in bits must be positive, got {budget}")
    return budget


def pareto(
    model: nn.Module,
    data: Any,
    budgets: Sequence[int | float] | None = None,
    metric: Metric = None,
    candidates: Any = None,
    *,
    path: str | os.PathLike | None = None,
    n_points: int = 8,
    verify_plans: bool = True,
    progress: bool = True,
    **kwargs: Any,
) -> list[tuple[int, float, Plan]]:
    """Search one plan per budget: the size-error trade-off curve.

    Parameters
    ----------
    model, data, metric, candidates
        As for :func:`~tnquant.planning.search`.
    budgets
        Sizes in bits (ints) or fractions of the model's size (floats in
        (0, 1]); by default ``n_points`` sizes spaced geometrically from the
        smallest plan the candidates allow to the model's size. Budgets
        nothing fits in are skipped with a warning.
    path
        Save a plot of error against size there (PNG, or any format
        matplotlib knows from the suffix); needs matplotlib.
    n_points
        Number of default budgets.
    verify_plans
        Apply and measure every plan (else the points are the predictions).
    progress
        Show progress bars.
    **kwargs
        Passed to :func:`~tnquant.planning.sensitivity.sensitivity`
        (``include``, ``exclude``, ``num_batches``, ``max_rows``).

    Returns
    -------
    list of (size_bits, error, Plan)
        One per feasible budget, in the order given: the measured size and
        error (``metric``'s terms) when verified, else the predicted ones.

    Raises
    ------
    TypeError, ValueError
        For a model or data :func:`~tnquant.planning.search` refuses (see
        :mod:`tnquant.planning.inputs`; ``data`` is read once per verified
        plan, so not a one-shot iterator then), and a layer whose
        candidates got non-finite errors; budgets nothing fits in only warn.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant.planning import Candidates
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> cands = Candidates(formats=(), bits=(8, 2), ternary=False, binary=False)
    >>> points = pareto(model, [torch.randn(32, 16)], budgets=[2000, 6000],
    ...                 candidates=cands, progress=False)
    >>> [size <= b for (size, _, _), b in zip(points, [2000, 6000])]
    [True, True]
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ValueError(f"n_points must be a positive int, got {n_points!r}")
    if path is not None:
        _require_matplotlib()
    verified = (len(budgets) if budgets is not None else n_points) if verify_plans else 0
    check_inputs(
        model,
        data,
        data_reads=data_passes(_metric_name(metric)) + verified,
        fit_data=kwargs.get("fit_data"),
        fit_reads=1 + verified,
    )
    sens = sensitivity(model, data, candidates, metric, progress=progress, **kwargs)
    check_errors(sens)  # not a warning per budget
    if budgets is None:
        lo, hi = sens.min_size_bits(), sens.dense_bits
        if n_points == 1 or hi <= lo:
            bits = [hi]
        else:
            bits = [int(math.ceil(lo * (hi / lo) ** (k / (n_points - 1)))) for k in range(n_points)]
    else:
        bits = [_budget_bits(b, sens.dense_bits) for b in budgets]
    num_batches = kwargs.get("num_batches")
    points: list[tuple[int, float, Plan]] = []
    for budget in tqdm(bits, desc="pareto", disable=not progress):
        try:
            plan = search(
                model,
                data,
                metric,
                budget_bits=budget,
                precomputed=sens,
                verify_plan=verify_plans,
                num_batches=num_batches,
                fit_data=kwargs.get("fit_data"),
                progress=False,
            )
        except ValueError as err:
            warnings.warn(f"budget {budget} bits skipped: {err}", stacklevel=2)
            continue
        size = plan.measured_size_bits if verify_plans else plan.predicted_size_bits
        error = plan.measured_error if verify_plans else plan.predicted_error
        points.append((int(cast(int, size)), float(cast(float, error)), plan))
    if path is not None:
        plot_pareto(points, path, dense_bits=sens.dense_bits)
    return points


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or tnquant[plot])"
        ) from None


def plot_pareto(
    points: Sequence[tuple[int, float, Plan]],
    path: str | os.PathLike,
    dense_bits: int | None = None,
) -> None:
    """Plot error against size (measured and predicted) and save it to ``path``.

    Uses ``matplotlib.figure.Figure`` directly: no pyplot, no global state.

    Examples
    --------
    >>> import tempfile, os
    >>> from tnquant.planning.plan import Plan
    >>> plan = Plan({}, predicted_size_bits=800, predicted_error=0.01)
    >>> out = os.path.join(tempfile.mkdtemp(), "p.png")
    >>> plot_pareto([(800, 0.02, plan)], out); os.path.getsize(out) > 0
    True
    """
    _require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    kib = 8 * 1024
    metric = points[0][2].metric if points else "error"
    xs = [p[0] / kib for p in points]
    ys = [p[1] for p in points]
    ax.plot(xs, ys, "o-", label="measured")
    pred = [
        (p[2].predicted_size_bits / kib, p[2].predicted_error)
        for p in points
        if p[2].predicted_size_bits is not None and p[2].predicted_error is not None
    ]
    if pred:
        ax.plot(*zip(*pred, strict=True), "x--", label="predicted (summed)")
    if dense_bits is not None:
        ax.axvline(dense_bits / kib, color="gray", lw=0.8, ls=":", label="dense model")
    if ys and all(y > 0 for y in ys) and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("model size (KiB, as model_size_bits counts it)")
    ax.set_ylabel(f"error ({metric})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
