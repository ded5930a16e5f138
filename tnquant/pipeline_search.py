"""What the search, GPTQ and time-budget stages of the road do (:mod:`tnquant.pipeline` calls them).

- :func:`searched_plan`: sensitivities once (:func:`tnquant.planning.sensitivity`),
  then the plan under ``bits`` per weight of the searched layers, or the
  smallest budget whose plan meets a fidelity floor (bisection, each probe
  measured on a copy), with LSQ quantizers when ``learnable``;
- :func:`gptq_or_rtn`: GPTQ rounding, kept only when it lowers the output
  error on the calibration batches (``gptq = 'auto'``);
- :class:`Clock` and :func:`steps_that_fit`: a time budget (``--time``), what
  it leaves for each stage, and the fine-tuning steps that fit in it,
  extrapolated from a few measured steps.

Examples
--------
>>> clock = Clock(60.0)
>>> 0 < clock.left() <= 60.0
True
>>> Clock(None).left()
inf
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

from torch import nn

from tnquant.batches import call_model
from tnquant.core.capture import evaluating
from tnquant.pipeline_stages import SearchSection, fidelity, meets, output_error
from tnquant.planning import Plan, apply, search, sensitivity
from tnquant.ptq import gptq
from tnquant.specs import QuantSpec

__all__ = [
    "Clock",
    "searched_plan",
    "gptq_or_rtn",
    "steps_that_fit",
    "size_search",
    "size_gptq",
    "tied_names",
    "timed_steps",
]

#: Bisection probes of a fidelity floor.
PROBES = 7
#: Share of the time left that the search may take under ``--time``.
SEARCH_SHARE = 0.3
#: Share of the time left that GPTQ may take under ``--time``.
GPTQ_SHARE = 0.2


class Clock:
    """A wall-clock budget in seconds (``None``: no budget), and the notes of what it cut."""

    def __init__(self, seconds: float | None, label: str | None = None) -> None:
        self.seconds = seconds
        self.label = label
        self.start = time.perf_counter()
        self.notes: list[str] = []

    def left(self) -> float:
        """Seconds left (``inf`` without a budget)."""
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def text(self) -> str:
        """The budget as given (``label``), else e.g. ``'300s'``."""
        return self.label or f"{self.seconds:g}s"


def _weights(model: nn.Module, names: list[str]) -> int:
    total = 0
    for name in names:
        w = getattr(model.get_submodule(name), "weight", None)
        total += int(w.numel()) if w is not None else 0
    return total


def _learnable(plan: Plan) -> Plan:
    """The plan with its integer quantizers learning their scales (LSQ)."""
    out = {}
    for name, choice in plan.items():
        w = choice.weights
        if isinstance(w, QuantSpec):
            w = dataclasses.replace(w, learnable=True)
        out[name] = dataclasses.replace(choice, weights=w)
    return Plan(
        out,
        layers=plan.layers,
        metric=plan.metric,
        budget_bits=plan.budget_bits,
        target=plan.target,
        predicted_size_bits=plan.predicted_size_bits,
        predicted_error=plan.predicted_error,
    )


def _forward_seconds(model: nn.Module, batch: Any) -> float:
    import torch

    with evaluating(model), torch.no_grad():
        t0 = time.perf_counter()
        call_model(model, batch)
    return time.perf_counter() - t0


def _searchable(model: nn.Module, section: SearchSection) -> list[tuple[str, nn.Module]]:
    """The Linear / conv / embedding layers ``section`` searches (an estimate of the search's)."""
    from tnquant.core.globs import selected

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, kinds) and selected(name, section.include, section.exclude)
    ]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_search(
    model: nn.Module, section: SearchSection, calib: list[Any], clock: Clock
) -> SearchSection:
    """``section`` cut to fit :data:`SEARCH_SHARE` of the time left (notes in ``clock``).

    Measures one forward pass and the search of the median-sized layer
    alone over two of its candidates (dense and one factorized, 4 bits; one
    probe per observer and metric tried), and extrapolates: a
    candidate costs its build (per parameter, as measured) plus one model
    pass per batch (``'output'`` metric). Cuts, in order, until the estimate
    fits: one batch, the ``minmax`` observer, one ratio, no TT candidates,
    the ``'layer'`` metric.
    """
    if clock.seconds is None:
        return section
    share = SEARCH_SHARE * clock.left()
    t_start = time.perf_counter()
    fwd = _forward_seconds(model, calib[0])
    layers = _searchable(model, section)
    if not layers:
        return section
    probe_name, probe = sorted(layers, key=lambda nm: _params(nm[1]))[len(layers) // 2]
    per_param: dict[tuple[str, str], float] = {}

    def passes(s: SearchSection, n: int) -> float:
        return n * (1 if s.metric == "output" else 0) + 2

    def measured(s: SearchSection) -> float:
        key = (s.observer, s.metric)
        if key not in per_param:
            formats = ("dense", *[f for f in s.formats if f != "dense"][:1])
            one = dataclasses.replace(  # two candidates: dense and one factorized, 4 bits
                s, num_batches=1, include=(probe_name,), exclude=None, formats=formats,
                ratios=s.ratios[:1], quantizers=(4,),
            )  # fmt: skip
            n = len(one.candidates().options(probe))
            t0 = time.perf_counter()
            sensitivity(model, calib[:1], one.candidates(), one.metric, include=[probe_name],
                        progress=False)  # fmt: skip
            build = max(time.perf_counter() - t0 - passes(one, n) * fwd, 0.0)
            per_param[key] = build / max(n * _params(probe), 1)
        return per_param[key]

    def cost(s: SearchSection) -> float:
        cands, b = s.candidates(), measured(s)
        batches = min(s.num_batches or len(calib), len(calib))
        total = 0.0
        for _, m in layers:
            n = len(cands.options(m))
            total += n * b * _params(m) + passes(s, n) * batches * fwd
        return total

    full = cost(section)
    steps: tuple[tuple[str, Any, str], ...] = (
        ("num_batches", 1, "1 calibration batch"),
        ("observer", "minmax", "the minmax observer"),
        ("ratios", section.ratios[:1], f"ratios {list(section.ratios[:1])}"),
        ("formats", tuple(f for f in section.formats if f != "tt"), "no TT candidates"),
        ("metric", "layer", "the 'layer' metric"),
    )
    cuts: list[str] = []
    for key, value, what in steps:
        if cost(section) <= share:
            break
        if getattr(section, key) != value:
            section = dataclasses.replace(section, **{key: value})
            cuts.append(what)
    if cuts:
        clock.notes.append(
            f"search cut to {', '.join(cuts)} to fit {clock.text()}: estimated {full:.0f}s -> "
            f"{cost(section):.0f}s, extrapolated from one forward pass ({fwd:.3g}s) and the "
            f"search of layer {probe_name!r} alone (probes took "
            f"{time.perf_counter() - t_start:.1f}s)"
        )
    return section


def searched_plan(
    model: nn.Module, section: SearchSection, calib: list[Any], *, progress: bool = True
) -> tuple[Plan, dict[str, Any]]:
    """The plan of ``section`` on ``model`` and what it measured (see the module docs).

    Returns
    -------
    plan, info
        ``info``: ``searched_weights`` (original weights of the searched
        layers), ``budget_bits`` (the whole-model budget searched under),
        ``bits_per_weight`` (of the budget), ``probes`` (budget, fidelity)
        pairs of a floor.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> s = SearchSection(bits=4, formats=("dense",), quantizers=(8, 4, 2))
    >>> plan, info = searched_plan(model, s, [torch.randn(32, 64)], progress=False)
    >>> info["searched_weights"], plan.predicted_size_bits <= info["budget_bits"]
    (4352, True)
    """
    data = calib[: section.num_batches] if section.num_batches else calib
    fit = None  # plain decompositions measured; the factorize stage fits them (data_aware)
    sens = sensitivity(
        model,
        data,
        section.candidates(),
        section.metric,
        include=section.include,
        exclude=section.exclude,
        fit_data=fit,
        progress=progress,
    )
    n = _weights(model, sens.names)
    if n == 0:
        raise ValueError("search found no layer with weights to search (check include/exclude)")

    smallest = (sens.min_size_bits() - sens.fixed_bits) / n

    def plan_at(bits_per_weight: float) -> Plan:
        budget = sens.fixed_bits + int(bits_per_weight * n)
        if bits_per_weight < smallest:
            raise ValueError(
                f"search bits {bits_per_weight:g} per weight is below the smallest plan the "
                f"candidates give: {smallest:.3g} bits per weight over the {n} weights of "
                f"{len(sens.names)} searched layers (their biases and scales included)"
            )
        return search(
            model,
            data,
            section.metric,
            budget_bits=budget,
            precomputed=sens,
            verify_plan=False,
            fit_data=fit,
            progress=False,
        )

    info: dict[str, Any] = {"searched_weights": n, "probes": []}
    goal = section.goal
    if goal is None:
        bpw = float(section.bits)  # type: ignore[arg-type]
        plan = plan_at(bpw)
    else:
        kind, floor = goal
        lo = smallest
        hi = sum(max(s) for s in sens.sizes) / n
        best: tuple[float, Plan] | None = None
        for _ in range(PROBES):
            mid = (lo + hi) / 2 if best is not None else hi
            plan = plan_at(mid)
            trial = copy.deepcopy(model)
            apply(trial, plan, data=fit, progress=False)
            value = fidelity(model, trial, data, kind)
            info["probes"].append([round(mid, 4), value])
            if meets(kind, value, floor):
                best, hi = (mid, plan), mid
            elif best is None:
                raise ValueError(
                    f"no searched plan meets target {section.target!r}: the largest "
                    f"candidates give {kind} {value:.4g} on the calibration batches"
                )
            else:
                lo = mid
        bpw, plan = best if best is not None else (hi, plan)
    info["bits_per_weight"] = bpw
    info["budget_bits"] = sens.fixed_bits + int(bpw * n)
    return (_learnable(plan) if section.learnable else plan), info


def gptq_or_rtn(
    model: nn.Module,
    teacher: nn.Module,
    calib: list[Any],
    mode: Any,
    num_batches: int | None,
    *,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """GPTQ-round ``model`` in place (``mode`` true), or keep whichever of GPTQ and
    round-to-nearest gives the lower output error on ``calib`` (``'auto'``).

    Returns the GPTQ report and ``{'used': bool, 'rtn_error', 'gptq_error'}``.
    """
    data = calib[:num_batches] if num_batches else calib
    judge = calib[: min(len(calib), 4)]
    before = copy.deepcopy(model.state_dict()) if mode == "auto" else None
    rtn = output_error(teacher, model, judge) if mode == "auto" else None
    report = gptq(model, data, progress=progress)
    info: dict[str, Any] = {"used": True, "rtn_error": rtn, "gptq_error": None}
    if mode == "auto":
        err = output_error(teacher, model, judge)
        info["gptq_error"] = err
        if rtn is not None and rtn <= err and before is not None:
            model.load_state_dict(before)
            info["used"] = False
    return report, info


def size_gptq(model: nn.Module, section: Any, calib: list[Any], clock: Clock) -> Any:
    """``[ptq]`` with the GPTQ batches that fit :data:`GPTQ_SHARE` of the time left, or
    ``gptq=False`` (round-to-nearest) when one batch does not: GPTQ reads every batch
    once per layer, estimated at one measured forward pass each (note in ``clock``)."""
    from tnquant.ptq import gptq_targets

    layers = len(gptq_targets(model)[0])
    if not layers:
        return section
    fwd = _forward_seconds(model, calib[0])
    judge = 8 * fwd if section.gptq == "auto" else 0.0  # RTN and GPTQ errors on 4 batches
    per_batch = (layers + 1) * fwd
    fits = int((GPTQ_SHARE * clock.left() - judge) / max(per_batch, 1e-9))
    wanted = min(section.gptq_batches or len(calib), len(calib))
    if fits >= wanted:
        return section
    if fits < 1:
        clock.notes.append(
            f"GPTQ left out (round-to-nearest kept) to fit {clock.text()}: one batch over "
            f"{layers} layers takes ~{per_batch + judge:.0f}s (one forward pass measured, "
            f"{fwd:.3g}s, extrapolated)"
        )
        return dataclasses.replace(section, gptq=False)
    clock.notes.append(
        f"GPTQ cut to {fits} calibration batches of {wanted} to fit {clock.text()} "
        f"(one forward pass measured, {fwd:.3g}s, extrapolated over {layers} layers)"
    )
    return dataclasses.replace(section, gptq_batches=fits)


def tied_names(model: nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` another module shares (tied embeddings, LM heads).

    Examples
    --------
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> m[1].weight = m[0].weight
    >>> tied_names(m)
    ['0', '1']
    """
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            owners.setdefault(id(w), []).append(name)
    return [n for names in owners.values() if len(names) > 1 for n in names]


def timed_steps(model: nn.Module, data: Any, teacher: Any, config: Any, clock: Clock) -> int:
    """Fine-tuning steps of ``config`` that fit in what ``clock`` leaves, less 10% of its
    budget (for conversion and the report): two steps measured on a copy, then
    extrapolated (a note in ``clock`` when cut)."""
    from tnquant.qat import finetune

    planned, probe = config.total_steps(len(data)), min(2, len(data))
    t0 = time.perf_counter()
    trial = dataclasses.replace(config, max_steps=probe, progress=False)
    finetune(copy.deepcopy(model), data, teacher, config=trial)
    step_s = (time.perf_counter() - t0) / probe
    steps = steps_that_fit(clock.left() - 0.1 * (clock.seconds or 0.0), step_s, planned)
    if steps < planned:
        clock.notes.append(
            f"fine-tuning cut to {steps} steps of {planned} to fit {clock.text()} "
            f"(measured {probe} steps: {step_s:.3g} s/step, extrapolated)"
        )
    return steps


def steps_that_fit(seconds_left: float, step_seconds: float, planned: int) -> int:
    """Fine-tuning steps that fit in ``seconds_left`` at ``step_seconds`` each, at most ``planned``.

    Examples
    --------
    >>> steps_that_fit(120.0, 1.0, 400), steps_that_fit(1e9, 1.0, 400)
    (120, 400)
    """
    if step_seconds <= 0:
        return planned
    return max(0, min(planned, int(seconds_left / step_seconds)))
