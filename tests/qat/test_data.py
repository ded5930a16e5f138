"""Batch order per epoch and per rank; resuming a DataLoader mid-epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tnquant.qat.data import EpochPlan


def test_sharding_takes_every_world_th_batch_and_drops_the_remainder():
    data = list(range(7))
    shards = [list(EpochPlan(data, world=3, rank=r).batches(0)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, 5]]


def test_shuffle_depends_on_seed_and_epoch_only():
    data = list(range(20))
    a = EpochPlan(data, shuffle=True, seed=5)
    b = EpochPlan(data, shuffle=True, seed=5)
    assert list(a.batches(3)) == list(b.batches(3))
    assert list(a.batches(0)) != list(a.batches(1))
    assert sorted(a.batches(0)) == data
    assert list(a.batches(2, skip=4)) == list(a.batches(2))[4:]
    assert (
        list(EpochPlan(data, world=2, rank=1, shuffle=True, seed=5).batches(2))
        == list(a.batches(2))[1::2]
    )


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("skip", [1, 2])
def test_loader_resumed_mid_epoch_gives_the_same_batches(world, rank, skip):
    ds = TensorDataset(torch.arange(40).reshape(20, 2))
    loader = DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator())
    plan = EpochPlan(loader, world=world, rank=rank)
    loader.generator.manual_seed(1)
    full = [b[0] for b in plan.batches(0)]
    assert len(full) == plan.steps_per_epoch == 10 // world
    loader.generator.manual_seed(1)
    calls = []
    rest = [b[0] for b in plan.batches(0, skip=skip, positioned=lambda: calls.append(1))]
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(rest, full[skip:], strict=True))


def test_bad_data_is_refused():
    with pytest.raises(TypeError, match="wrap an iterator with list"):
        EpochPlan(iter([1, 2]))
    with pytest.raises(ValueError, match="holds no batch"):
        EpochPlan([])
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        EpochPlan([1, 2, 3], world=4)
    with pytest.raises(ValueError, match="DataLoader shuffles with its own sampler"):
        EpochPlan(DataLoader(TensorDataset(torch.zeros(4, 1))), shuffle=True)
    assert list(EpochPlan(torch.ones(2)).batches(0))[0].shape == (2,)
