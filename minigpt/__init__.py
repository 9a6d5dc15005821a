"""minigpt: a GPT built from scratch, one chapter at a time.

Modules: ``stories`` and ``data`` (corpora), ``tokenizer`` (characters and byte-level BPE).
"""

__version__ = "0.1.0"
