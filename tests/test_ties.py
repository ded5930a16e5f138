"""Tied weights (an LM head tied to its embedding) survive quantize, convert, save and load.

References are independent of tnquant's code paths: the group quantization is
written out in plain torch, sizes are counted by hand from the tensors the
model holds, the stored copies are read from the safetensors file itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tnquant import (
    TT,
    LowRank,
    QuantSpec,
    convert,
    factorize,
    load,
    model_size_bits,
    quantize,
    save,
)
from tnquant.core.ties import tie_groups

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
BITS, GROUP = 4, 16
SPEC = QuantSpec(bits=BITS, granularity=("group", GROUP), axis=1)  # along the hidden axis
VOCAB, HIDDEN = 300, 64


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _head_and_embedding(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model.get_output_embeddings(), model.get_input_embeddings()


def _group_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per group of 16 along axis 1, written out: scale = amax / 7."""
    g = w.detach().reshape(w.shape[0], -1, GROUP)
    scale = g.abs().amax(dim=-1, keepdim=True) / (2 ** (BITS - 1) - 1)
    q = torch.clamp(torch.round(g / scale), -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1)
    return (q * scale).reshape(w.shape)


def _stored_bits(model: nn.Module) -> int:
    """Every tensor of the state dict once (by identity), numel * element bits."""
    seen, bits = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            bits += t.numel() * t.element_size() * 8
    return bits


def _file_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "tensors.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def converted_llama(tmp_path_factory):
    model = _llama()
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    dense_head = model.lm_head.weight.detach().clone()
    report = quantize(model, weights=SPEC, progress=False)
    head, emb = _head_and_embedding(model)
    fake = {
        "head": head.weight_quantizer(head.weight).detach(),
        "ref": _group_fake_quant(dense_head),
    }
    with torch.no_grad():
        y = model(x).logits
    bits = model_size_bits(model)
    creport = convert(model, progress=False)
    out = tmp_path_factory.mktemp("llama") / "m"
    save(model, out)
    return {
        "model": model,
        "x": x,
        "y": y,
        "bits": bits,
        "fake": fake,
        "out": out,
        "quantize": report,
        "convert": creport,
    }


def test_the_tie_is_found():
    model = _llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tie_groups(model) == [[("model.embed_tokens", "weight"), ("lm_head", "weight")]]


@pytest.mark.parametrize("spec", [TT(ratio=0.5), LowRank(rank=4)])
def test_factorizing_a_tied_member_is_refused_with_both_names(spec):
    model = _llama()
    report = factorize(model, {"lm_head": spec}, progress=False)
    assert report.rows == [] and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter
    (row, pattern) = report.skipped
    assert row["name"] == "lm_head" and "'model.embed_tokens'" in row["reason"]
    assert "exclude=['lm_head']" in row["reason"] and "untie" in row["reason"]
    assert pattern["kind"] == "pattern" and "applies to none" in pattern["reason"]


def test_a_single_spec_factorizes_everything_but_the_tie():
    model = _llama()
    report = factorize(model, LowRank(rank=4), progress=False)
    skipped = {s["name"] for s in report.skipped}
    assert {"lm_head", "model.embed_tokens"} <= skipped
    assert len(report.rows) == 14  # 7 Linear layers per decoder layer
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_quantize_gives_the_tie_one_quantizer(converted_llama):
    rows = {r["name"]: r for r in converted_llama["quantize"]}
    assert "one quantizer" in rows["lm_head"]["note"]
    # the group quantizer groups along the hidden axis of the (vocab, hidden) weight: the
    # Linear's input axis, the Embedding's dim axis; both read the same fake-quant values
    torch.testing.assert_close(converted_llama["fake"]["head"], converted_llama["fake"]["ref"])
    # counted once: codes 300*64*4 bits, one float32 scale per group of 16
    tied = VOCAB * HIDDEN * BITS + VOCAB * HIDDEN // GROUP * 32
    assert rows["model.embed_tokens"]["bits_after"] == tied and rows["lm_head"]["bits_after"] == 0


