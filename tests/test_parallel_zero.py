"""ZeRO stages 0-3 and FSDP2, run in two real processes on gloo and checked equal to one process
(plain torch, torch.optim.AdamW); the bytes each rank holds and sends against the ZeRO paper's count."""

from functools import cache

import parallel_zero as pz
import pytest
import torch
import torch.distributed as dist

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.launch import spawn
from minigpt.parallel.zero import (
    ShardedAdamW,
    fully_shard_gpt,
    train_zero,
    zero_comm_volume,
    zero_memory_bytes,
)
from minigpt.train import parameter_groups

STEPS, LR, DECAY, BATCH = 3, 1e-2, 0.1, 4  # train_zero's defaults


@pytest.fixture(scope="module")
def ranks():
    return spawn(pz.everything, 2)  # one group of processes for every check: each start costs seconds


@cache
def one_process(precision: str):
    """The reference: one process, the whole batch, torch.optim.AdamW; in mixed precision a bf16
    model whose gradients, cast to fp32, drive AdamW on an fp32 master copy that is cast back."""
    torch.manual_seed(0)
    master = GPT(GPTConfig(**pz.CONFIG))
    work = master
    if precision == "mixed":
        work = GPT(GPTConfig(**pz.CONFIG))
        work.load_state_dict(master.state_dict())
        work = work.to(torch.bfloat16)
    else:
        master = work = master.to({"fp64": torch.float64, "fp32": torch.float32}[precision])
    opt = torch.optim.AdamW(parameter_groups(master, DECAY), lr=LR, foreach=False)
    losses = []
    for s in range(STEPS):
        tokens = torch.randint(0, pz.CONFIG["vocab_size"], (BATCH, pz.CONFIG["block_size"] + 1),
                               generator=torch.Generator().manual_seed(1000 + s))
        _, loss = work(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if work is not master:
            for p, q in zip(master.parameters(), work.parameters()):
                p.grad = q.grad.float()
        opt.step()
        opt.zero_grad()
        work.zero_grad()
        if work is not master:
            with torch.no_grad():
                for p, q in zip(master.parameters(), work.parameters()):
                    q.copy_(p)
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in work.named_parameters()}


def test_fully_shard_gpt_equals_one_process(ranks):
    model = pz.small_gpt()
    x, y = pz.batch()
    _, loss = model(x, y)
    loss.backward()
    for r in ranks:
        f = r["fsdp"]
        assert f["sharded"]
        # float32 sums in another order (two half-batch means averaged; gradients reduce-scattered)
        assert torch.allclose(f["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        assert f["grads"].keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            assert torch.allclose(f["grads"][name], p.grad, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_stage_equals_one_process_in_float64(ranks, stage):
    losses, weights = one_process("fp64")
    for r in ranks:
        got = r[f"fp64-{stage}@2"]
        # the model computes its loss in float32 whatever its weights' type: 1e-6 on a loss near 4
        assert got["losses"] == pytest.approx(losses, abs=1e-6)
        for name, w in weights.items():  # float64 sums in another order: 1e-12 after three steps
            assert torch.allclose(got["weights"][name], w, rtol=0, atol=1e-12), name


@pytest.mark.parametrize("stage", [1, 2])
def test_several_buckets_equal_one_process_in_float32(ranks, stage):
    losses, weights = one_process("fp32")
    for r in ranks:
        got = r[f"fp32-buckets-{stage}"]
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        for name, w in weights.items():
            # float32 sums in another order; Adam divides by sqrt(v), which enlarges the rounding of
            # gradients near zero: 1e-4 after three steps of lr 1e-2 (one step moves a weight ~1e-2)
            assert torch.allclose(got["weights"][name], w, rtol=0, atol=1e-4), name


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_mixed_precision_follows_one_process(ranks, stage):
    losses, weights = one_process("mixed")
    for r in ranks:
        got = r[f"mixed-{stage}@2"]
        # bf16 gradients summed over two ranks round differently from one bf16 gradient of the whole
        # batch (8 bits of mantissa): the losses stay within 1e-3 of each other over three steps...
        assert got["losses"] == pytest.approx(losses, abs=1e-3)
        diff = torch.cat([(got["weights"][n].float() - w.float()).flatten() for n, w in weights.items()])
        norm = torch.cat([w.float().flatten() for w in weights.values()]).norm()
        # ...and the weights within 1% (in norm): Adam turns a gradient near zero whose sign rounding
        # flipped into a full step the other way, so a few single weights differ by ~2 lr
        assert diff.norm() < 0.01 * norm
        assert diff.abs().max() < 3 * LR


@pytest.mark.parametrize("precision,per_param", [("fp64", (8, 8, 16)), ("mixed", (2, 2, 12))])
def test_memory_held_matches_the_formula(ranks, precision, per_param):
    n = ranks[0]["fp64-0@2"]["n_params"]
    for stage in (0, 1, 2, 3):
        for r in ranks:
            held = r[f"{precision}-{stage}@2"]["held"]
            want = zero_memory_bytes(n, 2, stage, *per_param)
            # exact here: no padding (the flat buffer's length is even, every dimension 0 is even),
            # and torch's AdamW adds one 'step' counter (a 4-byte tensor) per parameter tensor
            steps = 4 * 28 if stage == 3 else 0
            assert held["total"] == want["total"] + steps, (stage, held, want)
            if stage < 3 or precision == "fp64":
                assert held["params"] == want["params"] and held["grads"] == want["grads"]
            else:  # FSDP2 keeps fp32 shards (the master copy) and fp32 gradient shards: 4 + 4 + 8
                assert held["params"] == held["grads"] == 4 * n / 2


def test_bytes_sent_match_the_formula(ranks):
    n = ranks[0]["fp64-0@2"]["n_params"]
    for r in ranks:
        for stage in (0, 1, 2, 3):
            assert r[f"fp64-{stage}@2"]["comm"]["total"] == 8 * zero_comm_volume(n, stage)
            assert r[f"mixed-{stage}@2"]["comm"]["total"] == 2 * zero_comm_volume(n, stage)


def test_the_formula_reproduces_the_paper():
    # Rajbhandari et al. (2020), Figure 1: 7.5B parameters, 64 GPUs, K = 12
    got = [zero_memory_bytes(7.5e9, 64, s)["total"] / 1e9 for s in (0, 1, 2, 3)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]


def test_bad_input():
    with pytest.raises(ValueError, match="minigpt GPT"):
        fully_shard_gpt(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stage=4"):
        zero_memory_bytes(10, 2, 4)
    with pytest.raises(ValueError, match="world=0"):
        zero_memory_bytes(10, 0, 1)
    with pytest.raises(ValueError, match="precision='fp16'"):
        train_zero(0, 1, 0, pz.CONFIG, precision="fp16")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process group"):
        ShardedAdamW(pz.small_gpt().parameters(), 1)


def test_stage_2_holds_the_whole_gradient_at_no_time(ranks):
    n = ranks[0]["fp64-0@2"]["n_params"]
    for r in ranks:
        assert r["fp32-buckets-1"]["peak_grad_bytes"] == 4 * n  # stage 1: the full fp32 gradient
        # stage 2: its half of the gradient and at most two buckets of at most 5,000 elements being
        # filled at once (backward finishes one block's gradients before it starts the next block's)
        peak = r["fp32-buckets-2"]["peak_grad_bytes"]
        assert peak <= 4 * n / 2 + 2 * 4 * 5000 < 4 * n, peak
