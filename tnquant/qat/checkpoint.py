"""Checkpoints of ``finetune``: atomic writes, lookup, RNG states.

A checkpoint is one file ``step_<8 digits>.pt`` in the checkpoint directory,
written with ``torch.save`` to a temporary file in the same directory,
flushed to disk, then renamed over the target (``os.replace``), so a
crash never leaves a half-written checkpoint under the final name. It is a
dict of tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)``:

- ``'format'``: :data:`FORMAT`; ``'step'``, ``'epoch'``, ``'epoch_steps'``
  (steps already done in that epoch);
- ``'model'``, ``'optimizer'``, ``'scheduler'``: state dicts;
- ``'ranks'``: per rank, ``{'rng': rng_state(), 'epoch_rng': ...,
  'loader_rng': ...}``: the random state now and when the epoch began (a
  ``DataLoader`` draws its order then), and the ``DataLoader``
  generator's states (epoch start, now) or ``None``;
- ``'config'``: what must match to resume (steps per epoch, world size,
  seed, shuffle), and ``'history'``: the history so far.

Examples
--------
>>> import tempfile, torch
>>> d = tempfile.mkdtemp()
>>> path = save_checkpoint({"step": 3, "w": torch.ones(2)}, d, step=3)
>>> latest_checkpoint(d) == path, load_checkpoint(d)["step"]
(True, 3)
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "prune_checkpoints", "rng_state", "set_rng_state"]

#: Version tag of the checkpoint layout.
FORMAT = "tnquant.finetune/1"

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """``directory / 'step_<8 digits>.pt'``.

    Examples
    --------
    >>> checkpoint_path("ckpt", 12).name
    'step_00000012.pt'
    """
    return Path(directory) / f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str],
                    step: int) -> Path:
    """Write ``state`` atomically to :func:`checkpoint_path`; return the path.

    Examples
    --------
    >>> import tempfile
    >>> save_checkpoint({"step": 1}, tempfile.mkdtemp(), 1).name
    'step_00000001.pt'
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``None`` when none).

    Examples
    --------
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None
    True
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest one of a directory.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = save_checkpoint({"step": 5}, d, 5)
    >>> load_checkpoint(d)["step"]
    5
    """
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"resume_from: no step_*.pt checkpoint in directory {p}")
        p = latest
    elif not p.is_file():
        raise FileNotFoundError(f"resume_from: expected a checkpoint file or directory, "
                                f"{p} does not exist")
    state = torch.load(p, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{p} is not a finetune checkpoint (got a {type(state).__name__})")
    return state


def prune_checkpoints(directory: str | os.PathLike[str], keep: int | None) -> None:
    """Delete all but the ``keep`` latest checkpoints (``None`` keeps all).

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for s in (1, 2, 3): _ = save_checkpoint({}, d, s)
    >>> prune_checkpoints(d, 1); sorted(p.name for p in Path(d).iterdir())
    ['step_00000003.pt']
    """
    if keep is None:
        return
    directory = Path(directory)
    found = sorted((int(m.group(1)), p) for p in directory.iterdir()
                   if (m := _NAME.match(p.name)))
    for _, p in found[:max(len(found) - keep, 0)]:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Torch CPU and CUDA generator states, and Python's ``random`` state.

    NumPy's global generator is not saved: seed it yourself if a collate
    function or ``eval_fn`` draws from it during training.

    Examples
    --------
    >>> import torch
    >>> s = rng_state(); a = torch.rand(1); set_rng_state(s)
    >>> torch.equal(a, torch.rand(1))
    True
    """
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state` (CUDA states only when the device count matches).

    Examples
    --------
    >>> set_rng_state(rng_state())
    """
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "python" in state:
        random.setstate((state["python_version"], tuple(state["python"]),
                         state["python_gauss"]))
