"""``quantize``, ``convert``, ``model_size_bits``: the model-wide quantization verbs.

Names
-----
Every pattern is an ``fnmatch`` glob (``*`` also crosses dots), matched
against names built from ``model.named_modules()``:

- ``weights=``: the *layer* name (``'encoder.0.fc'``); the spec goes to the
  weight of a dense layer and to every core of a factorized layer that
  ``cores=`` does not claim.
- ``cores=``: an ``int`` core index (negative counts from the end) or a glob
  on ``'<layer>.cores.<k>'`` (``'encoder.*.cores.0'``, ``'*.cores.1'``).
  ``cores=`` takes precedence over ``weights=``.
- ``activations=``: a glob on ``'<layer>.input'``, ``'<layer>.output'`` and,
  for factorized layers, ``'<layer>.inter_<k>'`` (the layer's
  ``intermediate_names()``). Embeddings have no ``'input'`` (indices).

Within one mapping the **first matching entry wins** (as in ``factorize``):
put specific patterns first, ``{'*.inter_*': QuantSpec(16), '*': QuantSpec(8)}``.
A pattern that matches names but never wins (shadowed by an earlier one)
raises ``ValueError``; one that matches nothing is listed in
``report.skipped``. A single spec is the mapping ``{'*': spec}``; ``None`` as
a value means "no quantizer" (it removes one already there).

Re-quantizing
-------------
Calling ``quantize`` again replaces the quantizers of every tensor or
activation that an argument given in *this* call matches (with a fresh,
uncalibrated :class:`~tnquant.quant.Quantizer`); arguments left ``None`` and
names no pattern matches keep what they have. A converted tensor (a
:class:`~tnquant.quant.frozen.FrozenTensor`) cannot be re-quantized: its
float values are gone.

Sizes
-----
:func:`model_size_bits` and :func:`size_report` (from :mod:`tnquant.sizes`,
re-exported here) count every stored bit; a fake-quant model counts what
:func:`convert` will store, so the number does not change on convert.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from tnquant import QuantSpec
>>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
>>> report = quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
>>> report["0"]["weights"], type(model[0]).__name__
('int4/channel', 'QuantLinear')
>>> x = torch.randn(3, 16)
>>> y = model(x)
>>> _ = convert(model, progress=False)
>>> torch.equal(model(x), y)
True
>>> model_size_bits(model)  # codes 64+16 bytes, 12 float32 scales, 12 float32 biases
1408
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tnquant.conversion import ConvertReport, convert, tensor_id, weight_ties
from tnquant.core.feeds import batchnorms_after
from tnquant.core.globs import GlobTable, selected
from tnquant.core.modules import join, replace_module
from tnquant.core.ties import untie_hint
from tnquant.quant.frozen import FrozenTensor, spec_summary
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import (
    LayerKind,
    activation_sites,
    lookup,
    quant_state,
    unsupported,
    weight_pairs,
    weight_spec,
)
from tnquant.report import Report, Sizes
from tnquant.sizes import SizeCounter, model_size_bits, size_report
from tnquant.specs import Binary, Codebook, FixedPoint, QuantSpec, Ternary

__all__ = ["quantize", "convert", "model_size_bits", "size_report", "spec_summary", "ConvertReport"]

_SPECS = (QuantSpec, Binary, Ternary, FixedPoint, Codebook)
_Q_COLUMNS = (
    "name",
    "kind",
    "weights",
    "activations",
    "params",
    "bits_before",
    "bits_after",
    "note",
)


# --------------------------------------------------------------------------- #
# patterns and layer anatomy
# --------------------------------------------------------------------------- #


def _check_value(spec: Any, where: str) -> None:
    if spec is not None and not isinstance(spec, _SPECS):
        raise TypeError(
            f"{where} must be a QuantSpec, Binary, Ternary, FixedPoint or Codebook spec (or "
            f"None), got {type(spec).__name__}"
        )


def _table(arg: Any, what: str, int_keys: bool = False) -> GlobTable:
    """One of ``weights=``/``cores=``/``activations=`` (a single spec is ``{'*': spec}``)."""
    if isinstance(arg, _SPECS):
        arg = {"*": arg}
    elif arg is not None and not isinstance(arg, Mapping):
        raise TypeError(
            f"{what} must be a QuantSpec, Binary, Ternary, FixedPoint or Codebook spec, or "
            f"a mapping of patterns to them, got {type(arg).__name__}"
        )
    return GlobTable(arg, what, check_value=_check_value, int_keys=int_keys)


def _kind(module: nn.Module) -> LayerKind | None:
    """The registry entry of a layer ``quantize`` can change (a quantizable kind), or None."""
    kind = lookup(module)
    return kind if kind is not None and kind.quantizable else None


def _check_act_spec(spec: Any, where: str) -> None:
    gran = getattr(spec, "granularity", "tensor")
    if gran != "tensor":
        raise ValueError(
            f"activation quantizers are per tensor (an activation's shape changes "
            f"with the batch); {where} got granularity {gran!r}"
        )
    if isinstance(spec, Ternary) and spec.method == "ttq":
        raise ValueError(
            f"Ternary(method='ttq') learns weight scales; use Ternary() for activation {where}"
        )


def _shape(t: Tensor, q: nn.Module | None) -> tuple[int, ...]:
    return q.shape if isinstance(q, FrozenTensor) else tuple(t.shape)


# --------------------------------------------------------------------------- #
# quantize
# --------------------------------------------------------------------------- #


def _targets(
    model: nn.Module,
    include: Iterable[str] | None,
    exclude: Iterable[str] | None,
    report: Report,
    weights: GlobTable,
) -> list[tuple[nn.Module, list[str]]]:
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    refused: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in found:
            found[id(module)][1].append(name)
            continue
        if id(module) in refused or not selected(name, include, exclude):
            continue
        kind = _kind(module)
        if kind is None:
            entry = weights.winner(name, record=False)
            reason = unsupported(module) if lookup(module) is None else None
            if reason is not None and entry is not None and weights.entries is not None:
                if weights.entries[entry][1] is not None:
                    report.skip(name, type(module).__name__, reason)
                    refused.add(id(module))
            continue
        if kind.role == "dense" and not name:
            report.skip(
                name,
                type(module).__name__,
                "the model itself cannot be replaced; wrap it, e.g. in nn.Sequential",
            )
            continue
        found[id(module)] = (module, [name])
    return list(found.values())


def _plan_layer(
    module: nn.Module, name: str, pats: tuple[GlobTable, GlobTable, GlobTable]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Which weight tensors and activation sites this call changes, and to what."""
    weights, cores, acts = pats
    wchanges: dict[str, Any] = {}
    pairs = weight_pairs(module)
    factorized = cast(LayerKind, lookup(module)).role == "factorized"
    for k, (tname, t, q) in enumerate(pairs):
        found, spec = False, None
        if factorized and cores.given:
            found, spec = cores.lookup(join(name, tname), k, len(pairs))
        if not found and weights.given:
            found, spec = weights.lookup(name)
        if not found:
            continue
        where = f"{join(name, tname)!r}"
        if isinstance(q, FrozenTensor):
            raise ValueError(
                f"{where} is converted (integer storage, its float values are "
                f"gone); quantize the float model instead"
            )
        if spec is not None:
            spec = weight_spec(module, spec, _shape(t, q), where)
        wchanges[tname] = spec
    achanges: dict[str, Any] = {}
    if acts.given:
        for site in activation_sites(module):
            found, spec = acts.lookup(join(name, site))
            if found:
                if spec is not None:
                    _check_act_spec(spec, repr(join(name, site)))
                achanges[site] = spec
    return wchanges, achanges


