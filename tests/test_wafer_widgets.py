"""wafer.widgets: the placement explorer's choices, resizing, and what its readout says."""

import io

import pytest

from wafer.placement import evaluate
from wafer.target import Target
from wafer.widgets import CHOICES, WAFERS, PlacementExplorer, draw, explorer_models, place, readout, resize


def shown(x: PlacementExplorer) -> tuple[str, bytes]:
    """The readout and the image the explorer should show for its current placement."""
    p = x.placement()
    e = evaluate(p)
    buf = io.BytesIO()
    draw(p, e, highlight=x.stage.value).savefig(buf, format="png")
    return readout(p, e), buf.getvalue()


def test_place_and_resize():
    p = place("Cerebras-GPT 111M", "WSE-2", "FLOP-proportional", "inference")
    assert p.target == Target(WAFERS["WSE-2"], "inference", 2048) and p.strategy == "FLOP-proportional"
    q = resize(p, 3, 10)
    assert q.rects[3].h == p.rects[3].h + 10 and q.rects[3].w == p.rects[3].w
    assert q.rects[4].h == p.rects[4].h - 10  # the neighbour below paid for it
    assert sum(r.area for r in q.rects) == sum(r.area for r in p.rects)
    assert q.target == p.target and q.strategy == "FLOP-proportional (resized)"
    e, f = evaluate(p), evaluate(q)
    assert f.bottleneck == 4 and f.tokens_per_s < e.tokens_per_s  # the neighbour is now the slowest
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
    with pytest.raises(ValueError, match="mode='serving' is not one of"):
        place("GPT-2 small", "WSE-2", "serpentine", "serving")
    assert set(WAFERS) == {"WSE-1", "WSE-2", "WSE-3", "TOY"} and CHOICES[-1] == "optimized"
    assert list(explorer_models()) == ["minigpt (chapter 04)", "GPT-2 small", "Cerebras-GPT 111M",
                                       "Cerebras-GPT 256M", "Cerebras-GPT 590M"]


def test_explorer_follows_its_controls():
    x = PlacementExplorer(model="Cerebras-GPT 111M")
    assert x.placement().strategy == "serpentine" and (x.readout.value, x.image.value) == shown(x)
    assert "tokens/s" in x.readout.value and "limit: compute" in x.readout.value
    serpentine = evaluate(x.placement())
    x.strategy.value = "FLOP-proportional"
    assert x.placement().strategy == "FLOP-proportional" and (x.readout.value, x.image.value) == shown(x)
    balanced = evaluate(x.placement())
    assert balanced.tokens_per_s > serpentine.tokens_per_s
    slowest = x.stage.value
    assert slowest == balanced.bottleneck
    x.rows.value = -30  # the slowest stage gives rows away: slower
    assert x.placement().rects[slowest].h == x.base().rects[slowest].h - 30
    assert evaluate(x.placement()).tokens_per_s < balanced.tokens_per_s
    assert (x.readout.value, x.image.value) == shown(x) and x.status.value == ""
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
    assert "days" in t.readout.value and first["gpus"] == 7  # 6.56 PFLOP/s on 745,500 PEs / 0.989 per H100
    t.systems.value = 4
    assert t.estimate()["days"] < first["days"] and f"{t.estimate()['days']:,.2f} days" in t.readout.value
    t.ratio.value = 40
    assert t.estimate()["flops"] == pytest.approx(2 * first["flops"], rel=0.01)
    with pytest.raises(ValueError, match="model='70B' is not one of"):
        TrainingEstimator(model="70B")
