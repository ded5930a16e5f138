"""Tests of FrozenTensor: storage layouts against numpy bit arithmetic, exactness, state dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tnquant import TT, Binary, FixedPoint, QuantSpec, Ternary
from tnquant.quant import quantize
from tnquant.quant.frozen import FrozenTensor, layout_of, spec_summary, tensor_bits
from tnquant.quant.quantizer import Quantizer

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=4, granularity="channel"),
    QuantSpec(bits=3, symmetric=False, granularity="channel", axis=1),
    QuantSpec(bits=2, granularity=("group", 4), axis=1),
    QuantSpec(bits=1),
    QuantSpec(bits=5, scale="pow2", granularity="channel"),
    QuantSpec(bits=12),
    QuantSpec(bits=16, symmetric=False),
    QuantSpec(bits=4, learnable=True, symmetric=False, granularity="channel"),
    QuantSpec(bits=4, observer="mse"),
    QuantSpec(dtype="float8_e4m3fn"),
    QuantSpec(dtype="float8_e5m2"),
    QuantSpec(dtype="bfloat16"),
    QuantSpec(dtype="float16"),
    Binary(),
    Binary(granularity="channel", learnable=True),
    Ternary(),
    Ternary(method="ttq", granularity="channel"),
    Binary(scale="pow2", granularity="channel"),
    Ternary(method="ttq", granularity="channel", scale="pow2"),
    FixedPoint(8, 3, rounding="RND", overflow="SAT"),
    FixedPoint(6, 2, signed=False),
    FixedPoint(20, 6),
    FixedPoint(40, 10, rounding="RND_CONV", overflow="SAT"),
]


def _ids(specs):
    return [spec_summary(s) + ("-lsq" if getattr(s, "learnable", False) else "") for s in specs]


def _w(seed: int, shape=(6, 8), dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * torch.linspace(0.2, 3.0, shape[-1])).to(dtype)


# --------------------------------------------------------------------------- #
# layouts
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "spec, storage, bits, signed",
    [
        (QuantSpec(bits=8), "packed", 8, True),
        (QuantSpec(bits=8, symmetric=False), "packed", 8, False),
        (QuantSpec(bits=3), "packed", 3, True),
        (QuantSpec(bits=5, symmetric=False), "packed", 5, False),
        (QuantSpec(bits=1), "packed", 1, True),
        (QuantSpec(bits=2, symmetric=False), "packed", 2, False),
        (QuantSpec(bits=9), "int16", 16, True),
        (QuantSpec(bits=16, symmetric=False), "int16", 16, False),
        (QuantSpec(dtype="float8_e4m3fn"), "cast", 8, True),
        (QuantSpec(dtype="bfloat16"), "cast", 16, True),
        (Binary(), "binary", 1, True),
        (Ternary(method="ttq"), "packed", 2, True),
        (FixedPoint(8, 3), "packed", 8, True),
        (FixedPoint(7, 3, signed=False), "packed", 7, False),
        (FixedPoint(17, 3), "int32", 32, True),
        (FixedPoint(33, 3), "int64", 64, True),
    ],
)
def test_layout_table(spec, storage, bits, signed):
    layout = layout_of(spec)
    assert (layout.storage, layout.code_bits, layout.signed) == (storage, bits, signed)


def test_skeleton_buffers_and_errors():
    f = FrozenTensor(
        QuantSpec(bits=4, symmetric=False, granularity=("group", 2), axis=1), (3, 6), torch.float64
    )
    assert f.packed.shape == (9,) and f.packed.dtype == torch.uint8
    assert f.scale.shape == (3, 3) and f.scale.dtype == torch.float64
    assert f.zero_point.shape == (3, 3) and f.zero_point.dtype == torch.uint8
    assert "scale_neg" not in f._buffers
    assert FrozenTensor(FixedPoint(8, 2), (4,)).scale.numel() == 0
    with pytest.raises(TypeError, match="spec must be one of"):
        FrozenTensor(TT(rank=2), (2, 2))
    with pytest.raises(TypeError, match="floating torch.dtype"):
        FrozenTensor(QuantSpec(), (2,), torch.int8)
    with pytest.raises(ValueError, match="group size 4 does not divide"):
        FrozenTensor(QuantSpec(granularity=("group", 4), axis=1), (2, 6))
    codes, qp = quantize(torch.ones(2, 3), QuantSpec())
    with pytest.raises(ValueError, match="do not match qparams"):
        FrozenTensor.from_codes(codes[:1], qp, QuantSpec())
    with pytest.raises(ValueError, match="block_size"):
        FrozenTensor.from_codes(codes, qp, QuantSpec(granularity="channel"))


# --------------------------------------------------------------------------- #
# independent references: numpy integer and float32 arithmetic
# --------------------------------------------------------------------------- #


def _np_symmetric(w: np.ndarray, bits: int, axis: int):
    qmax = 2 ** (bits - 1) - 1
    red = tuple(d for d in range(w.ndim) if d != axis)
    scale = (np.max(np.abs(w), axis=red, keepdims=True) / np.float32(qmax)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.round(w / scale), -qmax - 1, qmax)
    return codes.astype(np.int64), (codes * scale).astype(np.float32)


def _np_nibbles(codes: np.ndarray) -> np.ndarray:
    u = (codes.reshape(-1) & 0xF).astype(np.uint8)
    u = np.concatenate([u, np.zeros(len(u) % 2, dtype=np.uint8)])
    return u[0::2] | (u[1::2] << 4)


def test_int4_channel_matches_numpy():
    w = _w(0, (5, 7))  # 35 codes: odd, so the last byte is padded
    f = FrozenTensor.from_quantizer(Quantizer(QuantSpec(bits=4, granularity="channel", axis=1)), w)
    codes, values = _np_symmetric(w.numpy(), 4, axis=1)
    assert np.array_equal(f.packed.numpy(), _np_nibbles(codes))
    assert f.packed.numel() == 18
    assert np.array_equal(f.codes().numpy(), codes)
    assert np.array_equal(f().numpy(), values)


def test_affine_uint4_matches_numpy():
    w = _w(1, (4, 6)).numpy()
    lo, hi = np.float32(min(w.min(), 0)), np.float32(max(w.max(), 0))
    scale = np.float32((hi - lo) / np.float32(15))
    zp = np.clip(0 - np.round(lo / scale), 0, 15)
    codes = np.clip(np.round(w / scale) + zp, 0, 15).astype(np.int64)
    values = ((codes - zp) * scale).astype(np.float32)
    f = FrozenTensor.from_quantizer(
        Quantizer(QuantSpec(bits=4, symmetric=False)), torch.from_numpy(w)
    )
    assert np.array_equal(f.packed.numpy(), _np_nibbles(codes))
    assert int(f.zero_point) == zp and f.zero_point.dtype == torch.uint8
    assert np.array_equal(f().numpy(), values)


def test_binary_one_bit_per_code():
    w = _w(2, (3, 5))
    f = FrozenTensor.from_quantizer(Quantizer(Binary(granularity="channel")), w)
    sign = w.numpy() >= 0
    assert np.array_equal(f.packed.numpy(), np.packbits(sign.reshape(-1), bitorder="little"))
    alpha = np.abs(w.numpy()).mean(axis=1, keepdims=True)
    assert np.allclose(f().numpy(), np.where(sign, alpha, -alpha), rtol=1e-6, atol=0)


def test_ternary_two_bit_fields():
    w = torch.tensor([[0.9, -0.8, 0.05, 0.7, -1.0]])
    f = FrozenTensor.from_quantizer(Quantizer(Ternary()), w)
    codes = np.array([1, -1, 0, 1, -1])
    fields = (codes & 0b11).astype(np.uint8)
    expected = [fields[0] | fields[1] << 2 | fields[2] << 4 | fields[3] << 6, fields[4]]
    assert f.packed.tolist() == expected


def test_sixteen_bit_affine_bit_pattern():
    w = torch.linspace(-1.0, 3.0, 12)
    f = FrozenTensor.from_quantizer(Quantizer(QuantSpec(bits=16, symmetric=False)), w)
    codes = f.codes().numpy()
    assert codes.max() == 65535 and codes.min() == 0
    assert np.array_equal(f.packed.numpy(), codes.astype(np.uint16).view(np.int16))


def test_float16_raw_bytes_match_numpy():
    w = _w(3, (4, 4))
    f = FrozenTensor.from_quantizer(Quantizer(QuantSpec(dtype="float16")), w)
    np16 = w.numpy().astype(np.float16)
    assert np.array_equal(f.packed.numpy(), np16.view(np.uint8).reshape(-1))
    assert np.array_equal(f().numpy(), np16.astype(np.float32))


def test_fixed_point_matches_numpy():
    w = _w(4, (3, 7))
    spec = FixedPoint(8, 3, rounding="RND", overflow="SAT")  # 5 fractional bits
    m = np.clip(np.floor(w.numpy().astype(np.float64) * 32 + 0.5), -128, 127)
    f = FrozenTensor.from_quantizer(Quantizer(spec), w)
    assert np.array_equal(f.packed.numpy(), m.astype(np.int8).view(np.uint8).reshape(-1))
    assert np.array_equal(f().numpy(), (m / 32).astype(np.float32))


# --------------------------------------------------------------------------- #
# exactness against the fake-quant path, state dicts
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_frozen_equals_fake_quant(spec, dtype):
    w = _w(5, dtype=dtype)
    q = Quantizer(spec)
    ref = q(w)
    f = FrozenTensor.from_quantizer(q, w)
    out = f(torch.empty(0))
    assert out.dtype == dtype and torch.equal(out, ref)
    codes, _ = q.quantize_codes(w)
    assert torch.equal(f.codes(), codes.to(f.codes().dtype))


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_state_dict_round_trip_through_metadata(spec):
    w = _w(6, (4, 8), torch.float64)
    f = FrozenTensor.from_quantizer(Quantizer(spec), w)
    meta = json.loads(json.dumps(f.metadata()))
    g = FrozenTensor.from_metadata(meta)
    g.load_state_dict(f.state_dict())
    assert torch.equal(g(), f()) and g.dtype == torch.float64
    assert set(f.state_dict()) <= {"packed", "scale", "zero_point", "scale_neg"}
    with pytest.raises(ValueError, match="dtype"):
        FrozenTensor.from_metadata({**meta, "dtype": "int8"})


def test_nbits_counts_buffers_as_stored():
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    f = FrozenTensor.from_quantizer(Quantizer(spec), _w(7, (6, 5)))
    # 30 codes of 3 bits = 90 bits -> 12 bytes; 6 float32 scales; 6 uint8 zero points
    assert f.nbits() == 12 * 8 + 6 * 32 + 6 * 8
    ttq = FrozenTensor.from_quantizer(Quantizer(Ternary(method="ttq")), _w(7, (6, 5)))
    assert ttq.nbits() == 8 * 8 + 32 + 32
    assert tensor_bits(torch.zeros(3, dtype=torch.bool)) == 24


def test_dtype_follows_module_to():
    w = _w(8)
    f = FrozenTensor.from_quantizer(Quantizer(QuantSpec(bits=4)), w)
    ref = f()
    f64 = f.to(torch.float64)()  # .to() is in place on modules
    assert f64.dtype == torch.float64 and f.scale.dtype == torch.float64
    # the float64 product of a float32 scale and a 4-bit code is exact, so
    # rounding it to float32 gives the float32 product
    assert torch.equal(f64.float(), ref)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 9),
    bits=st.integers(1, 16),
    symmetric=st.booleans(),
    channel=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_codes_round_trip_any_width(rows, cols, bits, symmetric, channel, seed):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel" if channel else "tensor")
    w = _w(seed, (rows, cols))
    q = Quantizer(spec)
    codes, _ = q.quantize_codes(w)
    f = FrozenTensor.from_quantizer(q, w)
    assert torch.equal(f.codes().long(), codes.long())
    assert torch.equal(f(), q(w))
    assert f.packed.numel() * f.packed.element_size() * 8 >= rows * cols * bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_cuda_matches_fake_quant(spec):
    w = _w(9).cuda()
    q = Quantizer(spec).cuda()
    f = FrozenTensor.from_quantizer(q, w)
    assert f.packed.is_cuda and torch.equal(f(), q(w))
    assert torch.equal(f.cpu()(), f().cpu())
