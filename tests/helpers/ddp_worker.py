"""Started by tests/test_distributed.py, under torchrun or alone.

    ddp_worker.py grads OUT.pt BATCH ACCUM   one training step's gradients (rank 0 writes them)
    ddp_worker.py fail                       rank 1 raises after its first step; rank 0 goes on
"""

import sys

import torch

from minigpt import distributed
from minigpt.data import story_corpus
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainConfig, Trainer


def trainer(batch_size: int, grad_accum: int) -> Trainer:
    text = story_corpus(200, seed=0)
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size))
    config = TrainConfig(max_steps=3, batch_size=batch_size, grad_accum=grad_accum, device="cpu", bf16="off",
                         progress=False, eval_interval=1, eval_batches=2, seed=5)
    return Trainer(model, ids[: len(ids) * 9 // 10], ids[len(ids) * 9 // 10 :], config)


def main(mode: str, *args: str) -> None:
    with distributed.session("cpu") as (rank, world):
        if mode == "grads":
            out, batch, accum = args[0], int(args[1]), int(args[2])
            t = trainer(batch, accum)
            loss = distributed.mean_over_ranks(t.accumulate_gradients())
            grads = {name: p.grad.clone() for name, p in t.model.named_parameters()}
            t.optimizer.zero_grad()
            history = t.train()  # three full steps, for the loss curve
            if rank == 0:
                torch.save({"loss": loss, "grads": grads, "history": history,
                            "model": t.model.state_dict(), "world": world}, out)
        elif mode == "fail":
            t = trainer(4, 1)
            t.train_step()
            if rank == 1:
                raise RuntimeError("rank 1 failed on purpose after one step")
            t.train(steps=100)  # rank 0 waits in the next all-reduce until torchrun stops it
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
