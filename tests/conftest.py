from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# CI machines are slow and shared: no per-example deadline; a fixed number of examples per test.
settings.register_profile("book", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("book")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path} (the shared data folder is absent)")
    return path.read_text(encoding="utf-8")
