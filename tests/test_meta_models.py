"""Models on the meta device: quantize and the size counts work from shapes; convert refuses.

The reference of each count is the same model with values, whose count
quantizes them (and one hand count).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.test_quantization import KINDS, SPECS, _build, _quantize_all
from tnquant import QuantSpec
from tnquant.quantization import convert, model_size_bits, quantize, size_report


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SPECS, ids=[repr(s)[:40] for s in SPECS])
def test_quantize_and_model_size_bits_work_on_meta(spec, kind):
    real = nn.Sequential(_build(kind))
    meta = copy.deepcopy(real).to("meta")
    _quantize_all(real, spec)
    report = _quantize_all(meta, spec)
    assert all(t.is_meta for t in meta.parameters())
    # the reference: the same model with values, whose count quantizes them
    assert model_size_bits(meta) == model_size_bits(real)
    assert report.rows[0]["bits_after"] == model_size_bits(real)
    assert size_report(meta).totals()["size_bits"] == model_size_bits(real)


def test_model_size_bits_on_meta_hand_count():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(10, 8))
    quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    assert model_size_bits(model) == 80 * 4 + 8 * 32 + 8 * 32  # codes, 8 scales, bias


def test_convert_refuses_meta_and_non_finite_models_before_converting_anything():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    quantize(meta, weights=QuantSpec(bits=8), progress=False)
    with pytest.raises(
        ValueError,
        match=r"convert needs the model's values, but parameter "
        r"'0.weight' is on the meta device.*to_empty",
    ):
        convert(meta, progress=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    quantize(model, weights=QuantSpec(bits=8), progress=False)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")  # e.g. a fine-tuning step that diverged
    with pytest.raises(ValueError, match=r"convert: parameter '1.weight' holds 1 non-finite"):
        convert(model, progress=False)
    assert not model[0].converted and not model[1].converted
