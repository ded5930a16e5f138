"""Run every benchmark script, then assemble benchmarks/results/REPORT.md.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/run_all.py [--quick] [names...]``).
Each script writes its own markdown (command, machine line with the date,
tables) under ``benchmarks/results/``; this runner sequences them (a failed
script is recorded and the others still run; the exit status is 1 if any
failed), records each script's exit status and wall time in
``results/runs.json``, and then assembles ``results/REPORT.md``: a header
(date, the scripts run with their status and time) and one section per
``results/*.md`` file in the order of :data:`ORDER` (others after, by
name), each file's own command/machine/date lines kept, its headings
demoted under the section's, and every PNG plot in the results folder
embedded (in the section whose name starts its file name, or at the end).

``--report-only`` re-assembles REPORT.md from the existing results without
running anything (the header then shows the last recorded runs from
``runs.json``, if any). ``--results DIR`` assembles from another folder
(the scripts themselves always write to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = sorted(p.stem for p in HERE.glob("bench_*.py"))
REPORT = "REPORT.md"
RUNS = "runs.json"

#: section order of REPORT.md: a results file ``<stem>.md`` goes under the first
#: entry that equals its stem or, for entries ending in ``*``, starts it
ORDER = [
    "quant",
    "layers",
    "factorize",
    "ptq_minilm",
    "converted",
    "converted_kernels",
    "memory",
    "qat_minilm*",
    "qat_digits",
    "qat_step",
    "search",
    "search_whole",
    "export",
    "export_cnn",
    "families",
    "codebooks",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})(\s.*)$")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def order_key(stem: str) -> tuple[int, str]:
    """Where ``<stem>.md`` goes in the report: ``(position in ORDER, stem)``.

    Examples
    --------
    >>> sorted(["export", "zeta", "qat_minilm_gpu", "quant", "qat_minilm"], key=order_key)
    ['quant', 'qat_minilm', 'qat_minilm_gpu', 'export', 'zeta']
    """
    for i, pat in enumerate(ORDER):
        if stem == pat or (pat.endswith("*") and stem.startswith(pat[:-1])):
            return i, stem
    return len(ORDER), stem


def _split_title(text: str) -> tuple[str | None, list[str]]:
    """The file's leading ``# title`` (if its first non-blank line is one) and the rest."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        m = _HEADING.match(line)
        if m and len(m.group(1)) == 1:
            return m.group(2).strip(), lines[i + 1 :]
        break
    return None, lines


def _demote(lines: list[str]) -> list[str]:
    """Put every markdown heading outside code fences under the section's ``##``.

    One level down, and at least ``###`` (at most ``######``).
    """
    out, fenced = [], False
    for line in lines:
        if _FENCE.match(line):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line)
        out.append(f"{'#' * min(6, max(3, len(m.group(1)) + 1))}{m.group(2)}" if m else line)
    return out


def _first_line(lines: list[str], prefix: str) -> str | None:
    for line in lines:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _cell(text: str) -> str:
    """``text`` safe in a markdown table cell (pipes escaped).

    Examples
    --------
    >>> print(_cell("a | b"))
    a \\| b
    """
    return text.replace("|", "\\|")


def _fmt_runs(runs: dict[str, Any]) -> list[str]:
    out = [
        "Scripts run (the latest run of each):",
        "",
        "| script | exit status | wall s | finished |",
        "|---|---|---|---|",
    ]
    for r in runs.get("scripts", []):
        status = "ok" if r["returncode"] == 0 else f"FAILED ({r['returncode']})"
        out.append(
            f"| `{r['command']}` | {status} | {r['wall_s']:.0f} | {r.get('finished', '?')} |"
        )
    return out


