"""Tensor parallelism: every weight matrix of a block split over ranks (Megatron-LM's layout).

Data parallelism copies the whole model to every rank; once one layer's weights, gradients and
optimizer state do not fit a device, copying no longer helps. Tensor parallelism splits each matrix
instead. In a block the split follows Shoeybi et al. (2019, arXiv:1909.08053):

- the first matrix of each sublayer (attention's fused ``c_attn``, the MLP's ``c_fc``) is split by
  its output columns ("column parallel"): each rank computes its own slice of the features (its own
  heads, its own share of the 4C hidden units) from the whole input, and needs no communication;
- the second (``c_proj`` in both) is split by its input rows ("row parallel"): each rank multiplies
  its slice of the features by its rows and gets a partial sum of the output. One all-reduce adds the
  partial sums.

So each sublayer costs one all-reduce of (B, T, C) forward, and one backward (where the input's
gradient, a sum over the ranks' column slices, is added up). This module holds the regrouping of the
fused query/key/value matrix that makes a contiguous split hold whole heads, the layout with torch's
DTensor tools (:func:`tensor_parallel_gpt`, and :func:`dp_tp_gpt` on a 2-D data x tensor mesh), and
the same layout written out with two autograd-aware collectives (:func:`megatron_gpt`).

Built in: 08_model_parallel
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from minigpt.attention import MultiHeadAttention
from minigpt.model import GPT, MLP, Block, GPTConfig, require_gpt2
from minigpt.parallel.launch import CollectiveCounter, shard_range

# --- the fused query/key/value matrix -----------------------------------------------------------------


def _check_qkv_rows(t: torch.Tensor, n_embd: int, tp: int) -> None:
    if tp < 1 or n_embd % tp:
        raise ValueError(f"n_embd={n_embd} must be divisible by the tensor-parallel size tp={tp} (>= 1)")
    if t.dim() < 1 or t.shape[0] != 3 * n_embd:
        raise ValueError(f"t of shape {tuple(t.shape)} must have 3 * n_embd = {3 * n_embd} rows "
                         f"([q | k | v]) along dim 0")


def qkv_to_tp(t: torch.Tensor, n_embd: int, tp: int) -> torch.Tensor:
    """Reorder the rows of ``c_attn``'s weight, bias or optimizer moment from [q | k | v] to
    [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...], where q_r holds rank r's n_embd / tp query rows
    (its own heads). Cut into tp contiguous pieces, piece r is then [q_r | k_r | v_r]: the queries,
    keys and values of the same heads, which is what a column-parallel split hands rank r.

    Built in: 08_model_parallel
    """
    _check_qkv_rows(t, n_embd, tp)
    rest = t.shape[1:]
    return t.reshape(3, tp, n_embd // tp, *rest).transpose(0, 1).reshape(3 * n_embd, *rest)


def qkv_from_tp(t: torch.Tensor, n_embd: int, tp: int) -> torch.Tensor:
    """The inverse of :func:`qkv_to_tp`: back to the ordinary [q | k | v] rows, so that a checkpoint
    of a tensor-parallel run loads into one process.

    Built in: 08_model_parallel
    """
    _check_qkv_rows(t, n_embd, tp)
    rest = t.shape[1:]
    return t.reshape(tp, 3, n_embd // tp, *rest).transpose(0, 1).reshape(3 * n_embd, *rest)


def _check_split(n_head: int, n_embd: int, tp: int) -> None:
    if n_head % tp or (4 * n_embd) % tp:
        raise ValueError(f"n_head={n_head} and 4 * n_embd={4 * n_embd} must be divisible by the "
                         f"tensor-parallel size {tp}: each rank holds whole heads and an equal share "
                         f"of the MLP's hidden units")


class LocalHeadsAttention(MultiHeadAttention):
    """Multi-head attention over one rank's heads: ``c_attn`` maps the whole input (B, T, C) to this
    rank's [q_r | k_r | v_r] (3 n_embd / tp features), attention runs on its n_head / tp heads, and
    ``c_proj`` maps them back to C (a partial sum until the row-parallel all-reduce). ``n_embd`` and
    ``n_head`` are the local values; ``full_embd`` is the model's width, what the input must have.
    For training: no KV cache, no masks beyond the causal one.

    Built in: 08_model_parallel
    """

    full_embd: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.full_embd:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (B, T, n_embd={self.full_embd})")
        if any(a is not None for a in (attn_mask, key_padding_mask, cache, positions)):
            raise ValueError("tensor-parallel attention takes no attn_mask, key_padding_mask, cache or "
                             "positions")
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C / tp): this rank's heads
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, H / tp, T, hd)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        y = self.core(q, k, v, self.dropout if self.training else 0.0)  # the same core as one process's
        return self.resid_dropout(self.c_proj(self.merge_heads(y)))


def _localize_attention(attn: MultiHeadAttention, tp: int) -> None:
    """Turn ``attn`` into a :class:`LocalHeadsAttention` over 1 / tp of its heads (same parameters)."""
    full = attn.n_embd
    attn.__class__ = LocalHeadsAttention
    local = cast(LocalHeadsAttention, attn)
    local.full_embd = full
    local.n_embd, local.n_head = full // tp, attn.n_head // tp


# --- written out: two collectives, two kinds of Linear ----------------------------------------------------


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: forward the identity (every rank already holds the whole input); backward an
    all-reduce, because each rank's column slice contributes its own part of the input's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: forward an all-reduce that adds the ranks' partial sums; backward the identity
    (the sum's gradient with respect to each partial sum is the output's gradient itself)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward: where a replicated activation enters a
    column-parallel layer.

    Built in: 08_model_parallel
    """
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward: where a row-parallel layer's partial sums leave.

    Built in: 08_model_parallel
    """
    return _ReduceFromTensorParallel.apply(x, group)


def _check_shard(n: int, what: str, rank: int, world: int) -> slice:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world={world}) with world >= 1")
    if n % world:
        raise ValueError(f"{what}={n} must be divisible by world={world}")
    return shard_range(n, rank, world)


class ColumnParallelLinear(nn.Module):
    """Rank ``rank``'s slice of a Linear's OUTPUT features: rows ``shard_range(out, rank, world)`` of
    the full weight (and bias). Forward: the whole input (B, T, in) -> this rank's (B, T, out / world);
    the ranks' outputs side by side are the full Linear's output.

    Built in: 08_model_parallel
    """

    def __init__(self, full: nn.Linear, rank: int, world: int, group=None):
        super().__init__()
        rows = _check_shard(full.out_features, "out_features", rank, world)
        self.group = group
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())  # (out / world, in)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach()[rows].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Rank ``rank``'s slice of a Linear's INPUT features: columns ``shard_range(in, rank, world)`` of
    the full weight. Forward: this rank's (B, T, in / world) -> a partial (B, T, out), all-reduced
    into the full Linear's output; the bias (whole on every rank) is added once, after the sum.

    Built in: 08_model_parallel
    """

    def __init__(self, full: nn.Linear, rank: int, world: int, group=None):
        super().__init__()
        cols = _check_shard(full.in_features, "in_features", rank, world)
        self.group = group
        self.weight = nn.Parameter(full.weight.detach()[:, cols].clone())  # (out, in / world)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def megatron_gpt(model: GPT, rank: int, world: int, group=None) -> GPT:
    """Split every block of ``model`` (the same model on every rank) in place, written out: each
    rank keeps its heads (``c_attn`` column-parallel after :func:`qkv_to_tp`, ``c_proj``
    row-parallel) and 1 / world of the MLP's hidden units (``c_fc`` column, ``c_proj`` row).
    Embeddings, LayerNorms and the head stay whole: every rank computes them on the same, all-reduced
    activations, so their gradients agree without communication. Parameter names are unchanged;
    :func:`gather_tensor_parallel` puts the whole tensors back together.

    Built in: 08_model_parallel
    """
    cfg = model.config
    require_gpt2(cfg, "megatron_gpt")
    _check_split(cfg.n_head, cfg.n_embd, world)
    for block in cast(list[Block], model.transformer.h):
        attn, mlp = block.attn, cast(MLP, block.mlp)
        w, b = attn.c_attn.weight, attn.c_attn.bias
        # the same Linear with [q_0 | k_0 | v_0 | q_1 | ...] rows (skip_init: no random numbers drawn)
        qkv = skip_init(nn.Linear, cfg.n_embd, 3 * cfg.n_embd, bias=b is not None, dtype=w.dtype)
        with torch.no_grad():
            qkv.weight.copy_(qkv_to_tp(w, cfg.n_embd, world))
            if b is not None:
                qkv.bias.copy_(qkv_to_tp(b, cfg.n_embd, world))
        attn.add_module("c_attn", ColumnParallelLinear(qkv, rank, world, group))
        attn.add_module("c_proj", RowParallelLinear(attn.c_proj, rank, world, group))
        mlp.add_module("c_fc", ColumnParallelLinear(mlp.c_fc, rank, world, group))
        mlp.add_module("c_proj", RowParallelLinear(mlp.c_proj, rank, world, group))
        _localize_attention(attn, world)
    return model


