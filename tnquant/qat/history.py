"""What ``finetune`` returns: per-layer rows plus the training history.

Examples
--------
>>> h = History()
>>> h.log_step(1, 0, loss=0.5, lr=1e-3)
>>> h.loss, h.to_dict()["step"]
([0.5], [1])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tnquant.report import Report

__all__ = ["History", "FinetuneReport"]


@dataclass
class History:
    """Losses per step, evaluations, and timing of one (possibly resumed) run.

    Attributes
    ----------
    step, epoch : list of int
        Optimizer step (1-based) and epoch (0-based) of each logged step.
    loss, lr : list of float
        Total loss of the step (this rank's batch) and the learning rate of
        the first parameter group.
    distill, task : list of float
        The two terms when both a teacher and a task loss are given.
    evals : list of dict
        ``{'step': s, **eval_fn(model)}`` on every evaluation.
    skipped : list of int
        With ``amp='fp16'``: the steps whose optimizer step the loss scaler
        skipped (overflowed gradients; the scale was halved).
    time_s : float
        Wall-clock seconds spent training, over all resumed segments.
    resumed_from : int or None
        The step a resumed run started from.
    teacher_calls : int
        Forward passes of the teacher (a resumed run adds its own): one per
        step uncached, one per batch with the teacher cache
        (:mod:`tnquant.qat.teacher_cache`).
    teacher_cache_bytes : int
        Bytes of teacher targets the cache held at the end (0: none).

    Examples
    --------
    >>> History().evals
    []
    """

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    time_s: float = 0.0
    resumed_from: int | None = None
    teacher_calls: int = 0
    teacher_cache_bytes: int = 0

    def log_step(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        distill: float | None = None,
        task: float | None = None,
    ) -> None:
        """Append one step."""
        self.step.append(step)
        self.epoch.append(epoch)
        self.loss.append(loss)
        self.lr.append(lr)
        if distill is not None:
            self.distill.append(distill)
        if task is not None:
            self.task.append(task)

    def log_eval(self, step: int, metrics: Any) -> None:
        """Append ``{'step': step, **metrics}``; tensors become numbers or lists.

        Examples
        --------
        >>> import torch
        >>> h = History(); h.log_eval(3, {"acc": torch.tensor([0.5]), "v": torch.ones(2)})
        >>> h.evals
        [{'step': 3, 'acc': 0.5, 'v': [1.0, 1.0]}]
        """
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            row[str(key)] = _plain(value)
        self.evals.append(row)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-safe when the metrics are)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> History:
        """Rebuild from :meth:`to_dict` (as stored in a checkpoint); ``ValueError`` on bad entries.

        Examples
        --------
        >>> History.from_dict({"loss": [0.5, "x"]})
        Traceback (most recent call last):
        ...
        ValueError: history entry 'loss' must be a list of numbers, got [0.5, 'x']
        """
        known = {k: state[k] for k in cls.__dataclass_fields__ if k in state}
        for key in ("step", "epoch", "loss", "lr", "distill", "task", "skipped"):
            value = known.get(key, [])
            if not isinstance(value, list) or not all(_number(v) for v in value):
                shown = value[:4] if isinstance(value, list) else type(value).__name__
                raise ValueError(f"history entry {key!r} must be a list of numbers, got {shown!r}")
        evals = known.get("evals", [])
        if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
            raise ValueError(
                f"history entry 'evals' must be a list of dicts, got {type(evals).__name__}"
            )
        for key in ("teacher_calls", "teacher_cache_bytes"):
            if not _number(known.get(key, 0)):
                raise ValueError(f"history entry {key!r} must be a number, got {known[key]!r}")
        if not _number(known.get("time_s", 0.0)):
            raise ValueError(
                f"history entry 'time_s' must be a number, got {type(known['time_s']).__name__}"
            )
        return cls(**known)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _plain(value: Any) -> Any:
    """A tensor or numpy value as a Python number (one element) or nested list."""
    if not hasattr(value, "tolist"):
        return value
    count = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 0)
    return value.item() if count == 1 else value.tolist()


class FinetuneReport(Report):
    """A :class:`~tnquant.report.Report` of the trained layers, with the :class:`History`.

    Rows: per layer, the number of trained elements in cores, scales and
    other parameters. ``history`` holds the per-step record.

    Examples
    --------
    >>> r = FinetuneReport(History())
    >>> r.stage, r.history.loss
    ('finetune', [])
    """

    def __init__(self, history: History, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(
            "finetune", columns=("name", "kind", "cores", "scales", "other"), rows=rows or ()
        )
        self.history = history

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["history"] = self.history.to_dict()
        return out

    def table(self) -> str:
        text = super().table()
        h = self.history
        if h.loss:
            text += (
                f"\n{len(h.loss)} steps in {h.time_s:.1f} s, loss {h.loss[0]:.4g} -> "
                f"{h.loss[-1]:.4g}"
            )
        return text
