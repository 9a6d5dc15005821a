"""Stacked training: many same-shaped GPTs as one computation, each member equal to its own Trainer run."""

from dataclasses import replace

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.sweep import (
    in_processes,
    stack_parameters,
    stacked_loss,
    train_alone,
    train_members,
    train_stacked,
)
from minigpt.train import TrainConfig, Trainer

VOCAB = 30
IDS = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))
QUIET = dict(bf16="off", batch_size=4, eval_interval=10**6, eval_batches=1, checkpoint_interval=0,
             progress=False, device="cpu")


def members(config, seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(GPT(config))
    return out


@pytest.mark.parametrize("config", [
    GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=12, vocab_size=VOCAB),
    GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=12, vocab_size=VOCAB, bias=False),
    GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=12, vocab_size=VOCAB, mup_base_width=8,
              mup_input_mult=2.0, mup_output_mult=0.5),
])
def test_stacked_loss_is_each_models_own_loss(config):
    models = members(config, [0, 1, 2])
    x = torch.randint(0, VOCAB, (3, 5, 12))
    y = torch.randint(0, VOCAB, (3, 5, 12))
    with torch.no_grad():
        stacked = stacked_loss(config, stack_parameters(models), x, y)
        alone = torch.stack([m(x[i], y[i])[1] for i, m in enumerate(models)])
    # float32 sums in another order: agreement to rounding, far below any difference between members
    torch.testing.assert_close(stacked, alone, rtol=1e-5, atol=1e-6)
    assert (alone.max() - alone.min()) > 1e-3


