"""Codebook weights and cores through convert: packed indices + table + scales, exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tnquant
from tnquant import Codebook, LowRank, QuantSpec
from tnquant.quant import Quantizer
from tnquant.quant.frozen import FrozenTensor

SPECS = [
    Codebook(granularity=("group", 16)),
    Codebook(kind="fp4", granularity="channel", scale_dtype="bfloat16"),
    Codebook(kind="kmeans", bits=3, granularity=("group", 16)),
    Codebook(kind="kmeans", bits=2, granularity=("group", 16), centroids="block"),
    Codebook(kind="kmeans", bits=5, granularity="tensor", scale_dtype="float32"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{s.bits}-{s.centroids}")
def test_converted_equals_fake_quant_and_counts_every_bit(spec):
    model = _model()
    tnquant.quantize(model, weights=spec)
    x = torch.randn(5, 48)
    fake = model(x)
    fake_bits = tnquant.model_size_bits(model)
    tnquant.convert(model)
    assert torch.equal(model(x), fake)
    # hand count: indices at `bits` each (packed to whole bytes), one scale per block,
    # the table (K float32 per tensor or per block), float32 biases
    expected = 0
    for layer in (model[0], model[2]):
        n = layer.weight_quantizer.n_codes
        out, inp = layer.out_features, layer.in_features
        if spec.granularity == "tensor":
            blocks = 1
        elif spec.granularity == "channel":
            blocks = out
        else:
            blocks = out * inp // spec.granularity[1]
        sbits = {"float16": 16, "bfloat16": 16, "float32": 32}[spec.scale_dtype]
        tables = 1 if spec.centroids == "tensor" else blocks
        expected += -(-n * spec.bits // 8) * 8 + blocks * sbits + tables * spec.entries * 32
        expected += out * 32
        frozen = layer.weight_quantizer
        assert isinstance(frozen, FrozenTensor) and frozen.code_bits == spec.bits
        assert frozen.packed.dtype == torch.uint8
    assert tnquant.model_size_bits(model) == expected == fake_bits


def test_converted_codes_decode_to_the_table():
    w = torch.randn(8, 64)
    q = Quantizer(Codebook(kind="nf4"))
    frozen = FrozenTensor.from_quantizer(q, w)
    codes = frozen.codes().numpy().astype(np.int64).reshape(8, 1, 64)
    table = frozen.codebook.numpy()
    scale = frozen.scale.to(torch.float32).numpy().reshape(8, 1, 1)
    ref = (table[codes] * scale).reshape(8, 64)
    np.testing.assert_array_equal(frozen().numpy(), ref)


def test_cores_take_their_own_codebooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    tnquant.factorize(model, LowRank(rank=16))
    report = tnquant.quantize(
        model, cores={0: Codebook(kind="nf4", granularity=("group", 16)), 1: QuantSpec(bits=4)}
    )
    assert "nf4/group16" in str(report) and "int4/tensor" in str(report)
    x = torch.randn(3, 64)
    fake = model(x)
    tnquant.convert(model)
    assert torch.equal(model(x), fake)
    kinds = [type(q.spec).__name__ for q in model[0].core_quantizers]
    assert kinds == ["Codebook", "QuantSpec"]


def test_learnable_codebook_converts_exactly_after_training_steps():
    model = _model()
    tnquant.quantize(model, weights=Codebook(kind="kmeans", bits=3, granularity=("group", 16),
                                             learnable=True))  # fmt: skip
    x = torch.randn(16, 48)
    for _ in range(3):  # plain gradient steps (torch.optim's first import costs seconds)
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad
    with torch.no_grad():
        fake = model(x)
    tnquant.convert(model)
    assert torch.equal(model(x), fake)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "spec",
    [
        Codebook(granularity=("group", 16)),
        Codebook(kind="kmeans", bits=3, learnable=True, scale_dtype="bfloat16"),
        Codebook(kind="fp4", centroids="block", granularity="channel"),
    ],
    ids=lambda s: s.kind,
)
def test_any_float_dtype_converts_and_reloads_exactly(dtype, spec):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = Quantizer(spec)
    y = q(w)
    frozen = FrozenTensor.from_quantizer(q, w)
    again = FrozenTensor.from_metadata(frozen.metadata())
    again.load_state_dict(frozen.state_dict())
    assert y.dtype == dtype and torch.equal(frozen(), y) and torch.equal(again(), y)
    assert (
        frozen.scale.dtype
        == {"float16": torch.float16, "bfloat16": torch.bfloat16}[spec.scale_dtype]
    )
