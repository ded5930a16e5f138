"""The fused fake-quantization backends (C++ kernel, torch.compile) against eager LSQ."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from tnquant import QuantSpec, calibrate, finetune, quantize
from tnquant.qat.finetune import FUSED_AUTO_MIN, quantized_weights, use_fused
from tnquant.quant import cpu_kernel, fused
from tnquant.quant.primitives import fake_quantize_blocks
from tnquant.quant.ste import lsq_fake_quantize

pytestmark = pytest.mark.skipif(not fused.available(), reason="no fused backend builds here")


def _compiles() -> bool:
    with fused.fused(False, "compile"):
        return fused.available()


@pytest.fixture(params=["cpp", "compile"])
def backend(request, monkeypatch):
    """Each backend alone; the tests use small tensors: let them take the fused path."""
    if request.param == "cpp" and not cpu_kernel.available():
        pytest.skip("the C++ kernel does not build here")
    if request.param == "compile" and not _compiles():
        pytest.skip("torch.compile cannot build here")
    monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setitem(fused._STATE, "backend", request.param)
    return request.param


def _ties(shape, scale, seed):
    """Values with exact rounding ties (k + 0.5) * s and values beyond the range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 6 * scale.mean()
    flat = x.view(-1)
    ties = torch.randint(-9, 9, (flat.numel() // 4,), generator=g) + 0.5
    flat[: ties.numel()] = ties * scale.reshape(-1)[0]
    return x


def _run(x, s, zp, qmin, qmax, gs, rounding, on):
    x = x.clone().requires_grad_()
    s = s.clone().requires_grad_()
    zp = None if zp is None else zp.clone().requires_grad_()
    with fused.fused(on):
        out = lsq_fake_quantize(x, s, zp, qmin, qmax, gs, rounding=rounding)
    g = torch.Generator().manual_seed(3)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), x.grad, s.grad, None if zp is None else zp.grad


@pytest.mark.parametrize("rounding", ["nearest_even", "half_up", "floor"])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_equals_eager(rounding, affine, backend):
    s = torch.tensor([[0.25], [0.1], [0.5]]).repeat(4, 1)  # 12 channels, one a power of two
    x = _ties((12, 40), s, seed=1)
    zp = torch.full((12, 1), 3.0) if affine else None
    qmin, qmax = (0, 15) if affine else (-8, 7)
    eager = _run(x, s, zp, qmin, qmax, 0.03, rounding, on=False)
    fast = _run(x, s, zp, qmin, qmax, 0.03, rounding, on=True)
    assert torch.equal(fast[0], eager[0])  # forward values: bit for bit
    assert torch.equal(fast[1], eager[1])  # clipped straight-through input gradient
    for a, b in zip(fast[2:], eager[2:], strict=True):
        if b is not None:  # scale / zero-point: the same sums in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, learnable=True),
        QuantSpec(bits=3, granularity="channel", learnable=True),
        QuantSpec(bits=4, granularity=("group", 8), axis=1, learnable=True),
    ],
    ids=["tensor", "channel", "group"],
)
def test_fused_blocks_all_granularities(spec, backend):
    w = torch.randn(16, 32)
    scale = (w.abs().amax(1, keepdim=True) / 7) if spec.granularity == "channel" else None
    if spec.granularity == "tensor":
        scale, block = torch.tensor([w.abs().max() / 7]), (16, 32)
    elif spec.granularity == "channel":
        block = (1, 32)
    else:
        scale, block = w.reshape(16, 4, 8).abs().amax(-1) / 7, (1, 8)
    outs = []
    for on in (False, True):
        x, s = w.clone().requires_grad_(), scale.clone().requires_grad_()
        with fused.fused(on):
            out = fake_quantize_blocks(x, s, None, block, spec.qmin, spec.qmax, grad_scale=0.1)
        out.sum().backward()
        outs.append((out.detach(), x.grad, s.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-5, atol=1e-7)


def test_only_training_calls_are_fused_and_stochastic_stays_eager(monkeypatch):
    calls = []
    real = fused.fake_quantize
    monkeypatch.setattr(fused, "fake_quantize", lambda *a: calls.append(a) or real(*a))
    x, s = torch.randn(8, 4), torch.tensor([0.1])
    with fused.fused():
        lsq_fake_quantize(x, s, None, -8, 7)  # nothing requires grad: eager
        with torch.no_grad():
            lsq_fake_quantize(x.requires_grad_(), s, None, -8, 7)
        assert calls == []
        lsq_fake_quantize(x, s, None, -8, 7, rounding="stochastic")  # tried, refused
        assert fused.fake_quantize(x, s, None, -8, 7, 1.0, "stochastic") is None
    assert not fused.enabled()


def test_small_tensors_skip_the_compiled_backend(monkeypatch):
    monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", 100)
    monkeypatch.setitem(fused._STATE, "backend", "compile")
    calls = []
    monkeypatch.setattr(fused, "_compiled_fake_quantize", lambda *a: calls.append(a[0].numel()))
    s = torch.tensor([0.1], requires_grad=True)
    with fused.fused():
        lsq_fake_quantize(torch.randn(99), s, None, -8, 7)
        lsq_fake_quantize(torch.randn(100), s, None, -8, 7)
    assert calls == [100]


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ kernel does not build here")
def test_auto_takes_the_cpp_kernel_on_cpu_even_for_small_tensors(monkeypatch):
    monkeypatch.setattr(fused, "_compiled_fake_quantize", lambda *a: pytest.fail("compiled"))
    x, s = torch.randn(4, 3, requires_grad=True), torch.full((4, 1), 0.3, requires_grad=True)
    with fused.fused(backend="auto"):
        out = lsq_fake_quantize(x, s, None, -4, 3)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_CpuLSQBackward"
    assert torch.equal(out, lsq_fake_quantize(x.detach(), s.detach(), None, -4, 3))


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ kernel does not build here")
@pytest.mark.parametrize(
    ("x_shape", "s_shape", "rows"),
    [
        ((6, 5), (6, 1), 6),
        ((6, 5), (1,), 1),
        ((6, 5), (), 1),
        ((2, 3, 4), (2, 3, 1), 6),
        ((2, 3, 4), (2, 1, 1), 2),
        ((6, 5), (1, 5), None),
        ((2, 3, 4), (2, 1, 4), None),
    ],
)
def test_cpp_row_views(x_shape, s_shape, rows):
    """Scales constant along trailing dims map to rows; others are refused (None)."""
    x = torch.randn(x_shape)
    s = torch.rand(s_shape) + 0.1
    assert cpu_kernel._rows(x, s, None) == rows
    out = cpu_kernel.fake_quantize(x, s, None, -4, 3, 1.0, "nearest_even")
    assert (out is None) == (rows is None)
    if out is not None:
        assert torch.equal(out, lsq_fake_quantize(x, s, None, -4, 3))


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ kernel does not build here")
def test_cpp_refuses_what_it_does_not_handle():
    s = torch.tensor([0.1])
    assert (
        cpu_kernel.fake_quantize(torch.randn(4).half(), s.half(), None, -4, 3, 1.0, "nearest_even")
        is None
    )
    assert cpu_kernel.fake_quantize(torch.randn(4), s, None, -4, 3, 1.0, "stochastic") is None
    assert (
        cpu_kernel.fake_quantize(torch.randn(4), s.double(), None, -4, 3, 1.0, "nearest_even")
        is None
    )
    with pytest.raises(ValueError, match="backend"):
        fused.enable(True, "triton")


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(fused._STATE, "fn", broken)
    monkeypatch.setitem(fused._STATE, "broken", None)
    monkeypatch.setitem(fused._STATE, "backend", "compile")
    monkeypatch.setattr(fused, "FUSED_MIN_NUMEL", 0)
    x = torch.randn(6, requires_grad=True)
    s = torch.tensor([0.2], requires_grad=True)
    eager = lsq_fake_quantize(x, s, None, -4, 3)
    with fused.fused(), pytest.warns(RuntimeWarning, match="no compiler"):
        out = lsq_fake_quantize(x, s, None, -4, 3)
    assert torch.equal(out, eager)
    with fused.fused(), warnings.catch_warnings():
        warnings.simplefilter("error")
        lsq_fake_quantize(x, s, None, -4, 3)  # remembered: no second warning
    assert not fused.available("cpu") or fused._STATE["broken"] is not None


def test_cpp_build_failure_falls_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise RuntimeError("no g++")

    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.setitem(cpu_kernel._STATE, "module", None)
    monkeypatch.setitem(cpu_kernel._STATE, "broken", None)
    monkeypatch.setitem(fused._STATE, "backend", "cpp")
    x, s = torch.randn(6, requires_grad=True), torch.tensor([0.2], requires_grad=True)
    with fused.fused(), pytest.warns(RuntimeWarning, match="no g"):
        out = lsq_fake_quantize(x, s, None, -4, 3)
    assert torch.equal(out, lsq_fake_quantize(x.detach(), s, None, -4, 3))
    with fused.fused(), warnings.catch_warnings():
        warnings.simplefilter("error")
        lsq_fake_quantize(x, s, None, -4, 3)  # remembered: no second warning
    assert not cpu_kernel.available() and not fused.available("cpu")


def _student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    student = copy.deepcopy(teacher)
    quantize(
        student, weights=QuantSpec(bits=3, granularity="channel", learnable=True), progress=False
    )
    data = [torch.randn(32, 16) for _ in range(4)]
    calibrate(student, data, progress=False)
    return teacher, student, data


def test_finetune_fused_matches_eager_training(backend):
    teacher, student, data = _student()
    other = copy.deepcopy(student)
    kw = dict(teacher=teacher, epochs=10, lr=1e-2, progress=False)
    a = finetune(student, data, fused=False, **kw).history.loss
    b = finetune(other, data, fused=True, **kw).history.loss
    assert b[-1] < 0.7 * b[0]
    assert fused._STATE["broken"] is None
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-6)
    for p, q in zip(student.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    assert not fused.enabled()  # the process-wide setting is restored


def test_use_fused_auto_threshold():
    _, student, _ = _student()
    assert quantized_weights(student) == 16 * 32 + 32 * 8
    assert use_fused(student, "auto") is False
    assert use_fused(student, True) is True
    big = nn.Sequential(nn.Linear(1024, 1024))
    quantize(big, weights=QuantSpec(bits=4), progress=False)
    assert quantized_weights(big) == FUSED_AUTO_MIN
    assert use_fused(big, "auto") is True
    with pytest.raises(ValueError, match="fused"):
        finetune(student, [torch.randn(2, 16)], fused="yes", progress=False)
