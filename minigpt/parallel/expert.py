"""Expert parallelism: a mixture-of-experts MLP (:mod:`minigpt.moe`) with its E experts spread over
N ranks, E/N each, and the tokens carried to the rank that owns their expert and back by ``all_to_all``.

Every rank holds the router and the rest of the model (replicated, as in data parallelism) and reads
its own share of the batch. In each MoE layer a rank:

1. routes its tokens (the router is the same everywhere) and sorts its (token, expert) pairs by
   expert (:func:`minigpt.moe.dispatch_order`). Experts are numbered so that rank r owns
   r E/N ... (r + 1) E/N - 1: sorted by expert is sorted by owner rank, and the rows for rank s sit
   together;
2. tells every rank how many rows it will send to each of its experts (one small ``all_to_all``
   of counts): a receiver must know the sizes before the rows arrive;
3. sends the rows (``all_to_all_single`` with per-rank split sizes: rank s receives from each rank
   what that rank sorted for it);
4. runs its experts on everything it received, all ranks' rows for one expert in one multiply;
5. sends each output back where its row came from (the inverse ``all_to_all``: the split sizes swap)
   and combines them as one process would (:func:`minigpt.moe.combine`).

Autograd runs backward through both exchanges: the gradient of an all_to_all is the all_to_all with
the split sizes swapped (:class:`_AllToAll`). The load-balancing loss uses the whole batch's
statistics (counts and probabilities summed over ranks), so it is the one-process loss on every rank.

Built in: 08_model_parallel
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from minigpt.moe import MoE, combine, dispatch_order, load_balancing_loss, route, run_experts

if TYPE_CHECKING:
    from minigpt.model import GPTConfig


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` that autograd can run backward: rows go out in ``send`` sized pieces
    (one per rank) and come in ``recv`` sized pieces; the gradient goes the opposite way, so backward
    is the same exchange with ``send`` and ``recv`` swapped."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        ctx.recv, ctx.send = recv, send
        return _exchange(rows, recv, send)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _exchange(grad, ctx.send, ctx.recv), None, None


class _AllReduceSum(torch.autograd.Function):
    """A sum over ranks that autograd can run backward: each rank's input contributes to the sum on
    every rank, so its gradient is the sum over ranks of the output's gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _exchange(rows: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    return out


