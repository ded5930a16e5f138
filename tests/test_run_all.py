"""benchmarks/run_all.py --report-only: REPORT.md assembled from a fake results folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"

FILES = {
    "export.md": "# Export bit-exactness\n\ncommand: `python benchmarks/bench_export.py`\n\n"
    "machine: CPU X, 2026-01-02\n\n## Rows\n\n| a |\n|---|\n| 1 |\n",
    "search.md": "# Search\n\ncommand: `python benchmarks/bench_search.py`\n\n"
    "machine: CPU X, 2026-01-01\n\n![Pareto front](search_pareto.png)\n",
    "qat_minilm_gpu.md": '# QAT\n\ncommand: `gpu --rows "a|b"`\n\nmachine: H200\n',
    "qat_minilm.md": "# QAT\n\ncommand: `cpu`\n\nmachine: CPU X\n\n```\n# not a heading\n```\n",
    "layers.md": "command: .venv/bin/python benchmarks/bench_layers.py\nmachine: CPU X\n\n"
    "| layer |\n|---|\n| TT |\n",
    "quant.md": "command: q\nmachine: CPU X\n",
    "zeta.md": "# Something new\n\nmachine: CPU Y\n",
}


def _fake_results(root: Path) -> Path:
    results = root / "results"
    results.mkdir()
    for name, text in FILES.items():
        (results / name).write_text(text)
    (results / "search_pareto.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # referenced already
    (results / "export_sizes.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # loose: export section
    (results / "cuda_tests.txt").write_text("passed\n")
    (results / "REPORT.md").write_text("# stale report\n")
    (results / "runs.json").write_text(
        json.dumps(
            {
                "scripts": [
                    {
                        "name": "bench_export",
                        "command": "python benchmarks/bench_export.py",
                        "returncode": 0,
                        "wall_s": 95.2,
                        "finished": "2026-01-02T10:00:00",
                    },
                    {
                        "name": "bench_search",
                        "command": "python benchmarks/bench_search.py",
                        "returncode": 1,
                        "wall_s": 12.0,
                        "finished": "2026-01-02T10:01:00",
                    },
                ]
            }
        )
    )
    return results


def test_report_only_assembles_sections_in_order(tmp_path: Path) -> None:
    results = _fake_results(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.name != "REPORT.md"}
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--report-only", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = (results / "REPORT.md").read_text()
    # nothing ran, nothing else changed
    assert {
        p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.name != "REPORT.md"
    } == before
    assert report.startswith("# Benchmark report")
    sections = re.findall(r"^## (.+)$", report, flags=re.M)
    assert sections == [
        "Contents",
        "quant",
        "layers",
        "QAT (qat_minilm)",
        "QAT (qat_minilm_gpu)",
        "Search",
        "Export bit-exactness",
        "Something new",
        "Other files",
    ]
    # the files' own headings are demoted under their section, code fences left alone
    assert "\n### Rows\n" in report and "\n# not a heading\n" in report
    titles = [line for line in report.splitlines() if line.startswith("# ")]
    assert titles == ["# Benchmark report", "# not a heading"]  # the fenced line stays
    # each section keeps its command and machine lines
    assert "command: `python benchmarks/bench_export.py`" in report
    assert "machine: CPU X, 2026-01-02" in report
    assert '| `gpu --rows "a\\|b"` | H200 |' in report  # pipes escaped in the contents
    # plots: the referenced one once, the loose one embedded in its section
    assert report.count("(search_pareto.png)") == 1
    export = report.split("## Export bit-exactness", 1)[1].split("\n## ", 1)[0]
    assert "![export_sizes](export_sizes.png)" in export
    # header: date, scripts with status and wall time
    assert "| `python benchmarks/bench_export.py` | ok | 95 |" in report
    assert "| `python benchmarks/bench_search.py` | FAILED (1) | 12 |" in report
    assert "[cuda_tests.txt](cuda_tests.txt)" in report
    assert "stale" not in report


def test_report_only_without_runs_and_bad_folder(tmp_path: Path) -> None:
    results = tmp_path / "r"
    results.mkdir()
    (results / "quant.md").write_text("command: q\nmachine: m\n")
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--report-only", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "No run recorded" in (results / "REPORT.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--report-only", "--results", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_run_records_status_and_keeps_going(tmp_path: Path) -> None:
    """The run path on two stand-in scripts: a failure is recorded and the next still runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all_under_test", RUN_ALL)
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_export.py").write_text(
        "import sys, pathlib\nassert '--quick' in sys.argv\n"
        f"pathlib.Path({str(tmp_path / 'results' / 'export.md')!r}).write_text("
        "'# Export\\n\\ncommand: `x --quick`\\n')\n# --quick\n"
    )
    (bench / "bench_quant.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "results").mkdir()
    run_all.HERE, run_all.SCRIPTS = bench, ["bench_quant", "bench_export"]
    assert run_all.main(["--quick", "--results", str(tmp_path / "results")]) == 1
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())["scripts"]
    assert [(r["name"], r["returncode"]) for r in runs] == [("bench_quant", 3), ("bench_export", 0)]
    assert runs[1]["command"] == "python benchmarks/bench_export.py --quick"
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "FAILED (3)" in report and "## Export" in report
