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

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.batches import call_model, iterate_batches
from tnquant.factorization import LAYER_TABLE, collect_grams
from tnquant.layers.quantized import weight_pairs
from tnquant.names import selected
from tnquant.planning.candidates import Candidates, candidates_for
from tnquant.planning.hessian import candidate_weight, hutchinson_traces
from tnquant.planning.inputs import check_inputs, data_passes
from tnquant.planning.plan import Choice
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import quantize
from tnquant.sizes import SizeCounter, model_size_bits

__all__ = ["Candidates", "Sensitivity", "sensitivity", "search_targets", "output_tensor"]

_DENSE = (nn.Linear, nn.Conv2d, nn.Embedding)
Metric = Union[None, str, Callable[[nn.Module], float]]


def search_targets(model: nn.Module, include: Iterable[str] | None = None,
                   exclude: Iterable[str] | None = None) -> list[tuple[list[str], nn.Module]]:
    """The dense ``Linear``/``Conv2d``/``Embedding`` layers a search may change.

    Exact types only (not subclasses, not the model itself); a shared module
    appears once with all its names.

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
        if not name or type(module) not in _DENSE:
            continue
        if not selected(name, include, exclude):
            continue
        found[id(module)] = ([name], module)
    return list(found.values())


def output_tensor(out: Any) -> Tensor:
    """The tensor a model output stands for: itself, the first of a tuple or mapping.

    Examples
    --------
    >>> import torch
    >>> output_tensor((torch.ones(2), torch.zeros(1))).tolist()
    [1.0, 1.0]
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__}); "
                    f"pass a callable metric instead")


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
        built or repeat another's ranks.
    reference
        The callable metric's value on the unchanged model (else ``None``).
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


def _set(model: nn.Module, names: list[str], new: nn.Module) -> None:
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[attr] = new


def _capture(model: nn.Module, targets: list[tuple[list[str], nn.Module]], data: Any,
             num_batches: int | None, max_rows: int) -> list[Tensor]:
    """Inputs each target saw (Linear: rows; Conv2d: images; Embedding: indices)."""
    chunks: list[list[Tensor]] = [[] for _ in targets]
    gen = torch.Generator().manual_seed(0)

    def rows(x: Tensor, module: nn.Module) -> Tensor:
        if isinstance(module, nn.Linear):
            return x.reshape(-1, x.shape[-1])
        if isinstance(module, nn.Embedding):
            return x.reshape(-1)
        return x if x.dim() == 4 else x.unsqueeze(0)

    def subsample(x: Tensor) -> Tensor:
        if x.shape[0] <= max_rows:
            return x
        idx = torch.randperm(x.shape[0], generator=gen)[:max_rows].sort().values
        return x[idx.to(x.device)]

    def hook(k: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            chunks[k].append(subsample(rows(args[0].detach(), module)))
        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, (_, m) in enumerate(targets)]
    try:
        with torch.no_grad():
            for batch in iterate_batches(data, num_batches, what="search"):
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = []
    for (names, _), xs in zip(targets, chunks, strict=True):
        if not xs:
            raise ValueError(f"layer {names[0]!r} was never called on the data; exclude it "
                             f"(exclude=[{names[0]!r}]) or pass data that reaches it")
        out.append(subsample(torch.cat(xs)))
    return out


