"""Execute every chapter's notebook, as a reader would, and print a table of how long each took.

The notebooks run in a temporary copy, so nothing in the repository changes. The README's run-time
table is this script's output (with the machine it ran on).

Usage: python scripts/chapter_times.py [NN ...]
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> int:
    wanted = set(sys.argv[1:])
    notebooks = [p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
                 if not wanted or p.name[:2] in wanted]
    if not notebooks:
        print(f"chapter_times: no chapter among {sorted(wanted)}", file=sys.stderr)
        return 2
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for nb in notebooks:
            copy = Path(tmp) / nb.name
            shutil.copy(nb, copy)
            start = time.perf_counter()
            done = subprocess.run([BIN / "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                                   "--ExecutePreprocessor.timeout=600", copy], cwd=ROOT / "notebooks",
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                print(f"chapter_times: {nb.name} failed", file=sys.stderr)
                return 1
            total += seconds
            rows.append((nb.stem, seconds))
            print(f"{nb.stem}: {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"Measured on {os.cpu_count()} cores, {platform.machine()} {platform.system()}, Python "
          f"{platform.python_version()}:\n")
    print("| chapter | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.0f} |")
    print(f"| all | {total:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
