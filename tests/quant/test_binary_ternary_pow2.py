"""``Binary(scale='pow2')`` / ``Ternary(scale='pow2')`` against numpy references.

The reference: the float scale of the paper (XNOR ``mean|W|``, TWN's ``alpha``,
computed here in numpy float64), rounded to ``2**round(log2(alpha))``; the
output must be exactly ``codes * 2**k``. Round trips (quantize, calibrate,
convert, save, load) must not change a bit; old files without the field load
as ``scale='float'``; a bad value in a file is refused, naming ``scale``.
``pow2_codes`` (the integer view) is tested in :mod:`tests.quant.test_pow2`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import tnquant
from tests.quant.pow2_refs import BINARY, SHAPES, TERNARY, np_binary_alpha, np_pow2, np_twn
from tests.quant.pow2_refs import weights as _w
from tnquant import Binary, QuantSpec, Ternary
from tnquant.cli.recipe import parse_recipe
from tnquant.io import JSON_FILE
from tnquant.quant import Quantizer, fake_quantize, quantize
from tnquant.quant.binary import binary_scale
from tnquant.quant.frozen import FrozenTensor, spec_summary
from tnquant.quant.ternary import twn_params
from tnquant.specs import spec_from_dict, spec_to_dict

# --------------------------------------------------------------------------- #
# the spec field
# --------------------------------------------------------------------------- #


def test_default_is_float_and_pow2_is_accepted():
    assert Binary().scale == "float" and Ternary().scale == "float"
    assert Binary(scale="pow2").scale == "pow2"
    assert Ternary(method="ttq", scale="pow2").scale == "pow2"
    assert Binary(learnable=True, scale="pow2").learnable


@pytest.mark.parametrize("cls", [Binary, Ternary])
def test_bad_scale_is_refused_naming_the_field(cls):
    with pytest.raises(ValueError, match=r"^scale must be one of \['float', 'pow2'\], got 'log'"):
        cls(scale="log")
    with pytest.raises(TypeError, match=r"^scale must be a str, one of .*got 2 \(int\)"):
        cls(scale=2)


@pytest.mark.parametrize("spec", BINARY + TERNARY + [Binary(), Ternary(method="ttq")], ids=repr)
def test_spec_dict_round_trip(spec):
    data = json.loads(json.dumps(spec_to_dict(spec)))
    assert data["scale"] == spec.scale
    assert spec_from_dict(data) == spec


@pytest.mark.parametrize("name", ["Binary", "Ternary"])
def test_spec_dict_without_scale_is_float_and_bad_scale_refused(name):
    assert spec_from_dict({"type": name}).scale == "float"
    with pytest.raises(ValueError, match="^scale must be one of"):
        spec_from_dict({"type": name, "scale": "pow3"})


def test_labels_mark_pow2():
    assert spec_summary(Binary()) == "binary"
    assert spec_summary(Binary(scale="pow2")) == "binary,pow2"
    assert spec_summary(Binary(scale="pow2", granularity="channel")) == "binary/channel,pow2"
    assert spec_summary(Ternary(scale="pow2")) == "ternary,pow2"
    assert spec_summary(Ternary(method="ttq", scale="pow2")) == "ternary-ttq,pow2"
    # the same style as the integer pow2 label
    assert spec_summary(QuantSpec(bits=4, scale="pow2")) == "int4/tensor,pow2"


def test_recipe_parses_and_names_scale():
    r = parse_recipe(
        "[quantize.weights]\n"
        '"a" = {kind = "binary", scale = "pow2", granularity = "channel"}\n'
        '"b" = {kind = "ternary", method = "ttq", scale = "pow2"}\n'
    )
    assert r.quantize is not None
    assert r.quantize.kwargs()["weights"] == {
        "a": Binary(scale="pow2", granularity="channel"),
        "b": Ternary(method="ttq", scale="pow2"),
    }
    with pytest.raises(ValueError, match=r"recipe key 'quantize\.weights\.a\.scale'"):
        parse_recipe('[quantize.weights]\n"a" = {kind = "binary", scale = "log2"}\n')


# --------------------------------------------------------------------------- #
# the scales, outputs and thresholds
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("spec", BINARY, ids=repr)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_alpha_and_output(spec, shape, seed):
    w = _w(shape, seed)
    ref_alpha = np_pow2(np_binary_alpha(w, spec))
    x = torch.from_numpy(w)
    alpha = binary_scale(x, spec)
    np.testing.assert_array_equal(alpha.numpy(), ref_alpha)
    # the same as rounding the float-scale spec's alpha
    float_alpha = binary_scale(x, Binary(granularity=spec.granularity, axis=spec.axis)).numpy()
    np.testing.assert_array_equal(alpha.numpy(), np_pow2(float_alpha))
    expected = np.where(w >= 0, 1.0, -1.0) * ref_alpha
    np.testing.assert_array_equal(fake_quantize(x, spec).numpy(), expected)
    np.testing.assert_array_equal(Quantizer(spec)(x).numpy(), expected)
    codes, qp = quantize(x, spec)
    np.testing.assert_array_equal(codes.numpy(), np.where(w >= 0, 1, -1))
    np.testing.assert_array_equal(qp.scale.numpy(), ref_alpha)


@pytest.mark.parametrize("spec", TERNARY, ids=repr)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ternary_threshold_unchanged_levels_pow2(spec, shape, seed):
    w = _w(shape, seed)
    x = torch.from_numpy(w)
    ref_delta, ref_alpha = np_twn(w, spec)
    ref_p = np_pow2(ref_alpha)
    delta, alpha = twn_params(x, spec)
    float_spec = Ternary(spec.threshold, spec.method, spec.granularity, spec.axis)
    float_delta, float_alpha = twn_params(x, float_spec)
    assert torch.equal(delta, float_delta)  # the threshold is TWN's, untouched
    np.testing.assert_allclose(delta.numpy(), ref_delta, rtol=1e-12)
    np.testing.assert_array_equal(alpha.numpy(), ref_p)
    np.testing.assert_array_equal(alpha.numpy(), np_pow2(float_alpha.numpy()))
    ref_codes = np.where(w > ref_delta, 1, np.where(w < -ref_delta, -1, 0))
    codes, qp = quantize(x, spec)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert torch.equal(codes, quantize(x, float_spec)[0])
    np.testing.assert_array_equal(qp.scale.numpy(), ref_p)
    if spec.method == "ttq":
        assert qp.scale_neg is not None
        np.testing.assert_array_equal(qp.scale_neg.numpy(), ref_p)
    np.testing.assert_array_equal(fake_quantize(x, spec).numpy(), ref_codes * ref_p)
    np.testing.assert_array_equal(Quantizer(spec)(x).detach().numpy(), ref_codes * ref_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_narrow_dtypes_keep_exact_powers_of_two(dtype):
    w = torch.from_numpy(_w((8, 16), 3)).to(dtype)
    for spec in (Binary(scale="pow2", granularity="channel"), Ternary(scale="pow2")):
        y = fake_quantize(w, spec)
        assert y.dtype == dtype
        ref = np_pow2(
            np_binary_alpha(w.double().numpy(), spec)
            if isinstance(spec, Binary)
            else twn_params(w, Ternary(granularity=spec.granularity))[1].double().numpy()
        )
        mags = y.abs().double().numpy()
        nz = mags > 0
        alpha = np.broadcast_to(ref, mags.shape)
        # a narrow dtype's mean may sit one ulp away; the level is still a power of two
        assert np.all(np.frexp(mags[nz])[0] == 0.5)
        assert np.all(
            (mags[nz] == alpha[nz]) | (mags[nz] == 2 * alpha[nz]) | (mags[nz] == alpha[nz] / 2)
        )


def test_all_zero_block_stays_zero():
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[1] = torch.tensor([0.3, -0.2, 0.5, -0.4])
    for spec in (
        Binary(scale="pow2", granularity="channel"),
        Ternary(scale="pow2", granularity="channel"),
    ):
        y = fake_quantize(w, spec)
        assert y[0].tolist() == [0.0] * 4 and y[2].tolist() == [0.0] * 4
        assert torch.equal(Quantizer(spec)(w), y)


def test_huge_alpha_is_capped_at_the_largest_power_of_two():
    w = torch.full((4,), 3.3e38)  # mean|w| rounds up past float32's range
    y = fake_quantize(w, Binary(scale="pow2"))
    assert y.tolist() == [2.0**127] * 4


@settings(max_examples=100, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(1, 7)),
        elements=st.floats(-1e3, 1e3, allow_nan=False),
    ),
    st.sampled_from(BINARY[:2] + TERNARY[:2]),
)
def test_every_level_is_a_signed_power_of_two(w, spec):
    x = torch.from_numpy(w)
    y = fake_quantize(x, spec).numpy()
    nz = y != 0
    assert np.all(np.frexp(np.abs(y[nz]))[0] == 0.5)
    ref = np.broadcast_to(
        np_pow2(np_binary_alpha(w, spec) if isinstance(spec, Binary) else np_twn(w, spec)[1]),
        w.shape,
    )
    np.testing.assert_array_equal(np.abs(y[nz]), ref[nz])


# --------------------------------------------------------------------------- #
# learnable scales: rounded in the forward pass, straight-through gradient
# --------------------------------------------------------------------------- #


def test_learnable_binary_rounds_forward_and_passes_gradient():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 8))
    g = rng.standard_normal((3, 8))
    q = Quantizer(Binary(learnable=True, scale="pow2", granularity="channel"))
    x = torch.tensor(w)
    q(x)  # initialises the scale from the data: already a power of two
    np.testing.assert_array_equal(q.scale.detach().numpy(), np_pow2(np_binary_alpha(w, q.spec)))
    with torch.no_grad():
        q.scale.copy_(torch.tensor([[0.3], [0.36], [-1.6]], dtype=torch.float64))
    y = q(x)
    sign = np.where(w >= 0, 1.0, -1.0)
    levels = np.array([[0.25], [0.5], [2.0]])  # 2**round(log2 |p|)
    np.testing.assert_array_equal(y.detach().numpy(), sign * levels)
    y.backward(torch.tensor(g))
    grad = q.scale.grad
    assert grad is not None
    # straight through the rounding (and through |p| for the negative one)
    expected = (g * sign).sum(axis=1, keepdims=True) * np.array([[1.0], [1.0], [-1.0]])
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12)
    assert torch.equal(q.qparams().scale, torch.tensor(levels))


def test_ttq_rounds_both_scales_and_passes_gradients():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 10))
    g = rng.standard_normal((2, 10))
    q = Quantizer(Ternary(method="ttq", scale="pow2", granularity="channel"))
    x = torch.tensor(w)
    q(x)
    _, ref_alpha = np_twn(w, q.spec)
    np.testing.assert_array_equal(q.scale.detach().numpy(), np_pow2(ref_alpha))
    np.testing.assert_array_equal(q.scale_neg.detach().numpy(), np_pow2(ref_alpha))
    with torch.no_grad():
        q.scale.copy_(torch.tensor([[0.3], [3.1]], dtype=torch.float64))
        q.scale_neg.copy_(torch.tensor([[0.7], [0.09]], dtype=torch.float64))
    y = q(x)
    delta, _ = np_twn(w, q.spec)
    pos, neg = w > delta, w < -delta
    ap, an = np.array([[0.25], [4.0]]), np.array([[0.5], [0.125]])  # log2 0.09 = -3.47
    np.testing.assert_array_equal(y.detach().numpy(), pos * ap - neg * an)
    y.backward(torch.tensor(g))
    assert q.scale.grad is not None and q.scale_neg.grad is not None
    np.testing.assert_allclose(q.scale.grad.numpy(), (g * pos).sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(
        q.scale_neg.grad.numpy(), -(g * neg).sum(1, keepdims=True), rtol=1e-12
    )


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _data(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(
    "spec",
    [
        Binary(learnable=True, scale="pow2", granularity="channel"),
        Ternary(method="ttq", scale="pow2", granularity="channel"),
    ],
    ids=repr,
)
def test_training_steps_reduce_a_distillation_loss(spec):
    teacher = MLP().eval()
    model = MLP()
    tnquant.quantize(model, weights=spec, progress=False)
    data = _data(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_of() -> torch.Tensor:
        with torch.no_grad():
            targets = [teacher(x) for x in data]
        return sum(
            (torch.nn.functional.mse_loss(model(x), t) for x, t in zip(data, targets, strict=True)),
            torch.zeros(()),
        )

    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_of()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        for name, p in model.named_parameters():
            if "quantizer" in name:
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
                assert bool((p.grad != 0).any()), name
        opt.step()
    with torch.no_grad():
        assert float(loss_of()) < first
    for name, p in model.named_parameters():
        assert bool(torch.isfinite(p).all()), name


# --------------------------------------------------------------------------- #
# quantize -> calibrate -> convert -> save -> load
# --------------------------------------------------------------------------- #

ROUND_TRIP = [
    Binary(scale="pow2"),
    Binary(scale="pow2", granularity="channel"),
    Binary(scale="pow2", granularity="channel", learnable=True),
    Ternary(scale="pow2"),
    Ternary(scale="pow2", granularity="channel", axis=1),
    Ternary(scale="pow2", method="ttq", granularity="channel"),
]


def _fake_quant_model(spec: Any) -> nn.Module:
    model = MLP()
    tnquant.quantize(model, weights=spec, progress=False)
    tnquant.calibrate(model, _data(2), progress=False)
    if spec.learnable:  # move the learned scales off the powers of two
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "quantizer" in name:
                    p.mul_(1.3)
    return model.eval()


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=repr)
def test_convert_save_load_are_exact(spec, tmp_path):
    model = _fake_quant_model(spec)
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        fake = model(x)
        fake_weights = {
            n: m.weight_quantizer(m.weight) for n, m in model.named_modules() if n in ("fc1", "fc2")
        }
    tnquant.convert(model, progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), fake)
    for n in ("fc1", "fc2"):
        frozen = getattr(model, n).weight_quantizer
        assert isinstance(frozen, FrozenTensor) and frozen.spec == spec
        assert torch.equal(frozen(), fake_weights[n])  # bit-identical weights
        for s in (frozen.scale, getattr(frozen, "scale_neg", frozen.scale)):
            assert bool((torch.frexp(s)[0] == 0.5).all())
    tnquant.save(model, tmp_path / "m")
    loaded = tnquant.load(tmp_path / "m", model=MLP()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)
    assert loaded.fc1.weight_quantizer.spec == spec


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=repr)
def test_fake_quant_save_load_is_exact(spec, tmp_path):
    model = _fake_quant_model(spec)
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        fake = model(x)
    tnquant.save(model, tmp_path / "m")
    loaded = tnquant.load(tmp_path / "m", model=MLP()).eval()
    assert loaded.fc1.weight_quantizer.spec == spec
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)


# forging model.json: the checksum rule of save, re-implemented here
def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _edit_specs(directory: Path, edit: Any) -> int:
    """Apply ``edit(spec_dict)`` to every Binary/Ternary spec of model.json; how many."""
    meta = json.loads((directory / JSON_FILE).read_text())
    meta.pop("checksum")
    count = 0

    def walk(node: Any) -> None:
        nonlocal count
        if isinstance(node, dict):
            if node.get("type") in ("Binary", "Ternary"):
                edit(node)
                count += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(meta)
    meta["checksum"] = hashlib.sha256(_canonical(meta)).hexdigest()
    (directory / JSON_FILE).write_bytes(_canonical(meta))
    return count


@pytest.mark.parametrize("convert", [False, True])
@pytest.mark.parametrize("spec", [Binary(granularity="channel"), Ternary(method="ttq")], ids=repr)
def test_old_files_without_the_field_load_as_float(spec, convert, tmp_path):
    model = _fake_quant_model(spec)
    if convert:
        tnquant.convert(model, progress=False)
    x = _data(1, seed=3)[0]
    with torch.no_grad():
        expected = model(x)
    tnquant.save(model, tmp_path / "m")
    assert _edit_specs(tmp_path / "m", lambda d: d.pop("scale")) >= 2  # as before the field
    loaded = tnquant.load(tmp_path / "m", model=MLP()).eval()
    assert loaded.fc1.weight_quantizer.spec == spec and spec.scale == "float"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("convert", [False, True])
@pytest.mark.parametrize("bad", ["pow3", 2, None])
def test_bad_scale_in_a_file_is_refused_naming_the_field(bad, convert, tmp_path):
    model = _fake_quant_model(Binary(scale="pow2"))
    if convert:
        tnquant.convert(model, progress=False)
    tnquant.save(model, tmp_path / "m")
    assert _edit_specs(tmp_path / "m", lambda d: d.update(scale=bad)) >= 2
    with pytest.raises(ValueError, match="scale must be"):
        tnquant.load(tmp_path / "m", model=MLP())