def _new_quantizer(spec: Any, ref: Tensor) -> nn.Module:
    return Quantizer(spec).to(device=ref.device)


def _plan_ties(model: nn.Module, plans: list[Any]) -> tuple[set[int], dict[int, str]]:
    """Check the specs tied weights get; the tensors to share one quantizer, notes per layer.

    Tied members (one parameter, e.g. an LM head and its embedding) whose
    specs are equal get one shared quantizer; two different specs are refused.
    """
    planned = {id(module): w for module, _, w, _ in plans}
    shared: set[int] = set()
    notes: dict[int, str] = {}
    for tid, members in weight_ties(model).items():
        specs: dict[str, Any] = {}
        for name, tname, module in members:
            w = planned.get(id(module), {})
            q = dict((n, q) for n, _, q in weight_pairs(module))[tname]
            specs[join(name, tname)] = w[tname] if tname in w else getattr(q, "spec", None)
        chosen = {repr(v): (k, v) for k, v in specs.items() if v is not None}
        if len(chosen) > 1:
            (a, sa), (b, sb) = list(chosen.values())[:2]
            raise ValueError(
                f"{a!r} and {b!r} are one tied parameter but would get different specs "
                f"({spec_summary(sa)} and {spec_summary(sb)}); give them one spec, or untie "
                f"them first: {untie_hint(a.rpartition('.')[0])}"
            )
        if not chosen:
            continue
        shared.add(tid)
        floats = [k for k, v in specs.items() if v is None]
        for name, tname, module in members:
            if id(module) in planned and tname in planned[id(module)]:
                others = [k for k in specs if k != join(name, tname)]
                note = f"{tname} tied to {', '.join(others)}: one quantizer"
                if floats:
                    note = f"{tname} tied to {', '.join(floats)}, left float: stored twice"
                notes[id(module)] = note
    return shared, notes


