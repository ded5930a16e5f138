"""Recipes: one TOML file that says how ``tnquant compress`` treats a model.

A recipe is read by :func:`load_recipe` (a file) or :func:`parse_recipe`
(TOML text) into a frozen, validated :class:`Recipe`: the sections of
:class:`tnquant.pipeline.Recipe` (the road that
:func:`tnquant.pipeline.run_pipeline` runs) and the CLI's ``[model]``,
``[data]`` and ``[export]`` tables. Every unknown key and every bad value
raises a ``ValueError`` naming its key path, e.g. ``recipe key
'quantize.cores.*.bitz' is not known; expected one of [...]``.

The schema is derived, not retyped: spec tables build through the spec
classes (their fields are the keys), every table's defaults are those of
its section dataclass, and ``[finetune]`` takes the fields of
:class:`~tnquant.qat.config.FinetuneConfig` with its defaults and the choice
lists of :mod:`tnquant.qat` (``LOSSES``, ``TASK_LOSSES``, ``OPTIMIZERS``,
``SCHEDULES``, ``TRAIN_CHOICES``).

Schema
------
Every table is optional except that a recipe needs ``[search]``,
``[factorize]`` or ``[quantize]`` (``[search]`` writes the other two: not
with them). Layer globs match module names as ``named_modules`` gives
them (``fnmatch``, first match wins, so put specific globs first); quote a
glob that holds dots: ``"encoder.layer.*.intermediate.dense" = {...}``.

``[model]``
    ``class`` (``"pkg.module:Class"``, needed for a state-dict checkpoint),
    ``kwargs`` (a table of constructor arguments for it), ``train_epochs``
    (training epochs of the built-in ``digits-cnn``, default 15). Only
    ``tnquant compress`` imports ``class``; ``report`` and ``export`` read
    the copy in an output directory as data and never import it.
``[data]``
    ``batch_size`` (32), ``max_length`` (64, tokens of text models),
    ``num_sentences`` (512, calibration sentences of the ``corpus``
    shortcut), ``num_eval`` (256, held-out sentences of ``corpus``).
``[factorize]``
    ``"<glob>" = {format = "tt", ratio = 0.25, order = 2}``: ``format`` is
    ``tt``, ``tucker``, ``cp``, ``lowrank`` or ``none`` (leave dense); the
    other keys are the fields of :class:`~tnquant.specs.TT`,
    :class:`~tnquant.specs.Tucker`, :class:`~tnquant.specs.CP` or
    :class:`~tnquant.specs.LowRank` (``rank``, ``ratio``, ``tol``,
    ``order``, ``in_shape``, ``out_shape``, ``svd``, ``n_iter_max``).
    Options: ``data_aware`` (true: fit to the calibration data),
    ``num_batches``.
``[quantize.weights]``, ``[quantize.cores]``, ``[quantize.activations]``
    ``"<glob>" = {bits = 4, granularity = "channel", axis = 0, learnable =
    true}``: ``kind`` is ``int`` (the default, :class:`~tnquant.specs.QuantSpec`
    fields), ``binary``, ``ternary`` (:class:`~tnquant.specs.Binary` /
    :class:`~tnquant.specs.Ternary` fields; ``scale = "pow2"`` for
    power-of-two scales), ``fixed`` (``FixedPoint`` fields, or
    ``type = "ap_fixed<8,2,RND,SAT>"``) or ``none`` (leave float);
    ``granularity = ["group", 64]`` for groups. A ``cores`` key that is an
    integer (``"0"``, ``"-1"``) is a core index. Options of ``[quantize]``:
    ``include``, ``exclude`` (lists of layer globs), ``convert`` (true: freeze
    to real integer storage at the end).
``[search]``
    Choose a format, rank and weight quantizer per layer
    (:func:`tnquant.search`): ``bits`` (bits per weight of the searched
    layers, their biases and scales included) or ``target`` (a fidelity
    floor on the calibration data: ``"cos=0.97"``, ``"acc=0.9"`` top-1
    agreement, ``"ppl=1.1"`` perplexity ratio), exactly one; ``formats``
    (``["dense", "lowrank", "tucker", "tt"]``), ``ratios`` ([0.5, 0.25]),
    ``quantizers`` (``[8, 6, 5, 4, 3, 2, "ternary", "binary"]``), ``metric``
    (``output``, ``layer``, ``scaled``, ``hessian``), ``num_batches`` (2),
    ``observer`` (``mse``), ``include``/``exclude`` (layer globs),
    ``learnable`` (true: LSQ scales), ``data_aware`` (true). The output
    directory's ``recipe.toml`` holds the plan instead (per-layer
    ``[factorize]`` and ``[quantize.weights]``): a rerun does not search.
``[ptq]``
    ``rotate`` (false: Hadamard-rotate the Linear inputs before the search,
    :func:`tnquant.ptq.rotate`), ``rotate_include`` (globs; default the
    search's ``include``), ``gptq`` (false; true; ``"auto"``: GPTQ or
    round-to-nearest, whichever gives the lower output error on the
    calibration batches), ``gptq_batches``, ``bias_correction`` (that of
    ``[calibrate]``; give it in one table).
``[calibrate]``
    ``num_batches``, ``bias_correction`` (false). Calibration runs whenever
    the model is quantized.
``[finetune]``
    Present: distil/fine-tune after calibration. The keys are fields of
    :class:`~tnquant.qat.config.FinetuneConfig` (defaults and choices are
    its own) and ``distill``; the seed is ``--seed``. ``epochs`` (1),
    ``max_steps``, ``lr`` (1e-4), ``scale_lr``, ``weight_decay`` (0),
    ``distill`` (true: from the original model), ``loss`` (``mse``,
    ``cosine``, ``kl``), ``temperature``, ``task_loss`` (``cross_entropy``,
    for labelled data), ``alpha`` (0.5), ``train``, ``schedule``,
    ``warmup`` (an int: steps; a float in [0, 1): a fraction of the steps;
    0.05), ``optimizer``, ``clip_grad_norm``, ``shuffle``, ``hidden`` (module
    names whose outputs are distilled instead of the model output),
    ``dropout`` (``"auto"``: off with a teacher; true; false); needs
    ``distill = true`` or a ``task_loss``.
``[export]``
    ``layers`` (left out: the whole model is exported, into ``OUT``, with
    ``input_shape`` from the recorded held-out inputs, e.g. ``(1, 8, 8)``;
    a glob or a list of globs: each matched module, a factorized/quantized
    layer or a Sequential chain of them, is exported on its own into
    ``OUT/<name>``), ``input`` (``"auto"``: ``input_width`` bits with
    integer bits from the observed inputs; or an ``ap_fixed<...>``
    string), ``input_width`` (16), ``accum``, ``result``, ``bias``
    (``ap_fixed<...>`` overrides), ``hls4ml`` (false: write
    ``hls4ml_config.json`` too), ``num_samples`` (256 input rows kept for
    the check). The check counts the rows where the integer emulator equals
    the fake-quant model bit for bit (recorded and saturating inputs);
    any mismatch fails it. With ``accum`` or ``result`` (types the torch
    model does not carry) it is instead the largest relative difference,
    at most ``tolerance`` (1e-4); see :mod:`tnquant.cli.export_cmd`.

Examples
--------
>>> recipe = parse_recipe('''
... [factorize]
... "fc*" = {format = "lowrank", rank = 4}
... [quantize.cores]
... "*" = {bits = 4, granularity = "channel", axis = 0}
... ''')
>>> recipe.factorize.mapping()
{'fc*': LowRank(rank=4, ratio=None, tol=None, svd='truncated')}
>>> parse_recipe('[quantize.cores]\\n"*" = {bitz = 4}')
Traceback (most recent call last):
...
ValueError: recipe key 'quantize.cores.*.bitz' is not known; expected one of [...]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tnquant.pipeline as pipeline
from tnquant.cli.recipe_search import parse_ptq, parse_search
from tnquant.cli.recipe_specs import _FACTORIZE_OPTIONS as _FACTORIZE_OPTIONS
from tnquant.cli.recipe_specs import _INT_KEY as _INT_KEY
from tnquant.cli.recipe_specs import _QUANTIZE_OPTIONS as _QUANTIZE_OPTIONS
from tnquant.cli.recipe_specs import FORMATS as FORMATS
from tnquant.cli.recipe_specs import QUANT_KINDS as QUANT_KINDS
from tnquant.cli.recipe_specs import _build_spec as _build_spec
from tnquant.cli.recipe_specs import _dotted_hint as _dotted_hint
from tnquant.cli.recipe_specs import _factor_spec as _factor_spec
from tnquant.cli.recipe_specs import _parse_factorize, _parse_quantize
from tnquant.cli.recipe_specs import _quant_spec as _quant_spec
from tnquant.cli.recipe_values import (
    _bool,
    _choice,
    _class_path,
    _fields,
    _fixed,
    _float,
    _globs,
    _input_type,
    _int,
    _optional,
    _schema,
    _table,
    _unknown,
    _warmup,
)
from tnquant.pipeline import (
    CalibrateSection,
    FactorizeSection,
    FinetuneSection,
    PtqSection,
    QuantizeSection,
    SearchSection,
)
from tnquant.qat.amp import AMP_CHOICES
from tnquant.qat.losses import LOSSES, TASK_LOSSES
from tnquant.qat.optim import OPTIMIZERS, SCHEDULES
from tnquant.qat.params import TRAIN_CHOICES
from tnquant.specs import FixedPoint

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10: the same parser, as a package
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "Recipe",
    "ModelSection",
    "DataSection",
    "FactorizeSection",
    "QuantizeSection",
    "CalibrateSection",
    "FinetuneSection",
    "ExportSection",
    "SearchSection",
    "PtqSection",
    "load_recipe",
    "parse_recipe",
]

#: The largest recipe file :func:`load_recipe` reads (bytes).
MAX_RECIPE_BYTES = 1 << 20

Pairs = tuple[tuple[Any, Any], ...]


# --------------------------------------------------------------------------- #
# sections
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: how to build a checkpoint's model (see the module docs)."""

    cls: str | None = None
    kwargs: Pairs = ()
    train_epochs: int = 15


