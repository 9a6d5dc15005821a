"""Pair book/NN_*.md with notebooks/NN_*.ipynb and re-execute the chapters that changed.

A chapter is re-executed when its notebook is missing, when the notebook's code cells differ from
the Markdown source's, when any code cell has not been run, or when it is named on the command line
(``--force`` re-executes every chapter). Where only the text (the Markdown cells) changed, the pair is
updated and the stored outputs are kept: the code that made them is the same. Named chapters are the
only ones looked at. Stored outputs are thus those of the current source.

Usage: python scripts/sync.py [--force] [NN ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def inputs(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


TEXT_ONLY = "only its text changed"


def needs_run(md: Path, ipynb: Path) -> str | None:
    """Why the chapter must be re-executed (or :data:`TEXT_ONLY`: re-paired, not re-executed), or None
    if its stored notebook is current."""
    if not ipynb.exists():
        return "no notebook yet"
    nb = jupytext.read(ipynb)
    source = jupytext.read(md)
    if inputs(source) != inputs(nb):
        def code(cells):
            return [c for c in inputs(cells) if c[0] == "code"]
        return TEXT_ONLY if code(source) == code(nb) else "source changed"
    if any(c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None
           for c in nb.cells):
        return "unexecuted cells"
    return None


def sync(md: Path, why: str) -> None:
    ipynb = ROOT / "notebooks" / md.relative_to(ROOT / "book").with_suffix(".ipynb")
    ipynb.parent.mkdir(parents=True, exist_ok=True)
    update = ["--update"] if ipynb.exists() else []
    subprocess.run([BIN / "jupytext", *update, "--to", "ipynb", "--output", ipynb, md], check=True,
                   stdout=subprocess.DEVNULL)
    if why == TEXT_ONLY:  # --update kept every code cell's outputs
        print(f"{md.name}: re-paired ({why}; outputs kept)", flush=True)
        os.utime(md)
        return
    start = time.perf_counter()
    print(f"{md.name}: executing ({why})", flush=True)
    done = subprocess.run([BIN / "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                           "--ExecutePreprocessor.timeout=600", ipynb], cwd=ipynb.parent)
    if done.returncode:
        raise SystemExit(f"sync: {md.name} failed to execute (the error is above); fix {md} and rerun")
    print(f"{md.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)
    os.utime(md)  # the source stays the newer file of the pair, as JupyterLab's jupytext expects


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers to re-execute, e.g. 01 02")
    parser.add_argument("--force", action="store_true", help="re-execute every chapter")
    args = parser.parse_args()
    chapters = sorted((ROOT / "book").glob("[0-9][0-9]_*.md"))
    known = {md.name[:2] for md in chapters}
    unknown = [c for c in args.chapters if c not in known]
    if unknown:
        print(f"sync: unknown chapter(s) {unknown}; chapters are {sorted(known)}", file=sys.stderr)
        return 2
    if args.chapters and not args.force:  # named chapters only: the others are left as they are
        chapters = [md for md in chapters if md.name[:2] in args.chapters]
    for md in chapters:
        ipynb = ROOT / "notebooks" / md.with_suffix(".ipynb").name
        why = ("forced" if args.force or md.name[:2] in args.chapters else needs_run(md, ipynb))
        if why:
            sync(md, why)
        else:
            print(f"{md.name}: current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