def gather_tensor_parallel(model: GPT, grads: bool = False, group=None) -> dict[str, torch.Tensor]:
    """Every parameter of a :func:`megatron_gpt` model (or its gradient, with ``grads``) whole, as
    one process would hold it: column shards gathered along the output rows, row shards along the
    input columns, ``c_attn``'s rows back to [q | k | v]. A collective: every rank must call it.

    Built in: 08_model_parallel
    """
    world = dist.get_world_size(group)
    out = {}
    for name, p in model.named_parameters():  # the tied head counted once, as one process does
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = p.grad if grads else p.detach()
        if t is None:
            raise ValueError(f"{name} has no gradient: run backward first")
        dim = {ColumnParallelLinear: 0, RowParallelLinear: 1}.get(type(module))
        if dim is not None and not (dim == 1 and kind == "bias"):  # a row-parallel bias is whole
            pieces = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(pieces, t.contiguous(), group=group)
            t = torch.cat(pieces, dim=dim)
            if module_name.endswith("c_attn"):
                t = qkv_from_tp(t, model.config.n_embd, world)
        out[name] = t.clone()
    return out


class AllReduceCounter(CollectiveCounter):
    """Counts, while active, the all-reduces this process issues and the bytes of the tensors they
    sum: ``dist.all_reduce`` (the ``c10d`` operator, as :func:`megatron_gpt` calls it) and the
    functional all-reduce that DTensor calls (``_c10d_functional``). ``calls`` and ``tensor_bytes``;
    a ring sends 2 (N - 1) / N of ``tensor_bytes`` from each rank.

    Built in: 08_model_parallel
    """

    def _all_reduces(self) -> list[list[int]]:
        return [count for name, count in self.seen.items()
                if "all_reduce" in name.replace("allreduce", "all_reduce")]

    @property
    def calls(self) -> int:
        return sum(calls for calls, _ in self._all_reduces())

    @property
    def tensor_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self._all_reduces())


