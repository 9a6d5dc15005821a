"""A cycle-level simulator of a W x H mesh of PEs that carries real values.

The machine it simulates:

- Each PE has SRAM of a fixed capacity, holding named float buffers (4 bytes per element: one
  32-bit wavelet each).
- Each PE has a router with five ports: ``ramp`` (its own PE), ``north``, ``south``, ``east``,
  ``west``. A route is set per PE per color: the ports it receives that color from, and the ports it
  transmits it to (several = multicast; ``ramp`` among them delivers a copy to the PE).
- Every directed link (including the ramp in each direction) carries at most one wavelet per cycle.
  Wavelets that want the same link wait in a first-come first-served queue at its router: contention
  between flows shows up as queueing, and queues are unbounded (real routers push back instead).
- A wavelet that leaves a router at cycle t is at the neighbour's router at t + ``hop_cycles``, and
  may leave again in that same cycle.
- A PE runs *tasks* concurrently, each a list of operations done in order: ``Send`` (asynchronous:
  the values queue at the ramp), ``Recv``, ``Reduce`` and ``ReduceSend`` (triggered by each arriving
  wavelet, at one per cycle, costing ``stage_cycles`` before the sum is stored or re-sent), and
  ``Compute`` (the FMAC unit busy for a number of cycles, then a NumPy function applied to the PE's
  memory). One FMAC unit per PE, shared by its tasks.

What it holds:

- ``PORTS``, the port numbers (``RAMP``, ``NORTH``, ...), ``STEP``, ``OPPOSITE``, and ``port``.
- A task's operations: ``Send``, ``Recv``, ``Reduce``, ``ReduceSend``, ``Compute`` (``Op``: any one;
  ``Kernel``: what a ``Compute`` applies). ``Report``: what a run measured (the cycle of the last event,
  each link's wavelet count, each operation's start and end, optionally every wavelet sent on a link).
- ``MeshError``; ``Mesh``: the grid, its routes, its PEs' memory and tasks, and ``Mesh.run``, which
  steps a ``_Run`` (the run's queues and counts) to completion.

Built in: 10_mesh
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from wafer.hardware import TOY, Wafer, positive_int

RAMP, NORTH, SOUTH, EAST, WEST = range(5)
PORTS = ("ramp", "north", "south", "east", "west")
STEP = {NORTH: (0, -1), SOUTH: (0, 1), EAST: (1, 0), WEST: (-1, 0)}  # y grows southward (row index)
OPPOSITE = {NORTH: SOUTH, SOUTH: NORTH, EAST: WEST, WEST: EAST, RAMP: RAMP}
WORD_BYTES = 4  # one wavelet: 32 bits


def port(name) -> int:
    """A port number from its name (``"east"``) or number."""
    if isinstance(name, int) and 0 <= name < 5:
        return name
    if name in PORTS:
        return PORTS.index(name)
    raise ValueError(f"port {name!r} is not one of {PORTS}")


# --- operations -------------------------------------------------------------------------------------

@dataclass
class Send:
    """Queue the values of buffer ``name`` (or of ``values``) at the ramp, on ``color``."""
    color: int
    name: str = ""
    values: np.ndarray | None = None


@dataclass
class Recv:
    """Wait for ``count`` wavelets on ``color`` and store them in buffer ``name``."""
    color: int
    name: str
    count: int


@dataclass
class Reduce:
    """For each of ``count`` wavelets arriving on ``color``: ``name[i] += value``."""
    color: int
    name: str
    count: int


@dataclass
class ReduceSend:
    """For each of ``count`` wavelets arriving on ``color``: send ``value + name[i]`` on ``out``."""
    color: int
    out: int
    name: str
    count: int


class Kernel(Protocol):
    """What a ``Compute`` applies: a function of a PE's memory (its buffers by name)."""
    def __call__(self, memory: dict[str, np.ndarray], /) -> object: ...


