"""``('group', n)`` with no axis groups the input (reduction) axis, as torchao/GPTQ/quanto do.

The reference is an independent numpy group-wise round-to-nearest: symmetric
int4, ``scale = max|w| / 7`` per group of ``n`` consecutive weights along a
Linear weight's ``in`` axis, ``q = clip(rint(w / scale), -8, 7)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tnquant import QuantSpec, load, quantize, save
from tnquant.layers import LowRankLinear, TTLinear
from tnquant.quant import fake_quantize
from tnquant.quant import quantize as quantize_tensor
from tnquant.registry import weight_pairs
from tnquant.specs import spec_from_dict, spec_to_dict

GROUP = 32
SPEC = QuantSpec(bits=4, granularity=("group", GROUP))


def numpy_group_rtn(w: np.ndarray, n: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise symmetric RTN of an ``(out, in)`` matrix along ``in``: (fake-quant, scales)."""
    out, inp = w.shape
    qmax = 2 ** (bits - 1) - 1
    groups = w.reshape(out, inp // n, n)
    scale = (np.abs(groups).max(axis=2, keepdims=True) / np.float32(qmax)).astype(np.float32)
    q = np.clip(np.rint(groups / scale), -qmax - 1, qmax)
    return (q * scale).astype(np.float32).reshape(out, inp), scale[..., 0]


def _weight(out: int = 8, inp: int = 96) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(0))


def test_default_groups_the_input_axis_of_a_linear_weight():
    w = _weight()
    codes, qp = quantize_tensor(w, SPEC)
    assert SPEC.axis is None
    assert tuple(qp.scale.shape) == (8, 96 // GROUP)  # one scale per (row, group of in)
    assert qp.block_size == (1, GROUP)
    # one group by hand: row 5, inputs 32..63
    group = w[5, 32:64].numpy()
    assert qp.scale[5, 1].item() == pytest.approx(float(np.abs(group).max()) / 7, rel=1e-6)
    ref, ref_scale = numpy_group_rtn(w.numpy(), GROUP)
    np.testing.assert_allclose(qp.scale.numpy(), ref_scale, rtol=1e-6, atol=0)
    got = fake_quantize(w, SPEC).numpy()
    np.testing.assert_array_equal(got, ref)  # the same float32 arithmetic: bit-identical
    # the codes of each group span the grid: every group holds a code of magnitude 7 or 8
    per_group = codes.reshape(8, 3, GROUP).abs().amax(dim=2)
    assert bool((per_group >= 7).all())


def test_explicit_axis_wins():
    w = _weight(64, 8)
    _, qp = quantize_tensor(w, QuantSpec(bits=4, granularity=("group", GROUP), axis=0))
    assert tuple(qp.scale.shape) == (2, 8)
    ref, _ = numpy_group_rtn(w.numpy().T.copy(), GROUP)  # groups along out = rows of w.T
    got = fake_quantize(w, QuantSpec(bits=4, granularity=("group", GROUP), axis=0))
    np.testing.assert_allclose(got.numpy(), ref.T, rtol=0, atol=1e-6)


def _block(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(q.qparams(t).block_size) for _, t, q in weight_pairs(module)]


def test_quantize_groups_each_layer_kind_along_its_reduction_axis():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(96, 8),
        nn.Conv2d(64, 4, 3),
        nn.Embedding(5, 64),
        LowRankLinear([torch.randn(64, 32), torch.randn(32, 96)]),
        TTLinear([torch.randn(1, 4, 4, 3), torch.randn(3, 4, 8, 1)]),
    )
    tt_spec = QuantSpec(bits=4, granularity=("group", 1))  # TT's boundary rank is 1
    quantize(model, weights={"4": tt_spec, "*": SPEC}, progress=False)
    assert _block(model[0]) == [(1, GROUP)]  # Linear (out, in): along in
    assert _block(model[1]) == [(1, GROUP, 1, 1)]  # conv (out, in, kh, kw): input channels
    assert _block(model[2]) == [(1, GROUP)]  # Embedding (num, dim): per row, along dim
    assert _block(model[3]) == [(1, GROUP), (1, GROUP)]  # U (out, r), V (r, in): each its r / in
    specs = [q.spec for _, _, q in weight_pairs(model[4])]
    assert [s.axis for s in specs] == [0, 0]  # TT cores: the old axis 0, pinned
    # the quantized Linear computes with the numpy reference's weight
    ref, _ = numpy_group_rtn(model[0].weight.detach().numpy(), GROUP)
    x = torch.randn(3, 96)
    want = x.double() @ torch.from_numpy(ref).double().T + model[0].bias.detach().double()
    torch.testing.assert_close(model[0](x).double(), want, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_groups_its_input_axis():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(8, 96))  # weight (in=96, out=8)
    quantize(model, weights=SPEC, progress=False)
    ((_, t, q),) = weight_pairs(model[0])
    assert tuple(t.shape) == (8, 96) and q.qparams(t).block_size == (1, GROUP)
    ref, _ = numpy_group_rtn(model[0].weight.detach().numpy().T.copy(), GROUP)
    x = torch.randn(2, 96)
    want = x.double() @ torch.from_numpy(ref).double().T + model[0].bias.detach().double()
    torch.testing.assert_close(model[0](x).double(), want, rtol=1e-5, atol=1e-5)


def test_group_size_not_dividing_the_input_axis_says_how_to_choose_another():
    with pytest.raises(ValueError, match=r"does not divide axis 1 of size 40.*give axis="):
        quantize(nn.Sequential(nn.Linear(40, 64)), weights=SPEC, progress=False)
    quantize(
        nn.Sequential(nn.Linear(40, 64)),
        weights=QuantSpec(4, granularity=("group", 32), axis=0),
        progress=False,
    )


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_axis_round_trips_through_dicts_and_files(tmp_path, axis):
    spec = QuantSpec(bits=4, granularity=("group", GROUP), axis=axis)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    quantize(model, weights=spec, progress=False)
    x = torch.randn(2, 64)
    y = model(x)
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m", model=nn.Sequential(nn.Linear(64, 64)))
    ((_, t, q),) = weight_pairs(loaded[0])
    assert q.spec.axis == axis  # an explicit axis (as every file before this default) stays
    assert q.qparams(t).block_size == ((GROUP, 1) if axis == 0 else (1, GROUP))
    assert torch.equal(loaded(x), y)
