"""Collectives and distributed matrix products as programs for the mesh simulator.

Each algorithm is built from *plans*: the routes it sets and the operations each PE runs, so that
algorithms compose (GEMV = a column broadcast, a local product, a row reduction). The cycle counts
the analytic model predicts for the same algorithms are in :mod:`wafer.cost`.

What it holds:

- Paths and colors: ``direction``, ``straight``, ``row``, ``column``, ``assign_colors``,
  ``colors_per_pe``, ``route_path``, ``route_multicast``.
- Plans (they set the routes and return each PE's operations): ``tree_chains`` and ``reduce_links``
  (the shape of a reduction), ``reduce_plan``, ``broadcast_plan``, ``allreduce_plan``; Cannon's
  ``interleaved_ring`` and ``shift_paths``.

And the programs, each of which runs its plans and returns the :class:`wafer.mesh.Report`:

- ``broadcast``: multicast from a source along a row or column segment; every PE on the way keeps a
  copy as the wavelets pass (no PE handles them on the way).
- ``reduce``: a sum along a line of PEs to its first PE. ``levels=1`` is a chain: each PE adds its own
  vector to the stream and passes it on (a software stage per PE). ``levels=K`` is a K-level tree:
  chains of about n^(1/K) PEs, whose heads form chains of their own, with longer hops between them
  and fewer stages.
- ``allreduce``: a reduce, then a broadcast of the sum from the root.
- ``gemv``: y = A x on a P x Q grid. ``gemm``: C = A B on a P x P grid by SUMMA (broadcasts from the
  s-th column and row at step s), by Cannon (blocks start skewed and shift one PE each step, the wrap
  around the edge travelling P - 1 hops), or by Cannon on an interleaved ring (logical neighbours at
  most 2 hops apart, the shift WaferLLM uses); ``GEMM_METHODS`` names them.

Built in: 10_mesh
"""

from __future__ import annotations

import functools
import math

import numpy as np

from wafer.hardware import TOY, Wafer, positive_int
from wafer.mesh import (
    EAST,
    NORTH,
    OPPOSITE,
    RAMP,
    SOUTH,
    STEP,
    WEST,
    Compute,
    Mesh,
    Op,
    Recv,
    Reduce,
    ReduceSend,
    Report,
    Send,
    paused_gc,
)

PE = tuple[int, int]  # (x, y)
Plan = dict[PE, list[Op]]  # the operations a plan gives each PE, in order

# --- paths, flows and colors --------------------------------------------------------------------------


def direction(a, b) -> int:
    """The port that leads from PE ``a`` toward PE ``b`` on the same row or column."""
    (ax, ay), (bx, by) = a, b
    if ay == by and ax != bx:
        return EAST if bx > ax else WEST
    if ax == bx and ay != by:
        return SOUTH if by > ay else NORTH
    raise ValueError(f"PEs {a} and {b} are not distinct PEs on one row or column")


def straight(a, b) -> list[tuple[int, int]]:
    """The PEs from ``a`` to ``b`` inclusive, along their common row or column."""
    dx, dy = STEP[direction(a, b)]
    n = abs(b[0] - a[0]) + abs(b[1] - a[1])
    return [(a[0] + dx * i, a[1] + dy * i) for i in range(n + 1)]


def assign_colors(paths: list[list], first: int = 0, limit: int | None = None) -> list[int]:
    """A color per point-to-point path, smallest first, such that no two paths that share a PE share
    a color (a PE holds one route per color). With ``limit``, raise if a path would need a color
    number of ``limit`` or more, naming the PE where the paths crowd.

    Built in: 10_mesh
    """
    at: dict[tuple, set[int]] = {}
    colors = []
    for path in paths:
        used = set().union(*(at.get(pe, set()) for pe in path))
        c = first
        while c in used:
            c += 1
        if limit is not None and c >= limit:
            crowded = max(path, key=lambda pe: len(at.get(pe, ())))
            raise ValueError(f"PE {crowded} is crossed by {len(at[crowded]) + 1} paths that need distinct "
                             f"colors; a PE routes at most {limit}")
        colors.append(c)
        for pe in path:
            at.setdefault(pe, set()).add(c)
    return colors


