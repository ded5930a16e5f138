"""``tnquant compress MODEL --bits B`` / ``--target`` / ``--time``; ``[search]`` and ``[ptq]``.

The end-to-end run is the digits CNN (trained for a few seconds) under 4
bits per weight and a time budget; its written ``recipe.toml`` is rerun and
must give the same plan and sizes without searching. Sizes are checked
against weight counts taken from a fresh, independent ``digits_cnn()``.
"""

from __future__ import annotations

import json

import pytest
import tomllib
import torch
from torch import nn

from tnquant import model_size_bits
from tnquant.cli import main
from tnquant.cli.inputs import digits_cnn
from tnquant.cli.recipe import parse_recipe
from tnquant.cli.recipe_write import recipe_toml
from tnquant.pipeline import PtqSection, Recipe, SearchSection, run_pipeline

BITS = 4.0


def _compress(*args: str) -> int:
    return main(["compress", "digits-cnn", "--calib", "digits", "--no-progress", *args])


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    assert _compress("--bits", str(BITS), "--time", "10s", "--out", str(d / "a")) == 0
    assert _compress("--recipe", str(d / "a" / "recipe.toml"), "--out", str(d / "b")) == 0
    read = lambda name: json.loads((d / name / "report.json").read_text())  # noqa: E731
    return d, read("a"), read("b")


def test_bits_budget_is_met_on_the_searched_layers(budget_run):
    _, report, _ = budget_run
    # every Conv2d / Linear weight of the digits CNN, counted on a fresh model
    weights = sum(
        m.weight.numel() for m in digits_cnn().modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    assert report["search"]["searched_weights"] == weights == 38160
    layers_bits = sum(r["size_bits"] for r in report["layers"])  # rotations included
    assert {r["name"] for r in report["layers"]} == {
        "features.0",
        "features.2",
        "classifier.0",
        "classifier.2",
    }
    assert layers_bits <= BITS * weights
    assert report["search"]["searched_size_bits"] <= layers_bits
    assert report["compare"]["rows"][1]["accuracy"] > 0.5  # chance is 0.1
    assert report["budget"] == "--bits 4 --time 10s"


def test_time_budget_says_what_it_cut(budget_run):
    _, report, _ = budget_run
    notes = " ".join(report["notes"])
    assert "to fit 10s" in notes and "extrapolated" in notes
    # the stages after loading ran in about the budget (generous: a shared 2-core machine)
    spent = sum(v for k, v in report["stages"].items() if k not in ("load", "eval"))
    assert spent < 10 * 3


def test_written_recipe_is_the_plan_and_reruns_the_same(budget_run):
    d, first, again = budget_run
    text = (d / "a" / "recipe.toml").read_text()
    raw = tomllib.loads(text)
    assert "search" not in raw and raw["ptq"]["rotate"] is True
    assert raw["ptq"]["gptq"] in (True, False)  # 'auto' resolved
    planned = set(raw["quantize"]["weights"]) | set(raw.get("factorize", {})) - {"data_aware"}
    assert planned == {
        "features.0",
        "features.2",
        "classifier.0.layer",  # rotated Linear: the inner layer
        "classifier.2.layer",
    }
    keys = ("name", "format", "ranks", "bits", "params_after", "size_bits")
    assert [{k: r[k] for k in keys} for r in first["layers"]] == [
        {k: r[k] for k in keys} for r in again["layers"]
    ]
    assert first["totals"]["model_bits_after"] == again["totals"]["model_bits_after"]
    assert again["search"] is None and "search" not in again["stages"]
    assert (d / "b" / "recipe.toml").read_text() == text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "4", "--target", "cos=0.9"], "not both"),
        (["--target", "cos=1.5"], "--target cos= must be a number in (0, 1], got '1.5'"),
        (["--target", "mse=0.1"], "--target must start with one of"),
        (["--bits", "4", "--time", "5 minutes"], "--time must be a duration like '5m'"),
        (["--bits", "4", "--time", "0s"], "--time must be a positive duration"),
        (["--bits", "0"], "--bits must be a number of bits per weight in (0, 32]"),
        ([], "give --recipe FILE, or --bits B"),
    ],
)
def test_budget_arguments_are_refused_up_front(tmp_path, capsys, args, message):
    assert _compress(*args, "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_recipe_and_bits_together_are_refused(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('[quantize.weights]\n"*" = {bits = 8}\n')
    code = _compress("--recipe", str(tmp_path / "r.toml"), "--bits", "4", "--out", str(tmp_path))
    assert code == 2 and "goes in its [search] table" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# [search] / [ptq] tables
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[search]\nbits = 3\ntarget = 'cos=0.9'", "needs exactly one of 'bits'"),
        ("[search]\nformats = ['dense']", "needs exactly one of 'bits'"),
        ("[search]\nbits = 0", "'search.bits' must be a number in (0, 32], got 0"),
        ("[search]\nbits = 3\nformats = ['dense', 'cp']", "'search.formats[1]' must be one of"),
        ("[search]\nbits = 3\nquantizers = [9]", "'search.quantizers[0]' must be an integer"),
        ("[search]\nbits = 3\nquantizers = []", "'search.quantizers' must be a non-empty list"),
        ("[search]\ntarget = 'cos=2'", "'search.target': target cos= must be a number in (0, 1]"),
        ("[search]\nbits = 3\nmetric = 'kl'", "'search.metric' must be one of"),
        ("[search]\nbits = 3\nbudget = 3", "'search.budget' is not known"),
        ("[search]\nbits = 3\n[factorize]\nfc = {format = 'tt', rank = 2}", "drop [factorize]"),
        ("[search]\nbits = 3\n[ptq]\ngptq = 'yes'", "'ptq.gptq' must be \"auto\", true or false"),
        ("[search]\nbits = 3\n[ptq]\nrotate = 1", "'ptq.rotate' must be true or false, got 1"),
        (
            "[search]\nbits = 3\n[ptq]\nbias_correction = true\n"
            "[calibrate]\nbias_correction = true",
            "the same option",
        ),
        ("[ptq]\nrotate = true", "none of [search], [factorize], [quantize]"),
        ("[search]\nbits = 3\n[finetune]\ndropout = 'off'", "'finetune.dropout' must be true"),
    ],
)
def test_search_and_ptq_tables_are_validated(text, message):
    with pytest.raises(ValueError, match="recipe") as info:
        parse_recipe(text)
    assert message in str(info.value)


