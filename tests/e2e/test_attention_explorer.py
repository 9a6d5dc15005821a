"""Browser test: JupyterLab runs chapter 02, and the attention explorer's sliders change its heatmap."""

import pytest
from browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    errors_on_page,
    lab,
    move,
    open_and_run,
    wait_for_new_image,
)

pytestmark = pytest.mark.e2e
__all__ = ["lab"]  # the fixture, imported for pytest


def test_explorer_sliders_change_the_heatmap(lab):
    from playwright.sync_api import sync_playwright

    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        try:
            open_and_run(page, base, token, "02_attention.ipynb", ".jp-OutputArea .widget-hslider")
            image = page.locator(".jp-OutputArea img.widget-image")
            image.scroll_into_view_if_needed()
            wait_for_new_image(page, "")
            first = image.screenshot()

            src = image.get_attribute("src")
            before, after = move(page, "head")
            assert before != after
            wait_for_new_image(page, src)
            second = image.screenshot()
            assert second != first, "changing the head did not change the heatmap"

            src = image.get_attribute("src")
            before, after = move(page, "layer")
            assert before != after
            wait_for_new_image(page, src)
            third = image.screenshot()
            assert third not in (first, second), "changing the layer did not change the heatmap"

            box = page.locator(".jp-OutputArea .widget-vbox").first
            box.scroll_into_view_if_needed()
            box.screenshot(path=str(ARTIFACTS / "attention_explorer.png"))
            assert not errors_on_page(page)
        except Exception as e:
            page.screenshot(path=str(ARTIFACTS / "attention_explorer_failure.png"))
            raise AssertionError(f"{e}\nerrors shown in the notebook:\n{errors_on_page(page)[-3000:]}") from e
        finally:
            browser.close()
