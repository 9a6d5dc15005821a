"""A mixture-of-experts MLP: E copies of the block's MLP ("experts") and a router that sends each
token to k of them, so that a model holds E times the MLP's parameters while each token pays for k.

The steps, each a function here because expert parallelism (:mod:`minigpt.parallel.expert`) runs the
same steps with a network between them:

1. :func:`route`: a Linear C -> E without bias scores the experts; the softmax of the scores gives
   each token a probability per expert; the k largest are its experts, and their probabilities,
   renormalised to sum to 1, weight their outputs. Renormalising the chosen probabilities is the
   same as a softmax over the k chosen scores, Mixtral's convention (Jiang et al., 2024,
   arXiv:2401.04088).
2. :func:`dispatch_order`: the N x k (token, expert) pairs sorted by expert, so that each expert's
   rows are contiguous: one matrix multiply per expert.
3. :func:`run_experts`: each expert on its rows. Dropless: every pair is processed, however many
   land on one expert (no capacity limit, no token dropped).
4. :func:`combine`: each row's output times its weight, added back to its token.

Routing alone would let a few experts take every token (the router learns faster where it already
sends more). :func:`load_balancing_loss` is Switch Transformer's auxiliary loss (Fedus et al., 2021,
arXiv:2101.03961): E x sum_i f_i P_i, with f_i the fraction of the N k pairs sent to expert i and
P_i the mean router probability of expert i. It is 1 when both are uniform and grows as routing
concentrates; the model adds ``moe_aux_weight`` times it to the loss.

Built in: 08_model_parallel
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from minigpt.model import GPTConfig


class Routing(NamedTuple):
    """Where a router sends N tokens: ``weights`` (N, k) of the chosen experts (each row sums to 1),
    ``experts`` (N, k) their indices, ``probs`` (N, E) the full softmax (for the balancing loss)."""

    weights: torch.Tensor
    experts: torch.Tensor
    probs: torch.Tensor


def route(router: nn.Linear, x: torch.Tensor, top_k: int) -> Routing:
    """x (N, C) -> each token's ``top_k`` experts and their weights: the k largest softmax
    probabilities of ``router(x)``, renormalised to sum to 1 (Mixtral's convention).

    Built in: 08_model_parallel
    """
    probs = F.softmax(router(x), dim=-1)  # (N, E)
    top, experts = probs.topk(top_k, dim=-1)  # (N, k), largest first
    return Routing(top / top.sum(dim=-1, keepdim=True), experts, probs)


def dispatch_order(experts: torch.Tensor, n_expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """experts (N, k) -> (order, counts). ``order`` lists the N k (token, slot) pairs, as flat
    indices token * k + slot, grouped by expert (expert 0's first; within an expert, by token);
    ``counts`` (E,) is how many pairs each expert gets. Pair ``order[i]`` belongs to token
    ``order[i] // k``.

    Built in: 08_model_parallel
    """
    flat = experts.flatten()
    return flat.argsort(stable=True), torch.bincount(flat, minlength=n_expert)


def run_experts(experts: nn.ModuleList, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows (M, C) grouped by expert, ``counts[i]`` of them for ``experts[i]`` -> their outputs
    (M, C), in the same order. One call per expert, on all of its rows: nothing is dropped.

    Built in: 08_model_parallel
    """
    if int(counts.sum()) != rows.shape[0] or len(counts) != len(experts):
        raise ValueError(f"counts {counts.tolist()} must give one count per expert ({len(experts)}) "
                         f"summing to the {rows.shape[0]} rows")
    pieces = rows.split(counts.tolist())
    return torch.cat([expert(piece) for expert, piece in zip(experts, pieces)])


def combine(out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """out (N k, C), the experts' outputs for the pairs in ``order`` -> y (N, C): each token's sum
    of its k outputs, weighted by ``weights`` (N, k).

    Built in: 08_model_parallel
    """
    k = weights.shape[1]
    scaled = out * weights.flatten()[order].unsqueeze(1).to(out.dtype)
    return out.new_zeros(n_tokens, out.shape[1]).index_add(0, order // k, scaled)


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, n_tokens: int, top_k: int,
                        ) -> torch.Tensor:
    """Switch Transformer's balancing loss E x sum_i f_i P_i, from ``counts`` (E,) pairs per expert
    (f_i = counts_i / (N k), no gradient: it comes from an argmax) and ``prob_sum`` (E,) the router's
    probabilities summed over the N tokens (P_i = prob_sum_i / N, which carries the gradient). With
    top-k routing f counts all N k pairs, so both f and P sum to 1 and a uniform router scores
    exactly 1 (Fedus et al., 2021, count the top-1 expert only, where k = 1).

    Built in: 08_model_parallel
    """
    n_expert = counts.numel()
    f = counts.to(prob_sum.dtype) / (n_tokens * top_k)
    return n_expert * (f * (prob_sum / n_tokens)).sum()


class MoE(nn.Module):
    """A mixture-of-experts MLP in place of the block's MLP: a router ``router`` (C -> E, no bias)
    and ``experts``, E MLPs of the block's shape (C -> 4C -> C in GPT-2, or SwiGLU). Each token goes
    to its ``top_k`` experts (:func:`route`), every routed token is processed (dropless), and their outputs
    are summed with the router's renormalised weights. After each forward, ``aux_loss`` holds the
    load-balancing loss of the tokens it saw (:func:`load_balancing_loss`).

    Built in: 08_model_parallel
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        from minigpt.model import make_mlp  # here, not at the top: minigpt.model imports this module

        if config.n_expert < 1:
            raise ValueError(f"n_expert={config.n_expert}: a mixture of experts needs at least 1")
        self.n_expert, self.top_k = config.n_expert, config.expert_top_k
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(make_mlp(config) for _ in range(config.n_expert))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, C) or (N, C)
        x = x.reshape(-1, shape[-1])  # (N, C)
        r = route(self.router, x, self.top_k)
        order, counts = dispatch_order(r.experts, self.n_expert)
        out = run_experts(self.experts, x[order // self.top_k], counts)  # (N k, C)
        self.aux_loss = load_balancing_loss(counts, r.probs.sum(0), x.shape[0], self.top_k)
        return combine(out, r.weights, order, x.shape[0]).reshape(shape)
