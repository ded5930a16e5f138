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


def test_search_is_the_function_and_planning_the_subpackage():
    import importlib.util

    import tnquant.planning

    assert callable(tnquant.search) and tnquant.search is tnquant.planning.search
    assert importlib.util.find_spec("tnquant.search") is None  # no module hides the function
    assert tnquant.planning.Plan is tnquant.Plan


def test_version_lives_in_its_own_module():
    from tnquant._version import __version__

    assert tnquant.__version__ == __version__