@dataclass
class Compute:
    """Keep the FMAC unit busy for ``cycles``, then call ``fn(memory)`` (a dict of the PE's buffers)."""
    cycles: int
    fn: Kernel | None = None
    label: str = "compute"


Op = Send | Recv | Reduce | ReduceSend | Compute
Stream = Recv | Reduce | ReduceSend  # the operations that take wavelets as they arrive


@dataclass
class _Task:
    pe: int
    ops: list[Op]
    pos: int = 0
    index: int = 0  # wavelets handled by the current streaming op
    started: int = 0
    free: int = 0  # the first cycle at which the current streaming op can take another wavelet
    buf: np.ndarray = field(default_factory=lambda: np.empty(0))  # the current streaming op's buffer, flat


@dataclass
class Report:
    """What a run measured. ``link_wavelets[y, x, p]`` counts wavelets sent from PE (x, y) through
    port p (0 ramp = delivered to the PE, 1-4 north, south, east, west).

    Built in: 10_mesh
    """
    cycles: int
    link_wavelets: np.ndarray
    timeline: list[tuple[int, int, str, int, int]] = field(default_factory=list)  # (x, y, label, start, end)
    trace: list[tuple[int, int, int, int]] | None = None  # (cycle, x, y, port) per wavelet sent on a link
    colors: int = 0  # the most colors any one PE routed

    @property
    def wavelet_hops(self) -> int:
        """Wavelets moved between routers (ramp deliveries not counted)."""
        return int(self.link_wavelets[:, :, 1:].sum())

    def then(self, other: Report) -> Report:
        """This run followed by ``other`` (the phases of one algorithm)."""
        shifted = [(x, y, label, s + self.cycles, e + self.cycles) for x, y, label, s, e in other.timeline]
        return Report(self.cycles + other.cycles, self.link_wavelets + other.link_wavelets,
                      self.timeline + shifted, colors=max(self.colors, other.colors))


class MeshError(ValueError):
    """A program that the mesh cannot run: a bad route, too many colors, SRAM overflow, a stall."""


