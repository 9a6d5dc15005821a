"""Tensor parallelism: every weight matrix of a block split over ranks (Megatron-LM's layout).

Data parallelism copies the whole model to every rank; once one layer's weights, gradients and
optimizer state do not fit a device, copying no longer helps. Tensor parallelism splits each matrix
instead. In a block the split follows Shoeybi et al. (2019, arXiv:1909.08053):

- the first matrix of each sublayer (attention's fused ``c_attn``, the MLP's ``c_fc``) is split by
  its output columns ("column parallel"): each rank computes its own slice of the features (its own
  heads, its own quarter of the 4C hidden units) from the whole input, and needs no communication;
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

from typing import cast

import torch
import torch.nn.functional as F

from minigpt.attention import MultiHeadAttention
from minigpt.model import GPT, Block

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
                key_padding_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.full_embd:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (B, T, n_embd={self.full_embd})")
        if attn_mask is not None or key_padding_mask is not None or cache is not None:
            raise ValueError("tensor-parallel attention takes no attn_mask, key_padding_mask or cache")
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C / tp): this rank's heads
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, H / tp, T, hd)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal, scale=self.scale)
        return self.resid_dropout(self.c_proj(self.merge_heads(y)))


def _localize_attention(attn: MultiHeadAttention, tp: int) -> None:
    """Turn ``attn`` into a :class:`LocalHeadsAttention` over 1 / tp of its heads (same parameters)."""
    full = attn.n_embd
    attn.__class__ = LocalHeadsAttention
    local = cast(LocalHeadsAttention, attn)
    local.full_embd = full
    local.n_embd, local.n_head = full // tp, attn.n_head // tp


# --- with torch's DTensor tools -------------------------------------------------------------------------


def tensor_parallel_gpt(model: GPT, mesh) -> GPT:
    """Split every block of ``model`` over the 1-D DeviceMesh ``mesh`` (in place; returns it):
    ``attn.c_attn`` and ``mlp.c_fc`` column-parallel, ``attn.c_proj`` and ``mlp.c_proj`` row-parallel,
    with torch's ``parallelize_module``. Embeddings, LayerNorms and the head stay whole on every rank.
    ``c_attn``'s rows are regrouped first (:func:`qkv_to_tp`) so that each rank's contiguous shard
    holds the queries, keys and values of its own heads; a full state dict's ``c_attn`` entries
    (``full_tensor()``) are in that order: :func:`qkv_from_tp` restores the ordinary one.

    Built in: 08_model_parallel
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

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
