import pytest

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

ALL_SPECS = [
    TT(rank=4),
    TT(ratio=0.1, order=2),
    TT(tol=0.1, in_shape=(4, 8), out_shape=(2, 16)),
    Tucker(rank=(3, 2)),
    Tucker(ratio=0.5, order=2),
    CP(rank=5),
    LowRank(tol=0.2),
    QuantSpec(),
    QuantSpec(bits=3, symmetric=False, granularity=("group", 16), axis=1),
    QuantSpec(dtype="bfloat16"),
    Binary(granularity="channel"),
    Binary(granularity="channel", learnable=True, scale="pow2"),
    Ternary(method="ttq"),
    Ternary(scale="pow2", granularity="channel"),
    FixedPoint(16, 6, rounding="RND_CONV", overflow="SAT_SYM"),
]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: type(s).__name__)
def test_dict_round_trip(spec):
    import json

    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


@pytest.mark.parametrize("cls", [TT, Tucker, CP, LowRank])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of"),
        ({"rank": 2, "ratio": 0.5}, "exactly one of"),
        ({"rank": 0}, "positive"),
        ({"rank": -3}, "positive"),
        ({"ratio": 0.0}, r"\(0, 1\]"),
        ({"ratio": 1.5}, r"\(0, 1\]"),
        ({"tol": 1.0}, r"\(0, 1\)"),
        ({"tol": 0.0}, r"\(0, 1\)"),
    ],
)
def test_factorization_spec_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match="same length"):
        TT(rank=2, in_shape=(2, 2), out_shape=(4,))
    with pytest.raises(ValueError, match="positive ints"):
        TT(rank=2, in_shape=(2, 0))
    assert TT(rank=2, in_shape=(2, 3, 4)).order == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, r"bits must be in 1\.\.16, got 0"),
        ({"bits": 17}, r"bits must be in 1\.\.16, got 17"),
        ({"granularity": "row"}, "granularity must be"),
        ({"granularity": ("group", 0)}, "group size"),
        ({"scale": "log"}, r"scale must be one of \['float', 'pow2'\]"),
        ({"observer": "max"}, "observer must be one of"),
        ({"rounding": "up"}, "rounding must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_quantspec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_quantspec_ranges():
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert (QuantSpec(bits=8, narrow_range=True).qmin) == -127
    assert (QuantSpec(bits=4, symmetric=False).qmin, QuantSpec(bits=4, symmetric=False).qmax) == (
        0,
        15,
    )
    assert QuantSpec(dtype="float8_e5m2").bits == 8


@pytest.mark.parametrize(
    "text, spec",
    [
        ("ap_fixed<16,6>", FixedPoint(16, 6)),
        ("ap_fixed<8,3,RND,SAT>", FixedPoint(8, 3, rounding="RND", overflow="SAT")),
        ("ap_ufixed<4,4,RND_CONV>", FixedPoint(4, 4, signed=False, rounding="RND_CONV")),
        (
            "ap_fixed<10, -2, AP_TRN_ZERO, AP_SAT_SYM, 0>",
            FixedPoint(10, -2, rounding="TRN_ZERO", overflow="SAT_SYM"),
        ),
    ],
)
def test_fixed_point_strings(text, spec):
    assert FixedPoint.from_string(text) == spec
    assert FixedPoint.from_string(str(spec)) == spec


@pytest.mark.parametrize("bad", ["ap_int<8>", "ap_fixed<8>", "ap_fixed<a,b>", "ap_fixed<8,3,FOO>"])
def test_fixed_point_bad_strings(bad):
    with pytest.raises(ValueError):
        FixedPoint.from_string(bad)


def test_fixed_point_properties():
    fp = FixedPoint(8, 3)
    assert fp.frac == 5 and fp.scale == 2**-5
    assert (fp.qmin, fp.qmax) == (-128, 127)
    assert (FixedPoint(8, 3, signed=False).qmin, FixedPoint(8, 3, signed=False).qmax) == (0, 255)
    with pytest.raises(ValueError, match="width must be in 1..64"):
        FixedPoint(0, 0)


def test_binary_ternary_validation():
    with pytest.raises(ValueError, match="granularity must be .tensor. or .channel. for Binary"):
        Binary(granularity=("group", 4))
    with pytest.raises(ValueError, match="threshold"):
        Ternary(threshold=0)
    with pytest.raises(ValueError, match="method must be one of"):
        Ternary(method="xnor")
    assert Ternary(method="ttq").learnable and not Ternary().learnable
