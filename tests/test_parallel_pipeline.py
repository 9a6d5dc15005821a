"""Pipeline parallelism: the schedules' orders, the ideal timeline against the bubble formula, and the
real pipeline in 2 and 4 processes (GPipe and 1F1B, written out; and torch.distributed.pipelining's)
equal to one process in loss and every gradient, with its activation memory per stage against the
formula."""

import pytest
import torch
from parallel_pipeline import both_pipelines

from minigpt.model import GPT, GPTConfig
from minigpt.parallel import pipeline, schedules
from minigpt.parallel.launch import spawn
from minigpt.parallel.pipeline import GPTStage, stage_layers
from minigpt.parallel.schedules import (
    SCHEDULES,
    bubble_formula,
    bubble_fraction,
    peak_in_flight_formula,
    replay_schedule,
    schedule_order,
    simulate_schedule,
)

CONFIG = GPTConfig(block_size=16, vocab_size=32, n_layer=4, n_head=2, n_embd=32)
RUNS = [("gpipe", 4), ("1f1b", 4), ("1f1b", 8)]
TORCH_RUNS = [("gpipe", 4), ("1f1b", 4)]


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, CONFIG.vocab_size, (n, CONFIG.block_size), generator=g),
            torch.randint(0, CONFIG.vocab_size, (n, CONFIG.block_size), generator=g))


def _peak_held(order):
    held, peak = 0, 0
    for kind, _ in order:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_stage_runs_every_forward_then_its_backward_once(schedule):
    for stages in (1, 2, 4):
        for m in (1, 3, 8):
            for s in range(stages):
                order = schedule_order(schedule, s, stages, m)
                assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(m))
                assert [i for k, i in order if k == "B"] == list(range(m))  # gradients arrive in order
                assert _peak_held(order) == peak_in_flight_formula(schedule, s, stages, m)
    assert schedule_order("1f1b", 0, 4, 8)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_ideal_timeline_has_the_formulas_bubble(schedule):
    for stages in (1, 2, 3, 4):
        for m in (1, 2, 5, 8):
            events = simulate_schedule(schedule, stages, m, forward=1.0, backward=2.0)
            end = max(e[3] for stage in events for e in stage)
            assert end == (m + stages - 1) * 3.0  # m + p - 1 slots of forward + backward
            assert bubble_fraction(events) == pytest.approx(bubble_formula(stages, m), abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_replay_keeps_each_pieces_duration_and_removes_the_waits(schedule):
    g = torch.Generator().manual_seed(0)
    stages, m = 3, 5
    durations = {(k, s, i): float(torch.rand(1, generator=g)) + 0.5
                 for k in "FB" for s in range(stages) for i in range(m)}
    ideal = simulate_schedule(schedule, stages, m, durations=durations)
    assert replay_schedule(schedule, ideal) == ideal
    # a run whose stage 1 started every piece late replays to the ideal timeline
    late = [[(k, i, a + 0.1 * (s == 1) * (n + 1), b + 0.1 * (s == 1) * (n + 1)) for n, (k, i, a, b)
             in enumerate(stage)] for s, stage in enumerate(ideal)]
    assert bubble_fraction(late) > bubble_fraction(ideal)
    replayed = replay_schedule(schedule, late)
    assert [[e[:2] for e in st] for st in replayed] == [[e[:2] for e in st] for st in ideal]
    assert all(abs(x[3] - y[3]) < 1e-9 for a, b in zip(replayed, ideal) for x, y in zip(a, b))
    # durations given apart from the events (as CPU times are) replace the events' own
    halves = [[(b - a) / 2 for _, _, a, b in stage] for stage in late]
    half = replay_schedule(schedule, late, halves)
    assert all(abs(x[3] - y[3] / 2) < 1e-9 for a, b in zip(half, ideal) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="one per event"):
        replay_schedule(schedule, late, [h[:-1] for h in halves])
    with pytest.raises(ValueError, match="positive"):
        replay_schedule(schedule, late, [[0.0] * len(h) for h in halves])


def test_the_schedules_arithmetic_is_importable_from_the_pipeline_module():
    for name in ("SCHEDULES", "Event", "schedule_order", "bubble_formula", "bubble_fraction",
                 "peak_in_flight_formula", "simulate_schedule", "replay_schedule"):
        assert getattr(pipeline, name) is getattr(schedules, name)


def test_stages_chained_in_one_process_are_the_gpt():
    torch.manual_seed(0)
    gpt = GPT(CONFIG).double()
    idx, _ = _batch()
    for stages in (1, 2, 3, 4):
        parts = [GPTStage(gpt, s, stages) for s in range(stages)]
        x = idx
        for part in parts:
            x = part(x)
        # float64 and the same operations in the same order: equal to rounding
        torch.testing.assert_close(x, gpt(idx)[0], rtol=0, atol=1e-12)
        names = [n for part in parts for n, _ in part.named_parameters()]
        expected = [n for n, _ in gpt.named_parameters()] + ([] if stages == 1 else ["lm_head.weight"])
        assert sorted(names) == sorted(expected)
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]


