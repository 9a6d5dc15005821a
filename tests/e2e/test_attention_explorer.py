"""Browser test: JupyterLab runs chapter 02, and the attention explorer's sliders change its heatmap."""

import pytest
from browser import ARTIFACTS, errors_on_page, lab, move, notebook_page, wait_for_new_image

pytestmark = pytest.mark.e2e
__all__ = ["lab"]  # the fixture, imported for pytest


def test_explorer_sliders_change_the_heatmap(lab):
    slider = ".jp-OutputArea .widget-hslider"
    with notebook_page(lab, "02_attention.ipynb", slider, "attention_explorer") as page:
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
