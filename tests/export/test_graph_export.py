"""Graphs through the export: residual adds and concatenations traced with ``torch.fx``.

References, none of them the emulator's own code: the torch model itself (float64, its
biases and slopes snapped by ``fixed_point``), exact rationals for the merge casts
(``tests/export/refs.py``), and hls4ml's C simulation of the same graph (its ``Merge`` and
``Concatenate`` layers), io_parallel and io_stream. 300 inputs, 20 of them far outside
the input range.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.export.refs import ref_cast, value
from tnquant import FixedPoint, QuantSpec, quantize
from tnquant.export import IntegerModel, fixed_point, to_hls4ml
from tnquant.export.cproject import write_project
from tnquant.export.graph import build_graph
from tnquant.export.ir import INPUT, Op
from tnquant.export.merge_ops import merge_op, merge_result, run_merge
from tnquant.export.qonnx import qonnx
from tnquant.io import IntegrityError

IN_T = FixedPoint(10, 3, rounding="RND", overflow="SAT")
WEIGHTS = QuantSpec(6, scale="pow2", granularity="channel")
GPP = shutil.which("g++") is not None


def _fp(w: int, i: int) -> FixedPoint:
    return FixedPoint(w, i, rounding="RND", overflow="SAT")


def _inputs(n_in: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(300, n_in)) * 2.5
    x[:20] *= 10
    return x


class Block(nn.Module):
    """``x + fc2(act(fc1(x)))``."""

    def __init__(self, n: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(n, n), act, nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) + x


class ResidualMLP(nn.Module):
    """A residual block, a LeakyReLU, two heads concatenated, an optional final activation."""

    def __init__(self, act: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = Block(16, act)
        self.leaky = nn.LeakyReLU(0.125)
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)
        self.out = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        h = self.leaky(self.block(torch.relu(self.inp(x))))
        return self.out(torch.cat((self.a(h), self.b(h)), dim=1))


def _model(act: nn.Module, head: nn.Module, acts: dict[str, Any] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = ResidualMLP(act, head).double().eval()
    with torch.no_grad():
        model.inp.weight.mul_(4)
    quantize(model, weights=WEIGHTS, activations=acts, progress=False)
    return model


def _torch(model: nn.Module, em: IntegerModel, x: np.ndarray) -> np.ndarray:
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -em.ops[0].input_type.frac)
    with torch.no_grad():
        return model(torch.from_numpy(xq)).numpy()


TABLE_ACTS = {"block.act.input": _fp(12, 4), "out.input": _fp(12, 4), "block.fc2.input": _fp(10, 2)}


# --------------------------------------------------------------------------- #
# the merge arithmetic, by hand
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("a", "b", "add", "cat"),
    [
        (FixedPoint(8, 3), FixedPoint(8, 3), "ap_fixed<9,4>", "ap_fixed<8,3>"),
        (FixedPoint(8, 3), FixedPoint(6, 4, signed=False), "ap_fixed<11,6>", "ap_fixed<10,5>"),
        (FixedPoint(4, 4, signed=False), FixedPoint(6, 2, signed=False),
         "ap_ufixed<9,5>", "ap_ufixed<8,4>"),
        (FixedPoint(5, -1), FixedPoint(3, 3), "ap_fixed<10,4>", "ap_fixed<9,3>"),
    ],
)  # fmt: skip
def test_merge_result_types_by_hand(a: FixedPoint, b: FixedPoint, add: str, cat: str) -> None:
    assert (str(merge_result("add", [a, b])), str(merge_result("concat", [a, b]))) == (add, cat)


@pytest.mark.parametrize("result", [None, _fp(6, 2), FixedPoint(5, 1, rounding="TRN_ZERO")])
def test_run_merge_equals_exact_rationals(result: FixedPoint | None) -> None:
    ta, tb = FixedPoint(8, 3), FixedPoint(6, 4, signed=False)
    rng = np.random.default_rng(1)
    xa = rng.integers(ta.qmin, ta.qmax + 1, size=(50, 3))
    xb = rng.integers(tb.qmin, tb.qmax + 1, size=(50, 3))
    ins = [("a", ta, 3, ()), ("b", tb, 3, ())]
    add = merge_op("s", "add", ins, {"result": result})
    cat = merge_op("c", "concat", ins, {"result": result})
    got_add, got_cat = run_merge(add, [xa, xb]), run_merge(cat, [xa, xb])
    r_add, r_cat = add.result_type, cat.result_type
    for i in range(50):
        for j in range(3):
            va, vb = value(xa[i, j], ta), value(xb[i, j], tb)
            assert got_add[i, j] == ref_cast(va + vb, r_add)
            assert got_cat[i, j] == ref_cast(va, r_cat)
            assert got_cat[i, 3 + j] == ref_cast(vb, r_cat)
    if result is None:  # lossless: every sum kept exactly
        assert all(
            Fraction(int(got_add[i, j])) / 2**r_add.frac
            == value(xa[i, j], ta) + value(xb[i, j], tb)
            for i in range(50)
            for j in range(3)
        )


# --------------------------------------------------------------------------- #
# the torch model == the emulator == the loaded export
# --------------------------------------------------------------------------- #


def test_a_residual_graph_is_bit_exact_with_torch_and_loads_back(tmp_path: Path) -> None:
    model = _model(nn.ReLU(), nn.Identity())
    em = fixed_point(model, tmp_path, IN_T)
    assert [(op.name, op.kind, op.inputs) for op in em.ops] == [
        ("inp", "dense", ()),
        ("relu", "relu", ()),
        ("block.fc1", "dense", ()),
        ("block.act", "relu", ()),
        ("block.fc2", "dense", ()),
        ("block.add", "add", ("block.fc2", "relu")),
        ("leaky", "leaky_relu", ()),
        ("a", "dense", ()),
        ("b", "dense", ("leaky",)),
        ("cat", "concat", ("a", "b")),
    ]
    x = _inputs()
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))
    loaded = IntegerModel.load(tmp_path)
    np.testing.assert_array_equal(loaded.run(em.quantize_input(x)), em.run(em.quantize_input(x)))
    stats = em.trace(em.quantize_input(x))
    assert stats[5][1]["result"] == 300 * 16 and stats[5][1]["result_overflow"] == 0


def test_a_narrowed_add_result_casts_in_the_emulator_and_the_manifest_keeps_it(
    tmp_path: Path,
) -> None:
    model = _model(nn.ReLU(), nn.Identity())
    narrow = _fp(8, 3)
    em = fixed_point(model, tmp_path, IN_T, result={"block.add": narrow})
    add = next(op for op in em.ops if op.kind == "add")
    assert add.result_type == narrow and add.result_derived == [False]
    x = _inputs()
    out = em.trace(em.quantize_input(x))
    assert out[5][1]["result_overflow"] > 0  # the x10 inputs saturate the narrowed sum
    assert IntegerModel.load(tmp_path).ops[5].result_type == narrow


def test_an_input_read_twice_needs_no_input_shape(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x) + x)

    torch.manual_seed(0)
    model = Twice().double()
    quantize(model, weights=WEIGHTS, progress=False)
    em = fixed_point(model, tmp_path, IN_T)
    assert em.ops[1].inputs == ("fc", INPUT) and em.ops[1].merge_types == [
        em.ops[0].result_type,
        IN_T,
    ]
    x = _inputs()
    np.testing.assert_array_equal(_torch(model, em, x), em.predict(x))


# --------------------------------------------------------------------------- #
# refusals, by qualified name
# --------------------------------------------------------------------------- #


class _Sin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.fc(x))


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Dynamic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Outer(), r"^inner: function torch\.sin \(fx node 'sin'\) has no fixed-point export"),
        (_Dynamic(), r"^\(the model\): _Dynamic is not an nn\.Sequential and torch\.fx cannot"),
        (_Reused(), r"^fc: is called twice in the forward"),
    ],
)
def test_unexportable_graphs_are_refused_by_qualified_name(model: nn.Module, message: str) -> None:
    quantize(model, weights=WEIGHTS, progress=False)
    with pytest.raises(ValueError, match=message):
        build_graph(model, IN_T)


def test_the_c_project_and_qonnx_refuse_a_graph_by_name(tmp_path: Path) -> None:
    model = _model(nn.ReLU(), nn.Identity())
    em = IntegerModel(build_graph(model, IN_T))
    with pytest.raises(ValueError, match=r"op 'block\.add' \(add\) reads .*to_hls4ml takes"):
        write_project(em, tmp_path / "cpp")
    with pytest.raises(ValueError, match=r"op 'block\.add' \(add\) reads .*no QONNX form"):
        qonnx(model, tmp_path / "m.onnx", IN_T)


# --------------------------------------------------------------------------- #
# a forged manifest
# --------------------------------------------------------------------------- #


def _forge(tmp_path: Path, edit: Any) -> Path:
    model = _model(nn.ReLU(), nn.Identity())
    d = tmp_path / "x"
    fixed_point(model, d, IN_T)
    man = json.loads((d / "manifest.json").read_text())
    edit(man)
    man.pop("checksum", None)  # a forger recomputes the unkeyed self-checksum
    man["checksum"] = hashlib.sha256(_canonical(man)).hexdigest()
    (d / "manifest.json").write_bytes(_canonical(man))
    return d


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m['ops'][5].update(inputs=["block.fc2", "cat"]), r"ops\[5\]\.inputs"),
        (lambda m: m["ops"][5].update(inputs=["block.fc2"]), r"ops\[5\]\.inputs must be a list"),
        (lambda m: m['ops'][5].pop("merge_types"), r"needs \['merge_types'\]"),
        (lambda m: m['ops'][5].update(result_type="ap_fixed<40,18>",
                                   step_types=["ap_fixed<40,18>"]), r"derived from the merge"),
        (lambda m: m['ops'][8].pop("inputs"), r"ops\[8\]\.input_type/in_features"),
        (lambda m: (m["ops"][9].update(out_features=9), m.update(out_features=9)),
         r"op 'cat' \(concat\) gives 9 features"),
    ],
)  # fmt: skip
def test_a_forged_graph_manifest_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    d = _forge(tmp_path, edit)
    with pytest.raises(IntegrityError, match=message):
        IntegerModel.load(d)


def test_check_graph_refuses_an_op_that_reads_a_later_op() -> None:
    t = FixedPoint(8, 3)
    ops = [Op("a", "relu", "a", 4, 4, t, t, inputs=("b",)), Op("b", "relu", "b", 4, 4, t, t)]
    with pytest.raises(ValueError, match=r"op 'a' reads 'b', which is not an op before it"):
        IntegerModel(ops)


# --------------------------------------------------------------------------- #
# hls4ml's C simulation of the same graph
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not GPP, reason="needs g++")
@pytest.mark.parametrize("io_type", ["io_parallel", "io_stream"])
def test_hls4ml_c_simulation_of_a_residual_graph_is_bit_exact(io_type: str, tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _model(nn.Tanh(), nn.Sigmoid(), TABLE_ACTS)
    em = fixed_point(model, tmp_path / "files", IN_T)
    assert {op.kind for op in em.ops} >= {"add", "concat", "tanh", "sigmoid", "leaky_relu"}
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, io_type=io_type)
    hls_model.compile()
    x = _inputs()
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x))).reshape(len(x), -1)
    np.testing.assert_array_equal(got, em.predict(x))
    classes = [layer.class_name for layer in hls_model.get_layers()]
    assert "Concatenate" in classes and any(c in ("Merge", "Add") for c in classes)


class ResidualCNN(nn.Module):
    """conv, ReLU, conv + skip, ReLU, max pool, flatten, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.r1(self.c1(x))
        h = torch.relu(self.c2(h) + h)
        return self.fc(torch.flatten(self.pool(h), 1))


