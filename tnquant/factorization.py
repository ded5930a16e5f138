"""``factorize``: replace the layers of a model by factorized ones.

The layer registry (:mod:`tnquant.registry`) says which factorized class
serves which pair of (dense module type, spec type) and what a kind refuses;
everything else is skipped with the reason. Patterns go through the one glob
table (:class:`tnquant.core.globs.GlobTable`): the first match wins, a
shadowed pattern is refused and one that matched nothing is listed in
``report.skipped``, as in ``quantize``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from tnquant.batches import check_data
from tnquant.checks import check_model
from tnquant.core.capture import capture_grams
from tnquant.core.globs import GlobTable, selected
from tnquant.core.modules import replace_module
from tnquant.core.ties import tied_names, untie_hint
from tnquant.registry import FactorizeTable, kinds, lookup, refusal, unsupported
from tnquant.report import Report, Sizes
from tnquant.sizes import SizeCounter, model_size_bits
from tnquant.specs import CP, TT, LowRank, Tucker

__all__ = ["factorize", "LAYER_TABLE", "find_targets", "collect_grams"]

#: (dense module type, spec type) -> factorized layer class: a live view of the registry.
LAYER_TABLE: Mapping[tuple[type, type], Any] = FactorizeTable()

_SPEC_TYPES = (TT, Tucker, CP, LowRank)

_COLUMNS = (
    "name",
    "kind",
    "format",
    "ranks",
    "params_before",
    "params_after",
    "ratio",
    "bits_before",
    "bits_after",
    "rel_error",
    "out_rel_error",
    "note",
)


def _check_spec(spec: Any, where: str) -> None:
    if spec is not None and not isinstance(spec, _SPEC_TYPES):
        raise TypeError(
            f"{where}: expected a TT, Tucker, CP or LowRank spec (or None to leave a layer "
            f"dense), got {type(spec).__name__}"
        )


def _table(spec_or_mapping: Any) -> GlobTable:
    """The glob table of ``spec_or_mapping`` (one spec is ``{'*': spec}``), its values checked."""
    if isinstance(spec_or_mapping, Mapping):
        for pattern, spec in spec_or_mapping.items():
            if not isinstance(pattern, str):
                raise TypeError(f"mapping keys must be glob strings, got {pattern!r}")
            _check_spec(spec, f"pattern {pattern!r}")
        return GlobTable(spec_or_mapping, "factorize")
    if spec_or_mapping is None:
        raise TypeError("expected a spec or a mapping of glob patterns to specs, got None")
    _check_spec(spec_or_mapping, "factorize")
    return GlobTable({"*": spec_or_mapping}, "factorize")


def _dense_kind(module: nn.Module) -> bool:
    """Whether ``module`` is a dense kind that some spec factorizes."""
    kind = lookup(module)
    return kind is not None and kind.role == "dense" and bool(kind.factorize)


def _fits_data(module: nn.Module) -> bool:
    """Whether ``module``'s weight kind takes a Gram matrix (a data-aware fit)."""
    kind = lookup(module)
    return kind is not None and kind.weight_kind == "linear"


def _skip_reason(module: nn.Module, spec: Any) -> str | None:
    """Why the registry cannot factorize ``module`` under ``spec`` (``None``: it can)."""
    kind = lookup(module)
    if kind is None:
        return None
    if type(spec) not in kind.factorize:
        supported = sorted(s.__name__ for s in kind.factorize)
        return (
            f"{type(spec).__name__} is not supported on {type(module).__name__} "
            f"(supported: {', '.join(supported)})"
        )
    return refusal(module)


def _not_dense_reason(module: nn.Module) -> str | None:
    """Why a module that is no dense kind is skipped (``None``: nothing to say, e.g. a ReLU)."""
    kind = lookup(module)
    if kind is not None and kind.role in ("quantized", "factorized"):
        dense = getattr(kind.dense, "__name__", "dense")
        if kind.role == "factorized":
            return f"already factorized ({type(module).__name__}, from a {dense})"
        return (
            f"already quantized ({type(module).__name__} stands for a {dense}): "
            f"factorize first, then quantize (factorize the float model, then call quantize)"
        )
    return unsupported(module)


