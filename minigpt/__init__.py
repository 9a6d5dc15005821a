"""minigpt: a GPT built from scratch, one chapter at a time.

Modules, in the order the chapters build them:

- ``envcheck``: the environment check (dependencies, versions, the machine).
- ``stories``: the story world, a probabilistic program that writes stories, and its parser.
- ``entropy``: the story world's exact entropy rate, the loss floor.
- ``data``: corpora (the story world, text files, a checksummed downloader).
- ``files``: atomic writes, strict UTF-8 reads, weights-only loading.
- ``tokenizer``: characters and byte-level BPE, and their files.
- ``attention``: scaled dot-product and multi-head attention, positional encodings.
- ``widgets``: the attention explorer.
- ``checks``: the shared check of user input (positive integers).
- ``model``: the GPT (its config, blocks, parameter and FLOP counts, Hugging Face weights).
- ``generate``: decoding (``sample_next`` for every loop, ``generate`` with a KV cache).
- ``train``: pretraining (the Trainer, schedules, checkpoints that resume exactly).
- ``__main__``: the command line, ``python -m minigpt train`` and ``sample``.
- ``finetune``: classification heads, instruction data with a masked loss, their scores.
- ``lora``: LoRA adapters (add, merge, count, save and load).
- ``scaling``: scaling laws, compute-optimal sizes, muP's coordinate check.
- ``distributed``: data parallelism under torchrun, the ring all-reduce and its cost.
- ``moe``: a mixture-of-experts MLP, chosen per block by ``GPTConfig(n_expert=...)``.
- ``parallel``: model parallelism (ZeRO and FSDP, tensor, pipeline, context and expert parallelism,
  ``--fsdp`` and ``--tensor-parallel`` training, the planner), each run in processes.

``minigpt`` never imports ``wafer``.
"""

__version__ = "0.1.0"
