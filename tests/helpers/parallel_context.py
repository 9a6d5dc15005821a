"""Functions that tests/test_parallel_context.py runs in several processes with ``spawn``."""

import torch

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.context import SPLITS, context_parallel_worker, ring_attention, ring_attention_worker


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=12, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).double()


def gpt_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32, (2, 13), generator=g)
    targets = x[:, 1:].clone()
    targets[0, 5] = -100  # an ignored target: the loss divides by the count of the others
    return x[:, :-1], targets


def both_splits(rank, world, q, k, v, dout):
    """Ring attention with each split, forward and backward: one result per split; a small GPT's
    loss and gradients with its sequence split, per split; and the error ring_attention gives for a
    zig-zag share that cannot be cut into two chunks."""
    results = ring_attention_worker(rank, world, q, k, v, dout)
    results["gpt"] = {split: context_parallel_worker(rank, world, small_gpt(), *gpt_batch(), split)
                      for split in SPLITS}
    x = torch.zeros(1, 1, 3, 4)
    try:
        ring_attention(x, x, x, split="zigzag")
        results["error"] = "no error"
    except ValueError as error:
        results["error"] = str(error)
    return results