def _tie_reason(name: str, others: list[str]) -> str:
    listed = ", ".join(repr(n) for n in others)
    return (
        f"its weight is tied to {listed} (one Parameter): factorizing {name!r} alone would "
        f"untie them and keep the dense copy; exclude it (exclude=[{name!r}]), or untie "
        f"first: {untie_hint(name)}"
    )


def _under(name: str, tops: list[str]) -> bool:
    return any(t == "" or name.startswith(t + ".") for t in tops)


def find_targets(
    model: nn.Module,
    spec_or_mapping: Any,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    table: GlobTable | None = None,
) -> tuple[dict[int, tuple[nn.Module, Any, list[str]]], list[tuple[str, str, str]]]:
    """Which modules ``factorize`` would replace, and which it would skip (and why).

    Returns ``({id(module): (module, spec, [names...])}, [(name, kind, reason)])``.
    A module reachable under several names (shared) appears once with all of
    its names; the spec is the one its first name matches. Skipped: a layer
    the spec cannot apply to (its format, a refusal, a tied weight), an
    already quantized or factorized layer, a module holding a weight that
    tnquant has no entry for (:func:`tnquant.registry.unsupported`), and a
    pattern that reached no layer it could factorize (kind ``'pattern'``;
    one that matched nothing is added by :meth:`GlobTable.check`). ``table``
    (built from ``spec_or_mapping`` when not given) records the matches.
    """
    table = _table(spec_or_mapping) if table is None else table
    targets: dict[int, tuple[nn.Module, Any, list[str]]] = {}
    skipped: list[tuple[str, str, str]] = []
    ties = tied_names(model)
    won: dict[int, list[str]] = {}  # entry -> names it won
    used: set[int] = set()  # entries that led to a target or a layer's row
    reasons: dict[int, str] = {}
    done: list[str] = []  # layers handled or reported: their children are parts
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in targets:
            targets[id(module)][2].append(name)
            continue
        if id(module) in seen or _under(name, done) or not selected(name, include, exclude):
            continue
        entry = table.winner(name)
        spec = None if entry is None else table.entries[entry][1]  # type: ignore[index]
        if spec is None:
            continue
        won.setdefault(cast(int, entry), []).append(name)
        if not name:
            if _dense_kind(module):
                why = "the model itself cannot be replaced; wrap it, e.g. in nn.Sequential"
                skipped.append((name, type(module).__name__, why))
                used.add(cast(int, entry))
            continue
        reason = _skip_reason(module, spec) if _dense_kind(module) else _not_dense_reason(module)
        if reason is None and name in ties:
            reason = _tie_reason(name, ties[name])
        if reason is not None:
            skipped.append((name, type(module).__name__, reason))
            reasons.setdefault(cast(int, entry), repr(name))
            done.append(name)
            seen.add(id(module))
        elif _dense_kind(module):
            targets[id(module)] = (module, spec, [name])
            done.append(name)
        else:
            continue
        used.add(cast(int, entry))
    for entry, names in won.items():
        if entry not in used or entry in reasons and not _won_targets(names, targets):
            skipped.append(_pattern_row(table, entry, names, reasons.get(entry)))
    return targets, skipped


def _won_targets(names: list[str], targets: dict[int, tuple[nn.Module, Any, list[str]]]) -> bool:
    wanted = set(names)
    return any(wanted.intersection(t[2]) for t in targets.values())


