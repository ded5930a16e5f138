"""The one road: rotate, search, factorize, quantize, calibrate, GPTQ, finetune, convert.

:func:`run_pipeline` runs the stages of :data:`STAGES` that a :class:`Recipe`
asks for, in that order, on a copy of the model, and returns the compressed
model with every stage's ``Report`` and wall time (:class:`PipelineResult`).
``tnquant compress`` (:mod:`tnquant.cli`), ``examples/demo.py`` and the
benchmarks that take the same road call it instead of assembling it.

A :class:`Recipe` holds one section per verb; each section's fields and
defaults are those of the verb it configures: :class:`FinetuneSection` *is* a
:class:`~tnquant.qat.config.FinetuneConfig` (plus ``distill``), and the
defaults of :class:`CalibrateSection` and ``FactorizeSection.num_batches``
are read from the signatures of ``calibrate`` and ``factorize``. A recipe
file (``tnquant compress --recipe``) parses into a subclass of
:class:`Recipe` (:class:`tnquant.cli.recipe.Recipe`) that adds the CLI's own
tables.

Stages
------
``factorize``
    ``factorize(model, section.mapping(), data=calib if data_aware)``.
``quantize``, ``calibrate``
    ``quantize(model, **section.kwargs())``, then ``calibrate(model, calib)``
    (with ``[calibrate]``'s options): whenever the recipe quantizes.
``rotate`` (``[ptq] rotate``)
    :func:`tnquant.ptq.rotate` of the Linear layers, before the search.
``search``
    :func:`tnquant.pipeline_search.searched_plan` under a bits-per-weight
    budget or a fidelity floor; the plan becomes the ``factorize`` and
    ``quantize`` sections (per layer), and :attr:`PipelineResult.recipe`
    is the recipe with them (no ``search``: a rerun does not search).
``gptq`` (``[ptq] gptq``)
    :func:`tnquant.ptq.gptq` after calibration; ``'auto'`` keeps it only
    when it lowers the output error (resolved in ``PipelineResult.recipe``).
``finetune``
    ``finetune(model, calib, teacher, config=section.config(seed=...))``:
    distilled from ``teacher`` (default: the original model) when
    ``distill``; on ``(inputs, label)`` pairs of ``calib`` and ``labels``
    when a ``task_loss`` is set.
``convert``
    ``convert(model)`` when the recipe quantizes and ``convert`` is true.

A new stage is one :class:`Stage` entry in :data:`STAGES` and one section. ``time_s=``
(``--time``) sizes the search, GPTQ and fine-tuning to fit (``PipelineResult.notes``).

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import LowRank, QuantSpec
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> recipe = Recipe(factorize=FactorizeSection({"0": LowRank(rank=4)}),
...                 quantize=QuantizeSection(weights={"*": QuantSpec(bits=8)}),
...                 finetune=FinetuneSection(epochs=2, lr=1e-3))
>>> result = run_pipeline(model, recipe, [torch.randn(8, 16) for _ in range(4)], progress=False)
>>> list(result.reports), type(result.model[0]).__name__
(['factorize', 'quantize', 'calibrate', 'finetune', 'convert'], 'LowRankLinear')
>>> type(model[0]).__name__  # the input model is left as it was
'Linear'
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tnquant.factorization import factorize
from tnquant.pipeline_search import (
    Clock,
    gptq_or_rtn,
    searched_plan,
    size_gptq,
    size_search,
    tied_names,
    timed_steps,
)
from tnquant.pipeline_stages import PtqSection, SearchSection
from tnquant.ptq import calibrate, rotate
from tnquant.qat import finetune
from tnquant.qat.config import FinetuneConfig
from tnquant.quantization import convert, quantize

__all__ = [
    "Recipe",
    "FactorizeSection",
    "QuantizeSection",
    "CalibrateSection",
    "FinetuneSection",
    "SearchSection",
    "PtqSection",
    "Stage",
    "STAGES",
    "PipelineResult",
    "run_pipeline",
]

#: ``((glob or core index, spec or None), ...)`` in order: the first match wins.
Pairs = tuple[tuple[Any, Any], ...]


def _pairs(value: Any, what: str) -> Pairs | None:
    """A mapping or pairs as a tuple of pairs (``None`` stays ``None``)."""
    if value is None:
        return None
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((key, spec) for key, spec in items)
    except (TypeError, ValueError):
        raise TypeError(
            f"{what} must be a mapping of globs to specs (or pairs), got {type(value).__name__}"
        ) from None
    return pairs


def _default(verb: Callable[..., Any], name: str) -> Any:
    """The default of the keyword ``name`` of ``verb``: one source for a section's default."""
    return inspect.signature(verb).parameters[name].default