class Mesh:
    """A ``width`` x ``height`` grid with the per-PE facts of ``wafer`` (TOY by default: WSE-2's PE).

    Built in: 10_mesh
    """

    def __init__(self, width: int, height: int, wafer: Wafer = TOY):
        positive_int("width", width), positive_int("height", height)
        self.width, self.height, self.wafer = width, height, wafer
        self.hop_cycles, self.stage_cycles = wafer.hop_cycles, wafer.stage_cycles
        # (PE, color) -> (the ports it is received from, the ports it is sent to)
        self.routes: dict[tuple[int, int], tuple[frozenset[int], tuple[int, ...]]] = {}
        self.memory: list[dict[str, np.ndarray]] = [{} for _ in range(width * height)]
        self.tasks: list[_Task] = []

    # -- setup ---------------------------------------------------------------------------------------
    def _pe(self, pe) -> int:
        x, y = pe
        if not (0 <= x < self.width and 0 <= y < self.height):
            raise MeshError(f"PE {tuple(pe)} is outside the {self.width} x {self.height} grid")
        return y * self.width + x

    def xy(self, index: int) -> tuple[int, int]:
        return index % self.width, index // self.width

    def route(self, pe, color: int, rx, tx) -> None:
        """At ``pe``, accept ``color`` from the ports ``rx`` and copy it to every port in ``tx``."""
        i = self._pe(pe)
        if not isinstance(color, int) or isinstance(color, bool) or color < 0:
            raise MeshError(f"color {color!r} at PE {tuple(pe)} must be an integer in "
                            f"0..{self.wafer.colors - 1}")
        if color >= self.wafer.colors:
            raise MeshError(f"PE {tuple(pe)} needs color {color}, but a {self.wafer.name} PE routes at most "
                            f"{self.wafer.colors} colors (0..{self.wafer.colors - 1})")
        rx = frozenset(port(p) for p in ([rx] if isinstance(rx, (str, int)) else rx))
        tx = tuple(sorted({port(p) for p in ([tx] if isinstance(tx, (str, int)) else tx)}))
        if not rx or not tx:
            raise MeshError(f"route of color {color} at PE {tuple(pe)} needs at least one receive and one "
                            f"transmit port")
        for p in [p for p in tx if p != RAMP]:
            nx, ny = pe[0] + STEP[p][0], pe[1] + STEP[p][1]
            if not (0 <= nx < self.width and 0 <= ny < self.height):
                raise MeshError(f"route of color {color} at PE {tuple(pe)} transmits {PORTS[p]}, which "
                                f"leaves the {self.width} x {self.height} grid")
        self.routes[(i, color)] = (rx, tx)

    def clear_routes(self) -> None:
        """Forget every route (between the phases of an algorithm); memory is kept."""
        self.routes.clear()

    def store(self, pe, name: str, values) -> None:
        """Put ``values`` (float64 in the simulator; 4 bytes each in the SRAM count) in PE memory."""
        i = self._pe(pe)
        values = np.array(values, dtype=np.float64)
        if values.ndim < 2:
            values = values.reshape(-1)
        used = self.sram_used(pe) - self.memory[i].get(name, np.empty(0)).size * WORD_BYTES
        need = values.size * WORD_BYTES
        cap = self.wafer.sram_bytes_per_pe
        if used + need > cap:
            raise MeshError(f"SRAM overflow at PE {tuple(pe)}: storing {name!r} ({need:,} bytes) on top of "
                            f"{used:,} bytes needs {used + need:,} bytes, over its {cap:,}")
        self.memory[i][name] = values

    def load(self, pe, name: str) -> np.ndarray:
        i = self._pe(pe)
        if name not in self.memory[i]:
            raise KeyError(f"PE {tuple(pe)} has no buffer {name!r}; it has {sorted(self.memory[i])}")
        return self.memory[i][name]

    def sram_used(self, pe) -> int:
        return sum(v.size for v in self.memory[self._pe(pe)].values()) * WORD_BYTES

    def program(self, pe, ops: Sequence[Op]) -> None:
        """Add a task (a list of operations, done in order) to ``pe``; a PE's tasks run concurrently."""
        self.tasks.append(_Task(self._pe(pe), list(ops)))

    # -- checks ----------------------------------------------------------------------------------------
    def colors_used(self) -> np.ndarray:
        """(height, width) array: how many colors each PE routes."""
        counts = np.zeros(self.width * self.height, dtype=int)
        for i, _ in self.routes:
            counts[i] += 1
        return counts.reshape(self.height, self.width)

    def check(self) -> None:
        """Refuse routes of one color that form a cycle. (Colors beyond what a PE can route are refused
        by :meth:`route` already.)"""
        # A cycle: following transmit ports from (pe, color) comes back to it, so a wavelet never drains.
        nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for (i, color), (_, tx) in self.routes.items():
            x, y = self.xy(i)
            nxt[(i, color)] = []
            for p in [p for p in tx if p != RAMP]:
                j = self._pe((x + STEP[p][0], y + STEP[p][1]))
                r = self.routes.get((j, color))
                if r is not None and OPPOSITE[p] in r[0]:
                    nxt[(i, color)].append((j, color))
        state: dict[tuple[int, int], int] = {}  # 1 on the current path, 2 done
        for start in nxt:
            if start in state:
                continue
            stack = [(start, iter(nxt[start]))]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                child = next(it, None)
                if child is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(child) == 1:
                    path = [node for node, _ in stack]
                    loop = path[path.index(child):] + [child]
                    pes = " -> ".join(str(self.xy(i)) for i, _ in loop)
                    raise MeshError(f"the routes of color {child[1]} form a cycle through PEs {pes}: a "
                                    f"wavelet on it would never drain")
                elif child not in state:
                    state[child] = 1
                    stack.append((child, iter(nxt[child])))

    # -- the simulation ----------------------------------------------------------------------------------
    def run(self, trace: bool = False, max_cycles: int = 10**9) -> Report:
        """Run every task to completion; return what happened. Tasks are consumed; memory and routes
        stay."""
        self.check()
        tasks, self.tasks = self.tasks, []
        return _Run(self, tasks, trace).run(max_cycles)


