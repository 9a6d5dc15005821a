"""wafer: a model of wafer-scale parallelism in the style of the Cerebras Wafer-Scale Engine.

The machines and what runs on them:

- ``hardware``: wafers, GPUs and clusters, every constant with its unit and source, and the package's
  dtype policy (chapter 08);
- ``target``: ``Target``, a wafer with the mode, context length and number format a model runs at
  (chapter 10);
- ``shape``: ``Shape``, a decoder-only transformer's shape (GPT-2 and the LLaMA/Qwen2 family), with the
  one adapter from a minigpt or Hugging Face GPT-2 config (chapters 08, 12);
- ``workload``: a model as ops with FLOPs, weights and activations per token (chapter 08);
- ``stages``: the pipeline stages of a workload, their SRAM on a target, and whether a model fits
  (chapter 10).

The analytic model and the simulator it is checked against:

- ``cost``: transfers, collectives, GEMV and GEMM in cycles, the roofline, bounds (chapters 08-09);
- ``mesh``: a cycle-level simulator of the PE mesh (chapter 09);
- ``collectives``: broadcast, reduce, allreduce, GEMV and GEMM as mesh programs (chapter 09);
- ``viz``: heatmaps and timelines of a simulator run (chapter 09).

Layer-pipelined placement (chapter 10):

- ``placement``: layers on rectangles of PEs, and the evaluation of a placement;
- ``strategies``: the placement strategies, one signature each, by name;
- ``optimize``: the search for a faster placement;
- ``placement_sim``: a placement run token by token on the mesh simulator.

Beyond one wafer's SRAM, and the whole model on the mesh:

- ``streaming``: weight-streamed training over a cluster, and training days (chapter 11);
- ``inference``: decode and prefill on square regions, the KV cache's layouts, GPU rooflines (chapter 12);
- ``emulate``: a trained minigpt tiled into a placement and run on the mesh simulator (chapter 13);
- ``widgets``: the notebooks' interactive placement explorer and training-time estimator (chapters 10-11).
"""

__version__ = "0.1.0"