def _apply(
    module: nn.Module,
    wchanges: dict[str, Any],
    achanges: dict[str, Any],
    shared: dict[int, nn.Module | None],
) -> None:
    pairs = weight_pairs(module)
    ref = pairs[0][1]

    def weight_quantizer(spec: Any, t: Tensor) -> nn.Module:
        if tensor_id(t) not in shared:
            return _new_quantizer(spec, t)
        q = shared[tensor_id(t)]
        if q is None:
            q = shared[tensor_id(t)] = _new_quantizer(spec, t)
        return q

    if cast(LayerKind, lookup(module)).role == "factorized":
        qs = [q if q is not None else nn.Identity() for _, _, q in pairs]
        for k, (tname, t, _) in enumerate(pairs):
            if tname in wchanges:
                spec = wchanges[tname]
                qs[k] = nn.Identity() if spec is None else weight_quantizer(spec, t)
        keep = any(not isinstance(q, nn.Identity) for q in qs)
        module.core_quantizers = cast(Any, nn.ModuleList(qs) if keep else None)
    elif "weight" in wchanges:
        spec = wchanges["weight"]
        module.weight_quantizer = cast(Any, None if spec is None else weight_quantizer(spec, ref))
    if achanges:
        current = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
        acts: dict[str, nn.Module] = dict(current.items()) if current is not None else {}
        for site, spec in achanges.items():
            acts.pop(site, None)
            if spec is not None:
                acts[site] = _new_quantizer(spec, ref)
        order = activation_sites(module)
        ordered = {s: acts[s] for s in order if s in acts}
        module.act_quantizers = cast(Any, nn.ModuleDict(ordered) if ordered else None)


def _summaries(module: nn.Module) -> tuple[str, str]:
    pairs = weight_pairs(module)
    specs = [(tname, getattr(q, "spec", None)) for tname, _, q in pairs]
    if len(specs) == 1:
        weights = spec_summary(specs[0][1])
    else:
        weights = ", ".join(f"{tname}={spec_summary(s)}" for tname, s in specs)
    acts = cast("nn.ModuleDict | None", module._modules.get("act_quantizers"))
    act_text = ", ".join(
        f"{site}={spec_summary(getattr(q, 'spec', None))}"
        for site, q in (acts.items() if acts is not None else ())
    )
    return weights, act_text


