"""Model parallelism on ``torch.distributed``: each strategy written out, run in real processes and
checked equal to one process.

- ``launch``: run a function in N processes joined in a process group (gloo on the CPU).
- ``zero``: ZeRO-1 and -2 (a sharded AdamW written out), ZeRO-3, and per-rank memory.
- ``tensor``: Megatron-style tensor parallelism written out (column then row, heads split), the same
  with torch's ``parallelize_module``, and a 2-D data x tensor mesh.
- ``schedules``: pipeline schedules as arithmetic: GPipe's and 1F1B's orders, the ideal timeline, the
  bubble.
- ``pipeline``: GPipe and 1F1B run with sends and receives over micro-batches, timed.
- ``context``: ring attention, the zig-zag split that balances the causal mask, and a GPT with its
  sequence split.
- ``expert``: a mixture-of-experts MLP (:mod:`minigpt.moe`) with its experts spread over ranks by
  ``all_to_all``.
- ``sharded``: ``torchrun -m minigpt train --fsdp`` and ``--tensor-parallel N``: the Trainer on a
  sharded model, with checkpoints in the single-process format.
- ``planner``: which combinations fit a model on a GPU cluster, and how long a step takes.

Built in: 08_model_parallel
"""
