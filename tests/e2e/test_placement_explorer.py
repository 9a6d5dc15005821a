"""Browser test: JupyterLab runs chapter 11, and changing the placement explorer's model and strategy
changes its map and its throughput readout."""

import pytest
from browser import ARTIFACTS, errors_on_page, lab, notebook_page, wait_for_new_image

pytestmark = pytest.mark.e2e
__all__ = ["lab"]  # the fixture, imported for pytest
READOUT = ".jp-OutputArea .placement-readout"


def choose(page, label, option):
    """Pick ``option`` in the explorer's dropdown called ``label``."""
    named = page.locator(".widget-label", has_text=label)
    dropdown = page.locator(".jp-OutputArea .widget-dropdown", has=named)
    dropdown.first.locator("select").select_option(label=option)


def changed(page, old_readout, old_src):
    """Wait until the readout and the map both differ from before; return the new readout."""
    page.wait_for_function("([sel, old]) => { const r = document.querySelector(sel);"
                           " return r && r.innerText.trim() !== old; }",
                           arg=[READOUT, old_readout], timeout=60_000)
    wait_for_new_image(page, old_src)
    return page.locator(READOUT).first.inner_text().strip()


def test_model_and_strategy_change_the_map_and_the_throughput(lab):
    with notebook_page(lab, "11_placement.ipynb", READOUT, "placement_explorer") as page:
        image = page.locator(".jp-OutputArea img.widget-image").first
        image.scroll_into_view_if_needed()
        wait_for_new_image(page, "")
        readout = page.locator(READOUT).first.inner_text().strip()
        assert "tokens/s" in readout and "slowest stage: head" in readout  # equal serpentine strips
        first = image.screenshot()

        src = image.get_attribute("src")
        choose(page, "model", "Cerebras-GPT 111M")
        second_readout = changed(page, readout, src)
        second = image.screenshot()
        assert second != first, "changing the model did not change the map"

        src = image.get_attribute("src")
        choose(page, "strategy", "FLOP-proportional")
        third_readout = changed(page, second_readout, src)
        assert image.screenshot() not in (first, second), "changing the strategy did not change the map"
        speed = [float(r.split(" tokens/s")[0].replace(",", "")) for r in (second_readout, third_readout)]
        assert speed[1] > 2 * speed[0], f"balanced areas should be far faster: {speed}"

        box = page.locator(".jp-OutputArea .widget-vbox", has=page.locator(".placement-readout")).first
        box.scroll_into_view_if_needed()
        box.screenshot(path=str(ARTIFACTS / "placement_explorer.png"))
        assert not errors_on_page(page)
