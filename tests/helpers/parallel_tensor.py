"""Functions that the tensor-parallel tests run in several processes (``spawn`` imports them by name).
Each builds the same GPT from a seed, splits it, and returns what the test compares with one process."""

import torch
from torch.distributed.device_mesh import init_device_mesh

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.tensor import (
    AllReduceCounter,
    dp_tp_gpt,
    gather_tensor_parallel,
    megatron_gpt,
    qkv_from_tp,
    tensor_parallel_gpt,
)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A float64 GPT small enough to run in a few processes in a second."""
    torch.manual_seed(seed)
    kw = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    kw.update(overrides)
    return GPT(GPTConfig(**kw)).double()


def full_grads_and_weights(model: GPT, tp: int, grads: bool = True) -> dict:
    """Every parameter (or its gradient) as one whole tensor, c_attn's rows back to [q | k | v]."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if "c_attn" in name:
            t = qkv_from_tp(t, model.config.n_embd, tp)
        out[name] = t.clone()
    return out


def dp_tp_adamw_steps(rank, world, idx, targets, steps, lr):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = dp_tp_gpt(tiny_gpt(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    dp = mesh["dp"].get_local_rank()
    rows = idx.shape[0] // 2
    mine = slice(dp * rows, (dp + 1) * rows)  # this data rank's half of the global batch
    losses = []
    for _ in range(steps):
        _, loss = model(idx[mine], targets[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "weights": full_grads_and_weights(model, world // 2, grads=False)}


def _counted_step(model, idx, targets):
    """One forward and backward, the collectives of each counted apart."""
    with AllReduceCounter() as fwd:
        _, loss = model(idx, targets)
    with AllReduceCounter() as bwd:
        loss.backward()
    return loss.detach(), (fwd.calls, fwd.tensor_bytes), (bwd.calls, bwd.tensor_bytes)


def both_tp_ways(rank, world, idx, targets):
    """The written-out layout and torch's DTensor one, on the same model, batch and processes."""
    out = {}
    model = megatron_gpt(tiny_gpt(), rank, world)
    loss, fwd, bwd = _counted_step(model, idx, targets)
    grads = gather_tensor_parallel(model, grads=True)
    out["megatron"] = {"loss": loss, "grads": grads, "fwd": fwd, "bwd": bwd}
    model = tensor_parallel_gpt(tiny_gpt(), init_device_mesh("cpu", (world,)))
    loss, fwd, bwd = _counted_step(model, idx, targets)
    out["dtensor"] = {"loss": loss, "grads": full_grads_and_weights(model, world), "fwd": fwd, "bwd": bwd}
    return out