def test_each_member_is_its_own_trainer_run():
    """Different rates, schedules, lengths, clips, decays, betas, data seeds and initial weights, under
    muP (so that the per-matrix factors on the rate are exercised too)."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=VOCAB, mup_base_width=16)
    configs = [
        TrainConfig(max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3, seed=0, grad_clip=0.0,
                    weight_decay=0.0, **QUIET),
        TrainConfig(max_steps=20, lr=1e-2, min_lr=1e-3, warmup_steps=5, seed=1, grad_clip=0.05,
                    weight_decay=0.1, **QUIET),  # a clip that binds on every step, and stops early
        TrainConfig(max_steps=30, lr=5e-3, min_lr=5e-4, warmup_steps=2, seed=2, grad_clip=1.0,
                    weight_decay=0.1, beta2=0.95, **QUIET),
    ]
    seeds = [0, 5, 7]
    stacked = train_members(config, IDS, configs, seeds)
    for settings, seed, member in zip(configs, seeds, stacked):
        torch.manual_seed(seed)
        alone = GPT(config)
        start = [p.detach().clone() for p in alone.parameters()]
        Trainer(alone, IDS, IDS, settings).train()
        moved = max((p - s).abs().max().item() for p, s in zip(alone.parameters(), start))
        gap = max((p - q).abs().max().item() for p, q in zip(alone.parameters(), member.parameters()))
        # 20-30 Adam steps move weights by ~1e-2; float32 rounding in another order leaves ~1e-6
        assert moved > 1e-2 and gap < 1e-4, (moved, gap)


def test_a_finished_member_stops_changing():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=VOCAB)
    short = TrainConfig(max_steps=5, lr=1e-2, min_lr=1e-3, warmup_steps=1, seed=0, **QUIET)
    long = replace(short, max_steps=40)
    a, b = members(config, [0, 0]), members(config, [0, 0])
    train_stacked(a, IDS, [short, short])
    train_stacked(b, IDS, [short, long])
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(a[1].parameters(), b[1].parameters()))


def test_history_records_every_members_loss():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=VOCAB)
    settings = TrainConfig(max_steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=1, seed=0, **QUIET)
    history = train_stacked(members(config, [0, 1]), IDS, [replace(settings, max_steps=4), settings],
                            record_every=3)
    assert [(h["step"], h["member"]) for h in history] == [(3, 0), (3, 1), (6, 1)]
    assert all(0 < h["loss"] < 10 and h["grad_norm"] > 0 for h in history)


def test_bad_input_is_named():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=VOCAB)
    settings = TrainConfig(max_steps=2, lr=1e-2, min_lr=1e-3, **QUIET)
    with pytest.raises(ValueError, match="same batch_size"):
        train_stacked(members(config, [0, 1]), IDS, [settings, replace(settings, batch_size=8)])
    with pytest.raises(ValueError, match="2 training configs for 1 models"):
        train_stacked(members(config, [0]), IDS, [settings, settings])
    with pytest.raises(ValueError, match="grad_accum=1"):
        train_stacked(members(config, [0]), IDS, [replace(settings, grad_accum=2)])
    with pytest.raises(ValueError, match="bf16='on' is not supported"):
        train_stacked(members(config, [0]), IDS, [replace(settings, bf16="on")])
    with pytest.raises(ValueError, match="same GPTConfig"):
        stack_parameters([GPT(config), GPT(replace(config, n_embd=16))])
    with pytest.raises(ValueError, match="dropout=0.1"):
        stack_parameters([GPT(replace(config, dropout=0.1))])
    with pytest.raises(ValueError, match="1 initial seeds for 2"):
        train_members(config, IDS, [settings, settings], [0])
    with pytest.raises(ValueError, match="at least one model"):
        stack_parameters([])


def test_in_float64_a_member_equals_its_trainer_run_to_rounding():
    """In float32 the two computations round differently and Adam lets the differences grow step by
    step; in float64 what is left after 100 steps must be rounding, far below anything a bug leaves.
    Under muP at a width of 3 x the base, so that the factor on the rate (1/3) is not exact in binary."""
    config = GPTConfig(n_layer=2, n_head=4, n_embd=24, block_size=16, vocab_size=VOCAB, mup_base_width=8)
    settings = TrainConfig(max_steps=100, lr=1e-2, min_lr=1e-3, warmup_steps=10, seed=3, **QUIET)
    stacked = [m.double() for m in members(config, [1, 1])]
    train_stacked(stacked, IDS, [replace(settings, lr=3e-3, min_lr=3e-4), settings])
    torch.manual_seed(1)
    alone = GPT(config).double()
    Trainer(alone, IDS, IDS, settings).train()
    gap = max((p - q).abs().max().item() for p, q in zip(alone.parameters(), stacked[1].parameters()))
    assert gap < 1e-8, gap


def test_runs_in_processes_equal_the_same_runs_here_with_one_thread():
    """Two worker processes of one thread each: every result equals the call made here with one
    thread (the same computation), in the calls' order, whatever order the workers finish in."""
    calls = [(GPTConfig(n_layer=1, n_head=2, n_embd=width, block_size=8, vocab_size=VOCAB), IDS, IDS,
              TrainConfig(max_steps=steps, lr=1e-2, min_lr=1e-3, seed=seed, **QUIET), seed)
             for width, steps, seed in ((16, 30, 0), (8, 5, 1), (8, 12, 2))]
    models, spans = in_processes(train_alone, calls, processes=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = [train_alone(*call) for call in calls]
    finally:
        torch.set_num_threads(threads)
    for there, alone in zip(models, here, strict=True):
        assert not there.training
        for (name, p), q in zip(there.named_parameters(), alone.parameters(), strict=True):
            assert torch.equal(p, q), name
    assert len(spans) == 3 and {w for w, _, _ in spans} <= {0, 1}
    assert all(0 <= start <= end for _, start, end in spans) and min(s for _, s, _ in spans) == 0
    assert in_processes(train_alone, []) == ([], [])


def test_in_processes_names_bad_input_and_raises_a_calls_error():
    with pytest.raises(ValueError, match=r"processes=0 must be a whole number of at least 1"):
        in_processes(train_alone, [()], processes=0)
    with pytest.raises(ValueError, match=r"threads=1.5 must be"):
        in_processes(train_alone, [()], threads=1.5)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=VOCAB)
    bad = TrainConfig(max_steps=2, lr=1e-2, min_lr=1e-3, **QUIET)
    with pytest.raises(ValueError, match="block_size"):  # windows longer than the data
        in_processes(train_alone, [(config, IDS[:5], IDS, bad)], processes=1)
