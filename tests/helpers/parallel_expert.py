"""Workers for tests/test_parallel_expert.py: expert parallelism in N processes against the same model
on one process (each rank also computes the one-process reference on the whole batch, from the same
seed, so that nothing but the comparison travels back)."""

import copy

import torch
import torch.distributed as dist

from minigpt.model import GPT, GPTConfig
from minigpt.moe import MoE, route
from minigpt.parallel.expert import (
    ExpertParallelMoE,
    compare_with_one_process,
    expert_bytes_formula,
    replicated_parameters,
    shard_experts,
)
from minigpt.parallel.launch import shard_range


def _config(n_expert, top_k, aux):
    return GPTConfig(block_size=8, vocab_size=30, n_layer=2, n_head=2, n_embd=12, n_expert=n_expert,
                     expert_top_k=top_k, moe_aux_weight=aux)


def _worst(a, b):
    return (a - b).abs().max().item()


def moe_layer(rank, world, n_expert, top_k, seed):
    """One MoE layer, float64: outputs, loss (squared error + 0.1 x aux) and every gradient, expert
    parallel against one process; and the bytes sent against the formula."""
    torch.manual_seed(seed)
    moe = MoE(_config(n_expert, top_k, 0.1)).double()
    x = torch.randn(world * 3, 5, 12, dtype=torch.float64)  # 3 sequences per rank
    target = torch.randn_like(x)
    ref = copy.deepcopy(moe)
    y_ref = ref(x)
    loss_ref = ((y_ref - target) ** 2).mean() + 0.1 * ref.aux_loss
    loss_ref.backward()

    ep = ExpertParallelMoE(copy.deepcopy(moe), rank, world)
    mine = shard_range(x.shape[0], rank, world)
    y = ep(x[mine])
    # my share of the one-process loss: my squared errors over the whole batch's count, and 1/world of
    # the balancing loss (the same on every rank); the shares sum to the one-process loss
    share = ((y - target[mine]) ** 2).sum() / target.numel() + 0.1 * ep.aux_loss / world
    share.backward()
    total = share.detach().clone()
    dist.all_reduce(total)
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # replicated: each rank holds the gradient of its own tokens' share
    expert_worst = max(_worst(p.grad, q.grad) for p, q in
                       zip(ep.experts.parameters(), ref.experts[rank * n_expert // world:
                                                                (rank + 1) * n_expert // world].parameters()))
    # the formula, from the one-process routing: a pair leaves when its expert lives on another rank
    r = route(ref.router, x.reshape(-1, 12), top_k)
    owner = r.experts // (n_expert // world)
    home = (torch.arange(x.shape[0] * 5) // 5 // (x.shape[0] // world)).unsqueeze(1).expand_as(owner)
    leaving = int(((home == rank) & (owner != rank)).sum())
    arriving = int(((owner == rank) & (home != rank)).sum())
    return {"y": _worst(y, y_ref[mine]), "loss": abs(total.item() - loss_ref.item()),
            "aux": abs(ep.aux_loss.item() - ref.aux_loss.item()),
            "router_grad": _worst(router_grad, ref.router.weight.grad), "expert_grad": expert_worst,
            "sent_bytes": ep.sent_bytes, "formula_bytes": expert_bytes_formula(leaving, arriving, 12, 8),
            "leaving": leaving, "sent_rows": ep.sent_rows}


def moe_gpt(rank, world, seed):
    """A 2-layer MoE GPT, float64, with shard_experts: the loss (cross-entropy + 0.1 x aux) and every
    gradient, against the whole model on one process."""
    torch.manual_seed(seed)
    model = GPT(_config(2 * world, 2, 0.1)).double()
    x = torch.randint(0, 30, (2 * world, 8))
    y = torch.randint(0, 30, (2 * world, 8))
    ref = copy.deepcopy(model)
    _, loss_ref = ref(x, y)
    loss_ref.backward()
    grads = dict(ref.named_parameters())

    shard_experts(model, rank, world)
    mine = shard_range(x.shape[0], rank, world)
    _, loss = model(x[mine], y[mine])
    (loss / world).backward()  # equal shares: the mean of the ranks' losses is the batch's loss
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    worst = 0.0
    for name, p in replicated_parameters(model):
        dist.all_reduce(p.grad)  # data parallelism for everything but the experts
        worst = max(worst, _worst(p.grad, grads[name].grad))
    local = len(model.transformer.h[0].mlp.experts)
    for name, p in model.named_parameters():
        if ".experts." in name:  # my expert j is expert rank * local + j of the whole model
            head, tail = name.split(".experts.")
            j, rest = tail.split(".", 1)
            worst = max(worst, _worst(p.grad, grads[f"{head}.experts.{rank * local + int(j)}.{rest}"].grad))
    n_experts_here = sum(1 for n, _ in model.named_parameters() if n.endswith("experts.0.c_fc.weight"))
    return {"loss": abs(mean_loss.item() / world - loss_ref.item()), "grad": worst,
            "experts_per_layer": local, "layers": n_experts_here}


def all_checks(rank, world, layer_cases, seed):
    """Every check in one process group (starting processes costs seconds): the MoE layer for each
    (n_expert, top_k) in ``layer_cases``, then the MoE GPT."""
    layers = [moe_layer(rank, world, e, k, seed + i) for i, (e, k) in enumerate(layer_cases)]
    return {"layers": layers, "gpt": moe_gpt(rank, world, seed),
            "package": compare_with_one_process(rank, world, _config(2 * world, 2, 0.1), 2, seed)}
