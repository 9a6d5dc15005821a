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
  Within a cycle, ramps enter before links, wavelets arriving on links enter in the order they left,
  and queues send in the order they became non-empty (the first edition's simulator used Python's
  set order there, which changed a few contended runs by a cycle or so).
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

import gc
import heapq
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from wafer import network, wavelets
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


_PORT_SETS: dict = {}  # a port argument ("east", 3, ["ramp", "west"]) -> its sorted port numbers


def _port_set(ports) -> tuple[int, ...]:
    key = ports if isinstance(ports, (str, int)) else tuple(ports)
    found = _PORT_SETS.get(key)
    if found is None:
        found = _PORT_SETS[key] = tuple(sorted({port(p) for p in ([key] if isinstance(key, (str, int))
                                                                   else key)}))
    return found


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
    started: int = 0
    number: int = 0  # its place in the run's list of tasks


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
        rx, tx = _port_set(rx), _port_set(tx)
        if not rx or not tx:
            raise MeshError(f"route of color {color} at PE {tuple(pe)} needs at least one receive and one "
                            f"transmit port")
        for p in [p for p in tx if p != RAMP]:
            nx, ny = pe[0] + STEP[p][0], pe[1] + STEP[p][1]
            if not (0 <= nx < self.width and 0 <= ny < self.height):
                raise MeshError(f"route of color {color} at PE {tuple(pe)} transmits {PORTS[p]}, which "
                                f"leaves the {self.width} x {self.height} grid")
        self.routes[(i, color)] = (frozenset(rx), tx)

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
        pes = np.fromiter((i for i, _ in self.routes), dtype=np.int64, count=len(self.routes))
        return np.bincount(pes, minlength=self.width * self.height).reshape(self.height, self.width)

    def check(self, tables: tuple | None = None) -> None:
        """Refuse routes of one color that form a cycle. (Colors beyond what a PE can route are refused
        by :meth:`route` already.) ``tables``: the routes as :func:`wafer.network.route_tables` gives
        them, if already made."""
        # A cycle: following transmit ports from (pe, color) comes back to it, so a wavelet never drains.
        n, colors = self.width * self.height, self.wafer.colors
        route, mask, keys = tables or network.route_tables(n, colors, self.routes)
        loop = network.find_cycle(route, mask, keys, self.width, colors)
        if len(loop):
            pes = " -> ".join(str(self.xy(int(keys[r, 0]))) for r in loop)
            raise MeshError(f"the routes of color {int(keys[loop[0], 1])} form a cycle through PEs {pes}: a "
                            f"wavelet on it would never drain")

    # -- the simulation ----------------------------------------------------------------------------------
    def run(self, trace: bool = False, max_cycles: int = 10**9) -> Report:
        """Run every task to completion; return what happened. Tasks are consumed; memory and routes
        stay."""
        tables = network.route_tables(self.width * self.height, self.wafer.colors, self.routes)
        self.check(tables)
        tasks, self.tasks = self.tasks, []
        with paused_gc():
            return _Run(self, tasks, trace, tables).run(max_cycles)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cycle collector off for the block: building or running a large mesh program makes
    millions of small objects that form no cycles, and each collection would walk all of them."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class _Run:
    """One run of a mesh's tasks, cycle by cycle: re-sent sums join their ramps, operations whose time
    is up end, each wavelet at a router is copied by its color's route to the queue of every transmit
    port, and each non-empty queue sends one wavelet on. Cycles in which nothing moves are skipped.

    The per-wavelet work is :mod:`wafer.network`'s (compiled); what happens once per operation is
    here: a task starting a ``Send`` or a streaming operation, a ``Compute`` ending, a task moving on."""

    def __init__(self, mesh: Mesh, tasks: list[_Task], trace: bool, tables: tuple):
        self.mesh, self.tasks = mesh, tasks
        self.net = network.new_net(mesh.width, mesh.height, mesh.wafer.colors, mesh.hop_cycles,
                                   mesh.stage_cycles, tables, trace)
        self.buffers = network.Buffers()
        self.using: dict[int, int] = {}  # task number -> the buffer its streaming op uses
        self.colors = mesh.wafer.colors
        self.labels: dict[tuple[type, int], str] = {}  # (op type, color) -> its timeline label
        for j, task in enumerate(tasks):
            task.number = j
        self.timers: list[tuple[int, int, _Task, bool]] = []  # heap of (cycle, seq, task, a Compute ends)
        self.fmac_free = [0] * (mesh.width * mesh.height)
        self.timeline: list[tuple[int, str, int, int]] = []  # (PE, label, start, end)
        self.seq, self.last = 0, 0  # the timers' tie-breaker; the cycle of the last event

    def timer(self, t: int, task: _Task, computed: bool) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (t, self.seq, task, computed))

    # -- tasks -----------------------------------------------------------------------------------------
    def advance(self, task: _Task, t: int) -> None:
        """Start ``task``'s operations from its current one, until one has to wait."""
        ops = task.ops
        while task.pos < len(ops):
            op = ops[task.pos]
            if type(op) is Send:
                self.send(task, op, t)
                task.pos += 1
            elif type(op) is Compute:
                start = max(t, self.fmac_free[task.pe])
                self.fmac_free[task.pe] = end = start + int(op.cycles)
                task.started = start
                self.timer(end, task, True)
                return
            else:
                self.stream(task, cast(Stream, op), t)
                return

    def send(self, task: _Task, op: Send, t: int) -> None:
        self.buffers.flush(self.net, task.pe)
        values = np.ravel(op.values if op.values is not None else self.mesh.memory[task.pe][op.name])
        values = values.astype(np.float64, copy=False)
        self.net = network.grow(self.net, values.size)
        wavelets.send(self.net, task.pe, op.color, values)
        self.timeline.append((task.pe, f"send c{op.color}", t, t + values.size))

    def stream(self, task: _Task, op: Stream, t: int) -> None:
        """Start a streaming op: take what already arrived, then wait for the rest."""
        pe, net, color, count = task.pe, self.net, op.color, op.count
        r = net.route.item(pe * self.colors + color) if color < self.colors else -1
        if r >= 0 and net.stream.item(r, network.TASK) >= 0:
            raise MeshError(f"PE {self.mesh.xy(pe)} has two tasks receiving color {color} at once")
        mem = self.mesh.memory[pe]
        buf = mem.get(op.name)
        kind = _KINDS[type(op)]
        if kind == network.RECV:
            if buf is None or buf.size != count:
                self.mesh.store(self.mesh.xy(pe), op.name, np.zeros(count))
                buf = mem[op.name]
        elif buf is None or buf.size < count:
            raise MeshError(f"PE {self.mesh.xy(pe)}: {type(op).__name__} of {count} wavelets needs a buffer "
                            f"{op.name!r} of at least that size")
        if r < 0 or not net.mask.item(r, 1) & 1:  # nothing can reach it: the run will stall
            return
        j = task.number
        self.net, offset, self.using[j] = self.buffers.take(net, pe, buf)
        out = op.out if kind == network.REDUCE_SEND else -1  # type: ignore[union-attr]
        if net.stream.item(r, network.WAITING):  # take what already arrived (compiled)
            wavelets.start_stream(self.net, r, j, kind, count, out, offset, t)
            self.completions(t)
        else:  # nothing to take yet: only set the stream's state
            self.net.stream[r, :network.STARTED + 1] = j, kind, 0, count, t, out, offset, t

    def completions(self, t: int) -> None:
        """Move on the tasks whose streaming operations the last compiled call completed."""
        sc = self.net.sc
        n = sc.item(network.DONE_N)
        if not n:
            return
        done = self.net.done[:n].tolist()
        sc[network.DONE_N] = 0
        tasks, labels, timeline, drop = self.tasks, self.labels, self.timeline, self.buffers.drop
        for j, started, end in done:
            task = tasks[j]
            drop(self.net, task.pe, self.using.pop(j))
            op = cast(Stream, task.ops[task.pos])
            label = labels.get((type(op), op.color))
            if label is None:
                label = labels[(type(op), op.color)] = f"{type(op).__name__.lower()} c{op.color}"
            timeline.append((task.pe, label, started, end))
            task.pos += 1
            if end == t:
                self.advance(task, t)
            else:
                self.timer(end, task, False)

    # -- one cycle ---------------------------------------------------------------------------------------
    def fire_timers(self, t: int) -> None:
        """Finish the Computes and start the tasks whose time is ``t``."""
        while self.timers and self.timers[0][0] == t:
            _, _, task, computed = heapq.heappop(self.timers)
            if computed:
                op = cast(Compute, task.ops[task.pos])
                if op.fn is not None:
                    self.buffers.flush(self.net, task.pe)
                    op.fn(self.mesh.memory[task.pe])
                    self.buffers.reload(self.net, task.pe)
                self.timeline.append((task.pe, op.label, task.started, t))
                task.pos += 1
            self.advance(task, t)
            self.last = t

    def misrouted(self, i: int, came_from: int, color: int, t: int) -> MeshError:
        r = self.mesh.routes.get((i, color))
        x, y = self.mesh.xy(i)
        have = "no route" if r is None else f"a route receiving from {[PORTS[p] for p in sorted(r[0])]}"
        return MeshError(f"a wavelet of color {color} reached PE ({x}, {y}) from {PORTS[came_from]} at "
                         f"cycle {t}, but the PE has {have} for that color")

    def next_cycle(self, t: int) -> int | None:
        """The next cycle at which anything happens after idle cycle ``t``, or None when nothing will."""
        net, sc = self.net, self.net.sc
        times = [c for c, *_ in self.timers[:1]]
        if sc[network.FLIGHT_HEAD] >= 0:
            times.append(int(net.node[sc[network.FLIGHT_HEAD], network.TIME]))
        if sc[network.WHEEL_N] or sc[network.HEAP_N]:
            times.append(wavelets.next_resend(net, t))
        return min(times) if times else None

    def run(self, max_cycles: int) -> Report:
        for task in self.tasks:
            self.advance(task, 0)
        sc = self.net.sc
        t: int | None = 0
        while t is not None:
            if t > max_cycles:
                raise MeshError(f"the run passed max_cycles={max_cycles}")
            wavelets.inject(self.net, t)
            self.fire_timers(t)
            # room for the copies a multicast makes of each entering wavelet, and a trace row for each
            # queue that may send (those sending now, and those the entering wavelets wake)
            entering = int(sc[network.RAMPS_N] + sc[network.IN_FLIGHT])
            net = self.net = network.grow(self.net, 4 * entering, int(sc[network.ACTIVE_N]) + 5 * entering)
            sc = net.sc
            if not wavelets.step(net, t):
                pe, came_from, color = (int(v) for v in sc[network.ERROR_PE:network.ERROR_COLOR + 1])
                raise self.misrouted(pe, came_from, color, t)
            self.completions(t)
            t = t + 1 if sc[network.RAMPS_N] or sc[network.ACTIVE_N] else self.next_cycle(t)
        return self.report()

    def report(self) -> Report:
        for pe in self.buffers.on_pe:  # the buffers of streams that never ended (a stall), as they are
            self.buffers.flush(self.net, pe)
        stuck = [task for task in self.tasks if task.pos < len(task.ops)]
        self.last = max(self.last, int(self.net.sc[network.LAST]))
        if stuck:
            task = stuck[0]
            op, (x, y) = cast(Stream, task.ops[task.pos]), self.mesh.xy(task.pe)  # a Compute always ends
            index = self.stream_index(task, op)
            more = f", and {len(stuck) - 1} more tasks wait too" if len(stuck) > 1 else ""
            raise MeshError(f"the run stalled at cycle {self.last}: PE ({x}, {y}) waits in "
                            f"{type(op).__name__} for color {op.color} ({index} of {op.count} "
                            f"wavelets arrived){more}")
        w, mesh, net = self.mesh.width, self.mesh, self.net
        timeline = [(i % w, i // w, label, s, e) for i, label, s, e in self.timeline]
        last = max([self.last] + [e for *_, e in timeline])
        trace = [tuple(row) for row in net.trace[:int(net.sc[network.TRACE_N])].tolist()] \
            if net.k[network.TRACING] else None
        colors = int(mesh.colors_used().max(initial=0))
        return Report(last, net.links.reshape(mesh.height, w, 5), timeline, trace, colors)

    def stream_index(self, task: _Task, op: Stream) -> int:
        """How many wavelets the stalled streaming op ``op`` of ``task`` has taken."""
        r = int(self.net.route[task.pe * self.mesh.wafer.colors + op.color]) \
            if op.color < self.mesh.wafer.colors else -1
        if r >= 0 and self.net.stream[r, network.TASK] == task.number:
            return int(self.net.stream[r, network.INDEX])
        return 0


_KINDS = {Recv: network.RECV, Reduce: network.REDUCE, ReduceSend: network.REDUCE_SEND}
