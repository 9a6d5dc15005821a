"""Widgets for the wafer chapters. For chapter 11's placement explorer: the models it offers
(:func:`explorer_models`), the placement it shows (:func:`place`, :func:`resize`), its map and bars
(:func:`draw`), its readout and :class:`PlacementExplorer`; for chapter 12: :class:`TrainingEstimator`.

Built in: 11_placement
"""

from __future__ import annotations

import html
import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from wafer.hardware import MODEL_DTYPE, WAFERS
from wafer.optimize import optimize
from wafer.placement import Evaluation, Placement, evaluate
from wafer.stages import pipeline_stages
from wafer.strategies import STRATEGIES, column_layout, column_rects
from wafer.target import Target, check_mode
from wafer.workload import gpt_workload

CHOICES = list(STRATEGIES) + ["optimized"]


def explorer_models() -> dict:
    """The models of chapter 11 and its placement explorer: name -> (GPTConfig, context).

    Built in: 11_placement
    """
    from minigpt.model import GPTConfig
    from minigpt.scaling import CEREBRAS_GPT

    # chapter 04's story-world model: 2 blocks 128 wide, a 384-character context, 51 symbols
    out = {"minigpt (chapter 04)": (GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=384, vocab_size=51),
                                    384),
           "GPT-2 small": (GPTConfig(block_size=2048), 2048)}
    for m in CEREBRAS_GPT:
        if m.name in ("111M", "256M", "590M"):
            out[f"Cerebras-GPT {m.name}"] = (m.config, 2048)
    return out


def place(model: str, wafer: str, strategy: str, mode: str) -> Placement:
    """The placement the explorer shows: ``model`` from :func:`explorer_models`,
    ``wafer`` a preset's name, ``strategy`` one of the strategies or ``"optimized"``."""
    models = explorer_models()
    if model not in models:
        raise ValueError(f"model={model!r} is not one of {list(models)}")
    if wafer not in WAFERS:
        raise ValueError(f"wafer={wafer!r} is not one of {list(WAFERS)}")
    if strategy not in CHOICES:
        raise ValueError(f"strategy={strategy!r} is not one of {CHOICES}")
    config, context = models[model]
    stages = pipeline_stages(gpt_workload(config, context=context, dtype=MODEL_DTYPE))
    make = optimize if strategy == "optimized" else STRATEGIES[strategy]
    return make(stages, Target(WAFERS[wafer], check_mode(mode), context))


def resize(p: Placement, stage: int, rows: int) -> Placement:
    """``p`` with stage ``stage`` taller by ``rows`` (shorter if negative), its neighbour in the same
    column giving (or taking) them. Only for placements in columns of stacked stages."""
    layout = column_layout(p)
    if layout is None:
        raise ValueError(f"the {p.strategy} placement is not in columns of stacked stages; resizing works "
                         f"on row strips, serpentine, FLOP-proportional and optimized placements")
    groups, widths, heights, serpentine = layout
    k = next(k for k, g in enumerate(groups) if stage in g)
    g, h = groups[k], list(heights[k])
    if len(g) == 1:
        raise ValueError(f"stage {p.stages[stage].name} has its column to itself: no neighbour to trade "
                         f"rows with")
    j = g.index(stage)
    other = j + 1 if j + 1 < len(g) else j - 1
    h[j] += rows
    h[other] -= rows
    if min(h) < 1:
        short = p.stages[g[other] if h[other] < 1 else stage].name
        raise ValueError(f"moving {rows} rows would leave stage {short} with no rows")
    heights = heights[:k] + [h] + heights[k + 1:]
    rects = column_rects(groups, widths, heights, serpentine)
    return Placement(p.target, p.stages, rects, p.strategy + " (resized)")


