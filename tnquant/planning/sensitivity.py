"""Per-layer sensitivity: the error and the size of every candidate, one layer at a time.

For each searched layer and each candidate :class:`~tnquant.planning.plan.Choice`
the candidate layer is built (one decomposition per factorization spec,
cached and shared by all its quantizer variants), and two numbers are
recorded:

- ``size_bits``: ``SizeCounter().subtree(layer)``, the very count
  :func:`tnquant.model_size_bits` makes of that layer (codes at their
  packed width, scales, zero points, bias). With ``fixed_bits`` (everything
  outside the searched layers) the sizes add up to the model size after
  :func:`~tnquant.planning.plan.apply`.
- ``error``, by ``metric``:

  - ``None`` or ``'layer'`` (the default, fast): relative MSE of the layer's
    own output, ``sum ||y - y_ref||^2 / sum ||y_ref||^2``, on the inputs the
    layer saw on the calibration data (captured once, at most ``max_rows``
    rows per layer);
  - ``'scaled'``: the layer errors, each layer's scaled by the ratio of
    the model-output relative MSE to the layer's own for one probe
    candidate (the dense quantized one of median error): output-MSE units
    at the cost of one model pass per layer. Layers whose errors the
    network amplifies (or ignores: an unused pooler) are weighted so;
  - ``'output'``: relative MSE of the model's output with only this layer
    changed (one model pass over ``data`` per candidate);
  - ``'hessian'``: the same quantity to second order, HAWQ-v2 style:
    ``(Tr(H_l) / n_l) ||W_cand - W||^2 / sum ||f||^2`` with ``Tr(H_l)`` the
    Hutchinson estimate of the Gauss-Newton Hessian of the output distance
    (:mod:`tnquant.planning.hessian`): a few backward passes in all, then no
    model pass per candidate;
  - a callable ``metric(model) -> float``, lower is better (a loss, an error
    rate): its increase over the unchanged model, clamped at 0, with only
    this layer changed.

Examples
--------
>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> cands = Candidates(formats=(), bits=(8, 4), ternary=False, binary=False)
>>> sens = sensitivity(model, [torch.randn(32, 16)], cands, progress=False)
>>> sens.names, [c.label() for c in sens.choices[0]]
(['0', '2'], ['dense/float', 'dense/int8/channel', 'dense/int4/channel'])
>>> sens.errors[0][0], sens.sizes[0][0]  # float: no error, 272 float32 numbers
(0.0, 8704)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.core.capture import evaluating
from tnquant.core.globs import selected
from tnquant.core.output import model_output
from tnquant.factorization import collect_grams
from tnquant.planning.candidates import Candidates, candidate_table, candidates_for
from tnquant.planning.evaluate import Evaluator, Targets
from tnquant.planning.inputs import check_inputs, data_passes
from tnquant.planning.plan import Choice
from tnquant.planning.ties import split_ties
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import quantize
from tnquant.registry import factorized_class, lookup, weight_pairs
from tnquant.sizes import SizeCounter, model_size_bits

__all__ = ["Candidates", "Sensitivity", "sensitivity", "search_targets", "output_tensor"]

Metric = Union[None, str, Callable[[nn.Module], float]]


def _factorized(module: nn.Module, spec: Any) -> Any:
    """The registry's factorized class of ``module`` under ``spec`` (``ValueError`` if none)."""
    cls = factorized_class(module, spec)
    if cls is None:
        raise ValueError(f"{type(spec).__name__} does not factorize a {type(module).__name__}")
    return cls


def _takes_gram(module: nn.Module) -> bool:
    """Whether ``module``'s weight kind is fitted to an input Gram matrix (a matrix layer)."""
    kind = lookup(module)
    return kind is not None and kind.weight_kind == "linear"


