"""Resuming ``finetune`` from a checkpoint: what must match, what is checked.

A resumed run continues the run that wrote the checkpoint, so that it ends
with the parameters an uninterrupted run would have. Before any work it
compares the checkpoint with its own arguments and refuses, with a
``ValueError`` listing every difference, a run that would silently differ:

- the data and the processes: steps per epoch, number of processes, total
  steps (the learning-rate schedule depends on it);
- the options in :data:`OPTIONS` (learning rates, optimizer, schedule,
  length of the run, objective...). A callable (optimizer, loss,
  ``outputs``, ``task_loss``) is recorded by its ``__qualname__`` and a
  teacher by its class.

The options in :data:`MAY_CHANGE` change neither the parameters nor the
order of the batches (``fused`` computes the same values faster, ``ddp``
is compared through the number of processes); a resumed run may change
them. A checkpoint written before the options were recorded cannot be
compared: a warning says so, and the options of the run are used.

The checkpoint is read with ``torch.load(weights_only=True)`` (no code
runs) and checked before it is used: its layout (:func:`check_state`), the
class and the settings of the optimizer that wrote it, the shapes of its
optimizer moments and the types of its scheduler state.

Examples
--------
>>> check_state({"format": "tnquant.finetune/0"})
Traceback (most recent call last):
...
ValueError: expected a checkpoint of format 'tnquant.finetune/1', got 'tnquant.finetune/0'
"""

from __future__ import annotations

import math
import os
import reprlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from tnquant.qat.checkpoint import FORMAT, read_checkpoint, remove_stale_temporaries
from tnquant.qat.history import History

__all__ = [
    "OPTIONS",
    "MAY_CHANGE",
    "class_name",
    "describe",
    "run_options",
    "check_state",
    "read_resume",
    "restore",
    "prepare_checkpoint_dir",
]

#: The options of ``finetune`` a checkpoint records and a resumed run must repeat.
OPTIONS = (
    "epochs",
    "max_steps",
    "lr",
    "scale_lr",
    "weight_decay",
    "optimizer",
    "schedule",
    "warmup",
    "clip_grad_norm",
    "train",
    "shuffle",
    "seed",
    "amp",
    "teacher",
    "loss",
    "temperature",
    "outputs",
    "hidden",
    "task_loss",
    "alpha",
    "dropout",
)

#: The options of ``finetune`` a resumed run may change.
MAY_CHANGE = (
    "progress",
    "eval_fn",
    "eval_every",
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "resume_from",
    "ddp",
    "ddp_kwargs",
    "fused",
    "teacher_cache",
    "teacher_cache_bytes",
)

_RECORD = ("steps_per_epoch", "world", "total_steps")
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist = 60, 60, 8


