"""Atomic checkpoint files, lookup, pruning, random states."""

from __future__ import annotations

import random

import pytest
import torch

from tnquant.qat.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_checkpoint({"w": torch.arange(3)}, tmp_path, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002.pt"]

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(3)}, tmp_path, step=2)
    # the old file is intact, no temporary is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))


def test_latest_and_prune(tmp_path):
    for step in (3, 10, 7):
        save_checkpoint({"step": step}, tmp_path, step)
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path).name == "step_00000010.pt"
    assert load_checkpoint(tmp_path)["step"] == 10
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_00000007.pt",
        "step_00000010.pt",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no step_"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path, 1)
    a, b = torch.rand(4), random.random()
    set_rng_state(load_checkpoint(tmp_path)["rng"])
    assert torch.equal(torch.rand(4), a) and random.random() == b
