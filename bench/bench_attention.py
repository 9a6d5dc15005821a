"""Forward + backward time of the written-out attention against PyTorch's fused SDPA."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import best_of, write  # noqa: E402
from minigpt.attention import scaled_dot_product_attention  # noqa: E402

B, H, HEAD_DIM = 2, 8, 64


def explicit(q, k, v):
    return scaled_dot_product_attention(q, k, v, is_causal=True)[0]


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd_seconds(fn, q, k, v) -> float:
    def step():
        fn(q, k, v).sum().backward()

    return best_of(step, repeat=5)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for t in (256, 512, 1024):
        q, k, v = (torch.randn(B, H, t, HEAD_DIM, requires_grad=True) for _ in range(3))
        ours, theirs = fwd_bwd_seconds(explicit, q, k, v), fwd_bwd_seconds(fused, q, k, v)
        rows += [
            {"benchmark": f"T={t}: explicit attention fwd+bwd", "value": ours * 1e3, "unit": "ms"},
            {"benchmark": f"T={t}: F.scaled_dot_product_attention fwd+bwd", "value": theirs * 1e3,
             "unit": "ms"},
            {"benchmark": f"T={t}: explicit / SDPA", "value": ours / theirs, "unit": "x"},
        ]
    write("attention", rows, {"shape": f"B={B}, H={H}, head_dim={HEAD_DIM}, causal, float32, CPU",
                              "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
