"""A GPT's layers on rectangles of PEs, executed layer-pipelined, and what such a placement achieves.

This module holds the data model and the evaluation: :class:`Rect`, :class:`Placement` (stages, their
rectangles and the :class:`~wafer.target.Target` they run on), :func:`evaluate` and its
:class:`Evaluation` (with each infeasibility as a :class:`Problem`), :func:`against_traffic`, and the
geometry that both the evaluation and the simulator (:mod:`wafer.placement_sim`) use, as public
functions tested against hand counts: :func:`transfer_band`, :func:`lane_ends`, :func:`lanes`,
:func:`gemv_shares`, :func:`internal_cycles` and :func:`ramp_cycles`. The stages themselves and their
SRAM are in :mod:`wafer.stages`; the strategies that make placements in :mod:`wafer.strategies`; the
optimizer in :mod:`wafer.optimize`.

In layer-pipelined execution every layer keeps its weights in the SRAM of its own rectangle of PEs,
and tokens stream through the layers: while layer i works on token t, layer i + 1 works on token
t - 1. The pipeline's throughput is set by its slowest stage. A stage is slow for one of three
reasons: too few PEs for its FLOPs, too few links to the next stage for its activations, or links
shared with other stages' traffic.

The evaluation's model, its assumptions stated once:

- A stage's compute takes FLOPs / (2 x FMACs per cycle x PEs) cycles per token: the stage's PEs
  share its work evenly and run at peak.
- A stage's matrix products run as chapter 10's GEMV on its w x h rectangle: the top PE of each
  column sends the column's share of every product's input down the column, and each row reduces
  its share of the outputs in a chain toward its first column. With tokens pipelined, what limits
  throughput is bandwidth, not latency, and the tightest link is a PE's **ramp**: a PE inside the
  rectangle takes in ceil(input wavelets / w) + ceil(output wavelets / h) per token, one per cycle
  ("internal"). The PEs where lanes start or end pass the lanes' wavelets through their ramps too.
  Attention's products with the KV cache are local.
- A stage sends its output activations (n_embd values per token) to the next stage over parallel
  lanes, one per link where the two rectangles face each other: ceil(wavelets / lanes) cycles per
  token. Rectangles that do not touch route their lanes across the PEs in between (in L shapes if
  they share no row or column), and transfers whose lanes cross the same links in the same
  orientation share them (contention). What the model leaves out: lanes that run through another
  stage against its own traffic (south down its columns, or west along its rows; see
  :func:`against_traffic`). Strips never route lanes that way; recursive bisection sometimes does.
- Stages overlap perfectly: a stage's time per token is the max of its compute, its internal
  traffic and its transfers in and out.
- Training runs forward and backward through the same stages: 3x the forward FLOPs, and gradients
  flow back on the opposite links (which are separate: links are directed).
- SRAM per PE is :func:`wafer.stages.stage_bytes` over the rectangle's PEs: inference holds 16-bit
  weights and the KV cache of one sequence; training holds 16 bytes per parameter (16-bit weights and
  gradients, 32-bit master weights and two Adam moments) and one sequence's activations for the
  backward pass.

Built in: 11_placement
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from wafer.collectives import straight
from wafer.cost import reduce_colors, wavelets
from wafer.hardware import Wafer
from wafer.stages import Stage, stage_bytes, stage_flops
from wafer.target import Target


@dataclass(frozen=True)
class Rect:
    """A rectangle of PEs: columns x .. x + w - 1, rows y .. y + h - 1.

    Built in: 11_placement
    """

    x: int
    y: int
    w: int
    h: int

    def __post_init__(self):
        for name in ("x", "y", "w", "h"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"rectangle {name}={value!r} must be an integer")
        if self.x < 0 or self.y < 0:
            raise ValueError(f"rectangle at ({self.x}, {self.y}) has a negative corner")
        if self.w < 1 or self.h < 1:
            raise ValueError(f"rectangle {self.w} x {self.h} at ({self.x}, {self.y}) is empty: width and "
                             f"height must be at least 1")

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    def overlaps(self, other: Rect) -> bool:
        return self.x < other.x1 and other.x < self.x1 and self.y < other.y1 and other.y < self.y1

    def inside(self, width: int, height: int) -> bool:
        return self.x1 <= width and self.y1 <= height


@dataclass
class Placement:
    """Stages and their rectangles on ``target``'s wafer (for its mode, context and number format);
    ``strategy`` names what made it.

    Built in: 11_placement
    """

    target: Target
    stages: list[Stage]
    rects: list[Rect]
    strategy: str = ""

    def __post_init__(self):
        if not isinstance(self.target, Target):
            raise ValueError(f"target={self.target!r} must be a wafer.target.Target, for example "
                             f"Target(WSE2, context=2048)")
        if len(self.rects) != len(self.stages):
            raise ValueError(f"{len(self.rects)} rectangles for {len(self.stages)} stages: one each")
        w = self.wafer
        for s, r in zip(self.stages, self.rects):
            if not r.inside(w.width, w.height):
                raise ValueError(f"stage {s.name}'s rectangle {r} leaves the {w.width} x {w.height} grid")
        order = sorted(range(len(self.rects)), key=lambda i: (self.rects[i].x, self.rects[i].y))
        for a_i, a in enumerate(order):  # a sweep: only rectangles that start before a ends can overlap
            ra = self.rects[a]
            for b in order[a_i + 1:]:
                rb = self.rects[b]
                if rb.x >= ra.x1:
                    break
                if ra.overlaps(rb):
                    raise ValueError(f"stages {self.stages[a].name} and {self.stages[b].name} overlap: {ra} "
                                     f"and {rb}")

    @property
    def wafer(self) -> Wafer:
        """The target's wafer."""
        return self.target.wafer