def _pattern_row(
    table: GlobTable, entry: int, names: list[str], reason: str | None
) -> tuple[str, str, str]:
    """The row of a pattern that matched names but no layer it could factorize."""
    key, spec = table.entries[entry]  # type: ignore[index]
    where = f"{table.what}[{key!r}]"
    if reason is not None:
        why = (
            f"{type(spec).__name__} applies to none of the layers it matched (every one is "
            f"skipped, e.g. {reason}: see its row)"
        )
        return (where, "pattern", why)
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    if isinstance(key, str) and not key.endswith("*") and names[0] == key:
        hint = f"; a pattern names layers: {key + '.*'!r} names the layers inside"
    else:
        dense = sorted(k.cls.__name__ for k in kinds() if k.role == "dense" and k.factorize)
        hint = f"; factorize replaces {', '.join(dense)} layers"
    return (where, "pattern", f"matched only modules with nothing to factorize ({shown}){hint}")


def collect_grams(
    model: nn.Module,
    modules: Sequence[nn.Module],
    data: Any,
    num_batches: int | None,
    progress: bool,
    *,
    what: str = "factorize",
    arg: str = "data",
) -> dict[int, torch.Tensor]:
    """``X^T X`` (float64) of the inputs each Linear in ``modules`` sees on ``data``.

    Each batch is checked as it is read (:func:`tnquant.batches.iterate_batches`:
    finite, at least one; ``what`` and ``arg`` name the caller in the messages);
    the pass is :func:`tnquant.core.capture.capture_grams`. A module the data
    never reaches has no entry.

    Examples
    --------
    >>> import torch
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> grams = collect_grams(model, [model[0]], [torch.ones(3, 2)], None, False)
    >>> grams[id(model[0])].tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    named = {str(k): m for k, m in enumerate(modules)}
    grams = capture_grams(model, named, data, num_batches, progress=progress, what=what, arg=arg)
    return {id(named[name]): g.h for name, g in grams.items() if g.h is not None}


def factorize(
    model: nn.Module,
    spec_or_mapping: Any,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    data: Any = None,
    data_aware: bool | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> Report:
    """Replace matching layers of ``model`` (in place) by factorized ones.

    Parameters
    ----------
    model
        Any ``nn.Module``; Linear, Conv2d and Embedding layers inside it (at
        any depth, in ``ModuleList``/``Sequential`` too) can be replaced. A
        module shared under several names is factorized once and stays shared.
    spec_or_mapping
        One spec (``TT``, ``Tucker``, ``CP``, ``LowRank``) for every supported
        layer, or a mapping from glob patterns on module names (as
        ``named_modules`` gives them, e.g. ``'encoder.layer.*.intermediate.dense'``)
        to a spec or ``None`` (leave dense). The first matching pattern wins.
    include, exclude
        Glob patterns: only names matching one of ``include`` (when given) and
        none of ``exclude`` are considered.
    data
        Calibration batches (see :mod:`tnquant.batches`). When given, Linear
        layers are fitted to the data (output error ``||X W^T - X What^T||``)
        instead of the weight error. Read once; checked up front (not
        empty) and batch by batch (finite). A Linear the data never reaches
        is fitted to its weight alone and says so in its ``note``.
    data_aware
        Use ``data`` for a data-aware fit; defaults to ``True`` whenever data
        is given.
    num_batches
        Use at most this many batches of ``data``.
    progress
        Show a progress bar over layers.

    Returns
    -------
    Report
        Per layer: kind, format, ranks, params before/after, ratio, stored
        bits before/after, relative weight error (and output error on the
        data when data-aware), notes (e.g. capped ranks); totals, and
        ``report.sizes`` (whole model and factorized layers, before and
        after: :class:`tnquant.report.Sizes`). ``report.skipped`` says why each layer a
        pattern reached was left alone: a format the layer does not take
        (``'CP is not supported on Linear (supported: LowRank, TT, Tucker)'``),
        a refusal (grouped convs), a tied weight (below), a layer already
        quantized (factorize first, then quantize) or factorized, a module
        tnquant has no entry for (:func:`tnquant.registry.unsupported`:
        ``Conv3d``, ``LSTM``, ``MultiheadAttention``, ...); and, as rows of
        kind ``'pattern'``, a pattern that matched nothing or reached no
        layer it could factorize (``tnquant compress`` exits 2 on those).

    Notes
    -----
    Tied weights: a layer whose weight is the same ``nn.Parameter`` as
    another layer's (an LM head tied to its input embedding) is not
    factorized: replacing it alone would untie the two and keep the dense
    copy for the other, so the model would grow. Its row names the tied
    layers and what to do: exclude it, or untie it first
    (``model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())``).
    A module reachable under several names (one object) is no tie: it is
    factorized once and stays shared.

    Raises
    ------
    TypeError
        For a model that is not an ``nn.Module``, a value that is not a
        spec, a mapping key that is not a string, or ``data`` that is not
        iterable.
    ValueError
        For ``data_aware=True`` without data, empty data, a batch holding
        NaN or inf, a model on the meta device (it has no weights to
        decompose: ``model.to_empty(device=...)`` and load them first), and
        for a layer the spec cannot decompose (non-finite weights, ranks or
        shapes that do not fit).

    Examples
    --------
    >>> import torch
    >>> from tnquant import LowRank, factorize
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> report = factorize(model, {"0": LowRank(rank=4)}, progress=False)
    >>> type(model[0]).__name__
    'LowRankLinear'
    >>> report["0"]["params_after"] < report["0"]["params_before"]
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    table = _table(spec_or_mapping)
    if data_aware is not None and not isinstance(data_aware, bool):
        raise TypeError(f"data_aware must be True, False or None, got {data_aware!r}")
    if data_aware and data is None:
        raise ValueError("data_aware=True needs calibration data: pass data=")
    use_data = data is not None and data_aware is not False
    if use_data:
        check_data(data, "factorize")

    targets, skipped = find_targets(model, spec_or_mapping, include, exclude, table=table)
    report = Report("factorize", columns=_COLUMNS)
    for name, kind, reason in skipped:
        report.skip(name, kind, reason)
    table.check(report)
    if targets or use_data:
        check_model(model, "factorize", finite=use_data)

    grams: dict[int, torch.Tensor] = {}
    unreached: set[int] = set()
    if use_data:
        linears = [m for m, _, _ in targets.values() if _fits_data(m)]
        grams = collect_grams(model, linears, data, num_batches, progress)
        unreached = {id(m) for m in linears if id(m) not in grams}

    model_before = model_size_bits(model)
    for module, spec, names in tqdm(list(targets.values()), desc="factorize", disable=not progress):
        report.add(
            **_factorize_one(
                model, module, spec, names, grams.get(id(module)), id(module) in unreached
            )
        )
    params = sum(r["params_before"] for r in report.rows)
    report.sizes = Sizes.from_rows(model_before, report.rows, params=params)
    return report