@dataclass(frozen=True)
class DataSection:
    """``[data]``: batching of the calibration and evaluation data."""

    batch_size: int = 32
    max_length: int = 64
    num_sentences: int = 512
    num_eval: int = 256


@dataclass(frozen=True)
class ExportSection:
    """``[export]``: which modules go to fixed point, with what types."""

    layers: tuple[str, ...] = ()
    input: str = "auto"
    input_width: int = 16
    accum: FixedPoint | None = None
    result: FixedPoint | None = None
    bias: FixedPoint | None = None
    hls4ml: bool = False
    tolerance: float = 1e-4
    num_samples: int = 256


@dataclass(frozen=True)
class Recipe(pipeline.Recipe):
    """A validated recipe file: the road (:class:`tnquant.pipeline.Recipe`'s sections) and the
    CLI's ``[model]``, ``[data]`` and ``[export]`` tables; ``text`` is the TOML it came from,
    ``path`` its file."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    export: ExportSection | None = None
    text: str = ""
    path: str | None = None


_MODEL = _schema(
    ModelSection,
    {"class": _class_path, "kwargs": _table, "train_epochs": _int(1)},
    {"class": "cls"},
)
_DATA = _schema(DataSection, {f.name: _int(1) for f in dataclasses.fields(DataSection)})
_CALIBRATE = _schema(CalibrateSection, {"num_batches": _int(1), "bias_correction": _bool})
#: The ``[finetune]`` keys: ``FinetuneConfig`` fields (their defaults, its choice lists) and
#: ``distill``; ``seed`` is ``--seed``.
_FINETUNE = _schema(
    FinetuneSection,
    {
        "epochs": _int(1),
        "max_steps": _int(1),
        "lr": _float(0, lo_open=True),
        "scale_lr": _float(0, lo_open=True),
        "weight_decay": _float(),
        "distill": _bool,
        "loss": _choice(*LOSSES),
        "temperature": _float(0, lo_open=True),
        "task_loss": _optional(_choice(*TASK_LOSSES), off="none"),
        "alpha": _float(0, 1),
        "train": _choice(*TRAIN_CHOICES),
        "schedule": _choice(*SCHEDULES),
        "warmup": _warmup,
        "optimizer": _choice(*OPTIMIZERS),
        "clip_grad_norm": _optional(_float(0, lo_open=True)),
        "shuffle": _bool,
        "amp": _optional(_choice(*AMP_CHOICES), off="none"),
        "hidden": _globs,
        "dropout": _optional(_bool, off="auto"),
    },
)
_EXPORT = _schema(
    ExportSection,
    {
        "layers": _globs,
        "input": _input_type,
        "input_width": _int(2, 64),
        "accum": _fixed,
        "result": _fixed,
        "bias": _fixed,
        "hls4ml": _bool,
        "tolerance": _float(0, lo_open=True),
        "num_samples": _int(1),
    },
)


# --------------------------------------------------------------------------- #
# parsing ([factorize] and [quantize]: tnquant.cli.recipe_specs)
# --------------------------------------------------------------------------- #


def _parse_finetune(table: dict[str, Any]) -> FinetuneSection:
    try:
        section = FinetuneSection(**_fields(table, "finetune", _FINETUNE))
    except TypeError as e:  # a value each key's check let through but FinetuneConfig refuses
        raise ValueError(f"recipe table 'finetune': {e}") from None
    except ValueError as e:
        if str(e).startswith("recipe"):
            raise
        raise ValueError(f"recipe table 'finetune': {e}") from None
    if not section.distill and section.task_loss is None:
        raise ValueError("recipe table 'finetune' needs distill = true or a task_loss")
    return section


def _section(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    if name not in raw:
        return None
    return _table(raw[name], name)


def parse_recipe(text: str, path: str | None = None) -> Recipe:
    """Parse and validate a recipe from TOML text (schema in the module docs).

    Parameters
    ----------
    text
        The TOML document.
    path
        Where it came from (kept in :attr:`Recipe.path`, named in errors).

    Returns
    -------
    Recipe

    Raises
    ------
    ValueError
        For TOML syntax errors, unknown keys and bad values; the message
        names the key path (``'finetune.lr'``, ``'quantize.cores.*.bits'``).

    Examples
    --------
    >>> r = parse_recipe('[quantize.weights]\\n"*" = {kind = "ternary"}\\n[finetune]\\nepochs = 2')
    >>> r.quantize.kwargs()["weights"], r.finetune.epochs
    ({'*': Ternary(threshold=0.7, method='twn', granularity='tensor', axis=0, scale='float')}, 2)
    >>> parse_recipe('[finetune]\\nlr = -1\\n[quantize.weights]\\n"*" = {bits = 8}')
    Traceback (most recent call last):
    ...
    ValueError: recipe key 'finetune.lr' must be a number in (0, inf], got -1
    """
    if tomllib is None:  # pragma: no cover
        raise ImportError(
            "reading recipes needs Python >= 3.11 (tomllib) or, on 3.10, "
            "the 'tomli' package (a dependency of tnquant there)"
        )
    where = f" in {path}" if path else ""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe is not valid TOML{where}: {e}") from None
    sections = (
        "model", "data", "search", "ptq", "factorize", "quantize", "calibrate", "finetune",
        "export",
    )  # fmt: skip
    for key in raw:
        if key not in sections:
            raise _unknown(key, sections)
    if not any(k in raw for k in ("search", "factorize", "quantize")):
        raise ValueError(
            f"recipe{where} has none of [search], [factorize], [quantize]: nothing to do"
        )
    both = [k for k in ("factorize", "quantize") if k in raw]
    if "search" in raw and both:
        raise ValueError(
            f"recipe table 'search' writes [factorize] and [quantize] per layer; drop "
            f"[{both[0]}] or [search]"
        )
    model = _fields(_section(raw, "model") or {}, "model", _MODEL)
    kwargs = tuple(dict(model.pop("kwargs")).items())
    factorize, quantize = _section(raw, "factorize"), _section(raw, "quantize")
    finetune, export = _section(raw, "finetune"), _section(raw, "export")
    calibrate = _section(raw, "calibrate") or {}
    search = _section(raw, "search")
    ptq, bias = parse_ptq(_section(raw, "ptq") or {}, calibrate)
    calib_fields = _fields(calibrate, "calibrate", _CALIBRATE)
    if bias is not None:
        calib_fields["bias_correction"] = bias
    export_fields = None if export is None else _fields(export, "export", _EXPORT)
    return Recipe(
        model=ModelSection(cls=model["class"], kwargs=kwargs, train_epochs=model["train_epochs"]),
        data=DataSection(**_fields(_section(raw, "data") or {}, "data", _DATA)),
        factorize=None if factorize is None else _parse_factorize(factorize),
        quantize=None if quantize is None else _parse_quantize(quantize),
        calibrate=CalibrateSection(**calib_fields),
        finetune=None if finetune is None else _parse_finetune(finetune),
        search=None if search is None else parse_search(search),
        ptq=ptq,
        export=None if export_fields is None else ExportSection(**export_fields),
        text=text,
        path=path,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe file ``path`` (see :func:`parse_recipe`).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For a recipe that does not fit the schema (the message names the key),
        or a file over :data:`MAX_RECIPE_BYTES` or not UTF-8.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.toml")
    >>> _ = open(path, "w").write('[quantize.weights]\\n"*" = {bits = 8, granularity = "channel"}')
    >>> load_recipe(path).quantize.weights[0][1].bits
    8
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {str(p)!r} not found")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise ValueError(
            f"recipe file {str(p)!r} is {p.stat().st_size} bytes; a recipe is at "
            f"most {MAX_RECIPE_BYTES}"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe file {str(p)!r} is not UTF-8 text: {e}") from None
    return parse_recipe(text, path=str(p))
