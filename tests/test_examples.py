"""Every script in ``examples/`` runs with short settings, exits 0 and prints its table.

The scripts are discovered by glob, so a new example is covered without
editing this file: it runs with ``--quick`` when its source has that flag,
else with no argument, and must exit 0 and print something. The known
scripts get their short arguments and the lines of their tables to look
for. Each runs in a fresh interpreter (as a user runs it), one thread,
offline, in a temporary working directory.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# script -> (arguments, text its output must contain); "{out}" is a temporary directory
SHORT: dict[str, tuple[list[str], list[str]]] = {
    "per_channel_vs_per_tensor.py": (
        ["--quick"],
        [
            "granularity    size (bits)  x smaller  test acc",
            "2  per-group 32",
            "per-tensor    per-channel   per-group 64",
            "bits/weight  mean cos",
        ],
    ),
    "qat_vs_ptq.py": (
        ["--quick"],
        [
            "size (bits)  x smaller  PTQ acc  QAT acc",
            "dense           binary channel",
            "Tucker+LowRank  int2 channel",
        ],
    ),
    "minimal_precision.py": (
        ["--quick", "--minilm"],
        [
            "chosen precision per layer:",
            "searched (mixed)",
            "MiniLM-L6: 2 Linear layers",
            "held-out cosine",
            "int8/channel mse",
        ],
    ),
    "export_fixed_point.py": (
        ["--quick", "{out}"],
        ["max |emulator - float model|", "bit budget and resource estimate", "drift"],
    ),
}
SHORT["gptq_vs_rtn.py"] = (
    ["--quick"],
    ["weights                     RTN cos  GPTQ cos", "int3 per-channel mse", "layer error"],
)
SHORT["demo.py"] = (
    ["--quick"],
    [
        "1) quantizers on a real weight",
        "2) factorize all Linear layers",
        "3) compress -> quantize -> calibrate -> distil -> convert",
    ],
)
# too long for short settings (minutes on 2 cores) and without a --quick flag
SLOW: dict[str, list[str]] = {}


def _cases() -> list:
    cases = []
    for path in EXAMPLES:
        marks = [pytest.mark.slow] if path.name in SLOW else []
        cases.append(pytest.param(path, id=path.name, marks=marks))
    return cases


def _arguments(path: Path) -> tuple[list[str], list[str]]:
    if path.name in SHORT:
        return SHORT[path.name]
    if path.name in SLOW:
        return [], SLOW[path.name]
    return (["--quick"] if "--quick" in path.read_text() else []), []


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "TMPDIR": str(tmp_path / "tmp"),  # a script's tempfile.mkdtemp() lands in the test's
    }
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _no_flag_paths(args: list[str], cwd: Path) -> None:
    """A flag taken for a path (``sys.argv[1]`` as the output folder) leaves that path behind."""
    made = sorted(a for a in args if a.startswith("-") and (cwd / a).exists())
    assert not made, f"the script created {made} in its working directory: a flag read as a path"


@pytest.mark.parametrize("path", _cases())
def test_example_runs(path: Path, tmp_path: Path) -> None:
    args, expected = _arguments(path)
    args = [a.replace("{out}", str(tmp_path / "out")) for a in args]
    proc = subprocess.run(
        [sys.executable, str(path), *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    where = (
        f"{path.name} {' '.join(args)}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-3000:]}"
    )
    assert proc.returncode == 0, where
    assert proc.stdout.strip(), where
    _no_flag_paths(args, tmp_path)
    for text in expected:
        assert text in proc.stdout, f"{text!r} not printed by {where}"


def test_export_fixed_point_quick_is_a_flag_not_the_output_folder(tmp_path: Path) -> None:
    script = ROOT / "examples" / "export_fixed_point.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_flag_paths(["--quick"], tmp_path)
    assert "--quick: skipping the hls4ml C simulation" in proc.stdout
    # no folder given: the exports go to a new temporary directory (here under TMPDIR)
    exports = [p.parent for p in (tmp_path / "tmp").glob("*/export")]
    assert len(exports) == 1 and f"exports in {exports[0]}" in proc.stdout
    assert (exports[0] / "export_narrow" / "report.json").is_file()


def test_known_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    stale = (set(SHORT) | set(SLOW)) - names
    assert not stale, f"listed here but not in examples/: {sorted(stale)}"
    assert {"per_channel_vs_per_tensor.py", "qat_vs_ptq.py", "minimal_precision.py"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_says_how_to_run_it(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} has no module docstring"
    assert "Run:" in doc, f"{path.name}'s docstring does not say how to run it"
