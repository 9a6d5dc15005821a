"""Pictures of simulator runs: ``link_heatmap`` (wavelets per link, one panel per direction) and
``timeline`` (a bar per operation per PE).

Built in: 09_mesh
"""

from __future__ import annotations

import matplotlib.pyplot as plt

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

