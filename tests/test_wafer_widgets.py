"""wafer.widgets: the placement explorer's choices, resizing, and what its readout says."""

import pytest

from wafer.placement import evaluate
from wafer.widgets import CHOICES, WAFERS, PlacementExplorer, place, resize


def test_place_and_resize():
    p = place("Cerebras-GPT 111M", "WSE-2", "FLOP-proportional", "inference")
    q = resize(p, 3, 10)
    assert q.rects[3].h == p.rects[3].h + 10 and q.rects[3].w == p.rects[3].w
    assert sum(r.area for r in q.rects) == sum(r.area for r in p.rects)  # the neighbour paid for it
    assert evaluate(q).tokens_per_s != evaluate(p).tokens_per_s
    with pytest.raises(ValueError, match="not in columns of stacked stages"):
        resize(place("Cerebras-GPT 111M", "WSE-2", "recursive bisection", "inference"), 3, 10)
    with pytest.raises(ValueError, match="with no rows"):
        resize(p, 3, -p.rects[3].h)
    with pytest.raises(ValueError, match=r"model='GPT-5' is not one of \['minigpt"):
        place("GPT-5", "WSE-2", "serpentine", "inference")
    with pytest.raises(ValueError, match=r"wafer='WSE-9' is not one of \['WSE-1', 'WSE-2'"):
        place("GPT-2 small", "WSE-9", "serpentine", "inference")
    with pytest.raises(ValueError, match="strategy='random'"):
        place("GPT-2 small", "WSE-2", "random", "inference")
    assert set(WAFERS) == {"WSE-1", "WSE-2", "WSE-3", "TOY"} and CHOICES[-1] == "optimized"


def test_explorer_follows_its_controls():
    x = PlacementExplorer(model="Cerebras-GPT 111M")
    first, image = x.readout.value, x.image.value
    assert "tokens/s" in first and "limit: compute" in first and image
    x.strategy.value = "FLOP-proportional"
    assert x.readout.value != first and x.image.value != image
    balanced = x.readout.value
    x.rows.value = -30  # the slowest stage gives rows away: slower
    assert x.readout.value != balanced and x.status.value == ""
    x.model.value = "Cerebras-GPT 590M"
    assert x.rows.value == 0 and x.stage.options[-1][0] == "head"
    x.strategy.value = "recursive bisection"
    assert x.rows.disabled
    x.wafer.value = "TOY"  # 590M does not fit on 32 x 32 PEs: said so, nothing shown as if it did
    assert "cannot place" in x.status.value and "layer embed" in x.status.value
    assert "no placement" in x.readout.value


def test_training_estimator():
    from wafer.widgets import TrainingEstimator

    t = TrainingEstimator(model="590M", tokens_per_param=20, systems=1)
    first = t.estimate()
    assert "days" in t.readout.value and first["gpus"] == 8  # 7.48 PFLOP/s / 0.989 per H100
    t.systems.value = 4
    assert t.estimate()["days"] < first["days"] and t.readout.value != ""
    t.ratio.value = 40
    assert t.estimate()["flops"] == pytest.approx(2 * first["flops"], rel=0.01)
    with pytest.raises(ValueError, match="model='70B' is not one of"):
        TrainingEstimator(model="70B")
