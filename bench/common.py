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


def interleaved(fns: dict, blocks: int, per_block: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``blocks`` rounds of ``per_block`` calls, the blocks
    of all functions taken in turn (A, B, A, B, ...) so that a change in the machine's speed hits all
    alike; compare them round by round (see :func:`median_ratio`)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            rounds[name].append((time.perf_counter() - start) / per_block)
    return rounds


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a[i] / b[i]: the two measured side by side, round by round."""
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


class OtherWork:
    """CPU time that other processes used while the block ran, in cores (0: the machine was ours; 1: one
    other core's worth of work competed with ours), from /proc/stat; None where there is none."""

    def __enter__(self) -> OtherWork:
        self.cores: float | None = None
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, start = self._start
        now = _busy_seconds()
        if busy is not None and now is not None:
            others = (now - busy) - (_own_seconds() - own)
            self.cores = max(0.0, others) / (time.perf_counter() - start)


def _busy_seconds() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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
