"""Functions that tests/test_parallel_zero.py runs in several processes with ``spawn``."""

import torch
import torch.distributed as dist

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.launch import shard_range
from minigpt.parallel.zero import fully_shard_gpt, train_zero, train_zero_stages

CONFIG = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def small_gpt(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CONFIG)).to(dtype)


def batch(seed: int = 1, b: int = 4, t: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG["vocab_size"], (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def fsdp_loss_and_grads(rank, world):
    """FSDP2 over ``world`` ranks, each on its slice of the global batch: the mean loss over ranks
    and every gradient gathered whole."""
    model = fully_shard_gpt(small_gpt())
    x, y = batch()
    mine = shard_range(x.shape[0], rank, world)
    _, loss = model(x[mine], y[mine])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    return {"loss": mean_loss / world, "grads": grads, "sharded": sharded}


def everything(rank, world):
    """All the checks in one group of processes (starting one costs seconds): FSDP2's gradients,
    every stage in float64 and in mixed precision, stage 1 and 2 with several buckets in float32."""
    out = {"fsdp": fsdp_loss_and_grads(rank, world), **train_zero_stages(rank, world, CONFIG)}
    for stage in (1, 2):
        out[f"fp32-buckets-{stage}"] = train_zero(rank, world, stage, CONFIG, precision="fp32",
                                                  bucket_numel=5000)
    return out
