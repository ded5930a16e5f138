"""The teacher cache: one teacher pass per batch, the same parameters as without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.qat.models import batches, compressed, mlp, params_equal
from tnquant.qat import finetune
from tnquant.qat.config import FinetuneConfig
from tnquant.qat.teacher_cache import TeacherCache

N_BATCHES, EPOCHS = 3, 2


class Counting(nn.Module):
    """The teacher, counting its forward passes (and with dropout, which eval mode must drop)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.drop = nn.Dropout(0.5)
        self.calls = 0
        self.modes: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.add(self.drop.training)
        return self.drop(self.inner(x))


def _run(cache, data=None, hidden=None, shuffle=True, **kw):
    torch.manual_seed(0)
    inner = mlp(0, dropout=0.1)
    teacher = Counting(inner)
    student = compressed(teacher)
    if data is None:
        data = batches(1, N_BATCHES)
    report = finetune(
        student,
        data,
        teacher,
        epochs=EPOCHS,
        lr=1e-2,
        shuffle=shuffle,
        progress=False,
        teacher_cache=cache,
        hidden=hidden,
        **kw,
    )
    return student, teacher, report.history


@pytest.mark.parametrize("hidden", [None, ["inner.1", "inner.4"]], ids=["output", "hidden"])
def test_cached_run_equals_uncached_and_calls_the_teacher_once_per_batch(hidden):
    cached, t_cached, h_cached = _run("auto", hidden=hidden)
    plain, t_plain, h_plain = _run(False, hidden=hidden)
    assert params_equal(cached, plain)  # bit for bit, after 2 shuffled epochs
    assert h_cached.loss == h_plain.loss
    assert t_plain.calls == h_plain.teacher_calls == N_BATCHES * EPOCHS  # once per step
    assert t_cached.calls == h_cached.teacher_calls == N_BATCHES  # once per batch
    assert h_cached.teacher_cache_bytes > 0 and h_plain.teacher_cache_bytes == 0
    assert t_cached.modes == t_plain.modes == {False}  # called in eval: no dropout noise


def test_the_byte_bound_caches_only_what_fits():
    one_batch = 8 * 4 * 4  # (8 rows, 4 outputs) float32
    _, teacher, history = _run("auto", teacher_cache_bytes=one_batch, shuffle=False)
    # batch 0 is cached; batches 1, 2 are recomputed in the second epoch
    assert teacher.calls == history.teacher_calls == N_BATCHES + (N_BATCHES - 1)
    assert history.teacher_cache_bytes == one_batch
    _, teacher, history = _run(True, teacher_cache_bytes=0)  # True: no bound
    assert teacher.calls == N_BATCHES


def test_a_dataloader_is_not_cached_by_auto_and_refused_by_true():
    loader = DataLoader(torch.cat(batches(1, N_BATCHES)), batch_size=8)
    _, teacher, history = _run("auto", data=loader, shuffle=False)
    assert teacher.calls == N_BATCHES * EPOCHS and history.teacher_cache_bytes == 0
    with pytest.raises(ValueError, match="teacher_cache=True caches .* got DataLoader"):
        _run(True, data=loader, shuffle=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"teacher_cache": "yes"}, "teacher_cache must be 'auto', True or False, got 'yes'"),
        ({"teacher_cache_bytes": -1}, "teacher_cache_bytes must be an int >= 0, got -1"),
        ({"teacher_cache_bytes": 1.5}, "teacher_cache_bytes must be an int >= 0, got 1.5"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_a_view_is_copied_so_the_cache_counts_what_it_holds():
    cache = TeacherCache(True, max_bytes=None)
    big = torch.zeros(100, 4)
    cache.put(0, [big[:2]])
    (held,) = cache.get(0)
    assert held.untyped_storage().nbytes() == 2 * 4 * 4 == cache.nbytes
