"""Context parallelism: the sequence split over ranks, attention computed by ring attention.

Data parallelism splits the batch; the sequence of one example cannot be split the same way, because
attention couples every position with every earlier one. Ring attention splits it anyway. Each of N
ranks holds one piece of the sequence: its queries, keys and values. The key and value blocks travel
around a ring of ranks (N - 1 steps of "send to the next rank, receive from the previous one"), and
each rank folds every block it sees into its queries' result with an **online softmax**: a running
maximum and a running sum per query, rescaled whenever a larger score arrives, so that the blocks,
taken one at a time, give exactly softmax attention over all of them.

With a causal mask, blocks from the future are skipped. Split the sequence contiguously and rank r
computes r + 1 blocks while rank 0 computes one: the last rank sets the pace. The **zig-zag** split
cuts the sequence into 2N chunks and gives rank r chunks r and 2N - 1 - r, an early one and a late
one, so that every rank computes 2N + 1 chunk pairs.

The backward pass is written out (:class:`_RingAttention`): it sends the key and value blocks around
the ring once more, with their gradient accumulators travelling beside them and one extra hop to
bring each accumulator home. :func:`context_parallel_loss` runs a whole GPT this way: every layer
but attention acts on each position alone, so each rank works on its own tokens throughout.

Built in: 08_model_parallel
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minigpt.attention import causal_mask
from minigpt.model import GPT, Block, require_gpt2

Split = Literal["contiguous", "zigzag"]
SPLITS: tuple[Split, ...] = ("contiguous", "zigzag")


# --- one process: the online softmax --------------------------------------------------------------

def online_update(acc: torch.Tensor, m: torch.Tensor, s: torch.Tensor, scores: torch.Tensor,
                  v: torch.Tensor) -> None:
    """Fold one block of keys into running attention state, in place.

    ``scores`` (..., T, S) are one block's q k^T / sqrt(d), ``-inf`` where masked (every row must
    have one finite score); ``v`` (..., S, dv) its values. ``m`` (..., T) is the largest score seen so
    far, ``s`` (..., T) the sum of exp(score - m), ``acc`` (..., T, dv) the sum of exp(score - m) v.
    When a larger score arrives, the old sums are rescaled by exp(m_old - m_new); at the end
    ``acc / s`` is softmax attention over every block folded in.

    Built in: 08_model_parallel
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))
    rescale = torch.exp(m - m_new)  # 0 while m is still -inf
    p = torch.exp(scores - m_new.unsqueeze(-1))
    s.mul_(rescale).add_(p.sum(dim=-1))
    acc.mul_(rescale.unsqueeze(-1)).add_(p @ v)
    m.copy_(m_new)


def online_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_blocks: int,
                     causal: bool = True) -> torch.Tensor:
    """Attention over ``n_blocks`` blocks of keys taken one at a time with an online softmax; equal to
    ``softmax(q k^T / sqrt(d) + mask) v``. Shapes: q (..., T, d), k and v (..., T, d); T must be
    divisible by ``n_blocks``. With ``causal``, blocks entirely in a query block's future are skipped
    and the diagonal block is masked.

    Built in: 08_model_parallel
    """
    t = q.shape[-2]
    if n_blocks < 1 or t % n_blocks:
        raise ValueError(f"n_blocks={n_blocks} must be a positive divisor of the length T={t}")
    c, scale = t // n_blocks, 1.0 / math.sqrt(q.shape[-1])
    out = []
    for i in range(n_blocks):
        qi = q[..., i * c:(i + 1) * c, :]
        m = torch.full(qi.shape[:-1], float("-inf"), dtype=q.dtype)
        s = torch.zeros(qi.shape[:-1], dtype=q.dtype)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=q.dtype)
        for j in range(i + 1 if causal else n_blocks):
            scores = qi @ k[..., j * c:(j + 1) * c, :].transpose(-2, -1) * scale
            if causal and j == i:
                scores = scores.masked_fill(~causal_mask(c), float("-inf"))
            online_update(acc, m, s, scores, v[..., j * c:(j + 1) * c, :])
        out.append(acc / s.unsqueeze(-1))
    return torch.cat(out, dim=-2)


# --- how the sequence is split, and which blocks each rank computes --------------------------------

