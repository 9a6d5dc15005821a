"""The analytic model: cycles and seconds from a few constants, checked against the mesh simulator.

It holds the roofline (:class:`Roofline` from :func:`roofline`, :func:`gemv_roofline_gpu` and, for
one PE on the fabric, :func:`pe_roofline`) and :func:`bounds`; the SRAM and routing checks
(:func:`check_fits`, :func:`check_routable`, :func:`reduce_colors`); the cycles of transfers and
collectives (:func:`wavelets`, :func:`compute_cycles`, :func:`transfer_cycles`,
:func:`broadcast_cycles`, :func:`reduce_cycles`, :func:`allreduce_cycles`); GEMV and GEMM
(:class:`GemvCycles` from :func:`gemv_cycles`, :class:`GemmCycles` from :func:`gemm_cycles`); and
:func:`seconds`. Kernels default to :data:`wafer.hardware.KERNEL_DTYPE` (fp32), GPUs to
:data:`wafer.hardware.GPU_DTYPE` (bf16).

Assumptions, each one a choice the simulator shares (so that the simulator checks the arithmetic)
and that the real machine may not:

- A transfer of k wavelets over h hops through s software stages takes
  ``h * hop_cycles + s * stage_cycles + k - 1`` cycles: the first wavelet pays the latency, the rest
  follow one per cycle (alpha-beta, with beta = one wavelet per cycle per link).
- A PE's product takes ``fmacs / fmacs_per_cycle`` cycles: the FMAC unit runs at its peak whenever
  it has work (no instruction overhead, no memory stalls).
- The phases of an algorithm do not overlap (communication, then compute): the time is their sum.
  ``bounds`` gives both ends for any pair: perfect overlap (the max, a lower bound) and none (the sum).
- A PE's ramp (router to PE) takes one wavelet per cycle, so two streams into one PE share it.

Built in: 09_wafer (roofline, memory), 10_mesh (collectives)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from wafer.collectives import (
    assign_colors,
    colors_per_pe,
    interleaved_ring,
    reduce_links,
    shift_paths,
    tree_chains,
)
from wafer.hardware import GPU, GPU_DTYPE, KERNEL_DTYPE, Wafer, dtype_bytes

WAVELET_BYTES = 4

# --- the roofline and bounds ---------------------------------------------------------------------------


def bounds(compute_s: float, comm_s: float) -> tuple[float, float]:
    """(perfect overlap, no overlap) = (max, sum): the lower and upper bounds on a step's time.

    Built in: 09_wafer
    """
    return max(compute_s, comm_s), compute_s + comm_s


@dataclass(frozen=True)
class Roofline:
    """A kernel's time by the roofline: ``compute_s`` (its FLOPs at the peak) and ``memory_s`` (its
    bytes at the bandwidth), both in seconds; ``seconds``, the larger (perfect overlap);
    ``intensity`` in FLOPs per byte; ``limit``, ``"compute"`` or ``"memory"``, whichever is larger.

    Built in: 09_wafer
    """

    compute_s: float
    memory_s: float
    seconds: float
    intensity: float
    limit: str


def roofline(flops: float, bytes_moved: float, peak_flops: float, bytes_per_s: float) -> Roofline:
    """Time for ``flops`` that must move ``bytes_moved``: the larger of the compute and memory times
    (perfect overlap), both times, the intensity, and which one limits.

    Built in: 09_wafer
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops={flops} and bytes_moved={bytes_moved} must be >= 0")
    t_compute, t_memory = flops / peak_flops, bytes_moved / bytes_per_s
    return Roofline(compute_s=t_compute, memory_s=t_memory, seconds=max(t_compute, t_memory),
                    intensity=flops / bytes_moved if bytes_moved else math.inf,
                    limit="compute" if t_compute >= t_memory else "memory")


