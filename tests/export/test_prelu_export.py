"""nn.PReLU through the export: one alpha, or one per feature / per channel of a map.

References: the torch model (its slopes snapped by ``fixed_point`` to the exported alphas),
hls4ml's C simulation (its ``PReLU`` activation with ``param_t`` set to alpha's type), and
the C++ project compiled with g++. 300 inputs, 20 of them far outside the input range.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.cproject import run_project, write_project
from tnquant.export.elementwise import alpha_codes

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
WEIGHTS = QuantSpec(6, scale="pow2", granularity="channel")
GPP = shutil.which("g++") is not None


def _inputs(n: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(300, n)) * 2.5
    x[:20] *= 10
    return x


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 8), nn.PReLU(), nn.Linear(8, 4)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-0.7, 0.9, 16))  # signs and magnitudes vary
        model[3].weight.fill_(0.3)  # off the grid: snapped to 16 fractional bits
    narrow = FixedPoint(14, 6, rounding="RND", overflow="SAT")  # 0.3 takes 17 bits of alpha
    acts = {"2.input": narrow, "4.input": narrow}
    quantize(model.double().eval(), weights=WEIGHTS, activations=acts, progress=False)
    return model


def _torch(model: nn.Module, em: IntegerModel, x: np.ndarray, shape=None) -> np.ndarray:
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac)
    t = torch.from_numpy(xq)
    with torch.no_grad():
        return model(t if shape is None else t.reshape(-1, *shape)).numpy()


def test_alpha_codes_by_hand() -> None:
    m, t = alpha_codes([0.75, -0.5, 2.0], "w")
    assert m.tolist() == [3, -2, 8] and str(t) == "ap_fixed<5,3>"  # 0.75 needs 2 frac bits


def test_prelu_is_bit_exact_with_torch_and_loads_back(tmp_path: Path) -> None:
    model = _mlp()
    before = model[3].weight.detach().clone()
    em = fixed_point(model, tmp_path, IN_T)
    ops = [op for op in em.ops if op.kind == "leaky_relu"]
    assert [op.weights[0].shape for op in ops] == [(16,), (1,)]
    assert float(model[3].weight) != float(before) and abs(float(model[3].weight) - 0.3) < 2**-16
    x = _inputs()
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).predict(x), em.predict(x))


def test_prelu_per_channel_on_a_feature_map(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.PReLU(3), nn.Flatten(), nn.Linear(48, 2)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.25, -0.5, 0.125]))
    quantize(model.double().eval(), weights=WEIGHTS, progress=False)
    em = fixed_point(model, tmp_path, IN_T, input_shape=(1, 4, 4))
    assert em.ops[1].weights[0].shape == (48,)
    x = _inputs(16)
    np.testing.assert_array_equal(_torch(model, em, x, (1, 4, 4)), em.predict(x))


def test_a_too_wide_prelu_result_names_the_op_and_the_fix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.PReLU(), nn.Linear(16, 8), nn.PReLU(), nn.Linear(8, 2)
    )
    with torch.no_grad():
        model[1].weight.fill_(0.3)
        model[3].weight.fill_(0.3)
    quantize(model.double(), weights=WEIGHTS, progress=False)
    with pytest.raises(ValueError, match=r"op '3': its result needs \d+ bits .*result=\{'3'"):
        fixed_point(model, tmp_path, IN_T)


def test_a_prelu_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(4), nn.Linear(16, 2))
    quantize(model.double(), weights=WEIGHTS, progress=False)
    with pytest.raises(ValueError, match=r"^1: PReLU has 4 slopes, but 16 features reach it"):
        fixed_point(model, tmp_path, IN_T)


@pytest.mark.skipif(not GPP, reason="needs g++")
def test_hls4ml_and_the_c_project_are_bit_exact_for_prelu(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _mlp()
    em = fixed_point(model, tmp_path / "files", IN_T)
    x = _inputs()
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T)
    hls_model.compile()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    got = run_project(write_project(em, tmp_path / "cpp", x), x)
    np.testing.assert_array_equal(got, em.predict(x))
