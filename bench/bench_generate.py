"""Generation speed: minigpt's generate with and without the KV cache, and transformers' generate.

Greedy decoding of 256 tokens after a 16-token prompt, batch 1, a 6-layer GPT (n_embd 384, vocabulary
50257) in float32, the same weights in both libraries. transformers runs its default ``generate``
(a ``DynamicCache``, no compilation): its static cache (``cache_implementation="static"``) is no
faster on a CPU without ``torch.compile``. The three are timed in turns (cached, transformers,
uncached, then again) and each keeps its best of ``--repeat`` runs, so that load from other programs
reaches all three alike and the least disturbed run counts; the load average is recorded. All three
must produce the same tokens.

Usage: python bench/bench_generate.py [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import interleaved, write  # noqa: E402
from minigpt.generate import generate  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

NEW_TOKENS = 256
PROMPT_TOKENS = 16
CONFIG = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50257)


def interleaved_best(runs: dict, repeat: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run each of ``runs`` (name -> function returning tokens) once per round, ``repeat`` rounds
    (:func:`common.interleaved`, no warm-up); the fastest time of each, in seconds, and the tokens of
    its last run."""
    tokens: dict = {}

    def keeping(name, fn):
        def run() -> None:
            tokens[name] = fn()
        return run

    rounds = interleaved({name: keeping(name, fn) for name, fn in runs.items()}, blocks=repeat, per_block=1,
                         warmup=0)
    return {name: min(seconds) for name, seconds in rounds.items()}, tokens


def head_product_ms(model: GPT, repeat: int) -> dict[str, float]:
    """The head's matrix-vector product (one position's logits) with the weight in nn.Linear's (out, in)
    rows and stored column by column, as generate stores it: best of ``repeat`` rounds of 20, in ms."""
    w = model.lm_head.weight.detach()
    layouts = {"rows": w, "columns": w.t().contiguous().t()}  # the same matrix, two memory layouts
    h = torch.randn(1, CONFIG.n_embd)
    assert torch.allclose(h @ layouts["rows"].t(), h @ layouts["columns"].t(), rtol=1e-5, atol=1e-5)
    best = interleaved_best({name: lambda m=m: [h @ m.t() for _ in range(20)] for name, m in layouts.items()},
                            repeat)[0]
    return {name: 1e3 * seconds / 20 for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each run keeps its best")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():  # spread the positions so that greedy decoding does not loop on one token
        model.transformer.wpe.weight.mul_(30)
    prompt = torch.randint(0, CONFIG.vocab_size, (1, PROMPT_TOKENS))
    hf = model.to_hf()
    runs = {
        "cached": lambda: generate(model, prompt, NEW_TOKENS, do_sample=False),
        "hf": lambda: hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=CONFIG.vocab_size - 1),
        "uncached": lambda: generate(model, prompt, NEW_TOKENS, do_sample=False, use_cache=False),
    }
    load_before = os.getloadavg()[0]
    best, tokens = interleaved_best(runs, args.repeat)
    head = head_product_ms(model, args.repeat)
    load_after = os.getloadavg()[0]
    assert torch.equal(tokens["cached"], tokens["uncached"]), "cache changed the tokens"
    assert torch.equal(tokens["cached"], tokens["hf"]), "minigpt and transformers disagree"
    cached, uncached, theirs = (NEW_TOKENS / best[name] for name in ("cached", "uncached", "hf"))
    rows = [
        {"benchmark": "minigpt generate, KV cache", "value": cached, "unit": "tok/s"},
        {"benchmark": "minigpt generate, no cache", "value": uncached, "unit": "tok/s"},
        {"benchmark": "cache speed-up", "value": cached / uncached, "unit": "x", "target": ">= 5x"},
        {"benchmark": "transformers generate (same weights, greedy)", "value": theirs, "unit": "tok/s"},
        {"benchmark": "minigpt / transformers", "value": cached / theirs, "unit": "x", "target": ">= 1.5"},
        {"benchmark": "head product, weight in (out, in) rows", "value": head["rows"], "unit": "ms"},
        {"benchmark": "head product, weight stored by columns", "value": head["columns"], "unit": "ms"},
    ]
    write("generate", rows, {
        "model": f"{CONFIG}", "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_TOKENS, "batch": 1,
        "dtype": "float32", "threads": torch.get_num_threads(), "repeat": args.repeat,
        "timing": "interleaved rounds (cached, transformers, uncached), best of repeat for each",
        "transformers": "GPT2LMHeadModel.generate, default configuration (DynamicCache, no compile)",
        "load_average_1min": [round(load_before, 2), round(load_after, 2)]})
    print(f"  load average (1 min) before and after: {load_before:.2f}, {load_after:.2f}; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
