"""The mesh simulator's first implementation, one wavelet at a time in Python, kept as an independent
reference: tests/test_mesh_engine.py runs programs through it and through ``wafer.mesh`` and asks for
the same cycles, link counts, timeline, trace and memory, to the bit.

It is the first edition's ``wafer.mesh._Run`` with one change: its sets of active queues are
insertion-ordered (dicts), so that queues send in the order they became non-empty, the order the
compiled simulator defines. (With plain sets the order was Python's hash order of the keys.)
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from wafer.mesh import (
    OPPOSITE,
    PORTS,
    RAMP,
    STEP,
    Compute,
    Mesh,
    MeshError,
    Recv,
    Reduce,
    Report,
    Send,
    Stream,
)


@dataclass
class Task:
    pe: int
    ops: list
    pos: int = 0
    index: int = 0
    started: int = 0
    free: int = 0
    buf: np.ndarray = field(default_factory=lambda: np.empty(0))


def run_reference(mesh: Mesh, trace: bool = False, max_cycles: int = 10**9) -> Report:
    """``mesh.run`` by the reference: run every task to completion (tasks are consumed)."""
    mesh.check()
    tasks = [Task(t.pe, list(t.ops)) for t in mesh.tasks]
    mesh.tasks = []
    return ReferenceRun(mesh, tasks, trace).run(max_cycles)


class ReferenceRun:
    """One run of a mesh's tasks, cycle by cycle: re-sent sums join their ramps, operations whose time
    is up end, each wavelet at a router is copied by its color's route to the queue of every transmit
    port, and each non-empty queue sends one wavelet on. Cycles in which nothing moves are skipped."""

    def __init__(self, mesh: Mesh, tasks: list, trace: bool):
        self.mesh, self.tasks = mesh, tasks
        w, n = mesh.width, mesh.width * mesh.height
        self.width, self.hop, self.stage = w, mesh.hop_cycles, mesh.stage_cycles
        # PE i's port p leads to PE i + offset[p] (routes that would leave the grid are refused)
        self.offset = {p: dx + dy * w for p, (dx, dy) in STEP.items()}
        self.links = np.zeros((n, 5), dtype=np.int64)
        # wavelets, (color, value), queued from each PE to its router and at each router's output port
        self.ramp_out: dict[int, deque[tuple[int, float]]] = defaultdict(deque)
        self.out: dict[tuple[int, int], deque[tuple[int, float]]] = defaultdict(deque)
        self.ramp_active: dict[int, None] = {}  # insertion-ordered sets
        self.out_active: dict[tuple[int, int], None] = {}
        # by cycle: (PE, port, color, value) reaching a router, (PE, color, value) re-sent onto a ramp
        self.arrivals: dict[int, list[tuple[int, int, int, float]]] = defaultdict(list)
        self.injections: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
        self.times: list[int] = []  # heap of cycles with arrivals or injections
        self.timers: list = []  # heap of (cycle, seq, task, a Compute ends)
        self.inbox: dict[tuple[int, int], deque[float]] = defaultdict(deque)  # (PE, color) -> not yet taken
        self.waiting: dict[tuple[int, int], Task] = {}  # (PE, color) -> the task streaming it in
        self.fmac_free = [0] * n
        self.timeline: list[tuple[int, str, int, int]] = []  # (PE, label, start, end)
        self.sent: list[tuple[int, int, int, int]] | None = [] if trace else None
        self.seq, self.last = 0, 0  # the timers' tie-breaker; the cycle of the last event
        # each route with the output queues it feeds, looked up once per wavelet
        self.compiled = {key: (rx, [((key[0], p), self.out[(key[0], p)]) for p in tx])
                         for key, (rx, tx) in mesh.routes.items()}

    def at(self, table: dict[int, list], t: int, item: tuple) -> None:
        if t not in table:
            heapq.heappush(self.times, t)
        table[t].append(item)

    def timer(self, t: int, task: Task, computed: bool) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (t, self.seq, task, computed))

    # -- tasks -----------------------------------------------------------------------------------------
    def advance(self, task: Task, t: int) -> None:
        """Start ``task``'s operations from its current one, until one has to wait."""
        while task.pos < len(task.ops):
            op = task.ops[task.pos]
            if isinstance(op, Send):
                self.send(task, op, t)
                task.pos += 1
            elif isinstance(op, Compute):
                start = max(t, self.fmac_free[task.pe])
                self.fmac_free[task.pe] = end = start + int(op.cycles)
                task.started = start
                self.timer(end, task, True)
                return
            else:
                self.stream(task, op, t)
                return

    def send(self, task: Task, op: Send, t: int) -> None:
        values = np.ravel(op.values if op.values is not None else self.mesh.memory[task.pe][op.name])
        q = self.ramp_out[task.pe]
        q.extend((op.color, v) for v in values.tolist())
        if q:
            self.ramp_active[task.pe] = None
        self.timeline.append((task.pe, f"send c{op.color}", t, t + values.size))

    def stream(self, task: Task, op: Stream, t: int) -> None:
        """Start a streaming op: take what already arrived, then wait for the rest."""
        mesh, mem = self.mesh, self.mesh.memory[task.pe]
        key = (task.pe, op.color)
        if key in self.waiting:
            x, y = mesh.xy(task.pe)
            raise MeshError(f"PE ({x}, {y}) has two tasks receiving color {op.color} at once")
        if isinstance(op, Recv):
            if op.name not in mem or mem[op.name].size != op.count:
                mesh.store(mesh.xy(task.pe), op.name, np.zeros(op.count))
        elif op.name not in mem or mem[op.name].size < op.count:
            x, y = mesh.xy(task.pe)
            raise MeshError(f"PE ({x}, {y}): {type(op).__name__} of {op.count} wavelets needs a buffer "
                            f"{op.name!r} of at least that size")
        task.index, task.started, task.free = 0, t, t
        task.buf = mem[op.name].reshape(-1)  # a view: writes land in the PE's buffer
        self.waiting[key] = task
        box = self.inbox[key]
        while box and key in self.waiting:
            self.handle(task, box.popleft(), t)

    def handle(self, task: Task, value: float, t: int) -> None:
        """A wavelet of ``value`` reaches ``task``'s streaming op at cycle ``t``."""
        op = cast(Stream, task.ops[task.pos])
        buf = task.buf
        i = task.index
        if isinstance(op, Recv):  # already written to memory as it came off the ramp
            now = t
            buf[i] = value
        else:  # an add per wavelet, one per cycle: wavelets that waited in the inbox queue up
            now = max(t, task.free)
            task.free = now + 1
            if isinstance(op, Reduce):
                buf[i] += value
            else:
                self.at(self.injections, now + self.stage, (task.pe, op.out, value + buf[i]))
        task.index = i + 1
        if task.index == op.count:
            del self.waiting[(task.pe, op.color)]
            done = now if isinstance(op, Recv) else now + self.stage
            self.timeline.append((task.pe, f"{type(op).__name__.lower()} c{op.color}", task.started, done))
            task.pos += 1
            if done == t:
                self.advance(task, t)
            else:
                self.timer(done, task, False)

    # -- one cycle ---------------------------------------------------------------------------------------
    def fire_timers(self, t: int) -> None:
        """Finish the Computes and start the tasks whose time is ``t``."""
        while self.timers and self.timers[0][0] == t:
            _, _, task, computed = heapq.heappop(self.timers)
            if computed:
                op = cast(Compute, task.ops[task.pos])
                if op.fn is not None:
                    op.fn(self.mesh.memory[task.pe])
                self.timeline.append((task.pe, op.label, task.started, t))
                task.pos += 1
            self.advance(task, t)
            self.last = t

    def enter(self, t: int, moving: Sequence[tuple[int, int, int, float]]) -> None:
        """Wavelets reach their routers, from each PE's ramp first, then from the links in arrival
        order; each route copies its wavelet into the queues of its transmit ports."""
        entering = []
        for i in list(self.ramp_active):
            q = self.ramp_out[i]
            color, value = q.popleft()
            if not q:
                self.ramp_active.pop(i, None)
            entering.append((i, RAMP, color, value))
        entering.extend(moving)
        compiled, out_active = self.compiled, self.out_active
        for i, came_from, color, value in entering:
            r = compiled.get((i, color))
            if r is None or came_from not in r[0]:
                raise self.misrouted(i, came_from, color, t)
            for key, q in r[1]:
                q.append((color, value))
                out_active[key] = None

    def transmit(self, t: int) -> None:
        """Every non-empty output queue sends one wavelet: to its PE, or toward the neighbour."""
        out, out_active, links, waiting, sent = self.out, self.out_active, self.links, self.waiting, self.sent
        w, arrive = self.width, t + self.hop
        for key in list(out_active):
            q = out[key]
            color, value = q.popleft()
            if not q:
                out_active.pop(key, None)
            i, p = key
            links[i, p] += 1
            self.last = t
            if p == RAMP:
                task = waiting.get((i, color))
                if task is None:
                    self.inbox[(i, color)].append(value)
                else:
                    self.handle(task, value, t)
            else:
                if sent is not None:
                    sent.append((t, i % w, i // w, p))
                self.at(self.arrivals, arrive, (i + self.offset[p], OPPOSITE[p], color, value))

    def misrouted(self, i: int, came_from: int, color: int, t: int) -> MeshError:
        r = self.mesh.routes.get((i, color))
        x, y = self.mesh.xy(i)
        have = "no route" if r is None else f"a route receiving from {[PORTS[p] for p in sorted(r[0])]}"
        return MeshError(f"a wavelet of color {color} reached PE ({x}, {y}) from {PORTS[came_from]} at "
                         f"cycle {t}, but the PE has {have} for that color")

    def run(self, max_cycles: int) -> Report:
        for task in self.tasks:
            self.advance(task, 0)
        times, timers = self.times, self.timers
        t = 0
        while True:
            if t > max_cycles:
                raise MeshError(f"the run passed max_cycles={max_cycles}")
            while times and times[0] <= t:
                heapq.heappop(times)
            for i, color, value in self.injections.pop(t, ()):
                self.ramp_out[i].append((color, value))
                self.ramp_active[i] = None
            moving = self.arrivals.pop(t, ())
            self.fire_timers(t)
            self.enter(t, moving)
            self.transmit(t)
            if self.ramp_active or self.out_active:
                t += 1
                continue
            if not times and not timers:
                break
            t = min(times[:1] + [c for c, *_ in timers[:1]])
        return self.report()

    def report(self) -> Report:
        stuck = [task for task in self.tasks if task.pos < len(task.ops)]
        if stuck:
            task = stuck[0]
            op, (x, y) = cast(Stream, task.ops[task.pos]), self.mesh.xy(task.pe)  # a Compute always ends
            more = f", and {len(stuck) - 1} more tasks wait too" if len(stuck) > 1 else ""
            raise MeshError(f"the run stalled at cycle {self.last}: PE ({x}, {y}) waits in "
                            f"{type(op).__name__} for color {op.color} ({task.index} of {op.count} "
                            f"wavelets arrived){more}")
        w, mesh = self.width, self.mesh
        timeline = [(i % w, i // w, label, s, e) for i, label, s, e in self.timeline]
        last = max([self.last] + [e for *_, e in timeline])
        colors = int(mesh.colors_used().max(initial=0))
        return Report(last, self.links.reshape(mesh.height, w, 5), timeline, self.sent, colors)
