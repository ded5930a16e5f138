"""The documentation site builds with ``mkdocs build --strict`` (zero warnings)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.mark.skipif(bool(_missing()), reason=f"docs extra not installed: {_missing()}")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    for page in (
        "index.html",
        "concepts/index.html",
        "api/index.html",
        "benchmarks/index.html",
        "comparison/index.html",
        "tutorials/fixed-point/index.html",
    ):
        assert (site / page).is_file(), page
    # the API reference is generated from the docstrings, the benchmarks page from BENCHMARKS.md
    assert 'id="tnquant.factorize"' in (site / "api/index.html").read_text()
    assert "<table>" in (site / "benchmarks/index.html").read_text()
