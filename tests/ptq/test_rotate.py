"""Hadamard rotations: scipy's Hadamard matrices as the reference, the float function kept."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from scipy.linalg import block_diag
from scipy.linalg import hadamard as scipy_hadamard
from torch import nn

import tnquant
from tnquant import LowRank, QuantSpec, factorize, quantize, size_report
from tnquant.ptq import HadamardRotation, RotatedLinear, calibrate, gptq, rotate
from tnquant.ptq.rotate import hadamard, rotation_block


def reference_matrix(signs: np.ndarray, block: int) -> np.ndarray:
    """diag(signs) @ blockdiag(H_b / sqrt(b), ...) from scipy's Sylvester matrices."""
    h = scipy_hadamard(block) / np.sqrt(block)
    return np.diag(signs) @ block_diag(*[h] * (len(signs) // block))


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_matches_scipy(n):
    np.testing.assert_allclose(
        hadamard(n, torch.float64).numpy(), scipy_hadamard(n) / np.sqrt(n), atol=1e-15
    )


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


@pytest.mark.parametrize(
    ("features", "block", "expected"),
    [
        (384, 128, 128),
        (1536, 128, 128),
        (1536, 1024, 512),
        (96, 128, 32),
        (10, 128, 2),
        (7, 128, 1),
        (256, 64, 64),
    ],
)
def test_rotation_block(features, block, expected):
    assert rotation_block(features, block) == expected


@pytest.mark.parametrize(("features", "block"), [(384, 128), (24, 128), (16, 4), (5, 128)])
def test_rotation_is_the_reference_matrix(features, block):
    rot = HadamardRotation(features, block, seed=7)
    signs = rot.signs.numpy()
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    ref = reference_matrix(signs, rot.block)
    np.testing.assert_allclose(rot.matrix().double().numpy(), ref, atol=1e-6)
    x = torch.randn(3, 2, features, dtype=torch.float64)
    np.testing.assert_allclose(rot(x).numpy(), x.numpy() @ ref, atol=1e-12)
    r = rot.matrix().double()
    torch.testing.assert_close(r @ r.T, torch.eye(features, dtype=torch.float64), atol=1e-6, rtol=0)


def test_signs_depend_on_the_seed_and_come_back_on_load():
    a, b = HadamardRotation(64, seed=1), HadamardRotation(64, seed=2)
    assert not torch.equal(a.signs, b.signs)
    assert list(a.state_dict()) == ["seed"]  # the seed is stored, not the signs
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.signs, b.signs) and int(b.seed) == 1


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)
    )


def test_rotate_keeps_the_function_linear_and_lowrank():
    model = mlp()
    factorize(model, {"2": LowRank(rank=8)}, progress=False)
    x = torch.randn(20, 48)
    before = model(x)
    report = rotate(model, progress=False)
    assert [r["name"] for r in report.rows] == ["0", "2", "4"]
    assert [r["layer"] for r in report.rows] == ["Linear", "LowRankLinear", "Linear"]
    assert [r["block"] for r in report.rows] == [16, 64, 32]
    assert [r["seed"] for r in report.rows] == [0, 1, 2]
    assert all(isinstance(model[i], RotatedLinear) for i in (0, 2, 4))
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    # the LowRank layer's V core absorbed R: U (V R) (R^T x)
    assert model[2].in_features == 64 and model[2].out_features == 32


def test_rotate_patterns_and_skips():
    model = mlp()
    report = rotate(model, include=["0", "4"], exclude=["4"], progress=False)
    assert [r["name"] for r in report.rows] == ["0"]
    assert isinstance(model[2], nn.Linear) and isinstance(model[4], nn.Linear)
    again = rotate(model, include=["0", "2"], progress=False)
    assert [r["name"] for r in again.rows] == ["2"]
    assert ("0", "RotatedLinear", "rotated already") in [
        (s["name"], s["kind"], s["reason"]) for s in again.skipped
    ]
    q = mlp()
    quantize(q, weights=QuantSpec(bits=4), include=["0"], progress=False)
    skipped = rotate(q, progress=False).skipped
    assert [(s["name"], s["reason"]) for s in skipped] == [
        ("0", "it is quantized already: rotate before quantize")
    ]
    with pytest.raises(TypeError, match="rotate before quantize"):
        RotatedLinear.from_linear(q[0])
    mha = nn.Sequential(nn.MultiheadAttention(16, 2))
    assert "subclass of nn.Linear" in rotate(mha, progress=False).skipped[0]["reason"]
    with pytest.raises(TypeError, match="nn.Module"):
        rotate("model", progress=False)  # type: ignore[arg-type]


def outlier_weight() -> torch.Tensor:
    """Rows of Gaussian weights with a few large entries (heavy tails, like trained layers)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    w[torch.rand(64, 128, generator=g) < 0.02] *= 12
    return w


def test_rotation_lowers_per_channel_rounding_error_on_outliers():
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))
    errors = []
    for rotated in (False, True):
        layer = nn.Linear(128, 64)
        with torch.no_grad():
            layer.weight.copy_(outlier_weight())
        model = nn.Sequential(layer)
        reference = model(x).detach()
        if rotated:
            rotate(model, progress=False)
        quantize(model, weights=QuantSpec(bits=3, granularity="channel"), progress=False)
        calibrate(model, [x], progress=False)
        with torch.no_grad():
            errors.append(((model(x) - reference).norm() / reference.norm()).item())
    assert errors[1] < 0.6 * errors[0]


def test_quantize_calibrate_gptq_and_size_see_the_inner_layer():
    model = mlp()
    x = torch.randn(256, 48)
    rotate(model, progress=False)
    quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    calibrate(model, [x], progress=False)
    assert type(model[0].layer).__name__ == "QuantLinear"
    report = gptq(model, [x], progress=False)
    assert [r["name"] for r in report.rows] == ["0.layer", "2.layer", "4.layer"]
    assert all(r["error"] <= r["rtn_error"] for r in report.rows)
    rows = {r["name"]: r for r in size_report(model)}
    assert rows["0.rotation"]["size_bits"] == 64  # the seed, an int64
    assert rows["0.layer"]["codes_bits"] == 64 * 48 * 4
    with torch.no_grad():
        fake = model(x)
        tnquant.convert(model, progress=False)  # integer codes; the rotation stays float
        torch.testing.assert_close(model(x), fake, atol=1e-5, rtol=1e-5)


def test_save_then_load_into_a_base_rotated_the_same_way(tmp_path):
    model = mlp()
    rotate(model, seed=5, progress=False)
    quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    x = torch.randn(16, 48)
    calibrate(model, [x], progress=False)
    path = os.path.join(tmp_path, "rotated")
    tnquant.save(model, path)
    base = mlp()
    rotate(base, seed=5, progress=False)
    loaded = tnquant.load(path, base)
    torch.testing.assert_close(loaded(x), model(x))


def test_finetune_trains_through_the_rotation():
    model = mlp()
    teacher = copy.deepcopy(model)
    rotate(model, progress=False)
    quantize(
        model, weights=QuantSpec(bits=3, granularity="channel", learnable=True), progress=False
    )
    data = [torch.randn(32, 48) for _ in range(4)]
    calibrate(model, data, progress=False)
    report = tnquant.finetune(
        model, data, teacher=teacher, loss="mse", epochs=5, lr=1e-3, progress=False
    )
    losses = report.history.loss
    assert losses[-1] < losses[0]