def draw(p: Placement, e: Evaluation, fig: Figure | None = None, highlight: int | None = None) -> Figure:
    """The wafer map, each stage's rectangle coloured by its layer (the slowest outlined in red), and
    each stage's cycles per token: compute, internal traffic and transfers."""
    from matplotlib.patches import Rectangle

    fig = fig or Figure(figsize=(11, 4.6), dpi=80)
    ax_map, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    n = len(p.stages)
    colors = [matplotlib.colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]
    for i, (s, r) in enumerate(zip(p.stages, p.rects)):
        edge = "red" if i == e.bottleneck else ("white" if i == highlight else "black")
        ax_map.add_patch(Rectangle((r.x, r.y), r.w, r.h, facecolor=colors[i], edgecolor=edge,
                                   linewidth=2.5 if edge != "black" else 0.4))
        if r.area >= p.wafer.pes / 150:
            ax_map.text(r.x + r.w / 2, r.y + r.h / 2, s.name, ha="center", va="center", fontsize=7,
                        color="white" if i < 0.6 * n else "black")
    ax_map.set(xlim=(0, p.wafer.width), ylim=(p.wafer.height, 0), aspect="equal",
               title=f"{p.wafer.name}: {p.strategy}, {p.target.mode}", xlabel="x (PE column)",
               ylabel="y (PE row)")
    x = np.arange(n)
    for k, (label, values) in enumerate((("compute", e.compute), ("internal (ramps)", e.internal),
                                         ("transfer out", e.transfer))):
        ax_bar.bar(x + (k - 1) * 0.28, values, 0.28, label=label)
    ax_bar.axhline(e.stage.max(), color="red", linewidth=0.8, label="slowest stage")
    ax_bar.set_xticks(x, [s.name for s in p.stages], rotation=90, fontsize=7)
    ax_bar.set(ylabel="cycles per token", title=f"{e.tokens_per_s:,.0f} tokens/s, utilisation "
                                                f"{e.utilisation:.1%}, limit: {e.limit}")
    ax_bar.set_ylim(0, 1.3 * max(float(e.stage.max()), 1e-9))  # room for the legend above the bars
    ax_bar.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


def readout(p: Placement, e: Evaluation) -> str:
    """One line of HTML: throughput, utilisation, the limit and the slowest stage."""
    status = "" if e.feasible else f" &mdash; <b>infeasible</b>: {html.escape(e.problems[0].message)}"
    return (f"<span class='placement-readout'>{e.tokens_per_s:,.0f} tokens/s &middot; utilisation "
            f"{e.utilisation:.1%} &middot; limit: {e.limit} &middot; slowest stage: "
            f"{p.stages[e.bottleneck].name}{status}</span>")


class PlacementExplorer:
    """Pick a model, a wafer, a strategy and a mode; see the wafer map coloured by layer, each stage's
    cycles per token, and the throughput, utilisation and limiting resource. Pick a stage and move
    rows to or from its neighbour to see the effect.

    ``PlacementExplorer().widget`` is an ipywidgets box; displaying the explorer shows it.

    Built in: 11_placement
    """

    def __init__(self, model: str = "GPT-2 small", wafer: str = "WSE-2", strategy: str = "serpentine",
                 mode: str = "inference"):
        import ipywidgets as w

        place(model, wafer, strategy, mode)  # raises on a bad choice
        self._cache: dict = {}
        self._quiet = False
        self.model = w.Dropdown(options=list(explorer_models()), value=model, description="model")
        self.wafer = w.Dropdown(options=list(WAFERS), value=wafer, description="wafer")
        self.strategy = w.Dropdown(options=CHOICES, value=strategy, description="strategy")
        self.mode = w.Dropdown(options=["inference", "training"], value=mode, description="mode")
        self.stage = w.Dropdown(options=[], description="stage")
        self.rows = w.IntSlider(value=0, min=-64, max=64, description="rows ±", continuous_update=False)
        self.image = w.Image(format="png")
        self.readout = w.HTML()
        self.status = w.HTML()
        for control in (self.model, self.wafer, self.strategy, self.mode):
            control.observe(self._choose, names="value")
        for control in (self.stage, self.rows):
            control.observe(self._update, names="value")
        self.widget = w.VBox([w.HBox([self.model, self.wafer]), w.HBox([self.strategy, self.mode]),
                              w.HBox([self.stage, self.rows]), self.readout, self.image, self.status])
        self._choose()

    def base(self) -> Placement:
        key = (self.model.value, self.wafer.value, self.strategy.value, self.mode.value)
        if key not in self._cache:
            self._cache[key] = place(*key)
        return self._cache[key]

    def placement(self) -> Placement:
        """The placement the controls select, with the selected stage resized."""
        p = self.base()
        if self.rows.value and self.stage.value is not None:
            p = resize(p, self.stage.value, self.rows.value)
        return p

    def _choose(self, change=None) -> None:
        try:
            p = self.base()
        except ValueError as e:
            self.status.value = f"<b>cannot place:</b> {html.escape(str(e))}"
            self.readout.value = "<span class='placement-readout'>no placement</span>"
            return
        self._quiet = True  # one redraw, after the stage list and the slider are reset
        try:
            self.stage.options = [(s.name, i) for i, s in enumerate(p.stages)]
            self.stage.value = evaluate(p).bottleneck
            self.rows.value = 0
            self.rows.disabled = column_layout(p) is None  # resizing needs columns of stacked stages
        finally:
            self._quiet = False
        self._update()

    def _update(self, change=None) -> None:
        if self._quiet:
            return
        try:
            p = self.placement()
            e = evaluate(p)
            buf = io.BytesIO()
            draw(p, e, highlight=self.stage.value).savefig(buf, format="png")
            self.image.value = buf.getvalue()
            self.readout.value = readout(p, e)
            self.status.value = ""
        except ValueError as e:
            self.status.value = f"<b>cannot show:</b> {html.escape(str(e))}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

