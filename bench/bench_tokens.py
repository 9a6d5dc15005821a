"""Story generation, BPE training and encoding speed (against tiktoken with the same ranks)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiktoken  # noqa: E402

from common import SHARED_DATA, best_of, write  # noqa: E402
from minigpt.data import generate_stories, story_corpus  # noqa: E402
from minigpt.tokenizer import BPETokenizer  # noqa: E402


def main() -> None:
    rows = []
    gen = best_of(lambda: generate_stories(10_000, seed=0))
    rows.append({"benchmark": "generate 10,000 stories", "value": gen, "unit": "s", "target": "< 5 s"})

    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    if shakespeare.is_file():
        text, corpus = shakespeare.read_text(encoding="utf-8"), "Tiny Shakespeare"
    else:
        text, corpus = story_corpus(3700, seed=0), "story corpus"  # about 1 MB
    mb = len(text.encode()) / 1e6
    holder = {}
    train = best_of(lambda: holder.update(tok=BPETokenizer.train(text, vocab_size=4096)), repeat=1)
    tok = holder["tok"]
    rows.append({"benchmark": f"train BPE vocab 4096 on {corpus} ({mb:.2f} MB)", "value": train,
                 "unit": "s", "target": "< 60 s", "learned_vocab": tok.vocab_size})

    ref = tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_tokens)
    assert tok.encode(text) == ref.encode(text), "minigpt and tiktoken disagree"

    def cold():
        tok._cache.clear()
        tok.encode(text)

    ours_cold = mb / best_of(cold)
    ours_warm = mb / best_of(lambda: tok.encode(text))
    theirs = mb / best_of(lambda: ref.encode(text))
    rows += [
        {"benchmark": "encode, minigpt (empty chunk cache)", "value": ours_cold, "unit": "MB/s",
         "target": ">= 1 MB/s"},
        {"benchmark": "encode, minigpt (warm chunk cache)", "value": ours_warm, "unit": "MB/s"},
        {"benchmark": "encode, tiktoken (same ranks)", "value": theirs, "unit": "MB/s"},
        {"benchmark": "encode ratio minigpt (cold) / tiktoken", "value": ours_cold / theirs, "unit": "x"},
    ]
    write("tokens", rows, {"corpus": corpus, "corpus_mb": mb})


if __name__ == "__main__":
    main()
