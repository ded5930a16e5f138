"""The one road: factorize -> quantize -> calibrate -> finetune -> convert, from a recipe.

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
``finetune``
    ``finetune(model, calib, teacher, config=section.config(seed=...))``:
    distilled from ``teacher`` (default: the original model) when
    ``distill``; on ``(inputs, label)`` pairs of ``calib`` and ``labels``
    when a ``task_loss`` is set.
``convert``
    ``convert(model)`` when the recipe quantizes and ``convert`` is true.

A new stage (rotate, GPTQ: the next issue) is one :class:`Stage` entry in
:data:`STAGES` and one section.

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
from tnquant.ptq import calibrate
from tnquant.qat import finetune
from tnquant.qat.config import FinetuneConfig
from tnquant.quantization import convert, quantize

__all__ = [
    "Recipe",
    "FactorizeSection",
    "QuantizeSection",
    "CalibrateSection",
    "FinetuneSection",
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

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"Recipe.{name} must be a {cls.__name__}"
                    f"{'' if name == 'calibrate' else ' or None'}, got "
                    f"{type(value).__name__}"
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
    teacher: nn.Module | None
    seed: int
    progress: bool


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


def _finetune(run: _Run, section: FinetuneSection) -> Any:
    data = run.calib
    if section.task_loss is not None:
        data = list(zip(run.calib, run.labels, strict=True))
    teacher = run.teacher if section.distill else None
    return finetune(
        run.model, data, teacher, config=section.config(seed=run.seed, progress=run.progress)
    )


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
    Stage("factorize", lambda r: r.factorize, _factorize),
    Stage("quantize", lambda r: r.quantize, _quantize),
    Stage("calibrate", lambda r: _quantized(r, r.calibrate), _calibrate),
    Stage("finetune", lambda r: r.finetune, _finetune),
    Stage("convert", lambda r: r.quantize if r.quantize and r.quantize.convert else None, _convert),
)


@dataclass
class PipelineResult:
    """The compressed model, each stage's report and its wall time (seconds), in road order."""

    model: nn.Module
    reports: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


AfterStage = Callable[[str, nn.Module, Any, float], None]


def _check(model: Any, recipe: Any, labels: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a tnquant.pipeline.Recipe, got {type(recipe).__name__}")
    if recipe.factorize is None and recipe.quantize is None:
        raise ValueError("the recipe has neither factorize nor quantize: nothing to do")
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
    run = _Run(
        copy.deepcopy(model),
        recipe,
        calib,
        labels,
        model if teacher is None else teacher,
        seed,
        progress,
    )
    result = PipelineResult(run.model)
    for stage in STAGES:
        section = stage.section(recipe)
        if section is None:
            continue
        t0 = time.perf_counter()
        result.reports[stage.name] = stage.run(run, section)
        result.seconds[stage.name] = time.perf_counter() - t0
        if after is not None:
            after(stage.name, run.model, result.reports[stage.name], result.seconds[stage.name])
    return result