def _factorize_one(
    model: nn.Module,
    module: nn.Module,
    spec: Any,
    names: list[str],
    gram: torch.Tensor | None,
    unreached: bool,
) -> dict[str, Any]:
    """Replace ``module`` (at every one of ``names``) by its factorized layer; its report row."""
    layer_cls: Any = LAYER_TABLE[(type(module), type(spec))]
    kwargs = {} if gram is None else {"gram": gram}
    new = layer_cls.from_dense(module, spec, name=names[0], **kwargs)
    for name in names:
        replace_module(model, name, new)
    info = new.decomposition_info
    before = sum(p.numel() for p in module.parameters())
    after = new.n_params
    note = info.get("capped")
    if unreached:
        fit = "not reached by the data: fitted to the weight alone"
        note = f"{note}; {fit}" if note else fit
    if len(names) > 1:
        shared = f"shared with {', '.join(names[1:])}"
        note = f"{note}; {shared}" if note else shared
    return {
        "name": names[0],
        "kind": type(module).__name__,
        "format": type(spec).__name__,
        "ranks": tuple(info.get("ranks", ())),
        "params_before": before,
        "params_after": after,
        "ratio": after / before,
        "bits_before": sum(SizeCounter().subtree(module)),
        "bits_after": sum(SizeCounter().subtree(new)),
        "rel_error": info.get("rel_error"),
        "out_rel_error": info.get("out_rel_error"),
        "note": note,
    }
