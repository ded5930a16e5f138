"""Resuming from a checkpoint ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.qat.models import batches, compressed, mlp, params_equal
from tnquant.qat import finetune, load_checkpoint

STEPS_PER_EPOCH = 6


def _data(kind):
    x = torch.cat(batches(5, STEPS_PER_EPOCH))
    if kind == "list":
        return list(x.split(8))
    gen = torch.Generator().manual_seed(0) if kind == "loader-generator" else None
    return DataLoader(TensorDataset(x), batch_size=8, shuffle=True, generator=gen)


def _run(start, teacher, kind, seed, **kwargs):
    student = copy.deepcopy(start)
    torch.manual_seed(seed)  # dropout draws from the global generator
    report = finetune(
        student,
        _data(kind),
        teacher,
        epochs=2,
        lr=1e-2,
        shuffle=kind == "list",
        progress=False,
        **kwargs,
    )
    return student, report.history


@pytest.fixture(scope="module")
def setup():
    teacher = mlp(seed=0, dropout=0.2)
    return compressed(teacher, rank=2, bits=4), teacher  # LSQ scales not initialised yet


@pytest.mark.parametrize("kind", ["list", "loader-generator", "loader-global-rng"])
@pytest.mark.parametrize("resume_step", [4, 6])  # mid-epoch, epoch boundary
def test_resume_equals_uninterrupted_run(setup, tmp_path, kind, resume_step):
    start, teacher = setup
    full, h_full = _run(
        start,
        teacher,
        kind,
        123,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        keep_checkpoints=None,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step_{s:08d}.pt" for s in (2, 4, 6, 8, 10, 12)
    ]
    ckpt = tmp_path / f"step_{resume_step:08d}.pt"
    resumed, h_res = _run(start, teacher, kind, 999, resume_from=ckpt)
    assert params_equal(full, resumed)
    assert h_res.loss == h_full.loss and h_res.resumed_from == resume_step
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["epoch_steps"]) == divmod(resume_step, STEPS_PER_EPOCH)


def test_crash_then_resume_from_directory(setup, tmp_path):
    start, teacher = setup
    full, _ = _run(start, teacher, "list", 1)

    def crash_at_step_5(model):
        crash_at_step_5.calls += 1
        if crash_at_step_5.calls == 5:
            raise KeyboardInterrupt
        return {}

    crash_at_step_5.calls = 0
    with pytest.raises(KeyboardInterrupt):
        _run(
            start,
            teacher,
            "list",
            1,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            eval_fn=crash_at_step_5,
            eval_every=1,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    resumed, _ = _run(start, teacher, "list", 2, resume_from=tmp_path)
    assert params_equal(full, resumed)


def test_resume_refuses_a_different_run(setup, tmp_path):
    start, teacher = setup
    _run(start, teacher, "list", 1, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000009.pt",
        "step_00000012.pt",
    ]  # keep 2
    student = copy.deepcopy(start)
    with pytest.raises(ValueError, match="written with shuffle=True, this run has shuffle=False"):
        finetune(student, _data("list"), teacher, epochs=2, resume_from=tmp_path, progress=False)
    with pytest.raises(ValueError, match="written with steps_per_epoch=6, this run has .*=3"):
        finetune(
            student,
            _data("list")[:3],
            teacher,
            epochs=2,
            shuffle=True,
            resume_from=tmp_path,
            progress=False,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_restores_the_cuda_generator(setup, tmp_path):
    start, teacher = (m.to("cuda") for m in copy.deepcopy(setup))
    full, h_full = _run(
        start, teacher, "list", 123, checkpoint_dir=tmp_path, checkpoint_every=4
    )  # the batches stay on the CPU: finetune moves them
    resumed, h_res = _run(start, teacher, "list", 999, resume_from=tmp_path / "step_00000008.pt")
    assert next(resumed.parameters()).is_cuda
    assert params_equal(full, resumed) and h_res.loss == h_full.loss
