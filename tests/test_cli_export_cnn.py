"""``tnquant export`` of the whole digits CNN: every layer to fixed point, checked bit for bit.

The CLI runs end to end on ``digits-cnn`` with a tiny training budget (the
shipped recipe's layers, pow2 scales and activation types; 1 epoch), then
the files it wrote are read back on their own: the strict loader's emulator
against the torch fake-quant model rebuilt from the compressed directory.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import QuantSpec, quantize
from tnquant.cli import main
from tnquant.cli.datasets import digits
from tnquant.cli.export_cmd import SATURATING_ROWS, export_piece
from tnquant.cli.inputs import digits_cnn
from tnquant.cli.recipe import ExportSection
from tnquant.export import IntegerModel, build_graph, set_biases
from tnquant.io import load
from tnquant.specs import FixedPoint

FIXED = '{kind = "fixed", type = "ap_fixed<12,5,RND,SAT>"}'
RECIPE = f"""
[model]
train_epochs = 1

[data]
batch_size = 64

[factorize]
"features.2" = {{format = "tucker", ratio = 0.5}}
"classifier.0" = {{format = "lowrank", ratio = 0.25}}

[quantize.cores]
"*" = {{bits = 4, granularity = "channel", axis = 0, scale = "pow2"}}

[quantize.weights]
"*" = {{bits = 8, granularity = "channel", axis = 0, scale = "pow2"}}

[quantize.activations]
"features.0.output" = {FIXED}
"features.2.inter_*" = {FIXED}
"features.2.output" = {FIXED}
"classifier.0.inter_*" = {FIXED}
"classifier.0.output" = {FIXED}
"classifier.2.output" = {{kind = "fixed", type = "ap_fixed<16,6,RND,SAT>"}}

[export]
num_samples = 200  # of the 450 held-out images (the demo checks all 450)
"""
CONVS = {"features.0", "features.2.0", "features.2.1", "features.2.2"}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn")
    (tmp / "r.toml").write_text(RECIPE)
    args = ["compress", "digits-cnn", "--recipe", str(tmp / "r.toml"), "--calib", "digits"]
    assert main([*args, "--out", str(tmp / "d"), "--no-progress"]) == 0
    return tmp / "d"


def test_the_whole_cnn_exports_bit_exact(compressed, tmp_path, capsys):
    out = tmp_path / "fx"
    assert main(["export", str(compressed), "--fixed-point", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fixed-point export of the whole model" in text
    assert f"emulator == fake-quant: 200/200 exact, saturating inputs {SATURATING_ROWS}/" in text
    (row,) = json.loads((out / "check.json").read_text())
    assert row["layer"] == "" and row["check"] == "exact" and row["ok"]
    assert row["rows"] == row["exact"] == 200
    assert row["saturating_exact"] == row["saturating"] == SATURATING_ROWS
    # every convolution (the Tucker-2 one as its three conv ops), the pool and the head
    ops = {op["name"]: op["kind"] for op in json.loads((out / "manifest.json").read_text())["ops"]}
    assert {n for n, k in ops.items() if k == "conv2d"} == CONVS
    assert ops["features.4"] == "maxpool2d" and ops["classifier.2"] == "dense"

    # read back on their own: the strict loader vs the torch model of the compressed dir
    em = IntegerModel.load(out)
    spec = FixedPoint.from_string(em.input_type)
    model = load(compressed, model=digits_cnn()).eval().double()
    set_biases(model, build_graph(model, spec, input_shape=(1, 8, 8)))  # the stored grid
    x = np.load(compressed / "export_inputs" / "model.npy")
    np.testing.assert_array_equal(x, digits()[2][:200].numpy())  # the held-out images
    flat = x.reshape(200, 64).astype(np.float64)
    xq = np.ldexp(em.quantize_input(flat).astype(np.float64), -spec.frac)
    with torch.no_grad():
        ref = model(torch.from_numpy(xq).reshape(-1, 1, 8, 8)).numpy()
    np.testing.assert_array_equal(em.predict(flat), ref)
    assert len(np.unique(ref.argmax(1))) > 1  # not a constant network


class TinyCNN(nn.Sequential):
    """A checkpoint base for the refused case (no training needed)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 5),
        )