def tensor_parallel_bytes(batch: int, seq: int, n_embd: int, n_layer: int, world: int,
                          bytes_per_value: int = 4) -> dict[str, float]:
    """What tensor parallelism sends in one training step: per block, two all-reduces of the (B, T, C)
    activations forward (one per sublayer) and two of their gradients backward. ``tensor_bytes`` is
    what the all-reduces carry (4 n_layer B T C values); ``sent_per_rank`` what each rank sends in a
    ring all-reduce, 2 (N - 1) / N of it.

    Built in: 08_model_parallel
    """
    for name, v in (("batch", batch), ("seq", seq), ("n_embd", n_embd), ("n_layer", n_layer),
                    ("world", world), ("bytes_per_value", bytes_per_value)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}={v!r} must be a positive integer")
    one = batch * seq * n_embd * bytes_per_value
    tensor = 4 * n_layer * one
    return {"allreduces": 4 * n_layer, "tensor_bytes": float(tensor),
            "sent_per_rank": 2 * (world - 1) / world * tensor}


# --- with torch's DTensor tools -------------------------------------------------------------------------


def tensor_parallel_gpt(model: GPT, mesh) -> GPT:
    """Split every block of ``model`` over the 1-D DeviceMesh ``mesh`` (in place; returns it):
    ``attn.c_attn`` and ``mlp.c_fc`` column-parallel, ``attn.c_proj`` and ``mlp.c_proj`` row-parallel,
    with torch's ``parallelize_module``. Embeddings, LayerNorms and the head stay whole on every rank.
    ``c_attn``'s rows are regrouped first (:func:`qkv_to_tp`) so that each rank's contiguous shard
    holds the queries, keys and values of its own heads; a full state dict's ``c_attn`` entries
    (``full_tensor()``) are in that order: :func:`qkv_from_tp` restores the ordinary one. Every rank
    must pass the same model (built from the same seed): the whole modules are not broadcast. The
    attention modules become :class:`LocalHeadsAttention`, which trains but takes no KV cache.

    Built in: 08_model_parallel
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    require_gpt2(model.config, "tensor_parallel_gpt")
    if mesh.ndim != 1:
        raise ValueError(f"mesh has {mesh.ndim} dimensions; tensor_parallel_gpt takes a 1-D mesh "
                         f"(pass mesh['tp'] of a 2-D mesh, or use dp_tp_gpt)")
    tp, cfg = mesh.size(), model.config
    _check_split(cfg.n_head, cfg.n_embd, tp)
    for block in cast(list[Block], model.transformer.h):
        c_attn = block.attn.c_attn
        with torch.no_grad():
            c_attn.weight.copy_(qkv_to_tp(c_attn.weight, cfg.n_embd, tp))
            if c_attn.bias is not None:
                c_attn.bias.copy_(qkv_to_tp(c_attn.bias, cfg.n_embd, tp))
        _localize_attention(block.attn, tp)
        parallelize_module(block, mesh, {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                                         "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()})
    return model


def dp_tp_gpt(model: GPT, mesh) -> GPT:
    """Data x tensor parallelism on a 2-D DeviceMesh with dimensions ("dp", "tp"): every block split
    over ``mesh["tp"]`` (:func:`tensor_parallel_gpt`), then sharded over ``mesh["dp"]`` with FSDP2's
    ``fully_shard`` (each block, then the root), which also averages the gradients over the data
    ranks. Each data rank feeds its own part of the batch; the ranks of one tensor group feed the same.

    Built in: 08_model_parallel
    """
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != ("dp", "tp"):
        raise ValueError(f"mesh must be 2-D with dimensions ('dp', 'tp'); got {mesh.ndim}-D with names "
                         f"{mesh.mesh_dim_names}")
    tensor_parallel_gpt(model, mesh["tp"])
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


# --- what a chapter or a test runs in each process ------------------------------------------------------


def _seeded_gpt(config: dict, seed: int, dtype: str) -> GPT:
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'float64'")
    torch.manual_seed(seed)
    return GPT(GPTConfig(**config)).to(getattr(torch, dtype))


def _whole(model: GPT, tp: int, grads: bool) -> dict[str, torch.Tensor]:
    """Each parameter (or gradient) of a DTensor-split model as one tensor in the ordinary layout."""
    out = {}
    # on a 2-D mesh, gathering a shard of a shard takes two all-gathers, which torch warns about
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for name, p in model.named_parameters():
            t = p.grad if grads else p.detach()
            if t is None:
                raise ValueError(f"{name} has no gradient: run backward first")
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[name] = (qkv_from_tp(t, model.config.n_embd, tp) if "c_attn" in name else t).clone()
    finally:
        log.setLevel(level)
    return out


def tensor_parallel_step(rank: int, world: int, config: dict, idx: torch.Tensor, targets: torch.Tensor,
                         way: str = "megatron", seed: int = 0, dtype: str = "float32",
                         shapes: tuple = ()) -> dict:
    """Run in each of ``world`` processes (``spawn``): build ``GPT(GPTConfig(**config))`` from ``seed``,
    split it ``way`` ("megatron": :func:`megatron_gpt`; "dtensor": :func:`tensor_parallel_gpt`), take
    one forward and backward on (idx, targets), and return the loss, every gradient whole and in the
    ordinary layout, and the all-reduces of the forward and the backward as (calls, tensor bytes).
    For each (batch, seq) in ``shapes`` it also counts one more step's all-reduces on random tokens:
    ``sweep`` lists (batch, seq, forward bytes, backward bytes).

    Built in: 08_model_parallel
    """
    if way not in ("megatron", "dtensor"):
        raise ValueError(f"way={way!r} must be 'megatron' or 'dtensor'")
    model = _seeded_gpt(config, seed, dtype)
    if way == "megatron":
        megatron_gpt(model, rank, world)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        tensor_parallel_gpt(model, init_device_mesh("cpu", (world,)))

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, AllReduceCounter, AllReduceCounter]:
        with AllReduceCounter() as fwd:
            _, loss = model(x, y)
        with AllReduceCounter() as bwd:
            loss.backward()
        return loss.detach(), fwd, bwd

    loss, fwd, bwd = step(idx, targets)
    grads = gather_tensor_parallel(model, grads=True) if way == "megatron" else _whole(model, world, True)
    sweep = []
    g = torch.Generator().manual_seed(seed)  # the same tokens on every rank, as tensor parallelism needs
    for b, t in shapes:
        x, y = (torch.randint(0, model.config.vocab_size, (b, t), generator=g) for _ in range(2))
        _, f, bw = step(x, y)
        sweep.append((b, t, f.tensor_bytes, bw.tensor_bytes))
    return {"loss": loss, "grads": grads, "fwd": (fwd.calls, fwd.tensor_bytes),
            "bwd": (bwd.calls, bwd.tensor_bytes), "sweep": sweep}


def dp_tp_train(rank: int, world: int, config: dict, idx: torch.Tensor, targets: torch.Tensor, tp: int = 2,
                steps: int = 2, lr: float = 1e-2, weight_decay: float = 0.1, seed: int = 0,
                dtype: str = "float32") -> dict:
    """Run in each of ``world`` processes (``spawn``): the GPT of ``config`` and ``seed`` on a
    (world / tp) x tp mesh (:func:`dp_tp_gpt`), ``steps`` AdamW steps on the global batch (idx,
    targets), each data rank on its contiguous share of the rows. Returns this rank's losses and the
    final weights whole, in the ordinary layout.

    Built in: 08_model_parallel
    """
    from torch.distributed.device_mesh import init_device_mesh

    if tp < 1 or world % tp:
        raise ValueError(f"tp={tp} must divide the number of processes world={world}")
    dp = world // tp
    if idx.shape[0] % dp:
        raise ValueError(f"the batch of {idx.shape[0]} rows must split evenly over {dp} data ranks")
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = dp_tp_gpt(_seeded_gpt(config, seed, dtype), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    mine = shard_range(idx.shape[0], mesh["dp"].get_local_rank(), dp)
    losses = []
    for _ in range(steps):
        _, loss = model(idx[mine], targets[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "weights": _whole(model, tp, grads=False)}
