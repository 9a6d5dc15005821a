"""The mesh simulator's per-wavelet work, compiled by numba: queues, routers, links and streaming
operations, on the arrays of a :class:`wafer.network.Net` (whose docstring describes them).

The order of events within a cycle is that of the simulator's definition in :mod:`wafer.mesh`: queued
re-sent sums join their ramps (:func:`inject`); each ramp with a wavelet puts one into its router,
then wavelets arriving on links enter in the order they left, and each route copies its wavelet to
its transmit ports' queues; every non-empty output queue sends one wavelet, in the order the queues
became non-empty (:func:`step`). A wavelet reaching its PE is stored, added, or added and re-sent by
the streaming operation waiting for it (:func:`start_stream` starts one); completed ones are written
to ``Net.done`` for :mod:`wafer.mesh` to move their tasks on.

With ``NUMBA_DISABLE_JIT=1`` the same functions run as plain Python (slowly).

Built in: 10_mesh
"""

from __future__ import annotations

import numpy as np
from numba import njit

from wafer.network import (
    ACTIVE_N,
    BUF,
    COLOR,
    COLORS,
    COUNT,
    DONE_N,
    ERROR,
    ERROR_COLOR,
    ERROR_PE,
    ERROR_PORT,
    FLIGHT_HEAD,
    FLIGHT_TAIL,
    FREE,
    FREE_TOP,
    HEAD,
    HEAP_N,
    HOP,
    IN_FLIGHT,
    INDEX,
    KIND,
    LAST,
    NEXT,
    OUT,
    OWNER,
    PE,
    PES,
    PORT,
    RAMPS_N,
    RECV,
    REDUCE,
    SEQ,
    STAGE,
    STARTED,
    TASK,
    TIME,
    TRACE_N,
    TRACING,
    WAITING,
    WHEEL,
    WHEEL_N,
    WIDTH,
    Net,
)

_OPPOSITE = np.array([0, 2, 1, 4, 3], dtype=np.int64)  # ramp, north, south, east, west

# --- records and queues ------------------------------------------------------------------------------
# The compiled functions take the arrays they use one by one: numba types each array argument quickly
# but a tuple of arrays slowly, and small helpers inlined into one loop keep every array in a register.

@njit(cache=True, inline="always")
def _alloc(free, sc):
    sc[FREE_TOP] -= 1
    return free[sc[FREE_TOP]]


@njit(cache=True, inline="always")
def _release(free, sc, rec):
    free[sc[FREE_TOP]] = rec
    sc[FREE_TOP] += 1


@njit(cache=True, inline="always")
def _push(node, table, row, head, rec):
    """Append record ``rec`` to the queue whose head and tail are ``table[row, head]`` and the next column."""
    node[rec, NEXT] = -1
    tail = table[row, head + 1]
    if tail < 0:
        table[row, head] = rec
    else:
        node[tail, NEXT] = rec
    table[row, head + 1] = rec


@njit(cache=True, inline="always")
def _pop(node, table, row, head):
    """Remove and return the first record of a non-empty queue (see :func:`_push`)."""
    rec = table[row, head]
    nxt = node[rec, NEXT]
    table[row, head] = nxt
    if nxt < 0:
        table[row, head + 1] = -1
    return rec


@njit(cache=True, inline="always")
def _to_ramp(node, queue, ramps, flag, sc, n, pe, rec):
    q = 5 * n + pe
    _push(node, queue, q, 0, rec)
    if not flag[q]:
        flag[q] = True
        ramps[sc[RAMPS_N]] = pe
        sc[RAMPS_N] += 1


@njit(cache=True)
def _send(node, value, free, queue, ramps, flag, sc, k, pe, color, values):
    for v in values:
        rec = _alloc(free, sc)
        node[rec, COLOR] = color
        value[rec] = v
        _to_ramp(node, queue, ramps, flag, sc, k[PES], pe, rec)


# --- re-sent sums: a heap by (cycle, order of issue) ---------------------------------------------------

@njit(cache=True, inline="always")
def _less(heap, a, b):
    return heap[a, 0] < heap[b, 0] or (heap[a, 0] == heap[b, 0] and heap[a, 1] < heap[b, 1])


@njit(cache=True, inline="always")
def _swap(heap, a, b):
    for c in range(3):
        heap[a, c], heap[b, c] = heap[b, c], heap[a, c]


