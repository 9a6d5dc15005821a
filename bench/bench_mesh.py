"""The mesh simulator and the analytic model: how fast each runs.

- Simulator speed, in wavelet-hops per second, on a GEMV on a 64 x 64 grid (a 2-level tree reduce).
- A 16K x 16K GEMV on a 64 x 64 grid: each PE holds a 256 x 256 block (256 KiB in fp32), more than a
  real PE's 48 KiB, so this run uses TOY's PE with 1 MiB of SRAM; the target is under 30 s.
- The analytic model on a full-wafer GEMV (WSE-2, 750 x 750, fp16): the target is under 10 ms.
The simulated result is checked against NumPy in the same run, and the simulated cycles against the
analytic model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, write  # noqa: E402
from wafer import collectives, cost  # noqa: E402
from wafer.hardware import TOY, WSE2  # noqa: E402

BIG_PE = dataclasses.replace(TOY, sram_bytes_per_pe=1 << 20, name="TOY with 1 MiB per PE")


def simulate(n: int) -> tuple[float, int, int, float]:
    rng = np.random.default_rng(0)
    A, x = rng.standard_normal((n, n)), rng.standard_normal(n)
    start = time.perf_counter()
    y, report = collectives.gemv(A, x, (64, 64), BIG_PE, levels=2)
    seconds = time.perf_counter() - start
    error = float(np.abs(y - A @ x).max() / np.abs(A @ x).max())
    model = cost.gemv_cycles(BIG_PE, n, n, (64, 64), levels=2).total
    assert error < 1e-12 and model == report.cycles, (error, model, report.cycles)
    return seconds, report.wavelet_hops, report.cycles, error


def main() -> None:
    rows = []
    seconds, hops, cycles, _ = simulate(4096)
    rows.append({"benchmark": "simulator, 4K x 4K GEMV on 64 x 64", "value": hops / seconds / 1e3,
                 "unit": "k/s", "target": f"wavelet-hops per second ({hops:,} hops, {cycles:,} cycles)"})
    seconds, hops, cycles, _ = simulate(16384)
    rows.append({"benchmark": "simulator, 16K x 16K GEMV on 64 x 64", "value": seconds, "unit": "s",
                 "target": f"< 30 s ({hops / seconds / 1e3:.0f}k wavelet-hops/s, {cycles:,} cycles)"})
    t = best_of(lambda: cost.gemv_cycles(WSE2, 16384, 16384, (750, 750), levels=2, dtype="fp16"), repeat=20)
    rows.append({"benchmark": "analytic model, full-wafer GEMV", "value": t * 1e3, "unit": "ms",
                 "target": "< 10 ms"})
    write("mesh", rows)


if __name__ == "__main__":
    main()
