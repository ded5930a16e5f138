"""Run every benchmark script and collect its markdown under benchmarks/results/.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/run_all.py [--quick] [names...]``).
Each script prints its own command, machine line and tables; this runner
only sequences them and stops at the first failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = sorted(p.stem for p in HERE.glob("bench_*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"which to run (default all): {SCRIPTS}")
    parser.add_argument("--quick", action="store_true", help="pass --quick where supported")
    args = parser.parse_args()
    names = args.names or SCRIPTS
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; valid: {SCRIPTS}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for name in names:
        script = HERE / f"{name}.py"
        cmd = [sys.executable, str(script)]
        if args.quick and "--quick" in script.read_text():
            cmd.append("--quick")
        print(f"== {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            print(f"benchmark {name} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
