"""What ``search``, ``sensitivity``, ``verify`` and ``pareto`` check before any work starts.

The model goes through :func:`tnquant.checks.check_model` (not on the meta
device, finite parameters) and each data argument through
:func:`tnquant.batches.check_data`: not empty, and a list or a DataLoader,
not a one-shot iterator, when the search reads it more than once (how often
depends on the metric: :func:`data_passes`). Batches are checked for NaN and
inf as they are read (:func:`tnquant.batches.iterate_batches`). After the
sensitivities are measured, :func:`check_errors` names a layer whose
candidates got a non-finite error instead of letting the allocator report
that no plan fits.

Examples
--------
>>> data_passes("layer"), data_passes("hessian"), data_passes("output"), data_passes("fn")
(1, 1, 2, 0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from tnquant.batches import check_data, iterate_batches
from tnquant.checks import check_model

__all__ = ["data_passes", "check_inputs", "check_errors", "search_batches"]


def search_batches(
    data: Any, num_batches: int | None = None, *, arg: str = "data"
) -> Iterator[Any]:
    """The batches of ``data`` the search runs, each checked with the search named in messages.

    :func:`tnquant.batches.iterate_batches` with ``what='search'``: the passes
    of :mod:`tnquant.core.capture` take these batches, so a NaN in batch 2
    reads "search: batch 2 of data holds ...".

    Examples
    --------
    >>> import torch
    >>> len(list(search_batches([torch.ones(1)] * 3, 2)))
    2
    """
    return iterate_batches(data, num_batches, what="search", arg=arg)


def data_passes(metric_name: str) -> int:
    """How many times measuring sensitivities by ``metric_name`` reads ``data`` (at least).

    ``'layer'`` captures the inputs once and ``'hessian'`` runs the data once;
    ``'output'`` and ``'scaled'`` run it once more per candidate or layer
    (2 stands for "more than once"); a callable metric does not read it.

    Examples
    --------
    >>> data_passes("scaled")
    2
    """
    if metric_name in ("layer", "hessian"):
        return 1
    if metric_name in ("output", "scaled"):
        return 2
    return 0


def check_inputs(
    model: nn.Module, data: Any, *, data_reads: int, fit_data: Any = None, fit_reads: int = 0
) -> None:
    """Refuse a model or data the search cannot use, before anything is measured.

    ``data_reads``/``fit_reads``: how many times ``data``/``fit_data`` will be
    read (0: not read, so not checked; more than 1: a one-shot iterator is
    refused).

    Examples
    --------
    >>> import torch
    >>> check_inputs(nn.Linear(2, 2), [torch.ones(1, 2)], data_reads=2)
    >>> check_inputs(nn.Linear(2, 2), iter([torch.ones(1, 2)]), data_reads=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: search reads the data several times; ... got a one-shot list_iterator
    """
    check_model(model, "search", finite=True)
    if data_reads > 0:
        check_data(data, "search", reiterable=data_reads > 1)
    if fit_data is not None and fit_reads > 0:
        check_data(fit_data, "search", arg="fit_data", reiterable=fit_reads > 1)


def check_errors(sens: Any) -> None:
    """Raise ``ValueError`` naming the first layer with a non-finite candidate error.

    ``sens`` is a :class:`~tnquant.planning.sensitivity.Sensitivity`. A NaN
    error means the layer's (or the model's) output on the data is not
    finite; an infinite one that its reference output is all zero while the
    candidate's is not.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from tnquant import QuantSpec
    >>> from tnquant.planning.plan import Choice
    >>> sens = SimpleNamespace(names=["fc"], errors=[[0.0, float("nan")]],
    ...                        choices=[[Choice(None, None), Choice(None, QuantSpec(4))]])
    >>> check_errors(sens)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: search: layer 'fc' got a non-finite error for 1 of its 2 candidates (dense/int4...
    """
    for name, errors, choices in zip(sens.names, sens.errors, sens.choices, strict=True):
        bad = [
            (choice.label(), err)
            for choice, err in zip(choices, errors, strict=True)
            if not math.isfinite(err)
        ]
        if not bad:
            continue
        shown = ", ".join(f"{label}: {err}" for label, err in bad[:3])
        raise ValueError(
            f"search: layer {name!r} got a non-finite error for {len(bad)} of its "
            f"{len(errors)} candidates ({shown}); nan means its output (or the model's) on the "
            f"data is not finite (an overflow inside the model), inf that its output on the "
            f"data is all zero while the candidate's is not; leave it out "
            f"(exclude=[{name!r}]) or pass other data"
        )
