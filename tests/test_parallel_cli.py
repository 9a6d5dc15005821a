"""``torchrun -m minigpt train --fsdp`` and ``--tensor-parallel 2``: equal to one process with the
same global batch, their checkpoints in the single-process format (loaded by one process, resumed by
any layout), and one-line errors for what cannot work."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from parallel_cli import load_save_logits

from conftest import ROOT
from minigpt.__main__ import main
from minigpt.distributed import torchrun
from minigpt.model import GPTConfig
from minigpt.parallel.launch import spawn
from minigpt.parallel.sharded import ShardPlan
from minigpt.train import load_checkpoint, model_from_checkpoint

# float32 sums taken in another order (a gradient reduce-scattered instead of summed in one process,
# a matmul's halves added by an all-reduce, the clipping norm from shards): the loss curves agree to
# a few units in the 7th digit, where a wrong share of the batch or a missing average moves them in
# the 2nd or 3rd. The weights agree less closely: AdamW divides each gradient by its running size, so
# where a gradient is near zero (the key bias's is exactly zero in exact arithmetic: adding one number
# to all of a query's scores leaves its softmax unchanged) rounding differences become steps of up
# to lr = 1e-3. A tenth of one such step bounds the 20 steps' differences (measured: 1.6e-6, in
# c_attn's bias).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
X = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(0))  # a batch of token ids


def cli_train(*args):
    return ["-m", "minigpt", "train", "--stories", "300", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--warmup", "5", "--eval-interval", "5", "--eval-batches", "2",
            "--max-steps", "20", "--no-progress", "--device", "cpu", "--bf16", "off", *args]


def run(nproc, *args):
    proc = torchrun(nproc, *cli_train(*args), timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def history(path):
    return [(h["step"], h["val"]) for h in json.loads((path / "history.json").read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process for 20 steps with 8 windows a step; and on two processes, with the same global
    batch, FSDP (4 windows per process) for 10 steps, resumed from its checkpoint for the last 10 by
    tensor parallelism (8 windows, read by both). Beside the resumed run, FSDP and tensor parallelism
    load the one process's checkpoint in two processes, save it again and compute logits of X."""
    tmp = tmp_path_factory.mktemp("cli")
    ref, sharded = tmp / "one", tmp / "fsdp-then-tp"
    with ThreadPoolExecutor(2) as pool:  # independent runs start together
        list(pool.map(lambda a: run(*a), [(1, "--batch-size", "8", "--out", str(ref)),
                                          (2, "--fsdp", "--batch-size", "4", "--steps", "10", "--out",
                                           str(sharded))]))
        resumed = pool.submit(run, 2, "--tensor-parallel", "2", "--batch-size", "8", "--resume", str(sharded))
        saved = [tmp / "fsdp-saved", tmp / "tp-saved"]
        logits = spawn(load_save_logits, 2, str(ref), [str(d) for d in saved], [(True, 1), (False, 2)], X,
                       timeout=120)
        resumed.result()
    return ref, sharded, saved, logits


def test_fsdp_then_tensor_parallel_equal_one_process(runs):
    ref, sharded, _, _ = runs
    want, got = history(ref), history(sharded)
    assert [s for s, _ in got] == [s for s, _ in want] == [5, 10, 15, 20]
    # steps 1-10 under FSDP, 11-20 under tensor parallelism after an exact resume
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=LOSS_RTOL)
    # the checkpoint is the ordinary one: a GPT in one process loads it, with one process's weights
    one, _ = model_from_checkpoint(ref)
    model, _ = model_from_checkpoint(sharded)
    for name, w in one.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)
    ckpt = load_checkpoint(sharded)
    assert ckpt["step"] == 20 and ckpt["world_size"] == 2


def test_sharded_models_load_one_process_checkpoints_and_save_them_unchanged(runs):
    # FSDP and tensor parallelism load one process's checkpoint and give its model's logits (float32
    # sums reordered); what they save is the same checkpoint to the bit: gathering shards is exact
    ref, _, saved, logits = runs
    one, _ = model_from_checkpoint(ref)
    with torch.no_grad():
        want = one(X)[0]
    for rank in range(2):
        for got in logits[rank]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    a = load_checkpoint(ref)
    for out in saved:
        b = load_checkpoint(out)
        assert list(b["model"]) == list(a["model"])
        for name, w in a["model"].items():
            assert torch.equal(b["model"][name], w), name
        # (torch's loader hands AdamW's betas back as a list)
        assert [{**g, "betas": tuple(g["betas"])} for g in b["optimizer"]["param_groups"]] == \
            a["optimizer"]["param_groups"]
        for i, state in a["optimizer"]["state"].items():
            for k, v in state.items():
                assert torch.equal(b["optimizer"]["state"][i][k], v), (i, k)


# -- what cannot work ----------------------------------------------------------------------------------
@pytest.mark.parametrize("plan, world, message", [
    (ShardPlan(fsdp=True), 1, "--fsdp spreads the model over processes, but this is one"),
    (ShardPlan(tensor_parallel=2), 3, "--tensor-parallel 2 must divide the number of processes, 3"),
    (ShardPlan(tensor_parallel=2), 4, "would leave 2 whole copies of each shard: start 2 processes, or "
                                      "add --fsdp"),
    (ShardPlan(fsdp=True, tensor_parallel=2), 2, "leaves one data-parallel rank"),
])
def test_plans_that_cannot_run_on_the_processes_are_refused(plan, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        plan.check_world(world)


def test_plans_and_models_that_cannot_split_are_refused():
    with pytest.raises(ValueError, match="--tensor-parallel 0 must be a whole number"):
        ShardPlan(tensor_parallel=0)
    with pytest.raises(ValueError, match=r"--tensor-parallel 4 must divide n_head=2"):
        ShardPlan(tensor_parallel=4).check_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=10))
    ShardPlan(tensor_parallel=4).check_world(4)  # what can run passes
    ShardPlan(fsdp=True, tensor_parallel=2).check_world(4)
    ShardPlan(tensor_parallel=2).check_model(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=10))


def test_the_command_line_says_what_is_wrong_in_one_line(capsys, tmp_path):
    assert main(cli_train("--tensor-parallel", "2", "--out", str(tmp_path))[2:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("python -m minigpt train: error: --tensor-parallel 2 spreads the model over "
                          "processes, but this is one: start it with torchrun")


def test_the_sharded_trainer_refuses_what_it_cannot_shard():
    from minigpt.model import GPT
    from minigpt.parallel.sharded import ShardedTrainer
    from minigpt.train import TrainConfig

    ids = torch.arange(100) % 10
    config = TrainConfig(device="cpu", bf16="off", progress=False)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))
    with pytest.raises(ValueError, match="--compile is not supported with --fsdp"):
        ShardedTrainer(model, ids, ids, TrainConfig(device="cpu", compile=True), ShardPlan(fsdp=True))
    model.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trains every parameter; frozen here: transformer.wpe.weight$"):
        ShardedTrainer(model, ids, ids, config, ShardPlan(fsdp=True))
    with pytest.raises(ValueError, match="trains a minigpt GPT, not a Linear"):
        ShardedTrainer(torch.nn.Linear(2, 2), ids, ids, config, ShardPlan(fsdp=True))  # type: ignore[arg-type]
