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


# --- data and models that cannot be used are refused before anything changes ---------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("empty", [[], (), iter([])])
@pytest.mark.parametrize("aware", [True, None])
def test_empty_data_is_refused_and_nothing_changes(empty, aware):
    model = _mlp()
    with pytest.raises(ValueError, match="factorize needs at least one batch of data"):
        factorize(model, LowRank(rank=2), data=empty, data_aware=aware, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_data_aware_false_ignores_the_data():
    model = _mlp()
    factorize(model, LowRank(rank=2), data=[], data_aware=False, progress=False)
    assert type(model[0]) is LowRankLinear


def test_non_finite_data_is_refused_naming_the_batch_and_nothing_changes():
    model = _mlp()
    bad = torch.randn(5, 8)
    bad[2, 3] = float("nan")
    bad[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"factorize: batch 1 of data holds 2 non-finite values"):
        factorize(model, LowRank(rank=2), data=[torch.randn(5, 8), bad], progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_data_that_is_not_iterable_is_refused():
    with pytest.raises(TypeError, match="factorize: data must be an iterable of batches"):
        factorize(_mlp(), LowRank(rank=2), data=3, progress=False)
    with pytest.raises(TypeError, match="data_aware must be True, False or None"):
        factorize(
            _mlp(), LowRank(rank=2), data=[torch.randn(2, 8)], data_aware="yes", progress=False
        )


def test_meta_model_is_refused_with_how_to_materialize():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(
        ValueError,
        match=r"factorize needs the model's values, but parameter "
        r"'0.weight' is on the meta device.*to_empty",
    ):
        factorize(model, LowRank(rank=2), progress=False)
    report = factorize(model, {"nothing.*": LowRank(rank=2)}, progress=False)  # no target
    assert report.rows == [] and type(model[0]) is nn.Linear


def test_a_linear_the_data_never_reaches_is_fitted_to_its_weight_and_says_so():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model.unused)
    report = factorize(model, LowRank(rank=2), data=[torch.randn(16, 8)], progress=False)
    assert "not reached by the data" in report["unused"]["note"]
    assert not (report["used"]["note"] or "").count("not reached")
    alone = nn.Sequential(reference)
    factorize(alone, LowRank(rank=2), progress=False)  # the weight-only fit
    torch.testing.assert_close(model.unused.to_dense().weight, alone[0].to_dense().weight)


# --- patterns go through the one glob table, as in quantize ---------------------------------


def test_a_pattern_that_matches_nothing_is_listed_in_skipped():
    model = _net()
    report = factorize(model, {"head": LowRank(rank=2), "decoder.*": TT(rank=2)}, progress=False)
    assert type(model.head) is LowRankLinear
    assert [(s["name"], s["kind"], s["reason"]) for s in report.skipped] == [
        ("factorize['decoder.*']", "pattern", "matched nothing")
    ]


def test_a_shadowed_pattern_is_refused_before_anything_changes():
    model = _net()
    with pytest.raises(
        ValueError,
        match=r"factorize pattern 'blocks.0.attn' is never used: every "
        r"name it matches \(e.g. 'blocks.0.attn'\) is matched "
        r"first by 'blocks.\*'",
    ):
        factorize(model, {"blocks.*": LowRank(rank=2), "blocks.0.attn": TT(rank=2)}, progress=False)
    assert type(model.blocks[0].attn) is nn.Linear