# --------------------------------------------------------------------------- #
# sections: one per verb
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class FactorizeSection:
    """Options of :func:`tnquant.factorize`: ``specs`` (glob -> spec or ``None``) in order."""

    specs: Pairs = ()
    data_aware: bool = True
    num_batches: int | None = _default(factorize, "num_batches")

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", _pairs(self.specs, "factorize specs"))

    def mapping(self) -> dict[str, Any]:
        """The glob -> spec mapping for :func:`tnquant.factorize`."""
        return dict(self.specs)


@dataclass(frozen=True)
class QuantizeSection:
    """Options of :func:`tnquant.quantize`: weights/cores/activations pairs in order."""

    weights: Pairs | None = None
    cores: Pairs | None = None
    activations: Pairs | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    convert: bool = True

    def __post_init__(self) -> None:
        for name in ("weights", "cores", "activations"):
            object.__setattr__(self, name, _pairs(getattr(self, name), f"quantize {name}"))

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`tnquant.quantize`."""
        out: dict[str, Any] = {}
        for name in ("weights", "cores", "activations"):
            pairs = getattr(self, name)
            if pairs is not None:
                out[name] = dict(pairs)
        out["include"], out["exclude"] = self.include, self.exclude
        return out


@dataclass(frozen=True)
class CalibrateSection:
    """Options of :func:`tnquant.calibrate` (its own defaults)."""

    num_batches: int | None = _default(calibrate, "num_batches")
    bias_correction: bool = _default(calibrate, "bias_correction")


@dataclass(frozen=True)
class FinetuneSection(FinetuneConfig):
    """Options of :func:`tnquant.finetune`: a ``FinetuneConfig``, and ``distill``.

    ``distill``: distil from the teacher (default: the original model).
    ``seed`` and ``progress`` come from :func:`run_pipeline`.

    Examples
    --------
    >>> FinetuneSection(lr=1e-3).config(seed=1).lr
    0.001
    """

    distill: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.distill, bool):
            raise TypeError(f"distill must be a bool, got {type(self.distill).__name__}")

    def config(self, **overrides: Any) -> FinetuneConfig:
        """The :class:`FinetuneConfig` of this section, with ``overrides``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{**values, **overrides})


_SECTIONS = {
    "factorize": FactorizeSection,
    "quantize": QuantizeSection,
    "calibrate": CalibrateSection,
    "finetune": FinetuneSection,
    "search": SearchSection,
    "ptq": PtqSection,
}


@dataclass(frozen=True)
class Recipe:
    """What the road does: one section per stage; ``None`` skips it.

    Calibration runs whenever ``quantize`` is given. A recipe file parses into
    the subclass :class:`tnquant.cli.recipe.Recipe`.
    """

    factorize: FactorizeSection | None = None
    quantize: QuantizeSection | None = None
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)
    finetune: FinetuneSection | None = None
    search: SearchSection | None = None
    ptq: PtqSection = field(default_factory=PtqSection)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"Recipe.{name} must be a {cls.__name__}"
                    f"{'' if name in ('calibrate', 'ptq') else ' or None'}, got "
                    f"{type(value).__name__}"
                )
        if self.search is not None and (self.factorize or self.quantize):
            raise ValueError(
                "a recipe with search writes its own factorize and quantize sections "
                "(one per layer); drop factorize/quantize or the search"
            )


# --------------------------------------------------------------------------- #
# stages
# --------------------------------------------------------------------------- #


@dataclass
class _Run:
    """What every stage reads: the student (changed in place), the recipe and the data."""

    model: nn.Module
    recipe: Recipe
    calib: Any
    labels: Any
    teacher: nn.Module
    seed: int
    progress: bool
    clock: Clock = field(default_factory=lambda: Clock(None))
    info: dict[str, Any] = field(default_factory=dict)


