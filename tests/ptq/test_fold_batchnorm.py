"""fold_batchnorm: the eval-mode model before folding is the reference, torch's BatchNorm the math.

Every case randomises the running statistics, the affine parameters and
``eps`` (the defaults 0/1 would hide a wrong formula), runs the model in
eval mode, folds, and compares the outputs; the weight-level checks rebuild
``s * W`` and ``s * (b - mean) + beta`` in numpy from the statistics.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import QuantSpec, quantize
from tnquant.layers import (
    CPConv2d,
    LowRankHFConv1D,
    LowRankLinear,
    TTLinear,
    TuckerConv1d,
    TuckerConv2d,
    TuckerLinear,
)
from tnquant.ptq import fold_batchnorm

F64_RTOL = 1e-10  # float64 model: folding is exact up to float64 rounding
F32_RTOL = 1e-5  # float32 model, relative to the output's largest magnitude


def _randomise(bn: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen) * 4 - 2)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.05)
        if bn.affine:
            signs = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
            bn.weight.copy_(signs * (torch.rand(c, generator=gen) * 2 + 0.2))
            bn.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
    bn.eps = 1e-3
    return bn


def _bn(dims: int, c: int, seed: int = 0, affine: bool = True) -> nn.Module:
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return _randomise(cls(c, affine=affine), seed)


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = conv1d(nf, nx)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


# producer, BatchNorm dims, input shape
CASES = {
    "linear": (lambda: nn.Linear(6, 5), 1, (7, 6)),
    "linear-nobias": (lambda: nn.Linear(6, 5, bias=False), 1, (7, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), 1, (2, 3, 9)),
    "conv1d-grouped-stride": (lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2), 1, (2, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), 2, (2, 3, 9, 9)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), 2, (2, 4, 6, 6)),
    "conv2d-grouped-reflect": (
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
        2,
        (2, 4, 6, 5),
    ),
    "lowrank": (
        lambda: LowRankLinear([torch.randn(5, 2), torch.randn(2, 6)], bias=torch.randn(5)),
        1,
        (7, 6),
    ),
    "lowrank-nobias": (lambda: LowRankLinear([torch.randn(5, 2), torch.randn(2, 6)]), 1, (7, 6)),
    "tucker-linear": (
        lambda: TuckerLinear([torch.randn(5, 3), torch.randn(3, 2), torch.randn(6, 2)]),
        1,
        (7, 6),
    ),
    "tucker-conv2d": (
        lambda: TuckerConv2d(
            [torch.randn(6, 2), torch.randn(2, 3, 3, 3), torch.randn(4, 3)],
            stride=2,
            padding=1,
            bias=torch.randn(6),
        ),
        2,
        (2, 4, 7, 7),
    ),
    "tucker-conv1d": (
        lambda: TuckerConv1d([torch.randn(6, 2), torch.randn(2, 3, 3), torch.randn(4, 3)]),
        1,
        (2, 4, 9),
    ),
    "cp-conv2d": (
        lambda: CPConv2d([torch.randn(n, 3) for n in (6, 4, 3, 3)], padding=1),
        2,
        (2, 4, 6, 6),
    ),
    "hf-conv1d": (lambda: _hf_conv1d(5, 6), 1, (7, 6)),
    "lowrank-hf-conv1d": (
        lambda: LowRankHFConv1D([torch.randn(5, 2), torch.randn(2, 6)], bias=torch.randn(5)),
        1,
        (7, 6),
    ),
}


def _out_channels(layer: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "nf"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    raise AssertionError(f"no output size on {type(layer).__name__}")


def _case(key: str, dtype=torch.float64, affine: bool = True):
    torch.manual_seed(0)
    build, dims, shape = CASES[key]
    layer = build()
    model = nn.Sequential(layer, _bn(dims, _out_channels(layer), affine=affine))
    return model.to(dtype).eval(), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("key", list(CASES))
def test_fold_keeps_the_eval_output(key, affine):
    model, x = _case(key, affine=affine)
    layer_cls, n_cores = type(model[0]), len(getattr(model[0], "cores", ()))
    with torch.no_grad():
        before = model(x)
    report = fold_batchnorm(model, progress=False)
    assert isinstance(model[1], nn.Identity)
    assert type(model[0]) is layer_cls and len(getattr(model[0], "cores", ())) == n_cores
    assert report["1"]["into"] == "0" and report["1"]["kind"] in ("BatchNorm1d", "BatchNorm2d")
    assert report["1"]["layer"] == layer_cls.__name__ and not report.skipped
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=F64_RTOL, atol=F64_RTOL * before.abs().max())


@pytest.mark.parametrize("key", ["linear", "conv2d-depthwise", "lowrank", "tucker-conv2d"])
def test_fold_in_float32_keeps_dtype_and_output(key):
    model, x = _case(key, dtype=torch.float32)
    with torch.no_grad():
        before = model(x)
    fold_batchnorm(model, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=F32_RTOL, atol=F32_RTOL * before.abs().max())


def test_folded_weight_and_bias_are_the_formula():
    model, _ = _case("conv2d")  # no bias: fold creates one
    conv, bn = model
    w = conv.weight.detach().numpy().copy()
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    s = gamma / np.sqrt(var + bn.eps)
    report = fold_batchnorm(model, progress=False)
    np.testing.assert_allclose(conv.weight.detach().numpy(), s[:, None, None, None] * w, rtol=1e-12)
    assert isinstance(conv.bias, nn.Parameter) and conv.bias.dtype == torch.float64
    np.testing.assert_allclose(conv.bias.detach().numpy(), beta - s * mean, rtol=1e-12, atol=1e-12)
    assert report["1"]["note"] == "bias added"


def test_factorized_fold_scales_only_the_output_core():
    model, _ = _case("tucker-conv2d")
    layer, bn = model
    cores = [c.detach().clone() for c in layer.cores]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    fold_batchnorm(model, progress=False)
    torch.testing.assert_close(layer.cores[0].detach(), s[:, None] * cores[0], rtol=1e-12, atol=0)
    for new, old in zip(list(layer.cores)[1:], cores[1:], strict=True):
        assert torch.equal(new.detach(), old)


class _Residual(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = _bn(2, c, seed=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = _bn(2, c, seed=2)
        self.fc = LowRankLinear([torch.randn(3, 2), torch.randn(2, c)])
        self.bn3 = _bn(1, 3, seed=3)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = torch.relu(y + x)  # the skip connection
        return self.bn3(self.fc(y.mean((2, 3))))


def test_residual_block_is_traced_and_folded():
    torch.manual_seed(0)
    model = _Residual().double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    report = fold_batchnorm(model, progress=False)
    assert {r["name"]: r["into"] for r in report} == {"bn1": "conv1", "bn2": "conv2", "bn3": "fc"}
    assert all(isinstance(getattr(model, n), nn.Identity) for n in ("bn1", "bn2", "bn3"))
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=F64_RTOL, atol=F64_RTOL * before.abs().max())


class _TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = _bn(2, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _skips(report) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in report.skipped}


def _snapshot(model: nn.Module):
    return [type(m) for m in model.modules()], copy.deepcopy(model.state_dict())


def _assert_untouched(model: nn.Module, snapshot) -> None:
    types, state = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def test_producer_output_with_two_users_is_skipped():
    model = _TwoUsers().eval()
    snap = _snapshot(model)
    report = fold_batchnorm(model, progress=False)
    assert len(report) == 0 and "also read by" in _skips(report)["bn"]
    _assert_untouched(model, snap)


def test_bn_after_relu_and_after_tt_are_skipped_and_left_alone():
    tt = TTLinear([torch.randn(1, 4, 4, 3), torch.randn(3, 4, 4, 1)])
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), _bn(1, 4), nn.Linear(4, 16), tt, _bn(1, 16)
    ).eval()
    snap = _snapshot(model)
    report = fold_batchnorm(model, progress=False)
    skips = _skips(report)
    assert len(report) == 0 and set(skips) == {"2", "5"}
    assert "ReLU" in skips["2"]
    assert "TTLinear" in skips["5"] and "spread over all" in skips["5"]
    _assert_untouched(model, snap)


def test_tensorized_tucker_linear_is_skipped():
    layer = TuckerLinear([torch.randn(2, 2, 2, 2), *(torch.randn(2, 2) for _ in range(4))])
    model = nn.Sequential(layer, _bn(1, 4)).eval()
    reason = _skips(fold_batchnorm(model, progress=False))["1"]
    assert "order 2" in reason and isinstance(model[1], nn.BatchNorm1d)


def test_training_mode_bn_is_skipped_with_the_fix():
    model, x = _case("conv2d")
    model.train()
    snap = _snapshot(model)
    report = fold_batchnorm(model, progress=False)
    assert "training mode" in _skips(report)["1"] and "model.eval()" in _skips(report)["1"]
    _assert_untouched(model, snap)
    model.eval()
    assert fold_batchnorm(model, progress=False)["1"]["into"] == "0"


def test_bn_without_running_stats_is_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    snap = _snapshot(model)
    assert "running statistics" in _skips(fold_batchnorm(model, progress=False))["1"]
    _assert_untouched(model, snap)


def test_channel_kind_mismatch_and_first_module_are_skipped():
    model = nn.Sequential(_bn(2, 4), nn.Conv1d(4, 4, 1), _bn(2, 4), nn.Linear(4, 4), _bn(1, 5))
    skips = _skips(fold_batchnorm(model.eval(), progress=False))
    assert "first module" in skips["0"]
    assert "BatchNorm1d" in skips["2"] and "Conv1d" in skips["2"]
    assert "5 features" in skips["4"] and "4 output channels" in skips["4"]


def test_quantized_producer_is_refused_and_untouched():
    model, _ = _case("linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, weights=QuantSpec(bits=4), progress=False)
    snap = _snapshot(model)
    reason = _skips(fold_batchnorm(model, progress=False))["1"]
    assert reason == "fold BatchNorm before quantize (quantize after folding)"
    _assert_untouched(model, snap)


def test_shared_producer_and_tied_weight_are_skipped():
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, _bn(1, 4), nn.ReLU(), lin).eval()
    assert "2 names" in _skips(fold_batchnorm(shared, progress=False))["1"]
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    tied = nn.Sequential(a, _bn(1, 4), b).eval()
    snap = _snapshot(tied)
    assert "tied" in _skips(fold_batchnorm(tied, progress=False))["1"]
    _assert_untouched(tied, snap)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(2, 4, seed=4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = _bn(2, 4, seed=5)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_falls_back_to_the_sequential_rule():
    torch.manual_seed(0)
    model = _Untraceable().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    report = fold_batchnorm(model, progress=False)
    assert report["body.1"]["into"] == "body.0" and isinstance(model.body[1], nn.Identity)
    assert "torch.fx" in _skips(report)["bn"] and isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=F64_RTOL, atol=F64_RTOL * before.abs().max())


def test_nested_sequentials_are_one_chain():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4)), nn.Sequential(_bn(1, 4), nn.ReLU()))
    report = fold_batchnorm(model.eval(), progress=False)
    assert report["1.0"]["into"] == "0.0"


def test_report_prints_and_bad_input_raises():
    model, _ = _case("linear")
    text = str(fold_batchnorm(model, progress=False))
    assert text.startswith("fold_batchnorm") and "BatchNorm1d" in text
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        fold_batchnorm([model], progress=False)


def _bn_cnn() -> nn.Module:
    """The digits CNN of ``tnquant.cli.inputs.digits_cnn`` with a BatchNorm after each conv."""
    features = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        _bn(2, 16, seed=6),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        _bn(2, 32, seed=7),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    classifier = nn.Sequential(nn.Linear(512, 64), _bn(1, 64, seed=8), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(features, classifier)


def test_digits_cnn_folds_then_quantizes_without_warning():
    torch.manual_seed(0)
    model = _bn_cnn().eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    report = fold_batchnorm(model, progress=False)
    assert [(r["name"], r["into"]) for r in report] == [
        ("0.1", "0.0"),
        ("0.4", "0.3"),
        ("1.1", "1.0"),
    ]
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=F32_RTOL, atol=F32_RTOL * before.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(model, weights=QuantSpec(bits=8, granularity="channel"), progress=False)


def test_quantize_without_fold_warns_once_per_bn():
    model = _bn_cnn().eval()
    with pytest.warns(UserWarning, match="fold_batchnorm") as record:
        quantize(model, weights=QuantSpec(bits=8), progress=False)
    texts = [str(w.message) for w in record if "fold_batchnorm" in str(w.message)]
    assert len(texts) == 3
    assert texts[0] == (
        "0.1 (BatchNorm2d) follows 0.0, which is being quantized: fold it first with "
        "tnquant.ptq.fold_batchnorm(model) so the quantizer sees the folded weights"
    )


def test_quantize_of_layers_not_before_a_bn_does_not_warn():
    model = _bn_cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(model, weights={"1.3": QuantSpec(bits=8)}, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", ["conv2d", "lowrank-nobias", "cp-conv2d"])
def test_fold_on_cuda_matches_cpu(key):
    model, x = _case(key, dtype=torch.float32)
    on_gpu = copy.deepcopy(model).cuda()
    fold_batchnorm(model, progress=False)
    fold_batchnorm(on_gpu, progress=False)
    assert all(p.is_cuda for p in on_gpu.parameters())
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), model(x), rtol=1e-5, atol=1e-5)
