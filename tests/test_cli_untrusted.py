"""The command line on untrusted input: a compressed directory runs no code, every bad input
file or argument is refused up front with exit code 2 and one line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tnquant.cli.inputs
from tnquant.cli import commands as cli
from tnquant.cli import main
from tnquant.cli.checks import UsageError

ROOT = Path(__file__).resolve().parents[1]
CLASS = "tests.test_cli_untrusted:TinyNet"


class TinyNet(nn.Module):
    """The checkpoint's model class, passed to export as ``--model-class``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


RECIPE = f"""
[model]
class = "{CLASS}"

[data]
batch_size = 16

[factorize]
"body.0" = {{format = "lowrank", rank = 4}}

[quantize.cores]
"*" = {{bits = 6, granularity = "channel", axis = 0, scale = "pow2"}}

[quantize.weights]
"body.2" = {{kind = "fixed", type = "ap_fixed<8,1,RND,SAT>"}}

[export]
layers = "body"
input_width = 12
num_samples = 16
"""


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    torch.manual_seed(0)
    torch.save(TinyNet().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32))
    (d / "recipe.toml").write_text(RECIPE)
    assert (
        main(
            [
                "compress",
                str(d / "tiny.pt"),
                "--recipe",
                str(d / "recipe.toml"),
                "--calib",
                str(d / "calib.npy"),
                "--out",
                str(d / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    return d / "out"


@pytest.fixture
def forged(compressed, tmp_path):
    """A copy of the compressed directory, to be altered by the test."""
    return Path(shutil.copytree(compressed, tmp_path / "dir"))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tnquant: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _export(d: Path, out: Path, *extra: str) -> int:
    return main(["export", str(d), "--fixed-point", str(out), *extra])


# --------------------------------------------------------------------------- #
# no code named in the directory runs
# --------------------------------------------------------------------------- #


def test_export_never_calls_the_class_of_the_directory_recipe(forged, tmp_path, capsys):
    marker = tmp_path / "marker"
    text = (
        (forged / "recipe.toml")
        .read_text()
        .replace(
            f'class = "{CLASS}"',
            f'class = "subprocess:run"\nkwargs = {{args = "echo ran > {marker}", shell = true}}',
        )
    )
    (forged / "recipe.toml").write_text(text)
    assert _export(forged, tmp_path / "fx") == 2
    _one_line_error(capsys, "--model-class", "checkpoint")
    assert not marker.exists()
    assert main(["report", str(forged)]) == 0 and not marker.exists()
    # the user names the class: the export runs, the directory's class is still ignored
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 0
    assert not marker.exists() and (tmp_path / "fx" / "check.json").is_file()


def test_python_m_export_does_not_import_a_module_from_the_cwd(forged, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass X:\n    pass\n")
    text = (forged / "recipe.toml").read_text().replace(f'class = "{CLASS}"', 'class = "mod:X"')
    (forged / "recipe.toml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "tnquant",
        "export",
        str(forged),
        "--fixed-point",
        str(tmp_path / "fx"),
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--model-class" in proc.stderr, proc.stderr
    assert not marker.exists()
    proc = subprocess.run(
        args + ["--model-class", CLASS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def _hf_source(d: Path, hf: Path) -> None:
    (d / "source.json").write_text(json.dumps({"model": str(hf), "kind": "hf", "text": True}))


def test_hugging_face_base_with_custom_code_is_refused(forged, tmp_path, capsys):
    hf, marker = tmp_path / "hf", tmp_path / "marker"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "modeling_evil.Evil"}})
    )
    (hf / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _hf_source(forged, hf)
    assert _export(forged, tmp_path / "fx") == 2
    _one_line_error(capsys, "auto_map", "config.json")
    assert not marker.exists()
    # compress refuses the same directory before loading anything
    (tmp_path / "s.txt").write_text("a sentence\n")
    (tmp_path / "r.toml").write_text('[quantize.weights]\n"*" = {bits = 8}\n')
    assert (
        main(
            [
                "compress",
                str(hf),
                "--recipe",
                str(tmp_path / "r.toml"),
                "--calib",
                str(tmp_path / "s.txt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    _one_line_error(capsys, "auto_map")
    assert not marker.exists()


def test_hugging_face_base_is_sized_before_it_is_built(forged, tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 10**9,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )  # 128 GB of embeddings
    _hf_source(forged, hf)
    assert _export(forged, tmp_path / "fx") == 2
    _one_line_error(capsys, "config.json describes a model of", "bytes")


def test_missing_base_directory_and_a_wrong_base(forged, tmp_path, capsys):
    _hf_source(forged, tmp_path / "gone")
    assert _export(forged, tmp_path / "fx") == 2
    _one_line_error(capsys, "--model PATH")
    # --model overrides source.json; a base that does not fit the saved model is an input error
    assert _export(forged, tmp_path / "fx", "--model", "digits-cnn") == 2
    _one_line_error(capsys, "does not load onto its base model")


def test_model_class_flags_are_checked(forged, tmp_path, capsys):
    assert _export(forged, tmp_path / "fx", "--model-class", "nocolon") == 2
    _one_line_error(capsys, "--model-class must be a class path")
    assert _export(forged, tmp_path / "fx", "--model-class", "tests.test_cli_untrusted:Nope") == 2
    _one_line_error(capsys, "--model-class: cannot import")
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS, "--model-kwargs", "[1]") == 2
    _one_line_error(capsys, "--model-kwargs must be a JSON object")
    assert (
        _export(forged, tmp_path / "fx", "--model-class", CLASS, "--model-kwargs", '{"depth": 3}')
        == 2
    )
    _one_line_error(capsys, "--model-class:", "depth")
    assert _export(forged, tmp_path / "fx", "--model-kwargs", "{}") == 2
    _one_line_error(capsys, "--model-kwargs needs --model-class")


def test_a_forged_model_file_exits_2(forged, tmp_path, capsys):
    meta = forged / "model.json"
    meta.write_text(meta.read_text().replace('"rank": 4', '"rank": 5', 1))
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 2
    _one_line_error(capsys, "model.json")


# --------------------------------------------------------------------------- #
# report.json, source.json, recorded inputs
# --------------------------------------------------------------------------- #


def _edit(report: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for p in parents:
        report = report[int(p)] if isinstance(report, list) else report[p]
    if value is KeyError:
        del report[last]
    else:
        report[last] = value


BAD_REPORTS = [
    ("totals", KeyError, "field 'totals' is missing"),
    ("totals.size_bits", "many", "field 'totals.size_bits' must be an integer"),
    ("layers.0.error", "big", "field 'layers[0].error'"),
    ("layers", {"a": 1}, "field 'layers' must be a list"),
    ("compare.metric", "f1", "field 'compare.metric'"),
    ("compare.rows", [], "field 'compare.rows' must hold 2 rows"),
    ("stages.eval", "slow", "field 'stages.eval'"),
    ("seed", True, "field 'seed' must be an integer"),
    ("tnquant_report", 7, "field 'tnquant_report' must be 1"),
    ("export_layers", "body", "field 'export_layers' must be a list"),
]


@pytest.mark.parametrize("path, value, message", BAD_REPORTS, ids=[b[0] for b in BAD_REPORTS])
def test_a_bad_report_names_the_file_and_field(forged, tmp_path, capsys, path, value, message):
    report = json.loads((forged / "report.json").read_text())
    _edit(report, path, value)
    (forged / "report.json").write_text(json.dumps(report))
    assert main(["report", str(forged)]) == 2
    _one_line_error(capsys, "report.json", message)
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 2
    _one_line_error(capsys, "report.json", message)


@pytest.mark.parametrize("text", ["{", "[]", '"x"', '{"a": ' * 100000 + "1" + "}" * 100000])
def test_report_json_that_is_not_an_object(forged, capsys, text):
    (forged / "report.json").write_text(text)
    assert main(["report", str(forged)]) == 2
    _one_line_error(capsys, "report.json")


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a\\b", "..", "", "a..b", 3, "c:x"])
def test_export_layer_names_cannot_leave_the_directory(forged, tmp_path, capsys, name):
    np.save(forged / "evil.npy", np.load(forged / "export_inputs" / "body.npy"))
    report = json.loads((forged / "report.json").read_text())
    report["export_layers"] = [name]
    (forged / "report.json").write_text(json.dumps(report))
    out = tmp_path / "deep" / "fx"
    assert _export(forged, out, "--model-class", CLASS) == 2
    _one_line_error(capsys, "export_layers[0]")
    assert not (tmp_path / "deep").exists()


def test_an_export_layer_that_is_no_module(forged, tmp_path, capsys):
    report = json.loads((forged / "report.json").read_text())
    report["export_layers"] = ["body.9"]
    (forged / "report.json").write_text(json.dumps(report))
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 2
    _one_line_error(capsys, "'body.9', which is no module")


def test_inputs_symlinked_outside_the_directory(forged, tmp_path, capsys):
    shutil.move(forged / "export_inputs", tmp_path / "elsewhere")
    (forged / "export_inputs").symlink_to(tmp_path / "elsewhere")
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 2
    _one_line_error(capsys, "resolves outside")


class _Touch:
    """Unpickling this creates a marker file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def _header_only(path: Path, shape: tuple[int, ...]) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        f.write(b"\0" * 64)


@pytest.mark.parametrize(
    "case, message",
    [
        ("pickle", "not a readable .npy array"),
        ("huge header", "not a readable .npy array"),
        ("3-d", "2-D float array"),
        ("ints", "2-D float array"),
        ("width", "rows of 16 inputs"),
        ("empty", "holds no input rows"),
        ("nan", "non-finite"),
        ("missing", "is missing"),
    ],
)
def test_bad_recorded_inputs(forged, tmp_path, capsys, case, message):
    path, marker = forged / "export_inputs" / "body.npy", tmp_path / "unpickled"
    arrays = {
        "3-d": np.zeros((4, 2, 8), np.float32),
        "ints": np.zeros((4, 16), np.int64),
        "width": np.zeros((4, 15), np.float32),
        "empty": np.zeros((0, 16), np.float32),
        "nan": np.full((4, 16), np.nan, np.float32),
    }
    if case == "pickle":
        np.save(path, np.array([_Touch(marker)], dtype=object), allow_pickle=True)
    elif case == "huge header":
        _header_only(path, (10**9, 16))  # 64 GB promised, 64 bytes there
    elif case == "missing":
        path.unlink()
    else:
        np.save(path, arrays[case])
    assert _export(forged, tmp_path / "fx", "--model-class", CLASS) == 2
    _one_line_error(capsys, "body.npy", message)
    assert not marker.exists() and not (tmp_path / "fx").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ([], "must hold a JSON object"),
        ({"kind": "checkpoint"}, "field 'model' is missing"),
        ({"model": "x", "kind": "pickle"}, "field 'kind' must be one of"),
        ({"model": "/x", "kind": "minilm"}, "field 'model' must be 'minilm'"),
        ({"model": 3, "kind": "hf"}, "field 'model' must be a string"),
    ],
)
def test_a_bad_source_json(forged, tmp_path, capsys, source, message):
    (forged / "source.json").write_text(json.dumps(source))
    assert _export(forged, tmp_path / "fx") == 2
    _one_line_error(capsys, "source.json", message)


# --------------------------------------------------------------------------- #
# output directories
# --------------------------------------------------------------------------- #


def test_export_output_directory_checks(forged, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _export(forged, tmp_path / "file", "--model-class", CLASS) == 2
    _one_line_error(capsys, "--fixed-point", "is a file, not a directory")
    assert _export(forged, tmp_path / "file" / "sub", "--model-class", CLASS) == 2
    _one_line_error(capsys, "--fixed-point", "is a file, not a directory")
    assert _export(forged, forged, "--model-class", CLASS, "--force") == 2
    _one_line_error(capsys, "is DIR itself")
    out = tmp_path / "fx"
    (out / "body").mkdir(parents=True)
    (out / "body" / "hls4ml_config.json").write_text("{}")  # from an earlier model
    (out / "body" / "stale.txt").write_text("old")
    (out / "other").mkdir()
    (out / "other" / "keep.txt").write_text("not ours")
    assert _export(forged, out, "--model-class", CLASS) == 2
    _one_line_error(capsys, "not empty", "--force")
    assert (out / "body" / "stale.txt").is_file()
    assert _export(forged, out, "--model-class", CLASS, "--force") == 0
    assert not (out / "body" / "stale.txt").exists()
    assert not (out / "body" / "hls4ml_config.json").exists()  # the recipe has hls4ml = false
    assert (out / "other" / "keep.txt").is_file()
    assert [c["layer"] for c in json.loads((out / "check.json").read_text())] == ["body"]


# --------------------------------------------------------------------------- #
# compress: every argument checked before any work (digits-cnn would train first)
# --------------------------------------------------------------------------- #


DIGITS = """
[model]
train_epochs = 1
[quantize.weights]
"*" = {bits = 8}
"""


@pytest.fixture
def no_training(monkeypatch):
    def train(*args, **kwargs):
        raise RuntimeError("digits-cnn was trained before the arguments were checked")

    monkeypatch.setattr(tnquant.cli.inputs, "_train_digits", train)


@pytest.mark.parametrize(
    "extra, recipe, message",
    [
        (["--calib", "missing.npy"], "", "--calib data file 'missing.npy' not found"),
        (["--calib", "digits", "--eval", "missing.pt"], "", "--eval data file 'missing.pt'"),
        (["--calib", "corpus"], "", "--calib 'corpus' is text data"),
        (["--calib", "wide.npy"], "", "--calib data does not fit the model"),
        (["--calib", "x.npy"], '[finetune]\ntask_loss = "cross_entropy"\n', "finetune.task_loss"),
        (["--calib", "digits"], '[export]\nlayers = "head"\n', "'export.layers'"),
        (["--calib", "digits"], "[finetune]\nwarmup = 10.0\n", "'finetune.warmup'"),
        (["--calib", "digits", "--seed", "-1"], "", "--seed must be in"),
        (["--calib", "digits", "--out", "file"], "", "--out 'file' is a file, not a directory"),
        (["--calib", "digits", "--out", "file/sub"], "", "is a file, not a directory"),
    ],
)
def test_compress_checks_every_argument_before_training(
    tmp_path, monkeypatch, capsys, no_training, extra, recipe, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    np.save(tmp_path / "wide.npy", np.zeros((4, 3, 8, 8), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    (tmp_path / "r.toml").write_text(DIGITS + recipe)
    args = ["compress", "digits-cnn", "--recipe", "r.toml", "--no-progress", *extra]
    assert main(args + ([] if "--out" in extra else ["--out", "o"])) == 2
    _one_line_error(capsys, message)


def test_main_maps_errors_to_exit_codes(monkeypatch, capsys):
    def usage(args):
        raise UsageError("first line\nsecond line")

    def failure(args):
        raise RuntimeError("broken\nengine")

    monkeypatch.setattr(cli, "_report", usage)
    assert main(["report", "x"]) == 2
    assert "first line second line" in _one_line_error(capsys)
    monkeypatch.setattr(cli, "_report", failure)
    assert main(["report", "x"]) == 1
    assert "RuntimeError: broken engine" in _one_line_error(capsys, "--debug")