def _factorize(run: _Run, section: FactorizeSection) -> Any:
    return factorize(
        run.model,
        section.mapping(),
        data=run.calib if section.data_aware else None,
        num_batches=section.num_batches,
        progress=run.progress,
    )


def _quantize(run: _Run, section: QuantizeSection) -> Any:
    return quantize(run.model, **section.kwargs(), progress=run.progress)


def _calibrate(run: _Run, section: CalibrateSection) -> Any:
    return calibrate(
        run.model,
        run.calib,
        section.num_batches,
        bias_correction=section.bias_correction,
        progress=run.progress,
    )


def _rotate(run: _Run, section: PtqSection) -> Any:
    search = run.recipe.search
    include = section.rotate_include or (search.include if search else None)
    tied = tied_names(run.model)  # a tied weight (an LM head) is not rotated: it would untie
    exclude = [*(search.exclude or () if search else ()), *tied] or None
    return rotate(run.model, include, exclude, seed=run.seed, progress=run.progress)


def _search(run: _Run, section: SearchSection) -> Any:
    section = size_search(run.model, section, run.calib, run.clock)
    plan, info = searched_plan(run.model, section, run.calib, progress=run.progress)
    run.info["search"] = {**info, "plan": plan.to_dict()}
    fact = tuple((n, c.factorization) for n, c in plan.items() if c.factorization is not None)
    weights = tuple((n, c.weights) for n, c in plan.items() if c.weights is not None)
    run.recipe = dataclasses.replace(
        run.recipe,
        search=None,
        factorize=FactorizeSection(fact, data_aware=section.data_aware) if fact else None,
        quantize=QuantizeSection(weights=weights) if weights else None,
    )
    return plan


def _gptq(run: _Run, section: PtqSection) -> Any:
    if run.clock.seconds is not None:  # batches that fit, or round-to-nearest
        section = size_gptq(run.model, section, run.calib, run.clock)
        if not section.gptq:
            run.recipe = dataclasses.replace(run.recipe, ptq=section)
            return None
    args = (run.model, run.teacher, run.calib, section.gptq, section.gptq_batches)
    report, run.info["gptq"] = gptq_or_rtn(*args, progress=run.progress)
    resolved = dataclasses.replace(section, gptq=run.info["gptq"]["used"])
    run.recipe = dataclasses.replace(run.recipe, ptq=resolved)
    return report


def _finetune(run: _Run, section: FinetuneSection) -> Any:
    data = run.calib
    if section.task_loss is not None:
        data = list(zip(run.calib, run.labels, strict=True))
    teacher = run.teacher if section.distill else None
    config = section.config(seed=run.seed, progress=run.progress)
    if run.clock.seconds is not None:  # measure a few steps, fit the rest in the time left
        steps = timed_steps(run.model, data, teacher, config, run.clock)
        cut = dataclasses.replace(section, max_steps=steps) if steps else None
        run.recipe = dataclasses.replace(run.recipe, finetune=cut)  # what a rerun does
        if steps == 0:
            return None
        config = dataclasses.replace(config, max_steps=steps)
    return finetune(run.model, data, teacher, config=config)


def _convert(run: _Run, section: QuantizeSection) -> Any:
    return convert(run.model, progress=run.progress)


@dataclass(frozen=True)
class Stage:
    """One stage of the road: its name, the section it runs with, and what it runs.

    ``section(recipe)`` gives the section the stage reads, or ``None`` when the
    recipe does not ask for the stage; ``run(state, section)`` runs it and
    returns its report.
    """

    name: str
    section: Callable[[Recipe], Any]
    run: Callable[[_Run, Any], Any]


def _quantized(recipe: Recipe, section: Any) -> Any:
    return section if recipe.quantize is not None else None


