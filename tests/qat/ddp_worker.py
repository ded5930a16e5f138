"""Run by ``test_ddp.py`` under ``torchrun --nproc_per_node 2``; writes results to argv[1].

1. ``finetune(..., ddp=True)`` initialises the process group from torchrun's
   environment (gloo on CPU), trains on this rank's shard of the global batch
   list, writes checkpoints from rank 0, and destroys the group.
2. The worker initialises a group itself; ``finetune(ddp='auto')`` uses it
   and resumes a fresh model from the step-3 checkpoint.

Each rank saves ``rank<r>.pt`` with both final state dicts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.qat.models import batches, compressed, mlp  # noqa: E402
from tnquant.qat import finetune  # noqa: E402

DTYPE = torch.float64
EPOCHS = 2
CHECKPOINT_EVERY = 3
RESUME_STEP = 3


def build():
    """Teacher and student, identical in every process."""
    teacher = mlp(seed=0, dtype=DTYPE)
    return compressed(teacher, rank=2, bits=4), teacher


def global_batches():
    """The global list of batches: rank r takes batches[r::2]."""
    return batches(3, 8, size=4, dtype=DTYPE)


def train(**kwargs):
    student, teacher = build()
    report = finetune(
        student, global_batches(), teacher, epochs=EPOCHS, lr=1e-2, progress=False, **kwargs
    )
    return student, report


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ckpt = out / "ckpt"
    student, report = train(
        ddp=True, checkpoint_dir=ckpt, checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=None
    )
    group_left = torch.distributed.is_initialized()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # a file store: torchrun's own store does not take a second default group
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world
    )
    torch.distributed.barrier()  # rank 0 has written every checkpoint
    resumed, _ = train(ddp="auto", resume_from=ckpt / f"step_{RESUME_STEP:08d}.pt")
    still_there = torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()
    torch.save(
        {
            "full": student.state_dict(),
            "resumed": resumed.state_dict(),
            "loss": report.history.loss,
            "group_left": group_left,
            "user_group_kept": still_there,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
