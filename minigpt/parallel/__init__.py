"""Model parallelism on ``torch.distributed``: each strategy written out, run in real processes and
checked equal to one process.

- ``launch``: run a function in N processes joined in a process group (gloo on the CPU).
- ``zero``: ZeRO-1 and -2 (a sharded AdamW written out), ZeRO-3, and per-rank memory.
- ``tensor``: Megatron-style tensor parallelism written out (column then row, heads split).
- ``apply``: the same strategies with torch's own tools (``fully_shard``, ``parallelize_module``)
  applied to a GPT, as ``python -m minigpt train --fsdp`` and ``--tensor-parallel`` use them.
- ``pipeline``: GPipe and 1F1B schedules over micro-batches, with the bubble measured.
- ``context``: ring attention, and the zig-zag split that balances the causal mask.
- ``expert``: a mixture-of-experts MLP with its experts spread over ranks by ``all_to_all``.
- ``planner``: which combinations fit a model on a GPU cluster, and how long a step takes.

Built in: 08_model_parallel
"""
