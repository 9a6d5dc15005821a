"""Placement on the full WSE-2 grid (750 x 994): how fast a 40-layer placement evaluates (target:
under 50 ms), and how long the optimizer takes (target: under 30 s). The model has 40 layers 1024
wide (0.5B parameters), layer-pipelined in inference at context 2048."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, write  # noqa: E402
from minigpt.model import GPTConfig  # noqa: E402
from wafer.hardware import MODEL_DTYPE, WSE2  # noqa: E402
from wafer.optimize import optimize  # noqa: E402
from wafer.placement import evaluate  # noqa: E402
from wafer.stages import pipeline_stages  # noqa: E402
from wafer.strategies import STRATEGIES  # noqa: E402
from wafer.target import Target  # noqa: E402
from wafer.workload import gpt_workload  # noqa: E402


def main() -> None:
    # 40 layers of 13B's width do not fit on one wafer; 40 layers 1024 wide do (0.5B parameters)
    config = GPTConfig(n_layer=40, n_head=16, n_embd=1024, block_size=2048, vocab_size=50257)
    stages = pipeline_stages(gpt_workload(config, dtype=MODEL_DTYPE))
    target = Target(WSE2, "inference", context=2048)
    rows = []
    for name, make in STRATEGIES.items():
        placement = make(stages, target)
        t = best_of(lambda p=placement: evaluate(p), repeat=10)
        result = evaluate(placement)
        note = f"< 50 ms ({result.tokens_per_s:.3g} tokens/s, utilisation {result.utilisation:.2f})"
        rows.append({"benchmark": f"evaluate, 42 stages, {name}", "value": t * 1e3, "unit": "ms",
                     "target": note})
    start = time.perf_counter()
    best = evaluate(optimize(stages, target))
    rows.append({"benchmark": "optimize, 42 stages", "value": time.perf_counter() - start, "unit": "s",
                 "target": f"< 30 s ({best.tokens_per_s:.3g} tokens/s, utilisation {best.utilisation:.3f})"})
    write("placement", rows)


if __name__ == "__main__":
    main()
