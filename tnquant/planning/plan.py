"""``Choice``, ``Plan`` and ``apply``: what the search decided, as plain data.

A :class:`Choice` is what one layer becomes: a factorization spec (or
``None`` to keep it dense) and the quantizer spec of its weight, or of every
core (``weights``), with per-core overrides (``cores``). A :class:`Plan` maps
layer names (as ``named_modules`` gives them) to choices, with the numbers
the search predicted and measured. It round-trips through JSON
(:meth:`Plan.to_json` / :meth:`Plan.from_json`) with the specs written by
:func:`tnquant.specs.spec_to_dict`.

:func:`apply` carries a plan out: :func:`tnquant.factorize` with the
factorization specs, then :func:`tnquant.quantize` with ``weights=`` and
``cores=`` keyed by the exact layer names. Nothing else: doing those two
calls by hand gives the same model.

Examples
--------
>>> from torch import nn
>>> from tnquant import LowRank, QuantSpec
>>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
>>> plan = Plan({"0": Choice(LowRank(ratio=0.25), QuantSpec(bits=4)),
...              "2": Choice(None, QuantSpec(bits=8))})
>>> Plan.from_json(plan.to_json()) == plan
True
>>> report = apply(model, plan, progress=False)
>>> type(model[0]).__name__, type(model[2]).__name__
('LowRankLinear', 'QuantLinear')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from tnquant.factorization import factorize
from tnquant.quant.frozen import spec_summary
from tnquant.quantization import quantize
from tnquant.report import Report, Sizes
from tnquant.sizes import SizeCounter, model_size_bits
from tnquant.specs import (
    CP,
    TT,
    Binary,
    FixedPoint,
    LowRank,
    QuantSpec,
    Ternary,
    Tucker,
    spec_from_dict,
    spec_to_dict,
)

__all__ = ["Choice", "Plan", "apply"]

_FACT = (TT, Tucker, CP, LowRank)
_QUANT = (QuantSpec, Binary, Ternary, FixedPoint)
_NUMBERS = (
    "original_size_bits",
    "budget_bits",
    "target",
    "predicted_size_bits",
    "predicted_error",
    "measured_size_bits",
    "measured_error",
    "measured_output_error",
)
_APPLY_COLUMNS = ("name", "kind", "format", "ranks", "weights", "bits_before", "bits_after")


def _opt_spec(spec: Any) -> dict[str, Any] | None:
    return None if spec is None else spec_to_dict(spec)


def _opt_from(data: Any) -> Any:
    return None if data is None else spec_from_dict(data)


@dataclass(frozen=True)
class Choice:
    """What one layer becomes: a factorization and per-core quantizer specs.

    Parameters
    ----------
    factorization
        ``TT``, ``Tucker``, ``CP`` or ``LowRank`` spec, or ``None`` (keep the
        layer dense).
    weights
        Quantizer spec (``QuantSpec``, ``Binary``, ``Ternary``,
        ``FixedPoint``) of the dense weight, or of every core that ``cores``
        does not name; ``None`` keeps them float.
    cores
        Per-core overrides ``{core index: spec or None}`` (a mapping or
        ``(index, spec)`` pairs); factorized layers only. Stored as sorted
        pairs so a choice hashes.

    Examples
    --------
    >>> from tnquant import TT, QuantSpec, Ternary
    >>> c = Choice(TT(ratio=0.2), QuantSpec(bits=4), cores={0: Ternary()})
    >>> c.cores[0][0], c.label()
    (0, 'TT(ratio=0.2)/int4/tensor, cores.0=ternary')
    """

    factorization: Any = None
    weights: Any = None
    cores: Any = ()

    def __post_init__(self) -> None:
        if self.factorization is not None and not isinstance(self.factorization, _FACT):
            raise TypeError(
                f"factorization must be a TT, Tucker, CP or LowRank spec or None, "
                f"got {type(self.factorization).__name__}"
            )
        if self.weights is not None and not isinstance(self.weights, _QUANT):
            raise TypeError(
                f"weights must be a QuantSpec, Binary, Ternary or FixedPoint spec "
                f"or None, got {type(self.weights).__name__}"
            )
        items = self.cores.items() if isinstance(self.cores, Mapping) else self.cores
        try:
            pairs = [(k, s) for k, s in items]
        except (TypeError, ValueError):
            raise TypeError(
                f"cores must be a mapping or (index, spec) pairs, got {self.cores!r}"
            ) from None
        for k, s in pairs:
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"cores keys must be int core indices, got {k!r}")
            if s is not None and not isinstance(s, _QUANT):
                raise TypeError(
                    f"cores[{k}] must be a quantizer spec or None, got {type(s).__name__}"
                )
        if pairs and self.factorization is None:
            raise ValueError(
                "cores= applies to factorized layers only; this choice has "
                "factorization=None (use weights= for a dense weight)"
            )
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError(f"cores has a repeated index: {[k for k, _ in pairs]}")
        object.__setattr__(self, "cores", tuple(sorted(pairs, key=lambda p: p[0])))

    @property
    def quantized(self) -> bool:
        """Whether any weight or core gets a quantizer."""
        return self.weights is not None or any(s is not None for _, s in self.cores)

    def label(self) -> str:
        """A short description: ``'LowRank(ratio=0.25)/int4/channel'``, ``'dense/float'``."""
        fact = self.factorization
        if fact is None:
            head = "dense"
        else:
            which = next(n for n in ("rank", "ratio", "tol") if getattr(fact, n) is not None)
            head = f"{type(fact).__name__}({which}={getattr(fact, which)})"
        text = f"{head}/{spec_summary(self.weights)}"
        if self.cores:
            text += ", " + ", ".join(f"cores.{k}={spec_summary(s)}" for k, s in self.cores)
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (specs through :func:`~tnquant.specs.spec_to_dict`)."""
        return {
            "factorization": _opt_spec(self.factorization),
            "weights": _opt_spec(self.weights),
            "cores": [[k, _opt_spec(s)] for k, s in self.cores],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Choice:
        """Inverse of :meth:`to_dict`."""
        unknown = set(data) - {"factorization", "weights", "cores"}
        if unknown:
            raise ValueError(f"unknown Choice field(s) {sorted(unknown)}")
        return cls(
            _opt_from(data.get("factorization")),
            _opt_from(data.get("weights")),
            [(int(k), _opt_from(s)) for k, s in data.get("cores", ())],
        )


@dataclass
class Plan(Mapping):
    """A mapping layer name -> :class:`Choice`, with predicted and measured numbers.

    Parameters
    ----------
    choices
        ``{layer name: Choice}``; layers not named are left as they are.
    layers
        Per-layer numbers from the search (JSON-safe): ``size_bits``,
        ``error`` (its predicted sensitivity), ``ranks``, ``label``.
    metric
        What the errors measure: ``'layer'`` (summed relative MSE of each
        layer's output), ``'output'`` (relative MSE of the model's output) or
        the name of a user metric.
    budget_bits, target
        The constraint the plan was searched under.
    predicted_size_bits, predicted_error
        Total model size (as :func:`tnquant.model_size_bits` counts it) and
        summed sensitivity of the chosen candidates.
    measured_size_bits, measured_error, measured_output_error
        After applying the plan to a copy of the model: its size, the error
        in ``metric``'s terms, and the relative MSE of the model output.
    original_size_bits
        :func:`tnquant.model_size_bits` of the model the plan was searched
        on (the whole model before; see :meth:`sizes`).

    Examples
    --------
    >>> from tnquant import QuantSpec
    >>> plan = Plan({"fc": Choice(None, QuantSpec(bits=8))}, predicted_size_bits=1000)
    >>> list(plan), plan["fc"].weights.bits, len(plan)
    (['fc'], 8, 1)
    """

    choices: dict[str, Choice]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "layer"
    budget_bits: int | None = None
    target: float | None = None
    predicted_size_bits: int | None = None
    predicted_error: float | None = None
    measured_size_bits: int | None = None
    measured_error: float | None = None
    measured_output_error: float | None = None
    original_size_bits: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.choices, Mapping):
            raise TypeError(
                f"choices must be a mapping of layer names to Choice, got "
                f"{type(self.choices).__name__}"
            )
        for name, choice in self.choices.items():
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {name!r}")
            if not isinstance(choice, Choice):
                raise TypeError(f"choices[{name!r}] must be a Choice, got {type(choice).__name__}")
        self.choices = dict(self.choices)

    def __getitem__(self, name: str) -> Choice:
        return self.choices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: choices, per-layer numbers, totals."""
        out: dict[str, Any] = {
            "choices": {n: c.to_dict() for n, c in self.choices.items()},
            "layers": json.loads(json.dumps(self.layers, default=_json_default)),
            "metric": self.metric,
        }
        out.update({k: getattr(self, k) for k in _NUMBERS})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`."""
        if "choices" not in data:
            raise ValueError("a plan dict needs 'choices'")
        unknown = set(data) - {"choices", "layers", "metric", *_NUMBERS}
        if unknown:
            raise ValueError(f"unknown Plan field(s) {sorted(unknown)}")
        choices = {n: Choice.from_dict(c) for n, c in data["choices"].items()}
        return cls(
            choices,
            layers=dict(data.get("layers", {})),
            metric=data.get("metric", "layer"),
            **{k: data.get(k) for k in _NUMBERS},
        )

    def to_json(self, **kwargs: Any) -> str:
        """The plan as JSON text (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """One line per layer (choice, predicted size and error) and the totals."""
        report = Report("plan", columns=("name", "choice", "ranks", "size_bits", "error"))
        for name, choice in self.choices.items():
            info = self.layers.get(name, {})
            label = choice.label()
            if info.get("tied_to"):
                label = f"{label} (tied to {info['tied_to']!r})"
            report.add(
                name=name,
                choice=label,
                ranks=info.get("ranks"),
                size_bits=info.get("size_bits"),
                error=info.get("error"),
            )
        lines = [report.table()]
        for label, size, err in (
            ("predicted", self.predicted_size_bits, self.predicted_error),
            ("measured", self.measured_size_bits, self.measured_error),
        ):
            if size is not None or err is not None:
                lines.append(f"{label}: size {size} bits, error ({self.metric}) {err}")
        sizes = self.sizes()
        if sizes is not None:
            lines.append(f"predicted: {sizes.line()}")
        return "\n".join(lines)

    def sizes(self) -> Sizes | None:
        """The predicted whole-model and compressed-layer sizes (``None`` if not known).

        The whole model goes from ``original_size_bits`` to
        ``predicted_size_bits``; the compressed layers are those whose
        choice factorizes or quantizes them (a tied follower is counted
        with its leader), from their searched ``dense_bits`` to their
        ``size_bits``.

        Examples
        --------
        >>> from tnquant import QuantSpec
        >>> plan = Plan({"fc": Choice(None, QuantSpec(bits=8))},
        ...             {"fc": {"size_bits": 576, "dense_bits": 2176, "params": 68}},
        ...             predicted_size_bits=600, original_size_bits=2200)
        >>> print(*plan.sizes().line().split("; "), sep="\\n")
        whole model 2.2 kbit -> 600 bit (3.67x)
        compressed layers 68 params 2.2 kbit -> 576 bit (3.78x)
        """
        if self.original_size_bits is None or self.predicted_size_bits is None:
            return None
        changed = [
            self.layers.get(n, {})
            for n, c in self.choices.items()
            if c.factorization is not None or c.quantized
        ]
        changed = [info for info in changed if "size_bits" in info and "dense_bits" in info]
        params = [info.get("params") for info in changed]
        return Sizes(
            self.original_size_bits,
            self.predicted_size_bits,
            None if None in params else sum(cast(list[int], params)),
            sum(int(info["dense_bits"]) for info in changed),
            sum(int(info["size_bits"]) for info in changed),
        )

    def __str__(self) -> str:
        return self.table()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def plan_arguments(plan: Plan) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The ``factorize`` mapping and the ``quantize`` ``weights``/``cores`` mappings of a plan.

    Keys are the exact layer names (``'<layer>.cores.<k>'`` for cores).

    Examples
    --------
    >>> from tnquant import LowRank, QuantSpec
    >>> plan = Plan({"fc": Choice(LowRank(rank=2), QuantSpec(bits=4), {1: QuantSpec(bits=8)})})
    >>> fact, weights, cores = plan_arguments(plan)
    >>> list(fact), list(weights), list(cores)
    (['fc'], ['fc'], ['fc.cores.1'])
    """
    fact = {n: c.factorization for n, c in plan.items() if c.factorization is not None}
    weights = {n: c.weights for n, c in plan.items() if c.weights is not None}
    cores = {f"{n}.cores.{k}": s for n, c in plan.items() for k, s in c.cores if s is not None}
    return fact, weights, cores


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    data: Any = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> Report:
    """Carry out ``plan`` on ``model`` in place: ``factorize``, then ``quantize``.

    Exactly ``factorize(model, {name: spec}, data=data)`` followed by
    ``quantize(model, weights={name: spec}, cores={'name.cores.k': spec})``
    over the plan's layers. The search measured the plain decompositions;
    with ``data`` the planned factorized Linear layers are fitted to their
    inputs instead (same ranks and size, lower output error).

    Parameters
    ----------
    model
        The dense model the plan was searched on (or one of the same
        architecture).
    plan
        A :class:`Plan` (from :func:`~tnquant.planning.search` or
        :meth:`Plan.from_json`).
    data
        Calibration batches (see :mod:`tnquant.batches`) for a data-aware fit
        of the factorized Linear layers, as :func:`tnquant.factorize` does
        it. ``None`` (default): the plain decompositions the search measured.
    num_batches
        Use at most this many batches of ``data``.
    progress
        Show progress bars.

    Returns
    -------
    Report
        One row per planned layer: kind, format, ranks, weight specs, and its
        stored bits before and after (as :func:`tnquant.model_size_bits`
        counts them; a tied follower's shared tensor counts in its leader's
        row); ``report.sizes``: the whole model and the planned layers
        before and after (:class:`tnquant.report.Sizes`).

    Examples
    --------
    >>> from torch import nn
    >>> from tnquant import QuantSpec, model_size_bits
    >>> model = nn.Sequential(nn.Linear(16, 8))
    >>> report = apply(model, Plan({"0": Choice(None, QuantSpec(bits=4))}), progress=False)
    >>> report["0"]["bits_after"] == model_size_bits(model)  # 64 bytes of codes, scale, bias
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, got {type(plan).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    missing = [n for n in plan if n not in modules]
    if missing:
        raise ValueError(f"the plan names layers the model does not have: {missing}")
    model_before = model_size_bits(model)
    counted = (SizeCounter(), SizeCounter())  # one per side for all rows: a tie counts once
    before = {n: (type(modules[n]).__name__, sum(counted[0].subtree(modules[n]))) for n in plan}
    changed = [n for n, c in plan.items() if c.factorization is not None or c.quantized]
    held = {id(p): p for n in changed for p in modules[n].parameters()}
    params = sum(p.numel() for p in held.values())
    fact, weights, cores = plan_arguments(plan)
    if fact:
        factorize(model, fact, data=data, num_batches=num_batches, progress=progress)
    if weights or cores:
        quantize(model, weights=weights or None, cores=cores or None, progress=progress)
    report = Report("apply", columns=_APPLY_COLUMNS)
    for name, choice in plan.items():
        module = model.get_submodule(name)
        fmt = getattr(module, "format", None) or "dense"
        ranks = tuple(getattr(module, "ranks", ()))
        report.add(
            name=name,
            kind=before[name][0],
            format=fmt,
            ranks=ranks,
            weights=choice.label().split("/", 1)[1],
            bits_before=before[name][1],
            bits_after=sum(counted[1].subtree(module)),
        )
    rows = [r for r in report.rows if r["name"] in changed]  # a float choice is no change
    report.sizes = Sizes.from_rows(model_before, rows, params=params)
    return report