def gemv_roofline_gpu(m: int, n: int, gpu: GPU, dtype: str = GPU_DTYPE) -> Roofline:
    """y = A x on a GPU: A is read once from HBM (2mn FLOPs over mn elements).

    Built in: 09_wafer
    """
    bytes_moved = (m * n + m + n) * dtype_bytes(dtype)
    return roofline(2.0 * m * n, bytes_moved, gpu.peak_flops(dtype), gpu.hbm_bytes_per_s)


def pe_roofline(flops: float, bytes_in: float, wafer: Wafer, dtype: str = KERNEL_DTYPE) -> Roofline:
    """One PE's roofline on the fabric: ``flops`` at the PE's peak (``fmacs_per_cycle(dtype)`` x 2
    FLOPs per cycle) against ``bytes_in``, the bytes that must arrive from other PEs, through the PE's
    ramp at one wavelet (``link_bits_per_cycle`` / 8 bytes) per cycle. Both times in seconds at the
    wafer's clock; a ``limit`` of ``"memory"`` here means the ramp. On WSE-2 the ridge is at 2 FLOPs
    per arriving byte in fp16 (8 FLOPs against 4 bytes a cycle) and at 0.5 in fp32.

    Built in: 09_wafer
    """
    peak = wafer.fmacs_per_cycle(dtype) * 2 * wafer.clock_hz
    return roofline(flops, bytes_in, peak, wafer.link_bits_per_cycle / 8 * wafer.clock_hz)


# --- memory -------------------------------------------------------------------------------------------------


def check_fits(bytes_per_pe: float, wafer: Wafer, what: str = "the data") -> None:
    """Raise if ``bytes_per_pe`` exceeds a PE's SRAM, saying by how much.

    Built in: 09_wafer
    """
    if bytes_per_pe > wafer.sram_bytes_per_pe:
        raise ValueError(f"{what} needs {bytes_per_pe:,.0f} bytes per PE, over the "
                         f"{wafer.sram_bytes_per_pe:,} "
                         f"bytes of a {wafer.name} PE (by {bytes_per_pe - wafer.sram_bytes_per_pe:,.0f})")


def check_routable(colors: int, wafer: Wafer, what: str = "the algorithm") -> None:
    """Raise if an algorithm needs more colors at one PE than its router has.

    Built in: 10_mesh
    """
    if colors > wafer.colors:
        raise ValueError(f"{what} needs {colors} colors at one PE; a {wafer.name} PE routes at most "
                         f"{wafer.colors}")


@functools.lru_cache(maxsize=4096)
def reduce_colors(n: int, levels: int = 1) -> int:
    """Colors the busiest PE routes in a reduction over a line of ``n`` PEs (2 for a chain: one in,
    one out; more where a tree's longer hops pass over PEs).

    Built in: 10_mesh
    """
    links = reduce_links(n, levels)
    paths = [[(p, 0) for p in range(b, a + 1)] for a, b in links]
    return colors_per_pe(paths, assign_colors(paths))


# --- transfers and collectives (cycles) -------------------------------------------------------------


def wavelets(elems: int, dtype: str = KERNEL_DTYPE) -> int:
    """Wavelets (32 bits each) that carry ``elems`` values of ``dtype``.

    Built in: 10_mesh
    """
    return math.ceil(elems * dtype_bytes(dtype) / WAVELET_BYTES)


def compute_cycles(fmacs: float, wafer: Wafer, dtype: str = KERNEL_DTYPE) -> int:
    """Cycles of ``fmacs`` multiply-adds on one PE, at its peak for ``dtype``.

    Built in: 09_wafer
    """
    return math.ceil(fmacs / wafer.fmacs_per_cycle(dtype))


def transfer_cycles(wafer: Wafer, hops: int, count: int, stages: int = 0) -> int:
    """k = ``count`` wavelets over ``hops`` hops and ``stages`` software stages.

    Built in: 10_mesh
    """
    if count < 1:
        return 0
    return hops * wafer.hop_cycles + stages * wafer.stage_cycles + count - 1


def broadcast_cycles(wafer: Wafer, hops: int, count: int) -> int:
    """A multicast reaches a PE ``hops`` away: no stages, the routers copy as wavelets pass.

    Built in: 10_mesh
    """
    return transfer_cycles(wafer, hops, count)


