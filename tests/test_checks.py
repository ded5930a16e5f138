"""The shared input checks: tnquant.checks (the model) and tnquant.batches (the data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from tnquant.batches import check_batch, check_data, check_reiterable, iterate_batches
from tnquant.checks import check_model, count_non_finite


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


# --- count_non_finite ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_count_non_finite_matches_numpy(dtype):
    gen = np.random.default_rng(0)
    x = gen.standard_normal((7, 5))
    x[gen.random((7, 5)) < 0.3] = np.nan
    x[0, 0], x[1, 1] = np.inf, -np.inf
    expected = int((~np.isfinite(x)).sum())
    assert count_non_finite(torch.tensor(x, dtype=dtype)) == expected


def test_count_non_finite_of_integers_and_empty_is_zero():
    assert count_non_finite(torch.tensor([1, 2, 3])) == 0
    assert count_non_finite(torch.tensor([True, False])) == 0
    assert count_non_finite(torch.empty(0)) == 0


# --- check_model ---------------------------------------------------------------------------


def test_check_model_names_the_first_meta_tensor_and_how_to_materialize():
    with pytest.raises(ValueError) as err:
        check_model(_meta_model(), "factorize")
    text = str(err.value)
    assert "factorize" in text and "'0.weight'" in text and "meta device" in text
    assert "model.to_empty(device=" in text and "load_state_dict" in text


def test_check_model_names_a_meta_buffer():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].running_var = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"buffer '1.running_var' is on the meta device"):
        check_model(model, "calibrate")


def test_check_model_finite_names_the_parameter_and_the_count():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
        model[1].weight[1, 2] = float("nan")
    check_model(model, "search")  # finiteness only when asked
    with pytest.raises(
        ValueError,
        match=r"search: parameter '1.weight' holds 2 non-finite "
        r"values \(NaN or inf\) of 6",
    ):
        check_model(model, "search", finite=True)


def test_check_model_leaves_non_finite_buffers_alone():
    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # an attention mask
    check_model(model, "search", finite=True)


def test_check_model_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        check_model("model", "search")  # type: ignore[arg-type]


# --- check_data -----------------------------------------------------------------------------


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.ones(2)


@pytest.mark.parametrize("data", [None, 5, 2.0])
def test_check_data_refuses_what_is_not_iterable(data):
    with pytest.raises(
        TypeError,
        match=rf"calibrate: data must be an iterable of batches.*"
        rf"got {type(data).__name__}",
    ):
        check_data(data, "calibrate")


@pytest.mark.parametrize("empty", [[], (), DataLoader([], batch_size=2)])
def test_check_data_refuses_empty_data(empty):
    with pytest.raises(
        ValueError,
        match=r"search needs at least one batch of fit_data, got "
        r"an empty",
    ):
        check_data(empty, "search", arg="fit_data")


def test_check_data_accepts_batches_and_single_batches():
    check_data([torch.ones(2)], "search", reiterable=True)
    check_data(torch.ones(2, 3), "search", reiterable=True)  # one batch
    check_data({"x": torch.ones(2)}, "search", reiterable=True)  # one batch
    check_data(DataLoader([torch.ones(2)] * 3, batch_size=2), "search", reiterable=True)
    check_data(DataLoader(_Stream()), "search")  # no len(): not known to be empty
    check_data(iter([torch.ones(2)]), "calibrate")  # read once: a one-shot iterator is fine


def test_check_data_refuses_one_shot_iterators_when_read_twice():
    def gen():
        yield torch.ones(2)

    for data in (iter([torch.ones(2)]), gen(), (x for x in [torch.ones(2)])):
        with pytest.raises(TypeError, match=r"search reads the data several times.*one-shot"):
            check_data(data, "search", reiterable=True)


def test_check_reiterable_is_the_one_calibrate_exports():
    import importlib

    calibrate_module = importlib.import_module("tnquant.ptq.calibrate")

    assert calibrate_module.check_reiterable is check_reiterable


# --- check_batch and iterate_batches ------------------------------------------------------------


def test_check_batch_names_the_batch_the_place_and_the_count():
    x = torch.randn(4, 3)
    x[1, :] = float("nan")
    batch = {"input_ids": torch.tensor([[1, 2]]), "inputs": (torch.ones(2), x)}
    with pytest.raises(
        ValueError,
        match=r"calibrate: batch 7 of data holds 3 non-finite values "
        r"\(NaN or inf\) in batch\['inputs'\]\[1\], a float32 "
        r"tensor of shape \(4, 3\)",
    ):
        check_batch(batch, 7, "calibrate")
    with pytest.raises(ValueError, match=r"in the batch, a float64"):
        check_batch(torch.tensor([float("inf")], dtype=torch.float64), 0, "search")


def test_check_batch_refuses_meta_tensors_and_passes_integers():
    check_batch((torch.tensor([1, 2]), "text", None), 0, "search")
    with pytest.raises(
        ValueError,
        match=r"batch 2 of data holds a tensor on the meta device "
        r"in batch\[0\]",
    ):
        check_batch([torch.empty(2, device="meta")], 2, "search")


def test_iterate_batches_checks_each_batch_it_reads():
    batches = [torch.ones(2), torch.ones(2), torch.tensor([1.0, float("nan")])]
    assert len(list(iterate_batches(batches, 2))) == 2  # the bad batch is never read
    with pytest.raises(ValueError, match=r"search: batch 2 of data holds 1 non-finite value "):
        list(iterate_batches(batches, what="search"))


@pytest.mark.parametrize("empty", [[], iter([]), DataLoader([], batch_size=1)])
def test_iterate_batches_refuses_data_without_a_batch(empty):
    with pytest.raises(ValueError, match=r"GPTQ needs at least one batch of data, got an empty"):
        list(iterate_batches(empty, what="GPTQ"))


def test_iterate_batches_takes_a_tensor_or_mapping_as_one_batch():
    x = torch.ones(3, 2)
    assert [b is x for b in iterate_batches(x)] == [True]
    assert len(list(iterate_batches({"x": x}))) == 1


def test_check_data_does_not_start_a_dataloader_nor_draw_random_numbers():
    loader = DataLoader([torch.ones(2)] * 4, batch_size=2, shuffle=True)
    state = torch.random.get_rng_state()
    check_data(loader, "search", reiterable=True)
    assert torch.equal(torch.random.get_rng_state(), state)
