"""All-reduce on gloo: two processes on this machine, time against message size, measured against
the ring formula 2 (N - 1) alpha + 2 (N - 1) / N x bytes / beta, with alpha and beta fitted in the
same run to two-way exchanges (both processes sending at once, as in a ring step) and, for
comparison, to one-way messages."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write  # noqa: E402
from minigpt.distributed import LinkModel, measure  # noqa: E402

SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB ... 64 MiB


def main() -> None:
    times = measure(SIZES, nproc=2, repeats=20)
    link = LinkModel.fit(times["sizes"], times["exchange"])
    one_way = LinkModel.fit(times["sizes"], times["message"])
    rows = []
    for size, allreduce in zip(times["sizes"], times["allreduce"]):
        predicted = link.ring_allreduce(size, times["world"])
        label = f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size / 2**10:g} KiB"
        rows.append({"benchmark": f"all-reduce {label}: measured / formula", "value": allreduce / predicted,
                     "unit": "x",
                     "target": f"measured {allreduce * 1e3:.3f} ms, formula {predicted * 1e3:.3f} ms"})
    rows.append({"benchmark": "fitted alpha, two-way exchanges", "value": link.alpha * 1e6, "unit": "us"})
    rows.append({"benchmark": "fitted beta, two-way exchanges", "value": link.beta / 1e9, "unit": "GB/s"})
    rows.append({"benchmark": "fitted beta, one-way messages", "value": one_way.beta / 1e9, "unit": "GB/s"})
    big = times["sizes"][-1]
    rows.append({"benchmark": f"all-reduce {big / 2**20:g} MiB / one-way formula",
                 "value": times["allreduce"][-1] / one_way.ring_allreduce(big, times["world"]), "unit": "x"})
    write("allreduce", rows, {"times": times, "alpha": link.alpha, "beta": link.beta})


if __name__ == "__main__":
    main()
