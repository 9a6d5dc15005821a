"""The book's environment check: is every dependency importable, and at which version? And a
one-line description of the machine.

Built in: 00_preface
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass

# (distribution name on PyPI, module to import, what the book uses it for)
DEPENDENCIES = (
    ("torch", "torch", "tensors, autograd, the GPT"),
    ("numpy", "numpy", "arrays, the mesh simulator"),
    ("matplotlib", "matplotlib", "plots"),
    ("regex", "regex", "GPT-2's pre-splitting pattern"),
    ("tqdm", "tqdm", "progress bars"),
    ("tiktoken", "tiktoken", "the reference BPE encoder"),
    ("transformers", "transformers", "the reference GPT-2"),
    ("ipywidgets", "ipywidgets", "the explorers"),
    ("jupyterlab", "jupyterlab", "reading the book"),
    ("jupytext", "jupytext", "pairing book/*.md with notebooks/*.ipynb"),
    ("nbval", "nbval", "re-executing the notebooks in tests"),
    ("pytest", "pytest", "tests"),
    ("hypothesis", "hypothesis", "property tests"),
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    version: str  # the installed version, or the import error
    purpose: str

    def __str__(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'}  {self.name:<11} {self.version:<16} {self.purpose}"


def check_environment(dependencies=DEPENDENCIES) -> list[Check]:
    """Import each dependency and read its installed version.

    Built in: 00_preface
    """
    rows = []
    for dist, module, purpose in dependencies:
        try:
            importlib.import_module(module)
            version = importlib.metadata.version(dist)
            rows.append(Check(dist, True, version, purpose))
        except Exception as e:  # noqa: BLE001 (any failure to import is what we report)
            rows.append(Check(dist, False, f"{type(e).__name__}: {e}"[:60], purpose))
    return rows


def describe_machine() -> str:
    """Python version, platform, CPU count and the accelerator torch sees, on one line."""
    import torch  # imported here so that the check above can report a missing torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu only"
    return (f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, accelerator: {device}")