def merge_runs(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The run record with ``new``'s scripts replacing ``old``'s of the same name.

    Examples
    --------
    >>> old = {"scripts": [{"name": "bench_a", "returncode": 1}, {"name": "bench_b"}]}
    >>> merge_runs(old, {"scripts": [{"name": "bench_a", "returncode": 0}]})["scripts"]
    [{'name': 'bench_a', 'returncode': 0}, {'name': 'bench_b'}]
    """
    by_name = {r["name"]: r for r in (old or {}).get("scripts", [])}
    by_name.update({r["name"]: r for r in new["scripts"]})
    return {"scripts": sorted(by_name.values(), key=lambda r: order_key(r["name"][6:]))}


def build_report(
    results: Path, runs: dict[str, Any] | None = None, report_only: bool = False
) -> str:
    """The text of REPORT.md for the results folder ``results``.

    ``runs`` is the record of the scripts run (as written to ``runs.json``);
    ``None`` reads ``results/runs.json`` when it exists.
    """
    if runs is None and (results / RUNS).is_file():
        runs = json.loads((results / RUNS).read_text())
    mds = sorted(
        (p for p in results.glob("*.md") if p.name != REPORT), key=lambda p: order_key(p.stem)
    )
    pngs = sorted(results.glob("*.png"))
    texts = {p: p.read_text() for p in mds}
    referenced = {Path(m).name for t in texts.values() for m in _IMAGE.findall(t)}
    loose = [p for p in pngs if p.name not in referenced]
    # a loose plot goes to the section with the longest stem that starts its name
    plots: dict[Path | None, list[Path]] = {}
    for png in loose:
        owners = [p for p in mds if png.stem.startswith(p.stem)]
        owner = max(owners, key=lambda p: len(p.stem)) if owners else None
        plots.setdefault(owner, []).append(png)

    today = datetime.date.today().isoformat()
    head = [
        "# Benchmark report",
        "",
        f"Assembled {today} by `python benchmarks/run_all.py"
        f"{' --report-only' if report_only else ''}` from the {len(mds)} results files "
        f"in `{results.name}/`; each section keeps its own command, machine and date "
        f"lines.",
        "",
    ]
    if runs and runs.get("scripts"):
        head += _fmt_runs(runs)
        if report_only:
            head += [
                "",
                "(the last recorded run; this report was re-assembled without running anything)",
            ]
    else:
        head.append("No run recorded: assembled from the existing results, nothing run.")
    head += ["", "## Contents", "", "| section | file | command | machine |", "|---|---|---|---|"]
    sections: list[str] = []
    split = {p: _split_title(texts[p]) for p in mds}
    seen = [t for t, _ in split.values() if t]
    for p in mds:
        title, body = split[p]
        # a title that several files share gets the file's stem
        name = (
            p.stem if title is None else title if seen.count(title) == 1 else f"{title} ({p.stem})"
        )
        command = _first_line(body, "command:") or "(not recorded)"
        mach = _first_line(body, "machine:") or "(not recorded)"
        cells = (_cell(name), f"[{p.name}]({p.name})", _cell(command), _cell(mach))
        head.append("| " + " | ".join(cells) + " |")
        sec = [f"## {name}", "", f"From [`{p.name}`]({p.name}).", ""]
        while body and not body[0].strip():
            body = body[1:]
        sec += _demote(body)
        for png in plots.get(p, []):
            sec += ["", f"![{png.stem}]({png.name})"]
        sections.append("\n".join(sec).rstrip() + "\n")
    if plots.get(None):
        sections.append(
            "\n".join(
                ["## Other plots", ""] + [f"![{png.stem}]({png.name})\n" for png in plots[None]]
            )
        )
    others = sorted(
        p.name
        for p in results.iterdir()
        if p.is_file() and p.suffix not in (".md", ".png") and p.name != RUNS
    )
    if others:
        sections.append(
            "\n".join(["## Other files", ""] + [f"- [{n}]({n})" for n in others]) + "\n"
        )
    return "\n".join(head) + "\n\n" + "\n".join(sections)


def run_scripts(names: list[str], quick: bool) -> tuple[dict[str, Any], bool]:
    """Run the benchmark scripts one after the other; the run record and whether all passed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    record = []
    ok = True
    for name in names:
        script = HERE / f"{name}.py"
        cmd = [sys.executable, str(script)]
        if quick and "--quick" in script.read_text():
            cmd.append("--quick")
        shown = " ".join(["python", f"benchmarks/{script.name}", *cmd[2:]])
        print(f"== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        wall = time.perf_counter() - t0
        record.append(
            {
                "name": name,
                "command": shown,
                "returncode": rc,
                "wall_s": wall,
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            }
        )
        if rc != 0:
            ok = False
            print(f"benchmark {name} failed (exit status {rc})", file=sys.stderr)
    return {"scripts": record}, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"which to run (default all): {SCRIPTS}")
    parser.add_argument("--quick", action="store_true", help="pass --quick where supported")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-assemble REPORT.md from the existing results",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="results folder to assemble REPORT.md from (default %(default)s)",
    )
    args = parser.parse_args(argv)
    results: Path = args.results
    if not results.is_dir():
        parser.error(f"results folder {results} does not exist")
    ok = True
    runs = None
    if not args.report_only:
        names = args.names or SCRIPTS
        unknown = sorted(set(names) - set(SCRIPTS))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; valid: {SCRIPTS}")
        new, ok = run_scripts(names, args.quick)
        old = json.loads((results / RUNS).read_text()) if (results / RUNS).is_file() else None
        runs = merge_runs(old, new)
        (results / RUNS).write_text(json.dumps(runs, indent=1) + "\n")
    elif args.names:
        parser.error("--report-only runs nothing; leave out the script names")
    report = results / REPORT
    report.write_text(build_report(results, runs, report_only=args.report_only))
    print(f"wrote {report}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