BROKEN = """
[model]
class = "tests.test_cli_export_cnn:TinyCNN"

[quantize.weights]
"0" = {bits = 8, granularity = "channel", axis = 0}
"*" = {bits = 8, granularity = "channel", axis = 0, scale = "pow2"}

[quantize.activations]
"0.output" = {kind = "fixed", type = "ap_fixed<12,5,RND,SAT>"}

[export]
input_width = 12
"""


def test_a_float_scale_is_refused_naming_the_layer(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(TinyCNN().state_dict(), tmp_path / "cnn.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32))
    (tmp_path / "r.toml").write_text(BROKEN)
    args = ["compress", str(tmp_path / "cnn.pt"), "--recipe", str(tmp_path / "r.toml")]
    d, out = tmp_path / "d", tmp_path / "fx"
    assert main([*args, "--calib", str(tmp_path / "x.npy"), "--out", str(d), "--no-progress"]) == 0
    assert np.load(d / "export_inputs" / "model.npy").shape == (32, 1, 8, 8)
    capsys.readouterr()
    cls = ["--model-class", "tests.test_cli_export_cnn:TinyCNN"]
    assert main(["export", str(d), "--fixed-point", str(out), *cls]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the whole model does not export to fixed point" in err
    assert "0.weight has scale" in err and "not a power of two" in err
    assert not (out / "manifest.json").exists()


class _Offset(nn.Sequential):
    """A chain whose forward adds 2^-10: the export (which walks the children) cannot see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 2.0**-10


def test_a_mismatch_fails_the_check(tmp_path):
    torch.manual_seed(0)
    model = _Offset(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    quantize(model, weights=QuantSpec(bits=6, scale="pow2"), progress=False)
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    row = export_piece("", model, x, ExportSection(), tmp_path)
    assert (row["exact"], row["saturating_exact"], row["ok"]) == (0, 0, False)
    assert row["max_abs_diff"] == pytest.approx(2.0**-10)
    plain = nn.Sequential(*model)  # the same layers without the offset: exact
    row = export_piece("", plain, x, ExportSection(), tmp_path / "plain")
    assert (row["exact"], row["saturating_exact"], row["ok"]) == (20, SATURATING_ROWS, True)


def test_a_result_override_makes_it_a_tolerance_check(tmp_path):
    """``result=`` rounds where the torch model does not: measured against ``tolerance``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    quantize(model, weights=QuantSpec(bits=6, scale="pow2"), progress=False)
    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    coarse = FixedPoint(12, 6, rounding="RND", overflow="SAT")  # 6 fractional bits
    row = export_piece("", model, x, ExportSection(result=coarse, tolerance=0.1), tmp_path)
    assert row["check"] == "tolerance" and row["saturating"] == 0
    assert row["max_abs_diff"] > 0 and row["exact"] < 20  # the roundings the model lacks
    assert 0 < row["rel_diff"] <= 0.1 and row["ok"]
    strict = ExportSection(result=coarse, tolerance=1e-9)
    assert not export_piece("", model, x, strict, tmp_path / "strict")["ok"]


def test_a_text_model_needs_export_layers_up_front(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('[quantize.weights]\n"*" = {bits = 8}\n[export]\n')
    args = ["compress", "minilm", "--recipe", str(tmp_path / "r.toml"), "--calib", "corpus"]
    assert main([*args, "--out", str(tmp_path / "d")]) == 2  # before MiniLM is loaded
    err = capsys.readouterr().err
    assert "exports the whole model" in err and "export.layers" in err
    assert not (tmp_path / "d").exists()
