"""Every field of every spec checks its type: wrong values are refused naming the field.

The reference is written here, independently of the checkers: for each field
a predicate says which Python values have the right type. A spec that
accepts a value the predicate calls wrong-typed fails the test, and every
refusal is a ``TypeError``/``ValueError`` whose message starts with the field
name (what the recipe parser uses to point at the culprit key).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant.specs import (
    AP_OVERFLOW,
    AP_ROUNDING,
    CP,
    FLOAT_DTYPES,
    OBSERVERS,
    POW2_ROUNDINGS,
    ROUNDING_MODES,
    SCALE_KINDS,
    SVD_METHODS,
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

# --------------------------------------------------------------------------- #
# the independent reference: which values have the right type, per field kind
# --------------------------------------------------------------------------- #


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v):
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def _group(v):
    return (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and v[0] == "group"
        and _int(v[1])
        and v[1] >= 1
    )


KINDS = {
    "bool": lambda v: isinstance(v, bool),
    "int": _int,
    "real": _real,
    "opt_real": lambda v: v is None or _real(v),
    "opt_int": lambda v: v is None or _int(v),
    "rank": lambda v: (
        v is None
        or v == "full"
        or _int(v)
        or (isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(r) for r in v))
    ),
    "shape": lambda v: (
        v is None or (isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(r) for r in v))
    ),
    "granularity": lambda v: v in ("tensor", "channel") if isinstance(v, str) else _group(v),
    "dtype": lambda v: (
        v is None or (isinstance(v, str) and v in FLOAT_DTYPES) or v in FLOAT_DTYPES.values()
    ),
}


def choice(valid):
    return lambda v: isinstance(v, str) and v in valid


FACTOR = {"rank": KINDS["rank"], "ratio": KINDS["opt_real"], "tol": KINDS["opt_real"]}
TENSORIZED = {
    **FACTOR,
    "order": KINDS["int"],
    "in_shape": KINDS["shape"],
    "out_shape": KINDS["shape"],
    "svd": choice(SVD_METHODS),
}
FIELDS = {
    TT: TENSORIZED,
    Tucker: TENSORIZED,
    CP: {**FACTOR, "n_iter_max": KINDS["int"]},
    LowRank: {**FACTOR, "svd": choice(SVD_METHODS)},
    QuantSpec: {
        "bits": KINDS["int"],
        "symmetric": KINDS["bool"],
        "granularity": KINDS["granularity"],
        "axis": KINDS["opt_int"],  # None: the layer decides
        "scale": choice(SCALE_KINDS),
        "pow2_rounding": choice(POW2_ROUNDINGS),
        "observer": choice(OBSERVERS),
        "learnable": KINDS["bool"],
        "narrow_range": KINDS["bool"],
        "rounding": choice(ROUNDING_MODES),
        "dtype": KINDS["dtype"],
        "percentile": KINDS["real"],
        "ema_decay": KINDS["real"],
    },
    Binary: {
        "granularity": KINDS["granularity"],
        "axis": KINDS["int"],
        "learnable": KINDS["bool"],
        "scale": choice(SCALE_KINDS),
    },
    Ternary: {
        "threshold": KINDS["real"],
        "method": choice(("twn", "ttq")),
        "granularity": KINDS["granularity"],
        "axis": KINDS["int"],
        "scale": choice(SCALE_KINDS),
    },
    FixedPoint: {
        "width": KINDS["int"],
        "integer": KINDS["int"],
        "signed": KINDS["bool"],
        "rounding": choice(AP_ROUNDING),
        "overflow": choice(AP_OVERFLOW),
    },
}
# the type is wrong -> TypeError (other fields may say ValueError for a wrong shape of value)
_NUMBER = lambda v: _int(v) or isinstance(v, float)  # noqa: E731
TYPE_OF = {
    **{f: _int for f in ("bits", "axis", "width", "integer", "order", "n_iter_max")},
    **{f: KINDS["bool"] for f in ("symmetric", "learnable", "narrow_range", "signed")},
    **{f: _NUMBER for f in ("percentile", "ema_decay", "threshold")},
    **{
        f: lambda v: isinstance(v, str)
        for f in ("svd", "scale", "pow2_rounding", "observer", "rounding", "method", "overflow")
    },
}


def base_kwargs(cls, field):
    """Valid values for the other fields (exactly one of rank/ratio/tol for factorizations)."""
    if cls is FixedPoint:
        kwargs = {"width": 8, "integer": 3}
    elif cls in (TT, Tucker, CP, LowRank):
        kwargs = {} if field in ("rank", "ratio", "tol") else {"rank": 2}
    else:
        kwargs = {}
    kwargs.pop(field, None)
    return kwargs


CASES = [(cls, field) for cls, fields in FIELDS.items() for field in fields]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        [
            "false",
            "true",
            "no",
            "8",
            "0.5",
            "tensor",
            "channel",
            "full",
            "group",
            "TRN",
            "SAT",
            "twn",
            "pow2",
            "minmax",
            "float16",
            "truncated",
        ]
    ),
    st.lists(
        st.one_of(st.integers(-3, 6), st.booleans(), st.floats(-2, 9), st.text(max_size=2)),
        max_size=3,
    ),
    st.tuples(
        st.sampled_from(["group", "grp", 3]),
        st.one_of(st.integers(-2, 64), st.floats(0, 9), st.booleans(), st.none()),
    ),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.complex_numbers(allow_nan=False, max_magnitude=10),
    st.sampled_from(
        [
            torch.float16,
            torch.bfloat16,
            torch.int8,
            torch.float32,
            b"8",
            object(),
            frozenset([1]),
            8.0,
            0.0,
            -1,
            2**70,
            math.inf,
        ]
    ),
)


def _first_word(exc):
    return str(exc).split(" ", 1)[0]


@pytest.mark.parametrize(("cls", "field"), CASES, ids=[f"{c.__name__}.{f}" for c, f in CASES])
@settings(derandomize=True, deadline=None, max_examples=60)
@given(value=JUNK)
def test_wrong_values_are_refused_naming_the_field(cls, field, value):
    kwargs = {**base_kwargs(cls, field), field: value}
    right_type = FIELDS[cls][field](value)
    try:
        spec = cls(**kwargs)
    except (TypeError, ValueError) as e:
        if field in ("rank", "ratio", "tol") and value is None:
            assert "exactly one of" in str(e)
            return
        assert _first_word(e) == field, e
        assert "got" in str(e), e
        if field in TYPE_OF:
            assert isinstance(e, TypeError) == (not TYPE_OF[field](value)), e
        return
    assert right_type, f"{cls.__name__}({field}={value!r}) was accepted"
    # what was accepted survives a JSON round trip unchanged
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


@pytest.mark.parametrize(
    ("make", "field", "error"),
    [
        (lambda: QuantSpec(symmetric="false"), "symmetric", TypeError),
        (lambda: QuantSpec(symmetric=0), "symmetric", TypeError),
        (lambda: FixedPoint(8, 2, signed="no"), "signed", TypeError),
        (lambda: QuantSpec(percentile="99"), "percentile", TypeError),
        (lambda: QuantSpec(ema_decay="0.9"), "ema_decay", TypeError),
        (lambda: QuantSpec(ema_decay=math.nan), "ema_decay", ValueError),
        (lambda: Ternary(threshold="0.7"), "threshold", TypeError),
        (lambda: CP(rank=4, n_iter_max="100"), "n_iter_max", TypeError),
        (lambda: CP(rank=4, n_iter_max=True), "n_iter_max", TypeError),
        (lambda: QuantSpec(bits=8.0), "bits", TypeError),
        (lambda: QuantSpec(bits=True), "bits", TypeError),
        (lambda: QuantSpec(learnable=1), "learnable", TypeError),
        (lambda: Binary(learnable="yes"), "learnable", TypeError),
        (lambda: Binary(axis=1.0), "axis", TypeError),
        (lambda: TT(rank=2, order="3"), "order", TypeError),
        (lambda: TT(rank=2, in_shape=4), "in_shape", TypeError),
        (lambda: TT(rank=2, svd=None), "svd", TypeError),
        (lambda: TT(ratio=True), "ratio", TypeError),
        (lambda: TT(rank=2.5), "rank", TypeError),
        (lambda: QuantSpec(granularity=7), "granularity", TypeError),
        (lambda: QuantSpec(granularity=("group", 0)), "granularity", ValueError),
        (lambda: QuantSpec(dtype=8), "dtype", TypeError),
        (lambda: QuantSpec(rounding=1), "rounding", TypeError),
        (lambda: FixedPoint(8, 5000), "integer", ValueError),
        (lambda: FixedPoint("8", 3), "width", TypeError),
    ],
)
def test_issue_examples(make, field, error):
    """The cases of the issue: before, 'false' was truthy and a str failed in a comparison."""
    with pytest.raises(error) as info:
        make()
    assert _first_word(info.value) == field
    assert "got" in str(info.value)


def test_message_says_expected_and_got():
    with pytest.raises(TypeError, match=r"^symmetric must be a bool, got 'false' \(str\)$"):
        QuantSpec(symmetric="false")
    with pytest.raises(
        TypeError,
        match=r"^percentile must be a number \(int or float\), got "
        r"'99' \(str\)$",
    ):
        QuantSpec(percentile="99")
    with pytest.raises(ValueError, match=r"^bits must be in 1\.\.16, got 0$"):
        QuantSpec(bits=0)


def test_values_are_normalized():
    assert QuantSpec(percentile=99).percentile == 99.0
    assert isinstance(QuantSpec(percentile=99).percentile, float)
    assert TT(rank=[3, 2]).rank == (3, 2)
    assert TT(rank=2, in_shape=[2, 4]).in_shape == (2, 4)
    assert QuantSpec(granularity=["group", 4]).granularity == ("group", 4)
    assert QuantSpec(dtype=torch.bfloat16).dtype == "bfloat16"


def test_bits_is_type_checked_under_a_dtype():
    """bits is overwritten by the format's width, but a wrong type is still refused."""
    assert QuantSpec(bits=3, dtype="float16").bits == 16
    with pytest.raises(TypeError, match="^bits must be an int"):
        QuantSpec(bits="8", dtype="float16")