def describe(value: Any) -> Any:
    """A plain, comparable stand-in for an option (stored in the checkpoint).

    Examples
    --------
    >>> describe(0.1), describe(["a"]), describe(len), describe(nn.Linear(1, 1))
    (0.1, ['a'], '<callable len>', '<Linear>')
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, nn.Module):
        return f"<{type(value).__qualname__}>"
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__qualname__)}>"
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return f"<{type(value).__qualname__}>"


def run_options(cfg: Any, objective: Any, dropout: bool) -> dict[str, Any]:
    """The :data:`OPTIONS` of a run, described (``cfg``: a ``FinetuneConfig``).

    Examples
    --------
    >>> from tnquant.qat.config import FinetuneConfig
    >>> from tnquant.qat.objective import Objective
    >>> run_options(FinetuneConfig(), Objective(), dropout=True)["optimizer"]
    'adamw'
    """
    values = {name: getattr(cfg, name) for name in OPTIONS[:13]}
    values.update(
        teacher=objective.teacher,
        loss=objective.loss,
        temperature=objective.temperature,
        outputs=objective.outputs,
        hidden=objective.hidden,
        task_loss=objective.task_loss,
        alpha=objective.alpha,
        dropout=bool(dropout),
    )
    return {name: describe(values[name]) for name in OPTIONS}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def _same(key: str, a: Any, b: Any) -> bool:
    if not (_plain(a) and _plain(b)):
        return False
    if key == "warmup" or isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return type(a) is type(b) and a == b  # warmup=1 (steps) is not warmup=1.0 (all)
    return bool(a == b)


def _count(state: dict[str, Any], key: str, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key!r} must be an int >= {minimum}, got {_short.repr(value)}")
    return value


def _rng_ok(rng: Any) -> bool:
    """``rng`` looks like a :func:`~tnquant.qat.checkpoint.rng_state` of this torch."""
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    return (
        isinstance(cpu, Tensor)
        and cpu.dtype == torch.uint8
        and cpu.shape == torch.get_rng_state().shape
        and isinstance(rng.get("cuda", []), list)
        and all(isinstance(c, Tensor) and c.dtype == torch.uint8 for c in rng.get("cuda", []))
    )


def check_state(state: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the entry when ``state`` is not a usable checkpoint.

    Examples
    --------
    >>> check_state({"format": FORMAT, "step": -1})
    Traceback (most recent call last):
    ...
    ValueError: 'step' must be an int >= 0, got -1
    """
    if state.get("format") != FORMAT:
        raise ValueError(
            f"expected a checkpoint of format {FORMAT!r}, got {_short.repr(state.get('format'))}"
        )
    step, epoch, epoch_steps = (_count(state, k) for k in ("step", "epoch", "epoch_steps"))
    for key, kind in (
        ("model", dict),
        ("optimizer", dict),
        ("scheduler", dict),
        ("ranks", list),
        ("config", dict),
        ("history", dict),
    ):
        if not isinstance(state.get(key), kind):
            raise ValueError(
                f"{key!r} must be a {kind.__name__}, got {type(state.get(key)).__name__}"
            )
    config = state["config"]
    spe, world = _count(config, "steps_per_epoch", 1), _count(config, "world", 1)
    if "total_steps" in config and step > _count(config, "total_steps"):
        raise ValueError(f"'step' is {step}, past the run's {config['total_steps']} steps")
    if epoch_steps >= spe or not epoch_steps <= step <= epoch * spe + epoch_steps:
        raise ValueError(
            f"'step' {step}, 'epoch' {epoch} and 'epoch_steps' {epoch_steps} do "
            f"not fit epochs of {spe} steps"
        )
    ranks = state["ranks"]
    if len(ranks) != world or not all(
        isinstance(r, dict) and _rng_ok(r.get("rng")) and _rng_ok(r.get("epoch_rng")) for r in ranks
    ):
        raise ValueError(
            f"'ranks' must hold the random states of the {world} processes, got "
            f"{_short.repr(ranks)}"
        )
    opt = state["optimizer"]
    if not (
        isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
        and all(isinstance(g, dict) for g in opt["param_groups"])
    ):
        raise ValueError("'optimizer' must be an optimizer state dict ('state' and 'param_groups')")
    History.from_dict(state["history"])  # raises on entries of the wrong type
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise ValueError(f"'scaler' must be a dict or None, got {type(state['scaler']).__name__}")
    if not isinstance(state.get("options", {}), dict):
        raise ValueError(f"'options' must be a dict, got {type(state['options']).__name__}")


def read_resume(
    path: str | os.PathLike[str], record: dict[str, Any], options: dict[str, Any]
) -> tuple[dict[str, Any], Path]:
    """Load and check the checkpoint to resume from; ``(state, path of the file)``.

    ``record``: ``FinetuneConfig.record(...)`` of this run; ``options``:
    :func:`run_options`. Raises ``ValueError`` listing every difference.

    Examples
    --------
    >>> read_resume("no/such/dir", {}, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: resume_from: expected a checkpoint file or directory, no/such/dir ...
    """
    state, used = read_checkpoint(path, validate=check_state)
    saved_cfg = state["config"]
    saved = {k: saved_cfg[k] for k in _RECORD if k in saved_cfg}
    if "options" in state:
        saved.update(state["options"])
    else:
        saved.update({k: saved_cfg[k] for k in ("seed", "shuffle") if k in saved_cfg})
        warnings.warn(
            f"resume_from: {used} was written by an older tnquant that did not record the "
            f"options of its run; {', '.join(o for o in OPTIONS if o not in saved)} cannot be "
            "compared with this run's, which are used as given",
            stacklevel=2,
        )
    mine = {**{k: record[k] for k in _RECORD}, **options}
    diffs = [
        f"written with {k}={_short.repr(saved[k])}, this run has {k}={mine[k]!r}"
        for k in mine
        if k in saved and not _same(k, saved[k], mine[k])
    ]
    if diffs:
        raise ValueError(
            f"resume_from: the checkpoint {used} was "
            + "; ".join(diffs)
            + "; resume with the same data, number of processes and options, or start a fresh "
            f"run (a resumed run may change {', '.join(MAY_CHANGE)} only)"
        )
    return state, used


def _fits(saved: Any, current: Any) -> bool:
    """``saved`` (from a file) has the kind of value ``current`` has."""
    if current is None or isinstance(current, bool):
        return saved is None or isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return (
            not isinstance(saved, bool) and isinstance(saved, (int, float)) and math.isfinite(saved)
        )
    if isinstance(current, (list, tuple)):
        return (
            isinstance(saved, (list, tuple))
            and len(saved) == len(current)
            and all(_fits(s, c) for s, c in zip(saved, current, strict=True))
        )
    return type(saved) is type(current)