class TrainingEstimator:
    """How long does it take to train a GPT? Pick a Cerebras-GPT shape, the tokens per parameter and
    the systems; read the days on a weight-streamed CS-2 cluster and on H100s of the same dense peak
    at a model FLOPs utilisation you choose.

    Built in: 12_streaming
    """

    def __init__(self, model: str = "1.3B", tokens_per_param: float = 20.0, systems: int = 4,
                 mfu: float = 0.4):
        import ipywidgets as w

        from minigpt.scaling import CEREBRAS_GPT

        self.models = {m.name: m.config for m in CEREBRAS_GPT}
        if model not in self.models:
            raise ValueError(f"model={model!r} is not one of {list(self.models)}")
        self.model = w.Dropdown(options=list(self.models), value=model, description="model")
        self.ratio = w.FloatLogSlider(value=tokens_per_param, base=10, min=0, max=3, step=0.05,
                                      description="tokens/param", continuous_update=False)
        self.systems = w.IntSlider(value=systems, min=1, max=64, description="CS-2 systems",
                                   continuous_update=False)
        self.mfu = w.FloatSlider(value=mfu, min=0.05, max=1.0, step=0.05, description="H100 MFU",
                                 continuous_update=False)
        self.readout = w.HTML()
        for control in (self.model, self.ratio, self.systems, self.mfu):
            control.observe(self._update, names="value")
        self.widget = w.VBox([w.HBox([self.model, self.ratio]), w.HBox([self.systems, self.mfu]),
                              self.readout])
        self._update()

    def estimate(self) -> dict:
        """The numbers the readout shows."""
        from wafer.hardware import H100, WSE2, Cluster
        from wafer.streaming import gpu_training_days, training_time
        from wafer.workload import gpt_workload

        work = gpt_workload(self.models[self.model.value], context=2048, dtype="fp16")
        tokens = self.ratio.value * work.params
        systems = self.systems.value
        per_system = max(8, 240 // systems)  # sequences per system: at least 8, about 240 in all
        t = training_time(work, tokens, Cluster(WSE2, systems), per_system * systems)
        gpus = round(Cluster(WSE2, systems).peak_flops("fp16") / H100.peak_flops())  # the same dense peak
        return {"params": work.params, "tokens": tokens, "flops": t.flops, "days": t.days,
                "utilisation": t.utilisation, "gpus": gpus,
                "gpu_days": gpu_training_days(work, tokens, H100, gpus, self.mfu.value)}

    def _update(self, change=None) -> None:
        try:
            e = self.estimate()
            self.readout.value = (
                f"<span class='estimate'>{e['params'] / 1e9:.2f}B parameters on {e['tokens'] / 1e9:,.0f}B "
                f"tokens: {e['flops']:.2e} FLOPs. {self.systems.value} CS-2: <b>{e['days']:,.2f} days</b> "
                f"(utilisation {e['utilisation']:.0%}). {e['gpus']} H100 (the same dense peak) at "
                f"{self.mfu.value:.0%} MFU: <b>{e['gpu_days']:,.2f} days</b>.</span>")
        except ValueError as e:
            self.readout.value = f"<b>cannot estimate:</b> {html.escape(str(e))}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
