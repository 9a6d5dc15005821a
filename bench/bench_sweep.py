"""Stacked training (minigpt.sweep) against the same runs made one at a time by the Trainer: chapter
06's learning-rate sweep shape (2 layers, 4 heads, block 32, batch 8), 24 members, at widths 16 and 64.

And runs of different shapes: chapter 06's family (nine models, widths 8 to 48, each at a quarter of
its steps), trained one after another with this process's threads, one after another with one
thread, and by ``in_processes`` in two worker processes of one thread each; in rounds, the three
ways taken in turn, each time the median of the rounds."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import best_of, interleaved, write  # noqa: E402
from minigpt.data import story_corpus, train_val_split  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.scaling import compute_optimal_tokens  # noqa: E402
from minigpt.sweep import in_processes, train_alone, train_members  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.train import TrainConfig, Trainer  # noqa: E402

MEMBERS, STEPS, ALONE = 24, 100, 4  # the runs alone are timed on ALONE members and scaled to MEMBERS;
# each timing is the best of three


def settings(lr: float, seed: int) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, batch_size=8, lr=lr, min_lr=lr / 10, warmup_steps=10, seed=seed,
                       eval_interval=10**6, eval_batches=1, checkpoint_interval=0, progress=False,
                       device="cpu")


FAMILY_ROUNDS, FAMILY_SHARE = 3, 4  # rounds of the three ways; each run at 1/FAMILY_SHARE of its steps


def family_runs() -> list[tuple]:
    """Chapter 06's family as ``train_alone`` calls, the largest first (as the chapter hands them out)."""
    text = story_corpus(6000, seed=0)
    tok = CharTokenizer.train(text)
    train_ids, val_ids = (torch.tensor(tok.encode(t)) for t in train_val_split(text, 0.1))
    runs = []
    for width in (8, 12, 16, 20, 24, 28, 32, 40, 48):
        config = GPTConfig(n_layer=2, n_head=4, n_embd=width, block_size=64, vocab_size=tok.vocab_size,
                           mup_base_width=32)
        n = GPT(config).num_parameters()
        batch = min(16, max(2, round(compute_optimal_tokens(n) / (64 * 1000))))
        steps = round(compute_optimal_tokens(n) / (64 * batch)) // FAMILY_SHARE
        runs.append((config, train_ids, val_ids,
                     TrainConfig(max_steps=steps, batch_size=batch, lr=8e-3, min_lr=8e-4,
                                 warmup_steps=steps // 10, eval_interval=steps, eval_batches=1,
                                 checkpoint_interval=0, progress=False, device="cpu", bf16="off")))
    return runs[::-1]


def family_rows() -> list[dict]:
    runs, threads = family_runs(), torch.get_num_threads()

    def one_after_another(n: int) -> None:
        torch.set_num_threads(n)
        try:
            for run in runs:
                train_alone(*run)
        finally:
            torch.set_num_threads(threads)

    ways = {f"one after another, {threads} threads": lambda: one_after_another(threads),
            "one after another, 1 thread": lambda: one_after_another(1),
            "two processes of 1 thread (in_processes)": lambda: in_processes(train_alone, runs, processes=2)}
    times = interleaved(ways, blocks=FAMILY_ROUNDS, per_block=1, warmup=0)
    base = statistics.median(times[f"one after another, {threads} threads"])
    rows = []
    for name, values in times.items():
        rows.append({"benchmark": f"family, {name}, s", "value": statistics.median(values), "unit": "s"})
        if not name.startswith(f"one after another, {threads}"):
            rows.append({"benchmark": f"  {threads} threads one after another / this", "unit": "x",
                         "value": base / statistics.median(values)})
    return rows


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
    rows += family_rows()
    write("sweep", rows, {"shape": "2 layers, 4 heads, block 32, batch 8, muP base 64",
                          "family_shape": "2 layers, 4 heads, block 64, widths 8 to 48, batches 2 to 16, muP "
                                          f"base 32, 1/{FAMILY_SHARE} of each run's steps",
                          "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
