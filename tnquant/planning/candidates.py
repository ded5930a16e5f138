"""``Candidates``: what each layer may become (the search space of :func:`~tnquant.search`).

A candidate is a :class:`~tnquant.planning.plan.Choice`: a factorization spec
(or none) and weight quantizer specs. The search takes a
:class:`Candidates` grid, an explicit list of choices, or a mapping from
layer-name globs to either.

Examples
--------
>>> from torch import nn
>>> len(Candidates().options(nn.Linear(64, 64)))  # (dense + 3 formats x 3 ratios) x 8
80
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from tnquant.core.globs import GlobTable
from tnquant.planning.plan import Choice
from tnquant.registry import factorized_class, lookup, refusal
from tnquant.specs import CP, TT, Binary, LowRank, QuantSpec, Ternary, Tucker

__all__ = ["Candidates", "candidates_for", "candidate_table", "is_embedding", "FORMATS"]

#: format names of :class:`Candidates` -> spec type
FORMATS: dict[str, type] = {"lowrank": LowRank, "tt": TT, "tucker": Tucker, "cp": CP}


@dataclass(frozen=True)
class Candidates:
    """A grid of candidate choices per layer: formats x ratios x weight quantizers.

    Each layer gets every supported combination of a factorization (none,
    or ``format(ratio=r)``) and a weight quantizer (float, ``QuantSpec`` of
    each bit width and granularity, ``Ternary``, ``Binary``), the same
    quantizer for every core of a factorized layer. Formats a layer type
    does not support (e.g. ``'tt'`` on a Conv2d) are left out for it.

    Parameters
    ----------
    formats
        Names among ``'lowrank'``, ``'tt'``, ``'tucker'``, ``'cp'``.
    ratios
        Target fractions of the dense parameter count, each in (0, 1].
    bits
        Integer code widths (symmetric ``QuantSpec``); :func:`tnquant.convert`
        packs any width of 1..8 bits at its own width.
    ternary, binary
        Include ``Ternary()`` / ``Binary()`` weights.
    keep_float
        Include float (unquantized) weights.
    dense
        Include leaving the layer unfactorized.
    granularity
        Granularities for the quantizers (``'tensor'``, ``'channel'``; axis 0:
        output channels of a dense weight, the first axis of each core).
    embedding_granularity
        Granularities for the table of a dense Embedding (the registry's
        weight kind ``'embedding'``; its TT candidates' cores take
        ``granularity``): ``'channel'`` is one scale per row (token),
        ``('group', n)`` one per ``n`` consecutive values of a row
        (``axis=1``; a width ``n`` does not divide is skipped, with the
        reason in ``Sensitivity.skipped``). Ternary and binary tables are
        per row (or per tensor).
    order
        ``order`` of the ``TT`` specs.
    observer
        The ``observer`` of the ``QuantSpec`` candidates: ``'minmax'``, or
        ``'mse'`` (clipping search, better below 5 bits, slower to build).
    embedding_observer
        The same for an embedding table's candidates (default ``'minmax'``:
        ``'mse'`` on a 30,522 x 384 table takes minutes per candidate).

    Examples
    --------
    >>> from torch import nn
    >>> cands = Candidates(formats=("lowrank",), ratios=(0.5,), bits=(8,), ternary=False,
    ...                    binary=False, keep_float=False)
    >>> [c.label() for c in cands.options(nn.Linear(8, 8))]
    ['dense/int8/channel', 'LowRank(ratio=0.5)/int8/channel']
    >>> [c.label() for c in cands.options(nn.Conv2d(3, 8, 3))]  # no LowRank on Conv2d
    ['dense/int8/channel']
    """

    formats: tuple[str, ...] = ("lowrank", "tt", "tucker")
    ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    bits: tuple[int, ...] = (8, 6, 4, 3, 2)
    ternary: bool = True
    binary: bool = True
    keep_float: bool = True
    dense: bool = True
    granularity: tuple[Any, ...] = ("channel",)
    embedding_granularity: tuple[Any, ...] = ("channel", ("group", 64))
    order: int = 3
    observer: str = "minmax"
    #: the observer of an embedding table's candidates: ``'mse'`` on MiniLM's 30,522 x 384
    #: word table takes ~200 s per candidate on one core, min-max well under a second
    embedding_observer: str = "minmax"

    def __post_init__(self) -> None:
        for name in ("formats", "ratios", "bits", "granularity", "embedding_granularity"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                raise TypeError(f"{name} must be a tuple, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for f in self.formats:
            if f not in FORMATS:
                raise ValueError(f"formats must be among {list(FORMATS)}, got {f!r}")
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"ratios must be numbers in (0, 1], got {r!r}")
        for b in self.bits:
            QuantSpec(bits=b, observer=self.observer)  # validates
            QuantSpec(bits=b, observer=self.embedding_observer)
        for g in (*self.granularity, *self.embedding_granularity):
            QuantSpec(granularity=g)
        if not (self.dense or (self.formats and self.ratios)):
            raise ValueError("Candidates needs dense=True or at least one format and ratio")

    def quantizers(self, embedding: bool = False) -> list[Any]:
        """The weight quantizer specs (``None`` for float first); ``embedding``: a table's.

        Examples
        --------
        >>> cands = Candidates(bits=(4,), ternary=False, binary=False, keep_float=False)
        >>> [q.granularity for q in cands.quantizers(embedding=True)]
        ['channel', ('group', 64)]
        >>> cands.quantizers(embedding=True)[1].axis  # a group runs along a row
        1
        """
        out: list[Any] = [None] if self.keep_float else []
        for g in self.embedding_granularity if embedding else self.granularity:
            group = isinstance(g, tuple)
            # a table's groups run along a row (its dim); other layers' axis: the spec's default
            axis: dict[str, Any] = {"axis": 1} if embedding and group else {}
            obs = self.embedding_observer if embedding else self.observer
            out += [QuantSpec(bits=b, granularity=g, observer=obs, **axis) for b in self.bits]
            if group:  # ternary and binary scales: per tensor or per channel
                continue
            if self.ternary:
                out.append(Ternary(granularity=g))
            if self.binary:
                out.append(Binary(granularity=g))
        return out

    def factorizations(self, module: nn.Module) -> list[Any]:
        """The factorization specs (``None`` for dense first) that apply to ``module``."""
        out: list[Any] = [None] if self.dense else []
        if refusal(module) is not None:
            return out
        for f in self.formats:
            cls = FORMATS[f]
            if factorized_class(module, cls) is None:
                continue
            for r in self.ratios:
                out.append(cls(ratio=r, order=self.order) if cls is TT else cls(ratio=r))
        return out

    def options(self, module: nn.Module) -> list[Choice]:
        """Every candidate :class:`~tnquant.planning.plan.Choice` for ``module``.

        A dense Embedding's table takes the ``embedding_granularity``
        quantizers; every factorized layer's cores and every other dense
        weight take ``granularity``'s.
        """
        quants = self.quantizers()
        table = self.quantizers(embedding=True) if is_embedding(module) else quants
        return [
            Choice(f, q)
            for f in self.factorizations(module)
            for q in (table if f is None else quants)
        ]


def is_embedding(module: nn.Module) -> bool:
    """Whether the registry reads ``module``'s weight as a table of rows (kind ``'embedding'``).

    Examples
    --------
    >>> from torch import nn
    >>> is_embedding(nn.Embedding(4, 2)), is_embedding(nn.Linear(2, 2))
    (True, False)
    """
    kind = lookup(module)
    return kind is not None and kind.weight_kind == "embedding"


def _supported(module: nn.Module, choice: Choice) -> bool:
    f = choice.factorization
    if f is None:
        return True
    return refusal(module) is None and factorized_class(module, f) is not None


def candidate_table(candidates: Any) -> GlobTable | None:
    """The :class:`~tnquant.core.globs.GlobTable` of a mapping of candidates (else ``None``).

    Examples
    --------
    >>> table = candidate_table({"enc.*": [], "dec": []})
    >>> table.lookup("enc.fc"), table.unmatched()
    ((True, []), ['dec'])
    """
    if not isinstance(candidates, Mapping):
        return None
    return GlobTable(candidates, "candidates")


def candidates_for(
    candidates: Any, name: str, module: nn.Module, *, table: GlobTable | None = None
) -> list[Choice] | None:
    """The candidate choices of one layer; ``None`` when a mapping leaves it out.

    A mapping's globs are looked up in ``table`` (its
    :func:`candidate_table`, which records the matches for the report) or
    in a table of its own; the first matching glob wins.
    """
    if candidates is None:
        candidates = Candidates()
    if isinstance(candidates, Mapping):
        table = table if table is not None else GlobTable(candidates, "candidates")
        found, value = table.lookup(name)
        return candidates_for(value, name, module) if found else None
    if isinstance(candidates, Candidates):
        return candidates.options(module)
    if isinstance(candidates, Sequence) and not isinstance(candidates, str):
        out = []
        for c in candidates:
            if not isinstance(c, Choice):
                raise TypeError(f"candidates must hold Choice objects, got {type(c).__name__}")
            if _supported(module, c):
                out.append(c)
        return out
    raise TypeError(
        f"candidates must be a Candidates, a list of Choice, or a mapping of globs "
        f"to those, got {type(candidates).__name__}"
    )
