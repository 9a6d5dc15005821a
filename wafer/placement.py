"""Core placement: a GPT's layers on rectangles of PEs, executed layer-pipelined.

In layer-pipelined execution every layer keeps its weights in the SRAM of its own rectangle of PEs,
and tokens stream through the layers: while layer i works on token t, layer i + 1 works on token
t - 1. The pipeline's throughput is set by its slowest stage. A stage is slow for one of three
reasons: too few PEs for its FLOPs, too few links to the next stage for its activations, or links
shared with other stages' traffic.

The model, its assumptions stated once:

- A stage's compute takes FLOPs / (2 x FMACs per cycle x PEs) cycles per token: the stage's PEs
  share its work evenly and run at peak.
- A stage's matrix products run as chapter 09's GEMV on its w x h rectangle: the top PE of each
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
- SRAM per PE: inference holds 16-bit weights and the KV cache of one sequence; training holds 16
  bytes per parameter (16-bit weights and gradients, 32-bit master weights and two Adam moments) and
  one sequence's activations for the backward pass.

Built in: 10_placement
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from wafer.collectives import broadcast_plan, reduce_plan, route_path, straight
from wafer.cost import reduce_colors, wavelets
from wafer.hardware import Wafer
from wafer.mesh import Compute, Mesh, Recv, Send
from wafer.stages import (  # noqa: F401  (re-exported while the package is split)
    TRAINING_BYTES_PER_PARAM,
    Stage,
    check_model_fits,
    pipeline_stages,
    stage_bytes,
    stage_flops,
)
from wafer.target import MODES, Target


@dataclass(frozen=True)
class Rect:
    """A rectangle of PEs: columns x .. x + w - 1, rows y .. y + h - 1.

    Built in: 10_placement
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
    """Stages and their rectangles on a wafer, for a mode, context and number format.

    Built in: 10_placement
    """

    wafer: Wafer
    stages: list[Stage]
    rects: list[Rect]
    mode: str = "inference"
    context: int = 1024
    dtype: str = "fp16"
    strategy: str = ""

    def __post_init__(self):
        if len(self.rects) != len(self.stages):
            raise ValueError(f"{len(self.rects)} rectangles for {len(self.stages)} stages: one each")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        for s, r in zip(self.stages, self.rects):
            if not r.inside(self.wafer.width, self.wafer.height):
                raise ValueError(f"stage {s.name}'s rectangle {r} leaves the {self.wafer.width} x "
                                 f"{self.wafer.height} grid")
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
    def target(self) -> Target:
        return Target(self.wafer, self.mode, self.context, self.dtype)  # type: ignore[arg-type]


