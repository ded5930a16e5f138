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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Report"]

_SUMMED = ("params_before", "params_after", "bits_before", "bits_after", "size_bits")


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
    """

    def __init__(
        self, stage: str, columns: Iterable[str] = (), rows: Iterable[dict[str, Any]] = ()
    ) -> None:
        self.stage = stage
        self.columns = tuple(columns)
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        self.skipped: list[dict[str, Any]] = []

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
