"""An HF folder is untrusted: none of its code runs, no class outside transformers, no huge base.

Each test forges one thing in a copy of a folder :func:`tnquant.hf.save_pretrained`
wrote and expects :func:`tnquant.load` (no ``model=``), :func:`tnquant.hf.load_pretrained`
or ``from_pretrained`` to refuse it before building anything.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import tnquant  # noqa: E402
from tests.hf import models  # noqa: E402
from tnquant.hf import load_pretrained, register  # noqa: E402
from tnquant.io import IntegrityError  # noqa: E402
from tnquant.io.hf_base import build_hf_base, hf_model_class  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    models.saved("gpt2", folder)
    return folder


@pytest.fixture()
def folder(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _marker_module(folder: Path) -> Path:
    """A module in the folder that leaves a marker if it is ever imported."""
    marker = folder / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass M: pass\n")
    return marker


def test_the_untouched_folder_loads(folder: Path) -> None:
    x = models.inputs()
    ref = models.logits(models.compressed("gpt2"), x)
    assert torch.equal(models.logits(tnquant.load(folder), x), ref)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("key", ["auto_map", "trust_remote_code"])
def test_code_of_the_folder_is_refused_and_never_runs(folder: Path, name: str, key: str) -> None:
    marker = _marker_module(folder)
    value: Any = {"AutoModelForCausalLM": "evil.M", "AutoTokenizer": ["evil.M", None]}
    if key == "trust_remote_code":
        value = True
    if name == "tokenizer_config.json":
        (folder / name).write_text(json.dumps({key: value}))
    else:
        _edit(folder / name, lambda c: c.update({key: value}))
    for load in (tnquant.load, load_pretrained):
        with pytest.raises(ValueError, match=f"{name} has '{key}'"):
            load(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    "architecture",
    [
        "os.system",  # not a transformers name at all
        "__import__",
        "BertModel",  # transformers' own, but not for model_type gpt2
        "GPT2PreTrainedModel",  # in transformers, in no auto mapping
        "GPT2LMHeadModel.__init__",
    ],
)
def test_an_architecture_outside_transformers_mappings_is_refused(
    folder: Path, architecture: str
) -> None:
    _edit(folder / "config.json", lambda c: c.update(architectures=[architecture]))
    with pytest.raises(ValueError, match=r"'architectures\[0\]' must be a transformers class"):
        tnquant.load(folder)


def test_architectures_must_be_a_list_of_names(folder: Path) -> None:
    _edit(folder / "config.json", lambda c: c.update(architectures=[7]))
    with pytest.raises(TypeError, match="'architectures' must be a list of class names"):
        tnquant.load(folder)


def test_an_unknown_model_type_is_refused(folder: Path) -> None:
    _edit(folder / "config.json", lambda c: c.update(model_type="evil"))
    with pytest.raises(ValueError, match="transformers cannot read this config"):
        tnquant.load(folder)


def test_a_huge_model_is_sized_on_meta_and_refused(folder: Path) -> None:
    _edit(folder / "config.json", lambda c: c.update(vocab_size=10**9))  # 128 GB of embeddings
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"describes a model of \d+ bytes; at most \d+"):
        tnquant.load(folder)
    assert time.perf_counter() - start < 20  # nothing was allocated


def test_a_base_of_other_sizes_is_refused(folder: Path) -> None:
    _edit(folder / "config.json", lambda c: c.update(n_embd=64))  # small, but not the saved one
    with pytest.raises(
        ValueError, match="has embedding_dim=64, the saved QuantEmbedding expects 32"
    ):
        tnquant.load(folder)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ("x" * (1 << 21), "at most"),
    ],
)
def test_a_malformed_config_is_refused(folder: Path, text: str, match: str) -> None:
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        tnquant.load(folder)


def test_without_config_a_full_model_still_needs_its_base(folder: Path) -> None:
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        tnquant.load(folder)


def test_build_hf_base_checks_its_arguments(folder: Path) -> None:
    with pytest.raises(TypeError, match="max_bytes must be a non-negative int"):
        build_hf_base(folder, max_bytes=-1)


def test_hf_model_class_uses_transformers_own_mappings() -> None:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    assert hf_model_class(BertConfig(architectures=["BertForMaskedLM"])) is BertForMaskedLM
    assert hf_model_class(BertConfig()) is BertModel  # no architectures: the base model
    assert hf_model_class(BertConfig(architectures=["GPT2Model"]), "AutoModel") is BertModel
    with pytest.raises(ValueError, match="model_type 'bert'"):
        hf_model_class(BertConfig(architectures=["GPT2LMHeadModel"]))


# --------------------------------------------------------------------------- #
# from_pretrained through the plug-in: the same checks before any weight is read
# --------------------------------------------------------------------------- #


def _from_pretrained(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(str(folder))


def test_from_pretrained_refuses_altered_tensors(folder: Path) -> None:
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a data byte: the header still holds
    (folder / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        _from_pretrained(folder)


def test_from_pretrained_refuses_an_altered_model_json(folder: Path) -> None:
    meta = folder / "model.json"
    meta.write_text(meta.read_text().replace('"bits": 4', '"bits": 3', 1))
    with pytest.raises(IntegrityError, match="model.json"):
        _from_pretrained(folder)


def test_from_pretrained_refuses_another_weight_file(folder: Path) -> None:
    shutil.copy(folder / "tensors.safetensors", folder / "model.safetensors")
    _edit(folder / "config.json", lambda c: c.pop("transformers_weights"))
    with pytest.raises(ValueError, match="one weight file, tensors.safetensors"):
        _from_pretrained(folder)


def test_from_pretrained_refuses_to_quantize_a_float_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tnquant.hf.quantizer import TnquantConfig

    register()
    torch.manual_seed(0)
    models.gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=TnquantConfig())
