"""The order in which ``finetune`` takes batches, per epoch and per rank.

``data`` is one of:

- a sequence of batches (list, tuple, any ``Sequence``); with
  ``shuffle=True`` epoch ``e`` visits them in the order
  ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``,
  so the order depends on ``(seed, e)`` only;
- a ``torch.utils.data.DataLoader`` (or any object with ``__len__`` and
  ``__iter__`` that yields the same batches in the same order when the
  random generators are in the same state): iterated once per epoch;
- a single tensor or mapping: one batch.

A generator or any other one-shot iterator is refused (``TypeError``): it
would be exhausted after the first epoch.

Sharding over ``world`` ranks (DDP) takes the epoch's global list of
batches and gives rank ``r`` the batches ``r, r + world, r + 2 world, ...``;
each epoch has ``n // world`` steps and the last ``n % world`` batches of
the epoch are dropped, so that every rank takes the same number of steps.
A ``DataLoader`` whose sampler is a ``DistributedSampler`` is already
sharded: it is taken whole (``set_epoch(e)`` is called every epoch).

Examples
--------
>>> plan = EpochPlan(list(range(5)), world=2, rank=1)
>>> plan.steps_per_epoch, list(plan.batches(epoch=0))
(2, [1, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

__all__ = ["EpochPlan"]


class EpochPlan:
    """Which batches each step of each epoch takes on one rank.

    Parameters
    ----------
    data
        Batches (see the module docs).
    world, rank
        Number of processes and this one's index.
    shuffle, seed
        Shuffle a sequence of batches each epoch, reproducibly from ``seed``
        (a ``DataLoader`` shuffles by its own sampler).

    Examples
    --------
    >>> plan = EpochPlan(["a", "b", "c"], shuffle=True, seed=0)
    >>> sorted(plan.batches(epoch=0)) == ["a", "b", "c"]
    True
    """

    def __init__(
        self, data: Any, world: int = 1, rank: int = 0, shuffle: bool = False, seed: int = 0
    ) -> None:
        if isinstance(data, (torch.Tensor, Mapping)):
            data = [data]
        if (
            isinstance(data, (str, bytes))
            or not hasattr(data, "__iter__")
            or not hasattr(data, "__len__")
        ):
            raise TypeError(
                "data must be a list/tuple of batches, a DataLoader (an object with __len__ "
                f"and __iter__ that can be iterated once per epoch), or one tensor, got "
                f"{type(data).__name__}; wrap an iterator with list(...)"
            )
        if isinstance(data, Iterator):  # no iter(data): a DataLoader would draw its seed
            raise TypeError(
                "data must be re-iterable: finetune reads it once per epoch (and once more "
                "to initialise learnable quantizers); pass a list of batches or a DataLoader, "
                f"got a one-shot {type(data).__name__} (an iterator)"
            )
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.data = data
        self.world = world
        self.rank = rank
        self.seed = seed
        self.is_sequence = isinstance(data, Sequence)
        self.shuffle = shuffle
        if shuffle and not self.is_sequence:
            raise ValueError(
                "shuffle=True shuffles a list of batches; a DataLoader shuffles "
                "with its own sampler (DataLoader(..., shuffle=True, generator=g))"
            )
        sampler = getattr(data, "sampler", None)
        self.presharded = isinstance(sampler, DistributedSampler)
        n = len(data)
        if n == 0:
            raise ValueError("data holds no batch")
        self.num_batches = n
        self.steps_per_epoch = n if self.presharded else n // world
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data holds {n} batches, fewer than the {world} processes; each "
                "process needs at least one batch per epoch"
            )

    @property
    def generator(self) -> torch.Generator | None:
        """The ``DataLoader``'s own generator (saved in checkpoints), if it has one."""
        if isinstance(self.data, DataLoader):
            gen = self.data.generator
            if gen is None:
                gen = getattr(self.data.sampler, "generator", None)
            return gen
        return None

    def order(self, epoch: int) -> list[int]:
        """Indices of a sequence's batches in epoch ``epoch`` (all ranks together).

        Examples
        --------
        >>> EpochPlan([0, 1, 2]).order(0)
        [0, 1, 2]
        """
        n = self.num_batches
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def batches(
        self, epoch: int, skip: int = 0, positioned: Callable[[], None] | None = None
    ) -> Iterator[Any]:
        """This rank's batches of epoch ``epoch``, after its first ``skip`` ones.

        A ``DataLoader`` is iterated from its start: the iterator is created
        now (where the loader draws its seeds), the batches of the first
        ``skip`` steps are loaded and dropped, then ``positioned()`` is
        called (a resumed run restores its random state there), and every
        later batch is loaded when the step before it is done, exactly as
        in an uninterrupted epoch.

        Examples
        --------
        >>> list(EpochPlan([0, 1, 2, 3]).batches(epoch=0, skip=3))
        [3]
        """
        steps = self.steps_per_epoch
        if self.is_sequence:
            idx = self.order(epoch)[self.rank :: self.world][:steps]
            if skip and positioned is not None:
                positioned()
            return (self.data[i] for i in idx[skip:])
        if self.presharded:
            self.data.sampler.set_epoch(epoch)
            first, stride = 1, 1
        else:
            first, stride = self.rank + 1, self.world
        it = iter(self.data)
        if skip:
            _nth(it, first + (skip - 1) * stride)
            if positioned is not None:
                positioned()
        return _strided(it, stride if skip else first, stride, steps - skip)

    def keyed_batches(
        self, epoch: int, skip: int = 0, positioned: Callable[[], None] | None = None
    ) -> Iterator[tuple[int | None, Any]]:
        """:meth:`batches` as ``(index, batch)`` pairs: a sequence's index, ``None`` for a loader.

        The index names the batch across epochs (shuffled or not), which is
        what the teacher cache (:mod:`tnquant.qat.teacher_cache`) keys on.

        Examples
        --------
        >>> list(EpochPlan(["a", "b", "c"], shuffle=True, seed=0).keyed_batches(epoch=0))
        [(2, 'c'), (0, 'a'), (1, 'b')]
        """
        if not self.is_sequence:
            return ((None, b) for b in self.batches(epoch, skip, positioned))
        idx = self.order(epoch)[self.rank :: self.world][: self.steps_per_epoch]
        if skip and positioned is not None:
            positioned()
        return ((i, self.data[i]) for i in idx[skip:])

    def first_batch(self) -> Any:
        """The first batch of epoch 0 on this rank (for lazy initialisation).

        Does not change any random state: the caller wraps it.
        """
        return next(iter(self.batches(0)))


_END = object()


def _nth(it: Iterator[Any], n: int) -> Any:
    """Load ``n`` items of ``it`` and return the last (``_END`` when it runs out)."""
    item = _END
    for _ in range(n):
        item = next(it, _END)
        if item is _END:
            break
    return item


def _strided(it: Iterator[Any], first: int, stride: int, count: int) -> Iterator[Any]:
    """Yield ``count`` items: the ``first``-th of ``it``, then every ``stride``-th."""
    take = first
    for _ in range(count):
        item = _nth(it, take)
        if item is _END:
            return
        yield item
        take = stride
