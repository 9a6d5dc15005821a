"""The attention explorer: any minigpt model, any text, a heatmap per layer and head.

Built in: 02_attention
"""

from __future__ import annotations

import html
import io

import torch
from matplotlib.figure import Figure
from torch import nn

from minigpt.attention import MultiHeadAttention, record_attention


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable labels for token ids: each token's text, with spaces and newlines made visible."""
    out = []
    for i in ids:
        raw = tokenizer.decode_bytes([i]) if hasattr(tokenizer, "decode_bytes") else None
        text = raw.decode("utf-8", "replace") if raw is not None else tokenizer.decode([i])
        out.append(text.replace(" ", "·").replace("\n", "⏎") or "∅")
    return out


@torch.no_grad()
def attention_maps(model: nn.Module, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """Run ``model`` on ``text`` and return (token labels, weights of shape (layers, heads, T, T)).

    ``model`` is called with a (1, T) tensor of token ids; it may be any module whose attention
    layers are :class:`~minigpt.attention.MultiHeadAttention`.

    Built in: 02_attention
    """
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"text={text!r} encodes to no tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with record_attention(model) as maps:
            model(torch.tensor([ids], device=device))
    finally:
        model.train(was_training)
    return token_labels(tokenizer, ids), torch.stack([m[-1][0] for m in maps]).float().cpu()


def plot_attention(weights: torch.Tensor, labels: list[str], ax=None, title: str = ""):
    """Draw a (T, T) attention matrix: rows are queries (attending), columns keys (attended to)."""
    if ax is None:
        ax = Figure(figsize=(6, 6)).subplots()
    t = len(labels)
    if tuple(weights.shape) != (t, t):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not match {t} labels")
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    size = max(5, min(9, 400 // max(t, 1)))
    ax.set_xticks(range(t), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(t), labels, fontsize=size)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return ax


class AttentionExplorer:
    """Pick a layer and a head (or the mean over heads) and see who attends to whom.

    ``AttentionExplorer(model, tokenizer, text).widget`` is an ipywidgets box: a text field, sliders
    for layer and head, a checkbox for the mean over heads, and the heatmap as an image. Displaying the
    explorer itself in a notebook shows the widget.

    Built in: 02_attention
    """

    def __init__(self, model: nn.Module, tokenizer, text: str, layer: int = 0, head: int = 0):
        import ipywidgets as w

        attn = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        if not attn:
            raise ValueError(f"{type(model).__name__} contains no MultiHeadAttention module to explore")
        self.model, self.tokenizer = model, tokenizer
        self.n_layer, self.n_head = len(attn), attn[0].n_head
        if not (0 <= layer < self.n_layer and 0 <= head < self.n_head):
            raise ValueError(f"layer={layer}, head={head} must be in [0, {self.n_layer}) and "
                             f"[0, {self.n_head})")
        self.text = w.Text(value=text, description="text", continuous_update=False,
                           layout=w.Layout(width="95%"))
        self.layer = w.IntSlider(value=layer, min=0, max=self.n_layer - 1, description="layer")
        self.head = w.IntSlider(value=head, min=0, max=self.n_head - 1, description="head")
        self.mean = w.Checkbox(value=False, description="mean over heads")
        self.image = w.Image(format="png")
        self.status = w.HTML()
        for control in (self.text, self.layer, self.head, self.mean):
            control.observe(self._update, names="value")
        self.widget = w.VBox([self.text, w.HBox([self.layer, self.head, self.mean]), self.image,
                              self.status])
        self._cache_text: str | None = None
        self._labels: list[str] = []
        self._maps: torch.Tensor | None = None
        self._update()

    def weights(self) -> tuple[list[str], torch.Tensor]:
        """The labels and the (T, T) matrix the controls currently select."""
        if self._maps is None or self._cache_text != self.text.value:
            self._labels, self._maps = attention_maps(self.model, self.tokenizer, self.text.value)
            self._cache_text = self.text.value
        maps = self._maps[self.layer.value]
        return self._labels, maps.mean(0) if self.mean.value else maps[self.head.value]

    def figure(self) -> Figure:
        labels, weights = self.weights()
        side = min(14.0, max(6.0, 0.15 * len(labels)))  # room for a readable label per token
        fig = Figure(figsize=(side, side), dpi=80)
        which = "mean over heads" if self.mean.value else f"head {self.head.value}"
        plot_attention(weights, labels, fig.subplots(), f"layer {self.layer.value}, {which}")
        fig.tight_layout()
        return fig

    def _update(self, change=None) -> None:
        self.head.disabled = self.mean.value
        try:
            buf = io.BytesIO()
            self.figure().savefig(buf, format="png")
            self.image.value = buf.getvalue()
            self.status.value = ""
        except ValueError as e:
            self.status.value = f"<b>cannot show:</b> {html.escape(str(e))}"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