def test_recipe_names_the_culprit_key():
    from tnquant.cli.recipe import parse_recipe

    for text, key in [
        ('[quantize.weights]\n"*" = {bits = 4, symmetric = "false"}', "symmetric"),
        ('[quantize.weights]\n"*" = {kind = "ternary", threshold = "0.7"}', "threshold"),
        (
            '[quantize.weights]\n"*" = {kind = "fixed", width = 8, integer = 2, signed = "no"}',
            "signed",
        ),
        ('[factorize]\n"fc" = {format = "cp", rank = 2, n_iter_max = "5"}', "n_iter_max"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_recipe(text)
        assert f".{key}'" in str(info.value), str(info.value)


# --------------------------------------------------------------------------- #
# spec_from_dict on dicts from strangers
# --------------------------------------------------------------------------- #

NAMES = [cls.__name__ for cls in FIELDS]


@pytest.mark.parametrize(
    "data",
    [
        None,
        3,
        "QuantSpec",
        ["type", "QuantSpec"],
        {},
        {"bits": 4},
        {"type": None},
        {"type": ["QuantSpec"]},
        {"type": {"a": 1}},
        {"type": 3},
        {"type": "Nope"},
        {"type": "__class__"},
        {"type": "QuantSpec", "bitz": 4},
        {"type": "QuantSpec", 3: 4},
        {"type": "QuantSpec", "bits": "4"},
        {"type": "FixedPoint", "width": 8},
        {"type": "FixedPoint"},
        {"type": "TT", "rank": [[1, 2]]},
        {"type": "TT", "rank": {"a": 1}},
        {"type": "TT", "rank": 2, "in_shape": "ab"},
        {"type": "Binary", "granularity": ["group"]},
    ],
)
def test_spec_from_dict_refuses_bad_dicts(data):
    with pytest.raises((TypeError, ValueError)):
        spec_from_dict(data)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(
    st.sampled_from(NAMES + ["X", ""]),
    st.dictionaries(
        st.sampled_from(sorted({f for fs in FIELDS.values() for f in fs}) + ["type", "zzz"]),
        JUNK,
        max_size=4,
    ),
)
def test_spec_from_dict_junk_gives_type_or_value_errors(name, fields):
    data = {"type": name, **fields} if "type" not in fields else fields
    try:
        spec = spec_from_dict(data)
    except (TypeError, ValueError):
        return
    assert type(spec).__name__ == data["type"]
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_spec_checks_alias_warns_and_is_the_same_module() -> None:
    import importlib
    import sys

    import tnquant.specs.checks as checks

    sys.modules.pop("tnquant.spec_checks", None)
    with pytest.warns(DeprecationWarning, match="tnquant.specs.checks"):
        old = importlib.import_module("tnquant.spec_checks")
    assert old.check_int is checks.check_int and old.describe is checks.describe
