"""Distillation losses against numpy float64 formulas; output extraction; hidden hooks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tnquant.qat.losses import (
    HiddenCollector,
    cosine_loss,
    default_outputs,
    kl_loss,
    mse_loss,
    resolve_loss,
)

RTOL = 1e-5  # float32 losses against float64 numpy


def _pair(seed, shape=(3, 5, 7)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_matches_numpy(seed):
    s, t = _pair(seed)
    ref = np.mean((s.double().numpy() - t.double().numpy()) ** 2)
    assert mse_loss(s, t).item() == pytest.approx(ref, rel=RTOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_matches_numpy(seed):
    s, t = _pair(seed)
    a, b = s.double().numpy(), t.double().numpy()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine_loss(s, t).item() == pytest.approx(1.0 - cos.mean(), rel=RTOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_numpy(temperature):
    s, t = _pair(3)
    a = s.double().numpy().reshape(-1, 7) / temperature
    b = t.double().numpy().reshape(-1, 7) / temperature
    lp_s, lp_t = _log_softmax(a), _log_softmax(b)
    ref = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1).mean() * temperature**2
    assert kl_loss(s, t, temperature).item() == pytest.approx(ref, rel=RTOL)
    assert resolve_loss("kl", temperature)(s, t).item() == pytest.approx(ref, rel=RTOL)


def test_losses_are_zero_on_equal_inputs_and_upcast_half_precision():
    s, _ = _pair(4)
    for fn in (mse_loss, cosine_loss, kl_loss):
        assert abs(fn(s, s.clone()).item()) < 1e-6
    out = mse_loss(s.bfloat16(), s)
    assert out.dtype == torch.float32


def test_teacher_side_gets_no_gradient():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    mse_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_shape_mismatch_and_bad_arguments_say_what_came():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        mse_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be a number > 0, got 0"):
        resolve_loss("kl", 0)
    with pytest.raises(ValueError, match=r"loss must be one of \['cosine', 'kl', 'mse'\]"):
        resolve_loss("l1")
    fn = lambda s, t: (s - t).abs().mean()  # noqa: E731
    assert resolve_loss(fn) is fn


def test_default_outputs_reads_common_output_types():
    x = torch.ones(2)
    assert default_outputs(x) is x
    assert default_outputs((x, torch.zeros(1))) is x
    assert default_outputs(SimpleNamespace(logits=x, last_hidden_state=None)) is x
    assert default_outputs(SimpleNamespace(last_hidden_state=x)) is x
    assert default_outputs({"last_hidden_state": x}) is x
    with pytest.raises(TypeError, match="outputs=lambda out"):
        default_outputs(SimpleNamespace(pooler=x))


def test_hidden_collector_records_and_removes_hooks():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(4, 2)
    with HiddenCollector(model, ["0", "2"]) as hidden:
        model(x)
        first, last = hidden.take()
        with pytest.raises(RuntimeError, match=r"\['0', '2'\] did not run"):
            hidden.take()
    torch.testing.assert_close(first, model[0](x), rtol=0, atol=0)
    assert last.shape == (4, 1)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        HiddenCollector(model, ["nope"])