ProblemKind = Literal["memory", "colors"]
Limit = Literal["compute", "internal", "transfer", "memory", "colors"]


@dataclass(frozen=True)
class Problem:
    """Why a placement is infeasible: ``kind`` is ``"memory"`` (a stage needs more SRAM per PE than a
    PE has) or ``"colors"`` (a PE of the stage routes more colors than it has); ``message`` says so
    with the numbers.

    Built in: 11_placement
    """

    kind: ProblemKind
    stage: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Evaluation:
    """What a placement achieves. Times are cycles per token.

    Built in: 11_placement
    """

    compute: np.ndarray
    internal: np.ndarray  # the stage's own broadcasts and reductions
    transfer: np.ndarray  # out of each stage (0 for the last)
    stage: np.ndarray  # max of compute, internal, transfer in, transfer out
    hops: np.ndarray  # out of each stage
    sram_per_pe: np.ndarray  # bytes
    colors: np.ndarray  # the most colors any PE of the stage routes
    tokens_per_s: float
    latency_s: float  # one token through every stage, alone in the pipeline
    utilisation: float  # achieved FLOP/s over the peak of the whole grid
    compute_bound_tokens_per_s: float  # every PE busy: total FLOPs / peak
    bottleneck: int
    limit: Limit  # "compute", "internal", "transfer"; or "memory" or "colors" when infeasible
    feasible: bool
    problems: list[Problem] = field(default_factory=list)


# --- the geometry of lanes and GEMVs (shared with the simulator; each tested against hand counts) ------


class Band(NamedTuple):
    """How a transfer crosses the mesh (see :func:`transfer_band`)."""

    lanes: int
    hops: int
    orientation: int  # 0: vertical links, 1: horizontal
    links: tuple[int, int, int, int]  # (x0, x1, y0, y1), a link indexed by the PE it enters
    pes: tuple[int, int, int, int]  # the PEs that route its lanes, endpoints included


