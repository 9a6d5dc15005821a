"""Functions that tests/test_parallel_context.py runs in several processes with ``spawn``."""

import torch

from minigpt.parallel.context import ring_attention, ring_attention_worker


def both_splits(rank, world, q, k, v, dout):
    """Ring attention with each split, forward and backward: one result per split; and the error
    ring_attention gives for a zig-zag share that cannot be cut into two chunks."""
    results = ring_attention_worker(rank, world, q, k, v, dout)
    x = torch.zeros(1, 1, 3, 4)
    try:
        ring_attention(x, x, x, split="zigzag")
        results["error"] = "no error"
    except ValueError as error:
        results["error"] = str(error)
    return results
