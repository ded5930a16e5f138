"""save_pretrained's checks, TnquantConfig's fields, and the explicit registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf import models  # noqa: E402
from tnquant.hf import is_registered, register, save_pretrained  # noqa: E402
from tnquant.io import TENSORS_FILE  # noqa: E402


def test_save_pretrained_writes_the_config_transformers_reads(tmp_path: Path) -> None:
    model = models.compressed("llama")
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["quantization_config"] == {
        "quant_method": "tnquant",
        "format": "tnquant",
        "version": 1,
    }
    assert config["transformers_weights"] == TENSORS_FILE
    assert (tmp_path / "generation_config.json").is_file()
    assert not hasattr(model.config, "quantization_config")  # the model's own config untouched


def test_save_pretrained_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match="tokenizer must have a save_pretrained method"):
        save_pretrained(models.bert(), tmp_path, tokenizer=object())
    assert not any(tmp_path.iterdir())  # refused before writing


def test_a_class_outside_transformers_mappings_is_refused_on_save(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    class Custom(GPT2LMHeadModel):
        pass

    model = Custom(models.gpt2().config)
    with pytest.raises(ValueError, match="'architectures\\[0\\]' must be a transformers class"):
        save_pretrained(model, tmp_path)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"version": 2}, "field 'version' must be 1, got 2"),
        ({"version": True}, "field 'version' must be 1, got True"),
        ({"format": "gguf"}, "field 'format' must be 'tnquant'"),
        ({"quant_method": "quanto"}, "field 'quant_method' must be 'tnquant'"),
        ({"bits": 4}, "unknown fields \\['bits'\\]"),
    ],
)
def test_tnquant_config_checks_its_fields(fields: dict, match: str) -> None:
    from tnquant.hf.quantizer import TnquantConfig

    with pytest.raises(ValueError, match=match):
        TnquantConfig.from_dict({"quant_method": "tnquant", **fields})


def test_register_is_explicit_idempotent_and_refuses_a_conflict(monkeypatch) -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

    from tnquant.hf.quantizer import TnquantConfig, TnquantHfQuantizer

    register()
    register()
    assert is_registered()
    assert AUTO_QUANTIZER_MAPPING["tnquant"] is TnquantHfQuantizer
    assert type(AutoQuantizationConfig.from_dict({"quant_method": "tnquant"})) is TnquantConfig

    class Other(TnquantHfQuantizer):
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "tnquant", Other)
    assert not is_registered()
    with pytest.raises(ValueError, match="already has a quant_method 'tnquant'"):
        register()
