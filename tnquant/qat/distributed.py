"""DistributedDataParallel set-up for ``finetune``: when, which backend, and teardown.

``ddp='auto'`` uses DDP when a process group with more than one process is
initialised, or when the environment of ``torchrun`` is present
(``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), in which
case ``finetune`` initialises the group itself (``nccl`` for a model on a
CUDA device, ``gloo`` otherwise) and destroys it when it returns.
``ddp=True`` requires one of the two, ``ddp=False`` never uses DDP.

Gradients are averaged by DDP itself; nothing here communicates but the
process-group set-up and, at checkpoints, the gathering of every rank's
random state (``all_gather_object``) so that a resumed run draws the same
dropout masks on every rank.

Examples
--------
>>> ctx = DistContext.setup(False, __import__("torch").device("cpu"))
>>> ctx.enabled, ctx.rank, ctx.world
(False, 0, 1)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DistContext", "env_has_torchrun"]


def env_has_torchrun() -> bool:
    """Whether ``torchrun``'s variables describe more than one process.

    Examples
    --------
    >>> isinstance(env_has_torchrun(), bool)
    True
    """
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not all(k in os.environ for k in needed):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


@dataclass
class DistContext:
    """Rank, world size, and whether ``finetune`` created the process group.

    Examples
    --------
    >>> DistContext().is_main
    True
    """

    enabled: bool = False
    rank: int = 0
    world: int = 1
    created: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: shows progress, writes checkpoints, runs ``eval_fn``."""
        return self.rank == 0

    @classmethod
    def setup(cls, ddp: bool | str, device: torch.device) -> DistContext:
        """Decide on DDP for ``ddp`` (``True``, ``False``, ``'auto'``); init the group if needed.

        Examples
        --------
        >>> import torch
        >>> DistContext.setup("auto", torch.device("cpu")).world >= 1
        True
        """
        if ddp not in (True, False, "auto"):
            raise ValueError(f"ddp must be True, False or 'auto', got {ddp!r}")
        if ddp is False:
            return cls()
        available = torch.distributed.is_available()
        dist = torch.distributed
        if available and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                return cls(True, dist.get_rank(), world, False)
            return cls()
        if available and env_has_torchrun():
            backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            return cls(True, dist.get_rank(), dist.get_world_size(), True)
        if ddp is True:
            raise ValueError(
                "ddp=True needs torch.distributed: initialise a process group with more than "
                "one process, or launch with torchrun (RANK, WORLD_SIZE > 1, MASTER_ADDR and "
                "MASTER_PORT in the environment)"
            )
        return cls()

    def wrap(
        self, model: nn.Module, device: torch.device, ddp_kwargs: dict[str, Any] | None
    ) -> nn.Module:
        """``DistributedDataParallel(model)`` when enabled, else ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        kwargs = dict(ddp_kwargs or {})
        if device.type == "cuda":
            kwargs.setdefault(
                "device_ids",
                [device.index if device.index is not None else torch.cuda.current_device()],
            )
        return DistributedDataParallel(model, **kwargs)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` without DDP)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def teardown(self) -> None:
        """Destroy the process group if ``setup`` created it."""
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.created = False
