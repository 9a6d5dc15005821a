"""Tensor parallelism equals one process: the same GPT split over ranks gives the same loss and the
same gradients (and, on a data x tensor mesh, the same weights after AdamW steps) as plain torch."""

import pytest
import torch
from parallel_tensor import dp_tp_adamw_steps, dtensor_tp_loss_and_grads, tiny_gpt

from minigpt.parallel.launch import spawn
from minigpt.parallel.tensor import qkv_from_tp, qkv_to_tp


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


def test_dtensor_tensor_parallel_gpt_equals_one_process():
    idx, targets = batch()
    ref = tiny_gpt()
    _, loss = ref(idx, targets)
    loss.backward()
    for out in spawn(dtensor_tp_loss_and_grads, 2, idx, targets, timeout=60):
        # float64: the ranks add the same products in another order, so ~1e-15 relative; 1e-10 is loose
        torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        assert out["grads"].keys() == dict(ref.named_parameters()).keys()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(out["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_data_x_tensor_mesh_equals_one_process_after_adamw_steps():
    idx, targets = batch(b=4)
    steps, lr = 2, 1e-2
    ref = tiny_gpt()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        _, loss = ref(idx, targets)  # the global batch: the mean over 4 rows = mean of the 2 halves'
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    outs = spawn(dp_tp_adamw_steps, 4, idx, targets, steps, lr, timeout=90)
    for dp in (0, 1):  # ranks 2 dp + tp: data rank dp saw rows 2 dp, 2 dp + 1
        mine = slice(2 * dp, 2 * dp + 2)
        ref_half = tiny_gpt()
        _, first = ref_half(idx[mine], targets[mine])
        torch.testing.assert_close(outs[2 * dp]["losses"][0], first.detach(), rtol=1e-10, atol=1e-12)
    for out in outs:
        for name, p in ref.named_parameters():
            # float64, Adam's division by sqrt(v) amplifies last-bit differences little at 2 steps
            torch.testing.assert_close(out["weights"][name], p.detach(), rtol=1e-8, atol=1e-10, msg=name)