def transfer_band(a: Rect, b: Rect) -> Band:
    """How a transfer from ``a`` to ``b`` crosses the mesh: its lanes, hops, orientation (0 uses
    vertical links, 1 horizontal), the box of links it crosses (x0, x1, y0, y1; a link indexed by the
    PE it enters, from the north or from the west) and the box of PEs that route its lanes, endpoints
    included.

    Built in: 11_placement
    """
    ox = min(a.x1, b.x1) - max(a.x, b.x)
    oy = min(a.y1, b.y1) - max(a.y, b.y)
    if ox > 0:  # one above the other: lanes run down (or up) the shared columns
        top, bottom = (a, b) if a.y < b.y else (b, a)
        x0, x1 = max(a.x, b.x), min(a.x1, b.x1)
        return Band(ox, bottom.y - top.y1 + 1, 0, (x0, x1, top.y1, bottom.y + 1),
                    (x0, x1, top.y1 - 1, bottom.y + 1))
    if oy > 0:  # side by side: lanes run along the shared rows
        left, right = (a, b) if a.x < b.x else (b, a)
        y0, y1 = max(a.y, b.y), min(a.y1, b.y1)
        return Band(oy, right.x - left.x1 + 1, 1, (left.x1, right.x + 1, y0, y1),
                    (left.x1 - 1, right.x + 1, y0, y1))
    # diagonal: lanes as wide as the narrower side, counted over the bounding box (an approximation)
    lanes = max(1, min(a.w, a.h, b.w, b.h))
    dx = max(b.x - a.x1, a.x - b.x1, 0) + 1
    dy = max(b.y - a.y1, a.y - b.y1, 0) + 1
    box = (min(a.x, b.x), max(a.x1, b.x1), min(a.y, b.y), max(a.y1, b.y1))
    return Band(lanes, dx + dy, 0, box, box)


