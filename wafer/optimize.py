"""The placement optimizer: :func:`optimize` searches serpentine column layouts (several column counts,
rows balanced per column by :func:`column_rows`, widths and stages moved between columns), lets the
strategies of :data:`wafer.strategies.STRATEGIES` compete, and polishes the best column layout on the
full evaluation.

Built in: 11_placement
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

from wafer.placement import Evaluation, Placement, evaluate, internal_cycles
from wafer.stages import Stage, stage_flops
from wafer.strategies import (
    STRATEGIES,
    balanced_areas,
    column_layout,
    column_rects,
    default_columns,
    min_pes,
    strips,
)
from wafer.target import Target

StageTime = Callable[[int, int, int], float]  # (stage, width, height) -> cycles per token


def column_rows(time: StageTime, stages: list[int], need_pes, width: int, height: int) -> list[int] | None:
    """Rows for the ``stages`` of one column of ``width`` that minimise the slowest one's
    ``time(i, w, h)`` (non-increasing in h). Each starts with the rows its memory needs; every
    further row goes to the stage that is slowest at that moment, unless a row would not speed it up
    (its time is bound by its width), and then to the next slowest. None if the memory does not fit.

    Built in: 11_placement
    """
    rows = [max(1, -(-int(p) // width)) for p in need_pes]
    spare = height - sum(rows)
    if spare < 0:
        return None
    heap = [(-time(i, width, r), k) for k, (i, r) in enumerate(zip(stages, rows))]
    heapq.heapify(heap)
    while spare and heap:
        _, k = heapq.heappop(heap)
        now, more = time(stages[k], width, rows[k]), time(stages[k], width, rows[k] + 1)
        if more < now:
            rows[k] += 1
            spare -= 1
            heapq.heappush(heap, (-more, k))
    if spare:  # every stage is bound by its width: the rows left over go to the one with most FLOPs
        rows[int(np.argmax([time(i, width, 1) for i in stages]))] += spare
    return rows


def _refined(p: Placement, time: StageTime, need: np.ndarray) -> Placement | None:
    """Serpentine columns as in ``p``, improved by local search: each column's rows balanced by
    :func:`column_rows`, then moves accepted while they lower the slowest stage's ``time``:
    one PE of width from the fastest column to the slowest, or a stage across a column boundary."""
    cols: dict[int, list[int]] = {}
    for i, r in enumerate(p.rects):
        cols.setdefault(r.x, []).append(i)
    groups = [sorted(cols[x]) for x in sorted(cols)]
    widths = [p.rects[g[0]].w for g in groups]
    height = p.wafer.height

    def layout(groups, widths):
        worst, rows_all = [], []
        for g, w in zip(groups, widths):
            rows = column_rows(time, g, need[g], w, height) if w > 0 and g else None
            if rows is None:
                return None
            rows_all.append(rows)
            worst.append(max(time(i, w, h) for i, h in zip(g, rows)))
        return worst, rows_all

    def moves(groups, widths, worst):
        slow, fast = int(np.argmax(worst)), int(np.argmin(worst))
        if slow != fast:
            w = list(widths)
            w[slow] += 1
            w[fast] -= 1
            yield groups, w
        for k in range(len(groups) - 1):
            a, b = groups[k], groups[k + 1]
            if len(a) > 1:
                yield groups[:k] + [a[:-1], [a[-1]] + b] + groups[k + 2:], widths
            if len(b) > 1:
                yield groups[:k] + [a + [b[0]], b[1:]] + groups[k + 2:], widths

    state = layout(groups, widths)
    if state is None:
        return None
    worst, rows_all = state
    for _ in range(4 * p.wafer.width):
        for g2, w2 in moves(groups, widths, worst):
            trial = layout(g2, w2)
            if trial is not None and max(trial[0]) < max(worst):
                groups, widths, (worst, rows_all) = g2, w2, trial
                break
        else:
            break
    return Placement(p.target, p.stages, column_rects(groups, widths, rows_all, serpentine=True), "optimized")


def _score(e: Evaluation) -> tuple:
    """What the polish minimises: the slowest stage, then how many stages are that slow, then the
    sum of the stage times (so that moves on a plateau of equal slowest times still count)."""
    top = float(e.stage.max())
    return (top, int((e.stage >= top - 1e-9).sum()), float(e.stage.sum()))


def _polish(p: Placement, passes: int = 40) -> Placement:
    """Local search on the full evaluation (lanes, ramps, contention, SRAM, colors included): move
    1, 4, 16 or 64 columns of width between neighbouring columns, or rows between neighbouring
    stages of a column, while :func:`_score` improves and the placement stays feasible."""
    layout = column_layout(p)
    if layout is None:
        return p
    groups, widths, rows, serpentine = layout

    def build(widths, rows):
        if min(widths) < 1 or min(min(r) for r in rows) < 1:
            return None
        q = Placement(p.target, p.stages, column_rects(groups, widths, rows, serpentine), "optimized")
        e = evaluate(q)
        return (q, e) if e.feasible else None

    start = build(widths, rows)
    if start is None:
        return p
    best, score = start[0], _score(start[1])
    for _ in range(passes):
        improved = False
        for d in (64, 16, 4, 1, -1, -4, -16, -64):
            trials = []
            for k in range(len(widths) - 1):
                w2 = list(widths)
                w2[k] += d
                w2[k + 1] -= d
                trials.append((w2, rows))
            for k, r in enumerate(rows):
                for j in range(len(r) - 1):
                    r2 = [list(x) for x in rows]
                    r2[k][j] += d
                    r2[k][j + 1] -= d
                    trials.append((widths, r2))
            for w2, r2 in trials:
                trial = build(w2, r2)
                if trial is not None and _score(trial[1]) < score:
                    best, score, widths, rows, improved = trial[0], _score(trial[1]), w2, r2, True
        if not improved:
            break
    return best


def _candidates(stages: list[Stage], target: Target) -> list[Placement]:
    """Serpentine strips with FLOP-balanced areas for several column counts, each also refined by
    :func:`_refined`, and every strategy of :data:`~wafer.strategies.STRATEGIES`: those that can be
    built (a strategy that cannot share out the grid's rows or columns raises ValueError)."""
    areas = balanced_areas(stages, target)  # raises DoesNotFit if the model cannot fit
    need = min_pes(stages, target)
    flops = np.array([stage_flops(s, target.mode) for s in stages])
    rate = 2.0 * target.wafer.fmacs_per_cycle(target.dtype)

    def time(i: int, w: int, h: int) -> float:  # a stage's compute and internal cycles per token
        return max(flops[i] / (rate * w * h), internal_cycles(stages[i], w, h, target.dtype))

    n = len(stages)
    base = default_columns(n, target.wafer)
    out = []
    for c in sorted({max(1, min(n, base + d)) for d in (-2, -1, 0, 1, 2)}):
        try:
            start = strips(stages, target, columns=c, serpentine=True, areas=areas, min_pes=need,
                           name="optimized")
        except ValueError:  # too many stages for the rows of a column at this column count
            continue
        refined = _refined(start, time, need)
        out += [p for p in (start, refined) if p is not None]
    for make in STRATEGIES.values():
        try:
            out.append(make(stages, target))
        except ValueError:
            continue
    return out


def optimize(stages: list[Stage], target: Target) -> Placement:
    """The placement with the highest throughput this search finds, among feasible ones: serpentine
    columns (several column counts), areas balanced by FLOPs within the memory each stage needs,
    rows re-balanced per column and column widths moved toward the slowest; the simple strategies
    compete too. Raises :class:`~wafer.stages.DoesNotFit` if the model cannot fit, and ValueError if
    no placement found fits.

    Built in: 11_placement
    """
    scored = [(evaluate(p), p) for p in _candidates(stages, target)]
    feasible = [(e.tokens_per_s, i) for i, (e, _) in enumerate(scored) if e.feasible]
    if not feasible:
        raise ValueError(f"no placement found that fits the {target.wafer.name} grid in {target.mode}: "
                         + scored[0][0].problems[0].message)
    ranked = [scored[i][1] for _, i in sorted(feasible, reverse=True)]
    best = ranked[0]
    columns = next((p for p in ranked if column_layout(p) is not None), None)
    if columns is not None:  # the best column layout, polished on the full evaluation
        polished = _polish(columns)
        if evaluate(polished).tokens_per_s > evaluate(best).tokens_per_s:
            best = polished
    return Placement(target, best.stages, best.rects, "optimized")
