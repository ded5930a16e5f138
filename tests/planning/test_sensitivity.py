"""Sensitivities: sizes as model_size_bits counts them, errors against numpy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.planning.toys import batches, cnn, mlp
from tnquant import LowRank, QuantSpec, model_size_bits
from tnquant.planning import Candidates, Choice, Plan, apply, search, sensitivity

ERR_RTOL = 1e-6  # float32 forward vs the float64 numpy reference


def int_fake_quant_rows(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-row fake quantization, min-max scale, round half to even (numpy)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    scale = np.abs(w).max(axis=1, keepdims=True) / qmax
    return np.clip(np.round(w / scale), qmin, qmax) * scale


def test_sizes_match_model_size_bits_of_the_applied_model():
    model = mlp()
    sens = sensitivity(model, batches(), progress=False)
    assert sens.dense_bits == model_size_bits(model)
    for k, name in enumerate(sens.names):
        for c, choice in enumerate(sens.choices[k]):
            applied = copy.deepcopy(model)
            apply(applied, Plan({name: choice}), progress=False)
            others = sum(
                sens.sizes[j][[i for i, ch in enumerate(sens.choices[j]) if ch == Choice()][0]]
                for j in range(len(sens.names))
                if j != k
            )
            assert model_size_bits(applied) == sens.fixed_bits + others + sens.sizes[k][c], (
                name,
                choice.label(),
            )


def test_layer_error_matches_numpy_reference():
    model = mlp()
    data = batches()
    choices = [Choice(None, QuantSpec(bits=b, granularity="channel")) for b in (8, 4, 2)]
    sens = sensitivity(model, data, choices, include=["0"], progress=False)
    x = torch.cat(data).double().numpy()
    w = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    ref = x @ w.T + b
    for choice, err in zip(sens.choices[0], sens.errors[0], strict=True):
        wq = int_fake_quant_rows(w.astype(np.float32).astype(np.float64), choice.weights.bits)
        expected = ((x @ wq.T + b - ref) ** 2).sum() / (ref**2).sum()
        assert err == pytest.approx(expected, rel=1e-3)
    assert sens.errors[0][0] < sens.errors[0][1] < sens.errors[0][2]


def test_lowrank_error_is_the_svd_tail_on_whitened_free_data():
    # inputs = identity rows: the output error is the weight error, the SVD tail
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    data = [torch.eye(16)]
    sens = sensitivity(model, data, [Choice(LowRank(rank=4))], progress=False)
    s = np.linalg.svd(model[0].weight.detach().double().numpy(), compute_uv=False)
    assert sens.errors[0][0] == pytest.approx((s[4:] ** 2).sum() / (s**2).sum(), rel=ERR_RTOL)
    assert sens.ranks[0][0] == (4,)


def _correlated(n_rows: int = 256, d: int = 16, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(1)
    return torch.randn(n_rows, d, generator=g) @ mix


def test_data_aware_lowrank_error_is_the_svd_tail_of_the_outputs():
    # the best rank-r X W_hat^T in Frobenius norm is the rank-r truncation of Y = X W^T
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    x = _correlated()
    plain = sensitivity(model, [x], [Choice(LowRank(rank=4))], progress=False)
    fitted = sensitivity(model, [x], [Choice(LowRank(rank=4))], fit_data=[x], progress=False)
    y = x.double().numpy() @ model[0].weight.detach().double().numpy().T
    s = np.linalg.svd(y, compute_uv=False)
    assert fitted.errors[0][0] == pytest.approx((s[4:] ** 2).sum() / (s**2).sum(), rel=1e-4)
    assert fitted.errors[0][0] < 0.5 * plain.errors[0][0]
    assert fitted.sizes == plain.sizes and fitted.data_aware and not plain.data_aware


def test_data_aware_search_verifies_the_data_aware_plan():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    data = [_correlated(128), _correlated(128, seed=4)]
    cands = Candidates(
        formats=("lowrank",),
        ratios=(0.25,),
        bits=(8,),
        ternary=False,
        binary=False,
        keep_float=False,
        dense=False,
    )
    fit = data + [_correlated(128, seed=5)]  # more rows to fit on than to measure with
    plan = search(
        model,
        data,
        metric="output",
        budget_bits=10**6,
        candidates=cands,
        include=["0"],
        fit_data=fit,
        progress=False,
    )
    by_hand = copy.deepcopy(model)
    apply(by_hand, plan, data=fit, progress=False)
    with torch.no_grad():
        ref, new = torch.cat([model(x) for x in data]), torch.cat([by_hand(x) for x in data])
    err = float((new - ref).pow(2).sum() / ref.pow(2).sum())
    assert plan.measured_output_error == pytest.approx(err, rel=1e-5)
    plain = search(
        model,
        data,
        metric="output",
        budget_bits=10**6,
        candidates=cands,
        include=["0"],
        progress=False,
    )
    assert plan.measured_output_error < plain.measured_output_error
    sens = sensitivity(model, data, cands, "output", include=["0"], fit_data=fit, progress=False)
    with pytest.raises(ValueError, match="pass the same fit_data"):
        search(model, data, "output", budget_bits=10**6, precomputed=sens, progress=False)
    again = search(
        model, data, "output", budget_bits=10**6, precomputed=sens, fit_data=fit, progress=False
    )
    assert again.measured_output_error == pytest.approx(err, rel=1e-5)


def test_default_candidates_cover_formats_and_skip_unsupported():
    model = cnn()
    sens = sensitivity(model, [torch.randn(8, 1, 8, 8)], progress=False)
    labels0 = [c.label() for c in sens.choices[0]]
    assert any(lab.startswith("Tucker") for lab in labels0)
    assert not any(lab.startswith(("LowRank", "TT")) for lab in labels0)  # Conv2d
    labels_fc = [c.label() for c in sens.choices[sens.names.index("6")]]
    assert any(lab.startswith("LowRank") for lab in labels_fc)
    assert all(e >= 0 for errs in sens.errors for e in errs)


def test_repeated_ranks_are_measured_once():
    # a 4x4 layer: every ratio gives the same capped rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cands = Candidates(
        formats=("lowrank",),
        ratios=(0.9, 0.8),
        bits=(8,),
        ternary=False,
        binary=False,
        keep_float=False,
    )
    sens = sensitivity(model, [torch.randn(8, 4)], cands, progress=False)
    assert [c.label() for c in sens.choices[0]] == [
        "dense/int8/channel",
        "LowRank(ratio=0.9)/int8/channel",
    ]
    assert [(label, "same layer" in why) for _, label, why in sens.skipped] == [
        ("LowRank(ratio=0.8)/int8/channel", True)
    ]


def test_output_and_callable_metrics():
    model = mlp()
    data = batches()
    choices = [Choice(None, QuantSpec(bits=b)) for b in (8, 2)]
    sens = sensitivity(model, data, choices, metric="output", progress=False)
    assert sens.metric == "output"
    for errs in sens.errors:
        assert 0 < errs[0] < errs[1]

    def loss(m):
        with torch.no_grad():
            return float(sum((m(x) - model_ref(x)).pow(2).mean() for x in data))

    model_ref = copy.deepcopy(model)
    sens = sensitivity(model, data, choices, metric=loss, progress=False)
    assert sens.metric == "loss" and sens.reference == pytest.approx(0.0)
    assert all(errs[0] < errs[1] for errs in sens.errors)
    x = data[0]
    assert torch.equal(model(x), model_ref(x))  # the model is left as it was


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="metric"):
        sensitivity(model, batches(), metric="accuracy", progress=False)
    with pytest.raises(ValueError, match="no layer to search"):
        sensitivity(model, batches(), include=["nothing"], progress=False)
    with pytest.raises(TypeError, match="Choice"):
        sensitivity(model, batches(), [QuantSpec()], progress=False)
    with pytest.raises(ValueError, match="formats"):
        Candidates(formats=("svd",))
    unused = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "unused": torch.nn.Linear(2, 2)})
    unused.forward = lambda x: unused["used"](x)
    with pytest.raises(ValueError, match="'unused' was never called"):
        sensitivity(unused, [torch.randn(2, 2)], progress=False)


def test_candidate_globs_are_one_table_as_in_quantize():
    model = mlp()
    q8 = [Choice(None, QuantSpec(bits=8))]
    sens = sensitivity(model, batches(), {"0": q8, "4": q8, "enc.*": q8}, progress=False)
    assert sens.names == ["0", "4"]
    assert ("candidates['enc.*']", "pattern", "matched nothing") in sens.skipped
    with pytest.raises(ValueError, match="candidates pattern '2' is never used"):
        sensitivity(model, batches(), {"*": q8, "2": q8}, progress=False)


def test_errors_measure_the_logits_of_a_mapping_output():
    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):  # 'hidden' first: the one output rule takes 'logits'
            return {"hidden": torch.zeros(1), "logits": self.fc(x)}

    torch.manual_seed(0)
    model = Named().eval()
    sens = sensitivity(
        model,
        [torch.randn(16, 8)],
        [Choice(None, QuantSpec(bits=2))],
        metric="output",
        progress=False,
    )
    assert sens.errors[0][0] > 0
