"""``factorize``: replace the layers of a model by factorized ones.

One table, written out, says which factorized layer serves which pair of
(dense module type, spec type); everything else is skipped with the reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tnquant.batches import call_model, check_data, iterate_batches
from tnquant.checks import check_model
from tnquant.layers import (
    CPConv2d,
    LowRankLinear,
    TTEmbedding,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.names import selected
from tnquant.report import Report
from tnquant.specs import CP, TT, LowRank, Tucker

__all__ = ["factorize", "LAYER_TABLE", "find_targets", "collect_grams"]

#: (dense module type, spec type) -> factorized layer class.
LAYER_TABLE: dict[tuple[type, type], Any] = {
    (nn.Linear, TT): TTLinear,
    (nn.Linear, Tucker): TuckerLinear,
    (nn.Linear, LowRank): LowRankLinear,
    (nn.Conv2d, Tucker): TuckerConv2d,
    (nn.Conv2d, CP): CPConv2d,
    (nn.Embedding, TT): TTEmbedding,
}

_SPEC_TYPES = (TT, Tucker, CP, LowRank)
_DENSE_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)

_COLUMNS = (
    "name",
    "kind",
    "format",
    "ranks",
    "params_before",
    "params_after",
    "ratio",
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


def _check_specs(spec_or_mapping: Any) -> None:
    if isinstance(spec_or_mapping, Mapping):
        for pattern, spec in spec_or_mapping.items():
            if not isinstance(pattern, str):
                raise TypeError(f"mapping keys must be glob strings, got {pattern!r}")
            _check_spec(spec, f"pattern {pattern!r}")
    else:
        if spec_or_mapping is None:
            raise TypeError("expected a spec or a mapping of glob patterns to specs, got None")
        _check_spec(spec_or_mapping, "factorize")


def _spec_for(
    name: str, spec_or_mapping: Any, include: Iterable[str] | None, exclude: Iterable[str] | None
) -> Any:
    if not selected(name, include, exclude):
        return None
    if not isinstance(spec_or_mapping, Mapping):
        return spec_or_mapping
    for pattern, spec in spec_or_mapping.items():
        if fnmatch.fnmatchcase(name, pattern):
            return spec
    return None


def find_targets(
    model: nn.Module,
    spec_or_mapping: Any,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> tuple[dict[int, tuple[nn.Module, Any, list[str]]], list[tuple[str, str, str]]]:
    """Which modules ``factorize`` would replace, and which it would skip.

    Returns ``({id(module): (module, spec, [names...])}, [(name, kind, reason)])``.
    A module reachable under several names (shared) appears once with all of
    its names; the spec is the one its first name matches.
    """
    targets: dict[int, tuple[nn.Module, Any, list[str]]] = {}
    skipped: list[tuple[str, str, str]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        if id(module) in targets:
            targets[id(module)][2].append(name)
            continue
        spec = _spec_for(name, spec_or_mapping, include, exclude)
        if spec is None:
            continue
        if not isinstance(module, _DENSE_TYPES):
            if isinstance(spec_or_mapping, Mapping) and not any(
                isinstance(c, _DENSE_TYPES) for c in module.modules()
            ):
                skipped.append((name, type(module).__name__, "not a Linear, Conv2d or Embedding"))
            continue
        key = (type(module), type(spec))
        if key not in LAYER_TABLE:
            supported = sorted({s.__name__ for (m, s) in LAYER_TABLE if isinstance(module, m)})
            skipped.append(
                (
                    name,
                    type(module).__name__,
                    f"{type(spec).__name__} is not supported on {type(module).__name__} "
                    f"(supported: {', '.join(supported)})",
                )
            )
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            skipped.append((name, "Conv2d", f"groups={module.groups} is not supported"))
            continue
        targets[id(module)] = (module, spec, [name])
    return targets, skipped


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
    finite, at least one; ``what`` and ``arg`` name the caller in the messages).
    A module the data never reaches has no entry.

    Examples
    --------
    >>> import torch
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> grams = collect_grams(model, [model[0]], [torch.ones(3, 2)], None, False)
    >>> grams[id(model[0])].tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    grams: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        g = x.T @ x
        key = id(module)
        grams[key] = g if key not in grams else grams[key] + g

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = iterate_batches(data, num_batches, what=what, arg=arg)
            for batch in tqdm(
                batches, desc="collect input statistics", disable=not progress, leave=False
            ):
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


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
        Per layer: kind, format, ranks, params before/after, ratio, relative
        weight error (and output error on the data when data-aware), notes
        (e.g. capped ranks); skipped modules with the reason; totals.

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
    _check_specs(spec_or_mapping)
    if data_aware is not None and not isinstance(data_aware, bool):
        raise TypeError(f"data_aware must be True, False or None, got {data_aware!r}")
    if data_aware and data is None:
        raise ValueError("data_aware=True needs calibration data: pass data=")
    use_data = data is not None and data_aware is not False
    if use_data:
        check_data(data, "factorize")

    targets, skipped = find_targets(model, spec_or_mapping, include, exclude)
    if targets or use_data:
        check_model(model, "factorize", finite=use_data)
    report = Report("factorize", columns=_COLUMNS)
    for name, kind, reason in skipped:
        report.skip(name, kind, reason)

    grams: dict[int, torch.Tensor] = {}
    unreached: set[int] = set()
    if use_data:
        linears = [m for m, _, _ in targets.values() if isinstance(m, nn.Linear)]
        grams = collect_grams(model, linears, data, num_batches, progress)
        unreached = {id(m) for m in linears if id(m) not in grams}

    items = list(targets.values())
    for module, spec, names in tqdm(items, desc="factorize", disable=not progress):
        layer_cls = LAYER_TABLE[(type(module), type(spec))]
        kwargs = {}
        if isinstance(module, nn.Linear) and id(module) in grams:
            kwargs["gram"] = grams[id(module)]
        new = layer_cls.from_dense(module, spec, name=names[0], **kwargs)
        for name in names:
            _replace(model, name, new)
        info = new.decomposition_info
        before = sum(p.numel() for p in module.parameters())
        after = new.n_params
        note = info.get("capped")
        if id(module) in unreached:
            fit = "not reached by the data: fitted to the weight alone"
            note = f"{note}; {fit}" if note else fit
        if len(names) > 1:
            shared = f"shared with {', '.join(names[1:])}"
            note = f"{note}; {shared}" if note else shared
        report.add(
            name=names[0],
            kind=type(module).__name__,
            format=type(spec).__name__,
            ranks=tuple(info.get("ranks", ())),
            params_before=before,
            params_after=after,
            ratio=after / before,
            rel_error=info.get("rel_error"),
            out_rel_error=info.get("out_rel_error"),
            note=note,
        )
    return report
