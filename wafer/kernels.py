"""What a PE sustains: the kernels behind the published wafer measurements, at the level of a PE's
vector instructions.

The analytic model of :mod:`wafer.cost` (which the mesh simulator checks cycle for cycle) runs every
FMAC unit at its peak whenever it has work. A real kernel does not: a PE multiplies through *vector
instructions* (an FMAC over a run of memory, a DSD operation in the vendor's SDK), and each one

- runs at most at the SIMD width of its number format (:meth:`wafer.hardware.Wafer.fmacs_per_cycle`);
- is fed by the PE's SRAM ports: at most ``sram_read_bytes_per_cycle`` read and
  ``sram_write_bytes_per_cycle`` written per cycle, so an instruction that streams three vectors
  runs slower than one that streams two;
- costs ``op_start_cycles`` to start, whatever its length.

:class:`PECosts` holds these constants, each with its unit and source. One of them,
``fp32_fmacs_per_cycle``, the rate a long fp32 FMAC loop sustains, is *calibrated*: set from one
published measurement (Miyajima et al.'s SGEMM on a CS-2, :func:`calibrate_fp32_rate`), and then used,
never refitted. Everything else here predicts. :data:`WSE2_COSTS` is the calibrated set.

The kernels, each as its paper ran it:

- :func:`gemv` -- WaferLLM's GEMV: x already on every row of a P x P grid, one FMAC instruction per
  column of the PE's block, then a K-level tree allreduce along the rows;
- :func:`summa_gemm` -- a SUMMA GEMM in fp32 (the published SGEMM): per step, A's and B's blocks
  multicast along rows and columns, then one instruction per (k, j) pair of the block;
- :func:`cannon_gemm` -- the same product as Cannon's algorithm on the interleaved ring with one
  instruction per (k, j) pair (prefill's GEMMs);
- :func:`bicgstab` -- one iteration of BiCGStab on a 7-point stencil (Rocki et al., SC20): two
  stencil products, four dot products with their allreduces over the whole mesh, six vector updates;
- :func:`decode` -- one decode step of a model on P x P regions, with every GEMV and the small vector
  operations (norms, rotary embedding, activation, residuals) as instructions.

Built in: 15_calibration
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from wafer import inference
from wafer.cost import allreduce_cycles, gemm_cycles, wavelets
from wafer.hardware import WSE2, Wafer, dtype_bytes, positive_int
from wafer.shape import GPTConfig, as_config, products, q_width
from wafer.target import Target


@dataclass(frozen=True)
class PECosts:
    """The constants of a PE's vector instructions (cycles and bytes per cycle, per PE).

    Built in: 15_calibration
    """

    # A: two 64-bit reads and one 64-bit write per cycle, the ports a 4-wide fp16 FMAC needs (it reads
    # 4 values of its vector operand and 4 of the accumulator, and writes 4). D check: (16 + 8) bytes x
    # 850,000 cores x 1.1 GHz = 22.4 PB/s, beside the vendor's 20 PB/s (WSE-2) and WaferLLM's 22 PB/s.
    sram_read_bytes_per_cycle: int = 16
    sram_write_bytes_per_cycle: int = 8
    # A: cycles to start one vector instruction (set up its descriptors, issue it). No figure is
    # published; chapter 15 shows that WaferLLM's GEMV bounds it to a few cycles.
    op_start_cycles: int = 4
    # Calibrated: FMACs per cycle a long fp32 loop sustains (the peak is 1, WaferLLM). Set by
    # calibrate_fp32_rate from Miyajima et al.'s SGEMM (349.0 TFLOP/s, 33,000^2 on 750 x 750 PEs).
    fp32_fmacs_per_cycle: float = 1.0
    # A: SRAM each PE keeps for code, task tables and buffers (the vendor's SDK says they share the
    # 48 KB with data; no size is published). Used by the fits shown with and without it.
    sram_reserve_bytes: int = 4096

    def __post_init__(self):
        for name in ("sram_read_bytes_per_cycle", "sram_write_bytes_per_cycle"):
            positive_int(name, getattr(self, name))
        if isinstance(self.op_start_cycles, bool) or not isinstance(self.op_start_cycles, int) \
                or self.op_start_cycles < 0:
            raise ValueError(f"op_start_cycles={self.op_start_cycles!r} must be an integer >= 0")
        if not 0 < self.fp32_fmacs_per_cycle <= 1:
            raise ValueError(f"fp32_fmacs_per_cycle={self.fp32_fmacs_per_cycle!r} must be in (0, 1]")
        if not isinstance(self.sram_reserve_bytes, int) or self.sram_reserve_bytes < 0:
            raise ValueError(f"sram_reserve_bytes={self.sram_reserve_bytes!r} must be an integer >= 0")


# No start-up and fp32 at its peak; the SRAM ports stay (they bind only three-stream instructions) and
# decode keeps its layer's vector operations. For GEMV, GEMM and prefill this is wafer.cost's model.
IDEAL = PECosts(op_start_cycles=0)


def rate(wafer: Wafer, costs: PECosts, dtype: str, reads: int = 2, writes: int = 1) -> float:
    """Elements per cycle of a vector instruction that streams ``reads`` vectors from SRAM and
    ``writes`` to it: the SIMD width of ``dtype`` (the calibrated rate for fp32), or less where the
    SRAM ports cannot feed it.

    Built in: 15_calibration
    """
    b = dtype_bytes(dtype)
    simd = costs.fp32_fmacs_per_cycle if dtype == "fp32" else wafer.fmacs_per_cycle(dtype)
    limits = [float(simd)]
    if reads:
        limits.append(costs.sram_read_bytes_per_cycle / (reads * b))
    if writes:
        limits.append(costs.sram_write_bytes_per_cycle / (writes * b))
    return min(limits)


def instruction_cycles(n: int, wafer: Wafer, costs: PECosts, dtype: str, reads: int = 2,
                       writes: int = 1) -> float:
    """Cycles of one vector instruction over ``n`` elements: its start-up plus n at :func:`rate`.

    Built in: 15_calibration
    """
    if n < 1:
        return 0.0
    return costs.op_start_cycles + n / rate(wafer, costs, dtype, reads, writes)


@dataclass(frozen=True)
class KernelCycles:
    """A kernel's cycles by phase (``compute`` on the PE, ``communicate`` on the fabric), its
    ``total``, and the FLOPs it does, so that ``flops / seconds`` is its rate.

    Built in: 15_calibration
    """

    compute: float
    communicate: float
    total: float
    flops: float

    def seconds(self, wafer: Wafer) -> float:
        return self.total / wafer.clock_hz

    def flops_per_s(self, wafer: Wafer) -> float:
        return self.flops / self.seconds(wafer)


def _divides(n: int, p: int, what: str) -> None:
    positive_int("n", n), positive_int("grid", p)
    if n % p:
        raise ValueError(f"{what}: the grid side {p} must divide n={n} (its blocks are equal)")


def gemv(wafer: Wafer, n: int, p: int, costs: PECosts = IDEAL, dtype: str = "fp16", levels: int = 2
         ) -> KernelCycles:
    """WaferLLM's timed GEMV, y = A x with A n x n on a ``p`` x ``p`` grid (p divides n): x is already
    on every row, each PE multiplies its (n/p) x (n/p) block by one FMAC instruction per column
    (a vector of A times one value of x), then a ``levels``-level tree allreduce sums along the rows.
    With :data:`IDEAL` costs this is :func:`wafer.cost.gemv_cycles`' product plus
    :func:`wafer.cost.allreduce_cycles`, which the simulator checks.

    Built in: 15_calibration
    """
    _divides(n, p, "gemv")
    b = n // p
    compute = b * instruction_cycles(b, wafer, costs, dtype)
    comm = allreduce_cycles(wafer, p, wavelets(b, dtype), levels) if p > 1 else 0
    return KernelCycles(compute=compute, communicate=comm, total=compute + comm, flops=2.0 * n * n)


def summa_gemm(wafer: Wafer, n: int, p: int, costs: PECosts = IDEAL, dtype: str = "fp32") -> KernelCycles:
    """C = A B (n x n) by SUMMA on a ``p`` x ``p`` grid (p divides n): at each of the p steps, the
    blocks of step s's column of A and row of B are multicast along rows and columns
    (:func:`wafer.cost.gemm_cycles`' SUMMA communication, phases not overlapped), then each PE does
    its block product as one FMAC instruction per (k, j) pair, each over a column of n/p values.

    Built in: 15_calibration
    """
    _divides(n, p, "summa_gemm")
    b = n // p
    comm = gemm_cycles(wafer, n, n, n, p, "summa", dtype).communicate
    compute = p * b * b * instruction_cycles(b, wafer, costs, dtype)
    return KernelCycles(compute=compute, communicate=comm, total=compute + comm, flops=2.0 * n ** 3)


def cannon_gemm(wafer: Wafer, m: int, k: int, n: int, p: int, costs: PECosts = IDEAL,
                dtype: str = "fp16", along: str = "m") -> KernelCycles:
    """C = A B (m x k times k x n) by Cannon's algorithm on the interleaved ring of a ``p`` x ``p``
    grid: p block products and p - 1 shifts of both blocks (:func:`wafer.cost.gemm_cycles`' lockstep
    communication). A block product is a set of FMAC instructions, and ``along`` says what each one
    runs over: ``"m"``, a column of C (ceil(m / p) long, one instruction per (k, j) pair, as the SGEMM's
    SUMMA does), or ``"n"``, a row of C (ceil(n / p) long, one per (i, k) pair).

    Built in: 15_calibration
    """
    bm, bk, bn = math.ceil(m / p), math.ceil(k / p), math.ceil(n / p)
    if along not in ("m", "n"):
        raise ValueError(f"along={along!r} is not one of ('m', 'n')")
    comm = gemm_cycles(wafer, m, k, n, p, "interleave", dtype, dataflow=False).communicate
    if along == "m":
        compute = p * bk * bn * instruction_cycles(bm, wafer, costs, dtype)
    else:
        compute = p * bm * bk * instruction_cycles(bn, wafer, costs, dtype)
    return KernelCycles(compute=compute, communicate=comm, total=compute + comm, flops=2.0 * m * k * n)


def calibrate_fp32_rate(published_flops_per_s: float = 349.0e12, n: int = 33_000, p: int = 750,
                        wafer: Wafer = WSE2, costs: PECosts = PECosts()) -> PECosts:
    """``costs`` with ``fp32_fmacs_per_cycle`` set so that :func:`summa_gemm` of n x n on p x p PEs runs
    at ``published_flops_per_s`` (Miyajima et al.: 349.0 TFLOP/s at 33,000 x 33,000 on 750 x 750
    PEs of a CS-2). The kernel's cycles are linear in 1 / rate, so this solves it exactly.

    Built in: 15_calibration
    """
    cycles = 2.0 * n ** 3 / published_flops_per_s * wafer.clock_hz
    b = n // p
    unit = dataclasses.replace(costs, fp32_fmacs_per_cycle=1.0)
    fixed = summa_gemm(wafer, n, p, unit).communicate + p * b * b * costs.op_start_cycles
    per_element = (cycles - fixed) / (p * b * b * b)  # cycles per element = 1 / rate
    if per_element < 1:
        raise ValueError(f"{published_flops_per_s:.3g} FLOP/s is above what the {wafer.name} can reach at "
                         f"1 fp32 FMAC per cycle with these start-up and communication costs")
    return dataclasses.replace(costs, fp32_fmacs_per_cycle=1.0 / per_element)


WSE2_COSTS = calibrate_fp32_rate()


def bicgstab(wafer: Wafer, nz: int, costs: PECosts = IDEAL, dtype: str = "fp16", levels: int = 2
             ) -> KernelCycles:
    """One BiCGStab iteration for a 7-point stencil on a ``wafer.width`` x ``wafer.height`` x ``nz``
    mesh, one column of ``nz`` points per PE (Rocki et al., SC20), all in ``dtype``:

    - two stencil products: each PE receives its four neighbours' columns through its ramp (one
      wavelet per cycle) while it does 7 FMAC instructions of ``nz`` with a coefficient per point
      (three streams read: coefficient, neighbour, sum); the two overlap, so each product takes the
      longer of the two;
    - four dot products (2 reads each), each followed by an allreduce of one value along the rows
      and then the columns of the whole mesh (a ``levels``-level tree each way);
    - six vector updates (2 reads, 1 write).

    FLOPs: 13 per point per stencil product, 2 per dot product, 2 per update: 46 per point.

    Built in: 15_calibration
    """
    positive_int("nz", nz)
    spmv_compute = 7 * instruction_cycles(nz, wafer, costs, dtype, reads=3)
    ramp = 4 * wavelets(nz, dtype)
    dots = 4 * instruction_cycles(nz, wafer, costs, dtype, reads=2, writes=0)
    updates = 6 * instruction_cycles(nz, wafer, costs, dtype)
    reduce = 4 * (allreduce_cycles(wafer, wafer.width, 1, levels)
                  + allreduce_cycles(wafer, wafer.height, 1, levels))
    compute = 2 * spmv_compute + dots + updates
    total = 2 * max(spmv_compute, ramp) + dots + updates + reduce
    return KernelCycles(compute=compute, communicate=total - compute, total=total,
                        flops=46.0 * nz * wafer.pes)


# --- decode with the PE's instructions --------------------------------------------------------------

# The small vector operations of one decoder layer, as WaferLLM's decode kernel issues them (its
# Decode/WSE-2/src/decode.csl): (what, instructions, the vector they run over, vectors read, written).
# The vector is the PE's piece of the hidden size ("d"), of half of it ("d/2", the rotary pairs), of
# the MLP's width ("ffn") or of the cached tokens ("context"). Its per-element scalar loops (the SiLU,
# the exponent in the softmax, a square root per norm) are not modelled: chapter 15 names them.
LAYER_VECTOR_OPS = (("norms: square, sum, scale (x2)", 6, "d", 1, 1),
                    ("rotary of q and k: 4 products, a difference, a sum (x2)", 12, "d/2", 2, 1),
                    ("zero the products' outputs", 9, "d", 0, 1),
                    ("softmax: scale, max, shift, sum, normalise", 5, "context", 1, 1),
                    ("gate times up", 1, "ffn", 2, 1),
                    ("residual additions", 2, "d", 2, 1))


@dataclass(frozen=True)
class DecodeKernel:
    """A decode step on the wafer with the PE's instructions: the analytic model's step
    (:func:`wafer.inference.decode`) and what the instructions add, in seconds; the rate.

    Built in: 15_calibration
    """

    analytic_s: float  # wafer.inference.decode: products at the FMAC peak, collectives
    products_s: float  # the products' instructions beyond the peak: start-ups (one per column)
    vector_ops_s: float  # norms, rotary, softmax, activation, residuals
    seconds: float
    tokens_per_s: float


def decode(config: GPTConfig, target: Target, side: int, costs: PECosts = WSE2_COSTS, levels: int = 2,
           wafers: int = 1) -> DecodeKernel:
    """One decode step as :func:`wafer.inference.decode` computes it, plus what the PE's instructions
    add: each GEMV's product done as one instruction per column of the PE's block (a start-up each, and
    the SRAM-port rate), and each layer's small vector operations (:data:`LAYER_VECTOR_OPS`) over the
    PE's piece of the vector each runs over.

    Built in: 15_calibration
    """
    config = as_config(config)
    wafer, dtype = target.wafer, target.dtype
    base = inference.decode(config, target, side, levels, wafers)
    d, q = config.n_embd, q_width(config)

    def product_extra(m: int, n: int) -> float:  # instructions beyond the peak's ceil(bm bn / simd)
        bm, bn = math.ceil(m / side), math.ceil(n / side)
        peak = math.ceil(bm * bn / wafer.fmacs_per_cycle(dtype))
        return bn * instruction_cycles(bm, wafer, costs, dtype) - peak

    per_layer = sum(product_extra(m, n) for _, m, n in products(config))
    per_layer += product_extra(target.context, q) + product_extra(q, target.context)  # attention
    piece = {"d": math.ceil(d / side), "d/2": math.ceil(d / side / 2),
             "ffn": math.ceil(config.ffn_hidden / side), "context": math.ceil(target.context / side)}
    vector = sum(k * instruction_cycles(piece[over], wafer, costs, dtype, reads, writes)
                 for _, k, over, reads, writes in LAYER_VECTOR_OPS)
    products_s = (config.n_layer * per_layer + product_extra(config.vocab_size, d)) / wafer.clock_hz
    vector_s = config.n_layer * vector / wafer.clock_hz
    seconds = base.seconds + products_s + vector_s
    return DecodeKernel(analytic_s=base.seconds, products_s=products_s, vector_ops_s=vector_s,
                        seconds=seconds, tokens_per_s=1 / seconds)


def with_reserve(wafer: Wafer, costs: PECosts = WSE2_COSTS) -> Wafer:
    """``wafer`` with each PE's SRAM less ``costs.sram_reserve_bytes`` (code, tasks and buffers).

    Built in: 15_calibration
    """
    left = wafer.sram_bytes_per_pe - costs.sram_reserve_bytes
    if left < 1:
        raise ValueError(f"sram_reserve_bytes={costs.sram_reserve_bytes} leaves nothing of a "
                         f"{wafer.name} PE's {wafer.sram_bytes_per_pe} bytes")
    return dataclasses.replace(wafer, sram_bytes_per_pe=left, name=f"{wafer.name} less "
                               f"{costs.sram_reserve_bytes // 1024} KiB reserve")



def prefill(config: GPTConfig, target: Target, side: int, costs: PECosts = WSE2_COSTS, along: str = "m"
            ) -> KernelCycles:
    """A prompt's prefill (``target.context`` tokens) with every layer on a ``side`` x ``side`` region:
    each product and attention's two products as :func:`cannon_gemm` with the PE's instructions, run
    ``along`` the prompt's rows (``"m"``), the outputs (``"n"``), or whichever is faster for each
    product (``"best"``). With :data:`IDEAL` costs it is the FMAC-peak model of
    :func:`wafer.inference.prefill`, whole cycles aside.

    Built in: 15_calibration
    """
    if along not in ("m", "n", "best"):
        raise ValueError(f"along={along!r} is not one of ('m', 'n', 'best')")
    config = as_config(config)
    wafer, n, dtype = target.wafer, target.context, target.dtype
    inference.layout(config, wafer, side, dtype)  # raises if the layers do not fit
    q = q_width(config)
    sizes = [(n, k, m) for _, m, k in products(config)] + [(n, q, n), (n, n, q)]  # + scores, weighted sum
    ways = ("m", "n") if along == "best" else (along,)
    gemms = [min((cannon_gemm(wafer, *size, side, costs, dtype, way) for way in ways), key=lambda g: g.total)
             for size in sizes]
    compute = config.n_layer * sum(g.compute for g in gemms)
    comm = config.n_layer * sum(g.communicate for g in gemms)
    return KernelCycles(compute=compute, communicate=comm, total=compute + comm,
                        flops=config.n_layer * sum(g.flops for g in gemms))