def test_convert_shares_one_frozen_tensor(converted_llama):
    model = converted_llama["model"]
    head, emb = _head_and_embedding(model)
    assert head.weight_quantizer is emb.weight_quantizer
    with torch.no_grad():
        assert torch.equal(model(converted_llama["x"]).logits, converted_llama["y"])
        idx = torch.arange(VOCAB)
        torch.testing.assert_close(emb(idx), converted_llama["fake"]["ref"], rtol=0, atol=0)
    rows = {r["name"]: r for r in converted_llama["convert"]}
    assert rows["lm_head"]["bits_after"] == 0 and "one stored copy" in rows["lm_head"]["note"]
    assert model_size_bits(model) == converted_llama["bits"] == _stored_bits(model)


def test_save_stores_the_tie_once(converted_llama):
    out = converted_llama["out"]
    keys = _file_keys(out)
    tied_keys = [k for k in keys if k.startswith(("lm_head.", "model.embed_tokens."))]
    assert sorted(tied_keys) == [
        "model.embed_tokens.weight",  # the empty placeholder
        "model.embed_tokens.weight_quantizer.packed",
        "model.embed_tokens.weight_quantizer.scale",
    ]
    meta = json.loads((out / "model.json").read_text())
    assert [
        "model.embed_tokens.weight_quantizer.packed",
        "lm_head.weight_quantizer.packed",
    ] in meta["tied"]
    # the file holds every tensor the model holds once, plus the safetensors header
    data_bytes = _stored_bits(converted_llama["model"]) // 8
    size = (out / "tensors.safetensors").stat().st_size
    assert data_bytes < size < data_bytes + 16384


def test_load_reties_the_shared_tensors(converted_llama):
    loaded = load(converted_llama["out"], model=_llama())
    head, emb = _head_and_embedding(loaded)
    assert head.weight_quantizer.packed is emb.weight_quantizer.packed
    assert head.weight_quantizer.scale is emb.weight_quantizer.scale
    with torch.no_grad():
        assert torch.equal(loaded(converted_llama["x"]).logits, converted_llama["y"])
    assert model_size_bits(loaded) == converted_llama["bits"]


def test_load_in_a_fresh_process(converted_llama, tmp_path):
    code = f"""
import sys, torch, transformers
sys.path.insert(0, {str(ROOT)!r})
from tests.test_ties import _llama
from tnquant import load, model_size_bits
m = load({str(converted_llama["out"])!r}, model=_llama())
x = torch.load({str(tmp_path / "x.pt")!r})
with torch.no_grad():
    torch.save(m(x).logits, {str(tmp_path / "y.pt")!r})
same = m.lm_head.weight_quantizer.packed is m.model.embed_tokens.weight_quantizer.packed
print(model_size_bits(m), same)
"""
    torch.save(converted_llama["x"], tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(converted_llama["bits"]), "True"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), converted_llama["y"])


def test_different_specs_on_a_tie_are_refused_before_anything_changes():
    model = _llama()
    with pytest.raises(ValueError, match="one tied parameter") as err:
        quantize(model, weights={"lm_head": QuantSpec(8), "*": QuantSpec(4)}, progress=False)
    message = str(err.value)
    assert "'lm_head.weight'" in message and "'model.embed_tokens.weight'" in message
    assert "untie" in message and "int8" in message and "int4" in message
    assert not any("Quant" in type(m).__name__ for m in model.modules())


def test_a_tie_quantized_on_one_side_keeps_the_float_copy_and_counts_both():
    model = _llama()
    report = quantize(
        model, weights={"lm_head": QuantSpec(8, granularity="channel")}, progress=False
    )
    assert "left float: stored twice" in report["lm_head"]["note"]
    before = model_size_bits(model)
    convert(model, progress=False)
    assert model.model.embed_tokens.weight.numel() == VOCAB * HIDDEN  # still float
    assert model_size_bits(model) == before == _stored_bits(model)


def test_gpt2_head_tied_to_wte_round_trips_stored_once(tmp_path):
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    quantize(model, weights=QuantSpec(8, granularity="channel"), progress=False)  # axis 0: rows
    assert model.lm_head.weight_quantizer is model.transformer.wte.weight_quantizer
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).logits
    convert(model, progress=False)
    save(model, tmp_path / "m")
    keys = _file_keys(tmp_path / "m")
    assert "transformer.wte.weight_quantizer.packed" in keys
    assert not any(k.startswith("lm_head.") for k in keys)
    loaded = load(tmp_path / "m", model=_gpt2())
    assert loaded.lm_head.weight_quantizer.packed is loaded.transformer.wte.weight_quantizer.packed
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, y)
    assert model_size_bits(loaded) == model_size_bits(model) == _stored_bits(model)
