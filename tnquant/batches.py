"""How data reaches a model: one rule for calibrate, finetune, search, factorize.

A batch is passed as ``model(*batch)`` for a tuple or list, ``model(**batch)``
for a dict (or any mapping, e.g. a tokenizer's ``BatchEncoding``), and
``model(batch)`` otherwise.

Examples
--------
>>> import torch
>>> call_model(torch.nn.Identity(), torch.ones(2)).tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "iterate_batches", "move_batch"]


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


def iterate_batches(data: Iterable[Any], num_batches: int | None = None) -> Iterator[Any]:
    """Yield at most ``num_batches`` batches from ``data`` (all when ``None``).

    A single tensor is taken as one batch, not iterated row by row.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        yield batch
