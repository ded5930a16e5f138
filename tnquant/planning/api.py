"""``search``: per-layer formats, ranks and bit widths under a size budget or an error target.

Three steps:

1. :func:`~tnquant.planning.sensitivity.sensitivity`: the size (bits, as
   :func:`tnquant.model_size_bits` counts them) and the error of every
   candidate of every layer, one layer changed at a time;
2. :func:`~tnquant.planning.allocate.allocate`: one candidate per layer, the
   least summed error within the budget (or the fewest bits within the
   target), exactly on the discretised sizes (dynamic programming);
3. verification (``verify=True``): the plan is applied to a copy of the
   model, whose size and error are measured on the data and stored next to
   the predicted ones (``plan.measured_size_bits``, ``plan.measured_error``,
   ``plan.measured_output_error``).

The predicted error adds the layers' errors up: a first-order model that
ignores how errors compound through the network; the measured one is the
truth on the data.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import model_size_bits
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
>>> data = [torch.randn(64, 32) for _ in range(2)]
>>> plan = search(model, data, budget_bits=model_size_bits(model) // 4, progress=False)
>>> plan.measured_size_bits == plan.predicted_size_bits <= model_size_bits(model) // 4
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from tnquant.batches import call_model
from tnquant.core.capture import evaluating, hooks
from tnquant.core.output import model_output
from tnquant.planning.allocate import DEFAULT_GRID, Allocation, allocate, fill
from tnquant.planning.inputs import check_errors, check_inputs, data_passes, search_batches
from tnquant.planning.plan import Plan, apply
from tnquant.planning.sensitivity import Metric, Sensitivity, _metric_name, sensitivity
from tnquant.sizes import model_size_bits

__all__ = ["search", "plan_from", "verify"]


def plan_from(
    sens: Sensitivity,
    alloc: Allocation,
    *,
    budget_bits: int | None = None,
    target: float | None = None,
) -> Plan:
    """The :class:`~tnquant.planning.plan.Plan` of an allocation over ``sens`` (not verified).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant.planning.allocate import Allocation
    >>> from tnquant.planning.sensitivity import Candidates
    >>> cands = Candidates(formats=(), bits=(8,), ternary=False, binary=False)
    >>> sens = sensitivity(nn.Sequential(nn.Linear(4, 4)), [torch.randn(8, 4)], cands,
    ...                    progress=False)
    >>> plan_from(sens, Allocation([1], sens.sizes[0][1], sens.errors[0][1]))["0"].label()
    'dense/int8/channel'
    """
    choices, layers = {}, {}
    for k, name in enumerate(sens.names):
        c = alloc.indices[k]
        choices[name] = sens.choices[k][c]
        layers[name] = {
            "label": sens.choices[k][c].label(),
            "ranks": list(sens.ranks[k][c]),
            "size_bits": sens.sizes[k][c],
            "error": sens.errors[k][c],
            "dense_bits": sens.sizes[k][_float_index(sens, k)],
        }
        params = getattr(sens, "params", None)  # a Sensitivity pickled before it had them
        if params:
            layers[name]["params"] = params[k]
        for follower in sens.tied.get(name, []):  # one tied tensor: one choice
            choices[follower] = choices[name]
            layers[follower] = {"label": choices[name].label(), "tied_to": name}
    return Plan(
        choices,
        layers,
        metric=sens.metric,
        budget_bits=budget_bits,
        target=target,
        predicted_size_bits=sens.fixed_bits + alloc.size,
        predicted_error=alloc.error,
        original_size_bits=sens.dense_bits,
    )


def _float_index(sens: Sensitivity, k: int) -> int:
    for c, choice in enumerate(sens.choices[k]):
        if choice.factorization is None and not choice.quantized:
            return c
    return max(range(len(sens.sizes[k])), key=lambda c: sens.sizes[k][c])


class _Accumulator:
    """Running ``sum ||y - ref||^2`` and ``sum ||ref||^2`` per key."""

    def __init__(self) -> None:
        self.num: dict[str, float] = {}
        self.den: dict[str, float] = {}

    def add(self, key: str, y: Tensor, ref: Tensor) -> None:
        self.num[key] = self.num.get(key, 0.0) + float((y.double() - ref.double()).pow(2).sum())
        self.den[key] = self.den.get(key, 0.0) + float(ref.double().pow(2).sum())

    def rel(self, key: str) -> float:
        den = self.den.get(key, 0.0)
        return self.num.get(key, 0.0) / den if den > 0 else 0.0


def _compare(
    ref_model: nn.Module, new_model: nn.Module, names: list[str], data: Any, num_batches: int | None
) -> tuple[float, float]:
    """(summed layer-output relative MSE, model-output relative MSE) of ``new`` vs ``ref``."""
    acc = _Accumulator()
    outs: dict[str, Tensor] = {}

    def ref_out(name: str, _m: nn.Module, _args: Any, out: Tensor) -> None:
        outs[name] = out.detach()

    def new_out(name: str, _m: nn.Module, _args: Any, out: Tensor) -> None:
        if name in outs:
            acc.add(name, out.detach(), outs.pop(name))

    ref_layers = {n: ref_model.get_submodule(n) for n in names}
    new_layers = {n: new_model.get_submodule(n) for n in names}
    with (
        hooks(ref_layers, post=ref_out),
        hooks(new_layers, post=new_out),
        evaluating(ref_model),
        evaluating(new_model),
    ):
        for batch in search_batches(data, num_batches):
            ref = model_output(call_model(ref_model, batch))
            new = model_output(call_model(new_model, batch))
            acc.add("__output__", new, ref)
            outs.clear()
    return sum(acc.rel(n) for n in names), acc.rel("__output__")


def verify(
    model: nn.Module,
    plan: Plan,
    data: Any,
    metric: Metric = None,
    *,
    num_batches: int | None = None,
    reference: float | None = None,
    fit_data: Any = None,
) -> Plan:
    """Apply ``plan`` to a copy of ``model`` and store its measured size and error in the plan.

    ``fit_data``: apply it with ``apply(copy, plan, data=fit_data)`` (the
    factorized Linear layers fitted to their inputs on those batches).

    ``measured_size_bits`` is :func:`tnquant.model_size_bits` of the copy;
    ``measured_output_error`` the relative MSE of its output against the
    model's on ``data``; ``measured_error`` the error in ``metric``'s
    terms: the summed relative MSE of every searched layer's output (with
    the errors of the layers before it) for ``'layer'``, the output's for
    ``'output'``, ``'scaled'`` and ``'hessian'``, ``metric(copy) - metric(model)`` for a callable
    (``reference`` is ``metric(model)`` when known). Returns the plan.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> from tnquant.planning.plan import Choice
    >>> plan = verify(nn.Sequential(nn.Linear(4, 4)), Plan({"0": Choice(None, QuantSpec(8))}),
    ...               [torch.randn(8, 4)])
    >>> plan.measured_error < 1e-3, plan.measured_size_bits  # 16 int8 codes, a scale, 4 biases
    (True, 288)
    """
    name = _metric_name(metric)
    check_inputs(model, data, data_reads=1, fit_data=fit_data, fit_reads=1)
    with evaluating(model, grad=torch.is_grad_enabled()):
        new = copy.deepcopy(model)
        apply(new, plan, data=fit_data, progress=False)
        new.eval()
        plan.measured_size_bits = model_size_bits(new)
        names = [n for n in plan if n in plan.layers] or list(plan)
        layer_err, out_err = _compare(model, new, names, data, num_batches)
        plan.measured_output_error = out_err
        if name == "layer":
            plan.measured_error = layer_err
        elif name in ("output", "scaled", "hessian"):
            plan.measured_error = out_err
        else:
            fn = cast(Callable[[nn.Module], float], metric)
            with torch.no_grad():
                base = float(fn(model)) if reference is None else reference
                plan.measured_error = float(fn(new)) - base
    return plan


def search(
    model: nn.Module,
    data: Any,
    metric: Metric = None,
    budget_bits: int | None = None,
    target: float | None = None,
    candidates: Any = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    method: str = "dp",
    grid: int = DEFAULT_GRID,
    num_batches: int | None = None,
    max_rows: int = 4096,
    fit_data: Any = None,
    verify_plan: bool = True,
    refine: bool = True,
    precomputed: Sensitivity | None = None,
    progress: bool = True,
    budget_scope: str = "model",
) -> Plan:
    """Choose a format, rank and weight quantizer per layer under a budget or a target.

    Parameters
    ----------
    model
        A dense model (left unchanged; carry the plan out with
        :func:`~tnquant.planning.plan.apply`).
    data
        Calibration batches (see :mod:`tnquant.batches`): a list or a
        DataLoader (read more than once), not empty, finite.
    metric
        What a candidate's error is (see :mod:`tnquant.planning.sensitivity`):
        ``None``/``'layer'`` (relative MSE of the layer's own output, fast),
        ``'scaled'`` (the same, each layer's rescaled to model-output error by
        one probe; one model pass per layer), ``'output'`` (relative MSE of
        the model output, one pass per candidate), ``'hessian'`` (the same to
        second order from Hutchinson Hessian traces, HAWQ-v2 style: no pass
        per candidate) or a callable ``metric(model) -> float``, lower is
        better (its increase).
    budget_bits, target
        Exactly one: the most bits the whole model may take (as
        :func:`tnquant.model_size_bits` counts them, parts not searched
        included: embeddings, norms, biases), or the most summed error (in
        ``metric``'s terms). Embeddings are searched like the other layers
        (per-row or per-group tables, ``TTEmbedding``); exclude them
        (``exclude=['*embed*']``) to keep them as they are, still counted.
    candidates
        :class:`~tnquant.planning.sensitivity.Candidates` (the default grid:
        dense, LowRank/TT/Tucker at ratios 1/2, 1/4, 1/8; float, int8, int6,
        int4, int3, int2 per channel, ternary, binary), a list of
        :class:`~tnquant.planning.plan.Choice`, or a mapping from name globs to
        either.
    include, exclude
        Globs on layer names to search.
    method
        ``'dp'`` (exact on the discretised sizes) or ``'lagrangian'``.
    grid
        Width of the DP table in size units (see :mod:`~tnquant.planning.allocate`).
    num_batches
        Use at most this many batches of ``data``.
    max_rows
        Inputs kept per layer for the ``'layer'`` metric.
    fit_data
        Batches to fit the factorized Linear candidates to (data-aware; see
        :func:`~tnquant.planning.sensitivity.sensitivity`); carry the plan
        out with ``apply(model, plan, data=fit_data)``.
    verify_plan
        Apply the plan to a copy and measure it (see :func:`verify`).
    refine
        Under a budget, spend the bits the DP's rounding leaves with greedy
        exact-size upgrades (:func:`~tnquant.planning.allocate.fill`): the
        predicted error never goes up.
    precomputed
        A :class:`~tnquant.planning.sensitivity.Sensitivity` of this model, to
        search again without measuring again (``candidates``, ``metric``,
        ``include``/``exclude``, ``fit_data`` are then ignored for the
        sensitivities; the plan is verified with ``fit_data`` when
        ``precomputed.data_aware``).
    progress
        Show progress bars.
    budget_scope
        What ``budget_bits`` covers: ``'model'`` (the default: the whole
        model) or ``'layers'`` (the searched layers alone: the bits of
        everything else, ``Sensitivity.fixed_bits``, are added to it; the
        plan's ``budget_bits`` is that whole-model sum).

    Returns
    -------
    Plan
        The choices, with predicted and (when verified) measured size and error.

    Raises
    ------
    TypeError
        For a model that is not an ``nn.Module``, data that is not iterable,
        or a one-shot iterator as ``data`` (or ``fit_data``) where the
        search reads it more than once (the default: sensitivities, then
        verification; see :mod:`tnquant.planning.inputs`).
    ValueError
        When no combination fits the budget or reaches the target (the
        message gives the smallest size or error possible); for empty
        data, a batch holding NaN or inf (which batch, how many values), a
        model on the meta device or with non-finite parameters (which
        one), or a layer whose candidates got non-finite errors (which).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import model_size_bits
    >>> from tnquant.planning import Candidates, apply
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> cands = Candidates(formats=(), bits=(8, 4, 2), ternary=False, binary=False)
    >>> plan = search(model, [torch.randn(64, 16)], budget_bits=2000, candidates=cands,
    ...               progress=False)
    >>> report = apply(model, plan, progress=False)
    >>> model_size_bits(model) == plan.predicted_size_bits <= 2000
    True
    """
    _check_goal(model, budget_bits, target, precomputed)
    if budget_scope not in ("model", "layers"):
        raise ValueError(f"budget_scope must be 'model' or 'layers', got {budget_scope!r}")
    measure = precomputed is None
    fit_aware = fit_data is not None if measure else cast(Sensitivity, precomputed).data_aware
    check_inputs(
        model,
        data,
        data_reads=(data_passes(_metric_name(metric)) if measure else 0) + verify_plan,
        fit_data=fit_data,
        fit_reads=measure + (verify_plan and fit_aware),
    )
    sens = precomputed
    if sens is None:
        sens = sensitivity(
            model,
            data,
            candidates,
            metric,
            include=include,
            exclude=exclude,
            num_batches=num_batches,
            max_rows=max_rows,
            fit_data=fit_data,
            progress=progress,
        )
    elif _metric_name(metric) != sens.metric:
        raise ValueError(
            f"precomputed sensitivities measure {sens.metric!r}; pass the same "
            f"metric (got {_metric_name(metric)!r})"
        )
    if budget_bits is not None and budget_scope == "layers":
        budget_bits += sens.fixed_bits
    alloc = _allocate(sens, budget_bits, target, method, grid, refine)
    plan = plan_from(sens, alloc, budget_bits=budget_bits, target=target)
    if verify_plan:
        if sens.data_aware and fit_data is None:
            raise ValueError(
                "precomputed sensitivities fitted the factorized layers to data: "
                "pass the same fit_data= to verify the plan"
            )
        verify(
            model,
            plan,
            data,
            metric,
            num_batches=num_batches,
            reference=sens.reference,
            fit_data=fit_data if sens.data_aware else None,
        )
    return plan


def _check_goal(model: Any, budget_bits: Any, target: Any, precomputed: Any) -> None:
    """Refuse a model that is not a module, and anything but one valid budget or target."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (budget_bits is None) == (target is None):
        raise ValueError("give exactly one of budget_bits= and target=")
    if budget_bits is not None and (
        isinstance(budget_bits, bool) or not isinstance(budget_bits, int) or budget_bits < 1
    ):
        raise ValueError(f"budget_bits must be a positive int (bits), got {budget_bits!r}")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or target < 0
    ):
        raise ValueError(f"target must be a non-negative number, got {target!r}")
    if precomputed is not None and not isinstance(precomputed, Sensitivity):
        raise TypeError(f"precomputed must be a Sensitivity, got {type(precomputed).__name__}")


def _allocate(
    sens: Sensitivity,
    budget_bits: int | None,
    target: float | None,
    method: str,
    grid: int,
    refine: bool,
) -> Allocation:
    """One candidate per layer within the budget (refined) or the target."""
    budget_layers = None if budget_bits is None else budget_bits - sens.fixed_bits
    if budget_layers is not None and budget_layers < 0:
        raise ValueError(
            f"budget_bits={budget_bits} is below the {sens.fixed_bits} bits of the "
            f"layers not searched"
        )
    check_errors(sens)
    try:
        alloc = allocate(sens.errors, sens.sizes, budget_layers, target, method=method, grid=grid)
    except ValueError as err:
        if budget_bits is not None and str(err).startswith("no combination fits"):
            raise ValueError(
                f"no plan fits in {budget_bits} bits: the smallest model the "
                f"candidates give takes {sens.min_size_bits()} bits"
            ) from err
        raise
    if refine and budget_layers is not None:
        alloc = fill(sens.errors, sens.sizes, budget_layers, alloc)
    return alloc
