"""The mesh simulator and the analytic model: how fast each runs.

- Simulator speed, in wavelet-hops per second, on a 16K x 16K GEMV on a 64 x 64 grid (a 2-level tree
  reduce): the simulator's run (``Mesh.run``) against the first edition's pure-Python simulator
  (tests/helpers/mesh_reference.py) on the same program in the same process, both timed the same way,
  with the results checked equal to the bit. Each PE holds a 256 x 256 block, more than a real PE's
  48 KiB, so these runs use TOY's PE with 1 MiB.
- The same comparison on a 4K x 4K GEMV on 64 x 64 (64 x 64 blocks: a quarter of the wavelets per
  operation, so the per-operation work done in Python is a larger share of the run).
- A 16K x 16K GEMV on a 512 x 512 grid (WSE-2-sized rows and columns of PEs), end to end: building
  the program and running it; target under 60 s; its simulated cycles against the analytic model.
- The analytic model on a full-wafer GEMV (WSE-2, 750 x 750, fp16): the target is under 10 ms.
Each simulated result is checked against NumPy, and the simulated cycles against the analytic model.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))

from mesh_reference import run_reference  # noqa: E402

from common import best_of, write  # noqa: E402
from wafer import collectives, cost  # noqa: E402
from wafer.hardware import TOY, WSE2  # noqa: E402
from wafer.mesh import Mesh  # noqa: E402

BIG_PE = dataclasses.replace(TOY, sram_bytes_per_pe=1 << 20, name="TOY with 1 MiB per PE")


def gemv_program(n: int, grid: int) -> tuple[Mesh, np.ndarray, np.ndarray, float]:
    """The GEMV's mesh, programmed and not yet run (captured from collectives.gemv), with A, x and the
    seconds it took to build."""
    rng = np.random.default_rng(0)
    A, x = rng.standard_normal((n, n)), rng.standard_normal(n)
    captured: list[Mesh] = []

    class Captured(Exception):
        pass

    def capture(mesh, *args, **kwargs):
        captured.append(mesh)
        raise Captured

    real = Mesh.run
    Mesh.run = capture  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        collectives.gemv(A, x, (grid, grid), BIG_PE, levels=2)
    except Captured:
        pass
    finally:
        Mesh.run = real  # type: ignore[method-assign]
    return captured[0], A, x, time.perf_counter() - start


def compare(n: int, grid: int, repeat: int) -> dict:
    """Mesh.run by the simulator (best of ``repeat``) and by the reference (once), same program."""
    mesh, A, x, _ = gemv_program(n, grid)
    times, report = [], None
    for _ in range(repeat):
        m = copy.deepcopy(mesh)
        start = time.process_time()
        report = m.run()
        times.append(time.process_time() - start)
    ref = copy.deepcopy(mesh)
    start = time.process_time()
    expected = run_reference(ref)
    ref_seconds = time.process_time() - start
    assert report is not None and report.cycles == expected.cycles and report.timeline == expected.timeline
    assert np.array_equal(report.link_wavelets, expected.link_wavelets)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(m.memory, ref.memory) for k in a)
    y = np.concatenate([m.load((0, p), "y") for p in range(grid)])
    assert np.abs(y - A @ x).max() < 1e-12 * np.abs(A @ x).max()
    assert report.cycles == cost.gemv_cycles(BIG_PE, n, n, (grid, grid), levels=2).total
    hops = report.wavelet_hops
    return {"hops": hops, "cycles": report.cycles, "ours": hops / min(times), "theirs": hops / ref_seconds}


def full_grid(n: int = 16384, grid: int = 512) -> dict:
    rng = np.random.default_rng(0)
    A, x = rng.standard_normal((n, n)), rng.standard_normal(n)
    start = time.perf_counter()
    y, report = collectives.gemv(A, x, (grid, grid), BIG_PE, levels=2)
    seconds = time.perf_counter() - start
    error = float(np.abs(y - A @ x).max() / np.abs(A @ x).max())
    model = cost.gemv_cycles(BIG_PE, n, n, (grid, grid), levels=2).total
    assert error < 1e-12 and model == report.cycles, (error, model, report.cycles)
    return {"seconds": seconds, "hops": report.wavelet_hops, "cycles": report.cycles, "model": model}


def main() -> None:
    start = time.perf_counter()
    collectives.gemv(np.eye(8), np.ones(8), (2, 2), BIG_PE)  # load (or compile) the simulator's code
    warm = time.perf_counter() - start
    rows = []
    for n, repeat, target in ((16384, 1, ">= 20x"), (4096, 3, "(per-operation work is a larger share)")):
        c = compare(n, 64, repeat)
        rows += [
            {"benchmark": f"simulator, {n // 1024}K x {n // 1024}K GEMV on 64 x 64", "value": c["ours"] / 1e3,
             "unit": "k/s",
             "target": f"wavelet-hops per second ({c['hops']:,} hops, {c['cycles']:,} cycles)"},
            {"benchmark": "  first edition's simulator, same program", "value": c["theirs"] / 1e3,
             "unit": "k/s"},
            {"benchmark": "  speed-up", "value": c["ours"] / c["theirs"], "unit": "x", "target": target},
        ]
    g = full_grid()
    rows.append({"benchmark": "simulator, 16K x 16K GEMV on 512 x 512, end to end", "value": g["seconds"],
                 "unit": "s", "target": f"< 60 s ({g['hops']:,} hops; {g['cycles']:,} cycles = the model's "
                                        f"{g['model']:,})"})
    t = best_of(lambda: cost.gemv_cycles(WSE2, 16384, 16384, (750, 750), levels=2, dtype="fp16"), repeat=20)
    rows.append({"benchmark": "analytic model, full-wafer GEMV", "value": t * 1e3, "unit": "ms",
                 "target": "< 10 ms"})
    write("mesh", rows, {"load_seconds": warm,
                         "timing": "Mesh.run CPU time (one thread each; CPU time is less disturbed than wall "
                                   "time by other work on the machine): the simulator best of 3 (4K) or 1 "
                                   "(16K), the reference once; the 512 x 512 run is wall time"})


if __name__ == "__main__":
    main()
