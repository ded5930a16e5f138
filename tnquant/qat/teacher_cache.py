"""The teacher's targets, computed once per batch and reused across epochs.

Distillation calls the teacher on every step; over ``E`` epochs of the same
``n`` batches that is ``E * n`` teacher passes for ``n`` distinct results.
When ``data`` is a fixed sequence of batches, :class:`TeacherCache` keeps
what the loss reads of the teacher (the distilled tensor, or the ``hidden``
submodules' outputs), detached, on the device the teacher produced them, by
batch index; the teacher then runs once per batch, the first time the batch
is seen (inside the same step, under the same autocast), and the run computes
exactly what it computes uncached: the teacher runs in ``eval`` mode under
``no_grad``, so its outputs do not depend on when it runs (a teacher whose
eval-mode forward draws random numbers is the one exception: cache off).

``finetune(teacher_cache=...)``:

- ``'auto'`` (default): cache when ``data`` is a ``list`` or ``tuple`` of
  batches, up to ``teacher_cache_bytes`` (default ``2**30``, 1 GiB) of
  targets; the batches past the bound are recomputed every time they come;
- ``True``: cache every batch of any ``Sequence`` of batches (one that
  gives the same batch for the same index), with no bound; a ``DataLoader``
  is refused (it may give other batches, augmented or reshuffled, each epoch);
- ``False``: call the teacher on every step.

A ``DataLoader`` is never cached under ``'auto'``. A resumed run starts with
an empty cache (the values are the same). ``history.teacher_calls`` counts
the teacher's forward passes of the run, ``history.teacher_cache_bytes`` the
bytes held at the end.

Examples
--------
>>> import torch
>>> cache = TeacherCache.for_data([torch.ones(2)] * 3, "auto", 2**30)
>>> cache.enabled, cache.get(0)
(True, None)
>>> cache.put(0, [torch.zeros(4)]); cache.get(0)[0].shape, cache.nbytes
(torch.Size([4]), 16)
>>> TeacherCache.for_data([torch.ones(2)], False, 2**30).enabled
False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["TeacherCache", "CACHE_CHOICES", "DEFAULT_CACHE_BYTES", "check_cache_options"]

#: The values of ``finetune(teacher_cache=...)``.
CACHE_CHOICES = ("auto", True, False)
#: ``teacher_cache_bytes`` default: 1 GiB of cached teacher targets.
DEFAULT_CACHE_BYTES = 2**30


def check_cache_options(teacher_cache: Any, max_bytes: Any) -> None:
    """Refuse a bad ``teacher_cache`` or ``teacher_cache_bytes`` (naming the field).

    Examples
    --------
    >>> check_cache_options("always", 1)
    Traceback (most recent call last):
    ...
    ValueError: teacher_cache must be 'auto', True or False, got 'always'
    """
    if not (isinstance(teacher_cache, bool) or teacher_cache == "auto"):
        raise ValueError(f"teacher_cache must be 'auto', True or False, got {teacher_cache!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"teacher_cache_bytes must be an int >= 0, got {max_bytes!r}")


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _own(t: Tensor) -> Tensor:
    """``t`` detached; copied when it is a view of a larger storage (which it would keep alive)."""
    t = t.detach()
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


class TeacherCache:
    """Teacher targets by batch index, within a byte bound (see the module docs).

    Parameters
    ----------
    enabled
        Whether anything is cached.
    max_bytes
        Most bytes held (``None``: no bound); a batch whose targets would
        pass it is not cached.

    Examples
    --------
    >>> import torch
    >>> cache = TeacherCache(True, max_bytes=20)
    >>> cache.put(0, [torch.zeros(4)]); cache.put(1, [torch.zeros(4)])
    >>> cache.get(0) is not None, cache.get(1), cache.nbytes
    (True, None, 16)
    """

    def __init__(self, enabled: bool, max_bytes: int | None = DEFAULT_CACHE_BYTES) -> None:
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.calls = 0
        self._store: dict[int, list[Tensor]] = {}

    @classmethod
    def for_data(cls, data: Any, teacher_cache: bool | str, max_bytes: int) -> TeacherCache:
        """The cache ``finetune`` keeps for ``data`` under ``teacher_cache``.

        Raises ``ValueError`` for ``teacher_cache=True`` on data that is not a
        ``Sequence`` of batches.
        """
        check_cache_options(teacher_cache, max_bytes)
        if teacher_cache is False:
            return cls(False)
        if teacher_cache is True:
            if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
                raise ValueError(
                    "teacher_cache=True caches the teacher's targets of a fixed sequence of "
                    f"batches (a list or tuple), got {type(data).__name__}: a DataLoader may "
                    "give other batches each epoch; use teacher_cache='auto' or False"
                )
            return cls(True, None)
        return cls(isinstance(data, (list, tuple)), max_bytes)

    def get(self, index: int | None) -> list[Tensor] | None:
        """The cached targets of batch ``index``, or ``None``."""
        if not self.enabled or index is None:
            return None
        return self._store.get(index)

    def put(self, index: int | None, tensors: list[Tensor]) -> None:
        """Keep ``tensors`` (detached) for batch ``index`` if the bound allows."""
        if not self.enabled or index is None or index in self._store:
            return
        size = _nbytes(tensors)
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            return
        self._store[index] = [_own(t) for t in tensors]
        self.nbytes += size

    def clear(self) -> None:
        """Drop every cached target."""
        self._store = {}
        self.nbytes = 0