def chunks_of(rank: int, world: int, split: Split) -> list[int]:
    """The chunks of the sequence that ``rank`` holds: chunk ``rank`` of ``world`` (contiguous), or
    chunks ``rank`` and ``2 world - 1 - rank`` of ``2 world`` (zig-zag).

    Built in: 08_model_parallel
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"rank={rank} must be in [0, world={world}) with world >= 1")
    return [rank] if split == "contiguous" else [rank, 2 * world - 1 - rank]


def split_sequence(x: torch.Tensor, world: int, split: Split, dim: int = -2) -> list[torch.Tensor]:
    """Cut ``x`` along ``dim`` (the sequence) into each rank's share: its chunks, concatenated.

    Built in: 08_model_parallel
    """
    n_chunks = len(chunks_of(0, world, split)) * world
    if x.shape[dim] % n_chunks:
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by {n_chunks} chunks "
                         f"({split} split over world={world})")
    pieces = x.chunk(n_chunks, dim=dim)
    return [torch.cat([pieces[c] for c in chunks_of(r, world, split)], dim=dim) for r in range(world)]


def gather_sequence(parts: list[torch.Tensor], split: Split, dim: int = -2) -> torch.Tensor:
    """The inverse of :func:`split_sequence`: put every rank's chunks back in sequence order.

    Built in: 08_model_parallel
    """
    world = len(parts)
    per_rank = len(chunks_of(0, world, split))
    ordered: list[torch.Tensor | None] = [None] * (per_rank * world)
    for r, part in enumerate(parts):
        for c, piece in zip(chunks_of(r, world, split), part.chunk(per_rank, dim=dim)):
            ordered[c] = piece
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockPair:
    """One (query chunk, key chunk) pair that ``rank`` computes at ring ``step``; ``diagonal`` pairs
    are masked inside (query and key chunk are the same).

    Built in: 08_model_parallel
    """

    rank: int
    step: int
    q_chunk: int
    k_chunk: int
    diagonal: bool


def ring_schedule(world: int, split: Split) -> list[BlockPair]:
    """Every block pair ring attention computes with a causal mask: at step s, rank r holds the keys
    and values of rank (r - s) mod N and pairs each of its query chunks with each key chunk that is
    not in its future. Pairs with a later key chunk are skipped.

    Built in: 08_model_parallel
    """
    pairs = []
    for rank in range(world):
        for step in range(world):
            source = (rank - step) % world
            for i in chunks_of(rank, world, split):
                for j in chunks_of(source, world, split):
                    if j <= i:
                        pairs.append(BlockPair(rank, step, i, j, i == j))
    return pairs


def causal_work(world: int, split: Split) -> list[int]:
    """Chunk pairs each rank computes (diagonal pairs counted whole): r + 1 for the contiguous split,
    2 N + 1 for the zig-zag split, on every rank.

    Built in: 08_model_parallel
    """
    work = [0] * world
    for pair in ring_schedule(world, split):
        work[pair.rank] += 1
    return work


def ring_bytes_per_rank(shape: tuple[int, ...], world: int, itemsize: int) -> dict[str, int]:
    """Bytes each rank sends in one ring attention call whose local keys have ``shape`` (B, H, T/N, d)
    (values the same): forward, K and V in N - 1 steps, 2 (N - 1) blocks; backward, K and V again and
    their gradients in N steps (one more, to bring each home), 2 (2N - 1) blocks. The split (contiguous
    or zig-zag) does not change it.

    Built in: 08_model_parallel
    """
    if world < 1:
        raise ValueError(f"world={world} must be at least 1")
    block = math.prod(shape) * itemsize
    if world == 1:
        return {"forward": 0, "backward": 0}
    return {"forward": 2 * (world - 1) * block, "backward": 2 * (2 * world - 1) * block}


# --- many processes: the ring ---------------------------------------------------------------------

@dataclass
class RingStats:
    """What one rank did in ring attention calls: bytes sent, block pairs computed, score entries a
    query may attend to, and the CPU seconds of this thread spent computing (not waiting).

    Built in: 08_model_parallel
    """

    bytes_forward: int = 0
    bytes_backward: int = 0
    pairs_forward: int = 0
    scores_forward: int = 0
    compute_seconds_forward: float = 0.0
    compute_seconds_backward: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Rotation:
    """Send a tensor to the next rank and receive the previous rank's, without waiting: ``wait()``
    returns what arrived. ``tag`` keeps two rotations in flight apart."""

    def __init__(self, x: torch.Tensor, tag: int, stats: RingStats | None, key: str):
        rank, world = dist.get_rank(), dist.get_world_size()
        x = x.contiguous()
        self.received = torch.empty_like(x)
        self.works = [dist.isend(x, (rank + 1) % world, tag=tag),
                      dist.irecv(self.received, (rank - 1) % world, tag=tag)]
        if stats is not None:
            setattr(stats, key, getattr(stats, key) + x.numel() * x.element_size())

    def wait(self) -> torch.Tensor:
        for w in self.works:
            if w is not None:  # None only when this rank is not in the group, never here
                w.wait()
        return self.received


def _pairs(rank: int, source: int, world: int, split: Split, c: int):
    """(query slice, key slice, diagonal) in local coordinates for each pair rank computes against
    the block of ``source``."""
    for a, i in enumerate(chunks_of(rank, world, split)):
        for b, j in enumerate(chunks_of(source, world, split)):
            if j <= i:
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), i == j


class _RingAttention(torch.autograd.Function):
    """Causal ring attention with its backward written out (the ring runs twice)."""

    @staticmethod
    def forward(ctx, q, k, v, split, stats):
        rank, world = dist.get_rank(), dist.get_world_size()
        per_rank = len(chunks_of(rank, world, split))
        c, scale = q.shape[-2] // per_rank, 1.0 / math.sqrt(q.shape[-1])
        m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
        s = torch.zeros(q.shape[:-1], dtype=q.dtype)
        acc = torch.zeros_like(q)
        kv = torch.stack([k, v])
        for step in range(world):
            # start passing this block on before using it: the transfer overlaps the compute
            rotation = _Rotation(kv, 0, stats, "bytes_forward") if step < world - 1 else None
            start = time.thread_time()
            for qs, ks, diagonal in _pairs(rank, (rank - step) % world, world, split, c):
                scores = q[..., qs, :] @ kv[0][..., ks, :].transpose(-2, -1) * scale
                if diagonal:
                    scores = scores.masked_fill(~causal_mask(c), float("-inf"))
                online_update(acc[..., qs, :], m[..., qs], s[..., qs], scores, kv[1][..., ks, :])
                if stats is not None:
                    stats.pairs_forward += 1
                    stats.scores_forward += int(scores.isfinite().sum()) // math.prod(q.shape[:-2])
            if stats is not None:
                stats.compute_seconds_forward += time.thread_time() - start
            if rotation is not None:
                kv = rotation.wait()
        out = acc / s.unsqueeze(-1)
        ctx.save_for_backward(q, k, v, out, m + torch.log(s))
        ctx.split, ctx.stats = split, stats
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        split, stats = ctx.split, ctx.stats
        rank, world = dist.get_rank(), dist.get_world_size()
        per_rank = len(chunks_of(rank, world, split))
        c, scale = q.shape[-2] // per_rank, 1.0 / math.sqrt(q.shape[-1])
        delta = (dout * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O): softmax's backward term
        dq = torch.zeros_like(q)
        kv, dkv = torch.stack([k, v]), torch.zeros(2, *k.shape, dtype=k.dtype)
        for step in range(world):
            rotation = _Rotation(kv, 0, stats, "bytes_backward") if step < world - 1 else None
            start = time.thread_time()
            for qs, ks, diagonal in _pairs(rank, (rank - step) % world, world, split, c):
                kb, vb = kv[0][..., ks, :], kv[1][..., ks, :]
                scores = q[..., qs, :] @ kb.transpose(-2, -1) * scale
                if diagonal:
                    scores = scores.masked_fill(~causal_mask(c), float("-inf"))
                p = torch.exp(scores - lse[..., qs].unsqueeze(-1))  # the forward's weights
                do = dout[..., qs, :]
                dkv[1][..., ks, :] += p.transpose(-2, -1) @ do
                ds = p * (do @ vb.transpose(-2, -1) - delta[..., qs, :])
                dq[..., qs, :] += ds @ kb * scale
                dkv[0][..., ks, :] += ds.transpose(-2, -1) @ q[..., qs, :] * scale
            if stats is not None:
                stats.compute_seconds_backward += time.thread_time() - start
            if world > 1:  # the accumulators follow their block; the last hop brings them home
                dkv = _Rotation(dkv, 1, stats, "bytes_backward").wait()
            if rotation is not None:
                kv = rotation.wait()
        return dq, dkv[0], dkv[1], None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: Split = "contiguous",
                   stats: RingStats | None = None) -> torch.Tensor:
    """Causal attention over a sequence split across the ranks of the default process group.

    Each rank passes its share (from :func:`split_sequence`): q, k, v (..., T/N, d). Returns this
    rank's share of softmax(q k^T / sqrt(d) + causal mask) v over the whole sequence, differentiable
    (the backward pass runs the ring again). ``stats``, if given, collects bytes sent, work and
    compute time.

    Built in: 08_model_parallel
    """
    if not dist.is_initialized():
        raise ValueError("ring_attention needs a process group: run it under spawn or torchrun")
    per_rank = len(chunks_of(dist.get_rank(), dist.get_world_size(), split))
    if q.shape != k.shape or k.shape != v.shape or q.dim() < 2 or q.shape[-2] % per_rank:
        raise ValueError(f"q, k, v must share one shape (..., T/N, d) with T/N divisible by "
                         f"{per_rank} ({split}); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _RingAttention.apply(q, k, v, split, stats)


def ring_attention_worker(rank: int, world: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          dout: torch.Tensor, splits: tuple[Split, ...] = SPLITS,
                          repeats: int = 1) -> dict[str, Any]:
    """Run in each process by :func:`minigpt.parallel.launch.spawn`: for each split, take this rank's
    share of the whole q, k, v, run :func:`ring_attention` forward, then backward with the loss
    ``(out * dout).sum()`` (so the output's gradient is ``dout``'s share). Returns, by split, this
    rank's output, the gradients of its q, k, v, and its :class:`RingStats` as a dict. With
    ``repeats`` > 1 every split runs that many times and the last run is returned: the first run of
    a process pays for touching fresh memory, which would blur its compute times.

    Built in: 08_model_parallel
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    results: dict[str, Any] = {}
    for split in [s for _ in range(repeats) for s in splits]:
        ql, kl, vl = (split_sequence(x, world, split)[rank].clone().requires_grad_() for x in (q, k, v))
        stats = RingStats()
        out = ring_attention(ql, kl, vl, split=split, stats=stats)
        (out * split_sequence(dout, world, split)[rank]).sum().backward()
        results[split] = {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
                          "stats": stats.as_dict()}
    return results