def reduce_cycles(wafer: Wafer, n: int, count: int, levels: int = 1) -> int:
    """A sum of ``count`` wavelets per PE over a line of ``n`` PEs toward its first, by the chains of
    :func:`wafer.collectives.tree_chains`. Along a chain the first wavelet pays a hop per PE of
    distance and a stage per PE it passes through; the rest follow one per cycle. A PE that heads a
    chain joins the next level when its own sum is complete. One chain: (n - 1)(hop + stage) + k - 1.

    Built in: 10_mesh
    """
    if n <= 1 or count < 1:
        return 0
    hop, stage = wafer.hop_cycles, wafer.stage_cycles
    ready = [0] * n  # when each position's partial sum is complete
    for chains in tree_chains(n, levels):
        for chain in chains:
            out = ready[chain[-1]]  # the tail sends as soon as its sum is complete
            for j in range(len(chain) - 2, 0, -1):
                out = max(out + (chain[j + 1] - chain[j]) * hop, ready[chain[j]]) + stage
            arrive = out + (chain[1] - chain[0]) * hop
            ready[chain[0]] = max(arrive, ready[chain[0]]) + count - 1 + stage
    return ready[0]


def allreduce_cycles(wafer: Wafer, n: int, count: int, levels: int = 1) -> int:
    """A reduce toward the first PE, then its broadcast back over n - 1 hops.

    Built in: 10_mesh
    """
    return reduce_cycles(wafer, n, count, levels) + broadcast_cycles(wafer, n - 1, count)


@dataclass(frozen=True)
class GemvCycles:
    """A GEMV's phases on a grid, in cycles (``total`` is their sum: the phases do not overlap), the
    bytes of A's block and of x's and y's pieces on one PE, and the colors the busiest PE routes.

    Built in: 10_mesh
    """

    broadcast: int  # x down the columns
    compute: int  # the local product
    reduce: int  # the sum along each row
    total: int
    bytes_per_pe: int
    colors: int


def gemv_cycles(wafer: Wafer, m: int, n: int, grid: tuple[int, int], levels: int = 1,
                dtype: str = KERNEL_DTYPE) -> GemvCycles:
    """y = A x (A is m x n) on a P x Q grid, as :func:`wafer.collectives.gemv` runs it: x down the
    columns, the local product, the sum along each row. Each phase and the total, in cycles.

    Built in: 10_mesh
    """
    p, q = grid
    if p < 1 or q < 1 or m < 1 or n < 1:
        raise ValueError(f"grid {grid} and shape ({m}, {n}) must be positive")
    bm, bn = math.ceil(m / p), math.ceil(n / q)
    broadcast = broadcast_cycles(wafer, p - 1, wavelets(bn, dtype)) if p > 1 else 0
    compute = compute_cycles(bm * bn, wafer, dtype)
    reduce = reduce_cycles(wafer, q, wavelets(bm, dtype), levels) if q > 1 else 0
    return GemvCycles(broadcast=broadcast, compute=compute, reduce=reduce, total=broadcast + compute + reduce,
                      bytes_per_pe=(bm * bn + bn + bm) * dtype_bytes(dtype),
                      colors=(1 if p > 1 else 0) + reduce_colors(q, levels))


@dataclass(frozen=True)
class GemmCycles:
    """A GEMM on a P x P grid, in cycles: ``communicate`` and ``compute`` (P block products) as the
    lockstep schedule spends them; ``total``, the prediction; ``lockstep``, Cannon's bound with a
    barrier after every shift (``None`` for SUMMA); the bytes of the blocks on one PE, and the colors
    the busiest PE routes.

    Built in: 10_mesh
    """

    communicate: int
    compute: int
    total: int
    bytes_per_pe: int
    colors: int
    lockstep: int | None = None


