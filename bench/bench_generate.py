"""Generation speed: with vs without the KV cache, and minigpt vs Hugging Face's generate."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import best_of, write  # noqa: E402
from minigpt.generate import generate  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

NEW_TOKENS = 256
CONFIG = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50257)


def main() -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():  # spread the positions so that greedy decoding does not loop on one token
        model.transformer.wpe.weight.mul_(30)
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 16))
    outputs = {}

    def run(name, fn):
        seconds = best_of(lambda: outputs.__setitem__(name, fn()), repeat=3)
        return NEW_TOKENS / seconds

    cached = run("cached", lambda: generate(model, prompt, NEW_TOKENS, do_sample=False))
    uncached = run("uncached", lambda: generate(model, prompt, NEW_TOKENS, do_sample=False, use_cache=False))
    hf = model.to_hf()
    theirs = run("hf", lambda: hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                           do_sample=False, pad_token_id=CONFIG.vocab_size - 1))
    assert torch.equal(outputs["cached"], outputs["uncached"]), "cache changed the tokens"
    assert torch.equal(outputs["cached"], outputs["hf"]), "minigpt and transformers disagree"
    rows = [
        {"benchmark": "minigpt generate, KV cache", "value": cached, "unit": "tok/s"},
        {"benchmark": "minigpt generate, no cache", "value": uncached, "unit": "tok/s"},
        {"benchmark": "cache speed-up", "value": cached / uncached, "unit": "x", "target": ">= 5x"},
        {"benchmark": "transformers generate (same weights, greedy)", "value": theirs, "unit": "tok/s"},
        {"benchmark": "minigpt / transformers", "value": cached / theirs, "unit": "x", "target": ">= 1.0"},
    ]
    write("generate", rows, {"model": f"{CONFIG}", "new_tokens": NEW_TOKENS, "prompt_tokens": 16,
                             "batch": 1, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