def all_to_all(rows: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
    """Send ``rows`` (M, ...) in pieces of ``send[s]`` rows to rank s (in rank order), and return
    what arrives: ``recv[s]`` rows from each rank s, stacked in rank order. Differentiable: the
    gradient travels back the same way with the sizes swapped.

    Built in: 08_model_parallel
    """
    if len(send) != dist.get_world_size() or len(recv) != dist.get_world_size():
        raise ValueError(f"send={send} and recv={recv} must give one size per rank "
                         f"({dist.get_world_size()})")
    if sum(send) != rows.shape[0]:
        raise ValueError(f"send={send} sums to {sum(send)}, but there are {rows.shape[0]} rows")
    result: torch.Tensor = _AllToAll.apply(rows, recv, send)
    return result


class ExpertParallelMoE(nn.Module):
    """Rank ``rank``'s part of ``moe``: the router (a replica) and experts ``rank * E/N`` to
    ``(rank + 1) * E/N - 1`` (the same modules, so their weights are ``moe``'s). Its forward takes
    this rank's tokens only, and every rank must call it together. After a forward:
    ``aux_loss`` is the whole batch's load-balancing loss (the same on every rank), ``sent_rows``
    the rows this rank sent to each rank when dispatching (a row of the traffic matrix, its own
    rows included), and ``sent_bytes`` the bytes it sent to other ranks in the two exchanges
    (dispatch and return; the backward pass sends as much again, as gradients).

    Built in: 08_model_parallel
    """

    def __init__(self, moe: MoE, rank: int, world: int):
        super().__init__()
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} must be in [0, {world})")
        if moe.n_expert % world:
            raise ValueError(f"n_expert={moe.n_expert} must be divisible by world={world}: each rank "
                             f"owns the same number of experts")
        self.rank, self.world = rank, world
        self.n_expert, self.top_k, self.local = moe.n_expert, moe.top_k, moe.n_expert // world
        self.router = moe.router
        self.experts = nn.ModuleList(moe.experts[rank * self.local:(rank + 1) * self.local])
        self.aux_loss: torch.Tensor | None = None
        self.sent_rows: list[int] = []
        self.sent_bytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (n, C): this rank's tokens
        r = route(self.router, x, self.top_k)
        order, counts = dispatch_order(r.experts, self.n_expert)  # counts (E,): my rows per expert
        send = counts.view(self.world, self.local).sum(1).tolist()  # my rows for each rank
        # counts first: incoming[s, j] = rows rank s sends to my j-th expert
        incoming = torch.empty_like(counts)
        dist.all_to_all_single(incoming, counts)
        incoming = incoming.view(self.world, self.local)
        recv = incoming.sum(1).tolist()
        got = all_to_all(x[order // self.top_k], recv, send)  # grouped by source, then by expert
        # regroup by expert: all sources' rows for one expert together, run, and put back
        expert_of_row = torch.arange(self.local).repeat(self.world).repeat_interleave(incoming.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        done = run_experts(self.experts, got[by_expert], incoming.sum(0))  # one product per expert
        out = torch.empty_like(got).index_copy(0, by_expert, done)
        back = all_to_all(out, send, recv)  # each output to the rank its token lives on
        self.aux_loss = self._global_balancing_loss(counts, r.probs, x.shape[0])
        row_bytes = x.shape[1] * x.element_size()
        self.sent_rows = send
        self.sent_bytes = (sum(send) - send[self.rank] + sum(recv) - recv[self.rank]) * row_bytes
        return combine(back, r.weights, order, x.shape[0]).reshape(shape)

    def _global_balancing_loss(self, counts: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
        """The balancing loss of all ranks' tokens together: f and P are means over the whole batch,
        so sum the counts, the probabilities and the token counts over ranks first."""
        stats = torch.cat([counts, counts.new_tensor([n])])  # pairs per expert, then tokens
        dist.all_reduce(stats)  # no gradient: counts come from an argmax
        prob_sum = _AllReduceSum.apply(probs.sum(0))  # the gradient flows back to every rank
        return load_balancing_loss(stats[:-1], prob_sum, int(stats[-1]), self.top_k)


def shard_experts(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Replace, in place, every :class:`minigpt.moe.MoE` block MLP of ``model`` (a ``GPT`` with
    ``n_expert`` >= 1) by this rank's :class:`ExpertParallelMoE`; the experts of other ranks are
    dropped. Returns ``model``. The other parameters stay replicated: average over ranks their
    gradients of each rank's own loss, as in data parallelism (:func:`replicated_parameters` names
    them). An expert's gradient is already complete on its owner, which received every token routed
    to it; with equal batch shares, backpropagate each rank's loss divided by the number of ranks.

    Built in: 08_model_parallel
    """
    blocks = [b for b in model.modules() if isinstance(getattr(b, "mlp", None), MoE)]
    if not blocks:
        raise ValueError("model has no MoE layer: build it with GPTConfig(n_expert=E), E >= 1")
    for block in blocks:
        block.mlp = ExpertParallelMoE(block.mlp, rank, world)  # type: ignore[arg-type]
    return model


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs every rank holds a copy of after :func:`shard_experts`: all but
    the experts' (those named ``...mlp.experts...``).

    Built in: 08_model_parallel
    """
    return [(n, p) for n, p in model.named_parameters() if ".experts." not in n]


def expert_bytes_formula(leaving: int, arriving: int, n_embd: int, element_size: int) -> int:
    """Bytes a rank sends in one MoE layer's forward: its ``leaving`` rows (pairs routed to another
    rank's expert) going out, then the ``arriving`` rows it processed for other ranks going back,
    each row ``n_embd`` values of ``element_size`` bytes. Over all ranks, sum(leaving) = sum(arriving):
    the traffic is twice the rows that leave their rank.

    Built in: 08_model_parallel
    """
    return (leaving + arriving) * n_embd * element_size


def compare_with_one_process(rank: int, world: int, config: GPTConfig, batch_per_rank: int,
                             seed: int = 0) -> dict[str, Any]:
    """A function for :func:`minigpt.parallel.launch.spawn`: one training step's forward and backward
    of an MoE GPT (``config``, in float64), first on the whole batch in this process (the
    reference), then expert parallel over ``world`` ranks with this rank's ``batch_per_rank``
    sequences, gradients of the replicated parameters averaged as in data parallelism. Returns the
    largest differences from the reference (``loss``, ``grad``), this rank's ``traffic`` (per layer,
    the rows it sent to each rank) and ``sent_bytes`` (per layer).

    Built in: 08_model_parallel
    """
    import copy

    from minigpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(config).double()
    x = torch.randint(0, config.vocab_size, (world * batch_per_rank, config.block_size))
    y = torch.randint(0, config.vocab_size, x.shape)
    reference = copy.deepcopy(model)
    _, loss_ref = reference(x, y)
    loss_ref.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    shard_experts(model, rank, world)
    mine = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
    _, loss = model(x[mine], y[mine])
    (loss / world).backward()  # equal shares: the mean of the ranks' losses is the batch's
    mean = loss.detach().clone() / world
    dist.all_reduce(mean)
    worst = 0.0
    for name, p in model.named_parameters():
        if p.grad is None:
            raise ValueError(f"{name} has no gradient: every parameter takes part in the loss")
        if ".experts." in name:  # my j-th expert is the whole model's expert rank * E/N + j
            head, tail = name.split(".experts.")
            j, rest = tail.split(".", 1)
            name = f"{head}.experts.{rank * (config.n_expert // world) + int(j)}.{rest}"
        else:
            dist.all_reduce(p.grad)  # replicated: data parallelism's sum
        worst = max(worst, (p.grad - ref_grads[name]).abs().max().item())
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    return {"loss": abs(mean.item() - loss_ref.item()), "grad": worst,
            "traffic": [m.sent_rows for m in layers], "sent_bytes": [m.sent_bytes for m in layers]}
