"""The machines: a wafer of processing elements (PEs), a GPU, and a cluster of wafer systems.

It holds the number formats (:data:`Dtype`, :data:`DTYPE_BYTES`, :func:`dtype_bytes`) and the
package's dtype policy (:data:`MODEL_DTYPE`, :data:`KERNEL_DTYPE`, :data:`GPU_DTYPE`);
:func:`positive_int`, the one positive-integer check; :class:`Wafer`, :class:`GPU` and
:class:`Cluster`; and the presets: WSE-1, WSE-2, WSE-3, TOY (WSE-2's PE on a 32 x 32 grid), the H100
and the A100, with :data:`WAFERS` by name.

Every constant carries its unit in its name and its source in a comment, with a status letter:
P primary (vendor documentation or code, the paper itself), S secondary (press, talks), D derived
here by arithmetic, A an assumption of this book where nothing is published. Dense and sparse FLOPs
are kept apart, and the clock is a field, because published cycle-to-time conversions use two
different clocks for WSE-2 (850 MHz in the vendor's examples, 1.1 GHz in WaferLLM).

Built in: 09_wafer
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

Dtype = Literal["fp32", "fp16", "bf16"]

# Bytes per element of the number formats the book uses.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}

# The number formats, one policy for the whole package (each function's default is one of these):
# - a model on the wafer (its weights, activations and KV cache in placement, streaming, inference)
#   is 16-bit: fp16, the format at which a WSE PE's SIMD FMAC runs at its full width;
MODEL_DTYPE: Dtype = "fp16"
# - a kernel run on the mesh simulator (GEMV, GEMM, collectives, the emulator) is fp32: the
#   simulator's wavelets are 32 bits and it computes in NumPy float32;
KERNEL_DTYPE: Dtype = "fp32"
# - a GPU computes in bf16, the format its published dense tensor-core peaks are quoted for.
GPU_DTYPE: Dtype = "bf16"


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive integer (not a bool); else a ValueError naming ``name``.

    Built in: 11_placement
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``fp32``, ``fp16`` or ``bf16``).

    Built in: 09_wafer
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Wafer:
    """A wafer-scale engine as a W x H mesh of identical PEs.

    ``width`` x ``height`` is the rectangle a program may use, smaller than the fabric: the vendor's
    examples place a program at offset (4, 1) and let it be at most 7 columns narrower and 2 rows
    shorter than the fabric (csl-examples, benchmarks/single-tile-matvec/README.rst). Each PE has its
    own SRAM, a multiply-accumulate unit, and a router with five ports (the ramp to its own PE, north,
    south, east, west) that moves one 32-bit wavelet per cycle per direction on each link. A hop to a
    neighbour takes ``hop_cycles``; a wavelet that a PE must receive, process and send on (a software
    routing stage) costs ``stage_cycles`` more.

    Built in: 09_wafer
    """

    name: str
    width: int  # PEs in x (columns)
    height: int  # PEs in y (rows)
    clock_hz: float
    sram_bytes_per_pe: int
    fp32_fmacs_per_cycle: int  # fused multiply-adds per PE per cycle (1 FMAC = 2 FLOPs)
    fp16_fmacs_per_cycle: int  # the SIMD width for 16-bit operands
    cores_marketed: int  # the vendor's core count (larger than the fabric and than width x height)
    link_bits_per_cycle: int = 32  # one wavelet per cycle per direction per link
    hop_cycles: int = 1  # router-to-router latency
    stage_cycles: int = 2  # a PE receiving, adding and re-sending a wavelet (see the presets)
    colors: int = 24  # routable colors (virtual channels) per PE
    io_bits_per_s: float = 1.2e12  # the system's external I/O
    sparse_fp16_flops_published: float = 0.0  # the vendor's "AI" peak (with sparsity), for contrast
    sram_bytes_published: float = 0.0
    power_w: float = 0.0

    def __post_init__(self):
        for name in ("width", "height", "sram_bytes_per_pe", "fp32_fmacs_per_cycle", "fp16_fmacs_per_cycle",
                     "cores_marketed", "link_bits_per_cycle", "hop_cycles", "stage_cycles", "colors"):
            positive_int(name, getattr(self, name))
        if not self.clock_hz > 0:
            raise ValueError(f"clock_hz={self.clock_hz!r} must be positive")

    @property
    def pes(self) -> int:
        """PEs a program can use: width x height."""
        return self.width * self.height

    def fmacs_per_cycle(self, dtype: str = MODEL_DTYPE) -> int:
        dtype_bytes(dtype)
        return self.fp32_fmacs_per_cycle if dtype == "fp32" else self.fp16_fmacs_per_cycle

    def peak_flops(self, dtype: str = MODEL_DTYPE, cores: int | None = None) -> float:
        """Dense peak FLOP/s: cores x FMACs per cycle x 2 x clock. ``cores`` defaults to the marketed
        count (what published aggregates use); pass ``self.pes`` for what one program can reach."""
        n = self.cores_marketed if cores is None else cores
        return n * self.fmacs_per_cycle(dtype) * 2 * self.clock_hz

    def sram_bytes(self, cores: int | None = None) -> int:
        """Total SRAM: cores x SRAM per PE (marketed cores by default)."""
        return (self.cores_marketed if cores is None else cores) * self.sram_bytes_per_pe

    def sram_bytes_per_s(self, dtype: str = MODEL_DTYPE, accesses_per_fmac: int = 3) -> float:
        """Aggregate SRAM bandwidth the dense peak needs: every FMAC reads two operands and writes its
        result (``accesses_per_fmac`` = 3), on every marketed core, every cycle."""
        n = self.cores_marketed * self.fmacs_per_cycle(dtype)
        return n * accesses_per_fmac * dtype_bytes(dtype) * self.clock_hz

    def with_clock(self, clock_hz: float) -> Wafer:
        return dataclasses.replace(self, clock_hz=clock_hz)

    def with_grid(self, width: int, height: int, name: str | None = None) -> Wafer:
        """The same PEs on a smaller (or other) rectangle: a region of the wafer."""
        name = name or f"{self.name} {width}x{height}"
        return dataclasses.replace(self, width=width, height=height, name=name)


@dataclass(frozen=True)
class GPU:
    """A GPU for comparison: dense and sparse 16-bit peaks, HBM capacity and bandwidth.

    Built in: 09_wafer
    """

    name: str
    bf16_flops: float  # dense
    bf16_sparse_flops: float  # with 2:4 structured sparsity
    hbm_bytes: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # NVLink, per direction
    power_w: float

    def peak_flops(self, dtype: str = GPU_DTYPE) -> float:
        if dtype not in ("bf16", "fp16"):
            raise ValueError(f"dtype={dtype!r}: the GPU presets hold 16-bit peaks only (bf16, fp16)")
        return self.bf16_flops

    @property
    def critical_intensity(self) -> float:
        """FLOPs per byte of HBM traffic at which compute and memory take equal time."""
        return self.bf16_flops / self.hbm_bytes_per_s


@dataclass(frozen=True)
class Cluster:
    """``systems`` wafer systems with MemoryX (off-wafer weights and optimizer state, which also does
    the update) and SwarmX (broadcasts weights to the systems and reduces their gradients in a tree).

    Built in: 09_wafer
    """

    wafer: Wafer
    systems: int
    memoryx_bytes: float = 4e12  # P: 4 TB to 2.4 PB in the CS-2 era; the smallest by default
    swarmx_fanout: int = 2  # A: a binary tree; the vendor says only "a tree", latency ~ log N

    def __post_init__(self):
        positive_int("systems", self.systems)
        if not isinstance(self.swarmx_fanout, int) or self.swarmx_fanout < 2:
            raise ValueError(f"swarmx_fanout={self.swarmx_fanout!r} must be an integer >= 2")
        if not self.memoryx_bytes > 0:
            raise ValueError(f"memoryx_bytes={self.memoryx_bytes!r} must be positive")

    def peak_flops(self, dtype: str = MODEL_DTYPE) -> float:
        """Dense peak FLOP/s of every system together, on the rectangle of PEs a program gets on each
        (``wafer.pes``), not the marketed core count."""
        return self.systems * self.wafer.peak_flops(dtype, cores=self.wafer.pes)


# --- presets ------------------------------------------------------------------------------------------
# stage_cycles (A): the PLMR model (WaferLLM, He et al. 2025) says only that a software routing stage
# costs more than a hop (beta > alpha). We take 2 cycles: one to receive into the PE, one for the FMAC
# that adds and re-injects. Chapter 10 shows how the predictions move with it.

# WSE-1 against SC20 (Rocki et al. 2020, arXiv 2010.03660): 0.86 PFLOP/s, "about one third of the
# machine's peak", so a peak near 2.6 PFLOP/s. With 4 fp16 FMACs (8 FLOPs) a cycle that is 0.90 GHz on
# the 600 x 595 PEs the solver used, or 0.81 GHz on the marketed 400,000 cores; at this preset's 1.1 GHz
# the 0.86 PFLOP/s is 27% (600 x 595) or 24% (400,000) of peak. With one fp32 FMAC a cycle the peak at
# 1.1 GHz is 0.79 to 0.88 PFLOP/s, so 0.86 would be nearly all of it: the third is of a 16-bit SIMD
# peak. No source we cite gives WSE-1's clock, so 1.1 GHz stays an assumption (chapter 09 prints this).
WSE1 = Wafer(
    name="WSE-1",
    width=600, height=595,  # D (a lower bound): SC20 (Rocki et al.) put a 600 x 595 mesh, one column per PE
    clock_hz=1.1e9,  # A: no published WSE-1 clock; WSE-2's WaferLLM convention (see above)
    sram_bytes_per_pe=48 * 1024,  # A: 18 GB / 400k cores = 45 KB; 48 KiB assumed as on WSE-2
    fp32_fmacs_per_cycle=1,  # A: as WSE-2
    fp16_fmacs_per_cycle=4,  # A: as WSE-2
    cores_marketed=400_000,  # P: vendor
    sram_bytes_published=18e9,  # P/S: vendor, "18 GB"
    power_w=20_000,  # S: the CS-1 system, 15 kW of it to the wafer (TechSpot, November 2019)
)

WSE2 = Wafer(
    name="WSE-2",
    width=750, height=994,  # P: largest program rectangle (csl-examples single-tile-matvec README);
    # fabric 757 x 996 (WaferLLM's WSE-2 code compiles with --fabric-dims=757,996)
    clock_hz=1.1e9,  # P: WaferLLM's code converts cycles at 1.1 GHz; vendor examples use 850 MHz
    sram_bytes_per_pe=48 * 1024,  # P: WaferLLM; csl-examples comments
    fp32_fmacs_per_cycle=1,  # P: WaferLLM, 1 FMAC per cycle per PE
    fp16_fmacs_per_cycle=4,  # S: press, 4-wide SIMD FMAC
    cores_marketed=850_000,  # P: vendor; WaferLLM
    hop_cycles=1,  # P (implicit): vendor timing code subtracts px + py cycles for distance
    colors=24,  # P: routable colors 0..23
    io_bits_per_s=1.2e12,  # P: 12 x 100 GbE
    sparse_fp16_flops_published=62.5e15,  # D: Andromeda's "1 exaflop" of AI compute (vendor, with
    # sparsity) over its 16 CS-2 systems; the vendor quotes no per-system figure. Not dense.
    sram_bytes_published=40e9,  # P/S: vendor, "40 GB"
    power_w=15_000,  # A: no published CS-2 system power found; the press gave the CS-1 20 kW, 15 kW of it
    # the wafer's (TechSpot, 2019). Chapter 13 shows its energy figures at 15 and 23 kW.
)

WSE3 = Wafer(
    name="WSE-3",
    width=755, height=1170,  # D: fabric 762 x 1172, width <= fabric_x - 7, height <= fabric_y - 2
    clock_hz=1.1e9,  # P (a convention): WaferLLM's WSE-3 code converts cycles at 1.1 GHz, as for WSE-2
    sram_bytes_per_pe=48 * 1024,  # P
    fp32_fmacs_per_cycle=1,  # A: as WSE-2
    fp16_fmacs_per_cycle=8,  # S: press, 8-wide SIMD FMAC
    cores_marketed=900_000,  # P: vendor
    colors=24,  # P
    io_bits_per_s=1.2e12,  # P
    sparse_fp16_flops_published=125e15,  # S: vendor "AI" peak, with sparsity
    sram_bytes_published=44e9,  # P/S: vendor, "44 GB"
    power_w=23_000,  # A: a reported figure for the CS-3 system, not checked against a primary source
)

# A small wafer for the simulator: WSE-2's PE, on a 32 x 32 grid.
TOY = WSE2.with_grid(32, 32, name="TOY")

H100 = GPU(
    name="H100 SXM",
    bf16_flops=989e12,  # S: datasheet, dense
    bf16_sparse_flops=1979e12,  # S: with 2:4 sparsity
    hbm_bytes=80e9,  # S
    hbm_bytes_per_s=3.35e12,  # S
    link_bytes_per_s=450e9,  # S: NVLink 900 GB/s bidirectional
    power_w=700,  # S
)

A100 = GPU(
    name="A100 SXM 80GB",
    bf16_flops=312e12,  # S
    bf16_sparse_flops=624e12,  # S
    hbm_bytes=80e9,  # S
    hbm_bytes_per_s=2.0e12,  # S
    link_bytes_per_s=300e9,  # S: 600 GB/s bidirectional
    power_w=400,  # S
)

WAFERS = {w.name: w for w in (WSE1, WSE2, WSE3, TOY)}
