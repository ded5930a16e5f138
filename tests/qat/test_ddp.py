"""Two gloo processes under torchrun train the same cores as one process on the global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.qat import ddp_worker
from tnquant.qat import finetune, load_checkpoint

RTOL = 1e-6  # DDP (mean of two shard gradients) vs one process (mean over the concatenation)

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    cmd = launcher + [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        ddp_worker.__file__,
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_process_ddp_matches_one_process_on_the_global_batch(tmp_path):
    _launch(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # one process, the global batch of each step = concatenation of the two shards
    gb = ddp_worker.global_batches()
    student, teacher = ddp_worker.build()
    data = [torch.cat([gb[2 * k], gb[2 * k + 1]]) for k in range(len(gb) // 2)]
    finetune(student, data, teacher, epochs=ddp_worker.EPOCHS, lr=1e-2, ddp=False, progress=False)
    ref = student.state_dict()

    cores = [k for k in ref if ".cores." in k or k.endswith("weight")]
    assert cores
    for k, v in ref.items():
        assert torch.equal(ranks[0]["full"][k], ranks[1]["full"][k]), k  # identical ranks
        torch.testing.assert_close(ranks[0]["full"][k], v, rtol=RTOL, atol=0, msg=k)
    # resumed (in a user-initialised group) == uninterrupted, bit for bit, on both ranks
    for r in ranks:
        assert all(torch.equal(r["resumed"][k], r["full"][k]) for k in ref)
    # finetune destroyed the group it created and left the user's alone
    assert [r["group_left"] for r in ranks] == [False, False]
    assert [r["user_group_kept"] for r in ranks] == [True, True]
    # rank 0 wrote the checkpoints, with the random state of each rank
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000003.pt", "step_00000006.pt", "step_00000008.pt"]
    state = load_checkpoint(tmp_path / "ckpt")
    assert len(state["ranks"]) == 2 and state["config"]["world"] == 2
    assert state["config"]["steps_per_epoch"] == 4
