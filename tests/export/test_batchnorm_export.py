"""A BatchNorm that is not folded exports as hls4ml's BatchNormalization, bit-exact.

References: the torch model itself (its BatchNorm set by ``fixed_point`` to the exported
scale and shift, running statistics 0 / 1 - eps), hand-computed mantissas, and hls4ml's C
simulation of the same network (its ``normalize`` with ``scale_t``/``bias_t``). 300 inputs,
20 of them far outside the input range.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.batchnorm_ops import BN_EPS
from tnquant.export.graph import build_graph
from tnquant.io import IntegrityError

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
WEIGHTS = QuantSpec(6, scale="pow2", granularity="channel")
GPP = shutil.which("g++") is not None


def _inputs(n: int) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(300, n)) * 2.5
    x[:20] *= 10
    return x


def _stats(bn: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _mlp() -> nn.Module:
    """BatchNorm after the ReLU: it cannot fold into the Linear before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))
    _stats(model[2], 1)
    acts = {"3.input": FixedPoint(14, 6, rounding="RND", overflow="SAT")}
    quantize(model.double().eval(), weights=WEIGHTS, activations=acts, progress=False)
    return model


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(3), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12, 2),
    )  # fmt: skip
    _stats(model[2], 2)
    acts = {"5.input": FixedPoint(14, 6, rounding="RND", overflow="SAT")}
    quantize(model.double().eval(), weights=WEIGHTS, activations=acts, progress=False)
    return model


def _torch(model: nn.Module, em: IntegerModel, x: np.ndarray, shape=None) -> np.ndarray:
    xq = torch.from_numpy(np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac))
    with torch.no_grad():
        return model(xq if shape is None else xq.reshape(-1, *shape)).numpy()


def test_the_scale_and_shift_by_hand() -> None:
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.75, -3.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
        bn.running_var.fill_(1.0 - bn.eps)  # scale = weight (up to rounding of 1 - eps + eps)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), bn)
    quantize(model.double(), weights=WEIGHTS, progress=False)
    op = build_graph(model, IN_T)[2]
    assert op.kind == "batchnorm" and str(op.weight_types[0]) == "ap_fixed<5,3>"
    assert op.weights[0].tolist() == [3, -12]  # 0.75 and -3.0 on 2 fractional bits
    frac = op.input_type.frac + 2
    assert op.bias_type.frac == frac
    assert op.bias.tolist() == [round(0.1 * 2**frac), 3 * 2**frac]  # shift = bias - mean*scale


def test_an_unfolded_batchnorm_is_bit_exact_with_torch_and_loads_back(tmp_path: Path) -> None:
    model = _mlp()
    em = fixed_point(model, tmp_path, IN_T)
    assert [op.kind for op in em.ops] == ["dense", "relu", "batchnorm", "dense"]
    bn = model[2]
    assert float(bn.running_var[0]) == 1 - BN_EPS and bn.eps == BN_EPS
    assert not bn.running_mean.any()
    x = _inputs(8)
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).predict(x), em.predict(x))


def test_batchnorm2d_on_a_feature_map(tmp_path: Path) -> None:
    model = _cnn()
    em = fixed_point(model, tmp_path, IN_T, input_shape=(1, 4, 4))
    assert em.ops[2].kind == "batchnorm" and em.ops[2].weights[0].shape == (48,)
    x = _inputs(16)
    np.testing.assert_array_equal(_torch(model, em, x, (1, 4, 4)), em.predict(x))


def test_a_failed_export_leaves_the_batchnorm_as_it_was(tmp_path: Path) -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model[2].state_dict().items()}
    with pytest.raises((ValueError, RuntimeError)):  # the drift sample has 3 features, not 8
        fixed_point(model, tmp_path, IN_T, sample=np.zeros((2, 3)))
    after = model[2].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model[2].eps == 1e-5


def test_a_forged_batchnorm_scale_type_is_refused(tmp_path: Path) -> None:
    import hashlib

    fixed_point(_mlp(), tmp_path, IN_T)
    man = json.loads((tmp_path / "manifest.json").read_text())
    t = man["ops"][2]["weight_types"][0]  # wider than its scales derive: refused
    w, i = (int(v) for v in t[t.index("<") + 1 : t.index(">")].split(","))
    man["ops"][2]["weight_types"][0] = f"ap_fixed<{w + 4},{i + 4}>"
    man.pop("checksum")
    canon = lambda o: (json.dumps(o, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()  # noqa: E731
    man["checksum"] = hashlib.sha256(canon(man)).hexdigest()
    (tmp_path / "manifest.json").write_bytes(canon(man))
    with pytest.raises(
        IntegrityError, match=r"ops\[2\]\.(weight_types\[0\]|bias_type|result_type)"
    ):
        IntegerModel.load(tmp_path)


@pytest.mark.skipif(not GPP, reason="needs g++")
@pytest.mark.parametrize(("case", "io_type"), [("mlp", "io_parallel"), ("cnn", "io_stream")])
def test_hls4ml_batchnormalization_is_bit_exact(case: str, io_type: str, tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model, shape = (_mlp(), None) if case == "mlp" else (_cnn(), (1, 4, 4))
    em = fixed_point(model, tmp_path / "files", IN_T, input_shape=shape)
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, io_type=io_type, input_shape=shape)
    hls_model.compile()
    x = _inputs(8 if shape is None else 16)
    xin = x if shape is None else x.reshape(-1, *shape)
    got = np.asarray(hls_model.predict(np.ascontiguousarray(xin))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    assert any(layer.class_name == "BatchNormalization" for layer in hls_model.get_layers())
