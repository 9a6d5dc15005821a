"""What the browser tests share: Chromium, a JupyterLab over a copy of the book, and how to drive it.

The tests need Debian's Chromium and the playwright package. Without them they skip, unless
REQUIRE_BROWSER=1 (set by CI), which makes their absence a failure.
"""

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, jupyterlab, lab_flags

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(message)


CHAPTERS = ("02_attention", "11_placement")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 over a copy of the chapters with explorers, so nothing it saves touches
    the repository."""
    require_browser()
    root = tmp_path_factory.mktemp("lab")
    for rel in ["jupytext.toml"] + [f"{d}/{c}.{e}" for c in CHAPTERS for d, e in (("book", "md"),
                                                                                 ("notebooks", "ipynb"))]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    jupyter = Path(sys.executable).parent / "jupyter"

    def lab_on_copy(port, token):
        return [jupyter, "lab", *lab_flags(port, token), f"--ServerApp.root_dir={root}"]

    with jupyterlab(lab_on_copy, root, ARTIFACTS / "jupyterlab.log") as server:
        yield server


# The waits below are patience, not timing asserts: a redraw takes a second on a quiet machine and
# can take tens of seconds on a loaded 2-core one, so each waits generously before it fails.


def slider(page, name):
    return page.locator(".jp-OutputArea .widget-hslider", has=page.locator(".widget-label", has_text=name))


def move(page, name):
    """Move a slider one step (left unless it is at 0) with the keyboard; return (before, after)."""
    s = slider(page, name)
    before = int(s.locator(".widget-readout").inner_text())
    s.locator(".noUi-handle").first.press("ArrowLeft" if before > 0 else "ArrowRight")
    page.wait_for_function(
        "([el, v]) => el.querySelector('.widget-readout').innerText.trim() !== String(v)",
        arg=[s.element_handle(), before], timeout=60_000)
    return before, int(s.locator(".widget-readout").inner_text())


def wait_for_new_image(page, old_src):
    page.wait_for_function("(old) => { const i = document.querySelector('.jp-OutputArea img.widget-image');"
                           " return i && i.src !== old && i.complete && i.naturalWidth > 0; }",
                           arg=old_src, timeout=120_000)


def accept_dialogs(page):
    """JupyterLab sometimes asks which kernel to start, even with one installed: take its default."""
    dialog = page.locator(".jp-Dialog")
    for _ in range(3):
        if not dialog.count():
            return
        dialog.locator("button.jp-mod-accept").first.click()
        page.wait_for_timeout(500)


def run_all(page):
    """Run → Run All Cells; again if no cell is queued ("[*]") within 30 s."""
    started = ("() => Array.from(document.querySelectorAll('.jp-InputPrompt'))"
               ".some(p => p.innerText.includes('[*]'))")
    for _ in range(3):
        page.wait_for_timeout(1_000)  # let a kernel dialog, if any, open
        accept_dialogs(page)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            page.wait_for_function(started, timeout=30_000)
            return
        except Exception:  # noqa: BLE001 (playwright's TimeoutError)
            page.wait_for_timeout(2_000)
    raise AssertionError("Run All Cells started no cell in three attempts")


def errors_on_page(page) -> str:
    return page.evaluate("() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                         ".map(e => e.innerText).filter(t => /Error|Traceback/.test(t)).join('\\n')")


def open_and_run(page, base, token, notebook, ready):
    """Open ``notebook`` in JupyterLab, run all its cells, and wait for the selector ``ready``."""
    page.goto(f"{base}/lab/tree/notebooks/{notebook}?token={token}")
    page.wait_for_selector("text=Kernel status: Idle", state="attached", timeout=120_000)
    run_all(page)
    page.wait_for_selector(ready, timeout=600_000)  # the whole chapter runs first
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's news prompt
    if news.count():
        news.first.click()


@contextlib.contextmanager
def notebook_page(lab, notebook: str, ready: str, name: str):
    """A Chromium page with ``notebook`` open in JupyterLab and all its cells run (``ready`` shown).
    On failure, a screenshot ``{name}_failure.png`` and the errors the notebook shows join the message."""
    from playwright.sync_api import sync_playwright

    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        try:
            open_and_run(page, base, token, notebook, ready)
            yield page
        except Exception as e:
            page.screenshot(path=str(ARTIFACTS / f"{name}_failure.png"))
            raise AssertionError(f"{e}\nerrors shown in the notebook:\n{errors_on_page(page)[-3000:]}") from e
        finally:
            browser.close()
