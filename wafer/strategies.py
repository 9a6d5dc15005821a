"""Placement strategies: each one a function ``(stages, target, **options) -> Placement`` whose options
are keyword-only, registered by name in :data:`STRATEGIES` (a new strategy goes here, with that
signature, and into the registry).

This module holds the four strategies (:func:`row_strips`, :func:`serpentine_strips`,
:func:`flop_proportional`, :func:`bisection`), the general :func:`strips` they build on, the areas
they share out (:func:`min_pes`, :func:`balanced_areas`), and the layouts in columns of stacked
stages (:func:`column_rects` builds one, :func:`column_layout` reads one back), which the optimizer
and the explorer also use.

Built in: 11_placement
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from wafer.hardware import Wafer
from wafer.placement import Placement, Rect
from wafer.stages import Stage, check_model_fits, stage_bytes, stage_flops
from wafer.target import Target


class Strategy(Protocol):
    """What every strategy is: stages and a target in, a placement out (options keyword-only)."""

    def __call__(self, stages: list[Stage], target: Target) -> Placement: ...


def _shares(weights, total: int, minimum=1) -> list[int]:
    """Integers summing to ``total``, each at least its ``minimum`` (a number or one per weight), the
    rest shared in proportion to ``weights`` minus what the minimum already gives (largest remainder)."""
    n = len(weights)
    minimum = np.broadcast_to(np.maximum(np.asarray(minimum, dtype=int), 1), (n,))
    if total < minimum.sum():
        raise ValueError(f"{total} rows or columns cannot give {n} stages the {int(minimum.sum())} they need")
    weights = np.asarray(weights, dtype=float)
    target = weights / weights.sum() * total if weights.sum() > 0 else np.full(n, total / n)
    out = np.maximum(minimum, np.floor(target)).astype(int)
    while out.sum() > total:  # the minimums pushed us over: take from the largest above their minimum
        slack = np.where(out > minimum, out - target, -np.inf)
        out[int(slack.argmax())] -= 1
    for i in np.argsort(-(target - out))[: total - out.sum()]:
        out[i] += 1
    return [int(v) for v in out]


def _groups(weights, columns: int) -> list[list[int]]:
    """Split stage indices into ``columns`` contiguous, non-empty groups with near-equal weight sums."""
    n = len(weights)
    columns = max(1, min(columns, n))
    cum = np.cumsum(weights, dtype=float)
    total = cum[-1] if cum[-1] > 0 else n
    if cum[-1] <= 0:
        cum = np.arange(1, n + 1, dtype=float)
    cuts = [0]
    for k in range(1, columns):
        target = total * k / columns
        cut = int(np.searchsorted(cum, target)) + 1
        cut = min(max(cut, cuts[-1] + 1), n - (columns - k))
        cuts.append(cut)
    cuts.append(n)
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def column_rects(groups: list[list[int]], widths: list[int], rows: list[list[int]],
                 serpentine: bool) -> list[Rect]:
    """Rectangles for stage groups laid out as side-by-side columns of the given widths, each column
    stacking its stages' rows top to bottom (bottom to top in every other column if ``serpentine``).

    Built in: 11_placement
    """
    rects: dict[int, Rect] = {}
    x = 0
    for k, (group, width, heights) in enumerate(zip(groups, widths, rows)):
        order = list(zip(group, heights))
        y = 0
        for i, h in (reversed(order) if serpentine and k % 2 else order):
            rects[i] = Rect(x, y, width, h)
            y += h
        x += width
    return [rects[i] for i in range(len(rects))]


def column_layout(p: Placement) -> tuple[list[list[int]], list[int], list[list[int]], bool] | None:
    """The columns of a column layout, as :func:`column_rects` takes them: (stage groups, widths, rows
    per stage, serpentine); or None if ``p`` is not one (side-by-side columns as tall as the grid,
    each stacking consecutive stages top to bottom, or in every other column bottom to top if
    serpentine).

    Built in: 11_placement
    """
    cols: dict[int, list[int]] = {}
    for i, r in enumerate(p.rects):
        cols.setdefault(r.x, []).append(i)
    top_down = [sorted(cols[x], key=lambda i: p.rects[i].y) for x in sorted(cols)]
    for serpentine in (True, False):
        groups = [g[::-1] if serpentine and k % 2 else g for k, g in enumerate(top_down)]
        if [i for g in groups for i in g] != list(range(len(p.rects))):
            continue
        if all(len({p.rects[i].w for i in g}) == 1 and sum(p.rects[i].h for i in g) == p.wafer.height
               for g in groups):
            return groups, [p.rects[g[0]].w for g in groups], [[p.rects[i].h for i in g] for g in groups], \
                serpentine
    return None


def default_columns(n: int, wafer: Wafer) -> int:
    """Columns of strips that make each of ``n`` equal strips about square."""
    return int(min(n, max(1, round(math.sqrt(n * wafer.width / wafer.height)))))


def strips(stages: list[Stage], target: Target, *, columns: int | None = None, serpentine: bool = False,
           areas=None, min_pes=None, name: str = "") -> Placement:
    """Stages in layer order as horizontal strips, in ``columns`` side-by-side columns (by default
    about square strips; top to bottom in each, bottom to top in every other column if
    ``serpentine``, so that consecutive layers always touch). Areas proportional to ``areas`` (equal
    by default), and each stage at least ``min_pes`` PEs (one per stage, or none); ``name`` labels
    the placement.

    Built in: 11_placement
    """
    wafer, n = target.wafer, len(stages)
    columns = default_columns(n, wafer) if columns is None else columns
    weights = np.ones(n) if areas is None else np.asarray(areas, dtype=float)
    need = np.zeros(n, dtype=int) if min_pes is None else np.asarray(min_pes, dtype=int)
    groups = _groups(weights, columns)
    widths = _shares([weights[g].sum() for g in groups], wafer.width)
    # each stage gets at least the rows its memory needs at its column's width
    rows = [_shares(weights[g], wafer.height, -(-need[g] // w)) for g, w in zip(groups, widths)]
    rects = column_rects(groups, widths, rows, serpentine)
    return Placement(target, stages, rects, name or ("serpentine" if serpentine else "row strips"))


def row_strips(stages: list[Stage], target: Target, *, columns: int | None = None) -> Placement:
    """Equal strips in layer order, top to bottom in each of ``columns`` columns.

    Built in: 11_placement
    """
    return strips(stages, target, columns=columns)


def serpentine_strips(stages: list[Stage], target: Target, *, columns: int | None = None) -> Placement:
    """Equal strips in layer order, every other column bottom to top, so that consecutive layers
    always share an edge.

    Built in: 11_placement
    """
    return strips(stages, target, columns=columns, serpentine=True)


def min_pes(stages: list[Stage], target: Target) -> np.ndarray:
    """The fewest PEs each stage's SRAM needs on ``target``.

    Built in: 11_placement
    """
    per_pe = target.wafer.sram_bytes_per_pe
    return np.array([math.ceil(stage_bytes(s, target) / per_pe) for s in stages])


def balanced_areas(stages: list[Stage], target: Target) -> np.ndarray:
    """PEs per stage proportional to its FLOPs, but never fewer than its memory needs: the areas
    that fill the grid with max(memory minimum, lambda x FLOPs), lambda found by bisection. Raises
    :class:`~wafer.stages.DoesNotFit` if the model cannot fit.

    Built in: 11_placement
    """
    check_model_fits(stages, target)
    pes = target.wafer.pes
    need = min_pes(stages, target)
    flops = np.array([stage_flops(s, target.mode) for s in stages])
    lo, hi = 0.0, pes / max(flops.sum(), 1e-30)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(need, mid * flops).sum() <= pes else (lo, mid)
    return np.maximum(need, lo * flops)


def flop_proportional(stages: list[Stage], target: Target, *, columns: int | None = None) -> Placement:
    """Serpentine strips whose areas follow each stage's FLOPs (and cover its memory).

    Built in: 11_placement
    """
    return strips(stages, target, columns=columns, serpentine=True, areas=balanced_areas(stages, target),
                  min_pes=min_pes(stages, target), name="FLOP-proportional")


def bisection(stages: list[Stage], target: Target) -> Placement:
    """Recursive bisection: split the layers where their areas balance, split the rectangle across
    its longer side in the same proportion, and recurse; neighbouring layers stay near each other.

    Built in: 11_placement
    """
    areas = balanced_areas(stages, target)
    need = min_pes(stages, target)
    rects: dict[int, Rect] = {}

    def split(idx: list[int], r: Rect) -> None:
        if len(idx) == 1:
            rects[idx[0]] = r
            return
        cum = np.cumsum(areas[idx])
        k = int(np.clip(np.searchsorted(cum, cum[-1] / 2) + 1, 1, len(idx) - 1))
        left, right = idx[:k], idx[k:]
        frac = cum[k - 1] / cum[-1]
        side, across = (r.w, r.h) if r.w >= r.h else (r.h, r.w)
        lo = max(1, -(-int(need[left].sum()) // across))  # enough lines for the left half's memory
        hi = min(side - 1, side - -(-int(need[right].sum()) // across))
        a = int(np.clip(round(side * frac), lo, max(lo, hi)))
        if r.w >= r.h:
            split(left, Rect(r.x, r.y, a, r.h))
            split(right, Rect(r.x + a, r.y, r.w - a, r.h))
        else:
            split(left, Rect(r.x, r.y, r.w, a))
            split(right, Rect(r.x, r.y + a, r.w, r.h - a))

    split(list(range(len(stages))), Rect(0, 0, target.wafer.width, target.wafer.height))
    return Placement(target, stages, [rects[i] for i in range(len(stages))], "recursive bisection")


STRATEGIES: dict[str, Strategy] = {
    "row strips": row_strips,
    "serpentine": serpentine_strips,
    "FLOP-proportional": flop_proportional,
    "recursive bisection": bisection,
}