def route_path(mesh: Mesh, path: list, color: int) -> None:
    """Route ``color`` along ``path`` (adjacent PEs): from the first PE's ramp to the last PE's ramp."""
    for i, pe in enumerate(path):
        rx = RAMP if i == 0 else OPPOSITE[direction(path[i - 1], pe)]
        tx = RAMP if i == len(path) - 1 else direction(pe, path[i + 1])
        mesh.route(pe, color, rx, tx)


def route_multicast(mesh: Mesh, source, pes: list, color: int) -> None:
    """Route ``color`` from ``source`` to every PE of the line ``pes`` (which contains ``source``),
    outward in both directions, each PE on the way keeping a copy. A line of one PE needs no route."""
    if len(pes) == 1:
        return
    k = pes.index(source)
    arms = [pes[k + 1:], pes[:k][::-1]]
    out = tuple(direction(source, arm[0]) for arm in arms if arm)
    mesh.route(source, color, RAMP, out)
    for arm in arms:
        prev = source
        for i, pe in enumerate(arm):
            tx = (RAMP,) if i == len(arm) - 1 else (RAMP, direction(pe, arm[i + 1]))
            mesh.route(pe, color, OPPOSITE[direction(prev, pe)], tx)
            prev = pe


# --- plans: routes to set and operations per PE ---------------------------------------------------------


