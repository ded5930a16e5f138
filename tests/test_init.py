"""Importing tnquant changes no global state and does not touch CUDA."""

import subprocess
import sys

import tnquant

CHECK = r"""
import tensorly as tl
before = tl.get_backend()
import torch
import tnquant
import tnquant.quant, tnquant.decompose, tnquant.layers
assert tl.get_backend() == before, tl.get_backend()
assert not torch.cuda.is_initialized()
print("ok")
"""


def test_import_sets_no_global_state():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_all_names_exist():
    for name in tnquant.__all__:
        assert hasattr(tnquant, name), name