def test_written_recipe_parses_back_to_the_same_recipe():
    text = """
[data]
batch_size = 8
[search]
target = "acc=0.95"
formats = ["dense", "lowrank"]
ratios = [0.5]
quantizers = [8, 4, "ternary"]
include = ["classifier.*"]
[ptq]
rotate = true
gptq = "auto"
bias_correction = true
[finetune]
epochs = 2
hidden = ["features", "classifier"]
dropout = false
[export]
layers = "classifier"
accum = "ap_fixed<24,12>"
"""
    recipe = parse_recipe(text)
    assert recipe.calibrate.bias_correction is True and recipe.ptq.gptq == "auto"
    back = parse_recipe(recipe_toml(recipe))
    for name in ("data", "search", "ptq", "calibrate", "finetune", "export", "model"):
        assert getattr(back, name) == getattr(recipe, name), name


# --------------------------------------------------------------------------- #
# the stages in the library: bits, a floor, GPTQ or RTN
# --------------------------------------------------------------------------- #


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 64, generator=g) for _ in range(3)]


def _cos(a: nn.Module, b: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        x = torch.cat(data)
        return torch.nn.functional.cosine_similarity(a(x), b.eval()(x), dim=1).mean().item()


def test_pipeline_target_is_the_smallest_plan_meeting_the_floor():
    model, calib = _mlp(), _calib()
    kw = {"formats": ("dense", "lowrank"), "quantizers": (8, 4, 3, 2), "observer": "minmax"}
    loose = run_pipeline(
        model, Recipe(search=SearchSection(target="cos=0.9", **kw)), calib, progress=False
    )
    tight = run_pipeline(
        model, Recipe(search=SearchSection(target="cos=0.999", **kw)), calib, progress=False
    )
    assert _cos(model, loose.model, calib) >= 0.9 - 1e-3  # converted: the same function
    assert _cos(model, tight.model, calib) >= 0.999 - 1e-4
    assert model_size_bits(loose.model) < model_size_bits(tight.model)
    assert loose.recipe.search is None and loose.recipe.quantize is not None


def test_pipeline_rotate_and_gptq_auto_keep_the_lower_error():
    model, calib = _mlp(), _calib()
    recipe = Recipe(
        search=SearchSection(bits=3.0, formats=("dense",), quantizers=(4, 3, 2)),
        ptq=PtqSection(rotate=True, gptq="auto"),
    )
    result = run_pipeline(model, recipe, calib, progress=False)
    info = result.info["gptq"]
    assert info["used"] == (info["gptq_error"] < info["rtn_error"])
    assert result.recipe.ptq.gptq is info["used"]
    assert type(result.model[0]).__name__ == "RotatedLinear"
    weights = 64 * 128 + 128 * 16
    bits = sum(model_size_bits(result.model.get_submodule(n)) for n in ("0.layer", "2.layer"))
    assert bits <= 3.0 * weights


@pytest.mark.parametrize("name", ["digits.toml", "minilm.toml"])
def test_shipped_recipes_write_back_unchanged(name):
    from pathlib import Path

    recipe = parse_recipe((Path(__file__).resolve().parents[1] / "recipes" / name).read_text())
    back = parse_recipe(recipe_toml(recipe))
    for field in ("model", "data", "factorize", "quantize", "calibrate", "finetune", "export"):
        assert getattr(back, field) == getattr(recipe, field), field
