"""A layer kind added through the registry alone: factorized, quantized, converted, saved, loaded.

``Scaled`` is a dense layer tnquant has never heard of (``y = GAIN * (x W^T + b)``);
``LowRankScaled`` factorizes it and ``QuantScaled`` quantizes it. Three
``register`` calls in this file are all it takes: no other file knows them.
References are computed independently (numpy int4 per row, the dense
product of the cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tnquant import LowRank, QuantSpec, convert, factorize, load, model_size_bits, quantize, save
from tnquant.layers import LowRankLinear
from tnquant.quant.frozen import FrozenTensor
from tnquant.quant.quantizer import Quantizer
from tnquant.registry import LayerKind, lookup, register, unregister, weight_pairs
from tnquant.registry.serialize import linear_handler, quant_linear_handler

GAIN = 0.5


class Scaled(nn.Module):
    """``y = GAIN * (x W^T + b)``: dense-like, not an ``nn.Linear``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.randn(out_features, in_features, device=device, dtype=dtype)
        )
        self.bias = (
            nn.Parameter(torch.randn(out_features, device=device, dtype=dtype)) if bias else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return GAIN * F.linear(x, self.weight, self.bias)


class QuantScaled(Scaled):
    """``Scaled`` with a weight quantizer and input/output quantizers (sharing its parameters)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.act_quantizers = None

    @classmethod
    def from_float(cls, module: Scaled) -> QuantScaled:
        new = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            dtype=module.weight.dtype,
        )
        new.weight, new.bias = module.weight, module.bias
        return new

    def _act(self, site: str, x: Tensor) -> Tensor:
        acts = self.act_quantizers
        return acts[site](x) if acts is not None and site in acts else x

    def forward(self, x: Tensor) -> Tensor:
        q = self.weight_quantizer
        w = self.weight if q is None else q(self.weight)
        return self._act("output", GAIN * F.linear(self._act("input", x), w, self.bias))


class LowRankScaled(LowRankLinear):
    """A low-rank ``Scaled``: the cores of ``W = U V``, then the gain."""

    @classmethod
    def from_dense(cls, module: Scaled, spec, *, gram=None, name: str = "weight"):
        dense = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        dense.weight, dense.bias = module.weight, module.bias
        return super().from_dense(dense, spec, gram=gram, name=name)

    def forward(self, x: Tensor) -> Tensor:
        return GAIN * super().forward(x)


KINDS = (
    LayerKind(
        Scaled,
        "dense",
        Scaled,
        weight_kind="linear",
        factorize={LowRank: LowRankScaled},
        quantized=QuantScaled,
    ),
    LayerKind(LowRankScaled, "factorized", Scaled, handler=linear_handler(LowRankScaled, Scaled)),
    LayerKind(QuantScaled, "quantized", Scaled, handler=quant_linear_handler(QuantScaled, Scaled)),
)


@pytest.fixture
def toy():
    for kind in KINDS:
        register(kind)
    try:
        yield
    finally:
        for kind in KINDS:
            unregister(kind.cls)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Scaled(12, 10), nn.ReLU(), Scaled(10, 4))


def _np_int4_rows(w: Tensor) -> Tensor:
    """Symmetric int4 per output row, in numpy float32 (the independent reference)."""
    a = w.detach().numpy()
    scale = (np.max(np.abs(a), axis=1, keepdims=True) / np.float32(7)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    return torch.from_numpy((np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32))


def _compressed() -> tuple[nn.Sequential, Tensor]:
    model = _net()
    factorize(model, {"0": LowRank(rank=3)}, progress=False)
    quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    return model, torch.randn(5, 12)


def test_factorized_through_its_entry(toy):
    model = _net()
    x = torch.randn(5, 12)
    first = model[0](x)
    report = factorize(model, {"0": LowRank(rank="full"), "2": LowRank(rank=2)}, progress=False)
    assert [type(m) for m in model] == [LowRankScaled, nn.ReLU, LowRankScaled]
    assert [r["kind"] for r in report] == ["Scaled", "Scaled"]
    torch.testing.assert_close(model[0](x), first, rtol=1e-4, atol=1e-4)  # full rank: exact
    u, v = model[2].cores
    hidden = torch.relu(model[0](x))
    torch.testing.assert_close(model(x), GAIN * (hidden @ (u @ v).T + model[2].bias))


def test_data_aware_fit_uses_the_weight_kind(toy):
    model = _net()
    report = factorize(model, {"0": LowRank(rank=3)}, data=[torch.randn(32, 12)], progress=False)
    assert report["0"]["out_rel_error"] is not None


def test_quantized_through_its_entry(toy):
    model = _net()
    weight = model[2].weight
    quantize(model, weights={"2": QuantSpec(bits=4, granularity="channel")}, progress=False)
    assert type(model[2]) is QuantScaled and model[2].weight is weight
    assert [n for n, _, _ in weight_pairs(model[2])] == ["weight"]
    x = torch.randn(5, 12)
    hidden = torch.relu(model[0](x))
    ref = GAIN * F.linear(hidden, _np_int4_rows(weight), model[2].bias)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


def test_converted_and_counted_through_its_entry(toy):
    model, x = _compressed()
    assert isinstance(model[0].core_quantizers[0], Quantizer)
    before, bits = model(x), model_size_bits(model)
    report = convert(model, progress=False)
    assert {r["name"] for r in report} == {"0", "2"}
    assert isinstance(model[2].weight_quantizer, FrozenTensor) and model[2].weight.numel() == 0
    assert all(isinstance(q, FrozenTensor) for q in model[0].core_quantizers)
    assert torch.equal(model(x), before) and model_size_bits(model) == bits


@pytest.mark.parametrize("converted", [False, True])
def test_saved_and_loaded_through_its_entry(toy, tmp_path, converted):
    model, x = _compressed()
    if converted:
        convert(model, progress=False)
    save(model, tmp_path)
    fresh = _net()
    loaded = load(tmp_path, model=fresh)
    assert loaded is fresh and [type(m) for m in loaded] == [type(m) for m in model]
    assert torch.equal(loaded(x), model(x))


def test_without_its_entries_the_kind_is_left_alone(tmp_path):
    assert lookup(Scaled(2, 2)) is None
    model = _net()
    assert factorize(model, LowRank(rank=2), progress=False).rows == []
    report = quantize(model, weights=QuantSpec(bits=8), progress=False)
    assert report.rows == [] and [type(m) for m in model] == [Scaled, nn.ReLU, Scaled]
    assert [(s["name"], s["reason"]) for s in report.skipped] == [
        ("0", "no registry entry for Scaled"),
        ("2", "no registry entry for Scaled"),
        ("weights['*']", "matched nothing"),
    ]


def test_a_model_holding_an_unregistered_factorized_kind_is_not_saved(tmp_path):
    model = _net()
    for kind in KINDS:
        register(kind)
    try:
        factorize(model, {"0": LowRank(rank=2)}, progress=False)
    finally:
        for kind in KINDS:
            unregister(kind.cls)
    with pytest.raises(TypeError, match="cannot save a LowRankScaled: tnquant.io has no handler"):
        save(model, tmp_path)
