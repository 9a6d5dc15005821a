"""Pictures of simulator runs: ``link_heatmap`` (wavelets per link, one panel per direction),
``timeline`` (a bar per operation per PE) and ``phase_grid`` (when each PE ends each phase, laid out
as on the mesh); and of a region's KV cache: ``kv_grid`` (which PEs hold each cached token).

Built in: 10_mesh, 13_inference
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from wafer.mesh import PORTS, Report

KIND_COLORS = {"send": "tab:blue", "recv": "tab:green", "reduce": "tab:orange", "reducesend": "tab:red"}


def link_heatmap(report: Report, title: str = "", axes=None):
    """Four panels, one per direction: how many wavelets each PE's router sent north, south, east and
    west. Returns the axes."""
    if axes is None:
        _, axes = plt.subplots(1, 4, figsize=(11, 3), constrained_layout=True)
    top = max(1, int(report.link_wavelets[:, :, 1:].max()))
    for p, ax in zip(range(1, 5), axes):
        image = ax.imshow(report.link_wavelets[:, :, p], vmin=0, vmax=top, cmap="viridis")
        ax.set(title=f"{PORTS[p]}bound", xlabel="x (PE column)", ylabel="y (PE row)")
    plt.colorbar(image, ax=list(axes), label="wavelets sent")
    if title:
        axes[0].figure.suptitle(title)
    return axes


def timeline(report: Report, pes: list | None = None, title: str = "", ax=None):
    """One row per PE, a bar per operation from its start to its end cycle, coloured by kind
    (sends, receives, reductions, and products in gray). Returns the axes."""
    if pes is None:
        pes = sorted({(x, y) for x, y, *_ in report.timeline}, key=lambda p: (p[1], p[0]))
    rows = pes
    index = {pe: i for i, pe in enumerate(rows)}
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    seen = set()
    for x, y, label, start, end in report.timeline:
        if (x, y) not in index:
            continue
        kind = label.split()[0]
        color = KIND_COLORS.get(kind, "0.6")
        name = kind if kind in KIND_COLORS else "compute"
        ax.barh(index[(x, y)], max(end - start, 0.5), left=start, color=color, height=0.7,
                label=None if name in seen else name)
        seen.add(name)
    ax.set_yticks(range(len(rows)), [f"({x},{y})" for x, y in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="cycle", ylabel="PE", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return ax



PHASES = {"receive": ("recv",), "compute": (), "send and reduce": ("send", "reduce", "reducesend")}


def phase_of(label: str) -> str:
    """The phase of a timeline entry: its kind of operation, with every product counted as compute.

    Built in: 10_mesh
    """
    kind = label.split()[0]
    return next((name for name, kinds in PHASES.items() if kind in kinds), "compute")


def phase_ends(report: Report, width: int, height: int) -> dict[str, np.ndarray]:
    """For each phase of :data:`PHASES`, a (height, width) array of the cycle at which each PE's last
    operation of that phase ends (-1 where a PE has none).

    Built in: 10_mesh
    """
    ends = {name: np.full((height, width), -1, dtype=np.int64) for name in PHASES}
    for x, y, label, _, end in report.timeline:
        grid = ends[phase_of(label)]
        grid[y, x] = max(grid[y, x], end)
    return ends


def phase_grid(report: Report, width: int, height: int, title: str = "", axes=None, fontsize: float = 8):
    """One panel per phase (receive, compute, send and reduce): each PE drawn where it sits on the
    mesh, coloured and labelled by the cycle at which its last operation of that phase ends, on one
    colour scale; a PE with no operation of that phase is drawn light gray and marked "none". Returns
    the axes.

    Built in: 10_mesh
    """
    ends = phase_ends(report, width, height)
    if axes is None:
        _, axes = plt.subplots(1, len(ends), figsize=(4.2 * len(ends) + 1, 4.0), constrained_layout=True)
    top = max(1, max(int(e.max()) for e in ends.values()))
    for ax, (name, grid) in zip(axes, ends.items()):
        ax.imshow(np.where(grid < 0, 1.0, np.nan), vmin=0, vmax=1, cmap="Greys", alpha=0.15)
        image = ax.imshow(np.ma.masked_less(grid, 0), vmin=0, vmax=top, cmap="viridis")
        for (y, x), c in np.ndenumerate(grid):
            if c >= 0:
                ax.text(x, y, str(c), ha="center", va="center", fontsize=fontsize,
                        color="white" if c < 0.6 * top else "black")
            else:
                ax.text(x, y, "none", ha="center", va="center", fontsize=fontsize * 0.8, color="0.4")
        ax.set(title=f"{name} ends (cycle)", xlabel="x (PE column)", ylabel="y (PE row)")
    plt.colorbar(image, ax=list(axes), label="cycle")
    if title:
        axes[0].figure.suptitle(title)
    return axes


def kv_grid(rows: list[int], side: int, capacity: int, title: str = "", ax=None, fontsize: float = 8):
    """A ``side`` x ``side`` region's KV cache: each PE a box with room for ``capacity`` tokens, each
    slot one token's slice of K (solid, left) and of V (hatched, right), coloured by the token's age
    and labelled with its number in every PE. ``rows[t]`` is the row of PEs that token t is sent to
    (as :func:`wafer.inference.kv_rows` gives it); the tokens past a row's capacity have no room and
    are counted as refused, in red at its right. Returns the axes.

    Built in: 13_inference
    """
    from matplotlib.patches import Patch, Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    held: dict[int, list[int]] = {}
    for t, r in enumerate(rows):
        held.setdefault(r, []).append(t)
    color = plt.get_cmap("viridis")
    n = max(1, len(rows) - 1)
    pad, slot = 0.08, (1 - 2 * 0.08) / capacity
    for y in range(side):
        tokens = held.get(y, [])
        for x in range(side):
            ax.add_patch(Rectangle((x + 0.03, y + 0.03), 0.94, 0.94, fill=False, edgecolor="0.5",
                                   linewidth=0.8))
            for i, t in enumerate(tokens[:capacity]):
                top = y + pad + i * slot
                for half, hatch in ((0, None), (1, "////")):
                    ax.add_patch(Rectangle((x + pad + half * (0.5 - pad), top), 0.5 - pad, slot * 0.9,
                                           facecolor=color(t / n), hatch=hatch, edgecolor="white",
                                           linewidth=0.3))
                ax.text(x + 0.5, top + slot * 0.45, str(t), ha="center", va="center", fontsize=fontsize,
                        color="white" if t < 0.6 * n else "black",
                        bbox=dict(boxstyle="round,pad=0.1", facecolor=color(t / n), edgecolor="none"))
        if len(tokens) > capacity:
            extra = len(tokens) - capacity
            words = f"{extra} tokens\nrefused" if extra > 1 else "1 token\nrefused"
            ax.text(side + 0.1, y + 0.5, words, color="red", ha="left", va="center", fontsize=fontsize)
    ax.set_xticks(np.arange(side) + 0.5, range(side), fontsize=fontsize)
    ax.set_yticks(np.arange(side) + 0.5, range(side), fontsize=fontsize)
    ax.set(xlim=(-0.6, side + 1.6), ylim=(side, 0), aspect="equal",
           xlabel="x (PE column): each holds its share of every token's K and V", ylabel="y (PE row)",
           title=title)
    ax.legend(handles=[Patch(facecolor="0.55", label="a token's K slice"),
                       Patch(facecolor="0.55", hatch="////", edgecolor="white", label="its V slice")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=fontsize + 1)
    return ax