def gemv_shares(stage: Stage, r: Rect, dtype: str) -> tuple[int, int]:
    """Wavelets per token of the stage's GEMVs on ``r``: each column's share of the inputs, sent down
    the column from its top PE (none on a one-row rectangle), and each row's share of the outputs,
    reduced along the row toward its first column (none on a one-column rectangle).

    Built in: 11_placement
    """
    down = -(-wavelets(stage.matmul_in, dtype) // r.w) if r.h > 1 else 0
    along = -(-wavelets(stage.matmul_out, dtype) // r.h) if r.w > 1 else 0
    return down, along


def internal_cycles(stage: Stage, w: int, h: int, dtype: str) -> int:
    """Cycles per token the stage's GEMVs keep a PE's ramp busy on a ``w`` x ``h`` rectangle: a PE
    inside it takes in its column's share of the inputs and its row's share of the partial sums, one
    wavelet per cycle. (Training's backward streams the same amounts the opposite way: the other
    direction of each link and ramp.)

    Built in: 11_placement
    """
    return sum(gemv_shares(stage, Rect(0, 0, w, h), dtype))


def lane_ends(a: Rect, b: Rect) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns and rows (xa, ya, xb, yb) of the PEs that send (in ``a``) and receive (in ``b``) the
    lanes of a transfer: across the shared columns or rows; between rectangles that share neither,
    nested L shapes that leave ``a`` across its side facing ``b`` and enter ``b`` across its side
    facing ``a``, the lane nearest ``b`` turning first (so that no two cross).

    Built in: 11_placement
    """
    if min(a.x1, b.x1) > max(a.x, b.x):  # shared columns
        xs = np.arange(max(a.x, b.x), min(a.x1, b.x1))
        ya, yb = (a.y1 - 1, b.y) if a.y < b.y else (a.y, b.y1 - 1)
        return xs, np.full(xs.size, ya), xs, np.full(xs.size, yb)
    if min(a.y1, b.y1) > max(a.y, b.y):  # shared rows
        ys = np.arange(max(a.y, b.y), min(a.y1, b.y1))
        xa, xb = (a.x1 - 1, b.x) if a.x < b.x else (a.x, b.x1 - 1)
        return np.full(ys.size, xa), ys, np.full(ys.size, xb), ys
    j = np.arange(transfer_band(a, b).lanes)
    right, down = b.x > a.x, b.y > a.y
    xs = a.x1 - 1 - j if right else a.x + j
    ys = b.y + j if down else b.y1 - 1 - j
    return xs, np.full(j.size, a.y1 - 1 if down else a.y), np.full(j.size, b.x if right else b.x1 - 1), ys


def lanes(a: Rect, b: Rect) -> list[list[tuple[int, int]]]:
    """The PEs of each lane of a transfer from ``a`` to ``b``, sender first (see :func:`lane_ends`):
    straight, or down (up) the sender's column and then along the receiver's row.

    Built in: 11_placement
    """
    out = []
    for xa, ya, xb, yb in zip(*(v.tolist() for v in lane_ends(a, b))):
        turn = (xa, yb)  # down (or up) the sender's column, then along the receiver's row
        down = straight((xa, ya), turn) if ya != yb else [turn]
        out.append(down + (straight(turn, (xb, yb))[1:] if xb != xa else []))
    return out


def ramp_cycles(stage: Stage, r: Rect, dtype: str, into=None, out_of=None) -> int:
    """The most wavelets per token any PE of the stage passes through its ramp, in or out: its
    GEMVs' (see :func:`gemv_shares`; a column's top PE sends its inputs rather than receiving
    them, the end of a row's chain sends its partial sums without receiving any, its first PE only
    receives) and, on the PEs at the ends of lanes, the lanes'. ``into`` and ``out_of`` are
    (columns, rows, wavelets per lane) of the lanes that end and start in the stage.

    Built in: 11_placement
    """
    down, along = gemv_shares(stage, r, dtype)
    most = down + along  # a PE inside the rectangle
    if into is not None:
        xs, ys, per_lane = into
        most = max(most, int((down * (ys != r.y) + along * (xs != r.x1 - 1)).max()) + per_lane)
    if out_of is not None:
        xs, ys, per_lane = out_of
        most = max(most, int((down * (ys == r.y) + along * (xs != r.x)).max()) + per_lane)
    return most


# --- the evaluation -----------------------------------------------------------------------------------


def _transfers(p: Placement):
    """Each stage's transfer out (cycles per token, contention included) and its hops, the lane ends
    into and out of each stage (for :func:`ramp_cycles`), and how many transfers route lanes through
    each PE (for the colors)."""
    w, n, dtype = p.wafer, len(p.stages), p.target.dtype
    # rasterised: how many transfers cross each link (per orientation), and route lanes through each PE
    links = np.zeros((2, w.height + 1, w.width + 1), dtype=np.int32)
    routed = np.zeros((w.height, w.width), dtype=np.int32)
    bands = [transfer_band(p.rects[i], p.rects[i + 1]) for i in range(n - 1)]
    for band in bands:
        x0, x1, y0, y1 = band.links
        px0, px1, py0, py1 = band.pes
        links[band.orientation, y0:y1, x0:x1] += 1
        routed[max(py0, 0):py1, max(px0, 0):px1] += 1
    transfer, hops = np.zeros(n), np.zeros(n)
    into: list = [None] * n
    out_of: list = [None] * n
    for i, band in enumerate(bands):
        x0, x1, y0, y1 = band.links
        share = int(links[band.orientation, y0:y1, x0:x1].max())  # transfers sharing its busiest link
        per_lane = math.ceil(wavelets(p.stages[i].out_elems, dtype) / band.lanes)
        transfer[i] = per_lane * share
        hops[i] = band.hops
        xa, ya, xb, yb = lane_ends(p.rects[i], p.rects[i + 1])
        out_of[i], into[i + 1] = (xa, ya, per_lane), (xb, yb, per_lane)
    return transfer, hops, into, out_of, routed


def _problems(p: Placement, sram: np.ndarray, colors: np.ndarray) -> list[Problem]:
    w = p.wafer
    out = []
    for s, r, b, c in zip(p.stages, p.rects, sram, colors):
        if b > w.sram_bytes_per_pe:
            out.append(Problem("memory", s.name, f"stage {s.name} needs {b:,.0f} bytes per PE on its "
                               f"{r.w} x {r.h} rectangle, over the {w.sram_bytes_per_pe:,} of a PE"))
        if c > w.colors:
            out.append(Problem("colors", s.name, f"stage {s.name} routes {c} colors at one PE, over the "
                               f"{w.colors} a PE has"))
    return out


def evaluate(p: Placement) -> Evaluation:
    """Stage times, throughput, latency, utilisation, SRAM and colors of a placement (see the
    module's assumptions).

    Built in: 11_placement
    """
    w, t = p.wafer, p.target
    area = np.array([r.area for r in p.rects], dtype=float)
    flops = np.array([stage_flops(s, t.mode) for s in p.stages])
    rate = 2.0 * w.fmacs_per_cycle(t.dtype)  # FLOPs per PE per cycle
    compute = flops / (rate * area)
    transfer, hops, into, out_of, routed = _transfers(p)
    internal = np.array([ramp_cycles(s, r, t.dtype, into[i], out_of[i])
                         for i, (s, r) in enumerate(zip(p.stages, p.rects))], dtype=float)
    directions = 2 if t.mode == "training" else 1  # gradients come back on routes of their own
    colors = np.array([1 + reduce_colors(r.w, 1) + directions * int(routed[r.y:r.y1, r.x:r.x1].max())
                       for r in p.rects], dtype=int)  # a stage's own GEMV: a broadcast color, a chain's two
    transfer_in = np.concatenate([[0.0], transfer[:-1]])
    stage = np.maximum.reduce([compute, internal, transfer, transfer_in])
    sram = np.array([stage_bytes(s, t) for s in p.stages]) / area
    problems = _problems(p, sram, colors)
    bottleneck = int(stage.argmax())
    limit: Limit
    if problems:
        limit = "memory" if any(q.kind == "memory" for q in problems) else "colors"
    else:
        limit = ("compute" if compute[bottleneck] >= stage[bottleneck] else
                 "internal" if internal[bottleneck] >= stage[bottleneck] else "transfer")
    total_flops = float(flops.sum())
    # alone, a token also waits for each product's first wavelet to cross the rectangle: down the
    # columns (hops) and along the chain of each row (a hop and an add per PE)
    gemv_latency = sum(s.products * (r.h * w.hop_cycles + r.w * (w.hop_cycles + w.stage_cycles))
                       for s, r in zip(p.stages, p.rects))
    tokens_per_s = w.clock_hz / float(stage.max())
    return Evaluation(
        compute=compute, internal=internal, transfer=transfer, stage=stage, hops=hops, sram_per_pe=sram,
        colors=colors,
        tokens_per_s=tokens_per_s,
        latency_s=(float(stage.sum() + hops.sum() * w.hop_cycles) + gemv_latency) / w.clock_hz,
        utilisation=total_flops * tokens_per_s / (w.pes * rate * w.clock_hz),
        compute_bound_tokens_per_s=w.pes * rate * w.clock_hz / total_flops,
        bottleneck=bottleneck, limit=limit, feasible=not problems, problems=problems)


def against_traffic(p: Placement) -> list[tuple[str, str]]:
    """The (transfer, stage) pairs the evaluation does not model: lanes of a transfer that pass
    through another stage's PEs heading south or west, the directions of that stage's own
    broadcasts and reductions. Empty for placements in columns of strips (tested); recursive
    bisection makes some.

    Built in: 11_placement
    """
    owner = np.full((p.wafer.height, p.wafer.width), -1)
    for i, r in enumerate(p.rects):
        owner[r.y:r.y1, r.x:r.x1] = i
    out = []
    for i in range(len(p.stages) - 1):
        hit = set()
        for lane in lanes(p.rects[i], p.rects[i + 1]):
            for (x0, y0), (x1, y1) in zip(lane, lane[1:]):
                j = owner[y1, x1]
                if j not in (-1, i, i + 1) and (y1 > y0 or x1 < x0):
                    hit.add(int(j))
        out += [(f"{p.stages[i].name} -> {p.stages[i + 1].name}", p.stages[j].name) for j in sorted(hit)]
    return out
