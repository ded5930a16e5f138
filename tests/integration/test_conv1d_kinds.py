"""A small 1-D CNN through factorize / quantize / convert / save / load, and the skipped kinds.

References: ``F.conv1d`` of the kernel numpy rebuilds from the raw cores, a
numpy int4 per output channel; the reasons of the skipped rows are those
:func:`tnquant.registry.unsupported` and the ``conv_groups`` refusal give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.layers.refs import np64, rel_err, tucker_kernel_np
from tnquant import LowRank, QuantSpec, Tucker, convert, factorize, load, quantize, save
from tnquant.layers import QuantConv1d, TuckerConv1d
from tnquant.sizes import model_size_bits, size_report


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, groups=16, padding=1),  # depthwise
        nn.ReLU(),
        nn.Conv1d(16, 8, 3, stride=2, padding="valid", padding_mode="reflect"),
    )


X = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(1))


def _np_int4_channels(w: torch.Tensor) -> np.ndarray:
    a = w.detach().numpy()
    amax = np.max(np.abs(a.reshape(a.shape[0], -1)), axis=1).reshape(-1, 1, 1)
    scale = np.where(amax == 0, np.float32(1), amax / np.float32(7)).astype(np.float32)
    return (np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32)


def test_a_1d_cnn_through_every_verb(tmp_path):
    model = cnn()
    report = factorize(model, Tucker(rank=(6, 3)), progress=False)
    assert [(r["name"], r["kind"], r["ranks"]) for r in report] == [
        ("0", "Conv1d", (6, 3)),
        ("4", "Conv1d", (6, 3)),
    ]
    assert [(s["name"], s["reason"]) for s in report.skipped] == [
        (
            "2",
            "groups=16 is not supported: a depthwise convolution is quantized, not "
            "factorized (the cores hold one dense channel map)",
        )
    ]
    for i in (0, 4):
        layer = model[i]
        assert type(layer) is TuckerConv1d
        kernel = torch.from_numpy(tucker_kernel_np(list(layer.cores))).float()
        x = torch.randn(2, layer.in_channels, 11)
        if i == 0:
            ref = F.conv1d(x, kernel, layer.bias, padding=2)
        else:  # 'valid' in reflect mode pads nothing
            ref = F.conv1d(x, kernel, layer.bias, stride=2)
        assert rel_err(np64(layer(x)), np64(ref)) < 1e-5
    depthwise = model[2].weight
    quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    assert type(model[2]) is QuantConv1d and model[2].weight is depthwise
    x = torch.randn(2, 16, 9)
    ref = F.conv1d(
        x, torch.from_numpy(_np_int4_channels(depthwise)), model[2].bias, padding=1, groups=16
    )
    torch.testing.assert_close(model[2](x), ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        before = model(X)
    bits = model_size_bits(model)
    convert(model, progress=False)
    with torch.no_grad():
        assert torch.equal(model(X), before)
    assert model_size_bits(model) == bits
    sizes = {r["name"]: r for r in size_report(model)}
    assert sizes["2"]["state"] == "converted" and sizes["2"]["codes_bits"] == 16 * 3 * 4
    # three cores (16, 6), (6, 3, 5), (3, 3) of 4-bit codes, whole bytes per tensor
    assert sizes["0"]["codes_bits"] == sum(-(-n * 4 // 8) * 8 for n in (16 * 6, 6 * 3 * 5, 3 * 3))
    save(model, tmp_path)
    loaded = load(tmp_path, cnn())
    assert [type(m) for m in loaded] == [type(m) for m in model]
    with torch.no_grad():
        assert (loaded(X) - before).abs().max().item() == 0


class Mixed(nn.Module):
    """Layers tnquant cannot handle, next to one it can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv3d(2, 2, 3)
        self.rnn = nn.LSTM(4, 4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.up = nn.ConvTranspose1d(2, 2, 3)
        self.fc = nn.Linear(8, 8)


@pytest.mark.parametrize(
    "verb",
    [
        lambda m: factorize(m, LowRank(rank=2), progress=False),
        lambda m: quantize(m, weights=QuantSpec(bits=8), progress=False),
    ],
    ids=["factorize", "quantize"],
)
def test_every_weight_left_float_is_a_skipped_row_with_its_reason(verb):
    model = Mixed()
    report = verb(model)
    assert [r["name"] for r in report] == ["fc"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["conv3"].startswith("Conv3d is not supported")
    assert reasons["rnn"].startswith("LSTM is not supported: its weights (weight_ih_l*")
    assert reasons["attn"].startswith("MultiheadAttention is not supported")
    assert reasons["up"].startswith("ConvTranspose1d is not supported: a transposed")
