"""The paired-notebook pipeline: every chapter source has its notebook, with the same inputs, executed."""

import re

import jupytext
import pytest

from conftest import ROOT

BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.md"))


def inputs(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_chapters():
    names = [p.stem for p in CHAPTERS]
    assert names[:2] == ["00_preface", "01_tokens"], names
    for name in names:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", name), f"{name} is not named NN_slug"


def test_every_notebook_has_a_source():
    orphans = [nb.name for nb in NOTEBOOKS.glob("*.ipynb")
               if not (BOOK / nb.with_suffix(".md").name).exists()]
    assert not orphans, f"notebooks without a book/ source: {orphans}"


@pytest.mark.parametrize("md", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_pair_has_identical_inputs_and_is_executed(md):
    ipynb = NOTEBOOKS / md.with_suffix(".ipynb").name
    assert ipynb.exists(), f"{ipynb.name} is missing: run make sync"
    source, stored = jupytext.read(md), jupytext.read(ipynb)
    assert inputs(source) == inputs(stored), f"{md.name} and {ipynb.name} differ: run make sync"
    unexecuted = [i for i, c in enumerate(stored.cells)
                  if c.cell_type == "code" and c.source.strip() and c.get("execution_count") is None]
    assert not unexecuted, f"{ipynb.name}: cells {unexecuted} were never run: run make sync"
    errors = [o.get("ename") for c in stored.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{ipynb.name} is stored with errors {errors}"


@pytest.mark.parametrize("md", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_speaks_only_of_itself(md):
    """No paths of the machine the notebooks were executed on leak into stored outputs."""
    text = (NOTEBOOKS / md.with_suffix(".ipynb").name).read_text(encoding="utf-8")
    for leak in (str(ROOT), "/home/", "/root/", "/tmp/"):
        assert leak not in text, f"{md.stem} contains {leak!r}"


def test_jupytext_config_pairs_book_and_notebooks():
    assert (ROOT / "jupytext.toml").read_text().strip() == 'formats = "book///md:myst,notebooks///ipynb"'