def _params(module: nn.Module) -> int:
    n = sum(int(torch.Size(_shape(t, q)).numel()) for _, t, q in weight_pairs(module))
    bias = module._parameters.get("bias")
    return n + (bias.numel() if bias is not None else 0)


def quantize(
    model: nn.Module,
    weights: Any = None,
    activations: Any = None,
    cores: Any = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    progress: bool = True,
) -> Report:
    """Attach a quantizer to every weight tensor, core and activation that a pattern names.

    Changes ``model`` in place. Exact ``nn.Linear``/``nn.Conv2d``/``nn.Embedding``
    modules (not subclasses) that get any quantizer are swapped for
    :class:`~tnquant.layers.quantized.QuantLinear` / ``QuantConv2d`` /
    ``QuantEmbedding`` (sharing their parameters); factorized layers get
    ``core_quantizers`` (one :class:`~tnquant.quant.Quantizer` per core,
    ``nn.Identity`` for a core left float) and ``act_quantizers``.

    Parameters
    ----------
    model
        Any ``nn.Module``.
    weights
        A spec (``QuantSpec``, ``Binary``, ``Ternary``, ``FixedPoint``) or a
        mapping from layer-name globs to specs (or ``None``), for dense
        weights and for the cores ``cores`` leaves alone. Per-channel
        ``QuantSpec(granularity='channel')`` is per output channel of a
        Linear/Conv2d weight and per row of an Embedding; ``('group', n)``
        with no ``axis`` groups the input (reduction) axis: a Linear's
        ``in``, a conv's input channels, an Embedding row's ``dim``
        (:func:`tnquant.registry.weight_spec`).
    activations
        A spec or a mapping from globs on ``'<layer>.input'``,
        ``'<layer>.output'``, ``'<layer>.inter_<k>'`` to specs (per tensor
        only). They need :func:`tnquant.calibrate` before :func:`convert`.
    cores
        A spec or a mapping from core indices or globs on
        ``'<layer>.cores.<k>'`` to specs. Per-channel means along the
        ``axis`` you give; the rank axes of each layout are: TT cores
        (``TTLinear``, ``TTEmbedding``) ``(r_{k-1}, o_k, i_k, r_k)``: 0 and 3;
        ``LowRankLinear`` ``[U (out, r), V (r, in)]``: 1 and 0;
        ``TuckerLinear`` ``[U_out (out, r_out), G (r_out, r_in), U_in (in,
        r_in)]``: 1, 0/1, 1 (tensorized: every axis of ``G``, axis 1 of each
        ``U_k (n_k, r_k)``); ``TuckerConv2d``
        ``[U_out (O, r_out), G (r_out, r_in, kh, kw), U_in (I, r_in)]``: 1,
        0/1, 1; ``CPConv2d`` ``[A_out, A_in, A_h, A_w]``, each ``(n, R)``: 1.
    include, exclude
        Globs on layer names: only layers matching one of ``include`` (when
        given) and none of ``exclude`` are touched.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        One row per changed layer: ``kind`` (class before), ``weights`` and
        ``activations`` (spec summaries, e.g. ``'cores.0=int4/channel(axis=3),
        cores.1=ternary'``), ``params``, ``bits_before``/``bits_after``
        (:func:`model_size_bits` of the layer), ``note``; ``report.sizes``
        (whole model and quantized layers, before and after:
        :class:`tnquant.report.Sizes`); ``skipped`` lists
        patterns that matched nothing and layers left float with the reason
        (:func:`tnquant.registry.unsupported`: ``LSTM``, ``Conv3d``, dense
        subclasses, ...).

    Notes
    -----
    Tied weights (one ``nn.Parameter`` in several layers, as an LM head tied
    to its embedding): members whose specs are equal share one quantizer,
    so :func:`convert` stores one ``FrozenTensor`` for them, :func:`tnquant.save`
    one copy, and :func:`model_size_bits` counts it once (the first row
    carries the bits; the others say so in ``note``). The axes of a spec are
    axes of the stored tensor, which is ``(vocab, hidden)`` for both a
    ``Linear`` head and an ``Embedding``: per channel (``axis=0``) is per
    output row of the head and per embedding row; ``('group', n)`` (its
    default ``axis=None``, or ``axis=1``) groups the head's input
    (reduction) axis and the embedding's hidden axis alike. Two different
    specs for one tied parameter are refused (``ValueError`` naming both);
    a member left float keeps its float copy (its note says so: both are
    stored).

    Raises
    ------
    TypeError
        For a value that is not a quantizer spec, or a bad mapping key.
    ValueError
        For no argument given, a spec that cannot quantize a tensor (axis
        out of range, group size not dividing it, per-channel activations),
        a shadowed pattern, re-quantizing a converted tensor, or two
        different specs for one tied parameter (nothing is changed then).

    Examples
    --------
    >>> import torch
    >>> from tnquant import QuantSpec, Ternary
    >>> from tnquant.layers import TTLinear
    >>> model = torch.nn.Sequential(TTLinear([torch.randn(1, 4, 4, 3), torch.randn(3, 4, 4, 1)]))
    >>> report = quantize(model, cores={0: QuantSpec(4, granularity="channel", axis=3),
    ...                                 "*.cores.1": Ternary()},
    ...                   activations={"*.inter_*": QuantSpec(16), "*": QuantSpec(8)},
    ...                   progress=False)
    >>> report["0"]["weights"]
    'cores.0=int4/channel(axis=3), cores.1=ternary'
    >>> list(model[0].act_quantizers)
    ['input', 'output', 'inter_0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pats = (
        _table(weights, "weights"),
        _table(cores, "cores", int_keys=True),
        _table(activations, "activations"),
    )
    if not any(p.given for p in pats):
        raise ValueError("quantize() needs at least one of weights=, activations=, cores=")
    report = Report("quantize", columns=_Q_COLUMNS)
    plans = []
    for module, names in _targets(model, include, exclude, report, pats[0]):
        wchanges, achanges = _plan_layer(module, names[0], pats)
        if wchanges or achanges:
            plans.append((module, names, wchanges, achanges))
    for p in pats:
        p.check(report)
    tied, tie_notes = _plan_ties(model, plans)
    model_before = model_size_bits(model) if plans else 0
    shared: dict[int, nn.Module | None] = dict.fromkeys(tied)
    counted = (SizeCounter(), SizeCounter())  # one for all rows: a tied weight counts once
    quantized: set[str] = set()
    for module, names, wchanges, achanges in tqdm(plans, desc="quantize", disable=not progress):
        kind = type(module).__name__
        tie_note = tie_notes.get(id(module))
        before = sum(counted[0].subtree(module))
        notes = []
        if quant_state(module) != "float":
            notes.append("re-quantized")
        entry = cast(LayerKind, lookup(module))
        if entry.role == "dense":
            if not any(s is not None for s in [*wchanges.values(), *achanges.values()]):
                continue
            module = cast(Any, entry.quantized).from_float(module)
            for name in names:
                replace_module(model, name, module)
        _apply(module, wchanges, achanges, shared)
        quantized.update(names if quant_state(module) != "float" else ())
        if len(names) > 1:
            notes.append(f"shared with {', '.join(names[1:])}")
        if tie_note is not None:
            notes.append(tie_note)
        weight_text, act_text = _summaries(module)
        report.add(
            name=names[0],
            kind=kind,
            weights=weight_text,
            activations=act_text,
            params=_params(module),
            bits_before=before,
            bits_after=sum(counted[1].subtree(module)),
            note="; ".join(notes) or None,
        )
    for bn, bn_kind, layer in batchnorms_after(model, quantized):
        warnings.warn(
            f"{bn} ({bn_kind}) follows {layer}, which is being quantized: fold it first with "
            "tnquant.ptq.fold_batchnorm(model) so the quantizer sees the folded weights",
            UserWarning,
            stacklevel=2,
        )
    if plans:
        params = sum(r["params"] for r in report.rows)
        report.sizes = Sizes.from_rows(model_before, report.rows, params=params)
    return report
