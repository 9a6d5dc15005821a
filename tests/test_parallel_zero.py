"""ZeRO and FSDP, run in real processes on gloo and checked equal to one process."""

import parallel_zero as pz
import pytest
import torch

from minigpt.parallel.launch import spawn


def test_fully_shard_gpt_equals_one_process():
    model = pz.small_gpt()
    x, y = pz.batch()
    _, loss = model(x, y)
    loss.backward()
    out = spawn(pz.fsdp_loss_and_grads, 2)
    for r in out:
        assert r["sharded"]
        # float32 sums in another order (two half-batch means averaged; gradients reduce-scattered)
        assert torch.allclose(r["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        assert r["grads"].keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            assert torch.allclose(r["grads"][name], p.grad, rtol=1e-5, atol=1e-6), name


def test_fully_shard_gpt_rejects_bad_input():
    with pytest.raises(ValueError, match="minigpt GPT"):
        from minigpt.parallel.zero import fully_shard_gpt
        fully_shard_gpt(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