@dataclass
class Evaluation:
    """What a placement achieves. Times are cycles per token.

    Built in: 10_placement
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
    limit: str  # "compute", "internal", "transfer"; or "memory" or "colors" when infeasible
    feasible: bool
    problems: list[str] = field(default_factory=list)


def _transfer_band(a: Rect, b: Rect):
    """How a transfer from ``a`` to ``b`` crosses the mesh: (lanes, hops, orientation, links, pes).
    Orientation 0 uses vertical links, 1 horizontal. ``links`` (x0, x1, y0, y1) is the box of links
    it crosses, a link indexed by the PE it enters (from the north, or from the west); ``pes`` is
    the box of PEs that route its lanes, endpoints included."""
    ox = min(a.x1, b.x1) - max(a.x, b.x)
    oy = min(a.y1, b.y1) - max(a.y, b.y)
    if ox > 0:  # one above the other: lanes run down (or up) the shared columns
        top, bottom = (a, b) if a.y < b.y else (b, a)
        x0, x1 = max(a.x, b.x), min(a.x1, b.x1)
        links, pes = (x0, x1, top.y1, bottom.y + 1), (x0, x1, top.y1 - 1, bottom.y + 1)
        return ox, bottom.y - top.y1 + 1, 0, links, pes
    if oy > 0:  # side by side: lanes run along the shared rows
        left, right = (a, b) if a.x < b.x else (b, a)
        y0, y1 = max(a.y, b.y), min(a.y1, b.y1)
        links, pes = (left.x1, right.x + 1, y0, y1), (left.x1 - 1, right.x + 1, y0, y1)
        return oy, right.x - left.x1 + 1, 1, links, pes
    # diagonal: lanes as wide as the narrower side, counted over the bounding box (an approximation)
    lanes = max(1, min(a.w, a.h, b.w, b.h))
    dx = max(b.x - a.x1, a.x - b.x1, 0) + 1
    dy = max(b.y - a.y1, a.y - b.y1, 0) + 1
    box = (min(a.x, b.x), max(a.x1, b.x1), min(a.y, b.y), max(a.y1, b.y1))
    return lanes, dx + dy, 0, box, box


def _gemv_shares(stage: Stage, r: Rect, dtype: str) -> tuple[int, int]:
    """Wavelets per token of the stage's GEMVs on ``r``: each column's share of the inputs, sent down
    the column from its top PE (none on a one-row rectangle), and each row's share of the outputs,
    reduced along the row toward its first column (none on a one-column rectangle)."""
    down = -(-wavelets(stage.matmul_in, dtype) // r.w) if r.h > 1 else 0
    along = -(-wavelets(stage.matmul_out, dtype) // r.h) if r.w > 1 else 0
    return down, along


def _internal_cycles(stage: Stage, w: int, h: int, dtype: str) -> int:
    """Cycles per token the stage's GEMVs keep a PE's ramp busy: a PE inside the rectangle takes in
    its column's share of the inputs and its row's share of the partial sums, one wavelet per cycle.
    (Training's backward streams the same amounts the opposite way: the other direction of each
    link and ramp.)"""
    return sum(_gemv_shares(stage, Rect(0, 0, w, h), dtype))


def _lane_ends(a: Rect, b: Rect) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Columns and rows of the PEs that send (in ``a``) and receive (in ``b``) the lanes of a
    transfer: across the shared columns or rows; between rectangles that share neither, nested L
    shapes that leave ``a`` across its side facing ``b`` and enter ``b`` across its side facing
    ``a``, the lane nearest ``b`` turning first (so that no two cross)."""
    if min(a.x1, b.x1) > max(a.x, b.x):  # shared columns
        xs = np.arange(max(a.x, b.x), min(a.x1, b.x1))
        ya, yb = (a.y1 - 1, b.y) if a.y < b.y else (a.y, b.y1 - 1)
        return xs, np.full(xs.size, ya), xs, np.full(xs.size, yb)
    if min(a.y1, b.y1) > max(a.y, b.y):  # shared rows
        ys = np.arange(max(a.y, b.y), min(a.y1, b.y1))
        xa, xb = (a.x1 - 1, b.x) if a.x < b.x else (a.x, b.x1 - 1)
        return np.full(ys.size, xa), ys, np.full(ys.size, xb), ys
    j = np.arange(_transfer_band(a, b)[0])
    right, down = b.x > a.x, b.y > a.y
    xs = a.x1 - 1 - j if right else a.x + j
    ys = b.y + j if down else b.y1 - 1 - j
    return xs, np.full(j.size, a.y1 - 1 if down else a.y), np.full(j.size, b.x if right else b.x1 - 1), ys


def _lanes(a: Rect, b: Rect) -> list[list[tuple[int, int]]]:
    """The PEs of each lane of a transfer from ``a`` to ``b``, sender first (see :func:`_lane_ends`):
    straight, or down (up) the sender's column and then along the receiver's row."""
    out = []
    for xa, ya, xb, yb in zip(*(v.tolist() for v in _lane_ends(a, b))):
        turn = (xa, yb)  # down (or up) the sender's column, then along the receiver's row
        down = straight((xa, ya), turn) if ya != yb else [turn]
        out.append(down + (straight(turn, (xb, yb))[1:] if xb != xa else []))
    return out


