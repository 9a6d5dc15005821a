"""Functions that tests run in several processes with ``minigpt.parallel.launch.spawn`` (a new
process imports them by name, so they live in a module)."""

import torch
import torch.distributed as dist


def rank_sum(rank, world, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t}


def fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.barrier()
