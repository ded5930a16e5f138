"""How data reaches a model: one rule for calibrate, finetune, search, factorize.

A batch is passed as ``model(*batch)`` for a tuple or list, ``model(**batch)``
for a dict (or any mapping, e.g. a tokenizer's ``BatchEncoding``), and
``model(batch)`` otherwise.

The data every verb takes is checked the same way, by the functions here:

- up front, before any work (:func:`check_data`): an iterable of batches (or
  one tensor or mapping, taken as one batch), not empty when its length is
  known, and not a one-shot iterator where it is read several times
  (:func:`check_reiterable`);
- batch by batch, as it is read (:func:`iterate_batches`, through
  :func:`check_batch`): no float tensor holding NaN or inf, no tensor on the
  meta device, and at least one batch in all.

Examples
--------
>>> import torch
>>> call_model(torch.nn.Identity(), torch.ones(2)).tolist()
[1.0, 1.0]
>>> check_data([], "calibrate")
Traceback (most recent call last):
...
ValueError: calibrate needs at least one batch of data, got an empty list
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch import nn

from tnquant.checks import count_non_finite

__all__ = [
    "call_model",
    "iterate_batches",
    "move_batch",
    "check_data",
    "check_reiterable",
    "check_batch",
]


def call_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch`` by the rule in the module docs."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


def move_batch(batch: Any, device: torch.device | str | None) -> Any:
    """The batch with every tensor moved to ``device`` (structure kept)."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch


def check_reiterable(data: Any, what: str) -> None:
    """Raise ``TypeError`` when ``data`` is a one-shot iterator (it is read several times).

    An iterator is what ``collections.abc.Iterator`` recognises (generators,
    ``iter(list)``, ``map``, ...); ``data`` is not iterated, so a
    ``DataLoader`` neither starts workers nor draws from torch's generator.

    Examples
    --------
    >>> check_reiterable([1, 2], "bias correction")
    >>> check_reiterable(iter([1, 2]), "bias correction")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: bias correction reads the data several times; ... got a one-shot list_iterator
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        return
    # not iter(data) is data: iter() of a DataLoader draws a seed from torch's generator
    # (and starts its workers)
    if isinstance(data, Iterator):
        raise TypeError(
            f"{what} reads the data several times; pass a list or a DataLoader, "
            f"got a one-shot {type(data).__name__}"
        )


def check_data(data: Any, what: str, *, arg: str = "data", reiterable: bool = False) -> None:
    """Refuse, before any work, data that cannot serve ``what``.

    Parameters
    ----------
    data
        The batches a verb was given.
    what
        The verb, for the messages (``'calibrate'``, ``'search'``, ...).
    arg
        The argument's name, for the messages (``'data'``, ``'fit_data'``).
    reiterable
        ``what`` reads the data more than once: refuse a one-shot iterator
        (a generator, ``iter(list)``), which the second pass would find
        exhausted.

    Raises
    ------
    TypeError
        For ``None`` or a value that is not iterable; a one-shot iterator
        when ``reiterable``.
    ValueError
        For data whose length is known and zero.

    Examples
    --------
    >>> import torch
    >>> check_data([torch.ones(2, 3)], "search", reiterable=True)
    >>> check_data(torch.ones(2, 3), "calibrate")  # one tensor is one batch
    >>> check_data(iter([torch.ones(2, 3)]), "search", reiterable=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: search reads the data several times; ... got a one-shot list_iterator
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        return
    if data is None or not isinstance(data, Iterable):
        raise TypeError(
            f"{what}: {arg} must be an iterable of batches (a list, a DataLoader) "
            f"or one tensor, got {type(data).__name__}"
        )
    if isinstance(data, Sized):
        try:
            empty = len(data) == 0
        except TypeError:  # e.g. a DataLoader over an IterableDataset
            empty = False
        if empty:
            raise ValueError(
                f"{what} needs at least one batch of {arg}, got an empty {type(data).__name__}"
            )
    if reiterable:
        check_reiterable(data, what)


def _tensors(batch: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        yield where, batch
    elif isinstance(batch, (tuple, list)):
        for i, item in enumerate(batch):
            yield from _tensors(item, f"{where}[{i}]")
    elif isinstance(batch, Mapping):
        for key, item in batch.items():
            yield from _tensors(item, f"{where}[{key!r}]")


def check_batch(batch: Any, index: int, what: str, *, arg: str = "data") -> None:
    """Raise ``ValueError`` when a tensor of ``batch`` is on the meta device or not finite.

    Every tensor in the batch is looked at (inside tuples, lists and
    mappings, at any depth); only floating ones are checked for NaN/inf
    (token ids, masks and labels are integers).

    Examples
    --------
    >>> import torch
    >>> check_batch((torch.ones(2), torch.tensor([3, 4])), 0, "search")
    >>> check_batch({"x": torch.tensor([1.0, float("nan")])}, 3, "search")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: search: batch 3 of data holds 1 non-finite value (NaN or inf) in batch['x'], ...
    """
    for where, t in _tensors(batch, "batch"):
        where = "the batch" if where == "batch" else where
        if t.is_meta:
            raise ValueError(
                f"{what}: batch {index} of {arg} holds a tensor on the meta device "
                f"in {where} (a shape without values); pass real tensors"
            )
        bad = count_non_finite(t)
        if bad:
            dtype = str(t.dtype).removeprefix("torch.")
            raise ValueError(
                f"{what}: batch {index} of {arg} holds {bad} non-finite "
                f"value{'s' if bad > 1 else ''} (NaN or inf) in {where}, a {dtype} tensor of "
                f"shape {tuple(t.shape)}; clean the data (e.g. torch.nan_to_num) or leave that "
                f"batch out"
            )


def iterate_batches(
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    what: str = "this step",
    arg: str = "data",
) -> Iterator[Any]:
    """Yield at most ``num_batches`` batches from ``data`` (all when ``None``), each checked.

    A single tensor (or mapping) is taken as one batch, not iterated row by
    row. Each batch goes through :func:`check_batch` before it is yielded,
    and data that yields no batch at all raises ``ValueError`` (``what`` and
    ``arg`` name the verb and the argument in the messages).

    Examples
    --------
    >>> import torch
    >>> len(list(iterate_batches([torch.ones(1)] * 3, 2)))
    2
    >>> list(iterate_batches(iter([]), what="calibrate"))
    Traceback (most recent call last):
    ...
    ValueError: calibrate needs at least one batch of data, got an empty list_iterator
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    source = data
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    count = 0
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        check_batch(batch, i, what, arg=arg)
        count += 1
        yield batch
    if count == 0:
        raise ValueError(
            f"{what} needs at least one batch of {arg}, got an empty {type(source).__name__}"
        )