def _ramp_cycles(stage: Stage, r: Rect, dtype: str, into=None, out_of=None) -> int:
    """The most wavelets per token any PE of the stage passes through its ramp, in or out: its
    GEMVs' (see :func:`_gemv_shares`; a column's top PE sends its inputs rather than receiving
    them, the end of a row's chain sends its partial sums without receiving any, its first PE only
    receives) and, on the PEs at the ends of lanes, the lanes'. ``into`` and ``out_of`` are
    (columns, rows, wavelets per lane) of the lanes that end and start in the stage."""
    down, along = _gemv_shares(stage, r, dtype)
    most = down + along  # a PE inside the rectangle
    if into is not None:
        xs, ys, per_lane = into
        most = max(most, int((down * (ys != r.y) + along * (xs != r.x1 - 1)).max()) + per_lane)
    if out_of is not None:
        xs, ys, per_lane = out_of
        most = max(most, int((down * (ys == r.y) + along * (xs != r.x)).max()) + per_lane)
    return most


def evaluate(p: Placement) -> Evaluation:
    """Stage times, throughput, latency, utilisation, SRAM and colors of a placement.

    Built in: 10_placement
    """
    w = p.wafer
    n = len(p.stages)
    area = np.array([r.area for r in p.rects], dtype=float)
    flops = np.array([stage_flops(s, p.mode) for s in p.stages])
    rate = 2.0 * w.fmacs_per_cycle(p.dtype)  # FLOPs per PE per cycle
    compute = flops / (rate * area)
    # transfers, rasterised: how many transfers cross each link (per orientation), and how many
    # route lanes through each PE
    links = np.zeros((2, w.height + 1, w.width + 1), dtype=np.int32)
    routed = np.zeros((w.height, w.width), dtype=np.int32)
    bands = []
    for i in range(n - 1):
        band = _transfer_band(p.rects[i], p.rects[i + 1])
        lanes, h, orient, (x0, x1, y0, y1), (px0, px1, py0, py1) = band
        links[orient, y0:y1, x0:x1] += 1
        routed[max(py0, 0):py1, max(px0, 0):px1] += 1
        bands.append((lanes, h, orient, (x0, x1, y0, y1)))
    transfer = np.zeros(n)
    hops = np.zeros(n)
    into: list = [None] * n
    out_of: list = [None] * n
    for i, (lanes, h, orient, (x0, x1, y0, y1)) in enumerate(bands):
        share = int(links[orient, y0:y1, x0:x1].max())  # transfers that share this one's busiest link
        per_lane = math.ceil(wavelets(p.stages[i].out_elems, p.dtype) / lanes)
        transfer[i] = per_lane * share
        hops[i] = h
        xa, ya, xb, yb = _lane_ends(p.rects[i], p.rects[i + 1])
        out_of[i], into[i + 1] = (xa, ya, per_lane), (xb, yb, per_lane)
    internal = np.array([_ramp_cycles(s, r, p.dtype, into[i], out_of[i])
                         for i, (s, r) in enumerate(zip(p.stages, p.rects))], dtype=float)
    directions = 2 if p.mode == "training" else 1  # gradients come back on routes of their own
    colors = np.zeros(n, dtype=int)
    for i, r in enumerate(p.rects):  # a stage's own GEMV: a broadcast color and a chain's two
        colors[i] = 1 + reduce_colors(r.w, 1) + directions * int(routed[r.y:r.y1, r.x:r.x1].max())
    transfer_in = np.concatenate([[0.0], transfer[:-1]])
    stage = np.maximum.reduce([compute, internal, transfer, transfer_in])
    sram = np.array([stage_bytes(s, p.target) for s in p.stages]) / area
    problems = []
    for s, r, b, c in zip(p.stages, p.rects, sram, colors):
        if b > w.sram_bytes_per_pe:
            problems.append(f"stage {s.name} needs {b:,.0f} bytes per PE on its {r.w} x {r.h} rectangle, "
                            f"over the {w.sram_bytes_per_pe:,} of a PE")
        if c > w.colors:
            problems.append(f"stage {s.name} routes {c} colors at one PE, over the {w.colors} a PE has")
    bottleneck = int(stage.argmax())
    if problems:
        limit = "memory" if any("bytes" in m for m in problems) else "colors"
    else:
        limit = ("compute" if compute[bottleneck] >= stage[bottleneck] else
                 "internal" if internal[bottleneck] >= stage[bottleneck] else "transfer")
    slowest = float(stage.max())
    total_flops = float(flops.sum())
    # alone, a token also waits for each product's first wavelet to cross the rectangle: down the
    # columns (hops) and along the chain of each row (a hop and an add per PE)
    gemv_latency = sum(s.products * (r.h * w.hop_cycles + r.w * (w.hop_cycles + w.stage_cycles))
                       for s, r in zip(p.stages, p.rects))
    tokens_per_s = w.clock_hz / slowest
    return Evaluation(
        compute=compute, internal=internal, transfer=transfer, stage=stage, hops=hops, sram_per_pe=sram,
        colors=colors,
        tokens_per_s=tokens_per_s,
        latency_s=(float(stage.sum() + hops.sum() * w.hop_cycles) + gemv_latency) / w.clock_hz,
        utilisation=total_flops * tokens_per_s / (w.pes * rate * w.clock_hz),
        compute_bound_tokens_per_s=w.pes * rate * w.clock_hz / total_flops,
        bottleneck=bottleneck, limit=limit, feasible=not problems, problems=problems)