def search_targets(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> list[tuple[list[str], nn.Module]]:
    """The dense layers a search may change: every dense kind of the layer registry.

    ``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding`` and (once transformers is
    imported) GPT-2's ``Conv1D``. Exact types only (not subclasses, not the
    model itself); a shared module appears once with all its names.

    Examples
    --------
    >>> from torch import nn
    >>> [names for names, _ in search_targets(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))]
    [['0']]
    """
    found: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in found:
            found[id(module)][0].append(name)
            continue
        kind = lookup(module)
        if not name or kind is None or kind.role != "dense" or kind.quantized is None:
            continue
        if not selected(name, include, exclude):
            continue
        found[id(module)] = ([name], module)
    return list(found.values())


def output_tensor(out: Any) -> Tensor:
    """The tensor a model output stands for: :func:`tnquant.core.output.model_output`.

    Kept for code that imported it from here; the one rule lives in the core
    (a tensor, the first tensor of a tuple or list, else ``logits``, else
    ``last_hidden_state``, else a mapping's first tensor).

    Examples
    --------
    >>> import torch
    >>> output_tensor((torch.ones(2), torch.zeros(1))).tolist()
    [1.0, 1.0]
    """
    return model_output(out)


@dataclass
class Sensitivity:
    """Candidates, sizes and errors per searched layer (what the allocator needs).

    Attributes
    ----------
    names
        First name of each searched layer; ``aliases`` all its names.
    choices, sizes, errors, ranks
        Per layer, one entry per candidate.
    fixed_bits
        Bits of everything outside the searched layers.
    dense_bits
        :func:`tnquant.model_size_bits` of the model as it was.
    metric
        ``'layer'``, ``'output'`` or the callable's name.
    skipped
        ``(layer, candidate label, reason)`` for candidates that could not be
        built or repeat another's ranks; then ``("candidates['<glob>']",
        'pattern', 'matched nothing')`` for each glob of a mapping of
        candidates that matched no searched layer (as ``quantize`` reports
        its patterns).
    reference
        The callable metric's value on the unchanged model (else ``None``).
    tied
        ``{searched layer: [layers holding its weight]}``: those take its
        choice in the plan (:mod:`tnquant.planning.ties`).
    params
        Parameters of each searched layer (as it was).
    data_aware
        Whether the factorized Linear candidates were fitted to data
        (``fit_data``; carry a plan of them out with ``apply(model, plan,
        data=fit_data)``).
    """

    names: list[str]
    aliases: list[list[str]]
    choices: list[list[Choice]]
    sizes: list[list[int]]
    errors: list[list[float]]
    ranks: list[list[tuple[int, ...]]]
    fixed_bits: int
    dense_bits: int
    metric: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    reference: float | None = None
    data_aware: bool = False
    tied: dict[str, list[str]] = field(default_factory=dict)
    params: list[int] = field(default_factory=list)

    def min_size_bits(self) -> int:
        """The smallest model any combination of candidates gives."""
        return self.fixed_bits + sum(min(s) for s in self.sizes)


# --------------------------------------------------------------------------- #
# building candidates
# --------------------------------------------------------------------------- #


def _quantized(base: nn.Module, choice: Choice) -> nn.Module:
    """``base`` with the choice's quantizers (a dense layer is wrapped, sharing its tensors)."""
    if not choice.quantized:
        return base
    holder = nn.Sequential(base)
    cores = {k: s for k, s in choice.cores} or None
    weights = None if choice.weights is None else {"0": choice.weights}
    quantize(holder, weights=weights, cores=cores, progress=False)
    layer = holder[0]
    # fix the weight qparams once (an 'mse' observer would otherwise search on every call)
    for _, tensor, q in weight_pairs(layer):
        if isinstance(q, Quantizer) and q.mode == "quantize" and q.dynamic:
            q.freeze(tensor.detach())
    return layer


def _metric_name(metric: Metric) -> str:
    if metric is None or metric == "layer":
        return "layer"
    if metric in ("output", "scaled", "hessian"):
        return str(metric)
    if callable(metric):
        return str(getattr(metric, "__name__", "metric"))
    raise ValueError(
        f"metric must be None, 'layer', 'scaled', 'output', 'hessian' or a callable "
        f"model -> float, "
        f"got {metric!r}"
    )


def _fixed_bits(model: nn.Module, targets: Targets) -> int:
    counter = SizeCounter()
    for _, module in targets:
        counter.modules.update(id(m) for m in module.modules())
        # a weight tied to a searched layer is counted with it, not here
        counter.tensors.update(id(t) for t in module.state_dict(keep_vars=True).values())
    return sum(counter.subtree(model))


def sensitivity(
    model: nn.Module,
    data: Any,
    candidates: Any = None,
    metric: Metric = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    num_batches: int | None = None,
    max_rows: int = 4096,
    fit_data: Any = None,
    progress: bool = True,
) -> Sensitivity:
    """Size and error of every candidate of every layer, one layer changed at a time.

    Parameters
    ----------
    model
        A dense (not yet factorized or quantized) model; it is left unchanged.
    data
        Calibration batches (see :mod:`tnquant.batches`; checks: :mod:`tnquant.planning.inputs`).
    candidates
        A :class:`Candidates` grid (the default one when ``None``), a list of
        :class:`~tnquant.planning.plan.Choice` for every layer (those a layer
        does not support are dropped), or a mapping from name globs to either
        (first match wins; layers no glob matches are not searched; a glob
        that only ever matches after an earlier one raises ``ValueError``,
        one that matches no layer is listed in ``skipped``).
    metric
        ``None``/``'layer'``, ``'output'`` or a callable (see the module docs).
    include, exclude
        Globs on layer names to search (others are kept as they are).
    num_batches
        Use at most this many batches of ``data``.
    max_rows
        Inputs kept per layer (rows of a Linear, images of a Conv2d), a seeded
        random subset (``'layer'`` metric only).
    fit_data
        Batches to fit the factorized candidates of Linear layers to (the
        data-aware fit of ``factorize(..., data=)``: same ranks and size,
        lower output error) instead of decomposing the weights alone; all
        of them are used (a fit wants more input rows than features, often
        more than the metric needs). Carry a plan searched this way out with
        ``apply(model, plan, data=fit_data)``.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Sensitivity

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from tnquant import QuantSpec
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> sens = sensitivity(model, [torch.randn(16, 8)], [Choice(None, QuantSpec(bits=2))],
    ...                    progress=False)
    >>> 0 < sens.errors[0][0] < 1
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    metric_name = _metric_name(metric)
    check_inputs(model, data, data_reads=data_passes(metric_name), fit_data=fit_data, fit_reads=1)
    targets, options, tied, pattern_rows = _select(model, candidates, include, exclude)
    with evaluating(model, grad=torch.is_grad_enabled()):
        grams: dict[int, Tensor] = {}
        if fit_data is not None:
            linears = [m for _, m in targets if _takes_gram(m)]
            grams = collect_grams(
                model, linears, fit_data, None, progress, what="search", arg="fit_data"
            )
        sens = _measure(
            model,
            data,
            targets,
            options,
            metric,
            metric_name,
            num_batches,
            max_rows,
            grams,
            progress,
        )
    sens.skipped.extend(pattern_rows)
    sens.tied = tied
    sens.data_aware = fit_data is not None
    return sens


class _Rows:
    """Collects the ``skipped`` rows :meth:`~tnquant.core.globs.GlobTable.check` reports."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def skip(self, name: str, kind: str, reason: str) -> None:
        self.rows.append((name, kind, reason))


def _select(
    model: nn.Module, candidates: Any, include: Iterable[str] | None, exclude: Iterable[str] | None
) -> tuple[Targets, list[list[Choice]], dict[str, list[str]], list[tuple[str, str, str]]]:
    """The layers to search, their candidates, the tied followers, and the skipped rows.

    Tied layers are split by :func:`~tnquant.planning.ties.split_ties` (rows
    for the followers and the dropped factorized candidates); then a row per
    candidate pattern unmatched.

    A mapping of candidates is one :class:`~tnquant.core.globs.GlobTable`:
    the first matching glob wins, a glob that can never win is refused, and
    one that matched no searched layer is reported (as ``quantize`` does).
    """
    table = candidate_table(candidates)
    targets: Targets = []
    options = []
    for names, module in search_targets(model, include, exclude):
        opts = candidates_for(candidates, names[0], module, table=table)
        if opts:
            targets.append((names, module))
            options.append(opts)
    targets, options, tied, tie_rows = split_ties(model, targets, options)
    unmatched = _Rows()
    unmatched.rows.extend(tie_rows)
    if table is not None:
        table.check(unmatched)
    if not targets:
        raise ValueError(
            "no layer to search: the model has no dense Linear, Conv1d, Conv2d, "
            "Embedding or Conv1D that include/exclude/candidates select"
        )
    return targets, options, tied, unmatched.rows


def _layer_entries(
    k: int,
    name: str,
    module: nn.Module,
    options: list[Choice],
    evaluator: Evaluator,
    skipped: list[tuple[str, str, str]],
    gram: Tensor | None = None,
) -> tuple[list[Choice], list[int], list[float], list[tuple[int, ...]]]:
    """Build, size and measure every candidate of one layer (decompositions cached;
    fitted to the input Gram matrix ``gram`` of a Linear when given)."""
    fit = {} if gram is None else {"gram": gram}
    layers: dict[Any, tuple[Any, tuple[int, ...]] | str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    choices, sizes, errors, ranks = [], [], [], []
    for choice in options:
        spec = choice.factorization
        if spec is not None and spec not in layers:
            try:
                built = _factorized(module, spec).from_dense(module, spec, name=name, **fit)
                layers[spec] = (built, tuple(built.ranks))
            except ValueError as err:
                layers[spec] = str(err)
        entry = (module, ()) if spec is None else layers[spec]
        if isinstance(entry, str):
            skipped.append((name, choice.label(), entry))
            continue
        base, rk = entry
        shapes = () if spec is None else tuple(cast(Any, base)._core_shapes())
        key = (type(spec).__name__, rk, shapes, choice.weights, choice.cores)
        if key in seen:
            skipped.append((name, choice.label(), f"same layer as {seen[key]}"))
            continue
        try:
            cand = _quantized(base, choice)
        except ValueError as err:
            skipped.append((name, choice.label(), str(err)))
            continue
        try:
            seen[key] = choice.label()
            sizes.append(sum(SizeCounter().subtree(cand)))
            trivial = spec is None and not choice.quantized
            errors.append(0.0 if trivial else evaluator.error(k, cand))
            choices.append(choice)
            ranks.append(rk)
        finally:
            if spec is not None:
                base.core_quantizers = None
    if not choices:
        raise ValueError(
            f"no candidate could be built for layer {name!r}; the reasons: "
            f"{[s for s in skipped if s[0] == name]}"
        )
    return choices, sizes, errors, ranks


def _measure(
    model: nn.Module,
    data: Any,
    targets: Targets,
    options: list[list[Choice]],
    metric: Metric,
    metric_name: str,
    num_batches: int | None,
    max_rows: int,
    grams: dict[int, Tensor],
    progress: bool,
) -> Sensitivity:
    evaluator = Evaluator(model, data, targets, metric, metric_name, num_batches, max_rows)
    sens = Sensitivity(
        [n[0] for n, _ in targets],
        [n for n, _ in targets],
        [],
        [],
        [],
        [],
        _fixed_bits(model, targets),
        model_size_bits(model),
        metric_name,
        reference=evaluator.reference,
        params=[sum(p.numel() for p in m.parameters()) for _, m in targets],
    )
    bar = tqdm(list(enumerate(targets)), desc="sensitivity", disable=not progress)
    for k, (names, module) in bar:
        bar.set_postfix_str(names[0])
        evaluator.start(k)
        choices, sizes, errors, ranks = _layer_entries(
            k, names[0], module, options[k], evaluator, sens.skipped, grams.get(id(module))
        )
        evaluator.finish(k)
        sens.choices.append(choices)
        sens.sizes.append(sizes)
        sens.errors.append(errors)
        sens.ranks.append(ranks)
        if metric_name == "scaled":
            _rescale(k, module, choices, errors, evaluator)
    return sens


def _rescale(
    k: int, module: nn.Module, choices: list[Choice], errors: list[float], evaluator: Evaluator
) -> None:
    """Scale a layer's local errors by (output error / local error) of one probe candidate.

    The probe is the dense quantized candidate (else any) with the median
    non-zero local error; one model pass over the data per layer.
    """
    probes = [c for c, e in enumerate(errors) if e > 0 and choices[c].factorization is None]
    probes = probes or [c for c, e in enumerate(errors) if e > 0]
    if not probes:
        return
    probes.sort(key=lambda c: errors[c])
    c = probes[len(probes) // 2]
    spec = choices[c].factorization
    base = module if spec is None else _factorized(module, spec).from_dense(module, spec)
    out_err = evaluator.error(k, _quantized(base, choices[c]), output=True)
    factor = out_err / errors[c]
    errors[:] = [e * factor for e in errors]
