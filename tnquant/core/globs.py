"""Glob patterns on module names: one table, one rule, one way to report misses.

Every verb that takes patterns (``factorize``'s mapping, ``quantize``'s
``weights=``/``cores=``/``activations=``, the search's candidates, rotate,
recipes) builds a :class:`GlobTable`. Patterns are
:func:`fnmatch.fnmatchcase` globs on the names ``named_modules`` gives
(``*`` also crosses dots); the first matching pattern wins. After the walk,
:meth:`GlobTable.check` refuses a pattern that every name it matched had
already been claimed by an earlier one (shadowed: it can never be used) and
lists a pattern that matched nothing in the report's ``skipped`` rows.
``include``/``exclude`` filters go through :func:`selected`.

Examples
--------
>>> table = GlobTable({"enc.*": "a", "enc.fc": "b", "dec": "c"}, "weights")
>>> table.lookup("enc.fc")
(True, 'a')
>>> table.check()
Traceback (most recent call last):
...
ValueError: weights pattern 'enc.fc' is never used: every name it matches (e.g. 'enc.fc') is \
matched first by 'enc.*'; the first matching pattern wins, so put more specific patterns first
>>> selected("encoder.layer.0.key", ["encoder.*"], ["*.key"])
False
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

__all__ = ["GlobTable", "selected", "matches"]


class _Skips(Protocol):
    def skip(self, name: str, kind: str, reason: str) -> None: ...


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches the glob ``pattern`` (case-sensitive, ``*`` crosses dots)."""
    return fnmatch.fnmatchcase(name, pattern)


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """Whether ``name`` matches an ``include`` glob (or ``include`` is None) and no ``exclude`` one.

    Examples
    --------
    >>> selected("encoder.layer.0.query", ["encoder.*"], ["*.key"])
    True
    """
    if include is not None and not any(matches(name, p) for p in include):
        return False
    return exclude is None or not any(matches(name, p) for p in exclude)


class GlobTable:
    """Ordered ``pattern -> value`` entries; the first match wins (see the module docs).

    Parameters
    ----------
    entries
        A mapping of glob strings (or, with ``int_keys``, int core indices;
        a negative index counts from the end) to values, or ``None`` (no
        table given).
    what
        The argument's name, used in every message (``'weights'``,
        ``'factorize'``).
    check_value
        Called as ``check_value(value, where)`` for every value; raises
        ``TypeError``/``ValueError`` naming ``where`` for a bad one.
    int_keys
        Accept int keys (core indices) besides glob strings.
    """

    def __init__(
        self,
        entries: Mapping[Any, Any] | None,
        what: str,
        check_value: Callable[[Any, str], None] | None = None,
        int_keys: bool = False,
    ) -> None:
        self.what = what
        self.entries: list[tuple[Any, Any]] | None = None
        self._won: set[int] = set()
        self._beaten: dict[int, tuple[int, str]] = {}
        if entries is None:
            return
        if not isinstance(entries, Mapping):
            raise TypeError(f"{what} must be a mapping of patterns, got {type(entries).__name__}")
        for key, value in entries.items():
            ok_int = int_keys and isinstance(key, int) and not isinstance(key, bool)
            if not (isinstance(key, str) or ok_int):
                kinds = "glob strings or int core indices" if int_keys else "glob strings"
                raise TypeError(f"{what} keys must be {kinds}, got {key!r}")
            if check_value is not None:
                check_value(value, f"{what}[{key!r}]")
        self.entries = list(entries.items())

    @property
    def given(self) -> bool:
        """Whether a table was given at all (``entries`` not ``None``)."""
        return self.entries is not None

    def lookup(self, name: str, index: int | None = None, count: int = 0) -> tuple[bool, Any]:
        """``(found, value)`` of the first entry matching ``name`` (or core ``index`` of ``count``).

        Every call records which entries matched, for :meth:`check`.
        """
        first = self.winner(name, index, count)
        if first is None or self.entries is None:
            return False, None
        return True, self.entries[first][1]

    def key(self, i: int) -> Any:
        """The key (pattern or core index) of entry ``i``."""
        return (self.entries or [])[i][0]

    def winner(
        self, name: str, index: int | None = None, count: int = 0, *, record: bool = True
    ) -> int | None:
        """The index of the first entry matching ``name`` (``None``: none).

        Recorded for :meth:`check` as in :meth:`lookup`, unless ``record`` is false.
        """
        first = None
        for i, (key, _) in enumerate(self.entries or ()):
            if isinstance(key, int):
                hit = index is not None and key in (index, index - count)
            else:
                hit = matches(name, key)
            if not hit:
                continue
            if not record:
                return i
            if first is None:
                first = i
                self._won.add(i)
            else:
                self._beaten.setdefault(i, (first, name))
        return first

    def unmatched(self) -> list[Any]:
        """Keys that matched no name in the lookups so far."""
        return [
            key
            for i, (key, _) in enumerate(self.entries or ())
            if i not in self._won and i not in self._beaten
        ]

    def check(self, report: _Skips | None = None) -> None:
        """Raise for a shadowed entry; add one ``skipped`` row per unmatched entry to ``report``.

        Raises
        ------
        ValueError
            If an entry matched only names an earlier entry had claimed.
        """
        for i, (key, _) in enumerate(self.entries or ()):
            if i in self._won or i not in self._beaten or self.entries is None:
                continue
            first, name = self._beaten[i]
            raise ValueError(
                f"{self.what} pattern {key!r} is never used: every name it matches (e.g. "
                f"{name!r}) is matched first by {self.entries[first][0]!r}; the first "
                f"matching pattern wins, so put more specific patterns first"
            )
        if report is not None:
            for key in self.unmatched():
                report.skip(f"{self.what}[{key!r}]", "pattern", "matched nothing")
