"""Shared by the benchmarks: the machine's description, timing, and writing results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version()}


def best_of(fn, repeat: int = 3) -> float:
    """The fastest of ``repeat`` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """Print a table of ``rows`` (benchmark, value, unit, target) and write them as JSON."""
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": machine(), "rows": rows, **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    print(f"{name}: {m['cpu']}, {m['cores']} cores, {m['system']}, Python {m['python']}")
    width = max(len(r["benchmark"]) for r in rows)
    for r in rows:
        print(f"  {r['benchmark']:<{width}}  {r['value']:>10.3f} {r['unit']:<6} {r.get('target', '')}")
