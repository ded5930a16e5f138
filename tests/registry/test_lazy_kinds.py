"""The Conv1D family is registered lazily: ``import tnquant`` imports no transformers.

Run in a fresh interpreter (this one has transformers loaded by other tests):
the family is absent until ``transformers.pytorch_utils`` is imported, then
present, and a saved ``LowRankHFConv1D`` loads only then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from tnquant import LowRank, save  # noqa: E402
from tnquant.layers import LowRankHFConv1D  # noqa: E402
from tnquant.registry import LazyKinds, lookup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
import tnquant
from tnquant import load
from tnquant.io import IntegrityError
from tnquant.registry import handlers, kinds
d = sys.argv[1]
print("imported", "transformers" in sys.modules)
print("before", any(k.cls.__name__ == "Conv1D" for k in kinds()), "LowRankHFConv1D" in handlers())
try:
    load(d)
except IntegrityError as err:
    print("refused", "unknown module class 'LowRankHFConv1D'" in str(err))
import transformers.pytorch_utils
print("after", any(k.cls.__name__ == "Conv1D" for k in kinds()), "LowRankHFConv1D" in handlers())
layer = load(d)
x = torch.load(d + "/x.pt")
print("equal", type(layer).__name__, torch.equal(layer(x), torch.load(d + "/y.pt")))
"""


def test_a_fresh_interpreter_registers_the_family_only_once_transformers_is_loaded(tmp_path):
    torch.manual_seed(0)
    layer = LowRankHFConv1D.from_dense(Conv1D(6, 4), LowRank(rank=2))
    x = torch.randn(3, 4)
    save(layer, tmp_path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(layer(x).detach(), tmp_path / "y.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "imported False",
        "before False False",
        "refused True",
        "after True True",
        "equal LowRankHFConv1D True",
    ]


def test_in_this_process_the_family_answers():
    kind = lookup(Conv1D(6, 4))
    assert kind is not None and kind.role == "dense" and kind.transposed
    assert kind.dense is Conv1D and kind.weight_kind == "linear"
    assert lookup(LowRankHFConv1D([torch.randn(3, 1), torch.randn(1, 2)])).dense is Conv1D
    assert LazyKinds("no.such.module.Dense", (), lambda c: ()).find() is None