def class_name(obj: Any) -> str:
    """``module.QualName`` of the class of ``obj`` (the optimizer's, in a checkpoint).

    Examples
    --------
    >>> class_name(nn.Linear(1, 1))
    'torch.nn.modules.linear.Linear'
    """
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_optimizer(
    saved: dict[str, Any], saved_class: Any, optimizer: Optimizer, where: str
) -> None:
    mine = class_name(optimizer)
    if saved_class is not None and saved_class != mine:
        raise ValueError(
            f"{where}: its optimizer state is of {_short.repr(saved_class)}, this "
            f"run's optimizer is {mine}; pass the optimizer of the checkpoint's run"
        )
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{where}: its optimizer has {len(groups)} parameter groups, this "
            f"run's has {len(optimizer.param_groups)}; pass the same model and train="
        )
    params: dict[Any, Tensor] = {}
    for i, (group, current) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = group.get("params")
        if not isinstance(ids, list) or len(ids) != len(current["params"]):
            raise ValueError(
                f"{where}: parameter group {i} of its optimizer does not hold the "
                f"{len(current['params'])} parameters of this run's"
            )
        params.update(zip(ids, current["params"], strict=True))
        unknown = sorted(str(k) for k in group if k not in current)
        if unknown and saved_class is None:
            raise ValueError(
                f"{where}: its optimizer has settings {unknown} that this run's "
                f"{type(optimizer).__name__} does not know; it was written by "
                "another optimizer: pass the optimizer of the checkpoint's run"
            )
        for key, value in group.items():
            if key != "params" and (
                not _plain(value) or key in current and not _fits(value, current[key])
            ):
                raise ValueError(
                    f"{where}: setting {key!r} of its optimizer is "
                    f"{_short.repr(value)}, not a value like {current.get(key)!r}"
                )
    for pid, entry in saved["state"].items():
        p = params.get(pid)
        if p is None or not isinstance(entry, dict):
            raise ValueError(
                f"{where}: its optimizer state holds an entry for parameter "
                f"{_short.repr(pid)}, which is not one of its parameter groups'"
            )
        for key in _MOMENTS:
            moment = entry.get(key)
            if moment is not None and (not isinstance(moment, Tensor) or moment.shape != p.shape):
                shape = tuple(moment.shape) if isinstance(moment, Tensor) else moment
                raise ValueError(
                    f"{where}: optimizer moment {key!r} of parameter {pid} has "
                    f"shape {_short.repr(shape)}, the parameter {tuple(p.shape)}"
                )


def _check_scheduler(saved: dict[str, Any], current: dict[str, Any], step: int, where: str) -> None:
    for key, value in saved.items():
        if key not in current or not _fits(value, current[key]):
            raise ValueError(
                f"{where}: entry {_short.repr(key)} of its scheduler state is "
                f"{_short.repr(value)}, not a value like {current.get(key)!r}"
            )
    if saved.get("last_epoch", step) != step:
        raise ValueError(
            f"{where}: its scheduler is at step {saved['last_epoch']}, the "
            f"checkpoint at step {step}"
        )


def restore(
    state: dict[str, Any], path: Path, model: nn.Module, optimizer: Optimizer, scheduler: Any
) -> None:
    """Check, then load, the model, optimizer and scheduler states of a checkpoint.

    Examples
    --------
    >>> import torch
    >>> from tnquant.qat.optim import make_scheduler
    >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> sched = make_scheduler(opt, "constant", total=4, warmup=0)
    >>> state = {"step": 0, "model": model.state_dict(), "optimizer": opt.state_dict(),
    ...          "scheduler": sched.state_dict()}
    >>> state["optimizer"]["param_groups"][0]["momentum"] = "fast"
    >>> restore(state, Path("step_00000000.pt"), model, opt, sched)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: resume_from: step_00000000.pt: setting 'momentum' of its optimizer is 'fast', ...
    """
    where = f"resume_from: {path}"
    _check_optimizer(state["optimizer"], state.get("optimizer_class"), optimizer, where)
    _check_scheduler(state["scheduler"], scheduler.state_dict(), state["step"], where)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{where}: its model state does not fit this model: {e}") from e
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def prepare_checkpoint_dir(directory: str | os.PathLike[str], is_main: bool) -> None:
    """Refuse a ``checkpoint_dir`` that is a file; remove stale temporaries (rank 0).

    Examples
    --------
    >>> import tempfile
    >>> f = tempfile.NamedTemporaryFile()
    >>> prepare_checkpoint_dir(f.name, True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: checkpoint_dir must be a directory (or not exist yet), got the file ...
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"checkpoint_dir must be a directory (or not exist yet), got the file {d}")
    if is_main:
        remove_stale_temporaries(d)
