"""A request that reaches no layer, or cannot apply to one, is reported, never silent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import CP, TT, LowRank, QuantSpec, Tucker, factorize, quantize
from tnquant.cli import main


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.rnn = nn.LSTM(16, 8)
        self.vol = nn.Conv3d(2, 2, 3)
        self.up = nn.ConvTranspose2d(2, 2, 3)
        self.attn = nn.MultiheadAttention(16, 2)


def _rows(report) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in report.skipped}


@pytest.mark.parametrize("verb", ["factorize", "quantize"])
def test_layers_tnquant_cannot_handle_get_a_row_for_a_single_spec(verb):
    model = Mixed()
    if verb == "factorize":
        report = factorize(model, LowRank(rank=2), progress=False)
    else:
        report = quantize(model, weights=QuantSpec(8), progress=False)
    rows = _rows(report)
    assert rows["rnn"].startswith("LSTM is not supported")
    assert rows["vol"].startswith("Conv3d is not supported")
    assert rows["up"].startswith("ConvTranspose2d is not supported")
    assert rows["attn"].startswith("MultiheadAttention is not supported")
    assert "act" not in rows  # no weight: nothing to say
    assert [r["name"] for r in report] == ["fc"]


def test_a_format_that_cannot_apply_is_reported_per_layer_and_per_pattern():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = factorize(model, CP(rank=2), progress=False)
    rows = _rows(report)
    expected = "CP is not supported on Linear (supported: LowRank, TT, Tucker)"
    assert rows["0"] == rows["2"] == expected
    assert rows["factorize['*']"].startswith("CP applies to none of the layers it matched")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_typo_pattern_is_reported():
    model = nn.Sequential(nn.Linear(8, 8))
    report = factorize(model, {"fc_typo": TT(ratio=0.5)}, progress=False)
    assert report.rows == [] and _rows(report) == {"factorize['fc_typo']": "matched nothing"}


def test_a_pattern_naming_a_container_says_how_to_name_its_layers():
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)))
    report = factorize(model, {"0": LowRank(rank=2)}, progress=False)
    assert "'0.*' names the layers inside" in _rows(report)["factorize['0']"]
    assert type(model[0][0]) is nn.Linear


def test_factorize_after_quantize_says_to_factorize_first():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    quantize(model, weights=QuantSpec(4), progress=False)
    for spec in (LowRank(rank=2), {"0": Tucker(rank=2)}):
        reason = _rows(factorize(model, spec, progress=False))["0"]
        assert "factorize first, then quantize" in reason and "QuantLinear" in reason
        assert "not supported on QuantLinear" not in reason


# --- the CLI exits 2 with one line ---------------------------------------------------------


RECIPE = """
[model]
class = "tests.test_cli:TinyNet"
kwargs = {{width = 32}}

[data]
batch_size = 16

[factorize]
{factorize}

[quantize.weights]
"*" = {{bits = 8}}
"""


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    from tests.test_cli import TinyNet

    d = tmp_path_factory.mktemp("loud")
    torch.manual_seed(0)
    torch.save(TinyNet().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32))
    return d


@pytest.mark.parametrize(
    "table, message",
    [
        ('"body.9" = {format = "lowrank", rank = 4}', "factorize['body.9'] matched nothing"),
        ('"*" = {format = "cp", rank = 2}', "CP applies to none of the layers it matched"),
    ],
)
def test_compress_exits_2_for_a_request_that_reaches_no_layer(cli_dir, capsys, table, message):
    (cli_dir / "r.toml").write_text(RECIPE.format(factorize=table))
    args = ["compress", str(cli_dir / "tiny.pt"), "--recipe", str(cli_dir / "r.toml")]
    args += ["--calib", str(cli_dir / "calib.npy"), "--out", str(cli_dir / "out"), "--force"]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tnquant: error: recipe [factorize]:") and err.count("\n") == 1
    assert message in err


def test_rotate_reports_an_include_pattern_that_reached_no_linear():
    from tnquant.ptq.rotate import rotate

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(2, 2, 1))
    report = rotate(model, include=["0", "2", "typo"], progress=False)
    assert [r["name"] for r in report] == ["0"]
    assert _rows(report) == {
        "include['2']": "matched no Linear layer",
        "include['typo']": "matched no Linear layer",
    }