@njit(cache=True, inline="always")
def _heap_push(heap, sc, cycle, rec):
    i = sc[HEAP_N]
    sc[HEAP_N] += 1
    heap[i, 0], heap[i, 1], heap[i, 2] = cycle, sc[SEQ], rec
    sc[SEQ] += 1
    while i > 0 and _less(heap, i, (i - 1) // 2):
        _swap(heap, i, (i - 1) // 2)
        i = (i - 1) // 2


@njit(cache=True, inline="always")
def _resend(node, heap, wheel, sc, cycle, rec, t):
    """Record ``rec`` joins its PE's ramp at ``cycle`` (> ``t``), after those issued before it."""
    if cycle - t < WHEEL:
        node[rec, TIME] = cycle
        _push(node, wheel, cycle % WHEEL, 0, rec)
        sc[WHEEL_N] += 1
    else:
        _heap_push(heap, sc, cycle, rec)


@njit(cache=True)
def _inject(node, queue, ramps, flag, heap, wheel, sc, k, t):
    # sums due within WHEEL cycles move from the heap to their cycle's list: the heap holds those
    # issued earliest, so each list stays in the order of issue
    while sc[HEAP_N] > 0 and heap[0, 0] < t + WHEEL:
        cycle, rec = heap[0, 0], heap[0, 2]
        sc[HEAP_N] -= 1
        n = sc[HEAP_N]
        _swap(heap, 0, n)
        i = 0
        while 2 * i + 1 < n:
            child = 2 * i + 1
            if child + 1 < n and _less(heap, child + 1, child):
                child += 1
            if not _less(heap, child, i):
                break
            _swap(heap, i, child)
            i = child
        node[rec, TIME] = cycle
        _push(node, wheel, cycle % WHEEL, 0, rec)
        sc[WHEEL_N] += 1
    b = t % WHEEL
    while wheel[b, 0] >= 0:
        rec = _pop(node, wheel, b, 0)
        sc[WHEEL_N] -= 1
        _to_ramp(node, queue, ramps, flag, sc, k[PES], node[rec, PE], rec)


@njit(cache=True)
def _next_resend(node, heap, wheel, sc, t):
    """The first cycle after ``t`` at which a re-sent sum is due, or -1."""
    if sc[WHEEL_N]:
        for c in range(t + 1, t + WHEEL):
            if wheel[c % WHEEL, 0] >= 0:
                return c
    return heap[0, 0] if sc[HEAP_N] else -1


# --- streaming operations ------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _handle(node, value, free, stream, heap, wheel, done, sc, k, arena, r, rec, t):
    """Wavelet ``rec`` reaches the streaming operation of route ``r`` at cycle ``t``."""
    kind, i = stream[r, KIND], stream[r, INDEX]
    at = stream[r, BUF] + i
    v = value[rec]
    if kind == RECV:
        now = t
        arena[at] = v
        _release(free, sc, rec)
    else:  # an add per wavelet, one per cycle: wavelets that waited in the inbox queue up
        now = max(t, stream[r, FREE])
        stream[r, FREE] = now + 1
        if kind == REDUCE:
            arena[at] += v
            _release(free, sc, rec)
        else:
            node[rec, COLOR] = stream[r, OUT]
            node[rec, PE] = stream[r, OWNER]
            value[rec] = v + arena[at]
            _resend(node, heap, wheel, sc, now + k[STAGE], rec, t)
    stream[r, INDEX] = i + 1
    if i + 1 == stream[r, COUNT]:
        d = sc[DONE_N]
        done[d, 0], done[d, 1] = stream[r, TASK], stream[r, STARTED]
        done[d, 2] = now if kind == RECV else now + k[STAGE]
        sc[DONE_N] = d + 1
        stream[r, TASK] = -1


@njit(cache=True)
def _start_stream(node, value, free, stream, heap, wheel, done, sc, k, arena, r, task, kind, count, out, buf,
                  t):
    stream[r, TASK], stream[r, KIND], stream[r, INDEX], stream[r, COUNT] = task, kind, 0, count
    stream[r, FREE], stream[r, OUT], stream[r, BUF], stream[r, STARTED] = t, out, buf, t
    while stream[r, HEAD] >= 0 and stream[r, TASK] == task:
        rec = _pop(node, stream, r, HEAD)
        stream[r, WAITING] -= 1
        _handle(node, value, free, stream, heap, wheel, done, sc, k, arena, r, rec, t)


# --- one cycle: routers and links ---------------------------------------------------------------------

@njit(cache=True, inline="always")
def _route(node, value, free, queue, route, mask, active, flag, sc, k, rec, pe, came_from):
    """A wavelet enters PE ``pe``'s router from port ``came_from``: copy it to each transmit queue.
    False (and the error recorded) when no route of its color receives from that port."""
    color = node[rec, COLOR]
    r = route[pe * k[COLORS] + color]
    if r < 0 or not (mask[r, 0] >> came_from) & 1:
        sc[ERROR], sc[ERROR_PE], sc[ERROR_PORT], sc[ERROR_COLOR] = 1, pe, came_from, color
        return False
    tx, copy = mask[r, 1], rec
    for p in range(5):
        if (tx >> p) & 1:
            if copy < 0:
                copy = _alloc(free, sc)
                node[copy, COLOR] = color
                value[copy] = value[rec]
            q = 5 * pe + p
            _push(node, queue, q, 0, copy)
            copy = -1
            if not flag[q]:
                flag[q] = True
                active[sc[ACTIVE_N]] = q
                sc[ACTIVE_N] += 1
    return True


@njit(cache=True)
def _step(node, value, free, queue, route, mask, stream, active, ramps, flag, heap, wheel, links, trace, done,
          sc, k, arena, t):
    n, ok = k[PES], True
    # each ramp puts one wavelet into its router ...
    kept = 0
    for j in range(sc[RAMPS_N]):
        pe = ramps[j]
        rec = _pop(node, queue, 5 * n + pe, 0)
        if queue[5 * n + pe, 0] < 0:
            flag[5 * n + pe] = False
        else:
            ramps[kept] = pe
            kept += 1
        ok = ok and _route(node, value, free, queue, route, mask, active, flag, sc, k, rec, pe, 0)
    sc[RAMPS_N] = kept
    # ... then the wavelets arriving on links, in the order they left
    while ok and sc[FLIGHT_HEAD] >= 0 and node[sc[FLIGHT_HEAD], TIME] == t:
        rec = sc[FLIGHT_HEAD]
        sc[FLIGHT_HEAD] = node[rec, NEXT]
        if sc[FLIGHT_HEAD] < 0:
            sc[FLIGHT_TAIL] = -1
        sc[IN_FLIGHT] -= 1
        ok = _route(node, value, free, queue, route, mask, active, flag, sc, k, rec, node[rec, PE],
                    node[rec, PORT])
    if not ok:
        return False
    # every non-empty output queue sends one wavelet: to its PE, or onto the link to a neighbour
    kept = 0
    for j in range(sc[ACTIVE_N]):
        q = active[j]
        rec = _pop(node, queue, q, 0)
        if queue[q, 0] < 0:
            flag[q] = False
        else:
            active[kept] = q
            kept += 1
        pe, p = q // 5, q % 5
        links[pe, p] += 1
        if p == 0:
            r = route[pe * k[COLORS] + node[rec, COLOR]]
            if stream[r, TASK] < 0:
                _push(node, stream, r, HEAD, rec)
                stream[r, WAITING] += 1
            else:
                _handle(node, value, free, stream, heap, wheel, done, sc, k, arena, r, rec, t)
            continue
        if k[TRACING]:
            row = sc[TRACE_N]
            trace[row, 0], trace[row, 1], trace[row, 2], trace[row, 3] = t, pe % k[WIDTH], pe // k[WIDTH], p
            sc[TRACE_N] = row + 1
        node[rec, PE], node[rec, PORT] = pe + k[6 + p], _OPPOSITE[p]
        node[rec, TIME], node[rec, NEXT] = t + k[HOP], -1
        if sc[FLIGHT_TAIL] < 0:
            sc[FLIGHT_HEAD] = rec
        else:
            node[sc[FLIGHT_TAIL], NEXT] = rec
        sc[FLIGHT_TAIL] = rec
        sc[IN_FLIGHT] += 1
    if sc[ACTIVE_N]:
        sc[LAST] = t
    sc[ACTIVE_N] = kept
    return True


# --- the entry points ------------------------------------------------------------------------------------

def send(net: Net, pe: int, color: int, values: np.ndarray) -> None:
    """Queue ``values`` at PE ``pe``'s ramp, on ``color``, in order (after :func:`grow` made room)."""
    _send(net.node, net.value, net.free, net.queue, net.ramps, net.flag, net.sc, net.k, pe, color, values)


def inject(net: Net, t: int) -> None:
    """The sums re-sent for cycle ``t`` join their PEs' ramps, in the order they were issued."""
    _inject(net.node, net.queue, net.ramps, net.flag, net.heap, net.wheel, net.sc, net.k, t)


def start_stream(net: Net, r: int, task: int, kind: int, count: int, out: int, buf: int, t: int) -> None:
    """Task number ``task`` starts a streaming operation of ``kind`` (``RECV``, ``REDUCE`` or
    ``REDUCE_SEND`` re-sending on color ``out``) on route ``r``, taking ``count`` wavelets into
    ``net.arena[buf:buf + count]`` from cycle ``t``: first what waits in the inbox, then each as it arrives.
    A completion is written to ``net.done``."""
    _start_stream(net.node, net.value, net.free, net.stream, net.heap, net.wheel, net.done, net.sc, net.k,
                  net.arena, r, task, kind, count, out, buf, t)


def next_resend(net: Net, t: int) -> int:
    """The first cycle after ``t`` at which a re-sent sum joins a ramp, or -1 if none waits."""
    return int(_next_resend(net.node, net.heap, net.wheel, net.sc, t))


def step(net: Net, t: int) -> bool:
    """Cycle ``t``'s router work: each ramp and each arriving wavelet enters its router, then every
    non-empty output queue sends one wavelet. False on a misrouted wavelet (``net.sc[ERROR_PE]``,
    ``[ERROR_PORT]`` and ``[ERROR_COLOR]`` say which)."""
    return bool(_step(*net, t))
