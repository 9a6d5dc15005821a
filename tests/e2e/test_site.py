"""Browser test of the website: `make html` builds it, and every page opens in Chromium with no error
output, every figure loaded, every internal link resolving, and the exercise answers collapsed."""

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, require_browser

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "build" / "site" / "_build" / "html"
pytestmark = pytest.mark.e2e


def figures(chapter: str) -> int:
    """Image outputs stored in a chapter's executed notebook."""
    nb = json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    require_browser()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "site.py")], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)
    handler = functools.partial(Quiet, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_every_page_renders_with_figures_links_and_collapsed_answers(site):
    from playwright.sync_api import sync_playwright

    chapters = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.md"))
    pages = ["intro.html", "api.html"] + [f"chapters/{c}.html" for c in chapters]
    checked_links = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        try:
            for rel in pages:
                response = page.goto(site + rel)
                assert response.ok, f"{rel}: HTTP {response.status}"
                page.wait_for_load_state("load")
                text = page.inner_text("body")
                assert "Traceback (most recent call last)" not in text, f"{rel} shows an error"
                assert not page.locator(".output.traceback, .output.error").count(), f"{rel} shows an error"
                broken = page.evaluate("() => Array.from(document.images).filter(i => !i.complete || "
                                       "i.naturalWidth === 0).map(i => i.src)")
                assert not broken, f"{rel}: figures that did not load: {broken}"
                if rel.startswith("chapters/"):  # every figure the stored notebook holds is on the page
                    shown, stored = page.locator("article img").count(), figures(Path(rel).stem)
                    assert shown >= stored, f"{rel}: {shown} figures of the notebook's {stored}"
                source = ROOT / "book" / f"{Path(rel).stem}.md"
                if rel.startswith("chapters/") and "## Exercises" in source.read_text():
                    answers = page.locator(".tag_hide-input details")
                    assert answers.count(), f"{rel}: the exercise answers are not collapsed"
                    assert not answers.first.evaluate("d => d.open"), f"{rel}: the answers start open"
                ids = set(page.evaluate("() => Array.from(document.querySelectorAll('[id]')).map(e => e.id)"))
                for href in page.evaluate("() => Array.from(document.querySelectorAll('a[href]'))"
                                          ".map(a => a.getAttribute('href'))"):
                    url = urljoin(site + rel, href)
                    if not url.startswith(site):
                        continue  # outside the site: not ours to check offline
                    target, fragment = urldefrag(url)
                    if target == site + rel:
                        assert not fragment or fragment in ids, f"{rel}: anchor #{fragment} is missing"
                        continue
                    path = HTML / urlparse(target).path.lstrip("/")
                    if path.is_dir():
                        path = path / "index.html"
                    assert path.exists(), f"{rel}: link {href} leads nowhere"
                    checked_links.add(target)
        finally:
            browser.close()
    assert len(checked_links) > len(pages)  # the navigation alone links every page