def _rel_mse(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    num = den = 0.0
    for y, ref in pairs:
        num += float((y.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _chunks(x: Tensor, size: int = 2048) -> list[Tensor]:
    return list(x.split(size)) if x.shape[0] else [x]


def _model_outputs(model: nn.Module, data: Any, num_batches: int | None) -> list[Tensor]:
    with torch.no_grad():
        return [output_tensor(call_model(model, b)).detach()
                for b in iterate_batches(data, num_batches, what="search")]


def _metric_name(metric: Metric) -> str:
    if metric is None or metric == "layer":
        return "layer"
    if metric in ("output", "scaled", "hessian"):
        return str(metric)
    if callable(metric):
        return str(getattr(metric, "__name__", "metric"))
    raise ValueError(f"metric must be None, 'layer', 'scaled', 'output', 'hessian' or a callable "
                     f"model -> float, "
                     f"got {metric!r}")


def _fixed_bits(model: nn.Module, targets: list[tuple[list[str], nn.Module]]) -> int:
    counter = SizeCounter()
    for _, module in targets:
        counter.modules.update(id(m) for m in module.modules())
    return sum(counter.subtree(model))


def sensitivity(model: nn.Module, data: Any, candidates: Any = None, metric: Metric = None, *,
                include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                num_batches: int | None = None, max_rows: int = 4096,
                fit_data: Any = None, progress: bool = True) -> Sensitivity:
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
        (first match wins; layers no glob matches are not searched).
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
    check_inputs(model, data, data_reads=data_passes(metric_name), fit_data=fit_data,
                 fit_reads=1)
    targets = []
    options = []
    for names, module in search_targets(model, include, exclude):
        opts = candidates_for(candidates, names[0], module)
        if opts:
            targets.append((names, module))
            options.append(opts)
    if not targets:
        raise ValueError("no layer to search: the model has no dense Linear, Conv2d or "
                         "Embedding that include/exclude/candidates select")
    was_training = model.training
    model.eval()
    try:
        grams: dict[int, Tensor] = {}
        if fit_data is not None:
            linears = [m for _, m in targets if isinstance(m, nn.Linear)]
            grams = collect_grams(model, linears, fit_data, None, progress, what="search",
                                  arg="fit_data")
        sens = _measure(model, data, targets, options, metric, metric_name, num_batches,
                        max_rows, grams, progress)
        sens.data_aware = fit_data is not None
        return sens
    finally:
        model.train(was_training)


class _Evaluator:
    """The error of a candidate layer in place of target ``k``, by the chosen metric."""

    def __init__(self, model: nn.Module, data: Any, targets: list[tuple[list[str], nn.Module]],
                 metric: Metric, metric_name: str, num_batches: int | None,
                 max_rows: int) -> None:
        self.model, self.data, self.targets = model, data, targets
        self.metric_name, self.num_batches = metric_name, num_batches
        self.fn = cast(Callable[[nn.Module], float], metric)
        self.inputs: list[Tensor] = []
        self.ref_out: list[Tensor] = []
        self.reference: float | None = None
        self.chunks: list[Tensor] = []
        self.refs: list[Tensor] = []
        self.local = metric_name in ("layer", "scaled")
        if self.local:
            self.inputs = _capture(model, targets, data, num_batches, max_rows)
        if metric_name in ("output", "scaled"):
            self.ref_out = _model_outputs(model, data, num_batches)
        self.traces: list[float] = []
        self.den = 0.0
        if metric_name == "hessian":
            self.traces, self.den = hutchinson_traces(model, [m for _, m in targets], data,
                                                      num_batches)
        if not self.local and metric_name not in ("output", "hessian"):
            with torch.no_grad():
                self.reference = float(self.fn(model))

    def start(self, k: int) -> None:
        if self.local:
            self.chunks = _chunks(self.inputs[k])
            with torch.no_grad():
                self.refs = [self.targets[k][1](x) for x in self.chunks]

    def finish(self, k: int) -> None:
        if self.local:
            self.inputs[k] = self.inputs[k][:0]  # free what this layer no longer needs
            self.chunks, self.refs = [], []

    def error(self, k: int, cand: nn.Module, *, output: bool = False) -> float:
        if self.local and not output:
            with torch.no_grad():
                return _rel_mse((cand(x), ref) for x, ref in zip(self.chunks, self.refs,
                                                                 strict=True))
        names, module = self.targets[k]
        if self.metric_name == "hessian":
            with torch.no_grad():
                weight = cast(Tensor, module.weight)
                change = float((candidate_weight(cand).double() - weight.double()).pow(2).sum())
            return self.traces[k] / weight.numel() * change / self.den if self.den > 0 else 0.0
        _set(self.model, names, cand)
        try:
            if self.metric_name in ("output", "scaled"):
                outs = _model_outputs(self.model, self.data, self.num_batches)
                return _rel_mse(zip(outs, self.ref_out, strict=True))
            with torch.no_grad():
                return max(0.0, float(self.fn(self.model)) - cast(float, self.reference))
        finally:
            _set(self.model, names, module)


def _layer_entries(k: int, name: str, module: nn.Module, options: list[Choice],
                   evaluator: _Evaluator, skipped: list[tuple[str, str, str]],
                   gram: Tensor | None = None
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
                built = LAYER_TABLE[(type(module), type(spec))].from_dense(module, spec,
                                                                           name=name, **fit)
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
        raise ValueError(f"no candidate could be built for layer {name!r}; the reasons: "
                         f"{[s for s in skipped if s[0] == name]}")
    return choices, sizes, errors, ranks


def _measure(model: nn.Module, data: Any, targets: list[tuple[list[str], nn.Module]],
             options: list[list[Choice]], metric: Metric, metric_name: str,
             num_batches: int | None, max_rows: int, grams: dict[int, Tensor],
             progress: bool) -> Sensitivity:
    evaluator = _Evaluator(model, data, targets, metric, metric_name, num_batches, max_rows)
    sens = Sensitivity([n[0] for n, _ in targets], [n for n, _ in targets], [], [], [], [],
                       _fixed_bits(model, targets), model_size_bits(model), metric_name,
                       reference=evaluator.reference)
    bar = tqdm(list(enumerate(targets)), desc="sensitivity", disable=not progress)
    for k, (names, module) in bar:
        bar.set_postfix_str(names[0])
        evaluator.start(k)
        choices, sizes, errors, ranks = _layer_entries(k, names[0], module, options[k],
                                                       evaluator, sens.skipped,
                                                       grams.get(id(module)))
        evaluator.finish(k)
        sens.choices.append(choices)
        sens.sizes.append(sizes)
        sens.errors.append(errors)
        sens.ranks.append(ranks)
        if metric_name == "scaled":
            _rescale(k, module, choices, errors, evaluator)
    return sens


def _rescale(k: int, module: nn.Module, choices: list[Choice], errors: list[float],
             evaluator: _Evaluator) -> None:
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
    base = module if spec is None else LAYER_TABLE[(type(module), type(spec))].from_dense(
        module, spec)
    out_err = evaluator.error(k, _quantized(base, choices[c]), output=True)
    factor = out_err / errors[c]
    errors[:] = [e * factor for e in errors]
