"""Model-wide factorize(): which modules change, which stay bit-identical."""

import copy

import pytest
import torch
from torch import nn

from tnquant import CP, TT, LowRank, Tucker, factorize
from tnquant.layers import LowRankLinear, TTLinear, TuckerConv2d, TuckerLinear


class Block(nn.Module):
    def __init__(self, shared: nn.Linear):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.shared = shared

    def forward(self, x):
        return self.shared(self.mlp(self.attn(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(32, 32)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8 * 4 * 4, 32)
        self.blocks = nn.ModuleList([Block(shared), Block(shared)])
        self.head = nn.Linear(32, 10)

    def forward(self, img):
        x = torch.relu(self.conv(img))
        x = self.proj(x.flatten(1))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _net():
    torch.manual_seed(0)
    return Net().double()


def test_mapping_replaces_exactly_the_matched_modules():
    model = _net()
    original = copy.deepcopy(model)
    report = factorize(
        model,
        {
            "blocks.*.mlp.0": TT(rank=4, order=2),
            "blocks.1.attn": LowRank(rank=3),
            "conv": Tucker(rank=(4, 2)),
        },
        progress=False,
    )
    assert isinstance(model.blocks[0].mlp[0], TTLinear)
    assert isinstance(model.blocks[1].mlp[0], TTLinear)
    assert isinstance(model.blocks[1].attn, LowRankLinear)
    assert isinstance(model.conv, TuckerConv2d)
    assert {r["name"] for r in report} == {
        "blocks.0.mlp.0",
        "blocks.1.mlp.0",
        "blocks.1.attn",
        "conv",
    }
    changed = ("blocks.0.mlp.0.", "blocks.1.mlp.0.", "blocks.1.attn.", "conv.")
    new_state = model.state_dict()
    for key, value in original.state_dict().items():
        if key.startswith(changed):
            continue
        assert torch.equal(new_state[key], value), key
    assert type(model.blocks[0].attn) is nn.Linear
    assert type(model.head) is nn.Linear


def test_shared_module_factorized_once_and_still_shared():
    model = _net()
    report = factorize(model, {"blocks.0.shared": Tucker(rank=4)}, progress=False)
    assert isinstance(model.blocks[0].shared, TuckerLinear)
    assert model.blocks[0].shared is model.blocks[1].shared
    assert len(report) == 1
    assert "shared with blocks.1.shared" in report["blocks.0.shared"]["note"]


def test_single_spec_with_include_exclude_and_full_rank_outputs():
    model = _net()
    reference = copy.deepcopy(model)
    report = factorize(
        model, LowRank(rank="full"), include=["blocks.*"], exclude=["*.shared"], progress=False
    )
    assert all(r["name"].startswith("blocks.") and "shared" not in r["name"] for r in report)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)


def test_unsupported_pairs_are_skipped_with_reason():
    model = _net()
    report = factorize(model, {"head": CP(rank=2), "conv": TT(rank=2)}, progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert "CP is not supported on Linear" in reasons["head"]
    assert "TT is not supported on Conv2d" in reasons["conv"]
    assert type(model.head) is nn.Linear


def test_grouped_conv_is_skipped():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    report = factorize(model, Tucker(rank=2), progress=False)
    assert "groups=2" in report.skipped[0]["reason"]


def test_data_aware_lowers_output_error():
    torch.manual_seed(1)
    lin = nn.Linear(48, 40).double()
    # anisotropic inputs: a few directions carry most of the energy
    basis = torch.randn(48, 48, dtype=torch.float64)
    scales = torch.logspace(1, -2, 48, dtype=torch.float64)
    data = [torch.randn(64, 48, dtype=torch.float64) * scales @ basis for _ in range(4)]
    x_test = torch.randn(256, 48, dtype=torch.float64) * scales @ basis
    errors = {}
    for aware in (False, True):
        model = nn.Sequential(copy.deepcopy(lin))
        factorize(model, LowRank(rank=6), data=data, data_aware=aware, progress=False)
        out = model(x_test) - model[0].bias
        ref = lin(x_test) - lin.bias
        errors[aware] = ((out - ref).norm() / ref.norm()).item()
    assert errors[True] < errors[False]


def test_bad_arguments():
    model = _net()
    with pytest.raises(TypeError, match="expected a TT, Tucker, CP or LowRank spec"):
        factorize(model, {"head": "tt"}, progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        factorize(model, TT(rank=2), data_aware=True, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        factorize("model", TT(rank=2))
