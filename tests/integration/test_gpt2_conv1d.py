"""GPT-2's ``Conv1D`` projections through every verb, on a small random GPT-2.

References are plain torch/numpy: each factorized layer against ``x @ W + b``
with ``W`` rebuilt by numpy from its raw cores, each quantized one against a
numpy int4 per output feature; save/load against the saved model's own
logits, in this process and in a fresh one.
"""

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

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from tests.layers.refs import np64, rel_err, tt_weight_np, tucker_weight_np  # noqa: E402
from tnquant import (  # noqa: E402
    TT,
    LowRank,
    QuantSpec,
    Tucker,
    convert,
    factorize,
    load,
    model_size_bits,
    quantize,
    save,
)
from tnquant.layers import LowRankHFConv1D, QuantHFConv1D, TTHFConv1D, TuckerHFConv1D  # noqa: E402
from tnquant.sizes import size_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 64}
PROJECTIONS = [
    f"transformer.h.{i}.{p}"
    for i in range(2)
    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
MAKE = (
    "import torch\n"
    "from transformers import GPT2Config, GPT2LMHeadModel\n"
    "def make(config):\n"
    "    torch.manual_seed(0)\n"
    "    return GPT2LMHeadModel(GPT2Config(**config)).eval()\n"
)


def make() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _np_int4_out_features(w_in_out: torch.Tensor) -> np.ndarray:
    a = w_in_out.detach().numpy().T  # (out, in): one scale per output feature
    scale = (np.max(np.abs(a), axis=1, keepdims=True) / np.float32(7)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    return (np.clip(np.round(a / scale), -8, 7) * scale).astype(np.float32).T


def test_quantize_touches_every_conv1d_and_sizes_count_them():
    model = make()
    weights = {n: model.get_submodule(n).weight for n in PROJECTIONS}
    report = quantize(model, weights=QuantSpec(bits=4, granularity="channel"), progress=False)
    rows = {r["name"]: r for r in report}
    assert all(
        rows[n]["kind"] == "Conv1D" and rows[n]["weights"] == "int4/channel" for n in PROJECTIONS
    )
    for name in PROJECTIONS:
        layer = model.get_submodule(name)
        assert type(layer) is QuantHFConv1D and layer.weight is weights[name]
        x = torch.randn(3, layer.nx)
        ref = x.numpy() @ _np_int4_out_features(weights[name]) + layer.bias.detach().numpy()
        np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=1e-5)
    before, bits = _logits(model), model_size_bits(model)
    convert(model, progress=False)
    assert torch.equal(_logits(model), before) and model_size_bits(model) == bits
    sizes = {r["name"]: r for r in size_report(model)}
    for name in PROJECTIONS:
        nx, nf = weights[name].shape
        assert sizes[name]["state"] == "converted" and sizes[name]["codes_bits"] == nx * nf * 4


def _matrix(layer: nn.Module) -> np.ndarray:
    """The layer's ``(out, in)`` matrix, rebuilt by numpy from its raw cores."""
    cores = list(layer.cores)
    if isinstance(layer, LowRankHFConv1D):
        return np64(cores[0]) @ np64(cores[1])
    if isinstance(layer, TTHFConv1D):
        return tt_weight_np(cores, layer.out_features, layer.in_features)
    return tucker_weight_np(cores, layer.out_features, layer.in_features)


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        (LowRank(ratio=0.5), LowRankHFConv1D),
        (TT(ratio=0.5), TTHFConv1D),
        (Tucker(ratio=0.5), TuckerHFConv1D),
    ],
    ids=["LowRank", "TT", "Tucker"],
)
def test_factorize_replaces_every_conv1d(spec, cls):
    model = make()
    biases = {n: model.get_submodule(n).bias.detach().clone() for n in PROJECTIONS}
    report = factorize(model, {"transformer.h.*": spec}, progress=False)
    rows = {r["name"]: r for r in report}
    assert sorted(rows) == sorted(PROJECTIONS) and {r["kind"] for r in report} == {"Conv1D"}
    x = torch.randn(5, 256)
    for name in PROJECTIONS:
        layer = model.get_submodule(name)
        assert type(layer) is cls and rows[name]["params_after"] < rows[name]["params_before"]
        w = _matrix(layer).T  # (in, out): Conv1D's layout
        ref = np64(x[:, : layer.nx]) @ w + np64(biases[name])
        assert rel_err(np64(layer(x[:, : layer.nx])), ref) < 1e-5
        np.testing.assert_allclose(np64(layer.eval().weight), w, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(_logits(model)).all()


def test_factorize_with_data_fits_the_conv1d_outputs():
    model = make()
    report = factorize(
        model, {"*.mlp.c_fc": LowRank(rank=8)}, data=[{"input_ids": IDS}], progress=False
    )
    assert [r["name"] for r in report] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert all(r["out_rel_error"] is not None for r in report)


def _compressed() -> GPT2LMHeadModel:
    model = make()
    factorize(
        model,
        {"*.attn.c_attn": LowRank(ratio=0.5), "*.mlp.c_fc": TT(ratio=0.5), "*.mlp.c_proj": None},
        progress=False,
    )
    quantize(
        model,
        weights={"lm_head": None, "*": QuantSpec(bits=4, granularity="channel")},
        progress=False,
    )
    convert(model, progress=False)
    return model


def test_convert_save_and_load_here_and_in_a_fresh_process(tmp_path):
    model = _compressed()
    assert type(model.transformer.h[0].mlp.c_proj) is QuantHFConv1D
    expected = _logits(model)
    save(model, tmp_path / "saved")
    loaded = load(tmp_path / "saved", make())
    assert (_logits(loaded) - expected).abs().max().item() == 0
    np.save(tmp_path / "expected.npy", expected.numpy())
    script = MAKE + (
        "import sys, json, numpy as np\n"
        "from tnquant import load\n"
        "d, config = sys.argv[1], json.loads(sys.argv[2])\n"
        "model = load(d + '/saved', make(config))\n"
        "with torch.no_grad():\n"
        "    got = model(torch.from_numpy(np.load(d + '/ids.npy'))).logits.numpy()\n"
        "print(type(model.transformer.h[0].attn.c_attn).__name__, "
        "float(np.abs(got - np.load(d + '/expected.npy')).max()))\n"
    )
    np.save(tmp_path / "ids.npy", IDS.numpy())
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(CONFIG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["LowRankHFConv1D", "0.0"]


def test_load_checks_a_conv1d_stood_where_its_layer_stands(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4))
    factorize(model, LowRank(rank=2), progress=False)
    save(model, tmp_path)
    with pytest.raises(ValueError, match="is a Linear, expected a Conv1D"):
        load(tmp_path, nn.Sequential(nn.Linear(4, 6)))
    with pytest.raises(ValueError, match="has nf=5, the saved LowRankHFConv1D expects 6"):
        load(tmp_path, nn.Sequential(Conv1D(5, 4)))
    fresh = load(tmp_path, nn.Sequential(Conv1D(6, 4)))
    x = torch.randn(3, 4)
    assert type(fresh[0]) is LowRankHFConv1D and torch.equal(fresh(x), model(x))


def test_gptq_rounds_a_conv1d_as_the_linear_it_is():
    from tnquant.ptq import calibrate, gptq

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(16, 16))
    linear = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.T)
        linear[0].bias.copy_(conv[0].bias)
    data = [torch.randn(64, 16) * torch.linspace(0.1, 2, 16)]
    for model in (conv, linear):
        quantize(model, weights=QuantSpec(bits=3, granularity="channel"), progress=False)
        calibrate(model, data, progress=False)
        gptq(model, data, progress=False)
    assert not torch.equal(conv[0].weight.T, linear[0].weight.new_zeros(16, 16))
    torch.testing.assert_close(conv[0].weight.T, linear[0].weight, rtol=1e-6, atol=1e-6)
    x = data[0][:5]
    torch.testing.assert_close(conv(x), linear(x), rtol=1e-5, atol=1e-5)