# --- the placement on the simulator -------------------------------------------------------------------


def against_traffic(p: Placement) -> list[tuple[str, str]]:
    """The (transfer, stage) pairs the evaluation does not model: lanes of a transfer that pass
    through another stage's PEs heading south or west, the directions of that stage's own
    broadcasts and reductions. Empty for placements in columns of strips (tested); recursive
    bisection makes some."""
    owner = np.full((p.wafer.height, p.wafer.width), -1)
    for i, r in enumerate(p.rects):
        owner[r.y:r.y1, r.x:r.x1] = i
    out = []
    for i in range(len(p.stages) - 1):
        hit = set()
        for lane in _lanes(p.rects[i], p.rects[i + 1]):
            for (x0, y0), (x1, y1) in zip(lane, lane[1:]):
                j = owner[y1, x1]
                if j not in (-1, i, i + 1) and (y1 > y0 or x1 < x0):
                    hit.add(int(j))
        out += [(f"{p.stages[i].name} -> {p.stages[i + 1].name}", p.stages[j].name) for j in sorted(hit)]
    return out


@dataclass
class Simulated:
    """A placement run on the mesh simulator, and its cycles per token in steady state."""

    cycles_per_token: float  # the slowest stage's
    tokens_per_s: float
    stage: np.ndarray  # each stage's cycles per token
    tokens: int
    report: object  # the run's Report


