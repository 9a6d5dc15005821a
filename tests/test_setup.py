"""The two commands: `make lab` serves JupyterLab; `make test` is what CI runs; torch stays pinned."""

import json
import urllib.request

import pytest

from conftest import ROOT, jupyterlab, lab_flags


@pytest.mark.slow
def test_make_lab_serves_jupyterlab(tmp_path):
    """`make lab` starts JupyterLab: its /api/status answers on localhost."""

    def make_lab(port, token):
        return ["make", "lab", "LAB_ARGS=" + " ".join(lab_flags(port, token))]

    with jupyterlab(make_lab, tmp_path, tmp_path / "lab.log") as (base, token):
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
            assert r.status == 200 and "started" in json.loads(r.read())


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "passed" in ci  # and it fails when nothing passed


def test_torch_is_pinned():
    reqs = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs
    pinned = [r for r in reqs if not r.startswith("#") and "==" in r]
    assert all(r.count("==") == 1 for r in pinned)
