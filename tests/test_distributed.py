"""Data parallelism: DDP gradients equal one process's on the same global batch; a failing rank ends
the job; checkpoints move between one process and several; the ring all-reduce and its cost model."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from minigpt.distributed import LinkModel, ring_allreduce, ring_bytes_per_rank, torchrun

WORKER = str(ROOT / "tests" / "helpers" / "ddp_worker.py")


def single(*args):
    """One process, started the same way as the two (torchrun with one process runs without a group)."""
    return torchrun(1, *args, timeout=90, cwd=ROOT)


@pytest.mark.parametrize("per_rank, accum", [(4, 1), (2, 2)])
def test_ddp_gradients_equal_single_process_gradients(tmp_path, per_rank, accum):
    # two processes with `per_rank` windows each, `accum` micro-batches a step, against one process
    # with twice the windows per micro-batch: the same global batch, so the same gradient
    ddp = torchrun(2, WORKER, "grads", str(tmp_path / "ddp.pt"), str(per_rank), str(accum), timeout=60,
                   cwd=ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = single(WORKER, "grads", str(tmp_path / "one.pt"), str(2 * per_rank), str(accum))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("ddp.pt", "one.pt"))
    assert a["world"] == 2 and b["world"] == 1
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    # float32 sums taken in another order: agreement to a few units in the 7th digit of the largest
    # gradient, far below any gradient that would matter (a wrong shard or a missing average is 1e-2)
    for name, g in b["grads"].items():
        scale = g.abs().max().item()
        torch.testing.assert_close(a["grads"][name], g, rtol=1e-5, atol=1e-6 * max(scale, 1e-3), msg=name)
    # and three optimizer steps later the weights and the loss curve still agree
    for name, w in b["model"].items():
        torch.testing.assert_close(a["model"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["val"] for h in a["history"]] == pytest.approx([h["val"] for h in b["history"]], rel=1e-5)


def test_a_failing_rank_ends_the_job_with_its_error():
    # rank 1 raises while rank 0 waits in an all-reduce: torchrun must stop rank 0 and report rank 1
    proc = torchrun(2, WORKER, "fail", timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout


def cli_train(*args):
    return ["-m", "minigpt", "train", "--stories", "300", "--n-layer", "1", "--n-embd", "32",
            "--block-size", "32", "--warmup", "5", "--eval-interval", "10", "--eval-batches", "2",
            "--no-progress", "--device", "cpu", "--bf16", "off", *args]


def history(path):
    return json.loads((path / "history.json").read_text())


def test_checkpoints_move_between_one_process_and_two(tmp_path):
    # of a 40-step run, 0 -> 20 steps in one process, 20 -> 40 in two; and the other way round; both
    # equal one process's 40 steps with the same global batch of 8 windows
    ref = single(*cli_train("--batch-size", "8", "--max-steps", "40", "--out", str(tmp_path / "ref")))
    assert ref.returncode == 0, ref.stderr
    a, b = tmp_path / "one-then-two", tmp_path / "two-then-one"
    steps = [
        single(*cli_train("--batch-size", "8", "--max-steps", "40", "--steps", "20", "--out", str(a))),
        torchrun(2, *cli_train("--batch-size", "4", "--max-steps", "40", "--resume", str(a)), cwd=ROOT,
                 timeout=90),
        torchrun(2, *cli_train("--batch-size", "4", "--max-steps", "40", "--steps", "20", "--out", str(b)),
                 cwd=ROOT,
                 timeout=90),
        single(*cli_train("--batch-size", "8", "--max-steps", "40", "--resume", str(b))),
    ]
    for proc in steps:
        assert proc.returncode == 0, proc.stderr[-3000:]
    want = [(h["step"], h["val"]) for h in history(tmp_path / "ref")]
    for run in (a, b):
        got = [(h["step"], h["val"]) for h in history(run)]
        assert [s for s, _ in got] == [s for s, _ in want] == [10, 20, 30, 40]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


# -- the ring all-reduce and its cost ----------------------------------------------------------------
@given(n=st.integers(1, 6), size=st.integers(1, 40), seed=st.integers(0, 1000))
def test_ring_allreduce_sums(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]
    results, sent = ring_allreduce(tensors)
    total = torch.stack(tensors).sum(0)
    for r in results:
        torch.testing.assert_close(r, total)
    if size % n == 0:  # equal chunks: every rank sends exactly 2 (N - 1) / N of the tensor
        assert sent == [ring_bytes_per_rank(size * 8, n)] * n


def test_ring_allreduce_keeps_shapes_and_rejects_mismatches():
    results, _ = ring_allreduce([torch.ones(3, 4), torch.ones(3, 4)])
    assert results[0].shape == (3, 4) and (results[1] == 2).all()
    with pytest.raises(ValueError, match="one shape"):
        ring_allreduce([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="at least one"):
        ring_allreduce([])


def test_link_model_fit_recovers_alpha_and_beta():
    true = LinkModel(alpha=20e-6, beta=2e9)
    sizes = [2**k for k in range(10, 24)]
    times = [true.message(s) * (1 + 0.01 * math.sin(s)) for s in sizes]
    fit = LinkModel.fit(sizes, times)
    assert fit.beta == pytest.approx(true.beta, rel=0.02)
    assert fit.alpha == pytest.approx(true.alpha, rel=0.2)
    assert true.ring_allreduce(8e6, 2) == pytest.approx(2 * 20e-6 + 8e6 / 2e9)
    assert true.ring_allreduce(8e6, 1) == 0.0
    with pytest.raises(ValueError, match="two or more"):
        LinkModel.fit([1], [1.0])
    with pytest.raises(ValueError, match="do not grow"):
        LinkModel.fit([1, 2, 3], [3.0, 2.0, 1.0])