#: The road, in order; :func:`run_pipeline` runs every stage a recipe asks for.
STAGES: tuple[Stage, ...] = (
    Stage("rotate", lambda r: r.ptq if r.ptq.rotate else None, _rotate),
    Stage("search", lambda r: r.search, _search),
    Stage("factorize", lambda r: r.factorize, _factorize),
    Stage("quantize", lambda r: r.quantize, _quantize),
    Stage("calibrate", lambda r: _quantized(r, r.calibrate), _calibrate),
    Stage("gptq", lambda r: _quantized(r, r.ptq) if r.ptq.gptq else None, _gptq),
    Stage("finetune", lambda r: r.finetune, _finetune),
    Stage("convert", lambda r: r.quantize if r.quantize and r.quantize.convert else None, _convert),
)


@dataclass
class PipelineResult:
    """The compressed model, each stage's report and its wall time (seconds), in road order.

    ``recipe``: the recipe as run, with a search's plan as per-layer
    ``factorize``/``quantize`` sections and GPTQ's ``'auto'`` resolved;
    ``notes``: what a time budget cut; ``info``: the search's and GPTQ's numbers.
    """

    model: nn.Module
    reports: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    recipe: Any = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


AfterStage = Callable[[str, nn.Module, Any, float], None]


def _check(model: Any, recipe: Any, labels: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a tnquant.pipeline.Recipe, got {type(recipe).__name__}")
    if recipe.factorize is None and recipe.quantize is None and recipe.search is None:
        raise ValueError("the recipe has neither search, factorize nor quantize: nothing to do")
    ft = recipe.finetune
    if ft is not None and ft.task_loss is not None and labels is None:
        raise ValueError(
            "the recipe's finetune task_loss needs labels= (one label batch per calibration batch)"
        )
    if ft is not None and not ft.distill and ft.task_loss is None:
        raise ValueError("the recipe's finetune needs distill=True or a task_loss")


def run_pipeline(
    model: nn.Module,
    recipe: Recipe,
    calib: Any,
    *,
    labels: Any = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    after: AfterStage | None = None,
    time_s: float | None = None,
    time_label: str | None = None,
) -> PipelineResult:
    """Run the road on a copy of ``model``; the input model is not changed.

    Parameters
    ----------
    model
        The pretrained model.
    recipe
        Which stages run, with what options (:class:`Recipe`, or a recipe file
        parsed by :func:`tnquant.cli.recipe.load_recipe`).
    calib
        Calibration batches (a list, re-iterable): the data of data-aware
        factorization, calibration and fine-tuning.
    labels
        One label batch per calibration batch, for a ``finetune`` task loss.
    teacher
        What ``finetune`` distils from when ``distill``; default: ``model``.
    seed
        ``finetune``'s seed (the order of shuffled batches). The global
        random generators are the caller's to seed.
    progress
        Progress bars of every stage.
    after
        ``after(stage, model, report, seconds)`` called after each stage
        (e.g. to measure the model there); not counted in the stage's time.
    time_s
        A wall-clock budget (seconds): the search and the fine-tuning steps
        are cut to fit (measured, then extrapolated; see ``.notes``), which
        name the budget ``time_label`` (default: ``'<time_s>s'``).

    Returns
    -------
    PipelineResult
        ``.model`` (the compressed copy), ``.reports`` and ``.seconds`` by
        stage name, in the order of :data:`STAGES`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> recipe = Recipe(quantize=QuantizeSection(weights={"*": QuantSpec(bits=4)}))
    >>> result = run_pipeline(nn.Linear(4, 2), recipe, [torch.randn(3, 4)], progress=False)
    >>> list(result.seconds)
    ['quantize', 'calibrate', 'convert']
    """
    _check(model, recipe, labels)
    if time_s is not None and (isinstance(time_s, bool) or not time_s > 0):
        raise ValueError(f"time_s must be a positive number of seconds, got {time_s!r}")
    run = _Run(
        copy.deepcopy(model),
        recipe,
        calib,
        labels,
        model if teacher is None else teacher,
        seed,
        progress,
        Clock(time_s, time_label),
    )
    result = PipelineResult(run.model, notes=run.clock.notes, info=run.info)
    for stage in STAGES:
        section = stage.section(run.recipe)
        if section is None:
            continue
        t0 = time.perf_counter()
        result.reports[stage.name] = stage.run(run, section)
        result.seconds[stage.name] = time.perf_counter() - t0
        if after is not None:
            after(stage.name, run.model, result.reports[stage.name], result.seconds[stage.name])
    result.recipe = run.recipe
    return result
