"""Stacked training (minigpt.sweep) against the same runs made one at a time by the Trainer: chapter
06's learning-rate sweep shape (2 layers, 4 heads, block 32, batch 8), 24 members, at widths 16 and 64."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import best_of, write  # noqa: E402
from minigpt.data import story_corpus  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.sweep import train_members  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.train import TrainConfig, Trainer  # noqa: E402

MEMBERS, STEPS, ALONE = 24, 100, 4  # the runs alone are timed on ALONE members and scaled to MEMBERS;
# each timing is the best of three


def settings(lr: float, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, batch_size=8, lr=lr, min_lr=lr / 10, warmup_steps=10, seed=seed,
                       eval_interval=10**6, eval_batches=1, checkpoint_interval=0, progress=False,
                       device="cpu")


def main() -> None:
    text = story_corpus(2000)
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    runs = [settings(1e-3 * 2 ** (k / 2), k % 3) for k in range(MEMBERS)]
    rows = []
    for width in (16, 64):
        config = GPTConfig(n_layer=2, n_head=4, n_embd=width, block_size=32, vocab_size=tok.vocab_size,
                           mup_base_width=64)
        train_members(config, ids, runs[:2], [0, 1])  # warm up both paths
        Trainer(GPT(config), ids, ids, runs[0]).train()
        stacked = best_of(lambda config=config: train_members(config, ids, runs, list(range(MEMBERS))))

        def alone_runs(config=config):
            for i, run in enumerate(runs[:ALONE]):
                torch.manual_seed(i)
                Trainer(GPT(config), ids, ids, run).train()

        alone = best_of(alone_runs) * MEMBERS / ALONE
        rows += [
            {"benchmark": f"width {width}: {MEMBERS} runs stacked, ms per member-step",
             "value": 1e3 * stacked / (MEMBERS * STEPS), "unit": "ms"},
            {"benchmark": f"width {width}: the same runs alone (Trainer), ms per step",
             "value": 1e3 * alone / (MEMBERS * STEPS), "unit": "ms"},
            {"benchmark": f"width {width}: alone / stacked", "value": alone / stacked, "unit": "x",
             "target": ">= 1.2x"},
        ]
    write("sweep", rows, {"shape": "2 layers, 4 heads, block 32, batch 8, muP base 64",
                          "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
