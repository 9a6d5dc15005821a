"""The Trainer's fast step computes what the plain one did: the fused AdamW, the foreach clipping, the
attention core in float32 under bf16 autocast on a CPU, a loop that reads the loss only when it reports
it; and the command line's thread setting."""

import pytest
import torch
import torch.nn.functional as F
from tiny_training import TRAIN, VAL, small_model

from minigpt import attention, hardware
from minigpt.__main__ import main
from minigpt.train import TrainConfig, Trainer


def config(**kw):
    base = dict(max_steps=30, batch_size=4, warmup_steps=5, eval_interval=10, eval_batches=2, lr=3e-3,
                checkpoint_interval=0, progress=False, device="cpu", grad_accum=2, bf16="off")
    return TrainConfig(**{**base, **kw})


def unfused_adamw(groups, device, **settings):
    return torch.optim.AdamW(groups, fused=False, **settings)  # torch's default on a CPU: a Python loop


def test_the_fused_adamw_trains_as_the_loop_did(monkeypatch):
    fused = Trainer(small_model(), TRAIN, VAL, config())
    assert fused.optimizer.defaults["fused"]  # on a CPU, with plain tensors
    fused.train()
    monkeypatch.setattr(hardware, "adamw", unfused_adamw)
    loop = Trainer(small_model(), TRAIN, VAL, config())
    assert not loop.optimizer.defaults["fused"]
    loop.train()
    # The fused kernel rounds differently from the loop (a last-bit difference now and then), and
    # training carries that forward: after 30 steps in float32 the weights differed by 3e-6 at most
    # and the losses by 1e-7 here, against a spread of 0.02 in the initial weights.
    for a, b in zip(fused.model.parameters(), loop.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(fused.history, loop.history):
        for key in ("loss", "train", "val"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_the_optimizer_is_fused_only_where_torch_has_the_kernel():
    cpu = torch.nn.Linear(3, 3)
    meta = torch.nn.Linear(3, 3, device="meta")
    assert hardware.adamw([{"params": list(cpu.parameters())}], torch.device("cpu")).defaults["fused"]
    assert not hardware.adamw([{"params": list(meta.parameters())}], torch.device("meta")).defaults["fused"]


def test_clipping_with_foreach_equals_clipping_one_tensor_at_a_time():
    t = Trainer(small_model(), TRAIN, VAL, config())
    t._accumulate()
    grads = [p.grad.clone() * 50 for p in t.model.parameters()]  # large enough to be clipped
    for p, g in zip(t.model.parameters(), grads):
        p.grad = g.clone()
    t.clip_gradients(1.0)  # foreach (one call for all the norms)
    ours = [p.grad.clone() for p in t.model.parameters()]
    assert torch.cat([g.flatten() for g in ours]).norm() == pytest.approx(1.0, rel=1e-5)  # it clipped
    for p, g in zip(t.model.parameters(), grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(t.model.parameters(), 1.0, foreach=False)
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, t.model.parameters()))  # bit for bit


def test_an_unfused_checkpoint_resumes_fused_and_exactly(tmp_path):
    straight = Trainer(small_model(), TRAIN, VAL, config(max_steps=20))
    straight.train()
    first = Trainer(small_model(), TRAIN, VAL, config(max_steps=20), out_dir=tmp_path)
    first.train(steps=10)
    state = first.state()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = False  # as a checkpoint written by the loop implementation says
    torch.save(state, tmp_path / "checkpoint.pt")
    second = Trainer(small_model(seed=5), TRAIN, VAL, config(max_steps=20))
    second.load(tmp_path)
    assert all(group["fused"] for group in second.optimizer.param_groups)
    second.train()
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def bf16_loss_and_grads(model, x, y, context):
    model.zero_grad()
    with context:
        loss = model(x, y)[1]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def core_dtypes(monkeypatch) -> list[torch.dtype]:
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("keys, core", [(16, torch.float32), (attention.FLOAT32_CORE_UP_TO, torch.float32),
                                        (attention.FLOAT32_CORE_UP_TO + 1, torch.bfloat16)])
def test_under_bf16_autocast_on_a_cpu_the_attention_core_runs_in_float32_up_to_its_threshold(
        monkeypatch, keys, core):
    seen = core_dtypes(monkeypatch)
    torch.manual_seed(0)
    mha = attention.MultiHeadAttention(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mha(torch.randn(1, keys, 16))
    assert seen == [(core, core == torch.bfloat16)]  # float32 with autocast off while it runs
    assert y.dtype == torch.bfloat16  # c_proj, under autocast again
    seen.clear()
    mha(torch.randn(1, keys, 16))  # without autocast: float32, as it always was
    assert seen == [(torch.float32, False)]


def test_attention_under_bf16_on_a_cpu_agrees_with_the_bf16_core_and_with_float32(monkeypatch):
    model = small_model(dropout=0.0)
    x, y = Trainer(model, TRAIN, VAL, config()).train_data.batch(8, torch.Generator().manual_seed(0), "cpu")
    ours = bf16_loss_and_grads(model, x, y, torch.autocast("cpu", dtype=torch.bfloat16))
    exact = bf16_loss_and_grads(model, x, y, torch.autocast("cpu", enabled=False))
    monkeypatch.setattr(attention, "FLOAT32_CORE_UP_TO", 0)  # the core in bf16, as autocast would run it
    bf16_core = bf16_loss_and_grads(model, x, y, torch.autocast("cpu", dtype=torch.bfloat16))
    # bf16 keeps 8 significant bits (relative rounding 2^-9): the losses agree to a few of those
    # roundings, and the gradients as vectors to about 1%
    for loss, grads in (ours, bf16_core):
        assert loss == pytest.approx(exact[0], rel=1e-2)
        assert F.cosine_similarity(grads, exact[1], dim=0) > 0.999
        assert (grads - exact[1]).norm() < 0.03 * exact[1].norm()


def count_reads(monkeypatch) -> list[int]:
    reads = [0]
    for name in ("item", "tolist"):
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            reads[0] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_the_loop_reads_the_loss_from_the_device_only_when_it_reports(monkeypatch):
    reads = count_reads(monkeypatch)
    counts = []
    for steps in (10, 40):  # one evaluation each, at the end
        t = Trainer(small_model(), TRAIN, VAL, config(max_steps=steps, eval_interval=steps))
        reads[0] = 0
        t.train()
        counts.append(reads[0])
    # not once a step: the last step's loss and the two evaluations (the progress bar, when shown, reads
    # its running loss once a second)
    assert counts[0] == counts[1] == 3


def test_threads_on_the_command_line_are_set_and_stated(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["train", "--data", "stories", "--stories", "200", "--n-layer", "1", "--n-embd", "32",
                     "--block-size", "16", "--max-steps", "2", "--eval-batches", "1", "--threads", "1",
                     "--bf16", "off", "--no-progress", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "(cpu, 1 thread, float32, 12 windows a step)" in err
    assert main(["train", "--data", "stories", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads=0" in capsys.readouterr().err


def test_tensor_parallel_attention_runs_the_same_core(monkeypatch):
    from minigpt.parallel.tensor import _localize_attention

    seen = core_dtypes(monkeypatch)
    torch.manual_seed(0)
    mha = attention.MultiHeadAttention(16, 2)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = mha(x)
        _localize_attention(mha, 1)  # one rank holding every head: the same module, the local code path
        local = mha(x)
    assert seen == [(torch.float32, False)] * 2
    assert torch.equal(whole, local)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_the_training_forward_compiles_as_one_graph(style):
    """``--compile`` traces the model's forward pass with its loss; a graph break (a branch on a
    tensor's value, say) would split it into pieces compiled apart, with Python between them.
    Dynamo's trace alone, without compiling kernels: seconds, not the minute of a first compile."""
    from minigpt.model import GPT, LLAMA_STYLE, GPTConfig

    extra = LLAMA_STYLE if style == "llama" else {}
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20, **extra))
    x, y = torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = torch._dynamo.explain(model)(x, y)
    with torch.no_grad():
        evaluation = torch._dynamo.explain(model.eval())(x, y)
    for run in (training, evaluation):
        assert run.graph_break_count == 0, run.break_reasons
        assert run.graph_count == 1
