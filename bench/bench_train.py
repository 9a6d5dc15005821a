"""Training throughput on nanoGPT's CPU recipe: minigpt vs Hugging Face GPT2LMHeadModel, and MFU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import SHARED_DATA, write  # noqa: E402
from minigpt.data import story_corpus  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.train import TrainConfig, Trainer, measure_matmul_peak  # noqa: E402

STEPS, WARMUP = 150, 15


def steps_per_second(step) -> float:
    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS / (time.perf_counter() - start)


def main() -> None:
    path = SHARED_DATA / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8") if path.is_file() else story_corpus(4000)
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    shape = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=tok.vocab_size)
    config = TrainConfig(batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=10**6,
                         progress=False, device="cpu")
    torch.manual_seed(0)
    trainer = Trainer(GPT(shape), ids[:-10000], ids[-10000:], config, tokenizer=tok)
    ours = steps_per_second(trainer.train_step)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=64,
                                    vocab_size=tok.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)

    def hf_step():
        x, y = trainer.train_data.batch(12, g, "cpu")
        logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    theirs = steps_per_second(hf_step)
    tokens = 12 * 64
    peak = measure_matmul_peak(torch.device("cpu"), seconds=2.0)
    rows = [
        {"benchmark": "minigpt Trainer, tokens/s", "value": ours * tokens, "unit": "tok/s"},
        {"benchmark": "transformers GPT2LMHeadModel, same loop, tokens/s", "value": theirs * tokens,
         "unit": "tok/s"},
        {"benchmark": "minigpt / transformers", "value": ours / theirs, "unit": "x", "target": ">= 1.2x"},
        {"benchmark": "measured fp32 matmul peak (n=1024)", "value": peak / 1e9, "unit": "GFLOP/s"},
        {"benchmark": "minigpt MFU", "value": 100 * trainer.mfu(ours * tokens, peak), "unit": "%"},
    ]
    write("train", rows, {"recipe": "char level, 4 layers, 4 heads, 128 wide, block 64, batch 12, AdamW",
                          "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
