"""What a stage did, per layer: a small table that prints and serialises.

Every model-changing verb (``factorize``, ``quantize``, ``calibrate``, ...)
returns a :class:`Report`. Rows are plain dicts; the report knows which
columns to sum for the totals and how to print itself.

Examples
--------
>>> r = Report("factorize", columns=("name", "format", "params_before", "params_after"))
>>> r.add(name="fc", format="tt", params_before=100, params_after=10)
>>> r.totals()["params_after"]
10
>>> print(r)  # doctest: +NORMALIZE_WHITESPACE
factorize
name  format  params_before  params_after
fc    tt      100            10
total         100            10
compression 10.00x (params)

A stage that changes a model also gives the whole model's size and the
compressed layers' in :attr:`Report.sizes` (a :class:`Sizes`): both ratios
are in ``totals()`` and on the last line of the table.

>>> r.sizes = Sizes(model_before=4000, model_after=1120, params=100, layers_before=3200,
...                 layers_after=320)
>>> print(*r.table().splitlines()[-1].split("; "), sep="\\n")
whole model 4.0 kbit -> 1.1 kbit (3.57x)
compressed layers 100 params 3.2 kbit -> 320 bit (10.00x)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Report", "Sizes", "format_bits", "format_count"]

_SUMMED = ("params_before", "params_after", "bits_before", "bits_after", "size_bits")


def format_bits(bits: float) -> str:
    """A size in bits with a decimal unit: ``'320 bit'``, ``'4.0 kbit'``, ``'726.8 Mbit'``.

    Examples
    --------
    >>> format_bits(726_800_000), format_bits(999), format_bits(2.5e9)
    ('726.8 Mbit', '999 bit', '2.50 Gbit')
    """
    if abs(bits) < 1e3:
        return f"{bits:.0f} bit"
    for unit, scale in (("kbit", 1e3), ("Mbit", 1e6)):
        if abs(bits) < scale * 1e3:
            return f"{bits / scale:.1f} {unit}"
    return f"{bits / 1e9:.2f} Gbit"


def format_count(n: float) -> str:
    """A count with a decimal suffix: ``'512'``, ``'11.7k'``, ``'21.3M'``.

    Examples
    --------
    >>> format_count(21_300_000), format_count(512), format_count(11_700)
    ('21.3M', '512', '11.7k')
    """
    if abs(n) < 1e3:
        return f"{n:.0f}"
    if abs(n) < 1e6:
        return f"{n / 1e3:.1f}k"
    if abs(n) < 1e9:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.2f}G"


def _ratio(before: int, after: int) -> float:
    return before / after if after > 0 else float("inf")


@dataclass(frozen=True)
class Sizes:
    """The whole model's size and the compressed layers' size, before and after a stage.

    All sizes in bits, as :func:`tnquant.model_size_bits` counts them.

    Parameters
    ----------
    model_before, model_after
        The whole model (every stored bit: the layers the stage left alone,
        norms and biases included).
    params
        Parameters of the compressed layers before the stage (``None``:
        not known, left off the line).
    layers_before, layers_after
        The layers the stage changed (its report's rows), alone.

    Examples
    --------
    >>> s = Sizes(726_800_000, 90_100_000, 21_300_000, 681_600_000, 45_000_000)
    >>> round(s.model_ratio, 2), round(s.layers_ratio, 2)
    (8.07, 15.15)
    >>> print(*s.line().split("; "), sep="\\n")
    whole model 726.8 Mbit -> 90.1 Mbit (8.07x)
    compressed layers 21.3M params 681.6 Mbit -> 45.0 Mbit (15.15x)
    """

    model_before: int
    model_after: int
    params: int | None
    layers_before: int
    layers_after: int

    @property
    def model_ratio(self) -> float:
        """Whole model before / after."""
        return _ratio(self.model_before, self.model_after)

    @property
    def layers_ratio(self) -> float:
        """Compressed layers before / after."""
        return _ratio(self.layers_before, self.layers_after)

    @classmethod
    def from_rows(
        cls,
        model_before: int,
        rows: Iterable[Mapping[str, Any]],
        *,
        params: int | None = None,
        before: str = "bits_before",
        after: str = "bits_after",
    ) -> Sizes:
        """The sizes of a stage whose ``rows`` hold each changed layer's bits before and after.

        The rest of the model is unchanged, so the whole model after is
        ``model_before - sum(before) + sum(after)`` (rows counted with one
        size counter each side, so a tied tensor counts once).

        Examples
        --------
        >>> Sizes.from_rows(1000, [{"bits_before": 640, "bits_after": 80}]).model_after
        440
        """
        rows = list(rows)
        lb = sum(int(r.get(before) or 0) for r in rows)
        la = sum(int(r.get(after) or 0) for r in rows)
        return cls(model_before, model_before - lb + la, params, lb, la)

    def as_dict(self) -> dict[str, Any]:
        """The ``totals()`` entries: ``model_bits_*``, ``layers_*`` and both ratios."""
        return {
            "model_bits_before": self.model_before,
            "model_bits_after": self.model_after,
            "model_compression": self.model_ratio,
            "layers_params": self.params,
            "layers_bits_before": self.layers_before,
            "layers_bits_after": self.layers_after,
            "layers_compression": self.layers_ratio,
        }

    def line(self) -> str:
        """``'whole model A -> B (Rx); compressed layers N params C -> D (Sx)'``."""
        params = "" if self.params is None else f" {format_count(self.params)} params"
        return (
            f"whole model {format_bits(self.model_before)} -> {format_bits(self.model_after)} "
            f"({self.model_ratio:.2f}x); compressed layers{params} "
            f"{format_bits(self.layers_before)} -> {format_bits(self.layers_after)} "
            f"({self.layers_ratio:.2f}x)"
        )


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value) if value else "-"
    return str(value)


class Report:
    """Per-layer results of one stage.

    Parameters
    ----------
    stage
        Name of the stage (``'factorize'``, ``'quantize'``, ...).
    columns
        Column order for printing; keys of rows not listed here are printed
        after them.
    rows
        Initial rows.

    Attributes
    ----------
    rows : list of dict
    skipped : list of dict
        ``{'name', 'kind', 'reason'}`` for modules a stage matched but left
        unchanged.
    sizes : Sizes or None
        The whole model's and the compressed layers' sizes before and after
        the stage (``factorize``, ``quantize``, ``convert``, ``apply`` set
        it); in ``totals()`` and the table's last line.
    """

    sizes: Sizes | None = None  # also a class default: a subclass or a copy may skip __init__

    def __init__(
        self, stage: str, columns: Iterable[str] = (), rows: Iterable[dict[str, Any]] = ()
    ) -> None:
        self.stage = stage
        self.columns = tuple(columns)
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        self.skipped: list[dict[str, Any]] = []
        self.sizes: Sizes | None = None

    def add(self, **row: Any) -> None:
        """Append a row."""
        self.rows.append(row)

    def skip(self, name: str, kind: str, reason: str) -> None:
        """Record a module left unchanged, and why."""
        self.skipped.append({"name": name, "kind": kind, "reason": reason})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row.get("name") == name:
                return row
        raise KeyError(f"no row named {name!r}; rows are {[r.get('name') for r in self.rows]}")

    def totals(self) -> dict[str, Any]:
        """Sums of the size columns present in the rows, plus the ratio."""
        out: dict[str, Any] = {}
        for key in _SUMMED:
            values = [r[key] for r in self.rows if r.get(key) is not None]
            if values:
                out[key] = sum(values)
        if out.get("params_after"):
            out["compression"] = out.get("params_before", 0) / out["params_after"]
        if out.get("bits_after"):
            out["bit_compression"] = out.get("bits_before", 0) / out["bits_after"]
        if self.sizes is not None:
            out.update(self.sizes.as_dict())
        return out

    def all_columns(self) -> list[str]:
        cols = list(self.columns)
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: stage, rows, skipped, totals."""
        return json.loads(
            json.dumps(
                {
                    "stage": self.stage,
                    "rows": self.rows,
                    "skipped": self.skipped,
                    "totals": self.totals(),
                },
                default=_json_default,
            )
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """The rows as an aligned text table with a totals line."""
        cols = self.all_columns()
        lines = [[c for c in cols]]
        lines += [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        totals = self.totals()
        if totals and self.rows:
            lines.append(["total" if i == 0 else _fmt(totals.get(c)) for i, c in enumerate(cols)])
        widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
        text = [self.stage]
        text += [
            "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=False)).rstrip()
            for line in lines
        ]
        for s in self.skipped:
            text.append(f"skipped {s['name']} ({s['kind']}): {s['reason']}")
        if "compression" in totals:
            text.append(f"compression {totals['compression']:.2f}x (params)")
        if self.sizes is not None:
            text.append(self.sizes.line())
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"Report(stage={self.stage!r}, rows={len(self.rows)}, skipped={len(self.skipped)})"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
