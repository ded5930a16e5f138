"""Checkpoints of ``finetune``: atomic writes, lookup, RNG states.

A checkpoint is one file ``step_<8 digits>.pt`` in the checkpoint directory,
written with ``torch.save`` to a temporary file in the same directory,
flushed to disk, then renamed over the target (``os.replace``), so a
crash never leaves a half-written checkpoint under the final name. It is a
dict of tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)``:

- ``'format'``: :data:`FORMAT`; ``'step'``, ``'epoch'``, ``'epoch_steps'``
  (steps already done in that epoch);
- ``'model'``, ``'optimizer'``, ``'scheduler'``: state dicts; ``'scaler'``:
  the ``GradScaler`` state with ``amp='fp16'``, else ``None``;
- ``'ranks'``: per rank, ``{'rng': rng_state(), 'epoch_rng': ...,
  'loader_rng': ...}``: the random state now and when the epoch began (a
  ``DataLoader`` draws its order then), and the ``DataLoader``
  generator's states (epoch start, now) or ``None``;
- ``'config'``: what must match to resume (steps per epoch, world size,
  seed, shuffle, total steps), ``'options'``: the options of ``finetune``
  that must match too, ``'optimizer_class'``, and ``'history'``: the
  history so far (see :mod:`tnquant.qat.resume`).

Only regular files named ``step_<digits>.pt`` count as checkpoints. A
directory is read newest first: a checkpoint that cannot be read (a
truncated file, say) is skipped with a warning naming it and the error, and
the one before it is taken. A process killed while writing leaves its
temporary ``.step_<digits>.pt.<8 characters>.tmp``;
:func:`remove_stale_temporaries` deletes those (and only those).

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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "checkpoint_path",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "checkpoints",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "rng_state",
    "set_rng_state",
]

#: Version tag of the checkpoint layout.
FORMAT = "tnquant.finetune/1"

_NAME = re.compile(r"^step_(\d+)\.pt$")
#: The temporary files of :func:`save_checkpoint` (``tempfile.mkstemp``'s 8 random characters).
_TMP = re.compile(r"^\.step_\d+\.pt\.[a-z0-9_]{8}\.tmp$")


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """``directory / 'step_<8 digits>.pt'``.

    Examples
    --------
    >>> checkpoint_path("ckpt", 12).name
    'step_00000012.pt'
    """
    return Path(directory) / f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str], step: int) -> Path:
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


def checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint files of ``directory``, newest (highest step) first.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> for s in (2, 10): _ = save_checkpoint({}, d, s)
    >>> [p.name for p in checkpoints(d)]
    ['step_00000010.pt', 'step_00000002.pt']
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _NAME.match(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``directory`` (``None`` when none).

    Examples
    --------
    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None
    True
    """
    found = checkpoints(directory)
    return found[0] if found else None


def _read(
    path: Path, map_location: Any, validate: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(
            f"not a finetune checkpoint (it holds a {type(state).__name__}, expected a dict)"
        )
    if validate is not None:
        validate(state)
    return state


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".split(" This is an internal miniz error")[0]


def read_checkpoint(
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Load a checkpoint file, or the newest readable one of a directory; ``(state, path)``.

    ``validate(state)`` (optional) raises on a state that is not usable.
    A file that cannot be loaded or validated raises ``ValueError`` naming
    it. In a directory, such a file is skipped with a warning naming it and
    the error, and the previous checkpoint is tried; ``ValueError`` naming
    the directory and every file tried when none is good.

    Examples
    --------
    >>> import tempfile, warnings
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = save_checkpoint({"step": 1}, d, 1)
    >>> _ = (d / "step_00000002.pt").write_bytes(b"truncated")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     state, used = read_checkpoint(d)
    >>> state["step"], used.name, "step_00000002.pt" in str(caught[0].message)
    (1, 'step_00000001.pt', True)
    """
    p = Path(path)
    if p.is_dir():
        found = checkpoints(p)
        if not found:
            raise FileNotFoundError(f"resume_from: no step_*.pt checkpoint in directory {p}")
        tried = []
        for candidate in found:
            try:
                return _read(candidate, map_location, validate), candidate
            except Exception as e:  # any unreadable file: fall back to the previous one
                tried.append(f"{candidate.name} ({_why(e)})")
                warnings.warn(
                    f"resume_from: skipping checkpoint {candidate}, which cannot be "
                    f"read: {_why(e)}; trying the previous one",
                    stacklevel=2,
                )
        raise ValueError(
            f"resume_from: no readable checkpoint in directory {p}; tried, newest "
            f"first: {'; '.join(tried)}"
        )
    if not p.exists():
        raise FileNotFoundError(
            f"resume_from: expected a checkpoint file or directory, {p} does not exist"
        )
    if not p.is_file():
        raise ValueError(
            f"resume_from: expected a checkpoint file or directory, {p} is "
            "neither (not a regular file)"
        )
    try:
        return _read(p, map_location, validate), p
    except Exception as e:
        raise ValueError(f"resume_from: cannot read checkpoint {p}: {_why(e)}") from e


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file, or the latest readable one of a directory.

    See :func:`read_checkpoint` for what happens to unreadable files.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = save_checkpoint({"step": 5}, d, 5)
    >>> load_checkpoint(d)["step"]
    5
    """
    return read_checkpoint(path, map_location)[0]


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
    for p in checkpoints(directory)[keep:]:
        p.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries a killed :func:`save_checkpoint` left; return them.

    Only regular files named exactly ``.step_<digits>.pt.<8 characters>.tmp``
    are removed; nothing else in ``directory`` is touched.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in (".step_00000004.pt.k2j_x9aq.tmp", "notes.tmp"): _ = (d / name).write_text("")
    >>> [p.name for p in remove_stale_temporaries(d)], sorted(p.name for p in d.iterdir())
    (['.step_00000004.pt.k2j_x9aq.tmp'], ['notes.tmp'])
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(
        p for p in directory.iterdir() if _TMP.match(p.name) and p.is_file() and not p.is_symlink()
    )
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    return {
        "cpu": torch.get_rng_state(),
        "cuda": cuda,
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }


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
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