def _cnn(acts: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = ResidualCNN().double().eval()
    quantize(model, weights=WEIGHTS, activations=acts, progress=False)
    return model


CNN_ACTS = {"c1.output": _fp(12, 5), "c2.output": _fp(12, 5)}


def test_a_residual_cnn_is_bit_exact_with_torch(tmp_path: Path) -> None:
    model = _cnn(CNN_ACTS)
    em = fixed_point(model, tmp_path, IN_T, input_shape=(1, 8, 8))
    assert [(op.kind, op.inputs) for op in em.ops] == [
        ("conv2d", ()),
        ("relu", ()),
        ("conv2d", ()),
        ("add", ("c2", "r1")),
        ("relu", ()),
        ("maxpool2d", ()),
        ("dense", ()),
    ]
    x = _inputs(64)
    xq = np.ldexp(em.quantize_input(x).astype(np.float64), -IN_T.frac)
    with torch.no_grad():
        want = model(torch.from_numpy(xq).reshape(-1, 1, 8, 8)).numpy()
    np.testing.assert_array_equal(want, em.predict(x))
    np.testing.assert_array_equal(IntegerModel.load(tmp_path).predict(x), em.predict(x))


def test_an_input_quantizer_on_a_tensor_several_ops_read_is_refused() -> None:
    model = _cnn({"c2.input": _fp(12, 5)})  # c2 would read r1 cast, the skip uncast
    with pytest.raises(ValueError, match=r"^c2: its 'input' quantizer casts the result of op 'r1'"):
        build_graph(model, IN_T, input_shape=(1, 8, 8))


@pytest.mark.skipif(not GPP, reason="needs g++")
def test_hls4ml_c_simulation_of_a_residual_cnn_is_bit_exact(tmp_path: Path) -> None:
    pytest.importorskip("hls4ml")
    model = _cnn(CNN_ACTS)
    em = fixed_point(model, tmp_path / "files", IN_T, input_shape=(1, 8, 8))
    hls_model = to_hls4ml(model, tmp_path / "hls", IN_T, io_type="io_stream", input_shape=(1, 8, 8))
    hls_model.compile()
    x = _inputs(64)
    got = np.asarray(hls_model.predict(np.ascontiguousarray(x.reshape(-1, 1, 8, 8))))
    np.testing.assert_array_equal(got.reshape(len(x), -1), em.predict(x))