def tree_chains(n: int, levels: int) -> list[list[list[int]]]:
    """The chains of a ``levels``-level reduction over positions 0..n-1 toward 0: per level, lists of
    positions, head first. Each level splits the positions still in play into chains of at most
    g = ceil(n^(1/levels)) (sizes as equal as possible); their heads go on to the next level, and
    the last level is one chain. One level is a single chain over all n.

    Built in: 10_mesh
    """
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels={levels!r} must be a positive integer (1 = a chain)")
    positive_int("n", n)
    g = max(2, math.ceil(n ** (1 / levels) - 1e-9))
    nodes, out = list(range(n)), []
    for level in range(levels):
        if len(nodes) == 1:
            break
        # no chain of one (its PE would join the next level at once and compete for links)
        parts = 1 if level == levels - 1 else max(1, min(math.ceil(len(nodes) / g), len(nodes) // 2))
        chains = [list(c) for c in np.array_split(np.array(nodes), parts)]
        out.append([[int(p) for p in c] for c in chains if len(c) > 1])
        nodes = [int(c[0]) for c in chains]
    return out


def reduce_links(n: int, levels: int = 1) -> list[tuple[int, int]]:
    """The (sender, receiver) positions of every hop of a reduction over n positions."""
    return [(chain[j], chain[j - 1]) for level in tree_chains(n, levels) for chain in level
            for j in range(1, len(chain))]


def colors_per_pe(paths: list[list], colors: list[int]) -> int:
    """The most colors any one PE routes, for ``paths`` colored ``colors``."""
    at: dict = {}
    for path, c in zip(paths, colors):
        for pe in path:
            at.setdefault(pe, set()).add(c)
    return max((len(v) for v in at.values()), default=0)


def reduce_plan(mesh: Mesh, pes: list, name: str, count: int, levels: int = 1, first_color: int = 0) -> Plan:
    """Set the routes of a reduction of buffer ``name`` (``count`` values) over the line ``pes`` toward
    ``pes[0]``, and return each PE's operations, to be appended to its task."""
    chains = tree_chains(len(pes), levels)
    links = reduce_links(len(pes), levels)
    colors = assign_colors([straight(pes[a], pes[b]) for a, b in links], first_color, mesh.wafer.colors)
    color_of = {}
    for (a, b), c in zip(links, colors):
        route_path(mesh, straight(pes[a], pes[b]), c)
        color_of[a] = c  # a sends on c (each position sends once)
    ops: Plan = {pe: [] for pe in pes}
    for level in chains:
        for chain in level:
            for j, pos in enumerate(chain):
                pe = pes[pos]
                if j == 0:
                    ops[pe].append(Reduce(color_of[chain[1]], name, count))
                elif j == len(chain) - 1:
                    ops[pe].append(Send(color_of[pos], name))
                else:
                    ops[pe].append(ReduceSend(color_of[chain[j + 1]], color_of[pos], name, count))
    return ops


def broadcast_plan(mesh: Mesh, source, pes: list, name: str, count: int, color: int) -> Plan:
    if len(pes) == 1:
        return {source: []}
    route_multicast(mesh, source, pes, color)
    return {pe: [Send(color, name)] if pe == source else [Recv(color, name, count)] for pe in pes}


def _program(mesh: Mesh, *plans: Plan) -> None:
    """Give each PE one task: the operations of every plan, in order."""
    tasks: Plan = {}
    for plan in plans:
        for pe, ops in plan.items():
            tasks.setdefault(pe, []).extend(ops)
    for pe, ops in tasks.items():
        mesh.program(pe, ops)


def row(mesh: Mesh, y: int, x0: int = 0, x1: int | None = None) -> list:
    return [(x, y) for x in range(x0, mesh.width if x1 is None else x1)]


def column(mesh: Mesh, x: int, y0: int = 0, y1: int | None = None) -> list:
    return [(x, y) for y in range(y0, mesh.height if y1 is None else y1)]


# --- collectives ------------------------------------------------------------------------------------------


def broadcast(mesh: Mesh, source, pes: list, name: str, color: int = 0) -> Report:
    """Copy ``source``'s buffer ``name`` to every PE of the line ``pes``.

    Built in: 10_mesh
    """
    count = mesh.load(source, name).size
    _program(mesh, broadcast_plan(mesh, source, pes, name, count, color))
    return mesh.run()


def reduce(mesh: Mesh, pes: list, name: str, levels: int = 1) -> Report:
    """Sum the buffers ``name`` of the line ``pes`` into ``pes[0]`` (a chain, or a ``levels``-level tree).

    Built in: 10_mesh
    """
    count = mesh.load(pes[0], name).size
    _program(mesh, reduce_plan(mesh, pes, name, count, levels))
    return mesh.run()


def allreduce_plan(mesh: Mesh, pes: list, name: str, count: int, levels: int = 1) -> Plan:
    """The routes and each PE's operations of an allreduce of ``count`` values of ``name`` over the
    line ``pes``: a reduce toward ``pes[0]``, then its broadcast back on the next free color."""
    plan = reduce_plan(mesh, pes, name, count, levels)
    color = max(c for (_, c) in mesh.routes) + 1
    back = broadcast_plan(mesh, pes[0], pes, name, count, color)
    return {pe: plan[pe] + back[pe] for pe in pes}


def allreduce(mesh: Mesh, pes: list, name: str, levels: int = 1) -> Report:
    """Every PE of ``pes`` ends with the sum of their buffers ``name``: a reduce, then a broadcast.

    Built in: 10_mesh
    """
    _program(mesh, allreduce_plan(mesh, pes, name, mesh.load(pes[0], name).size, levels))
    return mesh.run()


# --- matrix products ------------------------------------------------------------------------------------


def _blocks(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} must be divisible by the grid's {parts} (each PE gets an equal block)")
    return n // parts


@paused_gc()
def gemv(A: np.ndarray, x: np.ndarray, grid: tuple[int, int], wafer: Wafer = TOY, levels: int = 1,
         ) -> tuple[np.ndarray, Report]:
    """y = A x on a P x Q grid: PE (q, p) holds block (p, q) of A; the top row holds x; x is broadcast
    down the columns, each PE multiplies its block, and each row reduces toward column 0.

    Built in: 10_mesh
    """
    p_rows, q_cols = grid
    m, n = A.shape
    if x.shape != (n,):
        raise ValueError(f"x of shape {x.shape} does not match A of shape {A.shape}")
    bm, bn = _blocks(m, p_rows, "rows of A"), _blocks(n, q_cols, "columns of A")
    mesh = Mesh(q_cols, p_rows, wafer)
    for q in range(q_cols):
        mesh.store((q, 0), "x", x[q * bn:(q + 1) * bn])
        for p in range(p_rows):
            mesh.store((q, p), "A", A[p * bm:(p + 1) * bm, q * bn:(q + 1) * bn])
    plans = [broadcast_plan(mesh, (q, 0), column(mesh, q), "x", bn, color=0) for q in range(q_cols)]
    product: Plan = {(q, p): [Compute(math.ceil(bm * bn / wafer.fp32_fmacs_per_cycle),
                                      lambda mem: mem.__setitem__("y", mem["A"] @ mem["x"]), "A @ x")]
                     for q in range(q_cols) for p in range(p_rows)}
    reduces = [reduce_plan(mesh, row(mesh, p), "y", bm, levels, first_color=1) for p in range(p_rows)]
    for p in range(p_rows):
        for q in range(q_cols):
            mesh.store((q, p), "y", np.zeros(bm))
    receive = {pe: ops for plan in plans for pe, ops in plan.items() if pe[1] > 0}
    sends = {pe: ops for plan in plans for pe, ops in plan.items() if pe[1] == 0}
    _program(mesh, sends)  # a task of its own, so the top row's product need not wait for its Send
    _program(mesh, receive, product, *reduces)
    report = mesh.run()
    y = np.concatenate([mesh.load((0, p), "y") for p in range(p_rows)])
    return y, report


def _square(A, B, grid):
    m, k = A.shape
    k2, n = B.shape
    if k != k2:
        raise ValueError(f"A of shape {A.shape} and B of shape {B.shape} cannot be multiplied")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r} must be a positive integer (a P x P grid)")
    return _blocks(m, grid, "rows of A"), _blocks(k, grid, "columns of A"), _blocks(n, grid, "columns of B")


def _gather(mesh, P, bm, bn, place=None):
    """C from the PEs; block (i, j) lives at PE (place[j], place[i])."""
    place = place or list(range(P))
    C = np.zeros((P * bm, P * bn))
    for j in range(P):
        for i in range(P):
            C[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = mesh.load((place[j], place[i]), "C").reshape(bm, bn)
    return C


def _mac(a: str, b: str):
    def fn(mem):
        mem["C"] += mem[a] @ mem[b]
    return fn


GEMM_METHODS = ("summa", "cannon", "interleave")


def interleaved_ring(n: int) -> list[int]:
    """A ring over positions 0..n-1 whose neighbours are at most 2 apart: 0, 2, 4, ..., then the odd
    positions back down to 1."""
    return list(range(0, n, 2)) + list(range(n - 1 - (n % 2 == 1), 0, -2)) if n > 2 else list(range(n))


def shift_paths(ring: list[int]) -> tuple[list[list], list[tuple]]:
    """Cannon's shifts on a P x P grid whose rows and columns follow ``ring`` (logical -> physical):
    the path of every block move, and (which block, from PE, to PE) for each."""
    P = len(ring)
    paths, owners = [], []
    for line in range(P if P > 1 else 0):  # one PE shifts nothing
        for j in range(P):  # A moves from logical column j to j - 1 in each row
            src, dst = (ring[j], ring[line]), (ring[(j - 1) % P], ring[line])
            paths.append(straight(src, dst))
            owners.append(("A", src, dst))
        for i in range(P):  # B moves from logical row i to i - 1 in each column
            src, dst = (ring[line], ring[i]), (ring[line], ring[(i - 1) % P])
            paths.append(straight(src, dst))
            owners.append(("B", src, dst))
    return paths, owners


@paused_gc()
def gemm(A: np.ndarray, B: np.ndarray, grid: int, method: str = "summa", wafer: Wafer = TOY,
         ) -> tuple[np.ndarray, Report]:
    """C = A B on a ``grid`` x ``grid`` mesh by ``method`` (``summa``, ``cannon`` or ``interleave``).

    Built in: 10_mesh
    """
    if method not in GEMM_METHODS:
        raise ValueError(f"method={method!r} is not one of {GEMM_METHODS}")
    P = grid
    bm, bk, bn = _square(A, B, grid)
    mesh = Mesh(P, P, wafer)
    flops = math.ceil(bm * bk * bn / wafer.fp32_fmacs_per_cycle)
    blk_a = lambda p, s: A[p * bm:(p + 1) * bm, s * bk:(s + 1) * bk]
    blk_b = lambda s, q: B[s * bk:(s + 1) * bk, q * bn:(q + 1) * bn]
    if method == "summa":
        for q in range(P):
            for p in range(P):
                mesh.store((q, p), "A", blk_a(p, q))
                mesh.store((q, p), "B", blk_b(p, q))
                mesh.store((q, p), "C", np.zeros((bm, bn)))
                mesh.store((q, p), "a", np.zeros((bm, bk)))
                mesh.store((q, p), "b", np.zeros((bk, bn)))
        steps = []
        for s in range(P):
            mesh.clear_routes()
            for p in range(P):
                route_multicast(mesh, (s, p), row(mesh, p), 0)
            for q in range(P):
                route_multicast(mesh, (q, s), column(mesh, q), 1)
            for q in range(P):
                for p in range(P):
                    ops: list[Op] = []
                    ops += [Send(0, "A")] if q == s and P > 1 else []
                    ops += [Send(1, "B")] if p == s and P > 1 else []
                    ops += [] if q == s else [Recv(0, "a", bm * bk)]
                    ops += [] if p == s else [Recv(1, "b", bk * bn)]
                    mac = _mac("A" if q == s else "a", "B" if p == s else "b")
                    ops.append(Compute(flops, mac, f"C += A B ({s})"))
                    mesh.program((q, p), ops)
            steps.append(mesh.run())
        return _gather(mesh, P, bm, bn), functools.reduce(Report.then, steps)
    # Cannon: PE at logical (i, j) starts with A(i, i + j) and B(i + j, j), and shifts A one step west
    # and B one step north along a logical ring, P - 1 times.
    ring = interleaved_ring(P) if method == "interleave" else list(range(P))
    for j in range(P):
        for i in range(P):
            pe = (ring[j], ring[i])
            mesh.store(pe, "A", blk_a(i, (i + j) % P))
            mesh.store(pe, "B", blk_b((i + j) % P, j))
            mesh.store(pe, "C", np.zeros((bm, bn)))
    paths, owners = shift_paths(ring)
    colors = assign_colors(paths, limit=mesh.wafer.colors)
    send, recv = {}, {}
    for path, (what, src, dst), c in zip(paths, owners, colors):
        route_path(mesh, path, c)
        send[(what, src)] = c
        recv[(what, dst)] = c
    for q in range(P):
        for p in range(P):
            pe = (q, p)
            ops = []
            for s in range(P):
                ops.append(Compute(flops, _mac("A", "B"), f"C += A B ({s})"))
                if s < P - 1:
                    ops += [Send(send[("A", pe)], "A"), Send(send[("B", pe)], "B"),
                            Recv(recv[("A", pe)], "A", bm * bk), Recv(recv[("B", pe)], "B", bk * bn)]
            mesh.program(pe, ops)
    report = mesh.run()
    return _gather(mesh, P, bm, bn, ring), report

