"""Build the book as a static website: the executed notebooks, a chapter index and an API reference.

Stages ``site/`` (the configuration and the front page) with ``notebooks/*.ipynb`` (stored executed by
``make sync``) in ``build/site/``, writes the table of contents from the chapters in ``book/`` and an
API page that documents every module of ``minigpt`` and ``wafer`` from their docstrings, and runs
jupyter-book 1.x (which builds offline). Prints where the pages are.

Usage: python scripts/site.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = "99_references"  # the book's references page: listed under "Reference", not as a chapter
STAGE = ROOT / "build" / "site"
MODULES = {"minigpt": ["envcheck", "stories", "entropy", "data", "files", "checks", "tokenizer", "attention",
                       "model", "hf", "generate", "hardware", "train", "finetune", "lora", "distributed",
                       "scaling", "sweep", "widgets", "moe", "parallel", "parallel.launch", "parallel.zero",
                       "parallel.tensor", "parallel.schedules", "parallel.pipeline", "parallel.context",
                       "parallel.expert", "parallel.sharded", "parallel.planner"],
           "wafer": ["hardware", "target", "shape", "workload", "stages", "cost", "mesh", "network",
                     "wavelets", "collectives", "viz", "placement", "strategies", "optimize", "placement_sim",
                     "streaming", "inference", "emulate", "phases", "kernels", "calibration", "widgets"]}


def chapters() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.md"))
    missing = [n for n in names if not (ROOT / "notebooks" / f"{n}.ipynb").exists()]
    if missing:
        sys.exit(f"site: no executed notebook for {missing}; run `make sync` first")
    return names


def stage() -> Path:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "chapters").mkdir(parents=True)
    for f in (ROOT / "site").iterdir():
        shutil.copy(f, STAGE / f.name)
    names = chapters()
    for name in names:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", STAGE / "chapters" / f"{name}.ipynb")
    toc = ["format: jb-book", "root: intro", "parts:", "  - caption: Chapters", "    chapters:"]
    toc += [f"      - file: chapters/{n}" for n in names if n != REFERENCES]
    toc += ["  - caption: Reference", "    chapters:"]
    toc += [f"      - file: chapters/{n}" for n in names if n == REFERENCES] + ["      - file: api"]
    (STAGE / "_toc.yml").write_text("\n".join(toc) + "\n")
    api = ["# API reference", "", "Generated from the docstrings. A public function's docstring names the "
           "chapter that builds it.", ""]
    for package, modules in MODULES.items():
        api += [f"## `{package}`", ""]
        for m in modules:
            api += [f"### `{package}.{m}`", "", "```{eval-rst}", f".. automodule:: {package}.{m}",
                    "   :members:", "```", ""]
    (STAGE / "api.md").write_text("\n".join(api))
    return STAGE


def main() -> None:
    path = stage()
    jb = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run([str(jb), "build", str(path), "--warningiserror", "--keep-going", "-q"],
                            cwd=ROOT)
    html = path / "_build" / "html" / "index.html"
    if result.returncode or not html.exists():
        sys.exit(f"site: jupyter-book failed (exit {result.returncode}); see the messages above")
    print(f"site: {html}")


if __name__ == "__main__":
    main()