class _Run:
    """One run of a mesh's tasks, cycle by cycle: re-sent sums join their ramps, operations whose time
    is up end, each wavelet at a router is copied by its color's route to the queue of every transmit
    port, and each non-empty queue sends one wavelet on. Cycles in which nothing moves are skipped."""

    def __init__(self, mesh: Mesh, tasks: list[_Task], trace: bool):
        self.mesh, self.tasks = mesh, tasks
        w, n = mesh.width, mesh.width * mesh.height
        self.width, self.hop, self.stage = w, mesh.hop_cycles, mesh.stage_cycles
        # PE i's port p leads to PE i + offset[p] (routes that would leave the grid are refused)
        self.offset = {p: dx + dy * w for p, (dx, dy) in STEP.items()}
        self.links = np.zeros((n, 5), dtype=np.int64)
        # wavelets, (color, value), queued from each PE to its router and at each router's output port
        self.ramp_out: dict[int, deque[tuple[int, float]]] = defaultdict(deque)
        self.out: dict[tuple[int, int], deque[tuple[int, float]]] = defaultdict(deque)
        self.ramp_active: set[int] = set()
        self.out_active: set[tuple[int, int]] = set()
        # by cycle: (PE, port, color, value) reaching a router, (PE, color, value) re-sent onto a ramp
        self.arrivals: dict[int, list[tuple[int, int, int, float]]] = defaultdict(list)
        self.injections: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
        self.times: list[int] = []  # heap of cycles with arrivals or injections
        self.timers: list[tuple[int, int, _Task, bool]] = []  # heap of (cycle, seq, task, a Compute ends)
        self.inbox: dict[tuple[int, int], deque[float]] = defaultdict(deque)  # (PE, color) -> not yet taken
        self.waiting: dict[tuple[int, int], _Task] = {}  # (PE, color) -> the task streaming it in
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

    def timer(self, t: int, task: _Task, computed: bool) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (t, self.seq, task, computed))

    # -- tasks -----------------------------------------------------------------------------------------
    def advance(self, task: _Task, t: int) -> None:
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

    def send(self, task: _Task, op: Send, t: int) -> None:
        values = np.ravel(op.values if op.values is not None else self.mesh.memory[task.pe][op.name])
        q = self.ramp_out[task.pe]
        q.extend((op.color, v) for v in values.tolist())
        if q:
            self.ramp_active.add(task.pe)
        self.timeline.append((task.pe, f"send c{op.color}", t, t + values.size))

    def stream(self, task: _Task, op: Stream, t: int) -> None:
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

    def handle(self, task: _Task, value: float, t: int) -> None:
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
                self.ramp_active.discard(i)
            entering.append((i, RAMP, color, value))
        entering.extend(moving)
        compiled, out_active = self.compiled, self.out_active
        for i, came_from, color, value in entering:
            r = compiled.get((i, color))
            if r is None or came_from not in r[0]:
                raise self.misrouted(i, came_from, color, t)
            for key, q in r[1]:
                q.append((color, value))
                out_active.add(key)

    def transmit(self, t: int) -> None:
        """Every non-empty output queue sends one wavelet: to its PE, or toward the neighbour."""
        out, out_active, links, waiting, sent = self.out, self.out_active, self.links, self.waiting, self.sent
        w, arrive = self.width, t + self.hop
        for key in list(out_active):
            q = out[key]
            color, value = q.popleft()
            if not q:
                out_active.discard(key)
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
                self.ramp_active.add(i)
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