def _one_process():
    idx, targets = _batch()
    torch.manual_seed(0)
    reference = GPT(CONFIG).double()
    loss = reference(idx, targets)[1]
    loss.backward()
    return idx, targets, loss.item(), {n: p.grad for n, p in reference.named_parameters()}


def _assert_equal_to_one_process(runs, loss, grads, label):
    # the cross-entropy is taken in float32 (as GPT.forward does): a few float32 roundings apart
    assert runs[-1]["loss"] == pytest.approx(loss, rel=1e-6)
    seen = set()
    for run in runs:
        for name, g in run["grads"].items():
            # float64 everywhere else: the pipeline adds the micro-batches' gradients in another
            # order than one process adds the batch's, a few units of float64 rounding (~1e-16)
            ref = grads["transformer.wte.weight" if name == "lm_head.weight" else name]
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12, msg=f"{label} {name}")
            seen.add(name)
    assert seen - {"lm_head.weight"} == set(grads)  # every parameter is checked


@pytest.mark.parametrize("stages", [2, 4])
def test_pipeline_step_equals_one_process(stages):
    """Ours on 2 and 4 processes; torch.distributed.pipelining's schedules on the same 2 processes."""
    idx, targets, loss, grads = _one_process()
    torch_runs = TORCH_RUNS if stages == 2 else []
    both = spawn(both_pipelines, stages, CONFIG, 0, idx, targets, RUNS, torch_runs, torch.float64,
                 timeout=90)
    for k, (schedule, _) in enumerate(torch_runs):
        _assert_equal_to_one_process([b["torch"][k] for b in both], loss, grads, f"torch {schedule}")
    out = [b["ours"] for b in both]
    for k, (schedule, m) in enumerate(RUNS):
        runs = [out[s][k] for s in range(stages)]
        _assert_equal_to_one_process(runs, loss, grads, f"{schedule} m={m} p={stages}")
        for s, run in enumerate(runs):
            assert run["peak_in_flight"] == peak_in_flight_formula(schedule, s, stages, m)
            per_micro_batch = run["saved_bytes"][0]
            assert per_micro_batch > 0 and all(b == per_micro_batch for b in run["saved_bytes"])
            assert run["peak_saved_bytes"] == run["peak_in_flight"] * per_micro_batch
            assert len(run["events"]) == 2 * m
        # causality on one clock: a stage starts micro-batch i's forward after the previous stage
        # finished it, and its backward after the next stage finished that backward
        end = {(s, kind, i): e for s, run in enumerate(runs) for kind, i, _, e in run["events"]}
        for s, run in enumerate(runs):
            for kind, i, start, _ in run["events"]:
                before = (s - 1, "F", i) if kind == "F" else (s + 1, "B", i)
                if before in end:
                    assert start >= end[before]
        assert 0.0 < bubble_fraction([run["events"] for run in runs]) < 1.0
        # every piece's CPU time was recorded, and one thread's CPU time cannot outrun the wall
        # clock (a millisecond of slack: the two clocks tick apart)
        for run in runs:
            assert len(run["cpu"]) == len(run["events"])
            assert all(0.0 < c <= b - a + 1e-3 for c, (_, _, a, b) in zip(run["cpu"], run["events"]))
        replayed = replay_schedule(schedule, [run["events"] for run in runs], [run["cpu"] for run in runs])
        assert 0.0 <= bubble_fraction(replayed) < 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="schedule='zb'"):
        schedule_order("zb", 0, 2, 4)
    with pytest.raises(ValueError, match="stages=5 must be at most n_layer=4"):
        stage_layers(4, 5)
    with pytest.raises(ValueError, match="stage=2 must be in"):
        GPTStage(GPT(CONFIG), 2, 2)
    with pytest.raises(ValueError, match="n_expert=2"):
        GPTStage(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=2)),
                 0, 2)
    with pytest.raises(ValueError, match="micro_batches=0"):
        bubble_formula(2, 0)
