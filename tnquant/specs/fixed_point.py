"""The fixed-point spec ``ap_fixed<W,I,Q,O>`` / ``ap_ufixed<W,I,Q,O>`` and its type strings.

Examples
--------
>>> FixedPoint.from_string("ap_fixed<16,6,RND,SAT>").width
16
>>> str(FixedPoint(8, 3))
'ap_fixed<8,3>'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tnquant.specs.checks import check_bool, check_choice, check_int, describe

__all__ = ["FixedPoint", "AP_ROUNDING", "AP_OVERFLOW", "MAX_INTEGER_BITS"]

AP_ROUNDING = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_MIN_INF", "RND_INF", "RND_CONV")
AP_OVERFLOW = ("WRAP", "SAT", "SAT_SYM", "SAT_ZERO")

# |integer| of a FixedPoint beyond this is refused (see FixedPoint)
MAX_INTEGER_BITS = 4096

_AP_RE = re.compile(r"^\s*(ap_u?fixed)\s*<\s*([^>]*)>\s*$")


@dataclass(frozen=True)
class FixedPoint:
    """``ap_fixed<W,I,Q,O>`` (signed) or ``ap_ufixed<W,I,Q,O>`` (unsigned).

    A value is ``mantissa * 2**-(W - I)`` with a ``W``-bit mantissa.
    ``integer`` may be negative or exceed ``width`` (as in Vivado HLS).

    Parameters
    ----------
    width, integer
        ``W`` (1..64) and ``I`` (-4096..4096: beyond +-2100 or so every
        finite float64 already maps to zero or out of range). Mantissas
        (:func:`~tnquant.quant.to_mantissa`) work for every such type; the
        float values of a type whose step or range is beyond a float dtype
        are refused where they are formed (``scale``, ``from_mantissa``,
        ``fake_quantize``).
    signed
        ``ap_fixed`` (two's complement) or ``ap_ufixed``.
    rounding
        One of ``TRN`` (floor, the default), ``TRN_ZERO``, ``RND`` (ties to
        +inf), ``RND_ZERO``, ``RND_MIN_INF``, ``RND_INF``, ``RND_CONV`` (ties
        to even).
    overflow
        One of ``WRAP`` (the default), ``SAT``, ``SAT_SYM``, ``SAT_ZERO``.

    Examples
    --------
    >>> fp = FixedPoint(8, 3, rounding="RND", overflow="SAT")
    >>> str(fp)
    'ap_fixed<8,3,RND,SAT>'
    >>> fp.scale
    0.03125
    >>> FixedPoint.from_string("ap_ufixed<4,4>") == FixedPoint(4, 4, signed=False)
    True
    """

    width: int
    integer: int
    signed: bool = True
    rounding: str = "TRN"
    overflow: str = "WRAP"

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", check_int("width", self.width, 1, 64))
        object.__setattr__(
            self, "integer", check_int("integer", self.integer, -MAX_INTEGER_BITS, MAX_INTEGER_BITS)
        )
        check_bool("signed", self.signed)
        check_choice("rounding", self.rounding, AP_ROUNDING)
        check_choice("overflow", self.overflow, AP_OVERFLOW)

    @property
    def bits(self) -> int:
        return self.width

    @property
    def frac(self) -> int:
        """Fractional bits ``W - I``."""
        return self.width - self.integer

    @property
    def scale(self) -> float:
        """The value of one mantissa step, ``2**-(W - I)``.

        Raises ``ValueError`` when that step is not a float64 (``W - I``
        outside ``-1023..1074``).
        """
        if not -1023 <= self.frac <= 1074:
            raise ValueError(
                f"integer {self.integer} with width {self.width} gives {self} a step "
                f"2**{-self.frac}, beyond float64 (2**-1074 .. 2**1023)"
            )
        return math.ldexp(1.0, -self.frac)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.width - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.width - 1) - 1 if self.signed else 2**self.width - 1

    def __str__(self) -> str:
        name = "ap_fixed" if self.signed else "ap_ufixed"
        args = [str(self.width), str(self.integer)]
        if self.rounding != "TRN" or self.overflow != "WRAP":
            args.append(self.rounding)
        if self.overflow != "WRAP":
            args.append(self.overflow)
        return f"{name}<{','.join(args)}>"

    def to_string(self) -> str:
        """The ``ap_fixed<...>`` type string (defaults left out, as HLS writes it)."""
        return str(self)

    @classmethod
    def from_string(cls, text: str) -> FixedPoint:
        """Parse ``ap_fixed<W,I[,Q[,O[,N]]]>`` or ``ap_ufixed<...>``.

        The saturation-bits argument ``N`` is accepted only as 0.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected an 'ap_fixed<W,I,...>' str, got {describe(text)}")
        match = _AP_RE.match(text)
        if not match:
            raise ValueError(f"expected 'ap_fixed<W,I,...>' or 'ap_ufixed<W,I,...>', got {text!r}")
        args = [a.strip() for a in match.group(2).split(",")]
        if not 2 <= len(args) <= 5:
            raise ValueError(
                f"ap_fixed takes 2 to 5 template arguments, got {len(args)} in {text!r}"
            )
        try:
            width, integer = int(args[0]), int(args[1])
        except ValueError:
            raise ValueError(f"W and I must be integers in {text!r}") from None
        rounding = args[2] if len(args) > 2 else "TRN"
        overflow = args[3] if len(args) > 3 else "WRAP"
        if len(args) > 4 and args[4] != "0":
            raise ValueError(f"saturation bits N != 0 are not supported, got {text!r}")
        rounding = rounding.replace("AP_", "")
        overflow = overflow.replace("AP_", "")
        return cls(
            width,
            integer,
            signed=match.group(1) == "ap_fixed",
            rounding=rounding,
            overflow=overflow,
        )
