"""wafer: a model of wafer-scale parallelism in the style of the Cerebras Wafer-Scale Engine.

The machines and what runs on them:

- ``hardware``: wafers, GPUs and clusters, every constant with its unit and source, and the package's
  dtype policy (chapter 09);
- ``target``: ``Target``, a wafer with the mode, context length and number format a model runs at
  (chapter 11);
- ``shape``: a model as the wafer reads it, a minigpt ``GPTConfig`` (GPT-2 and the LLaMA/Qwen2/Qwen3
  family), with the one adapter from a minigpt GPT or a Hugging Face GPT-2, the parameter accounting,
  and four open models' configs (chapters 09, 13);
- ``workload``: a model as ops with FLOPs, weights and activations per token (chapter 09);
- ``stages``: the pipeline stages of a workload, their SRAM on a target, and whether a model fits
  (chapter 11).

The analytic model and the simulator it is checked against:

- ``cost``: transfers, collectives, GEMV and GEMM in cycles, the roofline, bounds (chapters 09-10);
- ``mesh``: a cycle-level simulator of the PE mesh (chapter 10);
- ``collectives``: broadcast, reduce, allreduce, GEMV and GEMM as mesh programs (chapter 10);
- ``viz``: heatmaps and timelines of a simulator run (chapter 10).

Layer-pipelined placement (chapter 11):

- ``placement``: layers on rectangles of PEs, and the evaluation of a placement;
- ``strategies``: the placement strategies, one signature each, by name;
- ``optimize``: the search for a faster placement;
- ``placement_sim``: a placement run token by token on the mesh simulator.

Beyond one wafer's SRAM, and the whole model on the mesh:

- ``streaming``: weight-streamed training over a cluster, and training days (chapter 12);
- ``inference``: decode and prefill on square regions, the KV cache's layouts, GPU rooflines (chapter 13);
- ``emulate``: a trained minigpt, GPT-2-style or LLaMA-style, tiled into a placement and run on the mesh
  simulator (chapter 14);
- ``phases``: the emulator's program phase by phase, each phase's cost model, and ``program``, its
  cycles on any grid (chapter 14);
- ``widgets``: the notebooks' interactive placement explorer and training-time estimator (chapters 11-12).
"""

__version__ = "0.1.0"