# --- a whole GPT with its sequence split ----------------------------------------------------------

def context_parallel_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor,
                          split: Split = "contiguous") -> torch.Tensor:
    """This rank's share of a :class:`minigpt.model.GPT`'s loss on (idx, targets) (B, T) with the
    sequence split over the ranks of the default process group: the rank embeds only its own
    positions, every layer but attention works on them alone, and attention runs as
    :func:`ring_attention`. The share is this rank's sum of cross-entropies divided by the whole
    batch's count of targets, so the ranks' shares add up to the one-process loss, and so do their
    gradients (an all-reduce of each parameter's gradient then gives the one-process gradient).

    Built in: 08_model_parallel
    """
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a minigpt GPT; got {type(model).__name__}")
    config = model.config
    require_gpt2(config, "context_parallel_loss")
    if config.n_expert or config.mup or config.dropout:
        raise ValueError(f"context_parallel_loss runs a dense GPT in the standard parametrisation without "
                         f"dropout; got n_expert={config.n_expert}, mup_base_width={config.mup_base_width}, "
                         f"dropout={config.dropout}")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = idx.shape[1]
    if t > config.block_size:
        raise ValueError(f"T={t} exceeds block_size={config.block_size}")
    pos = split_sequence(torch.arange(t), world, split, dim=0)[rank]
    idx_mine = split_sequence(idx, world, split, dim=1)[rank]
    targets_mine = split_sequence(targets, world, split, dim=1)[rank]
    body = model.transformer
    x = body.wte(idx_mine) + body.wpe(pos)  # (B, T/N, C): this rank's positions only
    for module in body.h:
        block = cast(Block, module)
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(attn.n_embd, dim=2)
        y = ring_attention(attn.split_heads(q), attn.split_heads(k), attn.split_heads(v), split=split)
        x = x + attn.c_proj(attn.merge_heads(y))
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(body.ln_f(x))
    count = (targets != -100).sum()
    return F.cross_entropy(logits.flatten(0, 1), targets_mine.flatten(), ignore_index=-100,
                           reduction="sum") / count


def context_parallel_worker(rank: int, world: int, model: GPT, idx: torch.Tensor,
                            targets: torch.Tensor, split: Split = "contiguous") -> dict[str, Any]:
    """Run in each process by :func:`minigpt.parallel.launch.spawn`: :func:`context_parallel_loss`
    on this rank's share of the sequence, backward, then the loss and every gradient summed over the
    ranks. Returns the loss and the gradients by parameter name.

    Built in: 08_model_parallel
    """
    model.zero_grad(set_to_none=True)  # a model sent with gradients would add to them
    loss = context_parallel_loss(model, idx, targets, split)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g
    return {"loss": total, "grads": grads}
