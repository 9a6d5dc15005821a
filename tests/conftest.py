import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# Functions that tests run in several processes (minigpt.parallel.launch.spawn) live in
# tests/helpers: a new process imports them by module name, and inherits this path.
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

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


def lab_flags(port: int, token: str) -> list[str]:
    """JupyterLab on 127.0.0.1 only, with a token, opening no browser."""
    return ["--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}"]


@contextmanager
def jupyterlab(command: Callable[[int, str], list], config_dir: Path, log: Path, cwd: Path = ROOT,
               timeout: float = 90):
    """Start JupyterLab with ``command(port, token)`` (an argv that passes ``lab_flags``), wait until its
    /api/status answers, yield (base URL, token), and stop the whole process group afterwards.
    The server's output goes to ``log``; its config and runtime files under ``config_dir``.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config_dir / "config"),
               JUPYTER_RUNTIME_DIR=str(config_dir / "runtime"))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(command(port, token), cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s; its log:\n"
                                    f"{log.read_text(errors='replace')[-2000:]}")
                    time.sleep(0.5)
            yield base, token
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
