"""A placement run on the mesh simulator, token by token: :func:`simulate` builds the mesh program of
an inference :class:`~wafer.placement.Placement` (its stages' GEMVs, compute and lanes) and measures
its throughput, returned as :class:`Simulated`. The tests compare it with
:func:`wafer.placement.evaluate`; the geometry both use (:func:`~wafer.placement.lanes` and
:func:`~wafer.placement.gemv_shares`) is tested on its own against hand counts.

Built in: 11_placement
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer.collectives import broadcast_plan, reduce_plan, route_path
from wafer.cost import wavelets
from wafer.hardware import positive_int
from wafer.mesh import Compute, Mesh, Recv, Report, Send
from wafer.placement import Placement, gemv_shares, lanes
from wafer.stages import stage_bytes, stage_flops


@dataclass
class Simulated:
    """A placement run on the mesh simulator, and its cycles per token in steady state.

    Built in: 11_placement
    """

    cycles_per_token: float  # the slowest stage's
    tokens_per_s: float
    stage: np.ndarray  # each stage's cycles per token
    tokens: int
    report: Report  # the run's


def _lanes_program(p: Placement, mesh: Mesh) -> tuple[dict, dict]:
    """Route the lanes of every transfer, each transfer on a color of its own; return each PE's
    receives (at the lanes' ends) and sends (at their starts) for one token."""
    lane_in: dict = {}
    lane_out: dict = {}
    for i in range(len(p.stages) - 1):
        paths = lanes(p.rects[i], p.rects[i + 1])
        per_lane = -(-wavelets(p.stages[i].out_elems, p.target.dtype) // len(paths))
        for path in paths:
            route_path(mesh, path, 3 + i)
            lane_out.setdefault(path[0], []).append(Send(3 + i, values=np.zeros(per_lane)))
            lane_in.setdefault(path[-1], []).append(Recv(3 + i, "in", per_lane))
    return lane_in, lane_out


def _stage_program(p: Placement, i: int, mesh: Mesh, lane_in: dict, lane_out: dict, count: int) -> None:
    """Store stage ``i``'s weights on its PEs and program ``count`` tokens of its work."""
    s, r, t = p.stages[i], p.rects[i], p.target
    pes = [(x, y) for y in range(r.y, r.y1) for x in range(r.x, r.x1)]
    words = math.ceil(stage_bytes(s, t) / r.area / 4)
    k_in, k_out = gemv_shares(s, r, t.dtype)
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
    rate = 2.0 * p.wafer.fmacs_per_cycle(t.dtype)
    compute = Compute(math.ceil(stage_flops(s, t.mode) / (rate * r.area)), label=s.name)
    for pe in pes:
        mesh.store(pe, "W", np.zeros(words))
        # the end of a row's chain sends its partial sums once it has computed them; the PEs along
        # the chain add theirs as the sums pass, in a task of their own, so that the reductions of
        # one token overlap the compute of the next
        ops = reduce_ops.get(pe, [])
        sends = [op for op in ops if isinstance(op, Send)]
        mesh.program(pe, (lane_in.get(pe, []) + plan[pe] + [compute] + sends + lane_out.get(pe, [])) * count)
        adds = [op for op in ops if not isinstance(op, Send)]
        if adds:
            mesh.program(pe, adds * count)


def simulate(p: Placement, tokens: int | None = None) -> Simulated:
    """Run ``p`` (inference) on the mesh simulator, token by token, and measure its throughput.

    Every stage's rectangle runs its work for each token: its PEs hold its weights (as SRAM, to check
    the capacity); the top of each column sends the column's share of the stage's matrix-product
    inputs down the column; every PE computes for the stage's cycles; each row reduces its share of
    the outputs in a chain toward its first column; and the PEs on the side facing the next stage
    send the activations over the lanes of :func:`wafer.placement.lanes`, which the next stage's PEs
    on the facing side receive before they start. Lanes cross other stages' PEs on colors of their
    own, so they contend with every other flow for links.

    Every PE does each kind of work (receiving, computing, reducing) once per token. Its rate is
    measured over the last third of ``tokens`` (by default 3(n + 2) for n stages, so that the
    pipeline has filled); a stage's cycles per token are those of its slowest work, and the slowest
    stage's are the pipeline's. (Queues are unbounded: work that is not the bottleneck runs ahead
    instead of waiting, so the rate of each kind of work is measured on its own, not the moment the
    last of them finishes.)

    Built in: 11_placement
    """
    if p.target.mode != "inference":
        raise ValueError(f"simulate runs inference placements; this one is for {p.target.mode}")
    w, n = p.wafer, len(p.stages)
    count = 3 * (n + 2) if tokens is None else positive_int("tokens", tokens)
    if count < 6:
        raise ValueError(f"tokens={tokens!r} must be an integer of at least 6")
    if 3 + n - 1 > w.colors:
        raise ValueError(f"{n} stages need {n + 2} colors; a {w.name} PE routes {w.colors}")
    mesh = Mesh(w.width, w.height, w)
    lane_in, lane_out = _lanes_program(p, mesh)
    for i in range(n):
        _stage_program(p, i, mesh, lane_in, lane_out, count)
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
