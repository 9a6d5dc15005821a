"""The small corpus and model that the Trainer's tests train: a story-world text, its character
tokenizer, a train/validation split of its ids, and a 2-layer GPT 32 wide (dropout 0.1 unless told)."""

import torch

from minigpt.data import story_corpus
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer

TEXT = story_corpus(300, seed=0)
TOK = CharTokenizer.train(TEXT)
IDS = torch.tensor(TOK.encode(TEXT))
TRAIN, VAL = IDS[:60000], IDS[60000:]


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=TOK.vocab_size, dropout=0.1)
    return GPT(GPTConfig(**{**shape, **kw}))
