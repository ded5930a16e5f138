"""Forged save directories of huge, self-consistent sizes allocate nothing on load.

Split from :mod:`tests.test_io_adversarial` (its helpers and ``saved`` fixture):
the loads run in a subprocess whose address space is capped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from tests.test_io_adversarial import (  # noqa: F401  (saved: the module's fixture)
    AS_MARGIN,
    ROOT,
    _grow,
    copy_dir,
    forge,
    read_json,
    resync,
    saved,
    write_json,
)
from tnquant import TT, QuantSpec
from tnquant.io import save
from tnquant.layers import TTLinear
from tnquant.layers.quantized import QuantLinear
from tnquant.ptq import calibrate
from tnquant.quant.quantizer import Quantizer
from tnquant.quantization import convert

# --------------------------------------------------------------------------- #
# torch allocations: forged loads in a subprocess with a capped address space
# --------------------------------------------------------------------------- #


def _single_layers(root: Path) -> dict[str, Path]:
    """Root-level saves (no base model): one valid, three with huge self-consistent sizes."""
    torch.manual_seed(0)
    tt = TTLinear.from_dense(nn.Linear(16, 16), TT(rank=2, order=2))
    tt.core_quantizers = nn.ModuleList([Quantizer(QuantSpec(bits=4)) for _ in tt.cores])
    save(tt, root / "tt")
    ql = QuantLinear.from_float(nn.Linear(16, 8))
    ql.weight_quantizer = Quantizer(QuantSpec(bits=4, granularity="channel"))
    calibrate(ql, [torch.randn(4, 16)], progress=False)
    convert(ql, progress=False)
    save(ql, root / "ql")

    def tt_huge(meta):  # two cores of 512 MiB each
        config = meta["modules"][0]["node"]["config"]
        config["core_shapes"] = [[1, 1 << 13, 1 << 13, 2], [2, 1 << 13, 1 << 13, 1]]
        config["in_features"] = config["out_features"] = 1 << 26

    def ql_huge(meta):  # a 4 GiB weight placeholder, 512 MiB of zeroed codes
        node = meta["modules"][0]["node"]
        node["config"]["in_features"] = node["config"]["out_features"] = 1 << 15
        dict(node["children"])["weight_quantizer"]["module"]["config"]["shape"] = [1 << 15] * 2

    forge(root / "tt", root / "tt-huge", tt_huge)
    forge(root / "ql", root / "ql-huge", ql_huge)
    copy_dir(root / "tt", root / "tt-header")
    _grow(root / "tt-header", "cores.0", [1, 1 << 14, 1 << 14, 2], pad=False)  # 2 GiB claimed
    resync(root / "tt-header")
    meta = read_json(root / "tt-header")
    meta["modules"][0]["node"]["config"]["core_shapes"][0] = [1, 1 << 14, 1 << 14, 2]
    write_json(root / "tt-header", meta)
    return {name: root / name for name in ("tt-huge", "ql-huge", "tt-header")}


CAPPED = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from tnquant.io import load
    from tests.test_io_adversarial import Small
    valid, cases = sys.argv[1], json.loads(sys.argv[2])
    load(valid)  # every lazy import done before the cap
    Small()
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[3]), resource.RLIM_INFINITY))
    try:
        torch.zeros(1 << 29)  # 2 GiB: the cap must catch it
        print("cap-missed")
    except (RuntimeError, MemoryError):
        print("cap-holds")
    for name, path, with_base in cases:
        try:
            load(path, model=Small() if with_base else None)
        except ValueError as err:  # IntegrityError is one
            print(name, "refused", type(err).__name__)
        except BaseException as err:
            print(name, "FAILED", type(err).__name__, str(err)[:200])
        else:
            print(name, "LOADED")
""")


def test_oversized_forgeries_allocate_nothing(saved, tmp_path):  # noqa: F811
    cases = [[name, str(path), False] for name, path in _single_layers(tmp_path).items()]

    def tucker_huge(meta):  # fc1's core G alone: 1 GiB of float32, 256 MiB of 8-bit codes
        entry = next(e for e in meta["modules"] if e["names"] == ["fc1"])
        config, rank = entry["node"]["config"], 1 << 14
        config["core_shapes"] = [[8, rank], [rank, rank], [16, rank]]
        config["decomposition_info"]["ranks"] = [rank, rank]
        for k, frozen in enumerate(dict(entry["node"]["children"])["core_quantizers"]["list"][:2]):
            frozen["config"]["shape"] = config["core_shapes"][k]

    work = forge(saved["converted"]["dir"], tmp_path / "converted-huge", tucker_huge)
    cases.append(["converted-huge", str(work), True])
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED, str(tmp_path / "tt"), json.dumps(cases), str(AS_MARGIN)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.split("\n")
    assert proc.returncode == 0 and lines[0] == "cap-holds", proc.stdout + proc.stderr
    outcome = {line.split()[0]: line.split()[1:] for line in lines[1:] if line}
    assert outcome == {name: ["refused", "IntegrityError"] for name, _, _ in cases}, (
        proc.stdout + proc.stderr
    )
