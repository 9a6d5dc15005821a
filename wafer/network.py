"""The state of a mesh simulator run, as arrays: wavelet records, queues, routes and streams.

:mod:`wafer.mesh` runs a program cycle by cycle. Most of that work is per wavelet: a wavelet enters a
router, is copied to the queue of each transmit port, leaves on a link, reaches the next router a hop
later, and at its destination is stored, added or re-sent by a streaming operation. A GEMV on a
512 x 512 grid moves tens of millions of wavelets, so that work is compiled (:mod:`wafer.wavelets`)
and works on the arrays of a :class:`Net`; what happens once per *operation* (a task starting a
``Send``, a ``Compute`` calling its NumPy function) stays in Python, in :class:`wafer.mesh._Run`.

Every queue is a linked list threaded through one pool of wavelet records (``Net.node``, ``Net.value``):

- a record is (next, color, PE, port, cycle): the next record in its queue, the wavelet's color, and,
  while it is on a link, the router it reaches, the port it enters by and the cycle it arrives;
- each PE has five output queues (one per port) and one ramp queue (from the PE into its router);
- each (PE, color) route that delivers to the PE has an inbox, for wavelets that arrive before a task
  asks for them, and the state of the streaming operation that takes them (``Net.stream``);
- wavelets on links wait in one first-in first-out list (every hop takes the same time, so they
  arrive in the order they left), and re-sent sums wait in a list per cycle due (those due more than
  ``WHEEL`` cycles ahead in a heap, by cycle and order of issue).

The buffers that streaming operations fill or read are copied into one array while they are in use
(:class:`Buffers`), and routes become tables (:func:`route_tables`), in which :func:`find_cycle` looks
for routes that would never drain.

Built in: 10_mesh
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

# a wavelet record's fields (Net.node's columns)
NEXT, COLOR, PE, PORT, TIME = range(5)
# a streaming operation's state, per route (Net.stream's columns)
TASK, KIND, INDEX, COUNT, FREE, OUT, BUF, STARTED, HEAD, TAIL, OWNER, WAITING = range(12)
RECV, REDUCE, REDUCE_SEND = 1, 2, 3
# Net.sc: the run's counters
(FREE_TOP, FLIGHT_HEAD, FLIGHT_TAIL, IN_FLIGHT, HEAP_N, SEQ, ACTIVE_N, RAMPS_N, DONE_N, LAST, TRACE_N,
 ERROR, ERROR_PE, ERROR_PORT, ERROR_COLOR, WHEEL_N) = range(16)
WHEEL = 1024  # cycles ahead that re-sent sums are kept in per-cycle lists (later ones wait in a heap)
# Net.k: the run's constants (then the four link offsets, by port)
WIDTH, COLORS, HOP, STAGE, PES, TRACING = range(6)
_OPPOSITE = np.array([0, 2, 1, 4, 3], dtype=np.int64)  # ramp, north, south, east, west


class Net(NamedTuple):
    """The state of one run, as arrays (see the module's docstring)."""
    node: np.ndarray    # (capacity, 5) int64 records
    value: np.ndarray   # (capacity,) float64, each record's value
    free: np.ndarray    # (capacity,) int64 stack of free records, FREE_TOP of them
    queue: np.ndarray   # (6 n, 2) int64 head and tail (-1: empty): output queue 5 pe + port, ramp 5 n + pe
    route: np.ndarray   # (n * colors,) int64: the route id of (pe, color), or -1
    mask: np.ndarray    # (routes, 2) int64 bit masks of receive and transmit ports
    stream: np.ndarray  # (routes, 12) int64 streaming state and inbox (WAITING: how many in it)
    active: np.ndarray  # (5 n,) int64 non-empty output queues, in the order they became so
    ramps: np.ndarray   # (n,) int64 PEs with a non-empty ramp queue, in the same sense
    flag: np.ndarray    # (6 n,) bool: the queue is in its active list
    heap: np.ndarray    # (capacity, 3) int64 re-sent sums due WHEEL cycles ahead or later: cycle, order, rec
    wheel: np.ndarray   # (WHEEL, 2) int64 head and tail of the re-sent sums due at each cycle modulo WHEEL
    links: np.ndarray   # (n, 5) int64 wavelets sent per PE and port
    trace: np.ndarray   # (rows, 4) int64 (cycle, x, y, port) of each wavelet sent on a link
    done: np.ndarray    # (n + 1, 3) int64 completed streams: task, start, end
    sc: np.ndarray      # counters
    k: np.ndarray       # constants
    arena: np.ndarray   # float64: the buffers of the streaming operations under way (see wafer.mesh)


def route_tables(n: int, colors: int, routes: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routes ((pe, color) -> (receive ports, transmit ports), as :class:`wafer.mesh.Mesh` holds them)
    as arrays: the route id of (pe, color) at ``pe * colors + color`` (-1: none), each route's receive
    and transmit ports as bit masks, and the (pe, color) of each id (ids in the routes' order)."""
    keys = np.array(list(routes), dtype=np.int64).reshape(-1, 2)
    route = np.full(n * colors, -1, dtype=np.int64)
    mask = np.zeros((max(len(keys), 1), 2), dtype=np.int64)
    if len(keys):
        route[keys[:, 0] * colors + keys[:, 1]] = np.arange(len(keys))
        ports = list(routes.values())
        bits = {p: sum(1 << q for q in p) for p in {p for pair in ports for p in pair}}  # few distinct sets
        mask[:len(keys)] = [(bits[rx], bits[tx]) for rx, tx in ports]
    return route, mask, keys


@njit(cache=True)
def find_cycle(route, mask, keys, width, colors):
    """The route ids of a cycle of routes, or an empty array. From route (pe, color), transmit port p
    leads to the neighbour's route of that color if it receives from the opposite side; a cycle means
    a wavelet would never drain. Depth first from each route in id order, ports in order."""
    offset = np.array([0, -width, width, 1, -1])
    state = np.zeros(len(keys), np.int8)  # 1 on the current path, 2 done
    stack = np.empty(len(keys), np.int64)
    port = np.empty(len(keys), np.int64)  # the next port to try from each route on the stack
    for start in range(len(keys)):
        if state[start]:
            continue
        depth, stack[0], port[0], state[start] = 1, start, 1, 1
        while depth:
            r, p = stack[depth - 1], port[depth - 1]
            while p < 5 and not (mask[r, 1] >> p) & 1:
                p += 1
            if p == 5:
                state[r] = 2
                depth -= 1
                continue
            port[depth - 1] = p + 1
            child = route[(keys[r, 0] + offset[p]) * colors + keys[r, 1]]
            if child < 0 or not (mask[child, 0] >> _OPPOSITE[p]) & 1:
                continue
            if state[child] == 1:
                first = 0
                while stack[first] != child:
                    first += 1
                loop = np.empty(depth - first + 1, np.int64)
                loop[:depth - first] = stack[first:depth]
                loop[-1] = child
                return loop
            if state[child] == 0:
                state[child], stack[depth], port[depth] = 1, child, 1
                depth += 1
    return np.empty(0, np.int64)


def new_net(width: int, height: int, colors: int, hop: int, stage: int, tables: tuple, tracing: bool) -> Net:
    """The empty state of a run on a ``width`` x ``height`` mesh with the routes ``tables`` (from
    :func:`route_tables`)."""
    n = width * height
    route, mask, keys = tables
    stream = np.full((len(mask), 12), -1, dtype=np.int64)
    stream[:len(keys), OWNER] = keys[:, 0]
    stream[:, WAITING] = 0
    k = np.array([width, colors, hop, stage, n, int(tracing), 0, -width, width, 1, -1], dtype=np.int64)
    sc = np.zeros(16, dtype=np.int64)
    sc[FLIGHT_HEAD] = sc[FLIGHT_TAIL] = -1
    net = Net(np.zeros((0, 5), np.int64), np.zeros(0), np.zeros(0, np.int64),
              np.full((6 * n, 2), -1, dtype=np.int64), route, mask, stream, np.zeros(5 * n, np.int64),
              np.zeros(n, np.int64), np.zeros(6 * n, np.bool_), np.zeros((0, 3), np.int64),
              np.full((WHEEL, 2), -1, np.int64),
              np.zeros((n, 5), np.int64), np.zeros((0, 4), np.int64), np.zeros((n + 1, 3), np.int64),
              sc, k, np.zeros(1 << 12))
    return grow(net, 1 << 12, 1 << 10 if tracing else 0)


class Buffers:
    """The PE buffers that streaming operations under way write into or read from, each copied into one
    place of ``net.arena`` (the compiled code indexes one array) while a stream uses it, and copied back
    when it ends. Python code that reads or writes a PE's memory in the meantime (a ``Compute``'s
    function, a ``Send``) calls :meth:`flush` first and :meth:`reload` after, so that it sees and makes
    the same values as if the streams wrote into the buffers directly.
    """

    def __init__(self) -> None:
        self.open: dict[int, list] = {}  # id(buffer) -> [offset, flat view, buffer, streams using it]
        self.on_pe: dict[int, list[int]] = {}  # PE -> ids of its open buffers
        self.free: dict[int, list[int]] = {}  # size -> offsets of free places of that size
        self.top = 0  # the arena's used length

    def take(self, net: Net, pe: int, buf: np.ndarray) -> tuple[Net, int, int]:
        """``net`` (grown if needed), the offset of ``buf`` in its arena, and the key that :meth:`drop`
        takes. A buffer already open (another stream on it) keeps its place."""
        key = id(buf)
        entry = self.open.get(key)
        if entry is None:
            flat = buf.reshape(-1)  # a view of a contiguous buffer (writes to a copy are lost, as before)
            places = self.free.get(flat.size)
            if places:
                offset = places.pop()
            else:
                offset, self.top = self.top, self.top + flat.size
                if self.top > len(net.arena):
                    arena = np.zeros(max(2 * len(net.arena), self.top))
                    arena[:len(net.arena)] = net.arena
                    net = net._replace(arena=arena)
            net.arena[offset:offset + flat.size] = flat
            entry = self.open[key] = [offset, flat, buf, 0]
            self.on_pe.setdefault(pe, []).append(key)
        entry[3] += 1
        return net, entry[0], key

    def drop(self, net: Net, pe: int, key: int) -> None:
        """A stream on buffer ``key`` ended: copy its values back; free its place once no stream uses it."""
        entry = self.open[key]
        offset, flat = entry[0], entry[1]
        flat[:] = net.arena[offset:offset + flat.size]
        entry[3] -= 1
        if not entry[3]:
            del self.open[key]
            self.on_pe[pe].remove(key)
            self.free.setdefault(flat.size, []).append(offset)

    def flush(self, net: Net, pe: int) -> None:
        """Copy PE ``pe``'s open buffers from the arena into its memory."""
        for key in self.on_pe.get(pe, ()):
            offset, flat = self.open[key][:2]
            flat[:] = net.arena[offset:offset + flat.size]

    def reload(self, net: Net, pe: int) -> None:
        """Copy PE ``pe``'s open buffers from its memory into the arena (after Python code changed them)."""
        for key in self.on_pe.get(pe, ()):
            offset, flat = self.open[key][:2]
            net.arena[offset:offset + flat.size] = flat


def grow(net: Net, records: int, trace_rows: int = 0) -> Net:
    """``net`` with room for at least ``records`` more free records and ``trace_rows`` more trace rows
    (arrays are replaced by larger copies; record ids stay)."""
    sc = net.sc
    if sc[FREE_TOP] < records:
        old = len(net.value)
        cap = max(2 * old, old + records)
        node = np.zeros((cap, 5), np.int64)
        node[:old] = net.node
        value = np.zeros(cap)
        value[:old] = net.value
        heap = np.zeros((cap, 3), np.int64)
        heap[:old] = net.heap
        free = np.zeros(cap, np.int64)
        top = int(sc[FREE_TOP])
        free[:top] = net.free[:top]
        added = np.arange(cap - 1, old - 1, -1, dtype=np.int64)
        free[top:top + len(added)] = added
        sc[FREE_TOP] = top + len(added)
        net = net._replace(node=node, value=value, heap=heap, free=free)
    if net.k[TRACING] and len(net.trace) - sc[TRACE_N] < trace_rows:
        trace = np.zeros((max(2 * len(net.trace), int(sc[TRACE_N]) + trace_rows), 4), np.int64)
        trace[:len(net.trace)] = net.trace
        net = net._replace(trace=trace)
    return net