def gemm_cycles(wafer: Wafer, m: int, k: int, n: int, grid: int, method: str = "summa",
                dtype: str = KERNEL_DTYPE, dataflow: bool = True) -> GemmCycles:
    """C = A B (m x k times k x n) on a P x P grid, as :func:`wafer.collectives.gemm` runs it.

    SUMMA, step s: blocks of A and B multicast from column and row s (the farthest PE max(s, P-1-s)
    hops away), both streams sharing each PE's ramp, then the block product. Cannon: P products and
    P - 1 shifts of both blocks, whose longest path is the wrap-around, P - 1 hops (2 on the
    interleaved ring). With ``dataflow=False`` Cannon's total is the lockstep bound, which is much
    faster to compute on large grids (on the interleaved ring it is within a cycle of the dataflow).

    Built in: 10_mesh
    """
    P = grid
    bm, bk, bn = math.ceil(m / P), math.ceil(k / P), math.ceil(n / P)
    a, b = wavelets(bm * bk, dtype), wavelets(bk * bn, dtype)
    step_compute = compute_cycles(bm * bk * bn, wafer, dtype)
    nbytes = (2 * bm * bk + 2 * bk * bn + bm * bn) * dtype_bytes(dtype)
    if method == "summa":
        comm = sum(transfer_cycles(wafer, max(s, P - 1 - s), a + b) for s in range(P)) if P > 1 else 0
        return GemmCycles(communicate=comm, compute=P * step_compute, total=comm + P * step_compute,
                          bytes_per_pe=nbytes,
                          colors=2 if P > 1 else 0)  # a row and a column multicast, new routes each step
    if method in ("cannon", "interleave"):
        ring = interleaved_ring(P) if method == "interleave" else list(range(P))
        hops = max(abs(ring[j] - ring[j - 1]) for j in range(P)) if P > 1 else 0
        lockstep = P * step_compute + (P - 1) * transfer_cycles(wafer, hops, a + b)
        total = _cannon_dataflow(wafer, ring, a, b, step_compute) if dataflow else lockstep
        return GemmCycles(communicate=lockstep - P * step_compute, compute=P * step_compute, total=total,
                          bytes_per_pe=nbytes, colors=_ring_colors(P, method == "interleave"),
                          lockstep=lockstep)
    raise ValueError(f"method={method!r} is not one of ('summa', 'cannon', 'interleave')")


@functools.lru_cache(maxsize=256)
def _ring_colors(P: int, interleave: bool) -> int:
    """Colors per PE of Cannon's shifts on a ring of P (the interleaved one if ``interleave``)."""
    paths, _ = shift_paths(interleaved_ring(P) if interleave else list(range(P)))
    return colors_per_pe(paths, assign_colors(paths))


def _cannon_dataflow(wafer: Wafer, ring: list[int], a: int, b: int, compute: int) -> int:
    """Cannon without a barrier: each PE starts a step as soon as its own previous step is done and
    both incoming blocks have arrived, so the long wrap-around hop delays only the PEs that wait on it.
    T[i, j] = when the PE at logical row i, column j finishes its current step. Its A block comes
    from (i, j + 1) and its B block from (i + 1, j), which send A then B through their ramps; the two
    streams share the receiver's ramp (one wavelet per cycle)."""
    P = len(ring)
    hop = wafer.hop_cycles
    dist = np.array([abs(ring[(j + 1) % P] - ring[j]) for j in range(P)])  # from j + 1 to j
    T = np.full((P, P), compute, dtype=np.int64)
    for _ in range(P - 1):
        arr_a = np.roll(T, -1, axis=1) + dist[None, :] * hop
        arr_b = np.roll(T, -1, axis=0) + a + dist[:, None] * hop
        ramp = np.maximum.reduce([arr_a + a - 1, arr_b + b - 1, np.minimum(arr_a, arr_b) + a + b - 1])
        T = np.maximum(T, ramp) + compute
    return int(T.max())


def seconds(cycles: float, wafer: Wafer) -> float:
    """``cycles`` at the wafer's clock, in seconds.

    Built in: 10_mesh
    """
    return cycles / wafer.clock_hz
