"""Tensor parallelism equals one process: the same GPT split over ranks (written out, and with torch's
DTensor tools) gives the same loss and gradients as plain torch, with the all-reduces the formula
counts; on a data x tensor mesh, the same weights after AdamW steps."""

import pytest
import torch
import torch.nn.functional as F
from parallel_tensor import both_ways
from torch import nn

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.launch import spawn
from minigpt.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    dp_tp_train,
    megatron_gpt,
    qkv_from_tp,
    qkv_to_tp,
    tensor_parallel_bytes,
    tensor_parallel_step,
)

CONFIG = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


def reference_gpt(seed: int = 0, **overrides) -> GPT:
    """The one-process model: float64, so that only the order of the sums differs (~1e-16)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG, **overrides})).double()


def batch(b: int = 4, t: int = 16, vocab: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_qkv_regrouping_gives_each_rank_its_own_heads_and_inverts():
    c, tp = 8, 2
    w = torch.arange(3 * c * 5).reshape(3 * c, 5)
    regrouped = qkv_to_tp(w, c, tp)
    q, k, v = w.split(c)
    for r, shard in enumerate(regrouped.chunk(tp)):  # rank r's contiguous shard: q_r | k_r | v_r
        assert torch.equal(shard, torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]))
    assert torch.equal(qkv_from_tp(regrouped, c, tp), w)
    assert torch.equal(qkv_from_tp(qkv_to_tp(w[:, 0], c, tp), c, tp), w[:, 0])  # a bias too
    with pytest.raises(ValueError, match="n_embd=8 must be divisible .* tp=3"):
        qkv_to_tp(w, c, 3)
    with pytest.raises(ValueError, match="3 \\* n_embd = 30 rows"):
        qkv_to_tp(w, 10, 2)


def test_column_then_row_shards_add_up_to_the_full_linears():
    torch.manual_seed(0)
    fc, proj, x, world = nn.Linear(8, 16), nn.Linear(16, 8), torch.randn(3, 8), 4
    cols = [ColumnParallelLinear(fc, r, world) for r in range(world)]
    rows = [RowParallelLinear(proj, r, world) for r in range(world)]
    h = [F.linear(x, c.weight, c.bias) for c in cols]  # each rank's slice of the hidden features
    torch.testing.assert_close(torch.cat(h, dim=-1), fc(x))  # side by side: the full output
    partial = [F.linear(torch.relu(hr), r.weight) for hr, r in zip(h, rows)]
    # float32 partial sums added in another order than one matmul's: ~1e-7 relative
    torch.testing.assert_close(sum(partial) + proj.bias, proj(torch.relu(fc(x))), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out_features=16 must be divisible by world=3"):
        ColumnParallelLinear(fc, 0, 3)
    with pytest.raises(ValueError, match="rank=4 must be in"):
        RowParallelLinear(proj, 4, 4)
    with pytest.raises(ValueError, match="n_head=3 .* divisible by the tensor-parallel size 2"):
        megatron_gpt(reference_gpt(n_head=3, n_embd=24), 0, 2)
    with pytest.raises(ValueError, match="way='pipeline'"):
        tensor_parallel_step(0, 2, CONFIG, *batch(), way="pipeline")
    assert tensor_parallel_bytes(2, 8, 16, 3, 4)["sent_per_rank"] == 2 * 3 / 4 * 4 * 3 * 2 * 8 * 16 * 4


def test_megatron_and_dtensor_tensor_parallel_equal_one_process_and_send_the_formulas_bytes():
    b, t = 4, 16
    idx, targets = batch(b, t)
    ref = reference_gpt()
    _, loss = ref(idx, targets)
    loss.backward()
    want = tensor_parallel_bytes(b, t, CONFIG["n_embd"], CONFIG["n_layer"], 2, bytes_per_value=8)
    for ranks in spawn(both_ways, 2, CONFIG, idx, targets, timeout=90):
        for way, out in ranks.items():
            # float64: the ranks add the same products in another order, so ~1e-16 relative; 1e-10 is loose
            torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
            assert out["grads"].keys() == dict(ref.named_parameters()).keys()
            for name, p in ref.named_parameters():
                torch.testing.assert_close(out["grads"][name], p.grad, rtol=1e-9, atol=1e-12,
                                           msg=f"{way} {name}")
            # per block one all-reduce of (B, T, C) per sublayer forward, one per sublayer backward
            assert out["fwd"] == out["bwd"] == (want["allreduces"] // 2, want["tensor_bytes"] / 2), way


def test_data_x_tensor_mesh_equals_one_process_after_adamw_steps():
    idx, targets = batch(b=4)
    steps, lr = 2, 1e-2
    ref = reference_gpt()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        _, loss = ref(idx, targets)  # the global batch: the mean over 4 rows = mean of the 2 halves'
        loss.backward()
        opt.step()
        opt.zero_grad()
    outs = spawn(dp_tp_train, 4, CONFIG, idx, targets, 2, steps, lr, 0.1, 0, "float64", timeout=120)
    for rank, out in enumerate(outs):  # rank = 2 dp + tp: data rank dp saw rows 2 dp and 2 dp + 1
        dp = rank // 2
        _, first = reference_gpt()(idx[2 * dp:2 * dp + 2], targets[2 * dp:2 * dp + 2])
        torch.testing.assert_close(out["losses"][0], first.detach(), rtol=1e-10, atol=1e-12)
        for name, p in ref.named_parameters():
            # float64; Adam divides by sqrt(v), which magnifies last-bit differences little in 2 steps
            torch.testing.assert_close(out["weights"][name], p.detach(), rtol=1e-8, atol=1e-10, msg=name)