def simulate(p: Placement, tokens: int | None = None) -> Simulated:
    """Run ``p`` (inference) on the mesh simulator, token by token, and measure its throughput.

    Every stage's rectangle runs its work for each token: its PEs hold its weights (as SRAM, to check
    the capacity); the top of each column sends the column's share of the stage's matrix-product
    inputs down the column; every PE computes for the stage's cycles; each row reduces its share of
    the outputs in a chain toward its first column; and the PEs on the side facing the next stage
    send the activations over the lanes of :func:`_lanes`, which the next stage's PEs on the facing
    side receive before they start. Lanes cross other stages' PEs on colors of their own, so they
    contend with every other flow for links.

    Every PE does each kind of work (receiving, computing, reducing) once per token. Its rate is
    measured over the last third of ``tokens`` (by default 3(n + 2) for n stages, so that the
    pipeline has filled); a stage's cycles per token are those of its slowest work, and the slowest
    stage's are the pipeline's. (Queues are unbounded: work that is not the bottleneck runs ahead
    instead of waiting, so the rate of each kind of work is measured on its own, not the moment the
    last of them finishes.)

    Built in: 10_placement
    """
    if p.mode != "inference":
        raise ValueError(f"simulate runs inference placements; this one is for {p.mode}")
    w, n = p.wafer, len(p.stages)
    count = 3 * (n + 2) if tokens is None else tokens
    if not isinstance(count, int) or count < 6:
        raise ValueError(f"tokens={tokens!r} must be an integer of at least 6")
    if 3 + n - 1 > w.colors:
        raise ValueError(f"{n} stages need {n + 2} colors; a {w.name} PE routes {w.colors}")
    rate = 2.0 * w.fmacs_per_cycle(p.dtype)
    mesh = Mesh(w.width, w.height, w)
    lane_in: dict = {}
    lane_out: dict = {}
    for i in range(n - 1):
        paths = _lanes(p.rects[i], p.rects[i + 1])
        per_lane = -(-wavelets(p.stages[i].out_elems, p.dtype) // len(paths))
        for path in paths:
            route_path(mesh, path, 3 + i)
            lane_out.setdefault(path[0], []).append(Send(3 + i, values=np.zeros(per_lane)))
            lane_in.setdefault(path[-1], []).append(Recv(3 + i, "in", per_lane))
    for s, r in zip(p.stages, p.rects):
        pes = [(x, y) for y in range(r.y, r.y1) for x in range(r.x, r.x1)]
        words = math.ceil(stage_bytes(s, p.target) / r.area / 4)
        k_in, k_out = _gemv_shares(s, r, p.dtype)
        plan: dict = {pe: [] for pe in pes}
        if k_in:
            for x in range(r.x, r.x1):
                column = [(x, y) for y in range(r.y, r.y1)]
                mesh.store(column[0], "x", np.zeros(k_in))
                for pe, ops in broadcast_plan(mesh, column[0], column, "x", k_in, 0).items():
                    plan[pe] += ops
        reduce_ops: dict = {}
        if k_out:
            for y in range(r.y, r.y1):
                line = [(x, y) for x in range(r.x, r.x1)]
                for pe in line:
                    mesh.store(pe, "y", np.zeros(k_out))
                reduce_ops.update(reduce_plan(mesh, line, "y", k_out, 1, first_color=1))
        compute = Compute(math.ceil(stage_flops(s, p.mode) / (rate * r.area)), label=s.name)
        for pe in pes:
            mesh.store(pe, "W", np.zeros(words))
            # the end of a row's chain sends its partial sums once it has computed them; the PEs
            # along the chain add theirs as the sums pass, in a task of their own, so that the
            # reductions of one token overlap the compute of the next
            ops = reduce_ops.get(pe, [])
            sends = [op for op in ops if isinstance(op, Send)]
            mesh.program(pe, (lane_in.get(pe, []) + plan[pe] + [compute] + sends + lane_out.get(pe, []))
                         * count)
            adds = [op for op in ops if not isinstance(op, Send)]
            if adds:
                mesh.program(pe, adds * count)
    report = mesh.run()
    events: dict = {}  # (x, y, label) -> end cycles, one per token (receives, compute, reductions)
    for x, y, label, _, end in report.timeline:
        if not label.startswith("send"):
            events.setdefault((x, y, label), []).append(end)
    owner = {(x, y): i for i, r in enumerate(p.rects) for y in range(r.y, r.y1) for x in range(r.x, r.x1)}
    last = count // 3
    stage = np.zeros(n)
    for (x, y, _), ends in events.items():  # the rate of each PE's each kind of work, late in the run
        ends = sorted(ends)
        i = owner[(x, y)]
        stage[i] = max(stage[i], (ends[-1] - ends[-1 - last]) / last)
    slowest = float(stage.max())
    return Simulated(slowest, w.clock_hz / slowest, stage, count, report)


# --- strategies ---------------------------------------------------------------------------------------


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


def _columns(groups: list[list[int]], widths: list[int], rows: list[list[int]],
             serpentine: bool) -> list[Rect]:
    """Rectangles for stage groups laid out as side-by-side columns of the given widths, each column
    stacking its stages' rows top to bottom (bottom to top in every other column if ``serpentine``)."""
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


def default_columns(n: int, wafer: Wafer) -> int:
    """Columns of strips that make each of ``n`` equal strips about square."""
    return int(min(n, max(1, round(math.sqrt(n * wafer.width / wafer.height)))))


def strips(stages: list[Stage], wafer: Wafer, columns: int | None = None, serpentine: bool = False,
           areas=None, mode: str = "inference", context: int = 1024, dtype: str = "fp16",
           name: str = "", min_pes=None) -> Placement:
    """Stages in layer order as horizontal strips, in ``columns`` side-by-side columns (top to
    bottom in each; bottom to top in every other column if ``serpentine``, so that consecutive
    layers always touch). Areas proportional to ``areas`` (equal by default).

    Built in: 10_placement
    """
    n = len(stages)
    columns = default_columns(n, wafer) if columns is None else columns
    weights = np.ones(n) if areas is None else np.asarray(areas, dtype=float)
    need = np.zeros(n, dtype=int) if min_pes is None else np.asarray(min_pes, dtype=int)
    groups = _groups(weights, columns)
    widths = _shares([weights[g].sum() for g in groups], wafer.width)
    # each stage gets at least the rows its memory needs at its column's width
    rows = [_shares(weights[g], wafer.height, -(-need[g] // w)) for g, w in zip(groups, widths)]
    rects = _columns(groups, widths, rows, serpentine)
    label = name or ("serpentine" if serpentine else "row strips")
    return Placement(wafer, stages, rects, mode, context, dtype, label)


def _min_pes(stages, wafer, mode, context, dtype) -> np.ndarray:
    per_pe = wafer.sram_bytes_per_pe
    return np.array([math.ceil(stage_bytes(s, Target(wafer, mode, context, dtype)) / per_pe) for s in stages])


def balanced_areas(stages, wafer, mode="inference", context=1024, dtype="fp16") -> np.ndarray:
    """PEs per stage proportional to its FLOPs, but never fewer than its weights need: the areas
    that fill the grid with max(memory minimum, lambda x FLOPs), lambda found by bisection."""
    check_model_fits(stages, Target(wafer, mode, context, dtype))
    need = _min_pes(stages, wafer, mode, context, dtype)
    flops = np.array([stage_flops(s, mode) for s in stages])
    lo, hi = 0.0, wafer.pes / max(flops.sum(), 1e-30)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(need, mid * flops).sum() <= wafer.pes else (lo, mid)
    return np.maximum(need, lo * flops)


def flop_proportional(stages, wafer, columns=None, mode="inference", context=1024, dtype="fp16") -> Placement:
    """Serpentine strips whose areas follow each stage's FLOPs (and cover its memory).

    Built in: 10_placement
    """
    areas = balanced_areas(stages, wafer, mode, context, dtype)
    need = _min_pes(stages, wafer, mode, context, dtype)
    return strips(stages, wafer, columns, True, areas, mode, context, dtype, "FLOP-proportional", need)


def bisection(stages, wafer, mode="inference", context=1024, dtype="fp16") -> Placement:
    """Recursive bisection: split the layers where their areas balance, split the rectangle across
    its longer side in the same proportion, and recurse; neighbouring layers stay near each other.

    Built in: 10_placement
    """
    areas = balanced_areas(stages, wafer, mode, context, dtype)
    need = _min_pes(stages, wafer, mode, context, dtype)
    rects: list[Rect | None] = [None] * len(stages)

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

    split(list(range(len(stages))), Rect(0, 0, wafer.width, wafer.height))
    return Placement(wafer, stages, rects, mode, context, dtype, "recursive bisection")


STRATEGIES = {
    "row strips": lambda st, w, **kw: strips(st, w, serpentine=False, **kw),
    "serpentine": lambda st, w, **kw: strips(st, w, serpentine=True, **kw),
    "FLOP-proportional": lambda st, w, **kw: flop_proportional(st, w, **kw),
    "recursive bisection": lambda st, w, **kw: bisection(st, w, **kw),
}


def explorer_models() -> dict:
    """The models of chapter 10 and its placement explorer: name -> (GPTConfig, context)."""
    from minigpt.model import GPTConfig
    from minigpt.scaling import CEREBRAS_GPT

    out = {"minigpt (chapter 04)": (GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65),
                                    256),
           "GPT-2 small": (GPTConfig(block_size=2048), 2048)}
    for m in CEREBRAS_GPT:
        if m.name in ("111M", "256M", "590M"):
            out[f"Cerebras-GPT {m.name}"] = (m.config, 2048)
    return out


# --- the optimizer ----------------------------------------------------------------------------------------


def _column_rows(time, stages: list[int], need_pes, width: int, height: int) -> list[int] | None:
    """Rows for the ``stages`` of one column of ``width`` that minimise the slowest one's
    ``time(i, w, h)`` (non-increasing in h). Each starts with the rows its memory needs; every
    further row goes to the stage that is slowest at that moment, unless a row would not speed it up
    (its time is bound by its width), and then to the next slowest. None if the memory does not fit."""
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


def _refined(p: Placement, time, need) -> Placement | None:
    """Serpentine columns as in ``p``, improved by local search: each column's rows balanced by
    :func:`_column_rows`, then moves accepted while they lower the slowest stage's ``time``:
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
            rows = _column_rows(time, g, need[g], w, height) if w > 0 and g else None
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
    rects = _columns(groups, widths, rows_all, serpentine=True)
    return Placement(p.wafer, p.stages, rects, p.mode, p.context, p.dtype, "optimized")


def _layout(p: Placement):
    """The columns of a column layout: (stage groups, widths, rows per stage, serpentine), or None if
    ``p`` is not one (side-by-side columns as tall as the grid, each stacking consecutive stages top
    to bottom, or in every other column bottom to top if serpentine)."""
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


def _score(e: Evaluation) -> tuple:
    """What the polish minimises: the slowest stage, then how many stages are that slow, then the
    sum of the stage times (so that moves on a plateau of equal slowest times still count)."""
    top = float(e.stage.max())
    return (top, int((e.stage >= top - 1e-9).sum()), float(e.stage.sum()))


def _polish(p: Placement, passes: int = 40) -> Placement:
    """Local search on the full evaluation (lanes, ramps, contention, SRAM, colors included): move
    1, 4, 16 or 64 columns of width between neighbouring columns, or rows between neighbouring
    stages of a column, while :func:`_score` improves and the placement stays feasible."""
    layout = _layout(p)
    if layout is None:
        return p
    groups, widths, rows, serpentine = layout

    def build(widths, rows):
        if min(widths) < 1 or min(min(r) for r in rows) < 1:
            return None
        rects = _columns(groups, widths, rows, serpentine)
        q = Placement(p.wafer, p.stages, rects, p.mode, p.context, p.dtype, "optimized")
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


def optimize(stages: list[Stage], wafer: Wafer, mode: str = "inference", context: int = 1024,
             dtype: str = "fp16") -> Placement:
    """The placement with the highest throughput this search finds, among feasible ones: serpentine
    columns (several column counts), areas balanced by FLOPs within the memory each stage needs,
    rows re-balanced per column and column widths moved toward the slowest; the simple strategies
    compete too.

    Built in: 10_placement
    """
    areas = balanced_areas(stages, wafer, mode, context, dtype)  # raises if the model cannot fit
    need = _min_pes(stages, wafer, mode, context, dtype)
    flops = np.array([stage_flops(s, mode) for s in stages])
    rate = 2.0 * wafer.fmacs_per_cycle(dtype)

    def time(i: int, w: int, h: int) -> float:  # a stage's compute and internal cycles per token
        return max(flops[i] / (rate * w * h), _internal_cycles(stages[i], w, h, dtype))

    n = len(stages)
    base = default_columns(n, wafer)
    candidates = []
    for c in sorted({max(1, min(n, base + d)) for d in (-2, -1, 0, 1, 2)}):
        try:
            start = strips(stages, wafer, c, True, areas, mode, context, dtype, "optimized", need)
        except ValueError:
            continue
        refined = _refined(start, time, need)
        candidates += [p for p in (start, refined) if p is not None]
    for make in STRATEGIES.values():
        try:
            candidates.append(make(stages, wafer, mode=mode, context=context, dtype=dtype))
        except ValueError:
            continue
    scored = [(evaluate(p), p) for p in candidates]
    feasible = [(e.tokens_per_s, i) for i, (e, _) in enumerate(scored) if e.feasible]
    if not feasible:
        raise ValueError(f"no placement found that fits the {wafer.name} grid in {mode}: "
                         + scored[0][0].problems[0])
    ranked = [scored[i][1] for _, i in sorted(feasible, reverse=True)]
    best = ranked[0]
    columns = next((p for p in ranked if _layout(p) is not None), None)
    if columns is not None:  # the best column layout, polished on the full evaluation
        polished = _polish(columns)
        if evaluate(polished).tokens_per_s > evaluate(best).tokens_per_s:
            best = polished
    return Placement(best.wafer, best.stages, best.rects, mode, context, dtype, "optimized")
